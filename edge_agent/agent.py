"""The device program: joins runs announced by the operator and drives a Node over MQTT.

One protocol thread owns the Node; paho's network thread only queues messages; one task
thread runs training / evaluation / aggregation and queues the results back.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import byzantine
from .compute import ComputeError, SharedCache, Trainer, ensure_service
from .metrics import stop_serving, topic_kind
from .ml.blobs import BlobStore
from .protocol import node as nd
from .protocol.crypto import KeyPair, sha256_hex
from .protocol.genesis import CAPABILITIES, Genesis, load_genesis
from .protocol.messages import (
    PREFIX,
    Drop,
    check_signature,
    decode,
    device_topic,
    parse_topic,
    sign,
    topic,
)
from .runtime import Runtime
from .store import BlobRetention, ChainStore
from .transport import Incoming, Mqtt

log = logging.getLogger("bfl.agent")

TICK_S = 0.25
# With --exit-after-run a finished device keeps serving blocks and blobs until every peer
# claims the last block, or this long: a peer that restarted late can still catch up.
FINISH_LINGER_S = 30.0
_WAKE = object()  # put in the MQTT inbox when a task finished: the main loop sleeps on the inbox


def default_capabilities(trainer: str | None = None) -> list[str]:
    """A device trains when it is given a trainer service, or when torch is installed so it
    can start the host's; without either it validates and mines only."""
    import importlib.util

    caps = ["validate", "mine"]
    if trainer or importlib.util.find_spec("torch") is not None:
        caps.insert(0, "train")
    return caps


