"""The host's compute budget: one trainer service per machine runs every training job.

Agents hold no torch. A worker's local training (and a validator's ``trained`` reference)
is a job sent to the host's trainer service over a Unix socket; the service runs at most
``slots`` jobs at once, each in a long-lived worker process that imported torch once
(``edge_agent/ml/trainer_worker.py``), single-threaded on the CPU or on the GPU. So N agents
on one machine never oversubscribe it, the machine holds a few copies of torch instead of
one per agent, and a job's wait for a free slot is measured apart from its compute.

    bfl-agent trainer --slots 2                      # by hand (``bfl run`` starts its own)
    bfl-agent run ... --trainer unix:/path/to.sock   # use it

Without ``--trainer`` an agent uses the host's default service
(``$XDG_RUNTIME_DIR/bfl-trainer.sock`` or ``/tmp/bfl-<uid>/trainer.sock``) and starts it
when nobody has (a file lock makes that once per host); it exits when idle. On a board
this is the same code with ``--slots 1``.

This module imports no torch: the service's main process only queues and forwards bytes.

Wire format (local IPC, both directions): a 4-byte big-endian length, a JSON header whose
``parts`` lists ``[name, length]`` pairs, then those parts' raw bytes in order. Parameters
travel in the blob format (safetensors, ``ml/blobs.py``), images and labels as raw
little-endian arrays described in the header. Nothing is ever unpickled.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("bfl.compute")

MAX_HEADER = 1 << 20
MAX_PART = 1 << 30
TRAIN_DEVICES = ("auto", "cpu", "cuda")


class ComputeError(Exception):
    """The trainer service is unreachable, or a job failed in it."""


# -- framing --


def _read_exact(f, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf)) if hasattr(f, "read") else f.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)


def write_frame(f, header: dict, parts: dict[str, bytes] | None = None) -> None:
    parts = parts or {}
    header = {**header, "parts": [[k, len(v)] for k, v in parts.items()]}
    head = json.dumps(header, separators=(",", ":")).encode()
    chunks = [struct.pack(">I", len(head)), head, *parts.values()]
    if hasattr(f, "sendall"):
        for c in chunks:
            f.sendall(c)
    else:
        for c in chunks:
            f.write(c)
        f.flush()


def read_header(f) -> tuple[dict, list]:
    """A frame's header and the list of its parts, which are still to be read
    (:func:`read_parts`): the service reads a job's data only once it is among the next jobs to run."""
    (n,) = struct.unpack(">I", _read_exact(f, 4))
    if n > MAX_HEADER:
        raise ValueError(f"frame header of {n} bytes")
    header = json.loads(_read_exact(f, n))
    if not isinstance(header, dict):
        raise ValueError("malformed frame header")
    parts_spec = header.pop("parts", [])
    if not isinstance(parts_spec, list) or not all(isinstance(p, list) and len(p) == 2 for p in parts_spec):
        raise ValueError("malformed frame header")
    for name, size in parts_spec:
        if not isinstance(size, int) or not 0 <= size <= MAX_PART:
            raise ValueError(f"part {name!r} of {size} bytes")
    return header, parts_spec


def read_parts(f, parts_spec: list) -> dict[str, bytes]:
    return {str(name): _read_exact(f, size) for name, size in parts_spec}


def read_frame(f) -> tuple[dict, dict[str, bytes]]:
    header, spec = read_header(f)
    return header, read_parts(f, spec)


def array_part(a: np.ndarray, dtype) -> tuple[dict, bytes]:
    a = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": np.dtype(dtype).str.lstrip("<>|="), "shape": list(a.shape)}, a.tobytes()


def part_array(spec: dict, data: bytes) -> np.ndarray:
    dtype = np.dtype(spec["dtype"]).newbyteorder("<")
    a = np.frombuffer(data, dtype=dtype).reshape(spec["shape"])
    return a.astype(dtype.newbyteorder("="), copy=True)  # writable, native order


# -- where the host's service lives --


def default_socket() -> Path:
    env = os.environ.get("BFL_TRAINER_SOCKET")
    if env:
        return Path(env)
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.path.isdir(run):
        return Path(run) / "bfl-trainer.sock"
    return Path(f"/tmp/bfl-{os.getuid()}") / "trainer.sock"


