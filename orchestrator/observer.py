"""Watches a run from the outside: announcements, acks, candidate blocks, heads, reports.

The observer is not on the critical path of a round. It follows the chain the devices agree
on (the block most honest devices report as their head), replays it with the same
``process_block`` the devices use, and turns the reports into per-round summaries.

Everything it reads comes from the broker, where anybody may publish: a message counts only
when it is well-formed, signed by the key the device was admitted with, and every body field
the operator uses has the shape of ``FIELDS``; anything else is dropped and counted in
``drops`` by reason (summary.json's ``operator_drops``).
"""

from __future__ import annotations

import logging
import queue
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from edge_agent.protocol import ledger
from edge_agent.protocol.canonical import MAX_SAFE_INT
from edge_agent.protocol.genesis import CAPABILITIES, Genesis
from edge_agent.protocol.messages import (
    PREFIX,
    Drop,
    check_signature,
    decode,
    decode_block,
    dict_of,
    int_in,
    is_envelope,
    is_id,
    is_int,
    list_of,
    one_of,
    parse_topic,
    require_fields,
    valid_hash,
)
from edge_agent.transport import Mqtt

log = logging.getLogger(__name__)

COUNT = int_in(0, MAX_SAFE_INT)

#: What the observer reads of each kind of message: (required fields, optional fields),
#: checked with ``messages.require_fields`` before any of them is used. A public key is 64
#: lowercase hex digits, as a SHA-256 is.
FIELDS: dict[str, tuple[dict, dict]] = {
    "hello": ({"pubkey": valid_hash, "caps": list_of(one_of(*CAPABILITIES))}, {"operator": valid_hash}),
    "status": ({"state": one_of("online", "offline")}, {}),
    "ack": ({}, {}),
    "wtx": ({}, {}),  # kept only to rebuild compact blocks (messages.decode_block)
    "vtx": ({}, {}),
    "head": ({"head": valid_hash}, {}),
    "report": (
        {"head": valid_hash, "acc_bp": int_in(0, 10_000), "stake": COUNT},
        {"drops": dict_of(COUNT), "extra": dict_of(is_int)},
    ),
    "block": (
        {
            "height": COUNT,
            "prev": valid_hash,
            "global_model": valid_hash,
            "accepted": list_of(is_id),
            "rejected": list_of(is_id),
            "wtxs": list_of(is_envelope),
            "vtxs": list_of(is_envelope),
        },
        {},
    ),
}
ANNOUNCEMENTS = ("hello", "status")


@dataclass
class RoundResult:
    round: int
    accuracy: float  # mean % over honest devices' test splits
    accepted: list[str]
    rejected: list[str]
    workers: list[str]  # workers whose transaction is in the block
    winner: str
    block_hash: str
    seconds: float
    train_ms_max: int = 0
    devices_reporting: int = 0
    agree: bool = True
    timings: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> its report's task times

    def as_json(self) -> dict:
        return {
            "round": self.round,
            "accuracy": round(self.accuracy, 2),
            "accepted": self.accepted,
            "rejected": self.rejected,
            "workers": self.workers,
            "winner": self.winner,
            "block_hash": self.block_hash,
            "seconds": round(self.seconds, 2),
            "train_seconds_max": round(self.train_ms_max / 1000, 2),
            "devices_reporting": self.devices_reporting,
            "heads_agree": self.agree,
            "timings": self.timings,
        }

    @classmethod
    def from_json(cls, d: dict) -> "RoundResult":
        """The inverse of :meth:`as_json` (a stopped run's rounds, read back to resume it)."""
        return cls(
            round=int(d["round"]), accuracy=float(d["accuracy"]), accepted=list(d["accepted"]),
            rejected=list(d["rejected"]), workers=list(d["workers"]), winner=str(d["winner"]),
            block_hash=str(d["block_hash"]), seconds=float(d["seconds"]),
            train_ms_max=round(float(d.get("train_seconds_max", 0)) * 1000),
            devices_reporting=int(d.get("devices_reporting", 0)), agree=bool(d.get("heads_agree", True)),
            timings=dict(d.get("timings", {})),
        )  # fmt: skip


