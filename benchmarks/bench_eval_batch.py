"""ONNX Runtime evaluation of 500 test images: time and resident memory by images per call.

    python benchmarks/bench_eval_batch.py [--arch cnn] [--batches 500,100,50]

Each batch size runs in a fresh process (the arena only grows), four repeats each; prints the
RSS growth of the session and the time per 500 images.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r"""
import sys, time
import numpy as np
from edge_agent.ml import arch
from edge_agent.ml.onnx_eval import Evaluator
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) // 1024
a, batch = sys.argv[1], int(sys.argv[2])
ev = Evaluator(a, threads=1)
p = arch.init_params(a, 0)
x = np.random.default_rng(0).standard_normal((500, 1, 28, 28), dtype=np.float32)
_ = ev.session
r0 = rss()
ts = []
for _ in range(4):
    t = time.perf_counter()
    ev.predict(p, x, batch=batch)
    ts.append(time.perf_counter() - t)
print(f"{a:<5} {batch:>6} {rss() - r0:>12} {min(ts) * 1000:>14.0f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--batches", default="500,100,50")
    args = ap.parse_args()
    print(f"{'arch':<5} {'batch':>6} {'+RSS (MB)':>12} {'ms / 500 img':>14}")
    for b in args.batches.split(","):
        subprocess.run([sys.executable, "-c", CHILD, args.arch, b], check=True)


if __name__ == "__main__":
    main()
