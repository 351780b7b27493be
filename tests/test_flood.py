"""Hostile traffic against a live run (slow): a real Mosquitto, a real `bfl run --broker` with
local agents, and an attacker on the same broker that publishes at least 10 000 malformed,
oversize, replayed, forged and equivocating messages while the rounds go on.

The attacker is an MQTT client like any device (the test broker is anonymous and has no ACL,
so it may publish in any device's name) and an insider: it holds the key of one admitted
device (``INSIDER``, read from ``OUT/keys/``), whose own agent keeps running honestly. What it
sends, by class:

* malformed -- garbage, truncated copies of real messages, invalid UTF-8, floats, duplicate
  keys, lone surrogates, integers beyond I-JSON and beyond Python's 4300-digit limit, deep
  nesting, envelopes of the wrong shape, bad topics, unknown senders, blobs whose bytes do not
  match their name, garbage on another run's genesis topic, bodies of the wrong shape signed
  with the insider's key;
* oversize -- JSON over ``messages.MAX_JSON_BYTES``, large blobs that do not match their hash,
  and one blob over the agents' blob limit (64 MiB), which the broker itself refuses (its
  ``max_packet_size`` is 64 MiB: it drops the connection);
* replay -- copies of the run's own messages (captured on ``bfl/v1/<run>/#``) on their topic,
  on another kind's or another device's topic, on a blob topic;
* forged -- well-formed messages of every kind in the names of honest devices, signed with a
  key that is not theirs; a genesis of another run signed by another operator; hello/status
  announcements in the devices' names;
* equivocation -- signed with the insider's key, early in a round (round 1, or with
  ``self_evidence`` the first round the insider trains): a second worker tx (and blob),
  validator tx or block, whichever role the insider has.

The attacker follows the chain (heads and blocks it hears) to forge for the current round,
and paces itself on the agents' own ``bfl_mqtt_messages_received_total``: Mosquitto keeps at
most 1000 messages for a subscriber and drops the rest, and an agent that trains on a busy
machine reads slowly. What the broker still dropped (``$SYS/broker/publish/messages/dropped``)
is the only shortfall allowed in the counts.

What must hold: every round completes and ``bfl run`` exits 0; every honest device ends on
one head; ``bfl verify OUT`` passes; no agent crashed; each agent's
``bfl_messages_dropped_total`` (scraped from its Prometheus endpoint until it exits) counts, by
a reason of ``messages.DROP_REASONS``, at least every hostile message that reached it and
must be refused -- exactly, for the reasons honest traffic never produces; ``internal_error``
stays 0; the insider is slashed by a block carrying the evidence; and in all, each agent's
drops are at least the hostile messages that reached it (what it merely ignores -- a chain
answer to another device, a block or evidence it holds, a replayed head -- is counted too,
as ``not_for_us`` or ``duplicate``; honest traffic adds its own, so this bound is not exact).

``BFL_FLOOD_SKIP=a,b`` leaves sub-attacks out (``nested``, ``huge_int``, ``junk_head``,
``hello``, ``self_evidence``, ``huge_blob``), to see what the rest of the run does. Each of
the first five broke the code this test was written against (``bfl run`` died, agents
counted ``internal_error``, or the chain stopped); none does now.
"""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client.parser import text_string_to_metric_families

from broker import free_port
from edge_agent.protocol import ledger
from edge_agent.protocol.crypto import KeyPair, sha256_hex
from edge_agent.protocol.genesis import Genesis
from edge_agent.protocol.canonical import CanonicalError, parse
from edge_agent.protocol.messages import (
    DEFAULT_MAX_BLOB_BYTES,
    DROP_REASONS,
    MAX_JSON_BYTES,
    PREFIX,
    Drop,
    check_signature,
    decode,
    decode_block,
    device_topic,
    from_json,
    sign,
    topic,
)
from edge_agent.store import ChainStore

pytestmark = pytest.mark.slow

DEVICES, ROLES, ROUNDS = 7, "3,2,2", 64  # 3+2+2 = 7: the insider has a role in every round
# (64 rounds: once the insider is slashed a round takes well under a second here, and the
# flood must be over two rounds before the end for every agent to have taken it all in; a
# fresh-clone CI run with 20 rounds ended the run after 5 426 of the 10 000 messages, one
# here with 40 after 7 831)
INSIDER = "d06"
TARGET = 10_000  # hostile messages, at least
RATE = 600  # messages per second, about (the broker queues at most 1000 per slow subscriber)
RUN_TIMEOUT = 200  # seconds for `bfl run`; a stalled chain fails the test, it does not hang it
SYS_DROPPED = "$SYS/broker/publish/messages/dropped"
SKIP = {s for s in os.environ.get("BFL_FLOOD_SKIP", "").split(",") if s}

