"""Prometheus metrics of one device (prometheus-client), served on a port of its own.

The protocol (``protocol/node.py``) does no I/O and knows nothing of Prometheus: the agent
shell feeds this module what it already sees -- the actions the Node returns (rounds
started, blocks appended or rolled back, messages published or dropped), the messages the
transport moves and how long each task took. Nothing here reads the Node's internals.

Every series carries ``device``; series that belong to one run also carry ``run``. Names
follow the Prometheus conventions: a ``bfl_`` prefix, ``_total`` on counters, base units in
the suffix (``_seconds``, ``_bytes``, ``_ratio``). ``METRICS`` below is the list the Grafana
dashboards may use (tests/test_dashboards.py checks every panel against it).
"""

from __future__ import annotations

import errno
import json
import socket
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from .protocol import round as nd
from .protocol.messages import DROP_REASONS, RUN_KINDS, Drop, parse_topic

disable_created_metrics()  # no *_created series: they double every counter for no use here

ROLES = ("worker", "validator", "miner", "idle")
PHASES = ("train", "validate", "mine", "verify_block", "evaluate_global", "round")
# message kinds a label may take (anything else is "other": labels stay bounded)
KINDS = frozenset(RUN_KINDS + ("genesis", "cmd", "hello", "status"))
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)

#: Every metric family an agent exports (without the _bucket/_sum/_count series suffixes).
AGENT_METRICS = (
    "bfl_agent_info",
    "bfl_round",
    "bfl_role",
    "bfl_stake",
    "bfl_chain_height",
    "bfl_global_accuracy_ratio",
    "bfl_attack_info",
    "bfl_blacklisted",
    "bfl_votes_total",
    "bfl_rewards_total",
    "bfl_worker_updates_total",
    "bfl_blocks_appended_total",
    "bfl_blocks_proposed_total",
    "bfl_blocks_won_total",
    "bfl_phase_duration_seconds",
    "bfl_mqtt_messages_received_total",
    "bfl_mqtt_messages_sent_total",
    "bfl_mqtt_received_bytes_total",
    "bfl_mqtt_sent_bytes_total",
    "bfl_messages_dropped_total",
    "bfl_mqtt_connected",
    "bfl_mqtt_connections_total",
)


class MetricsError(Exception):
    """The metrics server could not start (one line, for the CLI)."""


def topic_kind(topic: str) -> str:
    """The message kind of a topic, for a bounded ``kind`` label."""
    try:
        kind = parse_topic(topic).kind
    except Drop:
        return "other"
    return kind if kind in KINDS else "other"


def serve(registry: CollectorRegistry, addr: str, port: int):
    """Start the HTTP server for ``registry``; a clear MetricsError when the port is taken."""
    try:
        return start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise MetricsError(f"cannot serve metrics on {addr}:{port} ({exc.strerror or exc})") from None


def stop_serving(server) -> None:
    """Stop a server returned by ``serve`` and release its port."""
    httpd, _thread = server
    httpd.shutdown()
    httpd.server_close()


