"""ONNX Runtime evaluation of test images: time and resident memory by images per call, and
the shared session (weights fed as inputs) against a session per model (weights baked in).

    python benchmarks/bench_eval_batch.py [--arch cnn] [--batches 500,100,50]
    python benchmarks/bench_eval_batch.py --sessions [--images 50,200,500]

Each case runs in a fresh process (the arena only grows) with the agents' allocator setting,
four repeats each; prints the RSS growth and the best time. With ``--sessions`` each arch is timed both ways for each number
of images, the baked session's creation included: this sets ``onnx_eval.BAKE_FROM``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r"""
import sys, time
import numpy as np
from edge_agent.cli import _return_freed_memory
_return_freed_memory()  # the agents' allocator setting (a 1 MiB mmap threshold)
from edge_agent.ml import arch, onnx_eval
from edge_agent.ml.onnx_eval import Evaluator
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) // 1024
a, batch, n, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
onnx_eval.BAKE_FROM[a] = None if mode == "shared" else 0
ev = Evaluator(a, threads=1)
x = np.random.default_rng(0).standard_normal((n, 1, 28, 28), dtype=np.float32)
_ = ev.session
ev.predict(arch.init_params(a, 9), x[:batch], batch=batch)  # warm: first-call allocations
r0 = rss()
ts = []
for i in range(4):
    p = arch.init_params(a, i)
    t = time.process_time()
    ev.predict(p, x, batch=batch)
    ts.append(time.process_time() - t)
print(f"{a:<5} {mode:<7} {n:>7} {batch:>6} {rss() - r0:>10} {min(ts) * 1000:>12.1f}", flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cnn", help="one arch, or a comma-separated list")
    ap.add_argument("--batches", default="500,100,50", help="images per inference call")
    ap.add_argument("--sessions", action="store_true", help="shared session against one per model")
    ap.add_argument("--images", default="50,200,500", help="with --sessions: test-set sizes")
    args = ap.parse_args()
    print(f"{'arch':<5} {'session':<7} {'images':>7} {'batch':>6} {'+RSS (MB)':>10} {'CPU ms':>12}")
    cases = []
    for a in args.arch.split(","):
        if args.sessions:
            cases += [(a, "25", n, m) for n in args.images.split(",") for m in ("shared", "baked")]
        else:
            cases += [(a, b, "500", "shared") for b in args.batches.split(",")]
    for a, b, n, m in cases:
        subprocess.run([sys.executable, "-c", CHILD, a, b, n, m], check=True)


if __name__ == "__main__":
    main()