#: the kinds every agent subscribes to under their run (agent.Agent._join) but blob: JSON
#: messages. Report and ack only reach the operator's observer, as do hello and status; a
#: chain answer reaches only the device its topic names (bfl/v1/<run>/chain/<from>/<to>).
TX_KINDS = ("wtx", "vtx", "block", "sync", "head", "evidence")
#: reasons honest traffic never produces: the hostile messages must account for them exactly
EXACT = ("bad_topic", "unknown_sender", "hash_mismatch", "too_large", "topic_mismatch", "unknown_operator")


def bfl(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, check=False, **kw)


# ---- the agents' own count: Prometheus, scraped until each agent exits ---------------------


class Scraper(threading.Thread):
    """Scrapes every agent's /metrics twice a second; keeps each device's last answer."""

    def __init__(self, targets_dir: Path):
        super().__init__(daemon=True)
        self.targets_dir = targets_dir
        self.targets: list[str] = []
        self.last: dict[str, dict] = {}  # device -> {"drops": {reason: n}, "round": n, "height": n, "received": n}
        self.joined = threading.Event()
        self.stop = threading.Event()

    def _load_targets(self) -> None:
        for f in self.targets_dir.glob("*.json"):
            try:
                self.targets = json.loads(f.read_text())[0]["targets"][1:]  # [0] is the operator
            except (OSError, ValueError, IndexError, KeyError):
                pass

    def scrape(self, target: str) -> tuple[str, dict] | None:
        try:
            text = urllib.request.urlopen(f"http://{target}/metrics", timeout=2).read().decode()
        except OSError:
            return None
        snap: dict = {"drops": {}, "round": None, "height": 0, "received": 0}
        dev = None
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                dev = s.labels.get("device", dev)
                if s.name == "bfl_messages_dropped_total":
                    snap["drops"][s.labels["reason"]] = int(s.value)
                elif s.name == "bfl_round":
                    snap["round"] = int(s.value)
                elif s.name == "bfl_chain_height":
                    snap["height"] = int(s.value)
                elif s.name == "bfl_mqtt_messages_received_total":
                    snap["received"] += int(s.value)
        return (dev, snap) if dev else None

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.targets:
                self._load_targets()
            for t in self.targets:
                got = self.scrape(t)
                if got:
                    self.last[got[0]] = got[1]
            if len(self.last) == DEVICES and all(s["round"] is not None for s in self.last.values()):
                self.joined.set()  # every agent has joined the run (and subscribed to it)
            self.stop.wait(0.5)


# ---- the attacker -----------------------------------------------------------------------------


