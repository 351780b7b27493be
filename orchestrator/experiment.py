"""Create and drive one experiment: keys, genesis, local agents, fault injection, summary."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent import compute
from edge_agent.byzantine import PROTOCOL_ATTACKS
from edge_agent.ml import blobs as bl
from edge_agent.ml.arch import init_params
from edge_agent.protocol.crypto import KeyPair
from edge_agent.protocol import ledger
from edge_agent.protocol.canonical import CanonicalError, parse
from edge_agent.protocol.genesis import Genesis, load_genesis, make_genesis_body
from edge_agent.protocol.ledger import (
    MAX_BLOCK_BYTES,
    PROTOCOLS,
    worst_case_block_bytes,
)
from edge_agent.protocol.messages import Drop, device_topic, from_json, sign, topic
from edge_agent.store import ChainStore
from edge_agent.transport import Mqtt

from .identity import derived_key, run_id_for
from .observer import Observer, RoundResult


class ExperimentError(Exception):
    """A one-line, actionable failure of the experiment set-up."""


#: seconds the operator waits for a block the honest devices report but it did not receive
#: and no local agent's chain file holds (``Experiment._round_result``)
MISSING_BLOCK_WAIT_S = 5.0

#: seconds ``bfl run --external`` waits, once enough devices announced themselves and all of
#: them trust another operator key, for others before it says so and stops
OTHERS_GRACE_S = 3.0


#: OUT/rounds.jsonl: each finished round's result, appended (and fsync'd) as it finishes, so
#: that a stopped run keeps its rounds and ``bfl run --resume OUT`` knows where to go on
ROUNDS_LOG = "rounds.jsonl"


def data_files(cfg: RunConfig) -> list[dict]:
    """The dataset files the run read, with their SHA-256 (the partition is a function of
    these bytes and the seed)."""
    from edge_agent.ml.data import DataMissingError, resolve_files

    try:
        files = resolve_files(cfg.dataset, cfg.data_dir)
    except DataMissingError:
        return []
    out = []
    for path in sorted(set(files.values())):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out.append({"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()})
    return out


def versions(broker_kind: str | None) -> dict:
    """The versions that ran: this project, the ML runtimes, the broker (None: external)."""
    from importlib import metadata

    def dist(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    out = {"posbfl-testbed": dist("posbfl-testbed"), "python": sys.version.split()[0], "torch": dist("torch"),
           "onnxruntime": dist("onnxruntime"), "numpy": dist("numpy"), "paho-mqtt": dist("paho-mqtt")}  # fmt: skip
    if broker_kind == "embedded":
        out["broker"] = f"amqtt {dist('amqtt')}"
    elif broker_kind == "mosquitto":
        from broker.mosquitto import mosquitto_version

        out["broker"] = mosquitto_version()
    else:
        out["broker"] = "external"
    return out


ATTACKS = ("gaussian", "sign_flip", "scale", "lazy", "label_flip", *PROTOCOL_ATTACKS)


@dataclass
class RunConfig:
    protocol: str = "pos-bfl"
    devices: int = 20
    roles: tuple[int, int, int] = (12, 5, 3)
    malicious: int = 0
    malicious_ids: list[str] | None = None
    attacks: dict[str, str] = field(default_factory=dict)  # per-device attack, else `attack`
    attack: str = "gaussian"
    rounds: int = 10
    dataset: str = "mnist"
    data_dir: Path | None = None
    model: str = "cnn"
    partition: str = "shards"
    alpha: float = 0.5  # Dirichlet concentration (partition dirichlet)
    samples_per_device: int | None = None
    test_per_device: int | None = None
    local_epochs: int = 5
    batch_size: int = 10
    lr: float = 0.01
    vh: float = 0.08
    vote_ref: str = "median"
    loss_guard: int = 10
    aggregator: str = "fedavg"
    krum_f: int | None = None  # Multi-Krum's f (default: the number of malicious devices)
    knockout: int = 3
    unit_reward: int = 1
    deadlines_s: tuple[int, int, int] = (900, 300, 120)
    broker: str | None = None
    external: bool = False
    operator_key: Path | None = None
    out: Path = Path("runs/latest")
    seed: int = 0
    threads: int = 1
    train_slots: int = 0  # local agents: concurrent training jobs on this host (0: one per core)
    train_device: str = "auto"
    join_timeout: float = 300.0
    run_id: str | None = None
    extra_agent_args: list[str] = field(default_factory=list)
    # Prometheus: the operator serves on metrics_port, local agents on the next free ports
    # (0: no metrics); a file_sd file per run goes to metrics_targets
    metrics_port: int = 0
    metrics_addr: str = "127.0.0.1"
    metrics_targets: Path | None = None

    def attack_of(self, device: str) -> str:
        """The attack a malicious ``device`` mounts (--malicious-ids d03=label_flip, else --attack)."""
        return self.attacks.get(device, self.attack)

    def device_ids(self) -> list[str]:
        width = max(2, len(str(self.devices - 1)))
        return [f"d{i:0{width}d}" for i in range(self.devices)]


def choose_malicious(cfg: RunConfig, devices: list[str], trainers: list[str] | None = None) -> list[str]:
    """The operator's pick. ``--malicious K`` draws among the devices that can train (a
    poisoning attack on a validator-only device would never fire), except for the voting
    attack and the other protocol attacks (edge_agent/byzantine.py), which any device can mount."""
    if cfg.malicious_ids:
        unknown = [d for d in cfg.malicious_ids if d not in devices]
        if unknown:
            raise ExperimentError(f"--malicious-ids names unknown devices: {', '.join(unknown)}")
        return sorted(cfg.malicious_ids)
    if not 0 <= cfg.malicious <= len(devices):
        raise ExperimentError(f"--malicious {cfg.malicious}: must be between 0 and {len(devices)}")
    pool = devices if cfg.attack in PROTOCOL_ATTACKS or trainers is None else [d for d in devices if d in set(trainers)]
    if cfg.malicious > len(pool):
        raise ExperimentError(f"--malicious {cfg.malicious}: only {len(pool)} devices can train (and poison an update)")
    return sorted(random.Random(cfg.seed).sample(pool, cfg.malicious))


def data_spec(cfg: RunConfig) -> dict:
    """Check the dataset is present and the partition fits; the spec goes into the genesis."""
    from edge_agent.ml.data import DataMissingError, load_dataset, release_datasets

    try:
        ds = load_dataset(cfg.dataset, cfg.data_dir)
    except DataMissingError as exc:
        raise ExperimentError(str(exc)) from None
    release_datasets()  # only its sizes are needed here: kept, they were 51 MB of the operator's PSS for the whole run
    n = cfg.devices
    spd = cfg.samples_per_device or len(ds.train_y) // n
    tpd = cfg.test_per_device or min(500, len(ds.test_y) // n)  # 500 each for 20 devices, as in the design
    if spd * n > len(ds.train_y):
        raise ExperimentError(
            f"--samples-per-device {spd} x {n} devices exceeds the {len(ds.train_y)} training images"
        )
    if tpd * n > len(ds.test_y):
        raise ExperimentError(f"--test-per-device {tpd} x {n} devices exceeds the {len(ds.test_y)} test images")
    return {
        "dataset": cfg.dataset,
        "partition": cfg.partition,
        "samples_per_device": spd,
        "test_per_device": tpd,
        "seed": cfg.seed,
        "n_devices": n,
        **({"alpha_milli": round(cfg.alpha * 1000)} if cfg.partition == "dirichlet" else {}),
    }


def check_roles(cfg: RunConfig) -> None:
    w, v, m = cfg.roles
    if min(w, v, m) < 1:
        raise ExperimentError("--roles W,V,M: every count must be at least 1")
    if w + v + m > cfg.devices:
        raise ExperimentError(f"--roles {w},{v},{m} needs {w + v + m} devices but --devices is {cfg.devices}")
    # every validator's tx names every worker's: the largest block grows with |W| x |V|
    size = worst_case_block_bytes({"roles": [w, v, m], "devices": dict.fromkeys(cfg.device_ids()), "run": "r" * 24})
    if size > MAX_BLOCK_BYTES:
        raise ExperimentError(
            f"--roles {w},{v},{m}: a block could reach {size} bytes, over the {MAX_BLOCK_BYTES}-byte limit every "
            "device enforces; use fewer workers or validators"
        )


def check_config(cfg: RunConfig) -> dict:
    """Every check of a run's settings that needs no process: before its folder is made
    (``bfl run``), and again by ``Experiment.setup``. Returns the data spec of the genesis."""
    check_roles(cfg)
    from edge_agent.ml.arch import ARCHS

    if cfg.model not in ARCHS:
        raise ExperimentError(f"--model {cfg.model!r}: choose one of {', '.join(ARCHS)} (edge_agent/ml/models/)")
    from edge_agent.ml.data import PARTITIONS

    if cfg.partition not in PARTITIONS:
        raise ExperimentError(f"--partition {cfg.partition!r}: choose one of {', '.join(PARTITIONS)}")
    if cfg.alpha <= 0:
        raise ExperimentError("--alpha must be > 0")
    if cfg.protocol not in PROTOCOLS:
        raise ExperimentError(f"--protocol {cfg.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    from edge_agent.protocol.genesis import AGGREGATORS

    if cfg.aggregator not in AGGREGATORS:
        raise ExperimentError(f"--aggregator {cfg.aggregator!r}: choose one of {', '.join(AGGREGATORS)}")
    for name in {cfg.attack, *cfg.attacks.values()}:
        if name not in ATTACKS:
            raise ExperimentError(f"attack {name!r}: choose one of {', '.join(ATTACKS)}")
    return data_spec(cfg)


def fork_server(preload: list[str]):
    """A multiprocessing context whose processes are forked from one server process that
    imported ``preload`` once, so they share those pages (what each would otherwise import
    itself). A process has one fork server: if this one already runs with other modules,
    the processes are spawned instead (correct, without the sharing)."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    running = getattr(server, "_forkserver_pid", None) is not None
    if running and getattr(server, "_preload_modules", None) != preload:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    return ctx


