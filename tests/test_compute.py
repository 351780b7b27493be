"""The host's compute budget (edge_agent/compute.py): a real trainer service with real torch
worker processes, real jobs from several clients at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from edge_agent import compute
from edge_agent.compute import ComputeError, Trainer, TrainerService
from edge_agent.ml import arch
from edge_agent.ml import blobs as bl


@pytest.fixture
def service(tmp_path_factory):
    # a short directory: Unix socket paths are limited to about 100 bytes
    import tempfile

    d = tempfile.mkdtemp(prefix="bfl-t-")
    svc = TrainerService(os.path.join(d, "t.sock"), slots=2)
    svc.start_workers()
    th = threading.Thread(target=svc.serve_forever, daemon=True)
    th.start()
    while not compute.connectable(svc.path):
        time.sleep(0.05)
    yield svc
    svc.stopped.set()
    th.join(10)


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n)


def _job(seed, epochs=2):
    return {"op": "train", "arch": "mlp", "epochs": epochs, "batch_size": 10, "lr": 0.01, "seed": seed}


def overlap(intervals):
    """The largest number of intervals open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_the_budget_is_never_exceeded_and_waits_are_measured(service):
    """Eight clients submit at once to a 2-slot service: at most 2 jobs compute at any
    instant (by the service's own count and by the job intervals it reports), all 8 finish,
    and the later ones report the time they waited for a slot apart from their compute."""
    x, y = _data()
    base = bl.encode(arch.init_params("mlp", 0))
    t = Trainer(f"unix:{service.path}", "cpu", autostart=False)
    results = []
    ths = [threading.Thread(target=lambda i=i: results.append(t.run(_job(i, 4), base, x, y))) for i in range(8)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert len(results) == 8 and service.jobs == 8
    assert service.max_running == 2
    assert overlap([(r.start, r.end) for r in results]) == 2
    waited = sorted(r.wait_ms for r in results)
    assert waited[-1] >= max(r.compute_ms for r in results)  # the last waited for at least one job
    assert all(r.device == "cpu" and r.compute_ms > 0 for r in results)


def test_the_next_jobs_data_is_read_ahead_of_its_slot_but_no_further(service):
    """Five clients send 12.5 MB jobs at once to a 2-slot service. While the first two
    compute, the service reads the next two jobs' data (so a slot that frees starts its next
    job at once), but not the fifth's: that one stays in its client's socket until a
    read-ahead place frees, when the first job ends and the third takes its slot."""
    x, y = _data(4000)
    base = bl.encode(arch.init_params("mlp", 0))
    xs, xb = compute.array_part(x, np.float32)
    ys, yb = compute.array_part(y, np.int64)
    out = []

    def client(i):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(service.path))
            header = {**_job(i, 3), "device": "cpu", "x": xs, "y": ys}
            compute.write_frame(s, header, {"params": base, "x": xb, "y": yb})
            sent = time.time()  # the service has read all of it (it is far larger than a socket buffer)
            reply, _ = compute.read_frame(s)
            assert reply["ok"], reply
            out.append((reply["start"], reply["end"], sent))

    ths = [threading.Thread(target=client, args=(i,)) for i in range(5)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    jobs = sorted(out)  # by start
    ends = sorted(end for _, end, _ in jobs[:2])  # when each slot frees
    first_end = ends[0]
    assert first_end - jobs[0][0] > 0.5  # the jobs last long enough for the order to show
    for (start, _, sent), freed in zip(jobs[2:4], ends):
        assert sent < first_end - 0.3, "the next jobs' data was not read ahead of their slot"
        assert start - freed < 0.3  # each starts as its slot frees (the 4th takes the 2nd slot to free)
    assert jobs[4][2] > first_end - 0.1, "more jobs' data was read than there are slots"


def test_a_job_gives_what_training_in_process_gives(service):
    """Bit for bit: the same params, data and seed give the same blob through the service
    as train_local / train_pfedme called in this process."""
    from edge_agent.ml.train import train_local, train_pfedme

    x, y = _data(100, 1)
    p0 = arch.init_params("mlp", 3)
    t = Trainer(f"unix:{service.path}", "cpu", autostart=False)
    got = t.run(_job(7), bl.encode(p0), x, y)
    assert got.params == bl.encode(train_local("mlp", p0, x, y, epochs=2, batch_size=10, lr=0.01, seed=7))
    pf = {"local_iters": 5, "k": 2, "personal_lr": 0.05, "lr": 0.01, "lam": 15.0}
    got = t.run({"op": "pfedme", "arch": "mlp", "batch_size": 10, "seed": 2, "pfedme": pf}, bl.encode(p0), x, y)
    w, theta = train_pfedme("mlp", p0, x, y, batch_size=10, seed=2, **pf)
    assert got.params == bl.encode(w) and got.personal == bl.encode(theta)
    # the two slots are one torch import: the second was forked by the first (forked after
    # the jobs above ran in either, the results are still those of in-process training)
    first, second = service.pools["cpu"].workers
    with open(f"/proc/{second.pid}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == first.pid
    for w in (first, second):
        with open(f"/proc/{w.pid}/maps") as f:
            assert "libtorch" in f.read()


def test_bad_clients_and_dead_workers_do_not_stop_the_service(service):
    x, y = _data(50)
    base = bl.encode(arch.init_params("mlp", 0))
    t = Trainer(f"unix:{service.path}", "cpu", autostart=False)
    # junk bytes, a frame announcing a huge header, a half frame, a job that fails in torch
    for junk in (b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff", b"\x00\x00\x00\x40{"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(service.path))
        s.sendall(junk)
        s.close()
    with pytest.raises(ComputeError, match="failed in the trainer service"):
        t.run({**_job(0), "arch": "cnn"}, base, x, y)  # mlp parameters for a CNN
    # a worker process killed mid-life is replaced
    victim = service.pools["cpu"].workers[1]  # (the slot forked by the first)
    victim.kill()
    while victim.alive():
        time.sleep(0.05)
    outcomes = []
    for i in range(4):
        try:
            outcomes.append(t.run(_job(i), base, x, y).device)
        except ComputeError as exc:
            outcomes.append(str(exc))
    assert outcomes.count("cpu") >= 3, outcomes  # at most the job sent to the dead one fails
    assert all(w.alive() for w in service.pools["cpu"].workers)
    assert len(service.pools["cpu"].workers) == 2


def test_an_unreachable_service_is_a_clear_error(tmp_path):
    t = Trainer(f"unix:{tmp_path / 'nobody.sock'}", autostart=False)
    x, y = _data(10)
    with pytest.raises(ComputeError, match="trainer service at .*nobody.sock"):
        t.run(_job(0), bl.encode(arch.init_params("mlp", 0)), x, y)
    with pytest.raises(ValueError, match="train device"):
        Trainer(None, "tpu")


def test_agents_start_one_service_per_host_and_it_exits_when_idle(tmp_path):
    """Three processes race to start the host's service at one socket: one service runs
    (the lock), all three get it, and it exits after its idle time."""
    import tempfile

    sock = os.path.join(tempfile.mkdtemp(prefix="bfl-t-"), "trainer.sock")
    code = (
        "import sys; from pathlib import Path; from edge_agent.compute import ensure_service;"
        "ensure_service(Path(sys.argv[1]), slots=1, idle_exit=3)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, sock]) for _ in range(3)]
    assert all(p.wait(120) == 0 for p in procs)
    services = [
        pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid).count(sock) and "edge_agent.cli trainer" in _cmdline(pid)
    ]
    assert len(services) == 1, services
    # watched from /proc, not by connecting: a probe every 0.5 s is a connection the service
    # must accept and classify, and may still count while it does (it failed a fresh-clone CI)
    end = time.monotonic() + 60
    while os.path.exists(f"/proc/{services[0]}") and "edge_agent.cli trainer" in _cmdline(services[0]):
        assert time.monotonic() < end, "the idle service did not exit"
        time.sleep(0.5)
    assert not compute.connectable(compute.Path(sock))


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_run_trains_under_the_host_budget_and_agents_never_load_torch(tmp_path):
    """A real `bfl run` with --train-slots 1: the training jobs of all workers (and of the
    validators' trained reference) never overlap, each job's wait is reported, and no agent
    process ever maps libtorch -- only the trainer service's workers do."""
    import json

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", "--devices", "6", "--roles", "4,1,1", "--rounds", "2",
         "--model", "mlp", "--dataset", "fashion-mnist", "--samples-per-device", "300", "--local-epochs", "3",
         "--vote-ref", "trained", "--train-slots", "1", "--out", str(out), "--quiet", "--deadlines", "120,60,60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen_agents, torch_in, parents = set(), {}, {}
    while proc.poll() is None:
        for pid in os.listdir("/proc"):
            cmd = _cmdline(pid) if pid.isdigit() else ""
            if str(out) not in cmd:
                continue
            kind = "agent" if "edge_agent.cli run" in cmd else "trainer" if "trainer_worker" in cmd else None
            if kind is None and "edge_agent.cli trainer" not in cmd:
                continue
            try:
                maps = open(f"/proc/{pid}/maps").read()
            except OSError:
                continue
            if kind == "agent":
                seen_agents.add(pid)
                with open(f"/proc/{pid}/stat") as f:
                    ppid = f.read().rsplit(")", 1)[1].split()[1]
                parents[ppid] = _cmdline(ppid)
            torch_in[pid] = (kind, "libtorch" in maps)
        time.sleep(0.3)
    stdout = proc.stdout.read()
    assert proc.returncode == 0, stdout[-3000:]
    assert len(seen_agents) == 6
    # all forked from one process that preloaded the agent's code (and no torch either)
    assert len(parents) == 1 and "edge_agent.preload" in next(iter(parents.values())), parents
    assert not [p for p, (k, t) in torch_in.items() if k == "agent" and t], "an agent process mapped libtorch"
    summary = json.loads((out / "summary.json").read_text())
    jobs, waits = [], []
    for r in summary["rounds"]:
        for d, t in r["timings"].items():
            if "train_start_ms" in t:
                jobs.append((t["train_start_ms"], t["train_end_ms"]))
                waits.append(t["train_wait_ms"])
    assert len(jobs) == 2 * (4 + 1)  # 4 workers and 1 validator's trained reference a round
    assert overlap(jobs) == 1
    assert max(waits) > 0


def test_co_located_agents_aggregate_once_and_store_blobs_once(tmp_path):
    """SharedCache: four agents asking at once for the same aggregate run it once (the others
    wait and take its result); blobs put through a shared store are one file, hard-linked."""
    from edge_agent.compute import SharedCache
    from edge_agent.ml.blobs import BlobStore

    shared = SharedCache(tmp_path / "shared")
    calls = []

    def compute():
        calls.append(1)
        time.sleep(0.3)
        return b"the aggregate"

    results = []
    ths = [threading.Thread(target=lambda: results.append(shared.once("k1", compute))) for _ in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert shared.blobs.get(results[0]) == b"the aggregate"
    assert shared.once("k2", lambda: None) is None and shared.once("k2", compute) is None  # 'no update': kept
    stores = [BlobStore(tmp_path / f"a{i}", shared=shared.blobs) for i in range(3)]
    h = [s.put(b"x" * 1000) for s in stores][0]
    assert os.stat(stores[0].path(h)).st_nlink == 4  # the shared file and three links
    assert all(s.get(h) == b"x" * 1000 for s in stores)
    assert stores[0].delete(h) and stores[1].get(h) == b"x" * 1000  # one agent's deletion is its own
