"""The host's training slots: processes that hold torch and run the training jobs the
trainer service (``edge_agent/compute.py``) hands them, one at a time each.

The service starts one process per device kind with one socket per slot
(``--fds``): it imports torch once, then forks a sibling for every further slot, so the
slots share the pages of that import. Each serves its socket: reads frames, writes the
replies back (the framing of ``compute.py``). Jobs:

- ``train``: ``train_local`` (FedAvg's ClientUpdate) for ``epochs`` epochs;
- ``pfedme``: pFedMe's client update (``train_pfedme``), returning w and the personal theta.

The results are those of calling the same functions in-process with the same inputs and
seed (the parameters go back in the blob format, bit for bit).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import time

import numpy as np
import torch

from edge_agent.compute import part_array, read_frame, write_frame
from edge_agent.ml import blobs as bl
from edge_agent.ml.arch import ARCHS, init_params
from edge_agent.ml.train import train_local, train_pfedme


def _run(job: dict, parts: dict[str, bytes], device: str, threads: int) -> tuple[dict, dict[str, bytes]]:
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


def serve(sock: socket.socket, device: str = "cpu", threads: int = 1) -> None:
    """Warm up, say hello, then run jobs until the service closes its end."""
    torch.set_num_threads(threads)
    # warm up (the first step of each architecture in a process costs about a second)
    x, y = np.zeros((10, 1, 28, 28), np.float32), np.zeros(10, np.int64)
    for a in ARCHS:
        train_local(a, init_params(a, 0), x, y, epochs=1, batch_size=10, lr=0.0, seed=0, threads=threads, device=device)
    write_frame(sock, {"ready": True, "pid": os.getpid(), "cuda": torch.cuda.is_available(), "torch": torch.__version__})
    with sock:
        while True:
            try:
                job, parts = read_frame(sock)
            except (EOFError, OSError):
                return
            t0 = time.perf_counter()
            try:
                reply, res = _run(job, parts, device, threads)
            except Exception as exc:  # reported to the agent, which reports a failed task
                reply, res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, {}
            del parts
            reply["compute_ms"] = int((time.perf_counter() - t0) * 1000)
            write_frame(sock, reply, res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fds", required=True, help="one socket per slot, inherited from the service")
    ap.add_argument("--service", default="", help="the service's socket (names the process in ps)")
    args = ap.parse_args()
    socks = [socket.socket(fileno=int(fd)) for fd in args.fds.split(",")]
    # the collector leaves what the imports created alone, so the forked slots keep sharing
    # those pages instead of each writing its own copy
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the forked slots are reaped by the kernel
    for i, s in enumerate(socks[1:], 1):
        if os.fork() == 0:
            for j, other in enumerate(socks):
                if j != i:
                    other.close()
            try:
                serve(s, args.device, args.threads)
            finally:
                os._exit(0)
    for other in socks[1:]:
        other.close()
    serve(socks[0], args.device, args.threads)


if __name__ == "__main__":
    main()
