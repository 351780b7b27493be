"""Model-poisoning attacks of malicious workers (numpy only).

Paper Section 5.1: a malicious worker injects Gaussian noise of variance 1 into its
locally learned parameters before publishing them. Attacks are registered in
:data:`ATTACKS` and applied with :func:`apply_attack`, so new ones can be added (or
composed from existing ones) without touching callers.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["ATTACKS", "apply_attack", "gaussian_noise"]


def gaussian_noise(params: dict[str, np.ndarray], variance: float = 1.0, *, seed: int) -> dict[str, np.ndarray]:
    """Add N(0, ``variance``) noise to every parameter (paper Section 5.1, variance 1).

    Noise is drawn in float64 from ``np.random.default_rng(seed)`` in sorted name order
    and the result cast back to float32; the input dict is not modified.
    """
    if variance < 0:
        raise ValueError(f"variance must be >= 0, got {variance}")
    rng = np.random.default_rng(int(seed))
    std = math.sqrt(float(variance))
    out = {}
    for name in sorted(params):
        value = np.asarray(params[name])
        noise = rng.standard_normal(value.shape) * std
        out[name] = (value.astype(np.float64) + noise).astype(np.float32)
    return out


ATTACKS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "gaussian": gaussian_noise,
}


def apply_attack(name: str, params: dict[str, np.ndarray], seed: int, **kw) -> dict[str, np.ndarray]:
    """Apply the registered attack ``name`` (extra keyword options are passed through)."""
    try:
        attack = ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(sorted(ATTACKS))}") from None
    return attack(params, seed=seed, **kw)
