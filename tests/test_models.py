"""Architectures as plug-ins (edge_agent/ml/models/): one file each, found by listing the
package; the validators' ONNX graphs are exports of the torch modules, committed, and run
without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest

from edge_agent.ml import arch, models, onnx_eval

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "edge_agent" / "ml" / "models"

# first in a child: any import of torch (or of a torch submodule) raises ImportError
NO_TORCH = "import sys; sys.modules['torch'] = None\n"


def _python(code: str, *, path: list[Path], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in path))
    return subprocess.run([sys.executable, "-c", code], cwd=path[0], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def _labels_for_75_percent(logits: np.ndarray) -> np.ndarray:
    """Labels that the model gets right for 3 images of 4 exactly: 7500 basis points."""
    y = logits.argmax(axis=1)
    y[3::4] = (y[3::4] + 1) % 10
    return y


def test_validators_evaluate_every_architecture_without_torch(tmp_path):
    """With torch unimportable, a validator evaluates a model of every registered
    architecture (shared session, and its own session from BAKE_FROM images on) and writes a
    self-contained ONNX file; the accuracy is the one torch gives."""
    from edge_agent.ml import train

    n = 320  # from BAKE_FROM of the CNN (100) and LeNet-5 (300) on: the baked path too
    assert all(b is None or b <= n for b in onnx_eval.BAKE_FROM.values())
    x = _images(n)
    np.save(tmp_path / "x.npy", x)
    ref = {}
    for a in arch.ARCHS:
        ref[a] = train.torch_predict(a, arch.init_params(a, 3), x)
        y = _labels_for_75_percent(ref[a])
        assert train.torch_accuracy_bp(a, arch.init_params(a, 3), x, y) == 7500
        np.save(tmp_path / f"y_{a}.npy", y)
    code = NO_TORCH + f"""
import json
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch is importable")
import numpy as np
from edge_agent.ml import arch, onnx_eval
d = {str(tmp_path)!r}
x = np.load(d + "/x.npy", allow_pickle=False)
out = {{}}
for a in arch.ARCHS:
    y = np.load(d + f"/y_{{a}}.npy", allow_pickle=False)
    p = arch.init_params(a, 3)
    ev = onnx_eval.Evaluator(a)
    out[a] = [ev.accuracy_bp(p, x, y), ev.accuracy_bp(p, x[:40], y[:40]), ev.scores(p, x, y)[0]]
    onnx_eval.export_onnx(a, p, d + f"/{{a}}.onnx")
