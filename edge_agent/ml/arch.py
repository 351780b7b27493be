"""Model architecture registry (numpy only; no torch).

The architectures are the files of ``edge_agent.ml.models`` (one file each: the torch
module, imported only where torch is, and its parameter layout as data); this module gives
the torch-free side what it needs of them: the names, the parameter names and shapes (the
PyTorch ``state_dict`` of the module, so a worker (torch), a validator (ONNX Runtime) and
the aggregation code all agree on the parameter set of a model), deterministic initial
parameters and checks. ``python -m edge_agent.ml.models list`` lists them:

* ``"cnn"``: the FedAvg MNIST CNN (the paper's), 1,663,370 parameters;
* ``"lenet5"``: LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, 61,706 parameters;
* ``"mlp"``: the FedAvg "2NN", 784-200-200-10, 199,210 parameters.
"""

from __future__ import annotations

import math

import numpy as np

from . import models

__all__ = ["ARCHS", "check_params", "init_params", "n_params", "param_shapes"]

ARCHS: tuple[str, ...] = models.names()


def param_shapes(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of ``arch`` in a fixed order (torch layout)."""
    return list(models.get(arch).layout)


def n_params(arch: str) -> int:
    """Total number of scalar parameters of ``arch``."""
    return sum(math.prod(shape) for _, shape in param_shapes(arch))


def init_params(arch: str, seed: int) -> dict[str, np.ndarray]:
    """Deterministic initial parameters, identical on every platform.

    Same distribution as PyTorch's default ``nn.Linear`` / ``nn.Conv2d`` init: weight and
    bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), where fan_in is the number of inputs of a
    unit (in_features, or in_channels * kh * kw). Drawn in float64 from
    ``np.random.default_rng(seed)`` in :func:`param_shapes` order, then cast to float32.
    """
    rng = np.random.default_rng(int(seed))
    params: dict[str, np.ndarray] = {}
    fan_in = 1
    for name, shape in param_shapes(arch):
        if name.endswith(".weight"):
            fan_in = math.prod(shape[1:])
        bound = 1.0 / math.sqrt(fan_in)
        params[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return params


def layout_mismatch(params: dict, ref: dict) -> str | None:
    """How ``params`` differs from ``ref`` in parameter names or shapes (None: same layout),
    phrased to follow a subject: "has parameters [...], expected [...]" or
    "param NAME has shape (...), expected (...)"."""
    if sorted(params) != sorted(ref):
        return f"has parameters {sorted(params)}, expected {sorted(ref)}"
    for k in sorted(ref):
        if np.shape(params[k]) != np.shape(ref[k]):
            return f"param {k} has shape {np.shape(params[k])}, expected {np.shape(ref[k])}"
    return None


def check_params(arch: str, params: dict[str, np.ndarray], finite: bool = True) -> None:
    """Raise ValueError (one line) unless ``params`` is a valid float32 ``arch`` model
    (with ``finite``, also free of NaN and infinities)."""
    expected = param_shapes(arch)
    if not isinstance(params, dict):
        raise ValueError(f"{arch} params must be a dict, got {type(params).__name__}")
    names = {name for name, _ in expected}
    missing = sorted(names - set(params))
    extra = sorted(set(params) - names)
    if missing or extra:
        raise ValueError(f"not a {arch} model: missing {missing}, unexpected {extra}")
    for name, shape in expected:
        value = params[name]
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{arch} param {name} is {type(value).__name__}, not a numpy array")
        if value.dtype != np.float32:
            raise ValueError(f"{arch} param {name} has dtype {value.dtype}, expected float32")
        if value.shape != shape:
            raise ValueError(f"{arch} param {name} has shape {value.shape}, expected {shape}")
        if finite and not np.isfinite(value).all():
            raise ValueError(f"{arch} param {name} contains NaN or infinite values")