def parse_address(value: str | None) -> Path:
    """``unix:/path`` or a path; None means the host's default."""
    if not value or value == "auto":
        return default_socket()
    if value.startswith("unix:"):
        value = value[5:]
    return Path(value)


def host_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def connectable(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def ensure_service(path: Path, slots: int | None = None, idle_exit: float = 300.0, wait: float = 60.0) -> None:
    """Start the host's trainer service at ``path`` unless one answers there already. A lock
    file next to the socket makes concurrent agents start it once."""
    if connectable(path):
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if connectable(path):
            return
        cmd = [sys.executable, "-m", "edge_agent.cli", "trainer", "--socket", str(path), "--idle-exit", str(idle_exit)]
        if slots:
            cmd += ["--slots", str(slots)]
        logf = open(path.with_suffix(".log"), "ab")
        subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + wait
        while not connectable(path):
            if time.monotonic() > end:
                raise ComputeError(f"the trainer service did not come up at {path}; see {path.with_suffix('.log')}")
            time.sleep(0.1)


# -- the client (agents) --


@dataclass
class JobResult:
    params: bytes  # blob format
    personal: bytes | None  # pFedMe's personalized model
    wait_ms: int  # waiting for a slot of the host's budget
    compute_ms: int  # in the worker process
    start: float  # time.time() when the job got its slot / finished
    end: float
    device: str


class Trainer:
    """An agent's handle on the host's trainer service."""

    def __init__(self, address: str | None = None, device: str = "auto", autostart: bool = True):
        if device not in TRAIN_DEVICES:
            raise ValueError(f"train device {device!r}: one of {', '.join(TRAIN_DEVICES)}")
        self.path = parse_address(address)
        self.device = device
        self.autostart = autostart

    def run(self, job: dict, params: bytes, x: np.ndarray, y: np.ndarray) -> JobResult:
        """Run one job ({"op": "train" | "pfedme", "arch", hyper-parameters, "seed"})."""
        if self.autostart:
            ensure_service(self.path)
        xs, xb = array_part(x, np.float32)
        ys, yb = array_part(y, np.int64)
        header = {**job, "device": self.device, "x": xs, "y": ys}
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.path))
        except OSError as exc:
            s.close()
            raise ComputeError(f"trainer service at {self.path}: {exc.strerror or exc}") from None
        try:
            write_frame(s, header, {"params": params, "x": xb, "y": yb})
            reply, parts = read_frame(s)
        except (OSError, EOFError, ValueError) as exc:
            raise ComputeError(f"trainer service at {self.path}: {exc}") from None
        finally:
            s.close()
        if not reply.get("ok"):
            raise ComputeError(f"training job failed in the trainer service: {reply.get('error')}")
        return JobResult(
            parts["params"], parts.get("personal"), int(reply["wait_ms"]), int(reply["compute_ms"]),
            float(reply["start"]), float(reply["end"]), str(reply["device"]),
        )  # fmt: skip


# -- the service --


class _ClientGone(Exception):
    """The agent went away before its job's data was read (the slot is given back)."""


@dataclass
class _Worker:
    pid: int
    sock: socket.socket  # the service's end of the worker's socket pair
    device: str
    popen: subprocess.Popen | None = None  # the worker the service started (the others were forked by it)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            os.kill(self.pid, 0)  # (its parent reaps it: no zombie answers)
            return True
        except OSError:
            return False

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        if self.popen is not None:
            self.popen.wait()

    def close(self, kill: bool = False) -> None:
        self.sock.close()  # the worker exits at end of input
        end = time.monotonic() + (0 if kill else 5)
        while self.alive() and time.monotonic() < end:
            time.sleep(0.05)
        if self.alive():
            self.kill()


@dataclass
class _Pool:
    """Workers for one device kind; ``free`` holds the idle ones (the budget's tokens)."""

    device: str
    size: int
    workers: list[_Worker] = field(default_factory=list)
    free: queue.Queue = field(default_factory=queue.Queue)
    # jobs whose data has been read ahead of a free slot: at most one per slot, so a slot that
    # frees starts its next job at once instead of first reading 16 MB from a busy agent
    ahead: threading.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.ahead = threading.Semaphore(self.size)