class Agent:
    def __init__(
        self,
        device_id: str,
        key: KeyPair,
        broker_url: str,
        workdir: str | Path,
        *,
        operator_pubkey: str | None,
        data_dir: str | Path | None = None,
        run: str | None = None,
        exit_after_run: bool = False,
        threads: int = 1,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        capabilities: list[str] | None = None,
        metrics: tuple[str, int] | None = None,
        metrics_linger: float = 0.0,
        keep_rounds: int = 0,
        trainer: str | None = None,
        train_device: str = "auto",
        shared_cache: str | Path | None = None,
        blob_group: str | None = None,
    ):
        self.me = device_id
        self.key = key
        self.workdir = Path(workdir)
        self.operator = operator_pubkey
        self.data_dir = data_dir
        self.want_run = run
        self.exit_after_run = exit_after_run
        self.threads = threads
        self.caps = capabilities or default_capabilities(trainer)
        self.trainer = Trainer(trainer, train_device)
        assert all(c in CAPABILITIES for c in self.caps)
        self.shared = SharedCache(shared_cache) if shared_cache else None
        if self.shared is not None:
            from .ml.data import set_array_cache

            set_array_cache(self.shared.root / "datasets")
        if blob_group and self.shared is None:
            raise ValueError("--blob-group needs --shared-cache (where the group's blobs are put)")
        self.blob_group = blob_group
        self.blobs = BlobStore(self.workdir / "blobs", shared=self.shared.blobs if self.shared else None)
        offline = self._signed_status("offline")
        self.metrics = None
        self.metrics_server = None
        self.metrics_linger = metrics_linger
        self.keep_rounds = keep_rounds
        self.retention: BlobRetention | None = None
        if metrics is not None:
            from .metrics import AgentMetrics, serve

            self.metrics = AgentMetrics(device_id, self.caps)
            self.metrics_server = serve(self.metrics.registry, *metrics)
            log.info("%s: Prometheus metrics at http://%s:%d/metrics", device_id, *metrics)
        self.mqtt = Mqtt(
            broker_url,
            client_id=f"bfl-{device_id}",
            username=username or device_id,
            password=password,
            ca_file=ca_file,
            will=(device_topic(device_id, "status"), offline),
            observer=self.metrics,
        )
        self.events: queue.Queue = queue.Queue()
        self.tasks = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{device_id}-task")
        self.node: nd.Node | None = None
        self.runtime: Runtime | None = None
        self.store: ChainStore | None = None
        self.pending_cmds: dict[str, dict] = {}
        self.attack: dict | None = None
        self.drops: Counter[str] = Counter()
        self.stopped = False
        self.stop_requested = False
        self.marks: dict[int, dict[str, int]] = {}  # round -> step -> time (see _mark)
        self.rx_seen = (0, 0)
        self.cpu_seen: dict[str, float] = {}
        self.node_ms = 0.0  # in the protocol core (rules, signatures, encoding) since the last report
        self.leave_at: float | None = None  # set when the run finished (--exit-after-run)
        self.final_reported = False

    # -- announcements --

    def _signed_status(self, state: str) -> bytes:
        body = {"run": "devices", "kind": "status", "round": 0, "sender": self.me, "state": state}
        return sign(self.key, body).payload()

    def _hello(self) -> bytes:
        body = {
            "run": "devices",
            "kind": "hello",
            "round": 0,
            "sender": self.me,
            "pubkey": self.key.public_hex,
            "caps": self.caps,
            "time": int(time.time()),
        }
        if self.operator:  # the operator key it trusts: an operator with another key learns so at once
            body["operator"] = self.operator
        return sign(self.key, body).payload()

    # -- main loop --

    def run_forever(self) -> None:
        if "train" in self.caps:
            # the host's trainer service is up before we announce, so that round 1's time
            # measures training and not the service starting
            try:
                ensure_service(self.trainer.path)
            except ComputeError as exc:
                log.error("%s: %s", self.me, exc)
        self.mqtt.subscribe(f"{PREFIX}/+/genesis", f"{PREFIX}/+/cmd/{self.me}")
        online = [(device_topic(self.me, "status"), self._signed_status("online")), (device_topic(self.me, "hello"), self._hello())]
        self.mqtt.reannounce = online  # after a reconnection too: the broker said "offline" for us meanwhile
        self.mqtt.connect()
        for t, payload in online:
            self.mqtt.publish(t, payload, retain=True)
        log.info("%s: connected to %s, capabilities %s", self.me, self.mqtt.url, ",".join(self.caps))
        try:
            while not self.stopped:
                self._step()
        finally:
            self.tasks.shutdown(wait=False, cancel_futures=True)
            if self.exit_after_run or self.stop_requested:
                self.mqtt.publish(device_topic(self.me, "status"), self._signed_status("offline"), retain=True, wait=5)
            self.mqtt.close()
            if self.metrics_server is not None:
                if self.exit_after_run and self.metrics_linger > 0:
                    time.sleep(self.metrics_linger)  # let Prometheus scrape the final state
                stop_serving(self.metrics_server)

    def stop(self) -> None:
        """Leave cleanly (SIGTERM): announce 'offline' and disconnect; the chain is on disk."""
        self.stop_requested = True
        self.stopped = True

    def _step(self) -> None:
        deadline = time.monotonic() + TICK_S
        while True:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                item = self.mqtt.inbox.get(timeout=timeout)  # a task's result also wakes us (_WAKE)
                if item is not _WAKE:
                    self._on_incoming(item)
            except queue.Empty:
                pass
            while True:
                try:
                    ev = self.events.get_nowait()
                except queue.Empty:
                    break
                if self.node is not None:
                    self._execute(self._core(self.node.handle, ev))
                    if isinstance(ev, nd.GlobalEvaluated) and ev.height >= self.node.genesis.rounds:
                        self.final_reported = True
            if self._may_leave():
                self.mqtt.flush(10)  # the last report leaves before we do
                self.stopped = True
            if self.stopped:
                return
        if self.node is not None:
            if self.blob_group:
                self._blobs_from_host()
            self._execute(self._core(self.node.tick))
        if self.metrics is not None:
            self.metrics.drops(self.drops, source="agent")

    def _blobs_from_host(self) -> None:
        """With a shared blob subscription the broker hands each blob to one agent of this
        host, which puts it in the shared store: take from there the ones our node wants."""
        for h in sorted(self.node.missing_blobs()):
            data = self.shared.arrived.get(h, verify=False)  # (the core checks its hash)
            if data is not None:
                self._execute(self._core(self.node.handle, nd.HostBlob(h, data)))

    def _core(self, step, *args) -> list:
        t0 = time.thread_time()
        try:
            return step(*args, time.monotonic())
        finally:
            self.node_ms += (time.thread_time() - t0) * 1000  # CPU time of the protocol core

    def _on_incoming(self, msg: Incoming) -> None:
        try:
            tp = parse_topic(msg.topic)
            if tp.kind == "genesis":
                self._on_genesis(msg)
            elif tp.kind == "cmd":
                self._on_cmd(msg)
            elif self.node is not None and tp.run == self.node.run:
                if self.blob_group and tp.kind == "blob" and sha256_hex(msg.payload) == tp.extra:
                    if len(msg.payload) <= self.node.max_blob_bytes:
                        self.shared.arrived.put(msg.payload, tp.extra)  # for the other agents of this host
                self._execute(self._core(self.node.handle, nd.Received(msg.topic, msg.payload)))
            else:
                raise Drop("wrong_run", msg.topic)
        except Drop as exc:
            self.drops[exc.reason] += 1
            log.info("%s: dropped %s (%s)", self.me, msg.topic, exc)
        except Exception as exc:  # never let one message take the device down
            self.drops["internal_error"] += 1
            log.exception("%s: error handling %s: %s", self.me, msg.topic, exc)

    # -- joining a run --

    def _on_genesis(self, msg: Incoming) -> None:
        if not msg.payload:
            return  # a cleared retained genesis
        env = decode(msg.payload)
        genesis = load_genesis(env, self.operator)
        if self.want_run and genesis.run != self.want_run:
            raise Drop("wrong_run", genesis.run)
        if self.node is not None:
            if self.node.run == genesis.run:
                return
            if not self.node.finished:
                raise Drop("busy", f"already in run {self.node.run}")
        if genesis.pubkey(self.me) != self.key.public_hex:
            log.info("%s: not admitted to run %s", self.me, genesis.run)
            return
        self._join(genesis)

    def _join(self, genesis: Genesis) -> None:
        run = genesis.run
        # subscribe first: what peers publish while we load data is queued, not lost
        self.mqtt.subscribe(
            *(f"{PREFIX}/{run}/{k}/#" for k in ("wtx", "vtx", "block", "sync", "head", "evidence")),
            # blobs: to one agent per host when co-located agents share a store (--blob-group)
            f"$share/{self.blob_group}/{PREFIX}/{run}/blob/#" if self.blob_group else f"{PREFIX}/{run}/blob/#",
            f"{PREFIX}/{run}/chain/+/{self.me}",  # pull answers: only those addressed to us
        )
        self.store = ChainStore(self.workdir / "runs", genesis.run)
        resumed = self.store.load_genesis() is not None  # joined this run before: a restart
        self.store.save_genesis(genesis.env)
        blocks = self.store.load_blocks()
        self.runtime = Runtime(genesis, self.me, self.blobs, self.data_dir, self.threads, self.trainer, self.shared)
        self.runtime.attack = self.attack
        self.runtime.ensure_initial_model()
        _ = self.runtime.data  # load the shard now: a missing dataset fails at join, loudly
        try:
            self.node = nd.Node(self.me, self.key, genesis, blocks, have_blob=self.blobs.has, signed=self.store.load_signed(), resumed=resumed)
        except Exception as exc:  # a corrupt local chain: start over from the genesis
            log.error("%s: local chain unusable (%s); starting from genesis", self.me, exc)
            self.store.rewrite([])
            self.node = nd.Node(self.me, self.key, genesis, [], have_blob=self.blobs.has)
            blocks = []
        self.retention = BlobRetention(self.keep_rounds, genesis.init_model, [b.body for b in blocks])
        if self.metrics is not None:
            self.metrics.joined(run)
            self.metrics.attack_set(self.attack)
        cmd = self.pending_cmds.pop(genesis.run, None)
        if cmd:
            self._set_attack(cmd.get("attack"))
        log.info(
            "%s: joined run %s at height %d (%d devices, roles %s)",
            self.me,
            run,
            self.node.state.height,
            len(genesis.devices),
            genesis.roles,
        )
        self._execute(self.node.start(time.monotonic()))

    def _on_cmd(self, msg: Incoming) -> None:
        if not msg.payload:
            return
        env = decode(msg.payload)
        if self.operator is None:
            raise Drop("unknown_operator", "no operator key configured")
        check_signature(env, self.operator)
        if env.body.get("target") != self.me:
            raise Drop("topic_mismatch", "command for another device")
        run = env.body["run"]
        if self.node is not None and self.node.run == run:
            self._set_attack(env.body.get("attack"))
        else:
            self.pending_cmds[run] = env.body
        log.warning("%s: operator command for run %s: attack=%s", self.me, run, env.body.get("attack"))
        ack = sign(self.key, {"run": run, "kind": "ack", "round": 0, "sender": self.me, "cmd": env.id})
        self.mqtt.publish(topic(run, "ack", self.me), ack.payload())

    def _set_attack(self, attack) -> None:
        """The operator's fault injection lives here, in the shell, not in the protocol core:
        model attacks change what the runtime trains, protocol attacks (byzantine.py) rewrite
        the node's outgoing actions."""
        self.attack = attack if isinstance(attack, dict) else None
        if self.runtime is not None:
            self.runtime.attack = self.attack
        if self.metrics is not None:
            self.metrics.attack_set(self.attack)

    # -- actions --

    def _execute(self, actions: list) -> None:
        if self.attack and self.node is not None:
            actions = byzantine.apply(self.attack.get("name"), self.node, self.key, actions)
        for a in actions:
            self._mark(a)
            if self.metrics is not None:
                self.metrics.action(a)
            if isinstance(a, nd.Publish):
                if topic_kind(a.topic) in ("wtx", "vtx", "block"):
                    self.store.save_signed(a.payload)  # before it leaves: see ChainStore.save_signed
                self.mqtt.publish(a.topic, a.sent, retain=a.retain)
            elif isinstance(a, nd.StoreBlob):
                self.blobs.put(a.data, a.hash)  # (the core has checked the hash)
            elif isinstance(a, nd.DeleteBlob):
                self.blobs.delete(a.hash)
            elif isinstance(a, nd.Rollback):
                # (the node has already appended the blocks that follow this action in the list)
                kept = self.node.chain[: a.height]
                self.store.rewrite(kept)
                self.retention = BlobRetention(self.keep_rounds, self.node.genesis.init_model, [b.body for b in kept])
                log.warning("%s: reorganised: chain rolled back to height %d", self.me, a.height)
            elif isinstance(a, (nd.Train, nd.Evaluate, nd.Score, nd.Aggregate, nd.EvaluateGlobal)):
                fut = self.tasks.submit(self._timed, self.runtime, a)
                fut.add_done_callback(self._task_done)
            elif isinstance(a, nd.CommitBlock):
                self.store.append(a.block)
                pruned = [h for h in self.retention.committed(a.block.body) if self.blobs.delete(h)]
                if pruned:
                    log.debug("%s: deleted %d blob(s) older than %d rounds", self.me, len(pruned), self.keep_rounds)
                log.info(
                    "%s: appended block %d %s from %s (accepted %s, rejected %s)",
                    self.me,
                    a.state.height,
                    a.block.id[:12],
                    a.block.sender,
                    ",".join(a.block.body["accepted"]) or "-",
                    ",".join(a.block.body["rejected"]) or "-",
                )
            elif isinstance(a, nd.BlobRequestAnswer):
                data = self.blobs.get(a.hash)
                if data is not None:
                    self.mqtt.publish(topic(self.node.run, "blob", self.me, a.hash), data)
            elif isinstance(a, nd.Finished):
                log.info("%s: run %s finished at height %d, stake %d", self.me, self.node.run, a.state.height, a.state.stake(self.me))
                if self.exit_after_run:
                    self.leave_at = time.monotonic() + FINISH_LINGER_S
            elif not isinstance(a, (nd.Dropped, nd.RoundStarted)):  # those two: for the metrics only
                raise TypeError(f"unknown action {a!r}")

    def _timed(self, runtime: Runtime, action):
        """Run a heavy task on the task thread; its duration goes to the phase histogram."""
        t0 = time.monotonic()
        try:
            return runtime.run(action)
        finally:
            if self.metrics is not None:
                if isinstance(action, nd.Aggregate):
                    phase = "mine" if action.key == "mine" else "verify_block"
                else:
                    phase = {nd.Train: "train", nd.Evaluate: "validate", nd.Score: "validate", nd.EvaluateGlobal: "evaluate_global"}[type(action)]
                self.metrics.task_time(phase, time.monotonic() - t0)

    def _cpu_by_thread(self) -> dict[str, int]:
        """CPU ms since the last report of the whole process and of its threads by role
        (main loop, MQTT network, tasks): the benchmark's breakdown of an agent's cost."""
        import threading

        now = {"cpu_process_ms": time.process_time()}
        for t in threading.enumerate():
            role = (
                "main" if t is threading.main_thread()
                else "tasks" if t.name.startswith(f"{self.me}-task")
                else "mqtt" if t.name.startswith("paho")
                else None
            )  # fmt: skip
            if role and t.ident is not None:
                try:
                    c = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
                except (OSError, AttributeError):
                    continue
                key = f"cpu_{role}_ms"
                now[key] = now.get(key, 0.0) + c
        out = {k: int((v - self.cpu_seen.get(k, 0.0)) * 1000) for k, v in now.items()}
        self.cpu_seen = now
        return out

    def _task_done(self, fut) -> None:
        ev = fut.result()
        if ev is not None:  # (Score caches and returns nothing)
            self.events.put(self._with_timings(ev))  # task results first, before queued messages
            self.mqtt.inbox.put(_WAKE)

    def _mark(self, a) -> None:
        """When this device entered each step of a round (ms since the epoch, for the round
        report): the benchmark puts the round's critical path together from them."""
        now = int(time.time() * 1000)
        if isinstance(a, nd.RoundStarted):
            self.marks.setdefault(a.round, {})["t_start_ms"] = now
        elif isinstance(a, nd.Publish) and self.node is not None and self.node.ctx is not None:
            kind = topic_kind(a.topic)
            if kind in ("wtx", "vtx", "block"):
                self.marks.setdefault(self.node.ctx.round, {}).setdefault(f"t_{kind}_ms", now)
        elif isinstance(a, nd.CommitBlock):
            self.marks.setdefault(a.state.height, {})["t_commit_ms"] = now

    def _with_timings(self, ev):
        if isinstance(ev, nd.GlobalEvaluated) and self.metrics is not None and ev.model_hash:
            self.metrics.global_accuracy(ev.acc_bp)
        if isinstance(ev, nd.GlobalEvaluated) and self.runtime is not None:
            timings = self.runtime.take_timings()
            timings["drops"] = sum(self.drops.values())
            timings["node_ms"], self.node_ms = int(self.node_ms), 0.0
            timings.update(self._cpu_by_thread())
            rx = (self.mqtt.rx_msgs, self.mqtt.rx_bytes)  # what the broker delivered to us since the last report
            timings["rx_msgs"], timings["rx_bytes"] = rx[0] - self.rx_seen[0], rx[1] - self.rx_seen[1]
            self.rx_seen = rx
            timings.update(self.marks.pop(ev.height, {}))
            for r in [r for r in self.marks if r < ev.height - 4]:
                del self.marks[r]
            return nd.GlobalEvaluated(ev.height, ev.model_hash, ev.acc_bp, timings)
        return ev

    def _may_leave(self) -> bool:
        """After the last block (with --exit-after-run): leave once its report is out and
        every peer claims the last block too, or FINISH_LINGER_S after finishing."""
        node = self.node
        if self.leave_at is None or node is None or not self.final_reported:
            return False
        peers = set(node.genesis.devices) - {self.me} - node.state.blacklist  # the blacklisted are not served
        return peers <= node.peers_finished or time.monotonic() >= self.leave_at
