"""A PoS-BFL round against its compute floor, side by side in one invocation.

1. The floor: the setting's training work alone -- W jobs of ``train_local`` (E epochs of S
   samples, batch B) spread over as many single-thread processes as the host's budget has
   slots (one per core), no protocol, no broker.
2. A real ``bfl run`` of the same setting (agents, trainer service, broker), ``--rounds R``.
3. The floor again: the ratio is taken against the mean of both floors.

It prints each round's time and its ratio to the floor, the round's critical path by phase
(from the devices' reports: when each entered each step), the CPU each kind of task took
in all devices, and the peak PSS of the whole testbed (operator, broker, agents, trainer
service and its workers), sampled from /proc every 2 s (`--pss-every`; CPU times every 0.5 s).

    python benchmarks/bench_round.py                           # the paper: CNN, 20 devices, 12/5/3
    python benchmarks/bench_round.py --model mlp --rounds 3
    python benchmarks/bench_round.py --devices 100 --roles 60,25,15 --model mlp --samples 600 --skip-floor

A GPU host runs it unchanged (``--train-device auto`` trains on CUDA when torch sees one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FLOOR_WORKER = r"""
import sys, time, numpy as np, torch
from edge_agent.ml.arch import init_params
from edge_agent.ml.train import train_local
arch, jobs, samples, epochs, batch, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.set_num_threads(1)
rng = np.random.default_rng(0)
x = rng.standard_normal((samples, 1, 28, 28), dtype=np.float32)
y = rng.integers(0, 10, samples)
p = init_params(arch, 0)
train_local(arch, p, x[:10], y[:10], epochs=1, batch_size=batch, lr=0.01, seed=0, device=device)  # warm-up
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()  # start together
t0 = time.perf_counter()
for j in range(jobs):
    train_local(arch, p, x, y, epochs=epochs, batch_size=batch, lr=0.01, seed=j, device=device)
print(f"{time.perf_counter() - t0:.3f}", flush=True)
"""


def floor(arch: str, workers: int, slots: int, samples: int, epochs: int, batch: int, device: str) -> float:
    """Wall time of the setting's training alone: ``workers`` jobs over ``slots`` processes."""
    shares = [workers // slots + (1 if i < workers % slots else 0) for i in range(slots)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FLOOR_WORKER, arch, str(n), str(samples), str(epochs), str(batch), device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        for n in shares
        if n
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        p.stdout.readline()
        p.wait()
    return time.perf_counter() - t0


# -- memory: PSS of a process tree --


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(pid))
    return kids


TICK = os.sysconf("SC_CLK_TCK")