class TrainerService:
    """Accepts jobs on a Unix socket and runs at most ``slots`` at once on the CPU (one
    single-thread worker process each) and one at a time on the GPU when there is one."""

    def __init__(self, path: Path, slots: int | None = None, threads: int = 1, idle_exit: float = 0.0):
        self.path = Path(path)
        self.slots = slots or host_cpus()
        self.threads = threads
        self.idle_exit = idle_exit
        self.pools: dict[str, _Pool] = {}
        self.cuda: bool | None = None
        self.lock = threading.Lock()
        self.active = 0  # connections being served
        self.last_activity = time.monotonic()
        self.running = 0  # jobs computing now (for the budget's own check)
        self.max_running = 0
        self.jobs = 0
        self.stopped = threading.Event()

    # workers

    def _spawn(self, device: str, n: int = 1) -> list[_Worker]:
        """``n`` workers for ``device``: one process imports torch and forks the others, so
        they share its pages (two CPU workers: 945 MB peak PSS against 1 205 MB for two
        processes that each import torch; docs/benchmarks.md)."""
        pairs = [socket.socketpair() for _ in range(n)]
        fds = [theirs.fileno() for _, theirs in pairs]
        cmd = [sys.executable, "-m", "edge_agent.ml.trainer_worker", "--device", device, "--threads", str(self.threads),
               "--fds", ",".join(map(str, fds)), "--service", str(self.path)]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        proc = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL, env=env)
        workers = []
        for mine, theirs in pairs:
            theirs.close()
            try:
                hello, _ = read_frame(mine)
            except (OSError, EOFError, ValueError) as exc:
                proc.kill()
                for other, _ in pairs:  # the slots it forked see the end of their input
                    other.close()
                raise ComputeError(f"a {device} training worker did not start: {exc}") from None
            if self.cuda is None:
                self.cuda = bool(hello.get("cuda"))
            pid = int(hello["pid"])
            workers.append(_Worker(pid, mine, device, proc if pid == proc.pid else None))
        return workers

    def _pool(self, device: str) -> _Pool:
        with self.lock:
            if device == "auto":
                if self.cuda is None:
                    self._ensure_pool("cpu")
                device = "cuda" if self.cuda else "cpu"
            return self._ensure_pool(device)

    def _ensure_pool(self, device: str) -> _Pool:
        pool = self.pools.get(device)
        if pool is None:
            pool = _Pool(device, self.slots if device == "cpu" else 1)
            for w in self._spawn(device, pool.size):
                pool.workers.append(w)
                pool.free.put(w)
            self.pools[device] = pool
            log.info("trainer: %d %s worker(s) ready", pool.size, device)
        return pool

    def start_workers(self) -> None:
        self._pool("cpu")

    # serving

    def serve_forever(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if connectable(self.path):
                raise ComputeError(f"a trainer service already listens at {self.path}")
            self.path.unlink()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # only this user may submit jobs
        try:
            srv.bind(str(self.path))
        finally:
            os.umask(old)
        srv.listen(256)
        srv.settimeout(1.0)
        log.info("trainer: listening on %s, %d CPU slot(s)", self.path, self.slots)
        try:
            while not self.stopped.is_set():
                if self._idle_too_long():
                    log.info("trainer: idle for %.0f s, exiting", self.idle_exit)
                    break
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                with self.lock:
                    self.active += 1
                threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()
        finally:
            srv.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.close()

    def _idle_too_long(self) -> bool:
        with self.lock:
            return self.idle_exit > 0 and self.active == 0 and time.monotonic() - self.last_activity > self.idle_exit

    def _serve_conn(self, conn: socket.socket) -> None:
        job = False
        try:
            with conn:
                conn.settimeout(600)
                try:
                    first = conn.recv(4, socket.MSG_PEEK)
                except OSError:
                    first = b""
                if not first:
                    return  # a probe (``connectable``): connected and closed
                job = True
                header, spec = read_header(conn)
                # the job's data stays in the client's socket until it is among the next jobs
                # to run: 12 queued CNN jobs held 180 MB in this process when it read them on
                # arrival
                reply, out = self.run_job(header, lambda: read_parts(conn, spec))
                write_frame(conn, reply, out)
        except Exception as exc:  # a broken client must not take the service down
            log.warning("trainer: connection failed: %s", exc)
        finally:
            with self.lock:
                self.active -= 1
                if job:  # probes do not keep an idle service alive
                    self.last_activity = time.monotonic()

    def run_job(self, header: dict, read_data) -> tuple[dict, dict[str, bytes]]:
        """Run one job; ``read_data()`` reads its data once the job is among the next
        ``slots`` to run (read ahead of its slot, so the slot does not wait for it)."""
        device = header.get("device", "auto")
        if device not in TRAIN_DEVICES:
            return {"ok": False, "error": f"unknown device {device!r}"}, {}
        if device == "cuda" and self._pool("auto").device != "cuda":
            return {"ok": False, "error": "--train-device cuda but torch sees no GPU on this host"}, {}
        pool = self._pool(device)
        t0 = time.monotonic()
        with pool.ahead:
            try:
                data = read_data()
            except (OSError, EOFError, ValueError) as exc:
                raise _ClientGone(exc) from None
            w = pool.free.get()  # the budget: blocks until a slot of this device is free
        wait_ms = int((time.monotonic() - t0) * 1000)
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        start = time.time()
        try:
            write_frame(w.sock, header, data)
            del data
            reply, out = read_frame(w.sock)
        except (OSError, EOFError, ValueError) as exc:
            if self.stopped.is_set():  # the service is stopping and closed its workers: not a death
                reply, out = {"ok": False, "error": "the trainer service is stopping"}, {}
                return reply, out
            log.error("trainer: a %s worker died (%s); starting another", pool.device, exc)
            w.close(kill=True)
            old, [w] = w, self._spawn(pool.device)
            pool.workers[pool.workers.index(old)] = w
            reply, out = {"ok": False, "error": f"worker process died: {exc}"}, {}
        finally:
            with self.lock:
                self.running -= 1
                self.jobs += 1
            pool.free.put(w)
        reply.update(wait_ms=wait_ms, start=start, end=time.time(), device=pool.device)
        return reply, out

    def close(self) -> None:
        self.stopped.set()  # (jobs still running see their worker go: no replacement is started)
        for pool in self.pools.values():
            for w in pool.workers:
                w.close()


# -- pure computations shared by co-located agents --


class SharedCache:
    """What the agents of one ``bfl run`` on one host compute identically, done once: every
    device aggregates G_j from the same content-addressed inputs, and stores the same blobs.
    Opt-in (``bfl-agent run --shared-cache DIR``; ``bfl run`` passes one per run to its local
    agents, which one operator started and trusts alike): on separate boards each device
    still computes and stores everything itself. Results are checked like any other (G_j
    against the block, blobs against their hash on every read)."""

    def __init__(self, root: str | Path):
        from .ml.blobs import BlobStore

        self.root = Path(root)
        self.blobs = BlobStore(self.root / "blobs")  # what agents stored (hard-linked from)
        # what the broker delivered to this host's blob group (--blob-group): only these are
        # handed to the other agents -- a blob an agent made but never sent is not "arrived"
        self.arrived = BlobStore(self.root / "arrived", shared=self.blobs)
        (self.root / "agg").mkdir(parents=True, exist_ok=True)

    def once(self, key: str, compute) -> str | None:
        """The blob hash ``compute()`` gives for ``key`` (its bytes, or None), computed by the
        first agent to ask while the others wait on a file lock."""
        path = self.root / "agg" / key
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.is_file():
                text = path.read_text().strip()
                if text == "none" or self.blobs.has(text):
                    return None if text == "none" else text
            data = compute()
            text = "none" if data is None else self.blobs.put(data)
            tmp = path.with_suffix(".part")
            tmp.write_text(text)
            os.replace(tmp, path)
            return None if data is None else text
