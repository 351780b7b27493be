"""Model architecture registry (numpy only; no torch).

Parameter names and layouts equal PyTorch ``state_dict`` names of the modules in
``edge_agent.ml.train``, so a worker (torch), a validator (ONNX Runtime) and the
aggregation code all agree on the parameter set of a model.

* ``"mlp"``: the FedAvg "2NN" (McMahan et al. 2017): 784-200-200-10, ReLU between layers.
* ``"cnn"``: the FedAvg MNIST CNN (also used by VBFL): conv5x5(32, pad 2) -> ReLU ->
  maxpool 2 -> conv5x5(64, pad 2) -> ReLU -> maxpool 2 -> flatten (NCHW, 3136) ->
  fc 512 -> ReLU -> fc 10; 1,663,370 parameters.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ARCHS", "check_params", "init_params", "n_params", "param_shapes"]

ARCHS = ("mlp", "cnn")

_SHAPES: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {
    "mlp": (
        ("fc1.weight", (200, 784)),
        ("fc1.bias", (200,)),
        ("fc2.weight", (200, 200)),
        ("fc2.bias", (200,)),
        ("fc3.weight", (10, 200)),
        ("fc3.bias", (10,)),
    ),
    "cnn": (
        ("conv1.weight", (32, 1, 5, 5)),
        ("conv1.bias", (32,)),
        ("conv2.weight", (64, 32, 5, 5)),
        ("conv2.bias", (64,)),
        ("fc1.weight", (512, 64 * 7 * 7)),
        ("fc1.bias", (512,)),
        ("fc2.weight", (10, 512)),
        ("fc2.bias", (10,)),
    ),
}


def _check_arch(arch: str) -> str:
    if arch not in _SHAPES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    return arch


def param_shapes(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of ``arch`` in a fixed order (torch layout)."""
    return list(_SHAPES[_check_arch(arch)])


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
