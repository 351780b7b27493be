"""How long a PoS-BFL round takes on this machine, and how much of it is training.

Runs `bfl run` with the given options (default: the paper's CNN setting, 20 devices,
12/5/3, 3 malicious, Fashion-MNIST, 2 rounds) and prints, per round, the wall time the
orchestrator observed and the longest training task any worker reported.

    python benchmarks/bench_round.py                       # CNN, paper setting
    python benchmarks/bench_round.py --model mlp --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--broker", default=None, help="mqtt://HOST:PORT (default: embedded)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("extra", nargs="*", help="more `bfl run` options after --")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-round-"))
    cmd = [
        sys.executable, "-m", "orchestrator.cli", "run", "--devices", "20", "--roles", "12,5,3",
        "--malicious", "3", "--rounds", str(args.rounds), "--model", args.model,
        "--dataset", "fashion-mnist", "--out", str(out), "--quiet", *args.extra,
    ]  # fmt: skip
    if args.broker:
        cmd += ["--broker", args.broker]
    print("command:", " ".join(cmd[1:]))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    total = time.monotonic() - t0
    if proc.returncode != 0:
        return proc.returncode
    s = json.loads((out / "summary.json").read_text())
    print(f"{'round':>5} {'seconds':>8} {'train_max_s':>11} {'train_share':>11} {'accuracy':>8}")
    for r in s["rounds"]:
        share = r["train_seconds_max"] / r["seconds"] if r["seconds"] else 0
        print(f"{r['round']:>5} {r['seconds']:>8.1f} {r['train_seconds_max']:>11.1f} {share:>10.0%} {r['accuracy']:>7.2f}%")
    print(f"total wall time {total:.0f}s (includes start-up of 20 agents)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
