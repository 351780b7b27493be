"""Tests of edge_agent.ml: data, partitions, blobs, FedAvg, ONNX evaluation, training, attacks.

Real components throughout (Fashion-MNIST from the Debian package, torch, onnxruntime).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_agent.ml import arch, attacks, blobs, data, onnx_eval

REPO = Path(__file__).resolve().parents[1]
FMNIST_DIR = data.DEBIAN_FASHION_MNIST_DIR

def needs_fmnist(fn):
    """Fashion-MNIST is a hard dependency of the suite (scripts/setup.sh installs it)."""
    return fn


@pytest.fixture(scope="module")
def fmnist() -> data.Dataset:
    assert (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(), "sudo apt-get install dataset-fashion-mnist"
    return data.load_dataset("fashion-mnist")


# ------------------------------------------------------------------------------ data


def test_load_fashion_mnist_from_debian_path(fmnist):
    assert fmnist.train_x.shape == (60000, 28, 28) and fmnist.train_x.dtype == np.uint8
    assert fmnist.train_y.shape == (60000,) and fmnist.train_y.dtype == np.uint8
    assert fmnist.test_x.shape == (10000, 28, 28)
    assert fmnist.test_y.shape == (10000,)
    assert np.bincount(fmnist.train_y).tolist() == [6000] * 10
    # cached in-process and explicit data_dir search finds the same files
    assert data.load_dataset("fashion-mnist", FMNIST_DIR) is fmnist
    x = data.normalize(fmnist.test_x[:100], "fashion-mnist")
    assert x.shape == (100, 1, 28, 28) and x.dtype == np.float32


@needs_fmnist
def test_torchvision_layout_and_uncompressed_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for base in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / base).write_bytes(gzip.decompress((FMNIST_DIR / (base + ".gz")).read_bytes()))
    ds = data.load_dataset("fashion-mnist", tmp_path)
    assert str(tmp_path) in str(data.resolve_files("fashion-mnist", tmp_path)["train_x"])
    ref = data.load_dataset("fashion-mnist")
    assert np.array_equal(ds.test_x, ref.test_x) and np.array_equal(ds.train_y, ref.train_y)


def test_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(data.DataMissingError) as e:
        data.load_dataset("mnist", tmp_path / "nowhere")
    msg = str(e.value)
    assert "bfl data fetch mnist" in msg and "\n" not in msg
    with pytest.raises(data.DataMissingError) as e:
        data.load_dataset("mnist", None)
    assert "--data-dir" in str(e.value)
    with pytest.raises(ValueError):
        data.load_dataset("cifar", tmp_path)


def test_missing_fashion_message_mentions_apt():
    msg = data._fix_hint("fashion-mnist")
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg


@pytest.mark.parametrize("kind", ["garbage", "gzip-garbage", "bad-size"])
def test_corrupt_file_gives_data_missing_error(tmp_path, kind):
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if kind == "garbage":
        payload = os.urandom(1000)
    elif kind == "gzip-garbage":
        payload = b"\x1f\x8b\x08\x00" + os.urandom(200)
    else:  # valid header, truncated payload
        payload = (0x803).to_bytes(4, "big") + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        payload += b"\x00" * 100
    for n in names:
        (tmp_path / n).write_bytes(payload)
    with pytest.raises(data.DataMissingError) as e:
        data.load_dataset("mnist", tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------ partitions


def test_shards_partition(fmnist):
    parts = data.partition_train(fmnist.train_y, 20, "shards", 3000, seed=7)
    assert len(parts) == 20 and all(len(p) == 3000 for p in parts)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat) == 60000
    n_labels = [len(np.unique(fmnist.train_y[p])) for p in parts]
    assert max(n_labels) <= 2 and sum(n <= 2 for n in n_labels) >= 18
    # a subset (fewer samples than the data set) is still disjoint and non-IID
    small = data.partition_train(fmnist.train_y, 10, "shards", 600, seed=7)
    flat = np.concatenate(small)
    assert len(np.unique(flat)) == 6000
    assert np.mean([len(np.unique(fmnist.train_y[p])) for p in small]) <= 3
    # odd per-device counts keep equal sizes
    odd = data.partition_train(fmnist.train_y, 7, "shards", 60000 // 7, seed=1)
    assert {len(p) for p in odd} == {60000 // 7}
    assert len(np.unique(np.concatenate(odd))) == 7 * (60000 // 7)


def test_iid_partition_and_determinism(fmnist):
    y = fmnist.train_y
    parts = data.partition_train(y, 10, "iid", 1000, seed=3)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == 10000 and all(len(p) == 1000 for p in parts)
    assert all(len(np.unique(y[p])) == 10 for p in parts)
    for scheme in data.PARTITIONS:
        a = data.partition_train(y, 10, scheme, 1000, seed=3)
        b = data.partition_train(y, 10, scheme, 1000, seed=3)
        c = data.partition_train(y, 10, scheme, 1000, seed=4)
        assert all(np.array_equal(p, q) for p, q in zip(a, b))
        assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_partition_errors():
    y = np.zeros(100, np.uint8)
    with pytest.raises(ValueError, match="exceeds"):
        data.partition_train(y, 11, "iid", 10, 0)
    with pytest.raises(ValueError, match="unknown partition"):
        data.partition_train(y, 2, "dirichlet-x", 10, 0)
    with pytest.raises(ValueError):
        data.test_split(1000, 20, 51, 0)


def test_test_split_disjoint():
    splits = data.test_split(10000, 20, 500, seed=5)
    flat = np.concatenate(splits)
    assert len(flat) == 10000 and len(np.unique(flat)) == 10000
    again = data.test_split(10000, 20, 500, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(splits, again))


def test_device_data_deterministic(fmnist):
    spec = {"dataset": "fashion-mnist", "partition": "shards", "samples_per_device": 300,
            "test_per_device": 200, "seed": 11, "n_devices": 8}
    a, b = data.device_data(spec, 2), data.device_data(dict(spec), 2)
    other = data.device_data(spec, 3)
    assert a.train_x.shape == (300, 1, 28, 28) and a.train_x.dtype == np.float32
    assert a.train_y.dtype == np.int64 and a.test_y.shape == (200,)
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)
    assert not np.array_equal(a.test_x, other.test_x)
    with pytest.raises(ValueError):
        data.device_data(spec, 8)


# ---------------------------------------------------------------------- arch + blobs


def test_param_shapes_and_init():
    assert arch.n_params("cnn") == 1_663_370
    assert arch.n_params("lenet5") == 6 * 25 + 6 + 16 * 6 * 25 + 16 + 400 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10
    assert arch.n_params("mlp") == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    for a in arch.ARCHS:
        p, q = arch.init_params(a, 1), arch.init_params(a, 1)
        arch.check_params(a, p)
        assert list(p) == [n for n, _ in arch.param_shapes(a)]
        assert all(np.array_equal(p[k], q[k]) for k in p)
        assert not np.array_equal(p["fc1.weight"], arch.init_params(a, 2)["fc1.weight"])
    w = arch.init_params("mlp", 0)["fc1.weight"]
    assert np.abs(w).max() <= 1 / np.sqrt(784)
    bad = arch.init_params("mlp", 0)
    bad["fc1.bias"] = bad["fc1.bias"].astype(np.float64)
    with pytest.raises(ValueError, match="dtype"):
        arch.check_params("mlp", bad)
    bad = arch.init_params("mlp", 0)
    bad["fc2.bias"][3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        arch.check_params("mlp", bad)


def test_encode_decode_round_trip():
    import safetensors.numpy

    for a in arch.ARCHS:
        p = arch.init_params(a, 42)
        raw = blobs.encode(p)
        assert blobs.encode(dict(reversed(list(p.items())))) == raw
        assert blobs.blob_hash(raw) == blobs.blob_hash(blobs.encode(arch.init_params(a, 42)))
        back = blobs.decode(raw, a)
        assert all(back[k].tobytes() == p[k].tobytes() for k in p)
        back["fc1.bias"][0] += 1  # decoded arrays are writable copies
        ref = safetensors.numpy.load(raw)  # the format is plain safetensors
        assert all(np.array_equal(ref[k], p[k]) for k in p)
    h = blobs.blob_hash(b"abc")
    assert h == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_decode_rejects_bad_blobs():
    raw = blobs.encode(arch.init_params("mlp", 0))
    with pytest.raises(ValueError, match="not a cnn model"):
        blobs.decode(raw, "cnn")
    for junk in (b"", b"garbage" * 10, raw[:100], os.urandom(4096)):
        with pytest.raises(ValueError):
            blobs.decode(junk, "mlp")
    p = arch.init_params("mlp", 0)
    p["fc1.weight"] = p["fc1.weight"][:, :10].copy()
    with pytest.raises(ValueError, match="shape"):
        blobs.decode(blobs.encode(p), "mlp")


def test_blob_store(tmp_path):
    store = blobs.BlobStore(tmp_path / "blobs")
    p = arch.init_params("mlp", 3)
    raw = blobs.encode(p)
    h = store.put(raw)
    assert h == blobs.blob_hash(raw) and store.has(h)
    assert store.path(h) == tmp_path / "blobs" / h[:2] / f"{h}.safetensors"
    assert store.put(raw) == h and store.get(h) == raw
    assert store.put_params(p) == h
    q = store.get_params(h, "mlp")
    assert all(np.array_equal(p[k], q[k]) for k in p)
    missing = "0" * 64
    assert store.get(missing) is None and not store.has(missing)
    assert store.get_params(missing, "mlp") is None
    with pytest.raises(ValueError):
        store.get("../etc/passwd")
    # concurrent puts of the same and different blobs
    datas = [b"x" * i for i in range(1, 9)] * 3
    threads = [threading.Thread(target=store.put, args=(d,)) for d in datas]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(store.get(blobs.blob_hash(d)) == d for d in datas)
    assert not list((tmp_path / "blobs").rglob(".tmp-*"))
    # a corrupted file on disk is treated as absent
    store.path(h).write_bytes(b"tampered")
    assert store.get(h) is None


def test_fedavg_weighted_and_deterministic():
    a = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.5], np.float32)}
    b = {"w": np.array([3.0, 6.0], np.float32), "b": np.array([-0.5], np.float32)}
    avg = blobs.fedavg([(a, 1), (b, 3)])
    assert avg["w"].dtype == np.float32
    assert np.array_equal(avg["w"], np.array([2.5, 5.0], np.float32))
    assert np.array_equal(avg["b"], np.array([-0.25], np.float32))
    models = [(arch.init_params("mlp", s), 100 + 37 * s) for s in range(5)]
    r1, r2 = blobs.fedavg(models), blobs.fedavg(list(models))
    assert blobs.encode(r1) == blobs.encode(r2)
    manual = sum(m["fc2.weight"].astype(np.float64) * n for m, n in models) / sum(n for _, n in models)
    assert np.array_equal(r1["fc2.weight"], manual.astype(np.float32))
    with pytest.raises(ValueError):
        blobs.fedavg([])
    with pytest.raises(ValueError):
        blobs.fedavg([(a, 0)])
    with pytest.raises(ValueError):
        blobs.fedavg([(a, 1), ({"w": a["w"]}, 1)])


# --------------------------------------------------------------- ONNX, torch, attacks


@pytest.mark.parametrize("a", arch.ARCHS)
def test_onnx_matches_torch(a, tmp_path):
    from edge_agent.ml import train
    import onnxruntime as ort
    import torch

    p = arch.init_params(a, 5)
    model = train.build_model(a)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == arch.param_shapes(a)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    ev = onnx_eval.Evaluator(a)
    ref = train.torch_predict(a, p, x)
    got = ev.predict(p, x, batch=25)
    assert got.shape == (64, 10)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert ev.accuracy_bp(p, x, y) == train.torch_accuracy_bp(a, p, x, y)
    # the same session evaluates a different model fed as inputs
    p2 = arch.init_params(a, 6)
    np.testing.assert_allclose(ev.predict(p2, x), train.torch_predict(a, p2, x), atol=1e-4, rtol=0)
    # self-contained export
    path = onnx_eval.export_onnx(a, p, tmp_path / f"{a}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["logits"], {"x": x})[0], ref, atol=1e-4, rtol=0)
    assert torch.get_num_threads() >= 1


def test_a_model_evaluated_on_many_images_gets_its_own_session_with_the_same_result(monkeypatch):
    """From BAKE_FROM images on, the CNN runs in a session of its own with its weights as
    constant initializers (ONNX Runtime pre-packs them): the logits are torch's, model after
    model, a diverged model is still scored, and the shared session is never created."""
    from edge_agent.ml import train

    n = onnx_eval.BAKE_FROM["cnn"]
    assert n is not None and onnx_eval.BAKE_FROM["mlp"] is None
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n + 7, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, n + 7)
    p = arch.init_params("cnn", 7)
    ev = onnx_eval.Evaluator("cnn")
    baked = ev.predict(p, x)
    assert ev._session is None  # the shared session was not needed
    np.testing.assert_allclose(baked, train.torch_predict("cnn", p, x), atol=1e-4, rtol=0)
    assert ev.accuracy_bp(p, x, y) == train.torch_accuracy_bp("cnn", p, x, y)
    # the shared session gives the same scores
    shared = onnx_eval.Evaluator("cnn")
    monkeypatch.setitem(onnx_eval.BAKE_FROM, "cnn", None)
    np.testing.assert_allclose(shared.predict(p, x), baked, atol=1e-4, rtol=0)
    monkeypatch.setitem(onnx_eval.BAKE_FROM, "cnn", n)
    p2 = arch.init_params("cnn", 8)  # the next model's session has its own weights
    np.testing.assert_allclose(ev.predict(p2, x), train.torch_predict("cnn", p2, x), atol=1e-4, rtol=0)
    p["fc1.weight"][3, 3] = np.nan  # a diverged update is scored, not refused
    acc, loss = ev.scores(p, x, y)
    assert 0 <= acc <= 10000 and loss == 10**9


@pytest.fixture(scope="module")
def trained_mlp(fmnist):
    from edge_agent.ml import train
    spec = {"dataset": "fashion-mnist", "partition": "iid", "samples_per_device": 600,
            "test_per_device": 1000, "seed": 0, "n_devices": 10}
    dd = data.device_data(spec, 0)
    p0 = arch.init_params("mlp", 0)
    p = train.train_local("mlp", p0, dd.train_x, dd.train_y, epochs=2, batch_size=10, lr=0.01, seed=0)
    return dd, p0, p


def test_training_learns_and_is_deterministic(trained_mlp):
    from edge_agent.ml import train
    dd, p0, p = trained_mlp
    arch.check_params("mlp", p)
    assert all(v.flags.c_contiguous for v in p.values())
    ev = onnx_eval.Evaluator("mlp")
    before, after = ev.accuracy_bp(p0, dd.test_x, dd.test_y), ev.accuracy_bp(p, dd.test_x, dd.test_y)
    assert before < 2500 and after > 5000, (before, after)
    assert after == train.torch_accuracy_bp("mlp", p, dd.test_x, dd.test_y)
    again = train.train_local("mlp", p0, dd.train_x, dd.train_y, 2, 10, 0.01, seed=0)
    assert all(again[k].tobytes() == p[k].tobytes() for k in p)
    other = train.train_local("mlp", p0, dd.train_x, dd.train_y, 1, 10, 0.01, seed=1)
    assert not np.array_equal(other["fc1.weight"], p["fc1.weight"])
    assert np.array_equal(p0["fc1.weight"], arch.init_params("mlp", 0)["fc1.weight"])  # input untouched


def test_cnn_training_step_runs(fmnist):
    from edge_agent.ml import train
    x = data.normalize(fmnist.train_x[:20], "fashion-mnist")
    y = fmnist.train_y[:20].astype(np.int64)
    p0 = arch.init_params("cnn", 0)
    p = train.train_local("cnn", p0, x, y, epochs=1, batch_size=10, lr=0.01, seed=0)
    arch.check_params("cnn", p)
    assert not np.array_equal(p["conv1.weight"], p0["conv1.weight"])


def test_gaussian_attack_destroys_model(trained_mlp):
    dd, _, p = trained_mlp
    noisy = attacks.apply_attack("gaussian", p, seed=9)
    assert set(noisy) == set(p)
    arch.check_params("mlp", noisy)
    noise = noisy["fc1.weight"].astype(np.float64) - p["fc1.weight"]
    assert abs(noise.var() - 1.0) < 0.02 and abs(noise.mean()) < 0.01
    assert blobs.encode(attacks.gaussian_noise(p, seed=9)) == blobs.encode(noisy)
    acc = onnx_eval.Evaluator("mlp").accuracy_bp(noisy, dd.test_x, dd.test_y)
    assert acc < 2500, acc
    small = attacks.apply_attack("gaussian", p, seed=9, variance=0.0)
    assert all(np.array_equal(small[k], p[k]) for k in p)
    with pytest.raises(ValueError):
        attacks.apply_attack("label-flip-unknown", p, seed=0)


def test_validator_modules_do_not_import_torch():
    code = ("import edge_agent.ml.onnx_eval, edge_agent.ml.data, edge_agent.ml.blobs, edge_agent.ml.models, "
            "edge_agent.ml.arch, edge_agent.ml.attacks, sys; assert 'torch' not in sys.modules")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_co_located_agents_parse_the_dataset_once_and_share_its_file(tmp_path, monkeypatch, fmnist):
    """With an array cache (compute.SharedCache) the first caller parses each file under a
    lock while the others wait, then all memory-map the .npy it wrote: six agents joining at
    once parse the four files four times, not 24 (each parse is about 100 MB of heap)."""
    parses = []
    real = data._load_idx
    monkeypatch.setattr(data, "_load_idx", lambda *a: parses.append(a[0]) or real(*a))
    data.set_array_cache(tmp_path / "datasets")
    data.release_datasets()
    spec = {"dataset": "fashion-mnist", "partition": "shards", "samples_per_device": 300,
            "test_per_device": 50, "seed": 0, "n_devices": 6}  # fmt: skip
    got, errors = {}, []

    def agent(i):
        try:
            got[i] = data.device_data(spec, i)
        except Exception as exc:  # reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=agent, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        data.set_array_cache(None)
        data.release_datasets()
    assert not errors, errors
    assert sorted(Path(p).name for p in parses) == sorted({Path(p).name for p in parses}) and len(parses) == 4
    ds = data.load_dataset("fashion-mnist")
    ref = data.partition_train(ds.train_y, 6, "shards", 300, 0)[2]
    assert np.array_equal(got[2].train_y, ds.train_y[ref].astype(np.int64))  # the same shard as without a cache
    assert len(list((tmp_path / "datasets").glob("*.npy"))) == 4