assert not [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] == "torch"]
print(json.dumps(out))
"""
    proc = _python(code, path=[REPO])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(got) == sorted(arch.ARCHS) and "lenet5" in got
    assert got == {a: [7500, 7500, 7500] for a in arch.ARCHS}
    import onnxruntime as ort

    for a in arch.ARCHS:  # the self-contained files give torch's logits
        sess = ort.InferenceSession(str(tmp_path / f"{a}.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(["logits"], {"x": x[:50]})[0], ref[a][:50], atol=1e-4, rtol=0)


def test_committed_graphs_are_what_a_fresh_export_gives():
    """Each committed NAME.onnx is its module's export today: the same inputs (x, then the
    parameters of LAYOUT) and output, and the same logits for random weights and images.
    (A changed module without `python -m edge_agent.ml.models export NAME` fails here.)"""
    import onnx
    import onnxruntime as ort

    from edge_agent.ml.models._export import export_graph

    def io(m):
        dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
        return [(i.name, dims(i)) for i in m.graph.input], [(o.name, dims(o)) for o in m.graph.output]

    x = _images(30, seed=4)
    for a in arch.ARCHS:
        path = models.get(a).graph_path
        assert path.parent == MODELS_DIR and path.is_file(), f"{path}: run python -m edge_agent.ml.models export {a}"
        committed, fresh = onnx.load(str(path)), export_graph(a)
        assert io(committed) == io(fresh), a
        assert io(committed)[0] == [("x", ["batch", 1, 28, 28])] + [(k, list(s)) for k, s in arch.param_shapes(a)]
        assert io(committed)[1] == [("logits", ["batch", 10])]
        sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                    for m in (committed, fresh)]  # fmt: skip
        for seed in (0, 1):
            feeds = {"x": x, **arch.init_params(a, seed)}
            got, want = (s.run(["logits"], feeds)[0] for s in sessions)
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg=a)


TINY = '''"""A test architecture: one linear layer, 784-10."""

LAYOUT = (("fc.weight", (10, 784)), ("fc.bias", (10,)))


def module():
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            return self.fc(torch.flatten(x, 1))

    return Tiny()
'''


def test_an_architecture_file_dropped_into_the_package_is_found_everywhere(tmp_path):
    """In a copy of the package (the repository is left alone), a new file
    edge_agent/ml/models/tiny.py is an architecture: listed, refused with the command to
    export it until its graph exists, exported by that command, evaluated without torch with
    torch's accuracy, and a --model choice of bfl run."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "edge_agent", src / "edge_agent", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "edge_agent" / "ml" / "models" / "tiny.py").write_text(TINY)
    path = [src, REPO]  # edge_agent from the copy; orchestrator, broker from the repository (run from src:
    # python -m puts the working directory first)

    proc = _python(NO_TORCH + """
from edge_agent.ml import arch, onnx_eval
print(",".join(arch.ARCHS), arch.n_params("tiny"))
try:
    onnx_eval.Evaluator("tiny").predict(arch.init_params("tiny", 0), __import__("numpy").zeros((2, 28, 28)))
except ValueError as exc:
    print(exc)
""", path=path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed, missing = proc.stdout.strip().splitlines()
    assert listed == f"{','.join(sorted([*arch.ARCHS, 'tiny']))} 7850"
    assert "no ONNX graph" in missing and missing.endswith("python -m edge_agent.ml.models export tiny")

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path)))
    proc = subprocess.run([sys.executable, "-m", "edge_agent.ml.models", "export", "tiny"], cwd=src, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (src / "edge_agent" / "ml" / "models" / "tiny.onnx").is_file()

    import torch  # here, in the test: the expected accuracy

    tiny: dict = {}
    exec(TINY, tiny)
    x = _images(64, seed=2)
    p = {"fc.weight": np.random.default_rng(1).uniform(-0.1, 0.1, (10, 784)).astype(np.float32),
         "fc.bias": np.zeros(10, np.float32)}  # fmt: skip
    model = tiny["module"]()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in p.items()})
    with torch.no_grad():
        y = _labels_for_75_percent(model(torch.from_numpy(x)).numpy())
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    for k, v in p.items():
        np.save(tmp_path / f"{k}.npy", v)
    proc = _python(NO_TORCH + f"""
import numpy as np
from edge_agent.ml import onnx_eval
d = {str(tmp_path)!r}
load = lambda n: np.load(f"{{d}}/{{n}}.npy", allow_pickle=False)
print(onnx_eval.Evaluator("tiny").accuracy_bp({{k: load(k) for k in ("fc.weight", "fc.bias")}}, load("x"), load("y")))
""", path=path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "7500"

    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "--help"], cwd=src,
                          env={**env, "COLUMNS": "300"}, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "tiny" in proc.stdout, proc.stdout
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "--model", "resnet", "--dataset",
                           "fashion-mnist", "--out", str(tmp_path / "out")], cwd=src, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--model 'resnet'" in lines[0] and "tiny" in lines[0], lines
    assert not list(MODELS_DIR.glob("tiny*"))  # the repository's package is untouched


def test_a_layout_that_is_not_the_module_or_the_graph_is_refused(monkeypatch):
    """LAYOUT is written out beside the module: the exporter refuses a module whose
    state_dict differs from it, and a validator a graph whose inputs differ from it."""
    from edge_agent.ml.models import Architecture, _export

    wrong = Architecture("wrong", models.get("lenet5").layout, None, "", "edge_agent.ml.models.mlp")
    monkeypatch.setattr(_export, "get", lambda name: wrong)
    with pytest.raises(ValueError, match="is not LAYOUT"):
        _export.export_graph("wrong")
    monkeypatch.setattr(models, "get", lambda name: wrong)
    with pytest.raises(ValueError, match=r"mlp\.onnx does not take x and the parameters of wrong's LAYOUT"):
        onnx_eval._graph_bytes("wrong")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown architecture 'resnet'; expected one of cnn, lenet5, mlp$"):
        arch.param_shapes("resnet")
