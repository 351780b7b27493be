"""Attacks of malicious workers (numpy only).

Model-poisoning attacks (registered in :data:`ATTACKS`, applied with :func:`apply_attack`
to the parameters a worker has just learned, before it publishes them). Every attack is
``fn(params, *, seed, base=None, **kw) -> params``; ``base`` is the global model
G_{j-1} the worker started the round from, supplied by the caller. Inputs are never
modified; outputs are fresh float32 arrays.

* ``"gaussian"``: add N(0, variance) noise to every parameter (the PoS-BFL paper,
  Section 5.1, uses variance 1; also the "Gaussian" Byzantine worker of Blanchard et al.
  2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent").
* ``"sign_flip"``: publish ``base - scale * (params - base)``, i.e. the negated local
  update (the sign-flipping attack of e.g. Damaskinos et al. 2018 / Li et al. 2019,
  "RSA: Byzantine-Robust Stochastic Aggregation Methods").
* ``"scale"``: publish ``base + scale * (params - base)``, a boosted update (model
  replacement / boosting, Bhagoji et al. 2019, "Analyzing Federated Learning through an
  Adversarial Lens"; Bagdasaryan et al. 2020, "How To Backdoor Federated Learning").
* ``"lazy"``: publish a copy of ``base``: the worker skips training and resubmits the
  global model (free-riding, Lin et al. 2019, "Free-riders in Federated Learning").

Data-poisoning attacks change the training data rather than the parameters and live in
:data:`DATA_ATTACKS`; callers apply them to the labels BEFORE local training:

* ``"label_flip"``: :func:`flip_labels`, y -> num_classes - 1 - y (Fung et al. 2020,
  "The Limitations of Federated Learning in Sybil Settings"; Tolpegin et al. 2020,
  "Data Poisoning Attacks Against Federated Learning Systems").

``"invert_votes"`` is a malicious VALIDATOR behaviour (it inverts its accept/reject
votes); it is handled by the validator code, not here, and is listed in
:data:`ATTACK_NAMES` only so configurations can be checked against one list.
:func:`apply_attack` rejects data-attack and validator-behaviour names with a ValueError.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .arch import layout_mismatch

__all__ = [
    "ATTACKS",
    "ATTACK_NAMES",
    "DATA_ATTACKS",
    "VALIDATOR_BEHAVIOURS",
    "apply_attack",
    "flip_labels",
    "gaussian_noise",
    "lazy",
    "scale_update",
    "sign_flip",
]

Params = dict[str, np.ndarray]


def gaussian_noise(params: Params, variance: float = 1.0, *, seed: int, base: Params | None = None) -> Params:
    """Add N(0, ``variance``) noise to every parameter (paper Section 5.1, variance 1).

    Noise is drawn in float64 from ``np.random.default_rng(seed)`` in sorted name order
    and the result cast back to float32; the input dict is not modified. ``base`` is
    accepted for the uniform attack signature and ignored.
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


def _check_base(attack: str, params: Params, base: Params | None) -> Params:
    if base is None:
        raise ValueError(f"attack {attack!r} needs base= (the global model the worker started from)")
    mismatch = layout_mismatch(base, params)
    if mismatch:
        raise ValueError(f"attack {attack!r}: base {mismatch}")
    return base


def _scaled_delta(attack: str, params: Params, base: Params | None, factor: float) -> Params:
    """``base + factor * (params - base)`` in float64, cast to float32."""
    base = _check_base(attack, params, base)
    factor = float(factor)
    if not math.isfinite(factor):
        raise ValueError(f"attack {attack!r}: scale must be finite, got {factor}")
    out = {}
    for k in sorted(params):
        b = np.asarray(base[k], dtype=np.float64)
        out[k] = (b + factor * (np.asarray(params[k], dtype=np.float64) - b)).astype(np.float32)
    return out


def sign_flip(params: Params, scale: float = 1.0, *, seed: int, base: Params | None = None) -> Params:
    """Negated update: ``base + scale * -(params - base)`` (needs ``base``; ``seed`` unused)."""
    return _scaled_delta("sign_flip", params, base, -float(scale))


def scale_update(params: Params, scale: float = 10.0, *, seed: int, base: Params | None = None) -> Params:
    """Boosted update: ``base + scale * (params - base)`` (needs ``base``; ``seed`` unused)."""
    return _scaled_delta("scale", params, base, float(scale))


def lazy(params: Params, *, seed: int, base: Params | None = None) -> Params:
    """A copy of ``base``: the lazy worker resubmits the global model (``params`` only fixes the names)."""
    base = _check_base("lazy", params, base)
    return {k: np.array(base[k], dtype=np.float32, copy=True) for k in sorted(params)}


def flip_labels(y: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Label flipping: every label ``y`` becomes ``num_classes - 1 - y`` (same dtype, new array)."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= int(num_classes)):
        raise ValueError(f"labels must lie in 0..{int(num_classes) - 1}, got {int(y.min())}..{int(y.max())}")
    return (int(num_classes) - 1 - y.astype(np.int64)).astype(y.dtype)


ATTACKS: dict[str, Callable[..., Params]] = {
    "gaussian": gaussian_noise,
    "sign_flip": sign_flip,
    "scale": scale_update,
    "lazy": lazy,
}

DATA_ATTACKS: dict[str, Callable[..., np.ndarray]] = {
    "label_flip": flip_labels,
}

# Malicious validator behaviours, implemented by the validator (not by this module).
VALIDATOR_BEHAVIOURS = ("invert_votes",)

ATTACK_NAMES: tuple[str, ...] = tuple(ATTACKS) + tuple(DATA_ATTACKS) + VALIDATOR_BEHAVIOURS


def apply_attack(name: str, params: Params, seed: int, base: Params | None = None, **kw) -> Params:
    """Apply the model-poisoning attack ``name`` (extra keyword options are passed through).

    ``base`` is the global model the worker started from (required by sign_flip, scale
    and lazy). Data attacks and validator behaviours raise ValueError: they are not
    applied to parameters.
    """
    if name in DATA_ATTACKS:
        raise ValueError(
            f"{name!r} is a data attack: apply attacks.DATA_ATTACKS[{name!r}] to the training "
            "labels before local training, not to the parameters"
        )
    if name in VALIDATOR_BEHAVIOURS:
        raise ValueError(f"{name!r} is a validator behaviour, not a model attack")
    try:
        attack = ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(ATTACK_NAMES)}") from None
    return attack(params, seed=seed, base=base, **kw)