@dataclass
class Observer:
    mqtt: Mqtt
    hellos: dict[str, dict] = field(default_factory=dict)
    offline: set[str] = field(default_factory=set)
    acks: set[str] = field(default_factory=set)
    blocks: dict[str, object] = field(default_factory=dict)  # id -> Envelope
    reports: dict[int, dict[str, dict]] = field(default_factory=lambda: defaultdict(dict))
    heads: dict[str, str] = field(default_factory=dict)
    drops: Counter = field(default_factory=Counter)
    genesis: Genesis | None = None
    admitted: dict[str, str] = field(default_factory=dict)  # device -> public key
    txs: dict[str, object] = field(default_factory=dict)  # id -> worker / validator tx of recent rounds
    incomplete: dict[str, tuple] = field(default_factory=dict)  # id -> (topic, compact block lacking a tx)
    settled: list = field(default_factory=list)  # blocks of heights 1.. agreed before a resume

    def settle(self, blocks: list) -> None:
        """The chain of a resumed run up to where it stopped (no reports of those rounds come)."""
        self.settled = list(blocks)
        for b in blocks:
            self.blocks[b.id] = b

    def watch_devices(self) -> None:
        self.mqtt.subscribe(f"{PREFIX}/devices/+/hello", f"{PREFIX}/devices/+/status")

    def watch_run(self, run: str) -> None:
        kinds = ("ack", "wtx", "vtx", "block", "head", "report")
        self.mqtt.subscribe(*(f"{PREFIX}/{run}/{k}/+" for k in kinds))

    def admit(self, keys: dict[str, str]) -> None:
        """From now on, announcements of these devices count only when signed by these keys."""
        self.admitted.update(keys)

    def follow(self, genesis: Genesis) -> None:
        """Follow ``genesis``'s run; its devices are the only ones admitted."""
        self.genesis = genesis
        self.admitted = {d: genesis.devices[d]["pubkey"] for d in genesis.device_ids}
        self.watch_run(genesis.run)

    def pump(self, timeout: float = 0.2) -> None:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            try:
                msg = self.mqtt.inbox.get(timeout=max(left, 0.001))
            except queue.Empty:
                return
            try:
                self._on(msg.topic, msg.payload)
            except Drop as exc:
                self.drops[exc.reason] += 1
            except Exception:  # a bug, not the sender's doing: count it and keep watching
                self.drops["internal_error"] += 1
                log.exception("observer: error handling %s", msg.topic)
            if left <= 0:
                return

    def _on(self, topic_name: str, payload: bytes) -> None:
        tp = parse_topic(topic_name)
        if not payload:
            return  # a cleared retained message
        if tp.kind == "block":
            env, missing = decode_block(payload, self.txs.get)
            if missing:  # its txs may still be on their way: retried when a tx arrives
                key = self.admitted.get(tp.device)
                if key is None or env.sender != tp.device:
                    raise Drop("unknown_sender", topic_name)
                check_signature(env, key)  # (a forged header must not take a place below)
                if len(self.incomplete) < 256:
                    self.incomplete[env.id] = (topic_name, payload)
                raise Drop("unknown_tx", f"block {env.id[:12]} names {len(missing)} tx(s) not seen")
        else:
            env = decode(payload)
        if env.sender != tp.device or env.kind != tp.kind:
            raise Drop("topic_mismatch", topic_name)
        if tp.kind not in FIELDS or (tp.run is None) != (tp.kind in ANNOUNCEMENTS):
            raise Drop("unexpected_kind", topic_name)
        required, optional = FIELDS[tp.kind]
        require_fields(env.body, required, optional)
        if tp.run is None:
            self._on_announcement(tp.device, env)
        else:
            self._on_run_message(tp, env)

    def _announcer_key(self, device: str, env) -> str:
        """The key a hello or status of ``device`` must be signed with.

        An admitted device has its admission key: in the genesis, or for local agents the
        key the operator created before starting them. Before the genesis, a device nobody
        admitted yet (``bfl run --external``) is trusted on first use: its first valid hello
        binds the id to the key in it, and a later hello for that id with another key is
        dropped (bad_signature), it does not replace the first. After the genesis, only the
        admitted devices are listened to.
        """
        key = self.admitted.get(device)
        if key is None and self.genesis is not None:
            raise Drop("unknown_sender", device)
        if key is None:
            key = self.hellos.get(device, {}).get("pubkey")
        if key is None and env.kind == "hello":
            key = env.body["pubkey"]  # first use
        if key is None:
            raise Drop("unknown_sender", device)
        return key

    def _on_announcement(self, device: str, env) -> None:
        key = self._announcer_key(device, env)
        check_signature(env, key)
        if env.kind == "hello":
            if env.body["pubkey"] != key:
                raise Drop("bad_claim", f"{device} announces another key")
            self.hellos[device] = env.body
            self.offline.discard(device)
        elif env.body["state"] == "offline":
            self.offline.add(device)
        else:
            self.offline.discard(device)

    def _on_run_message(self, tp, env) -> None:
        if self.genesis is None or tp.run != self.genesis.run or env.body["run"] != tp.run:
            raise Drop("wrong_run", tp.run)
        key = self.admitted.get(tp.device)
        if key is None:
            raise Drop("unknown_sender", tp.device)
        check_signature(env, key)
        self.offline.discard(tp.device)  # it speaks in the run: whatever a status said, it is there
        if tp.kind in ("block", "report") and not 1 <= env.round <= self.genesis.rounds:
            raise Drop("wrong_round", f"{tp.kind} of round {env.round}")
        if tp.kind == "ack":
            self.acks.add(tp.device)
        elif tp.kind == "block":
            self.blocks[env.id] = env
            self.incomplete.pop(env.id, None)
        elif tp.kind in ("wtx", "vtx"):
            self._keep_tx(env)
        elif tp.kind == "head":
            self.heads[tp.device] = env.body["head"]
        elif tp.kind == "report":
            self.reports[env.round][tp.device] = env.body

    def _keep_tx(self, env) -> None:
        self.txs[env.id] = env
        if len(self.txs) > 64 * len(self.admitted) + 64:  # txs of the last rounds suffice
            newest = max(e.round for e in self.txs.values())
            self.txs = {i: e for i, e in self.txs.items() if e.round > newest - 4}
        for block_id, (name, raw) in list(self.incomplete.items()):
            try:
                if decode_block(raw, self.txs.get)[1]:
                    continue
                del self.incomplete[block_id]
                self._on(name, raw)  # every check, as if it had come now
            except Drop as exc:
                self.incomplete.pop(block_id, None)
                self.drops[exc.reason] += 1

    # -- chain and summaries --

    def agreed_block(self, height: int, honest: set[str]):
        """The block most honest devices report as their head at ``height``."""
        if height <= len(self.settled):
            return self.settled[height - 1], True
        heads = Counter(r["head"] for d, r in self.reports.get(height, {}).items() if d in honest)
        if not heads:
            return None, False
        block_id, _ = heads.most_common(1)[0]
        return self.blocks.get(block_id), len(heads) == 1

    def round_result(self, height: int, honest: set[str], seconds: float) -> RoundResult | None:
        blk, agree = self.agreed_block(height, honest)
        if blk is None:
            return None
        reps = self.reports[height]
        accs = [r["acc_bp"] / 100 for d, r in reps.items() if d in honest]
        return RoundResult(
            round=height,
            accuracy=statistics.fmean(accs) if accs else float("nan"),
            accepted=list(blk.body["accepted"]),
            rejected=list(blk.body["rejected"]),
            workers=[w["body"]["sender"] for w in blk.body["wtxs"]],
            winner=blk.sender,
            block_hash=blk.id,
            seconds=seconds,
            train_ms_max=max((r.get("extra", {}).get("train_ms", 0) for r in reps.values()), default=0),
            devices_reporting=len(reps),
            agree=agree,
            timings={d: dict(r.get("extra", {})) for d, r in sorted(reps.items()) if r.get("extra")},
        )

    def chain(self, upto: int, honest: set[str]) -> list:
        """The agreed blocks of heights 1..upto, as far as each is valid on the ones before."""
        return self._verified_chain(upto, honest)[0]

    def replay(self, upto: int, honest: set[str]) -> ledger.State:
        return self._verified_chain(upto, honest)[1]

    def _verified_chain(self, upto: int, honest: set[str]) -> tuple[list, ledger.State]:
        # Honest devices only commit valid blocks, so this stops early only if a device the
        # operator counts as honest reported the head of a block nobody else accepted.
        assert self.genesis is not None
        state = ledger.genesis_state(self.genesis)
        out = []
        for h in range(1, upto + 1):
            blk, _ = self.agreed_block(h, honest)
            if blk is None:
                break
            try:
                state, _ = ledger.process_block(self.genesis, state, blk)
            except ledger.InvalidBlock as exc:
                log.warning("observer: the agreed block of round %d is invalid (%s)", h, exc)
                break
            out.append(blk)
        return out, state
