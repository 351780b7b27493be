"""Model evaluation with ONNX Runtime (onnx + onnxruntime + numpy; no torch).

Validators evaluate A(G_{j-1}) and A(L_j^w) on their own test split without PyTorch.
The ONNX graph of each architecture is the committed ``edge_agent/ml/models/NAME.onnx``,
exported from the architecture's torch module (``python -m edge_agent.ml.models export``)
and loaded here with the onnx package alone. It takes the WEIGHTS AS GRAPH INPUTS, so one
InferenceSession per architecture serves every model: a model is evaluated by feeding its
parameter arrays next to the images. From ``BAKE_FROM`` images on, a model gets a session of
its own with the same graph's weights turned into initializers; :func:`export_onnx` bakes a
model's parameters in as initializers, giving a self-contained file for deploying a global model.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import models
from .arch import check_params, param_shapes

__all__ = ["Evaluator", "build_graph", "export_onnx"]
# Images per inference call: 25 keeps ONNX Runtime's arena for the CNN near 11 MB per process
# (500 at once grows it by 200 MB, in every agent of a host) and is no slower: 141-146 ms
# against 147-149 ms at 50 and 150-158 ms at 10, for 500 test images on one thread
# (python benchmarks/bench_eval_batch.py --batches 50,25,10, 2026-12-05).
EVAL_BATCH = 25

# From how many images a model is evaluated in a session of its own, with its weights as
# constant initializers, rather than fed to the shared session (None: never). Each
# architecture's file sets its own (``BAKE_FROM`` in edge_agent/ml/models/NAME.py).
BAKE_FROM: dict[str, int | None] = {a.name: a.bake_from for a in models.architectures().values()}


@lru_cache(maxsize=None)
def _graph_bytes(arch: str) -> bytes:
    """The committed graph of ``arch``, checked against its parameter layout."""
    import onnx
    from onnx import TensorProto

    a = models.get(arch)
    path = a.graph_path
    redo = f"make it with: python -m edge_agent.ml.models export {arch}"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"architecture {arch!r} has no ONNX graph {path}; {redo}") from None
    model = onnx.load_from_string(raw)
    g = model.graph

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    got = [(i.name, dims(i)) for i in g.input]
    want = [("x", ["batch", 1, 28, 28])] + [(k, list(s)) for k, s in a.layout]
    if got != want or [(o.name, dims(o)) for o in g.output] != [("logits", ["batch", 10])] or any(
        i.type.tensor_type.elem_type != TensorProto.FLOAT for i in g.input
    ):
        raise ValueError(f"{path} does not take x and the parameters of {arch}'s LAYOUT to logits; {redo}")
    return raw


def build_graph(arch: str, params: dict[str, np.ndarray] | None = None):
    """The ONNX ModelProto of ``arch`` (its committed, exported graph).

    Without ``params`` every weight is a graph input (shared-session evaluation);
    with ``params`` the weights are initializers (self-contained export).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(_graph_bytes(arch))
    if params is not None:
        check_params(arch, params)
        del model.graph.input[1:]  # only "x" stays an input
        model.graph.initializer.extend(
            numpy_helper.from_array(np.ascontiguousarray(params[k]), k) for k, _ in param_shapes(arch)
        )
    return model