def tree_pss_kb(root: int, cpu: dict | None = None, pss: bool = True, kids: dict | None = None,
                names: dict | None = None) -> tuple[int, int, dict[str, int]]:  # fmt: skip
    """(total PSS kB, processes, kB by kind) of ``root`` and all its descendants; fills
    ``cpu`` with pid -> (kind, CPU seconds so far). ``pss=False`` reads only the CPU times
    (reading smaps_rollup is what costs: every 0.5 s it took 10 CPU s of a 112 s round)."""
    kids = _children() if kids is None else kids
    names = {} if names is None else names  # pid -> command line, kept between samples
    todo, total, n, kinds = [root], 0, 0, {}
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            kb = 0
            if pss:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    kb = next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            cmd = names.get(pid)
            if cmd is None:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = names[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu_s = (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, StopIteration, IndexError, ValueError):
            continue
        kind = (
            "agent fork server" if "multiprocessing.forkserver" in cmd
            else "trainer worker" if "trainer_worker" in cmd
            else "trainer service" if "edge_agent.cli trainer" in cmd
            else "agent" if "edge_agent.cli run" in cmd
            else "broker" if "mosquitto" in cmd
            else "operator" if "orchestrator.cli" in cmd
            else "other"
        )  # fmt: skip
        total += kb
        n += 1
        kinds[kind] = kinds.get(kind, 0) + kb
        if cpu is not None:
            cpu[pid] = (kind, cpu_s)
    return total, n, kinds


def host_idle_s() -> float:
    """Idle (and I/O wait) CPU seconds of the host since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")


class PeakPss(threading.Thread):
    """Samples the testbed's CPU times every ``every`` s and its PSS every ``pss_every`` s."""

    def __init__(self, pid: int, every: float = 0.5, pss_every: float = 2.0):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.pss_each = max(1, round(pss_every / every))
        self.peak, self.peak_kinds, self.peak_n = 0, {}, 0
        self.done = threading.Event()
        self.cpu_samples: list[tuple[float, dict]] = []  # (time.time(), pid -> (kind, CPU s))
        self.idle_samples: list[tuple[float, float]] = []  # (time.time(), the host's idle CPU s)
        self.own_samples: list[tuple[float, float]] = []  # (time.time(), this thread's CPU s)

    def run(self) -> None:
        i, kids, names = 0, None, {}
        while not self.done.is_set():
            cpu: dict = {}
            if i % self.pss_each == 0:  # the process tree is scanned again with each PSS sample
                kids, names = _children(), {}
            total, n, kinds = tree_pss_kb(self.pid, cpu, pss=i % self.pss_each == 0, kids=kids, names=names)
            i += 1
            self.cpu_samples.append((time.time(), cpu))
            self.idle_samples.append((time.time(), host_idle_s()))
            self.own_samples.append((time.time(), time.thread_time()))  # this sampler's own cost
            if total > self.peak:
                self.peak, self.peak_kinds, self.peak_n = total, kinds, n
            self.done.wait(self.every)

    def idle_between(self, t0: float, t1: float, samples=None) -> float:
        """Idle CPU seconds of the whole host between the samples nearest t0 and t1."""
        samples = self.idle_samples if samples is None else samples
        a = min(samples, key=lambda s: abs(s[0] - t0))[1]
        b = min(samples, key=lambda s: abs(s[0] - t1))[1]
        return max(0.0, b - a)

    def cpu_between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds by process kind between the samples nearest t0 and t1."""
        if not self.cpu_samples:
            return {}
        a = min(self.cpu_samples, key=lambda s: abs(s[0] - t0))[1]
        b = min(self.cpu_samples, key=lambda s: abs(s[0] - t1))[1]
        out: dict[str, float] = {}
        for pid, (kind, c1) in b.items():
            c0 = a.get(pid, (kind, 0.0))[1]
            out[kind] = out.get(kind, 0.0) + max(0.0, c1 - c0)
        return out


# -- the run's critical path --

PHASES = (
    ("train (incl. wait for the budget)", "t_start_ms", "train_end_ms", "max"),
    ("worker tx out", "train_end_ms", "t_wtx_ms", "max"),
    ("validate", "t_wtx_ms", "t_vtx_ms", "max"),
    ("mine", "t_vtx_ms", "t_block_ms", "min"),
    ("propagate + verify block", "t_block_ms", "t_commit_ms", "max"),
)


def critical_path(r: dict) -> list[tuple[str, float]]:
    """Seconds of each step of round ``r``: from the first device entering the round to the
    last training job's end, to the last worker tx, the last vote, the first block, and the
    last device appending it; the rest of the round (global accuracy, report) is 'report'."""
    t = r["timings"]

    def at(key: str, how: str) -> float | None:
        vals = [v[key] for v in t.values() if key in v]
        return (max(vals) if how == "max" else min(vals)) / 1000 if vals else None

    start = at("t_start_ms", "min")
    marks = [("start", start)]
    for name, _, end_key, how in PHASES:
        marks.append((name, at(end_key, how)))
    out, prev = [], start
    for name, v in marks[1:]:
        if v is None or prev is None:
            out.append((name, float("nan")))
            continue
        out.append((name, max(0.0, v - prev)))
        prev = max(prev, v)
    out.append(("report (after the last append)", max(0.0, start + r["seconds"] - prev) if start else float("nan")))
    return out


def cpu_by_task(r: dict) -> dict[str, float]:
    keys = {
        "train (in the trainer's workers, wall)": "train_compute_ms",
        "train (wait for a slot, wall)": "train_wait_ms",
        "validate (ONNX)": "evaluate_cpu_ms",
        "mine + verify G_j (aggregate)": "aggregate_cpu_ms",
        "global accuracy (ONNX)": "evaluateglobal_cpu_ms",
        "protocol core (rules, sign/verify, JSON)": "node_ms",
        "agents: main loop thread": "cpu_main_ms",
        "agents: MQTT network thread": "cpu_mqtt_ms",
        "agents: task thread": "cpu_tasks_ms",
        "agents: whole processes": "cpu_process_ms",
    }
    return {name: sum(v.get(k, 0) for v in r["timings"].values()) / 1000 for name, k in keys.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn")
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--roles", default="12,5,3")
    p.add_argument("--malicious", type=int, default=0)
    p.add_argument("--samples", type=int, default=3000, help="training samples per device")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--slots", type=int, default=0, help="the host's training slots (0: one per core)")
    p.add_argument("--train-device", default="auto")
    p.add_argument("--broker", default=None, help="mqtt://HOST:PORT (default: bfl run's embedded broker)")
    p.add_argument("--skip-floor", action="store_true")
    p.add_argument("--pss-every", type=float, default=2.0,
                   help="seconds between PSS samples (CPU times are sampled every 0.5 s)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("extra", nargs="*", help="more `bfl run` options after --")
    args = p.parse_args()
    from edge_agent.compute import host_cpus

    slots = args.slots or host_cpus()
    workers = int(args.roles.split(",")[0])
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {host_cpus()} cores, "
          f"python {platform.python_version()}")  # fmt: skip
    print(f"# setting: {args.devices} devices, roles {args.roles}, {args.model}, {args.samples} samples/device, "
          f"{args.epochs} local epochs, batch {args.batch}, {args.malicious} malicious; {slots} training slot(s)")  # fmt: skip
    figures: dict = {"slots": slots}
    device = "cpu" if args.train_device == "auto" else args.train_device
    steps = workers * args.epochs * -(-args.samples // args.batch)

    def measure_floor(when: str) -> float:
        f = floor(args.model, workers, slots, args.samples, args.epochs, args.batch, device)
        print(f"floor ({when} the run): {workers} training jobs in {slots} single-thread process(es): {f:.1f} s "
              f"({f * 1000 * slots / steps:.2f} ms per step per slot)")  # fmt: skip
        return f

    # the floor is measured before and after the run and the ratio taken against their mean:
    # on a shared machine one floor alone can be 10 % off the other
    floors = [] if args.skip_floor else [measure_floor("before")]

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-round-"))
    cmd = [
        sys.executable, "-m", "orchestrator.cli", "run", "--devices", str(args.devices), "--roles", args.roles,
        "--malicious", str(args.malicious), "--rounds", str(args.rounds), "--model", args.model,
        "--dataset", "fashion-mnist", "--samples-per-device", str(args.samples), "--local-epochs", str(args.epochs),
        "--batch-size", str(args.batch), "--train-slots", str(slots), "--train-device", args.train_device,
        "--out", str(out), "--quiet", *args.extra,
    ]  # fmt: skip
    if args.broker:
        cmd += ["--broker", args.broker]
    print("run:", "bfl", " ".join(cmd[3:]))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    mem = PeakPss(proc.pid, pss_every=args.pss_every)
    mem.start()
    proc.wait()
    mem.done.set()
    mem.join()
    total = time.monotonic() - t0
    if proc.returncode != 0:
        return proc.returncode
    if floors:
        floors.append(measure_floor("after"))
        figures["floors_s"] = floors
        figures["floor_s"] = statistics.fmean(floors)
        print(f"floor: {figures['floor_s']:.1f} s, the mean of {floors[0]:.1f} s before and {floors[1]:.1f} s after")
    s = json.loads((out / "summary.json").read_text())
    rounds = s["rounds"]
    print(f"\n{'round':>5} {'seconds':>8} {'x floor':>8} {'accuracy':>9}")
    for r in rounds:
        ratio = f"{r['seconds'] / figures['floor_s']:.2f}" if "floor_s" in figures else "-"
        print(f"{r['round']:>5} {r['seconds']:>8.1f} {ratio:>8} {r['accuracy']:>8.2f}%")
    steady = rounds[1:] or rounds
    mean = statistics.fmean(r["seconds"] for r in steady)
    figures.update(round_s=[r["seconds"] for r in rounds], steady_round_s=mean, total_s=total)
    if "floor_s" in figures:
        figures["ratio"] = mean / figures["floor_s"]
        print(f"round time (mean of rounds {steady[0]['round']}..{steady[-1]['round']}): {mean:.1f} s = "
              f"{figures['ratio']:.2f} x the floor")  # fmt: skip
    last = rounds[-1]
    print(f"\ncritical path of round {last['round']} (s):")
    for name, v in critical_path(last):
        print(f"  {name:<40} {v:8.1f}")
    print(f"\nCPU by task in all devices, round {last['round']} (s; thread CPU time unless marked wall):")
    for name, v in cpu_by_task(last).items():
        print(f"  {name:<40} {v:8.1f}")
    t = last["timings"].values()
    t0 = min(v["t_start_ms"] for v in t if "t_start_ms" in v) / 1000
    t1 = max(v["t_commit_ms"] for v in t if "t_commit_ms" in v) / 1000
    by_kind = mem.cpu_between(t0, t1)
    print(f"\nCPU by process kind in round {last['round']} ({t1 - t0:.1f} s from the first device starting it "
          f"to the last appending its block; {host_cpus()} cores = {host_cpus() * (t1 - t0):.0f} CPU s):")  # fmt: skip
    for kind, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<40} {v:8.1f}")
    figures["cpu_by_process_kind"] = by_kind
    own = mem.idle_between(t0, t1, mem.own_samples)
    print(f"  {'(this benchmark sampling /proc)':<40} {own:8.1f}")
    figures["sampler_cpu_s"] = own
    if "floor_s" in figures and by_kind.get("trainer worker"):
        work = by_kind["trainer worker"] / (slots * figures["floor_s"])
        rest = sum(v for k, v in by_kind.items() if k != "trainer worker")
        print(f"  training took {work:.2f} x the floor's CPU ({slots} x {figures['floor_s']:.1f} s); everything "
              f"else {rest:.1f} CPU s")  # fmt: skip
        figures["training_cpu_x_floor"] = work
    starts = [v["train_start_ms"] / 1000 for v in t if "train_start_ms" in v]
    ends = [v["train_end_ms"] / 1000 for v in t if "train_end_ms" in v]
    if starts and ends:
        windows = [("before the first training job starts", t0, min(starts)),
                   ("while training jobs run", min(starts), max(ends)),
                   ("after the last training job ends", max(ends), t1)]  # fmt: skip
        print(f"\nidle CPU of the host in round {last['round']} (s; {host_cpus()} cores):")
        figures["idle_cpu_s"] = {}
        for name, a, b in windows:
            idle = mem.idle_between(a, b)
            figures["idle_cpu_s"][name] = idle
            print(f"  {name:<40} {idle:8.1f}  of {host_cpus() * max(0.0, b - a):.1f} in {max(0.0, b - a):.1f} s")
    msgs = sum(v.get("rx_msgs", 0) for v in t)
    mb = sum(v.get("rx_bytes", 0) for v in t) / 1e6
    print(f"\nthe broker delivered to the devices in round {last['round']}: {msgs} messages, {mb:.0f} MB")
    print(f"agents ready (all said hello) {s.get('agents_ready_s', float('nan')):.1f} s after they were started")
    figures.update(delivered_msgs=msgs, delivered_mb=mb, agents_ready_s=s.get("agents_ready_s"))
    print(f"\npeak PSS of the testbed: {mem.peak / 1024:.0f} MB in {mem.peak_n} processes")
    for kind, kb in sorted(mem.peak_kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<20} {kb / 1024:8.0f} MB")
    figures.update(peak_pss_mb=mem.peak / 1024, pss_by_kind_mb={k: v / 1024 for k, v in mem.peak_kinds.items()})
    figures["critical_path"] = dict(critical_path(last))
    figures["cpu_by_task"] = cpu_by_task(last)
    print(f"total wall time {total:.0f} s (includes start-up of {args.devices} agents); run folder {out}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
