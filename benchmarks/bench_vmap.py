"""Several workers' local training batched into one job (torch.func.vmap) against the same
steps one worker after the other, in one process on one device.

Issue 9 asks whether a host whose trainer service holds K jobs of one architecture at once
should run them as one vmapped job: K models stacked along a new first dimension, each step
a forward and backward of all K on their own mini-batches (plain SGD, as ``train_local``).

    python benchmarks/bench_vmap.py                         # CNN, K = 1, 2, 4, 6 on the CPU
    python benchmarks/bench_vmap.py --arch mlp --device cuda

Prints the time per step of K sequential models and of one vmapped step of K, and their
ratio (below 1: batching pays). Both run the same number of SGD steps on the same data;
the largest difference between the parameters both reach is printed (float rounding only:
the same work).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from edge_agent.ml.arch import init_params
from edge_agent.ml.train import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ks", default="1,2,4,6")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model = build_model(args.arch).to(dev)
    lr = 0.01

    def loss_fn(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    step_grad = grad(loss_fn)
    batched_grad = vmap(step_grad)  # over the models' first dimension, data too
    rng = np.random.default_rng(0)
    print(f"# {args.arch} on {args.device}, {args.threads} thread(s), batch {args.batch}, {args.steps} steps")
    print(f"{'K':>3} {'sequential ms/step':>19} {'vmapped ms/step':>16} {'vmapped / sequential':>21} {'max |diff|':>11}")
    for k in map(int, args.ks.split(",")):
        starts = [init_params(args.arch, i) for i in range(k)]
        xs = torch.from_numpy(rng.standard_normal((args.steps, k, args.batch, 1, 28, 28), dtype=np.float32)).to(dev)
        ys = torch.from_numpy(rng.integers(0, 10, (args.steps, k, args.batch))).to(dev)

        def sequential():
            out = []
            for i in range(k):
                p = {n: torch.from_numpy(v).to(dev) for n, v in starts[i].items()}
                for s in range(args.steps):
                    g = step_grad(p, xs[s, i], ys[s, i])
                    p = {n: p[n] - lr * g[n] for n in p}
                out.append(p)
            return out

        def vmapped():
            p = {n: torch.from_numpy(np.stack([st[n] for st in starts])).to(dev) for n in starts[0]}
            for s in range(args.steps):
                g = batched_grad(p, xs[s], ys[s])
                p = {n: p[n] - lr * g[n] for n in p}
            return p

        sequential(), vmapped()  # warm up
        times = {}
        for name, fn in (("seq", sequential), ("vmap", vmapped), ("seq2", sequential), ("vmap2", vmapped)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name] = time.perf_counter() - t0
            if name == "seq":
                seq_res = res
            if name == "vmap":
                diff = max(float((seq_res[i][n] - res[n][i]).abs().max()) for i in range(k) for n in seq_res[i])
        t_seq = min(times["seq"], times["seq2"]) * 1000 / args.steps
        t_vmap = min(times["vmap"], times["vmap2"]) * 1000 / args.steps
        print(f"{k:>3} {t_seq:>19.1f} {t_vmap:>16.1f} {t_vmap / t_seq:>21.2f} {diff:>11.1e}")


if __name__ == "__main__":
    main()
