"""Tests of the poisoning attacks, the Dirichlet partition and the robust aggregators.

Real components: numpy attacks/aggregators, Fashion-MNIST from the Debian package,
torch training and ONNX Runtime evaluation for the end-to-end robustness check.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.ml import aggregators, arch, attacks, blobs, data, onnx_eval


@pytest.fixture(scope="module")
def fmnist() -> data.Dataset:
    return data.load_dataset("fashion-mnist")


def _params(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.standard_normal((4, 3)) * scale).astype(np.float32),
        "b": (rng.standard_normal(3) * scale).astype(np.float32),
    }


# --------------------------------------------------------------------------- attacks


def test_sign_flip_negates_delta():
    base, local = _params(0), _params(1)
    out = attacks.apply_attack("sign_flip", local, seed=0, base=base)
    for k in base:
        np.testing.assert_allclose(out[k] - base[k], -(local[k] - base[k]), atol=1e-6)
        assert out[k].dtype == np.float32
    twice = attacks.apply_attack("sign_flip", local, seed=0, base=base, scale=2.0)
    np.testing.assert_allclose(twice["w"] - base["w"], -2 * (local["w"] - base["w"]), atol=1e-5)
    with pytest.raises(ValueError, match="base"):
        attacks.apply_attack("sign_flip", local, seed=0)


def test_scale_multiplies_delta():
    base, local = _params(0), _params(1)
    out = attacks.apply_attack("scale", local, seed=0, base=base)
    np.testing.assert_allclose(out["w"] - base["w"], 10 * (local["w"] - base["w"]), atol=1e-5)
    out = attacks.apply_attack("scale", local, seed=0, base=base, scale=3.0)
    np.testing.assert_allclose(out["b"] - base["b"], 3 * (local["b"] - base["b"]), atol=1e-5)
    with pytest.raises(ValueError, match="base"):
        attacks.scale_update(local, seed=0)


def test_lazy_returns_copy_of_base():
    base, local = _params(0), _params(1)
    out = attacks.apply_attack("lazy", local, seed=3, base=base)
    assert all(np.array_equal(out[k], base[k]) for k in base)
    out["w"][0, 0] += 1.0
    assert not np.array_equal(out["w"], base["w"])  # a copy, base untouched
    assert np.array_equal(base["w"], _params(0)["w"])


def test_label_flip_is_a_data_attack():
    y = np.arange(10, dtype=np.int64)
    assert attacks.flip_labels(y).tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert attacks.DATA_ATTACKS["label_flip"](y.astype(np.uint8)).dtype == np.uint8
    assert np.array_equal(attacks.flip_labels(attacks.flip_labels(y)), y)
    with pytest.raises(ValueError, match="data attack"):
        attacks.apply_attack("label_flip", _params(0), seed=0)
    with pytest.raises(ValueError, match="validator"):
        attacks.apply_attack("invert_votes", _params(0), seed=0)
    with pytest.raises(ValueError, match="unknown attack"):
        attacks.apply_attack("nope", _params(0), seed=0)
    assert set(attacks.ATTACK_NAMES) == {"gaussian", "sign_flip", "scale", "lazy",
                                         "label_flip", "invert_votes"}


def test_gaussian_unchanged_and_seeded():
    p = _params(0)
    a = attacks.apply_attack("gaussian", p, seed=5)
    b = attacks.gaussian_noise(p, 1.0, seed=5, base=_params(9))  # base ignored
    c = attacks.apply_attack("gaussian", p, 6)
    assert blobs.encode(a) == blobs.encode(b) != blobs.encode(c)
    # same draws as the original implementation: sorted names, float64 noise
    rng = np.random.default_rng(5)
    expect = {k: (p[k].astype(np.float64) + rng.standard_normal(p[k].shape)).astype(np.float32)
              for k in sorted(p)}
    assert all(np.array_equal(a[k], expect[k]) for k in p)
    half = attacks.apply_attack("gaussian", p, seed=5, variance=0.25)
    np.testing.assert_allclose(half["w"] - p["w"], 0.5 * (a["w"] - p["w"]), atol=1e-5)


# ------------------------------------------------------------------------- dirichlet


def _labels_for_80pct(y: np.ndarray) -> int:
    counts = np.sort(np.bincount(y, minlength=10))[::-1]
    return int(np.searchsorted(np.cumsum(counts), 0.8 * counts.sum()) + 1)


def test_dirichlet_partition(fmnist):
    y = fmnist.train_y
    assert "dirichlet" in data.PARTITIONS
    parts = data.partition_train(y, 20, "dirichlet", 2000, seed=3, alpha=0.1)
    assert all(len(p) == 2000 and p.dtype == np.int64 for p in parts)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat) == 40000
    again = data.partition_train(y, 20, "dirichlet", 2000, seed=3, alpha=0.1)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    other = data.partition_train(y, 20, "dirichlet", 2000, seed=4, alpha=0.1)
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other))
    # the whole data set: classes run out and are redistributed, still exact and disjoint
    full = data.partition_train(y, 10, "dirichlet", 6000, seed=1, alpha=0.05)
    assert {len(p) for p in full} == {6000} and len(np.unique(np.concatenate(full))) == 60000
    # smaller alpha -> more skewed label distributions
    skew = {a: np.mean([_labels_for_80pct(y[p]) for p in
                        data.partition_train(y, 20, "dirichlet", 1000, seed=2, alpha=a)])
            for a in (0.1, 1.0, 100.0)}
    assert skew[0.1] < skew[1.0] < skew[100.0], skew
    assert skew[0.1] <= 3 and skew[100.0] >= 7, skew
    with pytest.raises(ValueError, match="alpha"):
        data.partition_train(y, 2, "dirichlet", 10, 0, alpha=0.0)


def test_device_data_reads_alpha_milli(fmnist):
    spec = {"dataset": "fashion-mnist", "partition": "dirichlet", "samples_per_device": 300,
            "test_per_device": 100, "seed": 5, "n_devices": 6, "alpha_milli": 100}
    dd = data.device_data(spec, 2)
    expect = data.partition_train(fmnist.train_y, 6, "dirichlet", 300, 5, alpha=0.1)[2]
    assert np.array_equal(dd.train_y, fmnist.train_y[expect].astype(np.int64))
    default = data.device_data({**spec, "alpha_milli": 500}, 2)
    no_key = {k: v for k, v in spec.items() if k != "alpha_milli"}
    assert np.array_equal(data.device_data(no_key, 2).train_y, default.train_y)
    assert not np.array_equal(default.train_y, dd.train_y)


# ----------------------------------------------------------------------- aggregators


def _honest(n: int, seed: int = 0) -> list[tuple[dict[str, np.ndarray], int]]:
    rng = np.random.default_rng(seed)
    center = _params(100)
    return [({k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
              for k, v in center.items()}, 50 + 10 * i) for i in range(n)]


def test_median_and_trimmed_mean_resist_outlier():
    honest = _honest(4)
    outlier = ({k: np.full_like(v, 1e6) for k, v in honest[0][0].items()}, 50)
    ups = honest[:2] + [outlier] + honest[2:]
    mean = {k: np.mean([p[k] for p, _ in honest], axis=0) for k in honest[0][0]}
    for name, kw in (("median", {}), ("trimmed_mean", {"trim_ratio": 0.2})):
        g, sel = aggregators.aggregate(name, ups, **kw)
        assert sel == [0, 1, 2, 3, 4]
        for k in mean:
            assert g[k].dtype == np.float32
            assert np.abs(g[k] - mean[k]).max() < 0.05, (name, k)
    naive, _ = aggregators.aggregate("fedavg", ups)
    assert np.abs(naive["w"]).min() > 1e4
    # trim_ratio 0.1 of 5 trims nothing (floor): equals the plain mean
    g = aggregators.trimmed_mean(ups, 0.1)
    plain = np.mean([p["w"].astype(np.float64) for p, _ in ups], axis=0).astype(np.float32)
    assert np.array_equal(g["w"], plain)
    # even n: median of the two middle values
    two = aggregators.coordinate_median(_honest(2))
    np.testing.assert_allclose(two["b"], (_honest(2)[0][0]["b"] + _honest(2)[1][0]["b"]) / 2, atol=1e-6)


def test_multi_krum_excludes_gaussian_updates():
    ups = _honest(8, seed=1)
    for i in (2, 5):
        ups[i] = (attacks.apply_attack("gaussian", ups[i][0], seed=i), ups[i][1])
    g, sel = aggregators.aggregate("multi_krum", ups, n_malicious=2)
    assert sel == [0, 1, 3, 4, 6, 7]
    ref = blobs.fedavg([ups[i] for i in sel])
    assert all(np.array_equal(g[k], ref[k]) for k in g)
    _, one = aggregators.multi_krum(ups, 2, m=1)  # Krum
    assert len(one) == 1 and one[0] not in (2, 5)
    again = aggregators.multi_krum(list(ups), 2)
    assert blobs.encode(again[0]) == blobs.encode(g) and again[1] == sel
    with pytest.raises(ValueError, match="n > 2f"):
        aggregators.multi_krum(ups[:6], 2)
    with pytest.raises(ValueError, match="m must"):
        aggregators.multi_krum(ups, 2, m=0)


def test_fedavg_equality_and_errors():
    ups = _honest(5)
    g, sel = aggregators.aggregate("fedavg", ups)
    assert blobs.encode(g) == blobs.encode(blobs.fedavg(ups)) and sel == list(range(5))
    for name in aggregators.AGGREGATORS:
        with pytest.raises(ValueError):
            aggregators.aggregate(name, [])
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregators.aggregate("mean-ish", ups)
    with pytest.raises(ValueError, match="sample count"):
        aggregators.coordinate_median([(ups[0][0], 0)])
    with pytest.raises(ValueError, match="shape"):
        aggregators.trimmed_mean([ups[0], ({"w": ups[0][0]["w"][:2], "b": ups[0][0]["b"]}, 1)])
    with pytest.raises(ValueError, match="trim_ratio"):
        aggregators.trimmed_mean(ups, 0.5)


def test_aggregators_module_is_torch_free():
    import subprocess
    import sys

    code = "import edge_agent.ml.aggregators, sys; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------- real ML robustness


def test_robust_aggregation_on_fashion_mnist(fmnist):
    """5 honest + 2 Gaussian-noise MLP workers (Multi-Krum with f=2 needs n > 2f + 2 = 6)."""
    from edge_agent.ml import train

    n_honest, n_bad = 5, 2
    spec = {"dataset": "fashion-mnist", "partition": "iid", "samples_per_device": 200,
            "test_per_device": 1000, "seed": 0, "n_devices": n_honest + n_bad}
    p0 = arch.init_params("mlp", 0)
    ups = []
    for d in range(n_honest + n_bad):
        dd = data.device_data(spec, d)
        p = train.train_local("mlp", p0, dd.train_x, dd.train_y, epochs=1, batch_size=10,
                              lr=0.1, seed=d)
        if d >= n_honest:
            p = attacks.apply_attack("gaussian", p, seed=1000 + d, base=p0)
        ups.append((p, len(dd.train_y)))
    test = data.device_data(spec, 0)
    ev = onnx_eval.Evaluator("mlp")
    acc = {}
    for name in ("fedavg", "multi_krum", "median"):
        g, sel = aggregators.aggregate(name, ups, n_malicious=n_bad)
        acc[name] = ev.accuracy_bp(g, test.test_x, test.test_y)
        if name == "multi_krum":
            assert sel == list(range(n_honest))
    print("accuracy_bp", acc)
    assert acc["fedavg"] < 2000, acc
    assert acc["multi_krum"] > 4000 and acc["median"] > 4000, acc


def test_aggregate_for_genesis_is_the_devices_rule():
    """G_j from blob bytes: FedAvg, a robust rule with its FedAvg fallback, undecodable updates
    skipped, None when nothing is usable (G_j = G_{j-1})."""
    from edge_agent.ml import blobs as bl

    ups = [(arch.init_params("mlp", s), 10 * (s + 1)) for s in range(3)]
    raw = [(bl.encode(p), n) for p, n in ups]
    notes: list[str] = []
    hp = {"aggregator": "fedavg"}
    g = aggregators.aggregate_for_genesis(hp, "mlp", raw, notes.append)
    assert bl.encode(g) == bl.encode(bl.fedavg(ups)) and notes == []
    # an undecodable update is skipped, with a note naming its blob
    bad = b"not a model"
    g = aggregators.aggregate_for_genesis(hp, "mlp", [raw[0], (bad, 5), raw[2]], notes.append)
    assert bl.encode(g) == bl.encode(bl.fedavg([ups[0], ups[2]]))
    assert len(notes) == 1 and bl.blob_hash(bad)[:12] in notes[0]
    assert aggregators.aggregate_for_genesis(hp, "mlp", [(bad, 5)]) is None
    assert aggregators.aggregate_for_genesis(hp, "mlp", []) is None
    # robust rules, and Multi-Krum falling back to FedAvg when n <= 2f + 2
    g = aggregators.aggregate_for_genesis({"aggregator": "median"}, "mlp", raw)
    assert bl.encode(g) == bl.encode(aggregators.coordinate_median(ups))
    notes.clear()
    g = aggregators.aggregate_for_genesis({"aggregator": "multi_krum", "krum_f": 1}, "mlp", raw, notes.append)
    assert bl.encode(g) == bl.encode(bl.fedavg(ups)) and "multi_krum not applicable" in notes[0]