class Attacker(threading.Thread):
    """Publishes the flood; keeps, per message, what each agent must make of it."""

    def __init__(self, url: str, out: Path, scraper: Scraper):
        super().__init__(daemon=True)
        self.url, self.out, self.scraper = url, out, scraper
        self.rng = random.Random(20240601)
        self.evil = KeyPair.generate()  # signs the forgeries: admitted nowhere
        self.incoming: queue.Queue = queue.Queue()
        self.genesis: Genesis | None = None
        self.insider: KeyPair | None = None
        self.state: ledger.State | None = None
        self.blocks: dict[str, object] = {}  # block id -> envelope (gossiped or pulled)
        self.txs: dict[str, object] = {}  # tx id -> worker / validator tx seen (to rebuild compact blocks)
        self.heads: dict[str, tuple[int, str]] = {}  # honest device -> its signed head claim
        self.captured: dict[str, list[tuple[str, bytes]]] = defaultdict(list)  # kind -> (topic, payload)
        self.wtx_ids: list[str] = []  # honest worker txs of the current round
        # bookkeeping
        self.sent: Counter = Counter()  # class -> messages published
        self.labels: Counter = Counter()  # (class, label) -> messages published
        self.exact: Counter = Counter()  # reason -> messages every agent must drop for it
        self.must: Counter = Counter()  # device -> messages it must count (drop or duplicate)
        self.to_agents = 0  # published on a topic every agent subscribes to
        self.to_one: Counter = Counter()  # device -> published on a topic only it subscribes to
        self.waited = 0.0  # seconds spent waiting for the agents to take the flood off the broker
        self.maybe = 0  # reach the agents, may be taken (idempotent re-processing, evidence)
        self.observer_only = 0
        self.broker_refused = 0
        self.broker_dropped = 0  # $SYS/broker/publish/messages/dropped: queues over max_queued_messages
        self.bytes = 0
        self.equivocation: list[tuple[int, str]] = []  # (round, the insider's role)
        self.equivocated: int | None = None
        self.last_checked = 0
        self.vtx_pending = False
        self.stop = threading.Event()  # bfl run has ended
        self.done_at_height: int | None = None
        self.error: Exception | None = None
        self.finished = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flood-attacker", protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(200)
        c.max_queued_messages_set(0)
        c.on_message = lambda cl, ud, msg: self.incoming.put((msg.topic, bytes(msg.payload)))
        self.client = c

    # -- helpers --

    @property
    def run_id(self) -> str:
        assert self.genesis is not None
        return self.genesis.run

    @property
    def devices(self) -> list[str]:
        return self.genesis.device_ids

    @property
    def honest(self) -> list[str]:
        """Devices in whose names the attacker publishes: not the insider, and none that the
        next block could knock out (its messages would be dropped as ``blacklisted`` by the
        agents that have appended that block before this attacker sees it)."""
        st, ko = self.state, self.genesis.hp["knockout"]
        return [d for d in self.devices if d != INSIDER and d not in st.blacklist and not (ko and st.strikes.get(d, 0) >= ko - 1)]

    def t(self, kind: str, dev: str, extra: str | None = None) -> str:
        return topic(self.run_id, kind, dev, extra)

    def publish(self, cls: str, label: str, tp: str, payload: bytes, *, exact: str | None = None,
                must: str | tuple | None = "all", wait: bool = False) -> None:  # fmt: skip
        """``exact``: every agent drops it for that reason; ``must``: "all" (every agent counts
        it), a device (only that one must), None (it reaches the agents but may be taken), or
        "observer" (a topic no agent subscribes to)."""
        info = self.client.publish(tp, payload, qos=1)
        self.sent[cls] += 1
        self.labels[(cls, label)] += 1
        self.bytes += len(payload)
        # (a message addressed to one device -- a chain answer -- reaches that one only)
        self.to_agents += must in ("all", None)
        if must not in ("all", None, "observer"):
            self.to_one[must] += 1
        if must == "observer":
            self.observer_only += 1
        elif must == "all":
            for d in self.devices:
                self.must[d] += 1
        elif must is None:
            self.maybe += 1
        else:
            self.must[must] += 1
        if exact:
            self.exact[exact] += 1
        if wait:
            info.wait_for_publish(30)

    def pump(self) -> None:
        """Capture the run's messages; follow its chain (the head most honest devices claim)."""
        moved = False
        while True:
            try:
                tp, payload = self.incoming.get_nowait()
            except queue.Empty:
                break
            if tp == SYS_DROPPED:
                self.broker_dropped = int(payload)
                continue
            parts = tp.split("/")
            if len(parts) < 5 or parts[2] != self.run_id or not payload:
                continue
            kind, dev = parts[3], parts[4]
            if len(self.captured[kind]) < 400:
                self.captured[kind].append((tp, payload))
            if kind == "blob" or (dev == INSIDER and kind not in ("wtx", "vtx")):
                continue
            try:
                # a candidate comes compact: rebuilt from the txs seen, as a device does
                env, missing = decode_block(payload, self.txs.get) if kind == "block" else (decode(payload), [])
                check_signature(env, self.genesis.pubkey(dev))
            except (Drop, TypeError):
                continue
            if kind in ("wtx", "vtx"):
                self.txs[env.id] = env
            if kind == "block" and not missing:
                self.blocks[env.id] = env
            elif kind == "chain":
                for raw in env.body.get("blocks", []):
                    blk = from_json(raw)
                    self.blocks[blk.id] = blk
            elif kind == "head":
                self.heads[dev] = (env.body["height"], env.body["head"])
                moved = True
            elif kind == "wtx" and dev != INSIDER and self.state is not None and env.round == self.state.height + 1:
                self.wtx_ids.append(env.id)
        if moved:
            self._follow()

    def _insider_blocks(self) -> None:
        """The blocks on the insider device's own disk (the attacker holds it, as it holds its
        key): a compact block whose txs the broker dropped from our flooded subscription
        cannot be rebuilt from what we saw. Read, never written (its agent is appending)."""
        path = self.out / "agents" / INSIDER / "runs" / self.run_id / "chain.jsonl"
        try:
            lines = path.read_bytes().split(b"\n")
        except OSError:
            return
        for line in lines:
            try:
                blk = from_json(parse(line))
            except (CanonicalError, Drop):
                continue  # (the line being written)
            self.blocks.setdefault(blk.id, blk)

    def _follow(self) -> None:
        if self.state is not None and any(h > self.state.height for h, _ in self.heads.values()):
            self._insider_blocks()
        best = Counter(self.heads.values()).most_common()
        for (height, head), _ in best:
            if height <= self.state.height:
                continue
            chain, h = [], head
            while h != self.genesis.hash and h in self.blocks:
                chain.append(self.blocks[h])
                h = self.blocks[h].body["prev"]
            if h != self.genesis.hash or len(chain) != height:
                continue
            try:
                self.state = ledger.replay(self.genesis, chain[::-1])
            except ledger.InvalidBlock:
                continue
            self.wtx_ids = []
            return

    # -- the run --

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc
        finally:
            self.finished.set()

    def _run(self) -> None:
        host, port = self.url.split("://")[1].rsplit(":", 1)
        self.client.connect(host, int(port))
        self.client.loop_start()
        no_local = SubscribeOptions(qos=1, noLocal=True)
        self.client.subscribe(f"{PREFIX}/+/genesis", options=no_local)
        self.client.subscribe(SYS_DROPPED, options=no_local)  # published every 10 s
        end = time.monotonic() + 200
        while self.genesis is None:
            tp, payload = self.incoming.get(timeout=max(0.1, end - time.monotonic()))
            if tp.endswith("/genesis") and tp.startswith(PREFIX) and payload:
                self.genesis = Genesis(decode(payload))
        self.client.subscribe(f"{PREFIX}/{self.run_id}/#", options=no_local)
        self.state = ledger.genesis_state(self.genesis)
        self.insider = KeyPair.load(self.out / "keys" / f"{INSIDER}.key")
        assert self.insider.public_hex == self.genesis.pubkey(INSIDER)
        # messages published before an agent subscribed to the run would never reach it
        assert self.scraper.joined.wait(120), "the agents did not join the run"
        base = {d: s["received"] for d, s in self.scraper.last.items()}
        self.pump()
        self.maybe_equivocate()
        self.one_offs()
        t0 = time.monotonic()
        while sum(self.sent.values()) < TARGET and not self.stop.is_set():
            self.pump()
            self.maybe_equivocate()
            self.backpressure(base)
            for _ in range(100):
                self.one_message()
            self.client.publish(f"{PREFIX}/flood/sync-point", b"", qos=1).wait_for_publish(30)
            lag = sum(self.sent.values()) / RATE - (time.monotonic() - t0)
            if lag > 0:
                time.sleep(lag)
        self.pump()
        self.done_at_height = max((h for h, _ in self.heads.values()), default=0)
        self.seconds = time.monotonic() - t0
        while not self.stop.wait(0.1):  # follow the chain until the insider has equivocated
            self.pump()
            self.maybe_equivocate()

    def backpressure(self, base: dict[str, int], backlog: int = 300, patience: float = 30) -> None:
        """Wait while some agent has not taken ``backlog`` of our messages off the broker (its
        bfl_mqtt_messages_received_total, scraped): Mosquitto keeps at most 1000 messages for a
        subscriber and drops the rest, and an agent that trains on a busy machine reads slowly."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < patience and not self.stop.is_set():
            self.pump()
            self.maybe_equivocate()
            behind = max(self.to_agents - (s["received"] - base.get(d, 0)) for d, s in self.scraper.last.items())
            if behind < backlog:
                break
            time.sleep(0.1)
        self.waited += time.monotonic() - t0

    # -- the classes --

    def one_message(self) -> None:
        r = self.rng.random()
        if r < 0.45:
            self.malformed()
        elif r < 0.65:
            self.replay()
        else:
            self.forged()

    def malformed(self) -> None:
        rng, run = self.rng, self.run_id
        dev = rng.choice(self.honest)
        kind = rng.choice(TX_KINDS)
        tp = self.t(kind, dev)
        body = {"run": run, "kind": kind, "round": self.state.height + 1, "sender": dev}
        choice = rng.randrange(16)
        if choice == 0:
            self.publish("malformed", "garbage", tp, rng.randbytes(rng.randint(1, 300)), exact="malformed")
        elif choice == 1:
            src = self._captured_payload()
            if src is not None and len(src) > 2:
                self.publish("malformed", "truncated", tp, src[: rng.randrange(1, len(src) - 1)], exact="malformed")
        elif choice == 2:
            self.publish("malformed", "invalid_utf8", tp, b'{"body":{"run":"\xc3\x28","kind":"wtx"},"sig":"00"}', exact="malformed")
        elif choice == 3:
            shape = rng.choice([[], 1, "x", None, {"body": body}, {"body": body, "sig": 5}, {"body": body, "sig": "", "x": 1},
                                {"body": dict(body, round=-1), "sig": ""}, {"body": dict(body, round=True), "sig": ""},
                                {"body": dict(body, round="1"), "sig": ""}, {"body": {k: v for k, v in body.items() if k != "sender"}, "sig": ""}])  # fmt: skip
            self.publish("malformed", "not_an_envelope", tp, json.dumps(shape).encode(), exact="malformed")
        elif choice == 4:
            self.publish("malformed", "float", tp, json.dumps({"body": dict(body, round=1.5), "sig": ""}).encode(), exact="malformed")
        elif choice == 5:
            self.publish("malformed", "duplicate_keys", tp, b'{"body":{},"body":{},"sig":""}', exact="malformed")
        elif choice == 6:
            raw = json.dumps({"body": dict(body, run="\\ud800"), "sig": ""}).replace("\\\\ud800", "\\ud800")
            self.publish("malformed", "lone_surrogate", tp, raw.encode(), exact="malformed")
        elif choice == 7:
            self.publish("malformed", "unsafe_int", tp, json.dumps({"body": dict(body, round=2**60), "sig": ""}).encode(), exact="malformed")
        elif choice == 8 and "huge_int" not in SKIP:
            # more digits than Python's int() takes (ValueError, not a JSON error)
            self.publish("malformed", "huge_int", tp, b'{"body":{"round":' + b"9" * 5000 + b'},"sig":""}', exact="malformed")
        elif choice == 9 and "nested" not in SKIP:
            depth = rng.randint(1000, 5000)  # deeper than the JSON decoder's recursion limit
            self.publish("malformed", "nested", tp, b"[" * depth + b"]" * depth, exact="malformed")
        elif choice == 10:
            bad = rng.choice([self.t(kind, dev, "extra"), self.t(kind, ""), self.t(kind, "bad id"), self.t(kind, ".."),
                              self.t("blob", dev, "not-a-hash"), self.t("blob", dev, "ab" * 32) + "/more", self.t(kind, dev) + "/x/y"])  # fmt: skip
            self.publish("malformed", "bad_topic", bad, rng.randbytes(20), exact="bad_topic")
        elif choice == 11:
            ghost = rng.choice(["d99", "operator", "D00", "d000"])
            tp2 = rng.choice([self.t(kind, ghost), self.t("blob", ghost, sha256_hex(rng.randbytes(8)))])
            self.publish("malformed", "unknown_sender", tp2, json.dumps({"body": dict(body, sender=ghost), "sig": ""}).encode(),
                         exact="unknown_sender")  # fmt: skip
        elif choice == 12:
            data = rng.randbytes(rng.randint(1, 2000))
            self.publish("malformed", "blob_not_its_hash", self.t("blob", dev, sha256_hex(rng.randbytes(8))), data, exact="hash_mismatch")
        elif choice == 13:
            self.publish("malformed", "other_run_genesis", f"{PREFIX}/flood-{rng.randrange(10**6)}/genesis", rng.randbytes(50),
                         exact="malformed")  # fmt: skip
        elif choice == 14:
            obs = rng.choice([self.t("report", dev), self.t("ack", dev), device_topic(dev, "hello"), device_topic(dev, "status")])
            self.publish("malformed", "observer_garbage", obs, rng.randbytes(rng.randint(1, 200)), must="observer")
        elif kind != "head" or "junk_head" not in SKIP:  # insider-signed bodies of the wrong shape
            ins = {"run": run, "kind": kind, "round": self.state.height + 1, "sender": INSIDER, "prev": 7, "junk": [1, {}]}
            self.publish("malformed", "insider_signed_junk", self.t(kind, INSIDER), sign(self.insider, ins).payload(), must=None)

    def _captured_payload(self) -> bytes | None:
        kinds = [k for k in TX_KINDS + ("report",) if self.captured.get(k)]
        if not kinds:
            return None
        return self.rng.choice(self.captured[self.rng.choice(kinds)])[1]

    def replay(self) -> None:
        rng = self.rng
        honest = set(self.honest)
        kinds = [k for k in TX_KINDS if any(t.split("/")[4] in honest for t, _ in self.captured.get(k, []))]
        if len(honest) < 2 or not kinds:
            return self.malformed()
        kind = rng.choice(kinds)
        tp, payload = rng.choice([c for c in self.captured[kind] if c[0].split("/")[4] in honest])
        sender = tp.split("/")[4]
        choice = rng.randrange(6)
        if choice == 0:
            # its own topic: a worker or validator tx is a duplicate or stale; a block, head,
            # sync, chain or evidence may be taken again (idempotent, or a pull answered again)
            self.publish("replay", f"same_topic_{kind}", tp, payload, must="all" if kind in ("wtx", "vtx") else None)
        elif choice == 1:
            other = rng.choice([k for k in TX_KINDS if k != kind])
            self.publish("replay", "wrong_kind_topic", self.t(other, sender), payload, exact="topic_mismatch")
        elif choice == 2:
            other = rng.choice([d for d in self.honest if d != sender])
            self.publish("replay", "wrong_device_topic", self.t(kind, other), payload, exact="topic_mismatch")
        elif choice == 3:
            self.publish("replay", "blob_topic", self.t("blob", sender, sha256_hex(rng.randbytes(8))), payload, exact="hash_mismatch")
        elif choice == 4 and self.captured.get("report"):
            rtp, rp = rng.choice(self.captured["report"])
            self.publish("replay", "report", rtp, rp, must="observer")
        else:
            self.publish("replay", f"same_topic_{kind}", tp, payload, must="all" if kind in ("wtx", "vtx") else None)

    def forged(self) -> None:
        """Well-formed, in honest devices' names, signed with a key that is not theirs."""
        rng, g, st = self.rng, self.genesis, self.state
        roles = ledger.roles_for(g, st)
        kind = rng.choice(("wtx", "vtx", "block", "head", "sync", "evidence", "chain", "report", "genesis"))

        def h() -> str:
            return sha256_hex(rng.randbytes(8))

        if kind == "wtx":
            dev = rng.choice([d for d in roles.workers if d in self.honest] or self.honest)
            body = ledger.make_wtx(g, st, dev, h())
        elif kind == "vtx":
            dev = rng.choice([d for d in roles.validators if d in self.honest] or self.honest)
            body = ledger.make_vtx(g, st, dev, [], [])
        elif kind == "block":
            dev = rng.choice([d for d in roles.miners if d in self.honest] or self.honest)
            body = ledger.build_block(g, st, dev, [], [], st.global_model)
        else:
            dev = rng.choice(self.honest)
            body = {"run": g.run, "kind": kind, "round": st.height + 1, "sender": dev}
            if kind == "head":
                body.update(round=st.height, height=st.height + rng.randint(0, 1), head=h())
            elif kind == "sync":
                body.update(wtx_of=[rng.choice(self.honest)], vtx_of=[], blobs=[h()], nonce=rng.randrange(10**9), target=dev)
            elif kind == "evidence":
                a = sign(self.evil, ledger.make_wtx(g, st, dev, h()))
                b = sign(self.evil, ledger.make_wtx(g, st, dev, h()))
                body.update(item=ledger.evidence_item(a, b))
            elif kind == "chain":
                to = rng.choice(self.devices)
                body.update(to=to, blocks=[], txs=[])
                env = sign(self.evil, body)
                return self.publish("forged", "chain", self.t("chain", dev, to), env.payload(), must=to)
            elif kind == "report":
                body.update(head=h(), global_model=h(), acc_bp=10000, stake=10**6, drops={}, extra={})
                return self.publish("forged", "report", self.t("report", dev), sign(self.evil, body).payload(), must="observer")
            else:  # the genesis of another run, signed by another operator
                fake = dict(g.body, run=f"flood-{rng.randrange(10**6)}", operator=self.evil.public_hex)
                env = sign(self.evil, fake)
                return self.publish("forged", "genesis_other_operator", f"{PREFIX}/{fake['run']}/genesis", env.payload(),
                                    exact="unknown_operator")  # fmt: skip
        self.publish("forged", kind, self.t(kind, dev), sign(self.evil, body).payload())

    def one_offs(self) -> None:
        """Oversize messages, and the devices' announcements forged in their names."""
        rng = self.rng
        for i, kind in enumerate(TX_KINDS):
            dev = self.honest[i % len(self.honest)]
            pad = b'{"body":{"pad":"' + b"x" * (MAX_JSON_BYTES + rng.randint(1, 4096)) + b'"},"sig":""}'
            self.publish("oversize", "json_over_limit", self.t(kind, dev), pad, exact="too_large", wait=True)
        self.publish("oversize", "json_over_limit_report", self.t("report", self.honest[0]), pad, must="observer", wait=True)
        for dev in self.honest[:3]:
            big = rng.randbytes(300_000)
            self.publish("oversize", "large_blob_not_its_hash", self.t("blob", dev, sha256_hex(big[:10])), big,
                         exact="hash_mismatch", wait=True)  # fmt: skip
        if "huge_blob" not in SKIP:
            self._over_broker_limit()
        if "hello" not in SKIP:
            # a hello is self-signed: announce the devices with the attacker's key, then say
            # they went offline (signed with that key)
            for dev in self.devices:
                hello = {"run": "devices", "kind": "hello", "round": 0, "sender": dev, "pubkey": self.evil.public_hex,
                         "caps": ["train", "validate", "mine"], "time": int(time.time())}  # fmt: skip
                self.publish("forged", "hello", device_topic(dev, "hello"), sign(self.evil, hello).payload(), must="observer")
                status = {"run": "devices", "kind": "status", "round": 0, "sender": dev, "state": "offline"}
                self.publish("forged", "status", device_topic(dev, "status"), sign(self.evil, status).payload(), must="observer")

    def _over_broker_limit(self) -> None:
        """A blob over the agents' limit cannot pass this broker (max_packet_size 64 MiB =
        the blob limit): the broker drops the connection of the client that sends it."""
        host, port = self.url.split("://")[1].rsplit(":", 1)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flood-big", protocol=mqtt.MQTTv311)
        gone = threading.Event()
        c.on_disconnect = lambda *a: gone.set()
        c.connect(host, int(port))
        c.loop_start()
        data = b"\0" * (DEFAULT_MAX_BLOB_BYTES + 1)
        c.publish(self.t("blob", self.honest[0], sha256_hex(data)), data, qos=1)
        refused = gone.wait(30)
        c.loop_stop()
        c.disconnect()
        self.sent["oversize"] += 1
        self.labels[("oversize", "blob_over_limit")] += 1
        self.broker_refused += 1 if refused else 0
        assert refused, "the broker took a 64 MiB + 1 blob"

    def maybe_equivocate(self) -> None:
        """Once, signed with the insider's key, early in a round: a second message for its
        slot. In round 1 whatever the insider's role; with the ``self_evidence`` attack, in the
        first round (up to ROUNDS - 3) where the insider is a worker."""
        g, st, key = self.genesis, self.state, self.insider
        j = st.height + 1
        if self.equivocated is not None:
            if self.equivocated == j and self.vtx_pending and self.wtx_ids:  # the validator's 2nd vote
                tx = sign(key, ledger.make_vtx(g, st, INSIDER, [self.wtx_ids[0]], []))
                self.publish("equivocation", "vtx", self.t("vtx", INSIDER), tx.payload(), must=None, wait=True)
                self.vtx_pending = False
            return
        if j <= self.last_checked or INSIDER in st.blacklist or j > ROUNDS - 2:
            return
        self.last_checked = j
        role = ledger.roles_for(g, st).role_of(INSIDER)
        if "self_evidence" not in SKIP and role != "worker" and j < ROUNDS - 3:
            return  # wait for a round where the insider trains
        self.equivocated = j
        self.equivocation.append((j, role))
        if "self_evidence" not in SKIP and role == "worker":
            # evidence (signed by the insider itself) of a pair of worker txs B, C, then two
            # other worker txs A, B: miners hold A and B, the evidence names B and C
            txs, blobs = [], []
            for _ in range(3):
                blob = self.rng.randbytes(64)  # not a model: evaluates to 0 (and is never averaged)
                txs.append(sign(key, ledger.make_wtx(g, st, INSIDER, sha256_hex(blob))))
                blobs.append(blob)
            a, b, c = txs
            ev = sign(key, {"run": g.run, "kind": "evidence", "round": j, "sender": INSIDER, "item": ledger.evidence_item(b, c)})
            self.publish("equivocation", "self_evidence", self.t("evidence", INSIDER), ev.payload(), must=None)
            for tx, blob in ((a, blobs[0]), (b, blobs[1])):
                self.publish("equivocation", "wtx_blob", self.t("blob", INSIDER, tx.body["model"]), blob, must=None)
                self.publish("equivocation", "wtx", self.t("wtx", INSIDER), tx.payload(), must=None, wait=True)
        elif role == "worker":
            for _ in range(2):  # two worker txs of its own before the real one: that is 3
                blob = self.rng.randbytes(64)
                tx = sign(key, ledger.make_wtx(g, st, INSIDER, sha256_hex(blob)))
                self.publish("equivocation", "wtx_blob", self.t("blob", INSIDER, tx.body["model"]), blob, must=None)
                self.publish("equivocation", "wtx", self.t("wtx", INSIDER), tx.payload(), must=None, wait=True)
        elif role == "validator":
            # an empty vote now, another one naming an honest worker tx once one is out; the
            # insider's agent votes as well: three validator txs
            tx = sign(key, ledger.make_vtx(g, st, INSIDER, [], []))
            self.publish("equivocation", "vtx", self.t("vtx", INSIDER), tx.payload(), must=None, wait=True)
            self.vtx_pending = True
        elif role == "miner":
            # two blocks before its agent's own: the third is dropped as an equivocation
            body = ledger.build_block(g, st, INSIDER, [], [], st.global_model)
            for blk in (body, dict(body, global_model=sha256_hex(b"not G_j"))):
                self.publish("equivocation", "block", self.t("block", INSIDER), sign(key, blk).payload(), must=None, wait=True)