def _agent_main(argv: list[str], log_path: str, env: dict[str, str]) -> None:
    """``bfl-agent <argv>`` in a process forked from the agents' fork server: its output goes
    to its own log and it is named as if started from the command line (ps, pkill -f)."""
    import setproctitle

    # (before the environment changes: setproctitle takes the space argv and environ share)
    setproctitle.setproctitle(" ".join([sys.executable, "-m", "edge_agent.cli", *argv]))
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["bfl-agent", *argv]
    from edge_agent.cli import main

    main()


class _ForkedAgent:
    """The handle of a forked agent, with the part of ``subprocess.Popen``'s interface the
    operator uses."""

    def __init__(self, proc):
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.exitcode

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired("bfl-agent", timeout)
        return self.proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self.proc.exitcode is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.proc.kill()


class LocalAgents:
    """N `bfl-agent` processes on this machine, one log file each, forked from one server
    process that imported the agent's code once (``edge_agent/preload.py``)."""

    def __init__(self, out: Path):
        self.out = out
        self.procs: dict[str, _ForkedAgent] = {}
        self.trainer: subprocess.Popen | None = None
        self.trainer_dir: Path | None = None

    def start_trainer(self, cfg: RunConfig) -> str:
        """The host's compute budget for these agents: one trainer service (a short socket
        path: Unix sockets allow about 100 bytes)."""
        self.trainer_dir = Path(tempfile.mkdtemp(prefix="bfl-"))
        sock = self.trainer_dir / "trainer.sock"
        cmd = [sys.executable, "-m", "edge_agent.cli", "trainer", "--socket", str(sock),
               "--slots", str(cfg.train_slots), "--threads", str(cfg.threads)]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.trainer = subprocess.Popen(cmd, stdout=open(self.out / "trainer.log", "ab"), stderr=subprocess.STDOUT, env=env)
        end = time.monotonic() + 120
        while not compute.connectable(sock):
            if self.trainer.poll() is not None or time.monotonic() > end:
                raise ExperimentError(f"the trainer service did not start; see {self.out / 'trainer.log'}")
            time.sleep(0.1)
        return f"unix:{sock}"

    def start(
        self,
        cfg: RunConfig,
        broker_url: str,
        operator_pub: str,
        keys: dict[str, Path],
        run_id: str,
        metrics_ports: dict[str, int] | None = None,
        broker_kind: str = "",
    ) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), PYTHONUNBUFFERED="1")
        trainer = self.start_trainer(cfg)
        # the fork server inherits this process's environment: one BLAS thread (agents
        # average and score with numpy and ONNX Runtime on --threads threads)
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        forks = fork_server(["edge_agent.preload"])
        for dev, key_path in keys.items():
            workdir = self.out / "agents" / dev
            workdir.mkdir(parents=True, exist_ok=True)
            cmd = [
                "run", "--id", dev, "--key", str(key_path), "--broker", broker_url,
                "--operator-key", operator_pub, "--workdir", str(workdir),
                "--run", run_id, "--exit-after-run", "--threads", str(cfg.threads),
                "--trainer", trainer, "--train-device", cfg.train_device,
                "--shared-cache", str(self.out / "agents" / "shared"),
            ]  # fmt: skip
            if broker_kind == "mosquitto":  # (amqtt has no shared subscriptions)
                cmd += ["--blob-group", f"host-{run_id}"]
            if cfg.data_dir:
                cmd += ["--data-dir", str(cfg.data_dir)]
            if metrics_ports:
                # linger: Prometheus (2 s scrapes in monitoring/prometheus-local.yml) sees the end
                cmd += ["--metrics-port", str(metrics_ports[dev]), "--metrics-addr", cfg.metrics_addr, "--metrics-linger", "5"]
            cmd += cfg.extra_agent_args
            proc = forks.Process(target=_agent_main, args=(cmd, str(workdir / "agent.log"), env), name=dev, daemon=True)
            proc.start()
            self.procs[dev] = _ForkedAgent(proc)

    def dead(self) -> list[str]:
        return [d for d, p in self.procs.items() if p.poll() is not None and p.returncode != 0]

    def consolidate_blobs(self) -> tuple[int, int]:
        """Move the stopped agents' blob stores into one store, ``OUT/blobs``.

        Every agent keeps every update and global model it received, so N local agents hold
        N copies of the same files (the README's 20-device, 3-round MLP run: 800 files, of
        which 40 are distinct). Blobs are content-addressed, so one copy of each hash loses nothing: the
        chain stays auditable from ``OUT/blobs``. A file whose bytes do not match its name
        (a torn write) is not carried over. Returns (distinct blobs kept, files removed).
        """
        dest = bl.BlobStore(self.out / "blobs")
        kept = removed = 0
        for dev in self.procs:
            src = self.out / "agents" / dev / "blobs"
            if not src.is_dir():
                continue
            for f in sorted(src.glob("*/*.safetensors")):
                h = f.stem
                if not dest.has(h):
                    data = f.read_bytes()
                    if bl.blob_hash(data) == h:
                        dest.put(data)
                        kept += 1
                removed += 1
            shutil.rmtree(src)
        shutil.rmtree(self.out / "agents" / "shared", ignore_errors=True)  # what they hard-linked from
        return kept, removed

    def stop(self, grace: float = 20.0) -> None:
        end = time.monotonic() + grace
        for p in self.procs.values():
            while p.poll() is None and time.monotonic() < end:
                time.sleep(0.1)
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.trainer is not None:
            self.trainer.terminate()
            try:
                self.trainer.wait(10)
            except subprocess.TimeoutExpired:
                self.trainer.kill()
            self.trainer = None
        if self.trainer_dir is not None:
            shutil.rmtree(self.trainer_dir, ignore_errors=True)


