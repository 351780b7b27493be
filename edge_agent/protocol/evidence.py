"""Equivocation: two different signed messages from one sender for one slot
(ledger.slot) are evidence, whatever order they arrive in. The device that sees both relays
the evidence once; the next miner puts it in its block (ledger.process_evidence slashes the
equivocator); evidence against a miner also reorders fork choice at that height."""

from __future__ import annotations

import logging

from .ledger import (
    check_evidence,
    evidence_item,
    slot,
)
from .messages import Drop, Envelope, check_signature, from_json, sign, topic
from .round import REORG_DEPTH, Publish

log = logging.getLogger("bfl.node")


class EvidenceBook:
    """Steps of ``Node`` (node.py): they read and change the node's state."""

    def _note_slot(self, env: Envelope, now: float) -> list:
        """Remember the first message of each slot; a second, different one is evidence."""
        first = self.slots.setdefault(slot(env), env)
        if first.id == env.id:
            return []
        return self._learn_evidence(evidence_item(first, env), now, publish=True)

    def _learn_evidence(self, item: dict, now: float, publish: bool) -> list:
        """Record an equivocation (relayed once by the device that saw both messages; the
        next miner puts it in a block); evidence against a miner can reorganise."""
        who = check_evidence(self.genesis, item)
        a = from_json(item["a"])
        acts: list = []
        # (kept even when our current chain already slashed ``who``: a reorganisation can
        # drop the block that did -- the miner leaves out evidence its parent state covers)
        if who not in self.evidence:
            self.evidence[who] = item
            log.warning("%s: %s signed two %s messages for round %d: evidence", self.me, who, a.kind, a.round)
            if publish:
                body = {"run": self.run, "kind": "evidence", "round": a.round, "sender": self.me, "item": item}
                env = sign(self.key, body)
                self.seen.add(env.id)
                acts.append(Publish(topic(self.run, "evidence", self.me), env.payload()))
        recent = a.round > self.state.height - REORG_DEPTH  # fork choice can still change there
        if a.kind == "block" and recent and who not in self.block_evidence.setdefault(a.round, set()):
            self.block_evidence[a.round].add(who)
            acts += self._reconsider(a.round, now)
        return acts

    def _on_evidence(self, env: Envelope, now: float) -> list:
        check_signature(env, self.genesis.pubkey(env.sender))
        self.seen.add(env.id)
        if set(env.body) != {"run", "kind", "round", "sender", "item"}:
            raise Drop("malformed", "evidence fields")
        known = (dict(self.evidence), {h: set(s) for h, s in self.block_evidence.items()})
        try:
            acts = self._learn_evidence(env.body["item"], now, publish=False)
        except Drop as exc:
            raise Drop("bad_evidence", exc.detail) from None
        if (self.evidence, self.block_evidence) == known:
            raise Drop("duplicate", "evidence already known")
        return acts
