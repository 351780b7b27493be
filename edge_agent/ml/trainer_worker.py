"""One slot of the host's compute budget: a process that imports torch once and runs the
training jobs the trainer service (``edge_agent/compute.py``) hands it, one at a time.

Reads frames from stdin, writes frames to stdout (the framing of ``compute.py``). Jobs:

- ``train``: ``train_local`` (FedAvg's ClientUpdate) for ``epochs`` epochs;
- ``pfedme``: pFedMe's client update (``train_pfedme``), returning w and the personal theta.

The results are those of calling the same functions in-process with the same inputs and
seed (the parameters go back in the blob format, bit for bit).
"""

from __future__ import annotations

import argparse
import sys
import time

from edge_agent.compute import part_array, read_frame, write_frame
from edge_agent.ml import blobs as bl


def _run(job: dict, parts: dict[str, bytes], device: str, threads: int) -> tuple[dict, dict[str, bytes]]:
    from edge_agent.ml.train import train_local, train_pfedme

    arch = job["arch"]
    base = bl.decode(parts["params"], arch, finite=False)
    x = part_array(job["x"], parts["x"])
    y = part_array(job["y"], parts["y"])
    common = dict(batch_size=int(job["batch_size"]), seed=int(job["seed"]), threads=threads, device=device)
    if job["op"] == "train":
        params = train_local(arch, base, x, y, epochs=int(job["epochs"]), lr=float(job["lr"]), **common)
        return {"ok": True}, {"params": bl.encode(params)}
    if job["op"] == "pfedme":
        p = job["pfedme"]
        w, theta = train_pfedme(
            arch, base, x, y, local_iters=int(p["local_iters"]), k=int(p["k"]), personal_lr=float(p["personal_lr"]),
            lr=float(p["lr"]), lam=float(p["lam"]), **common,
        )  # fmt: skip
        return {"ok": True}, {"params": bl.encode(w), "personal": bl.encode(theta)}
    return {"ok": False, "error": f"unknown op {job.get('op')!r}"}, {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    import numpy as np

    from edge_agent.ml.arch import ARCHS, init_params
    from edge_agent.ml.train import train_local

    torch.set_num_threads(args.threads)
    # warm up (the first step of each architecture in a process costs about a second)
    x, y = np.zeros((10, 1, 28, 28), np.float32), np.zeros(10, np.int64)
    for a in ARCHS:
        train_local(a, init_params(a, 0), x, y, epochs=1, batch_size=10, lr=0.0, seed=0, threads=args.threads, device=args.device)
    cuda = torch.cuda.is_available()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    write_frame(out, {"ready": True, "cuda": cuda, "torch": torch.__version__})
    while True:
        try:
            job, parts = read_frame(inp)
        except EOFError:
            return
        t0 = time.perf_counter()
        try:
            reply, res = _run(job, parts, args.device, args.threads)
        except Exception as exc:  # reported to the agent, which reports a failed task
            reply, res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, {}
        reply["compute_ms"] = int((time.perf_counter() - t0) * 1000)
        write_frame(out, reply, res)


if __name__ == "__main__":
    main()