def chain_rows(genesis: Genesis, blocks: list, rounds: list[dict], malicious, ident: dict) -> tuple[list[dict], list[dict]]:
    """The report's rows of one run: per round (accuracy, decisions, votes) and per device and
    round (stake), replaying ``blocks`` from the genesis; ``rounds`` are summary.json's."""
    mal = set(malicious)
    out_rounds, stakes = [], []
    state = ledger.genesis_state(genesis)
    for res, blk in zip(rounds, blocks):
        state, _ = ledger.process_block(genesis, state, blk)
        votes = [v for raw in blk.body["vtxs"] for v in from_json(raw).body["votes"]]
        out_rounds.append(
            {
                **ident,
                "round": res["round"],
                "accuracy": round(res["accuracy"], 2),
                "accepted": len(res["accepted"]),
                "rejected": len(res["rejected"]),
                "malicious_workers": len(mal & set(res["workers"])),
                "malicious_accepted": len(mal & set(res["accepted"])),
                "votes_positive": sum(1 for v in votes if v["positive"]),
                "votes_negative": sum(1 for v in votes if not v["positive"]),
                "seconds": round(res["seconds"], 2),
            }
        )
        for d in genesis.device_ids:
            stakes.append({**ident, "round": res["round"], "device": d, "stake": state.stake(d), "is_malicious": int(d in mal)})
    return out_rounds, stakes