# ---- the test ----------------------------------------------------------------------------------


def trouble(agent_logs: dict[str, str], n: int = 30) -> str:
    """The agents' errors and warnings (the last ``n``), for a failure message."""
    lines = [ln for log in agent_logs.values() for ln in log.splitlines() if " ERROR " in ln or " WARNING " in ln or "Error" in ln]
    return "\n".join(sorted(lines)[-n:])


def prom_total(drops: dict[str, int]) -> int:
    return sum(drops.values())


def test_flood_of_hostile_messages_over_mosquitto(tmp_path, mosquitto_broker):
    out, targets = tmp_path / "out", tmp_path / "targets"
    scraper = Scraper(targets)
    attacker = Attacker(mosquitto_broker, out, scraper)
    t0 = time.monotonic()
    attacker.start()
    scraper.start()
    args = [
        "run", "--devices", str(DEVICES), "--roles", ROLES, "--rounds", str(ROUNDS), "--model", "mlp",
        "--dataset", "fashion-mnist", "--samples-per-device", "300", "--deadlines", "60,30,30", "--quiet",
        "--knockout", "0",  # honest devices stay admitted: only the insider leaves (slashed)
        "--broker", mosquitto_broker, "--out", str(out), "--seed", "5",
        "--metrics-port", str(free_port()), "--metrics-targets", str(targets),
    ]  # fmt: skip
    with open(tmp_path / "bfl-run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.terminate()  # bfl run stops its agents on the way out
            rc = proc.wait(60)
            rc = f"timeout after {RUN_TIMEOUT}s (terminated, rc {rc})"
    wall = time.monotonic() - t0
    attacker.stop.set()
    scraper.stop.set()
    scraper.join(5)
    attacker.finished.wait(60)
    attacker.pump()  # the broker's last count of dropped messages
    attacker.client.loop_stop()
    run_out = (tmp_path / "bfl-run.log").read_text()
    agent_logs = {p.parent.name: p.read_text(errors="replace") for p in out.glob("agents/*/agent.log")}

    # what the attacker did, and what each agent counted
    print(f"\nwall {wall:.0f}s; bfl run: {rc}\n{run_out[-3000:]}")
    print(f"attacker: {dict(attacker.sent)} = {sum(attacker.sent.values())} messages, {attacker.bytes / 1e6:.1f} MB, "
          f"flood {getattr(attacker, 'seconds', 0):.0f}s (waited {attacker.waited:.0f}s), done at height {attacker.done_at_height}; insider {INSIDER} was "
          f"(round, role) {attacker.equivocation} when it equivocated; refused by the broker {attacker.broker_refused}, dropped by it {attacker.broker_dropped}")  # fmt: skip
    print("by label:", dict(sorted(attacker.labels.items())))
    print(f"to the agents' topics: {attacker.to_agents}; exact: {dict(attacker.exact)}; must count: {dict(attacker.must)}; may be taken: {attacker.maybe}; observer only: {attacker.observer_only}")
    for d, s in sorted(scraper.last.items()):
        print(f"{d} height {s['height']} received {s['received']} drops {prom_total(s['drops'])} "
              f"(not counted: {attacker.to_agents - prom_total(s['drops'])}):",
              {r: n for r, n in sorted(s["drops"].items()) if n})  # fmt: skip

    # the run completes every round, with one head on every honest device
    assert rc == 0, run_out[-3000:] + "\nagents:\n" + trouble(agent_logs)
    assert attacker.error is None, repr(attacker.error)
    assert sum(attacker.sent.values()) >= TARGET
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rounds"]) == ROUNDS
    honest = [d for d in summary["heads"] if d != INSIDER]
    assert len({summary["heads"][d] for d in honest}) == 1 and None not in summary["heads"].values(), summary["heads"]
    chains = {d: [b.id for b in ChainStore(out / "agents" / d / "runs", summary["run_id"]).load_blocks()] for d in summary["heads"]}
    assert all(chains[d] == chains[honest[0]] and len(chains[d]) == ROUNDS for d in honest), chains
    assert chains[honest[0]][-1] == summary["heads"][honest[0]]

    # bfl verify re-derives the whole run from OUT
    ver = bfl("verify", str(out), timeout=300)
    assert ver.returncode == 0, ver.stdout[-3000:] + ver.stderr[-2000:]

    # no agent crashed or hit an internal error; every one finished the run
    for d in summary["heads"]:
        assert f"finished at height {ROUNDS}" in agent_logs[d], agent_logs[d][-2000:]
        assert "Traceback" not in agent_logs[d], agent_logs[d][agent_logs[d].index("Traceback") - 500 :][:3000]

    # every hostile message that reached an agent was counted, by a known reason. The flood
    # ended before the last round's blocks, so each agent took all of it in before it
    # stopped; what the broker dropped (a subscriber's queue over max_queued_messages while
    # it trains) never reached an agent, and is the only shortfall allowed
    assert attacker.done_at_height is not None and attacker.done_at_height <= ROUNDS - 2, attacker.done_at_height
    # the attacker followed the chain (its forgeries are for the current round and role)
    assert attacker.state is not None and attacker.state.height >= attacker.done_at_height, attacker.state
    assert set(scraper.last) == set(summary["heads"])
    undelivered = attacker.broker_dropped
    assert undelivered <= 0.05 * TARGET, f"the broker dropped {undelivered} messages: the flood is too fast for this machine"
    shortfall = 0
    for d, s in scraper.last.items():
        assert s["height"] == ROUNDS, f"{d}: last scrape before the end ({s})"
        assert set(s["drops"]) <= set(DROP_REASONS), set(s["drops"]) - set(DROP_REASONS)
        assert s["drops"].get("internal_error", 0) == 0, (d, s["drops"])
        for reason in EXACT:  # reasons no honest message gives: the flood's, to the message
            assert s["drops"].get(reason, 0) <= attacker.exact[reason], (d, reason, s["drops"].get(reason, 0), attacker.exact[reason])
            shortfall += attacker.exact[reason] - s["drops"].get(reason, 0)
        assert s["drops"].get("malformed", 0) >= attacker.exact["malformed"] - undelivered, (d, s["drops"], attacker.exact)
        assert prom_total(s["drops"]) >= attacker.must[d] - undelivered, (d, prom_total(s["drops"]), attacker.must[d], undelivered)
        # and every hostile message that reached an honest agent, refused or merely ignored,
        # is counted under some reason (honest traffic adds its own duplicates and stale
        # messages; the insider's own agent, slashed mid-run, is left out of this bound)
        if d != INSIDER:
            reached = attacker.to_agents + attacker.to_one[d]
            assert prom_total(s["drops"]) >= reached - undelivered, (d, prom_total(s["drops"]), reached)
    assert shortfall <= undelivered, (shortfall, undelivered)
    for d, drops in summary["dropped_messages"].items():  # the agents' own reports say the same
        assert set(drops) <= set(DROP_REASONS) and drops.get("internal_error", 0) == 0, (d, drops)

    # the insider's equivocation (round 1) reached the miners: a block carries the evidence
    # and the insider is slashed (stake 0, blacklisted)
    blocks = ChainStore(out / "agents" / honest[0] / "runs", summary["run_id"]).load_blocks()
    accused = [from_json(item["a"]).sender for b in blocks for item in b.body["evidence"]]
    assert accused == [INSIDER], accused
    assert INSIDER in summary["blacklist"] and summary["stakes"][INSIDER] == 0, (summary["blacklist"], summary["stakes"])
