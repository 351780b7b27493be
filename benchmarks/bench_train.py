"""Micro-benchmark: one-thread SGD step time (batch 10) and ONNX evaluation time per architecture.

    python benchmarks/bench_train.py [--arch mlp|cnn|all] [--steps N] [--data-dir DIR]

Uses Fashion-MNIST (Debian package or --data-dir) when available, random images otherwise.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edge_agent.ml import arch as archs
from edge_agent.ml import data
from edge_agent.ml.onnx_eval import Evaluator


def _images(n_train: int, data_dir: str | None):
    try:
        ds = data.load_dataset("fashion-mnist", data_dir)
        return (data.normalize(ds.train_x[:n_train], "fashion-mnist"), ds.train_y[:n_train].astype(np.int64),
                data.normalize(ds.test_x[:500], "fashion-mnist"), ds.test_y[:500].astype(np.int64), "fashion-mnist")
    except data.DataMissingError:
        rng = np.random.default_rng(0)
        return (rng.standard_normal((n_train, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n_train),
                rng.standard_normal((500, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 500), "random")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="all", choices=("all", *archs.ARCHS))
    ap.add_argument("--steps", type=int, default=200, help="SGD steps (batch 10) to time per architecture")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()

    from edge_agent.ml.train import train_local  # torch is only needed here

    selected = archs.ARCHS if args.arch == "all" else (args.arch,)
    steps = max(1, args.steps)
    x, y, tx, ty, source = _images(steps * 10, args.data_dir)
    rows = []
    for a in selected:
        p = archs.init_params(a, 0)
        train_local(a, p, x[:20], y[:20], 1, 10, 0.01, seed=0)  # warm-up
        t0 = time.perf_counter()
        train_local(a, p, x, y, epochs=1, batch_size=10, lr=0.01, seed=0, threads=1)
        step_ms = (time.perf_counter() - t0) * 1000 / steps
        ev = Evaluator(a, threads=1)
        ev.accuracy_bp(p, tx, ty)  # builds the session
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            ev.accuracy_bp(p, tx, ty)
        eval_ms = (time.perf_counter() - t0) * 1000 / reps
        rows.append((a, archs.n_params(a), step_ms, eval_ms))

    print(f"data: {source}; steps timed: {steps}; 1 thread")
    print(f"{'arch':<5} {'params':>10} {'ms/SGD step (b=10)':>20} {'ONNX eval 500 img (ms)':>24}")
    for a, n, s, e in rows:
        print(f"{a:<5} {n:>10,} {s:>20.2f} {e:>24.1f}")


if __name__ == "__main__":
    main()