def run_folder(out: Path | None, run_id: str, overwrite: bool = False, root: Path = Path("runs")) -> Path:
    """The folder a run writes to, created empty. Without ``out``: ``root/TIME-RUNID`` (a
    repeated run gets its own folder), and ``root/latest`` is made to point at it. An ``out``
    that holds anything is refused unless ``overwrite``: one run's chains never mix with
    another's."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = root / f"{stamp}-{run_id}", 2
        try:
            while True:
                try:  # (two runs of the same settings started in the same second: -2, -3, ...)
                    path.mkdir(parents=True)
                    break
                except FileExistsError:
                    path, n = root / f"{stamp}-{run_id}-{n}", n + 1
            latest = root / "latest"
            if latest.is_symlink() or not latest.exists():
                tmp = root / f".latest.{os.getpid()}.{os.urandom(4).hex()}"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(path.name)
                os.replace(tmp, latest)
        except OSError as exc:
            raise ExperimentError(f"cannot create the run folder {path}: {exc.strerror}; choose one with --out") from None
        return path
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"--out {out}: is a file; name a folder (new or empty)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExperimentError(
                f"--out {out}: not empty (an earlier run?); choose a new folder, or add --overwrite to replace it"
            )
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExperimentError(f"--out {out}: cannot create it ({exc.strerror})") from None
    return out


class Experiment:
    """The operator's side of one run. ``progress(result)`` is called once per round."""

    def __init__(self, cfg: RunConfig, log=print, resume: bool = False):
        self.cfg = cfg
        self.resume = resume  # continue the stopped run in cfg.out (see resume_progress)
        self.resumed_at: list[int] = []  # the rounds after which this run was resumed
        self.earlier_wall_s = 0.0  # the wall time of its earlier parts
        self.log = log
        self.out = Path(cfg.out)
        self.run_id = cfg.run_id or run_id_for(cfg)  # the same settings and seed, the same id
        self.results: list[RoundResult] = []
        self.malicious: list[str] = []
        self.agents: LocalAgents | None = None
        self.broker = None
        self.broker_kind = "embedded"
        self.agents_ready_s = 0.0
        self.mqtt: Mqtt | None = None
        self.observer: Observer | None = None
        self.genesis: Genesis | None = None
        self.metrics = None  # orchestrator.metrics.ExperimentMetrics when cfg.metrics_port
        self.metrics_targets: list[str] = []
        self.metrics_port = 0
        self.targets_file: Path | None = None
        self.started = time.time()
        self.started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        self.saved_genesis = None  # a resumed run's genesis, published again as it was
        self.settled: list = []  # a resumed run's blocks up to where it stopped

    # -- set-up --

    def _operator_key(self) -> KeyPair:
        saved = self.out / "keys" / "operator.key"
        if self.resume and self.cfg.operator_key is None and saved.exists():
            return KeyPair.load(saved)  # the key that signed its genesis (another host's secret gives another)
        if self.cfg.operator_key is not None:
            path = self.cfg.operator_key
            if path.exists():
                return KeyPair.load(path)
            key = KeyPair.generate()
        else:  # derived from the run id and this host's secret: a repeated run signs the same genesis
            path = saved
            key = derived_key(self.run_id, "operator")
        key.save(path)
        return key

    def setup(self) -> None:
        cfg = self.cfg
        spec = check_config(cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            self.operator = self._operator_key()
        url = cfg.broker
        if url is None or url == "mosquitto":
            # a local Mosquitto (C, one process) when installed: it moves the round's blobs
            # to every device at a fraction of the CPU of the Python broker
            from broker import BrokerError
            from broker.mosquitto import start_mosquitto

            try:
                self.broker = start_mosquitto(self.out / "broker", max_packet_mb=64)
                url = self.broker.url
                self.broker_kind = "mosquitto"
                self.log(f"local Mosquitto broker at {url} (log in {self.out / 'broker'})")
            except BrokerError as exc:
                if url == "mosquitto":
                    raise ExperimentError(f"--broker mosquitto: {exc}") from None
                url = None
        if url is None or url == "embedded":
            from broker import EmbeddedBroker

            self.broker = EmbeddedBroker()
            url = self.broker.start()
            self.broker_kind = "embedded"
            self.log(f"embedded MQTT broker (amqtt) at {url}")
        self.broker_url = url
        from edge_agent.transport import TransportError

        self.mqtt = Mqtt(url, client_id=f"bfl-operator-{self.run_id}", username="operator")
        try:
            self.mqtt.connect()
        except TransportError as exc:
            raise ExperimentError(str(exc)) from None
        self.observer = Observer(self.mqtt)
        self.observer.settle(self.settled)
        self.observer.watch_devices()
        self.spec = spec
        if cfg.metrics_port:
            from edge_agent.metrics import MetricsError, free_ports

            from .metrics import ExperimentMetrics

            self.metrics = ExperimentMetrics()
            try:
                # the first free port from --metrics-port on (another run may hold 9400)
                port = free_ports(cfg.metrics_port, 1, cfg.metrics_addr)[0]
                self.metrics.serve(cfg.metrics_addr, port)
            except MetricsError as exc:
                raise ExperimentError(f"{exc}; choose another --metrics-port or 0 to turn metrics off") from None
            if port != cfg.metrics_port:
                self.log(f"metrics port {cfg.metrics_port} is taken; the operator serves on {port}")
            self.metrics_port = port
            self.metrics_targets = [f"{self._metrics_host()}:{port}"]

    def _metrics_host(self) -> str:
        return "127.0.0.1" if self.cfg.metrics_addr in ("0.0.0.0", "") else self.cfg.metrics_addr

    def _agent_metric_ports(self, devices: list[str]) -> dict[str, int] | None:
        if not self.cfg.metrics_port:
            return None
        from edge_agent.metrics import MetricsError, free_ports

        try:
            ports = free_ports(self.metrics_port + 1, len(devices), self.cfg.metrics_addr)
        except MetricsError as exc:
            raise ExperimentError(str(exc)) from None
        out = dict(zip(devices, ports))
        host = self._metrics_host()
        self.metrics_targets += [f"{host}:{p}" for p in ports]
        self.log(
            f"Prometheus metrics: operator http://{self.metrics_targets[0]}/metrics, "
            f"agents {host}:{ports[0]}..{ports[-1]}"
            + (f" (targets in {self.cfg.metrics_targets})" if self.cfg.metrics_targets else "")
        )
        return out

    def start_agents(self) -> dict[str, dict]:
        """Start local agents (or wait for external ones) and return the admitted devices."""
        t0 = time.monotonic()
        try:
            return self._start_agents()
        finally:
            self.agents_ready_s = time.monotonic() - t0

    def _start_agents(self) -> dict[str, dict]:
        cfg = self.cfg
        obs = self.observer
        assert obs is not None
        if cfg.external:
            wanted = None
            self.log(f"waiting for {cfg.devices} devices on {self.broker_url} (operator key {self.operator.public_hex})")
            if self.metrics is not None:
                self.log(f"Prometheus metrics: operator http://{self.metrics_targets[0]}/metrics (agents serve their own)")
        else:
            keys = {}
            for dev in cfg.device_ids():
                path = self.out / "keys" / f"{dev}.key"
                if not (self.resume and path.exists()):  # a resumed run's devices keep their keys
                    derived_key(self.run_id, dev).save(path)  # (orchestrator/identity.py)
                keys[dev] = path
            wanted = {d: KeyPair.load(p).public_hex for d, p in keys.items()}
            obs.admit(wanted)  # their hello and status count only when signed with these keys
            self.agents = LocalAgents(self.out)
            ports = self._agent_metric_ports(list(keys))
            if cfg.metrics_targets and self.metrics_targets:
                from .metrics import write_targets

                try:
                    self.targets_file = write_targets(cfg.metrics_targets, self.run_id, self.metrics_targets)
                except OSError as exc:
                    raise ExperimentError(f"--metrics-targets {cfg.metrics_targets}: cannot write there ({exc.strerror})") from None
            self.agents.start(cfg, self.broker_url, self.operator.public_hex, keys, self.run_id, ports,
                              self.broker_kind if self.broker else "")  # fmt: skip
            self.log(f"started {len(keys)} local agents (logs in {self.out / 'agents'})")
        end = time.monotonic() + cfg.join_timeout
        others_since = None  # when enough devices were there, some of them another operator's
        while True:
            obs.pump(0.5)
            # devices that trust another operator key would drop this run's genesis
            others = {d: h["operator"] for d, h in obs.hellos.items()
                      if d not in obs.offline and h.get("operator", self.operator.public_hex) != self.operator.public_hex}  # fmt: skip
            if wanted is not None:
                ready = {d for d in wanted if obs.hellos.get(d, {}).get("pubkey") == wanted[d] and d not in obs.offline}
                if len(ready) == len(wanted):
                    break
                dead = self.agents.dead() if self.agents else []
                if dead:
                    raise ExperimentError(
                        f"agent(s) {', '.join(dead)} exited at start-up; see {self.out / 'agents' / dead[0] / 'agent.log'}"
                    )
            else:
                ready = {d for d in obs.hellos if d not in obs.offline} - set(others)
                if len(ready) >= cfg.devices:
                    break
                # every device there trusts another key: this operator's key is the mistake (on a
                # broker shared with another operator's devices, some of them are not)
                if others and not ready and len(others) >= cfg.devices:
                    others_since = others_since or time.monotonic()
                    if time.monotonic() - others_since > OTHERS_GRACE_S:
                        raise ExperimentError(self._operator_mismatch(others))
                else:
                    others_since = None
            if time.monotonic() > end:
                missing = sorted(set(wanted or []) - ready) if wanted else []
                raise ExperimentError(
                    f"only {len(ready)} of {cfg.devices} devices announced themselves within {cfg.join_timeout:.0f}s"
                    + (f" (missing: {', '.join(missing[:8])})" if missing else "")
                    + (f"; besides, {self._operator_mismatch(others)}" if others else "")
                )
        if wanted is not None:
            return {d: {"pubkey": wanted[d], "caps": obs.hellos[d]["caps"]} for d in sorted(wanted)}
        chosen = sorted(ready)[: cfg.devices]
        return {d: {"pubkey": obs.hellos[d]["pubkey"], "caps": obs.hellos[d]["caps"]} for d in chosen}

    def _operator_mismatch(self, others: dict[str, str]) -> str:
        """Why ``others`` (device -> the operator key it trusts) will not join, and what to do."""
        mine = self.operator.public_hex
        theirs = sorted(set(others.values()))
        devs = sorted(others)
        text = (f"device{'s' if len(devs) > 1 else ''} {', '.join(devs[:6])}{' ...' if len(devs) > 6 else ''} "
                f"trust{'' if len(devs) > 1 else 's'} the operator key {theirs[0][:16]}..., not this run's "
                f"{mine[:16]}...")  # fmt: skip
        path = self.cfg.operator_key
        try:
            held = path.read_text().strip().lower() if path is not None else None
        except (OSError, UnicodeDecodeError):
            held = None
        if held in theirs:
            return (f"--operator-key {path}: holds the operator's public key, which the devices were given; "
                    f"bfl run needs the operator's secret key file ({text})")  # fmt: skip
        where = f"--operator-key {path}" if path is not None else "this run's own operator key"
        return (f"{where}: {text}; give --operator-key the secret key file whose public key the devices have, "
                f"or restart them with --operator-key {mine}")  # fmt: skip

    def publish_genesis(self, devices: dict[str, dict]) -> None:
        cfg = self.cfg
        assert self.mqtt and self.observer
        trainers = [d for d, info in devices.items() if "train" in info["caps"]]
        if len(trainers) < cfg.roles[0]:
            raise ExperimentError(f"only {len(trainers)} devices can train (torch installed) but |W| = {cfg.roles[0]}")
        self.malicious = choose_malicious(cfg, sorted(devices), trainers)
        if self.saved_genesis is not None:
            env = self.saved_genesis
            if {d: devices[d]["pubkey"] for d in devices} != {d: env.body["devices"][d]["pubkey"] for d in env.body["devices"]}:
                raise ExperimentError(f"--resume {self.out}: the devices that joined are not the ones in its genesis")
        else:
            env = sign(self.operator, self._genesis_body(devices))
        self.genesis = Genesis(env)
        # a run with this id may have run on this broker before (the same settings and seed):
        # its retained heads and commands must not reach this one
        for dev in devices:
            self.mqtt.publish(topic(self.run_id, "head", dev), b"", retain=True)
            if dev not in self.malicious:
                self.mqtt.publish(topic(self.run_id, "cmd", dev), b"", retain=True)
        self.observer.follow(self.genesis)
        (self.out / "genesis.json").write_bytes(env.payload())
        # Fault injection: each malicious device is told privately, on its own command topic.
        for dev in self.malicious:
            attack = {"name": cfg.attack_of(dev)}
            if attack["name"] == "gaussian":
                attack["variance_milli"] = 1000  # N(0, 1), paper Section 5.1
            cmd = sign(self.operator, {"run": self.run_id, "kind": "cmd", "round": 0, "sender": "operator", "target": dev, "attack": attack})
            self.mqtt.publish(topic(self.run_id, "cmd", dev), cmd.payload(), retain=True, wait=10)
        end = time.monotonic() + 60
        while not set(self.malicious) <= self.observer.acks:
            self.observer.pump(0.2)
            if time.monotonic() > end:
                raise ExperimentError(f"devices {sorted(set(self.malicious) - self.observer.acks)} did not acknowledge their command")
        self.mqtt.publish(topic(self.run_id, "genesis"), env.payload(), retain=True, wait=10)
        if self.metrics is not None:
            self.metrics.started(self.run_id, cfg, sorted(devices), {d: cfg.attack_of(d) for d in self.malicious})

    def _genesis_body(self, devices: dict[str, dict]) -> dict:
        cfg = self.cfg
        init = bl.encode(init_params(cfg.model, cfg.seed))
        return make_genesis_body(
            run=self.run_id,
            operator=self.operator.public_hex,
            devices=devices,
            roles=cfg.roles,
            rounds=cfg.rounds,
            arch=cfg.model,
            init_model=bl.blob_hash(init),
            init_seed=cfg.seed,
            data=self.spec,
            lr_e6=round(cfg.lr * 1e6),
            batch_size=cfg.batch_size,
            local_epochs=cfg.local_epochs,
            vh_bp=round(cfg.vh * 10000),
            unit_reward=cfg.unit_reward,
            knockout=cfg.knockout,
            vote_ref=cfg.vote_ref,
            loss_guard=cfg.loss_guard,
            aggregator=cfg.aggregator,
            krum_f=cfg.krum_f if cfg.krum_f is not None else len(self.malicious),
            protocol=cfg.protocol,
            deadlines_ms={k: s * 1000 for k, s in zip(("train", "validate", "mine"), cfg.deadlines_s)},
        )  # (no wall-clock time in it: a repeated run has the same genesis; summary.json has the times)

    # -- resuming a stopped run --

    def resume_progress(self) -> int:
        """Before the agents start again: take up the stopped run in OUT where it stopped.

        The rounds it finished are read from OUT/rounds.jsonl (or an older run's
        summary.json) and kept as far as their blocks form a valid chain from OUT/genesis.json,
        found in the agents' chain files and replayed with the devices' ``process_block``.
        Each agent's chain file is cut back to that chain (an agent may have appended the
        next round's block before the run stopped: the operator never saw that round's
        reports, so the round is run again -- each device re-publishes what it signed for it,
        never signing anew, as after a crash), and the run's models (``OUT/blobs``) are
        hard-linked back into every agent's store. Returns the number of rounds kept.
        """
        out = self.out
        self.operator = self._operator_key()
        try:
            env = from_json(parse((out / "genesis.json").read_bytes()))
            genesis = load_genesis(env, self.operator.public_hex)
        except FileNotFoundError:
            raise ExperimentError(f"--resume {out}: it has no genesis.json (the run stopped before it began); start it anew") from None
        except (OSError, CanonicalError, Drop, ValueError) as exc:
            raise ExperimentError(f"--resume {out}: its genesis.json does not verify ({exc})") from None
        if genesis.run != self.run_id:
            raise ExperimentError(
                f"--resume {out}: its genesis is of run {genesis.run}, but its config.toml gives run {self.run_id} (was config.toml edited?)"
            )
        done = self._finished_rounds()
        stores = [ChainStore(chain.parent.parent, genesis.run) for chain in sorted((out / "agents").glob(f"*/runs/{genesis.run}/chain.jsonl"))]
        chains = [(store, store.load_blocks()) for store in stores]
        by_id = {blk.id: blk for _, mine in chains for blk in mine}
        state, blocks = ledger.genesis_state(genesis), []
        for r in done:
            blk = by_id.get(r.get("block_hash"))
            if blk is None or r.get("round") != len(blocks) + 1:
                break
            try:
                state, _ = ledger.process_block(genesis, state, blk)
            except ledger.InvalidBlock:
                break
            blocks.append(blk)
        if len(blocks) >= genesis.rounds:
            raise ExperimentError(f"--resume {out}: the run finished all its {genesis.rounds} rounds; nothing to continue")
        ids = [b.id for b in blocks]
        for store, mine in chains:
            keep = 0
            while keep < min(len(mine), len(ids)) and mine[keep].id == ids[keep]:
                keep += 1
            if keep != len(mine):
                store.rewrite(mine[:keep])
        linked = self._blobs_back_to_agents()
        self.saved_genesis = env
        self.results = [RoundResult.from_json(r) for r in done[: len(blocks)]]
        self.settled = blocks  # (the observer's, from setup on)
        self.resumed_at.append(len(blocks))
        self._rewrite_rounds_log()
        self.log(f"resuming run {genesis.run} after round {len(blocks)} of {genesis.rounds} ({linked} model files linked back)")
        return len(blocks)

    def _finished_rounds(self) -> list[dict]:
        earlier = {}
        try:
            earlier = json.loads((self.out / "summary.json").read_text())
        except (OSError, ValueError):
            pass
        if isinstance(earlier, dict):
            self.started_utc = earlier.get("started_utc", self.started_utc)
            self.earlier_wall_s = float(earlier.get("wall_s", 0) or 0)
            self.resumed_at = list(earlier.get("resumed_at", []))
        rounds = []
        try:
            for line in (self.out / ROUNDS_LOG).read_text().splitlines():
                try:
                    rounds.append(json.loads(line))
                except ValueError:
                    break  # a torn last line: that round is run again
        except FileNotFoundError:
            rounds = list(earlier.get("rounds", [])) if isinstance(earlier, dict) else []
        return [r for r in rounds if isinstance(r, dict)]

    def _blobs_back_to_agents(self) -> int:
        """Hard-link OUT/blobs (where ``close`` gathered the agents' models) into each
        agent's store again: the next round starts from the last G_j."""
        src = sorted((self.out / "blobs").glob("*/*.safetensors"))
        n = 0
        for dev in self.cfg.device_ids():
            for f in src:
                dest = bl.blob_path(self.out / "agents" / dev / "blobs", f.stem)
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.link(f, dest)
                    n += 1
        return n

    def _rewrite_rounds_log(self) -> None:
        """OUT/rounds.jsonl: the rounds a resumed run keeps, and no others."""
        tmp = self.out / f".{ROUNDS_LOG}.tmp"
        tmp.write_text("".join(json.dumps(r.as_json()) + "\n" for r in self.results))
        os.replace(tmp, self.out / ROUNDS_LOG)

    def _log_round(self, res: RoundResult) -> None:
        with open(self.out / ROUNDS_LOG, "a") as f:
            f.write(json.dumps(res.as_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # -- the run --

    def watch(self, progress=lambda r: None) -> None:
        cfg = self.cfg
        obs = self.observer
        assert obs is not None and self.genesis is not None
        devices = set(self.genesis.device_ids)
        honest = devices - set(self.malicious)
        round_budget = sum(cfg.deadlines_s) + 120
        t_prev = time.monotonic()
        for j in range(len(self.results) + 1, cfg.rounds + 1):
            end = time.monotonic() + round_budget
            while True:
                obs.pump(0.25)
                reported = set(obs.reports.get(j, {}))
                if not (honest & reported) and honest <= obs.offline:
                    raise ExperimentError(f"round {j}: every honest device went offline; see {self.out / 'agents'}")
                # done when every device has reported, or went offline without doing so
                if not (devices - reported - obs.offline):
                    break
                if time.monotonic() > end:
                    if reported & honest:
                        break
                    raise ExperimentError(f"round {j} did not finish within {round_budget}s; see {self.out / 'agents'}")
            now = time.monotonic()
            res = self._round_result(j, honest, now - t_prev)
            t_prev = now
            self.results.append(res)
            self._log_round(res)
            if self.metrics is not None:
                self.metrics.round_done(self.run_id, res, set(self.malicious))
            progress(res)
        if self.metrics is not None:
            self.metrics.done(self.run_id)
        time.sleep(0.5)
        obs.pump(0.5)

    def _round_result(self, j: int, honest: set[str], seconds: float) -> RoundResult:
        """Round ``j`` from the honest devices' reports and the block they name. The block is
        normally the one the operator saw published; if it missed it (a compact block whose
        tx it never got, a message the broker dropped for it), it takes the block from a local
        agent's chain file (an agent appends a block before it reports it; the block is
        verified with the rest of the chain in :meth:`summary`), or else waits up to
        ``MISSING_BLOCK_WAIT_S`` for it to arrive."""
        obs = self.observer
        assert obs is not None and self.genesis is not None
        end = time.monotonic() + MISSING_BLOCK_WAIT_S
        looked: set[str] = set()  # heads already looked for on disk
        while True:
            res = obs.round_result(j, honest, seconds)
            if res is not None:
                return res
            heads = {r["head"] for d, r in obs.reports.get(j, {}).items() if d in honest}
            if not heads:
                raise ExperimentError(f"round {j}: no honest device reported it; see {self.out / 'agents'}")
            for head in heads - set(obs.blocks) - looked:
                looked.add(head)
                blk = self._block_on_disk(head)
                if blk is not None:
                    obs.blocks[head] = blk
            if time.monotonic() > end:
                raise ExperimentError(
                    f"round {j}: the devices report block {sorted(heads)[0][:12]}, which the operator never received "
                    f"(dropped: {dict(obs.drops) or 'none'}); see {self.out / 'agents'}"
                )
            obs.pump(0.5)

    def _block_on_disk(self, block_id: str):
        if self.agents is None or self.genesis is None:
            return None
        for chain in sorted((self.out / "agents").glob(f"*/runs/{self.genesis.run}/chain.jsonl")):
            for line in chain.read_bytes().split(b"\n"):  # read only: the agent may be appending
                try:
                    blk = from_json(parse(line))
                except (CanonicalError, Drop):
                    continue
                if blk.id == block_id:
                    return blk
        return None

    def summary(self) -> dict:
        assert self.genesis is not None and self.observer is not None
        obs = self.observer
        honest = set(self.genesis.device_ids) - set(self.malicious)
        state = obs.replay(len(self.results), honest)
        final = obs.reports.get(len(self.results), {})
        return {
            "run_id": self.run_id,
            "protocol": self.cfg.protocol,
            "devices": len(self.genesis.device_ids),
            "roles": list(self.cfg.roles),
            "malicious": self.malicious,
            "attack": self.cfg.attack,
            "attacks": {d: self.cfg.attack_of(d) for d in self.malicious},
            "config": {
                "dataset": self.cfg.dataset,
                "model": self.cfg.model,
                "partition": self.cfg.partition,
                "samples_per_device": self.spec["samples_per_device"],
                "test_per_device": self.spec["test_per_device"],
                "local_epochs": self.cfg.local_epochs,
                "batch_size": self.cfg.batch_size,
                "lr": self.cfg.lr,
                "vh": self.cfg.vh,
                "vote_ref": self.cfg.vote_ref,
                "loss_guard": self.cfg.loss_guard,
                "aggregator": self.cfg.aggregator,
                "knockout": self.cfg.knockout,
                "seed": self.cfg.seed,
                "broker": self.broker_kind if self.broker else self.broker_url,
            },
            "rounds": [r.as_json() for r in self.results],
            "heads": {d: obs.reports.get(len(self.results), {}).get(d, {}).get("head") for d in self.genesis.device_ids},
            "stakes": {d: state.stake(d) for d in self.genesis.device_ids},
            "reported_stakes": {d: r["stake"] for d, r in sorted(final.items())},
            "blacklist": sorted(state.blacklist),
            "slashed": sorted(state.slashed),  # equivocators, by evidence in a block
            "dropped_messages": {d: r.get("drops", {}) for d, r in sorted(final.items()) if r.get("drops")},
            # what the operator itself dropped (malformed, forged, ...), by reason
            "operator_drops": dict(sorted(obs.drops.items())),
            # seconds from starting the agents (or waiting for them) until all had said hello
            "agents_ready_s": round(self.agents_ready_s, 1),
            "started_utc": self.started_utc,
            "wall_s": round(self.earlier_wall_s + time.time() - self.started, 1),  # every part of a resumed run
            "resumed_at": self.resumed_at,  # after which rounds it was resumed (bfl run --resume)
            "final_model": self._final_model(),
            "data_files": data_files(self.cfg),
            "versions": versions(self.broker_kind if self.broker else None),
        }

    def _final_model(self) -> dict | None:
        """G_j of the last finished round: its hash, and where ``bfl run`` keeps its blob
        (local agents' stores are merged into OUT/blobs when the run closes)."""
        if not self.results or self.genesis is None or self.observer is None:
            return None
        honest = set(self.genesis.device_ids) - set(self.malicious)
        blocks = self.observer.chain(len(self.results), honest)
        if not blocks:
            return None
        h = blocks[-1].body["global_model"]
        where = {"path": str(bl.blob_path("blobs", h))} if not self.cfg.external else {}  # (in OUT)
        return {"round": len(blocks), "hash": h, "arch": self.cfg.model, **where}

    def csv_rows(self, experiment: str, setting: str, repeat: int) -> tuple[list[dict], list[dict]]:
        """Per-round rows (accuracy, decisions, votes) and per-device stakes, from the chain."""
        assert self.genesis is not None and self.observer is not None
        honest = set(self.genesis.device_ids) - set(self.malicious)
        ident = {"experiment": experiment, "setting": setting, "protocol": self.cfg.protocol,
                 "malicious": len(self.malicious), "repeat": repeat, "run_id": self.run_id}  # fmt: skip
        blocks = self.observer.chain(len(self.results), honest)
        return chain_rows(self.genesis, blocks, [r.as_json() for r in self.results], self.malicious, ident)

    def write_summary(self, stopped: str | None = None) -> Path:
        """OUT/summary.json; ``stopped``: why the run ended before its last round."""
        data = self.summary()
        data["rounds_requested"] = self.cfg.rounds
        data["stopped"] = stopped
        if stopped:
            data["continue_with"] = f"bfl run --resume {self.out}"
        path = self.out / "summary.json"
        tmp = path.with_name(".summary.json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)  # never a half-written summary
        return path

    def close(self, stopped: bool = False) -> None:
        """Stop everything this run started. ``stopped``: the run ends before its last round
        (Ctrl-C, an error), so its agents are stopped now rather than let finish it."""
        if self.mqtt is not None and self.genesis is not None:
            # clear retained run state so later agents on this broker do not join a finished run
            for dev in self.malicious:
                self.mqtt.publish(topic(self.run_id, "cmd", dev), b"", retain=True)
            self.mqtt.publish(topic(self.run_id, "genesis"), b"", retain=True, wait=5)
        if self.agents is not None:
            self.agents.stop(grace=0 if stopped else 20)
            kept, removed = self.agents.consolidate_blobs()
            if removed:
                self.log(f"blobs: {kept} distinct of {removed} agent copies kept in {self.out / 'blobs'}")
        if self.mqtt is not None:
            if self.agents is not None:
                for dev in self.agents.procs:
                    for kind in ("hello", "status"):
                        self.mqtt.publish(device_topic(dev, kind), b"", retain=True)
            self.mqtt.close()
        if self.broker is not None:
            self.broker.stop()
        if self.targets_file is not None:
            self.targets_file.unlink(missing_ok=True)
        if self.metrics is not None:
            self.metrics.close()