class Evaluator:
    """Evaluates ``arch`` models on ONNX Runtime with one lazily created, shared session."""

    def __init__(self, arch: str, threads: int = 1):
        param_shapes(arch)  # validates the name
        self.arch = arch
        self.threads = int(threads)
        self._session = None
        self._baked_template: bytes | None = None
        self._lock = threading.Lock()

    @property
    def session(self):
        if self._session is None:
            with self._lock:
                if self._session is None:
                    import onnxruntime as ort

                    self._session = ort.InferenceSession(
                        _graph_bytes(self.arch), sess_options=self._options(), providers=["CPUExecutionProvider"]
                    )
        return self._session

    def _feeds(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_params(self.arch, params, finite=False)  # a diverged model is scored, not refused
        return {k: np.ascontiguousarray(params[k]) for k, _ in param_shapes(self.arch)}

    def _runner(self, params: dict[str, np.ndarray], n: int):
        """A function from a batch of images to the logits of ``params``, for ``n`` images:
        the shared session fed the weights, or from ``BAKE_FROM`` images on, a session of
        this model alone (dropped with the function)."""
        feeds = self._feeds(params)
        bake_from = BAKE_FROM.get(self.arch)
        if bake_from is None or n < bake_from:
            session = self.session

            def run(xb: np.ndarray) -> np.ndarray:
                feeds["x"] = np.ascontiguousarray(xb)
                return session.run(["logits"], feeds)[0]

            return run
        import onnxruntime as ort

        # the weights reach ONNX Runtime as external initializers, without a copy into a
        # serialized model (which, under the agents' 1 MB mmap threshold, cost 23 ms of a
        # 500-image evaluation's 120); the arrays must outlive the session: ``values`` does
        names = [k for k, _ in param_shapes(self.arch)]
        values = [ort.OrtValue.ortvalue_from_numpy(feeds[k]) for k in names]
        opts = self._options()
        opts.add_external_initializers(names, values)
        session = ort.InferenceSession(self._template(), sess_options=opts, providers=["CPUExecutionProvider"])
        return lambda xb: (values, session.run(["logits"], {"x": np.ascontiguousarray(xb)})[0])[1]

    def _template(self) -> bytes:
        """The graph of ``arch`` with its weights as initializers whose data is external:
        a session supplies them (``SessionOptions.add_external_initializers``)."""
        if self._baked_template is None:
            from onnx import TensorProto

            model = build_graph(self.arch)
            del model.graph.input[1:]  # only "x" stays an input
            for name, shape in param_shapes(self.arch):
                t = model.graph.initializer.add(name=name, data_type=TensorProto.FLOAT, dims=shape,
                                                data_location=TensorProto.EXTERNAL)  # fmt: skip
                t.external_data.add(key="location", value="supplied-by-the-session")
            self._baked_template = model.SerializeToString()
        return self._baked_template

    def _options(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        return opts

    @staticmethod
    def _images(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"expected images [n, 1, 28, 28], got shape {x.shape}")
        return x

    def predict(self, params: dict[str, np.ndarray], x: np.ndarray, batch: int = EVAL_BATCH) -> np.ndarray:
        """Logits float32 [n, 10] of the model ``params`` on normalised images ``x``."""
        x = self._images(x)
        run = self._runner(params, len(x))
        out = [run(x[i : i + batch]) for i in range(0, len(x), batch)]
        return np.concatenate(out) if out else np.zeros((0, 10), np.float32)

    def accuracy_bp(self, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                    batch: int = EVAL_BATCH) -> int:
        """Accuracy in basis points, ``correct * 10000 // n`` (integer, 0..10000)."""
        y = np.asarray(y).reshape(-1)
        if len(y) == 0:
            raise ValueError("cannot measure accuracy on an empty test set")
        if len(y) != len(x):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        x = self._images(x)
        run = self._runner(params, len(x))
        correct = 0
        for i in range(0, len(x), batch):
            logits = run(x[i : i + batch])
            correct += int((logits.argmax(axis=1) == y[i : i + batch]).sum())
        return correct * 10000 // len(y)

    def scores(self, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[int, int]:
        """(accuracy in basis points, mean cross-entropy in milli-nats, capped at 1e9).

        Both integers, so they can go into signed validator transactions.
        """
        y = np.asarray(y).reshape(-1)
        if len(y) == 0 or len(y) != len(x):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        with np.errstate(invalid="ignore", over="ignore"):
            z = self.predict(params, x).astype(np.float64)
        acc = int((z.argmax(axis=1) == y).sum()) * 10000 // len(y)
        if not np.isfinite(z).all():
            return acc, 10**9
        z -= z.max(axis=1, keepdims=True)
        loss = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))
        return acc, int(min(loss * 1000, 1e9)) if np.isfinite(loss) else 10**9


def export_onnx(arch: str, params: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write a self-contained ONNX model (params as initializers), input "x", output "logits"."""
    import onnx

    model = build_graph(arch, params)
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path
