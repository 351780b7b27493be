"""Watches a run from the outside: announcements, acks, candidate blocks, heads, reports.

The observer is not on the critical path of a round. It follows the chain the devices agree
on (the block most honest devices report as their head), replays it with the same
``process_block`` the devices use, and turns the reports into per-round summaries.
"""

from __future__ import annotations

import queue
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from edge_agent.protocol import ledger
from edge_agent.protocol.genesis import Genesis
from edge_agent.protocol.messages import PREFIX, Drop, check_signature, decode, parse_topic
from edge_agent.transport import Mqtt


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
        }


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

    def watch_devices(self) -> None:
        self.mqtt.subscribe(f"{PREFIX}/devices/+/hello", f"{PREFIX}/devices/+/status")

    def watch_run(self, run: str) -> None:
        self.mqtt.subscribe(*(f"{PREFIX}/{run}/{k}/+" for k in ("ack", "block", "head", "report")))

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
            if left <= 0:
                return

    def _pubkey(self, device: str) -> str | None:
        if self.genesis is not None:
            return self.genesis.pubkey(device)
        return None

    def _on(self, topic_name: str, payload: bytes) -> None:
        tp = parse_topic(topic_name)
        if not payload:
            return
        env = decode(payload)
        if env.sender != tp.device or env.kind != tp.kind:
            raise Drop("topic_mismatch", topic_name)
        if tp.run is None:  # device announcements are self-signed
            key = env.body.get("pubkey") if tp.kind == "hello" else self.hellos.get(tp.device, {}).get("pubkey")
            if not isinstance(key, str):
                raise Drop("unknown_sender", tp.device)
            check_signature(env, key)
            if tp.kind == "hello":
                self.hellos[tp.device] = env.body
                self.offline.discard(tp.device)
            elif env.body.get("state") == "offline":
                self.offline.add(tp.device)
            else:
                self.offline.discard(tp.device)
            return
        if self.genesis is None or tp.run != self.genesis.run:
            raise Drop("wrong_run", topic_name)
        key = self._pubkey(tp.device)
        if key is None:
            raise Drop("unknown_sender", tp.device)
        check_signature(env, key)
        if tp.kind == "ack":
            self.acks.add(tp.device)
        elif tp.kind == "block":
            self.blocks[env.id] = env
        elif tp.kind == "head":
            self.heads[tp.device] = env.body["head"]
        elif tp.kind == "report":
            self.reports[env.round][tp.device] = env.body

    # -- chain and summaries --

    def agreed_block(self, height: int, honest: set[str]):
        """The block most honest devices report as their head at ``height``."""
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
        )

    def chain(self, upto: int, honest: set[str]) -> list:
        out = []
        for h in range(1, upto + 1):
            blk, _ = self.agreed_block(h, honest)
            if blk is None:
                break
            out.append(blk)
        return out

    def replay(self, upto: int, honest: set[str]) -> ledger.State:
        assert self.genesis is not None
        return ledger.replay(self.genesis, self.chain(upto, honest))