def free_ports(start: int, count: int, host: str = "127.0.0.1", limit: int = 2000) -> list[int]:
    """``count`` TCP ports free on ``host``, the first ones from ``start`` on."""
    out: list[int] = []
    port = start
    while len(out) < count and port < min(start + limit, 65536):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
                out.append(port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:  # a bad address, not a busy port: say so at once
                    raise MetricsError(f"cannot bind metrics to {host}:{port} ({exc.strerror or exc})") from None
        port += 1
    if len(out) < count:
        raise MetricsError(f"no {count} free ports from {start} on")
    return out


class AgentMetrics:
    """The metrics of one device. Call from the agent's protocol thread; the transport
    counters (``sent``/``received``/``connection``) may be called from paho's thread."""

    def __init__(self, device: str, caps: list[str], registry: CollectorRegistry | None = None):
        from importlib.metadata import PackageNotFoundError, version

        self.device = device
        self.registry = registry or CollectorRegistry()
        r = self.registry
        d, dr = ["device"], ["device", "run"]
        try:
            ver = version("posbfl-testbed")
        except PackageNotFoundError:
            ver = "unknown"
        Gauge("bfl_agent_info", "This device: capabilities and software version.", d + ["caps", "version"], registry=r).labels(
            device, ",".join(caps), ver
        ).set(1)
        self.round = Gauge("bfl_round", "The round j this device works on (the last one once the run is done).", dr, registry=r)
        self.role = Gauge("bfl_role", "1 for this device's role in the current round, 0 for the others.", dr + ["role"], registry=r)
        self.stake = Gauge("bfl_stake", "This device's stake on its chain (Eq. 1-3 rewards so far).", dr, registry=r)
        self.height = Gauge("bfl_chain_height", "Blocks on this device's chain.", dr, registry=r)
        self.accuracy = Gauge(
            "bfl_global_accuracy_ratio", "Accuracy of the latest global model G_j on this device's test split.", dr, registry=r
        )
        self.attack = Gauge(
            "bfl_attack_info", "1 with the attack the operator injected into this device ('none': honest).", dr + ["attack"], registry=r
        )
        self.blacklisted = Gauge("bfl_blacklisted", "1 once the chain has knocked this device out.", dr, registry=r)
        self.votes = Counter("bfl_votes", "Votes this device cast as a validator, by outcome.", d + ["outcome"], registry=r)
        self.rewards = Counter("bfl_rewards", "Stake this device earned, by the role that earned it.", d + ["role"], registry=r)
        self.updates = Counter(
            "bfl_worker_updates", "This device's local updates as they ended in a block (accepted/rejected).", d + ["outcome"], registry=r
        )
        self.appended = Counter("bfl_blocks_appended", "Blocks appended to this device's chain.", d, registry=r)
        self.proposed = Counter("bfl_blocks_proposed", "Candidate blocks this device mined.", d, registry=r)
        self.won = Counter("bfl_blocks_won", "Blocks of this device that won the fork choice.", d, registry=r)
        self.phase = Histogram(
            "bfl_phase_duration_seconds",
            "Duration of this device's work per phase (train, validate, mine, verify_block, evaluate_global) and of whole rounds.",
            d + ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.msgs_in = Counter("bfl_mqtt_messages_received", "MQTT messages received, by kind.", d + ["kind"], registry=r)
        self.msgs_out = Counter("bfl_mqtt_messages_sent", "MQTT messages published, by kind.", d + ["kind"], registry=r)
        self.bytes_in = Counter("bfl_mqtt_received_bytes", "MQTT payload bytes received, by kind.", d + ["kind"], registry=r)
        self.bytes_out = Counter("bfl_mqtt_sent_bytes", "MQTT payload bytes published, by kind.", d + ["kind"], registry=r)
        self.dropped = Counter(
            "bfl_messages_dropped", "Messages this device rejected, by reason (bad signature, stale round, ...).", d + ["reason"], registry=r
        )
        self.connected = Gauge("bfl_mqtt_connected", "1 while connected to the MQTT broker.", d, registry=r)
        self.connections = Counter("bfl_mqtt_connections", "Successful (re)connections to the broker.", d, registry=r)
        self.connected.labels(device).set(0)
        for outcome in ("positive", "negative"):
            self.votes.labels(device, outcome)
        for outcome in ("accepted", "rejected"):
            self.updates.labels(device, outcome)
        for role in ("worker", "validator", "miner"):
            self.rewards.labels(device, role)
        self.appended.labels(device)
        self.proposed.labels(device)
        self.won.labels(device)
        self.connections.labels(device)
        for reason in DROP_REASONS:  # every reason exists from the start, at 0
            self.dropped.labels(device, reason)
        for kind in ("wtx", "vtx", "block", "blob", "head", "report"):
            for c in (self.msgs_in, self.msgs_out, self.bytes_in, self.bytes_out):
                c.labels(device, kind)
        self._run: str | None = None
        self._seen_drops: dict[tuple[str, str], int] = {}
        self._round_no = 0
        self._round_started: dict[int, float] = {}
        self._role_of_round: dict[int, str] = {}
        self._stake_now = 0
        self._attack: str | None = None

    # -- transport (any thread) --

    def sent(self, topic: str, nbytes: int) -> None:
        kind = topic_kind(topic)
        self.msgs_out.labels(self.device, kind).inc()
        self.bytes_out.labels(self.device, kind).inc(nbytes)

    def received(self, topic: str, nbytes: int) -> None:
        kind = topic_kind(topic)
        self.msgs_in.labels(self.device, kind).inc()
        self.bytes_in.labels(self.device, kind).inc(nbytes)

    def connection(self, up: bool) -> None:
        self.connected.labels(self.device).set(1 if up else 0)
        if up:
            self.connections.labels(self.device).inc()

    # -- protocol thread --

    def joined(self, run: str) -> None:
        """A new run: forget the last run's per-run series."""
        for g in (self.round, self.role, self.stake, self.height, self.accuracy, self.attack, self.blacklisted):
            g.clear()
        self._run = run
        self._seen_drops = {k: v for k, v in self._seen_drops.items() if k[0] != "node"}  # a new Node counts from 0
        self._round_no = 0
        self._round_started.clear()
        self._role_of_round.clear()
        self._stake_now = 0
        self._attack = None

    def drops(self, counts: Mapping[str, int], source: str = "agent") -> None:
        """Bring ``bfl_messages_dropped_total`` up to date with one source's running counts
        (the shell's own Counter, or the Node's, which starts over with every run)."""
        for reason, n in counts.items():
            key = (source, reason)
            delta = n - self._seen_drops.get(key, 0)
            if delta > 0:
                self.dropped.labels(self.device, reason).inc(delta)
            self._seen_drops[key] = n

    def action(self, a, now: float | None = None) -> None:
        """Follow the Node through the actions it returns (the shell calls this for each);
        nothing here reads the Node's internals."""
        if isinstance(a, nd.Publish):
            self.published(a.topic, a.payload)
        elif isinstance(a, nd.Dropped):
            self.dropped.labels(self.device, a.reason).inc(a.count)
        elif isinstance(a, nd.RoundStarted):
            self.round_started(a.round, a.role, now)
        elif isinstance(a, nd.CommitBlock):
            self.committed(a.block, a.state, now)
        elif isinstance(a, nd.Rollback):
            self._chain_state(a.state)
            self._stake_now = a.state.stake(self.device)
        elif isinstance(a, nd.Finished):
            self._set_role("idle")

    def round_started(self, j: int, role: str, now: float | None = None) -> None:
        if self._run is None:
            return
        self._round_no = j
        self._round_started[j] = time.monotonic() if now is None else now
        self._role_of_round[j] = role
        self._set_role(role)
        self.round.labels(self.device, self._run).set(j)

    def _set_role(self, role: str) -> None:
        if self._run is not None:
            for name in ROLES:
                self.role.labels(self.device, self._run, name).set(1 if name == role else 0)

    def _chain_state(self, state) -> None:
        if self._run is not None:
            dev, run = self.device, self._run
            self.stake.labels(dev, run).set(state.stake(dev))
            self.height.labels(dev, run).set(state.height)
            self.blacklisted.labels(dev, run).set(1 if dev in state.blacklist else 0)

    def attack_set(self, attack: dict | None) -> None:
        """The operator's fault injection for this device ('none': honest)."""
        name = (attack or {}).get("name") or "none"
        if self._run is not None and name != self._attack:
            self.attack.clear()
            self.attack.labels(self.device, self._run, name).set(1)
            self._attack = name

    def published(self, topic: str, payload: bytes) -> None:
        """Our own protocol messages: votes cast and blocks proposed."""
        kind = topic_kind(topic)
        if kind == "vtx":
            try:
                votes = json.loads(payload)["body"]["votes"]
            except (ValueError, KeyError, TypeError):
                return
            for v in votes:
                self.votes.labels(self.device, "positive" if v.get("positive") else "negative").inc()
        elif kind == "block":
            self.proposed.labels(self.device).inc()

    def committed(self, block, state, now: float | None = None) -> None:
        """A block was appended: rewards, own update's fate, round duration."""
        now = time.monotonic() if now is None else now
        dev = self.device
        h = state.height
        self.appended.labels(dev).inc()
        if block.sender == dev:
            self.won.labels(dev).inc()
        body = block.body
        if dev in body.get("accepted", ()):
            self.updates.labels(dev, "accepted").inc()
        elif dev in body.get("rejected", ()):
            self.updates.labels(dev, "rejected").inc()
        self._chain_state(state)
        stake = state.stake(dev)
        gained = stake - self._stake_now
        self._stake_now = stake
        role = self._role_of_round.get(h, "idle")
        if gained > 0 and role in ("worker", "validator", "miner"):
            self.rewards.labels(dev, role).inc(gained)
        started = self._round_started.pop(h, None)
        if started is not None:
            self.phase.labels(dev, "round").observe(max(0.0, now - started))

    def task_time(self, phase: str, seconds: float) -> None:
        self.phase.labels(self.device, phase).observe(seconds)

    def global_accuracy(self, acc_bp: int) -> None:
        if self._run is not None:
            self.accuracy.labels(self.device, self._run).set(acc_bp / 10000)
