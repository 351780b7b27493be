"""The model architectures: one file per architecture in this package (no torch imported).

Each ``NAME.py`` here (a name not starting with ``_``) is an architecture, found by listing
the package: adding a file makes ``--model NAME`` available to the CLI, the agents, the
ledger checks and the validators, with nothing to edit elsewhere. A file defines

* ``LAYOUT``: ``((name, shape), ...)``, the module's ``state_dict`` in order (names and
  shapes, written out as data);
* ``module()``: a new torch ``nn.Module`` of the architecture. torch is imported INSIDE this
  function, so importing the file costs nothing and needs no torch;
* optionally ``BAKE_FROM``: from how many test images a validator evaluates a model in an
  ONNX Runtime session of its own (``edge_agent.ml.onnx_eval.BAKE_FROM``; default: never).

Beside it, ``NAME.onnx`` is the architecture's graph for the validators, made from
``module()`` by ``torch.onnx.export`` and committed (weights as graph inputs named as the
``state_dict`` keys, input ``x`` [batch, 1, 28, 28], output ``logits`` [batch, 10])::

    python -m edge_agent.ml.models export NAME     # (re)writes NAME.onnx; no NAME: all

Why the layout is written out in the file rather than read from the module or the graph:
validators, the ledger, aggregation and the orchestrator need the parameter names and
shapes (initial models, blob checks), and none of them may import torch (an agent must not
map libtorch: tests/test_compute.py); reading the ``.onnx`` instead would make the
``onnx`` package a dependency of every process, validator extra or not. The duplication is
checked instead: the exporter refuses a module whose ``state_dict`` differs from
``LAYOUT``, and a validator refuses a graph whose inputs differ from it.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["Architecture", "architectures", "get", "names"]

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Architecture:
    name: str
    layout: tuple[tuple[str, tuple[int, ...]], ...]
    bake_from: int | None
    summary: str  # the first line of the file's docstring
    module_name: str  # the Python module of the file

    @property
    def graph_path(self) -> Path:
        """The committed ONNX graph (weights as inputs) beside the file."""
        return Path(importlib.import_module(self.module_name).__file__).with_suffix(".onnx")

    def module(self):
        """A new torch module of the architecture (imports torch)."""
        return importlib.import_module(self.module_name).module()

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.layout)


def _load(name: str) -> Architecture:
    mod = importlib.import_module(f"{__name__}.{name}")
    where = f"{__name__}.{name} ({getattr(mod, '__file__', '?')})"
    layout = getattr(mod, "LAYOUT", None)
    if not callable(getattr(mod, "module", None)) or not isinstance(layout, (tuple, list)) or not layout:
        raise ImportError(f"architecture file {where} must define LAYOUT ((name, shape), ...) and module()")
    try:
        layout = tuple((str(k), tuple(int(d) for d in s)) for k, s in layout)
    except (TypeError, ValueError) as exc:
        raise ImportError(f"architecture file {where}: LAYOUT is not ((name, shape), ...): {exc}") from None
    bake_from = getattr(mod, "BAKE_FROM", None)
    summary = ((mod.__doc__ or "").strip().splitlines() or [name])[0]
    return Architecture(name, layout, None if bake_from is None else int(bake_from), summary, mod.__name__)


@lru_cache(maxsize=1)
def architectures() -> dict[str, Architecture]:
    """Every architecture file of this package, by name (sorted)."""
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and not m.ispkg)
    return {name: _load(name) for name in found}


def names() -> tuple[str, ...]:
    return tuple(architectures())


def get(name: str) -> Architecture:
    """The architecture ``name``; ValueError (one line) naming the known ones otherwise."""
    try:
        return architectures()[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(names())}") from None
