"""The miner's steps (Eq. 1-3, Fig. 5 step 4): once every validator's transaction arrived or
the validate deadline passed, tally the votes, aggregate the accepted updates and sign a
candidate block, with any evidence of equivocation it holds.
Phase: COLLECTING -> AGGREGATING (``enter_mine``) -> PROPOSED (``_propose``)."""

from __future__ import annotations

import logging

from .ledger import (
    build_block,
    doubled_senders,
    select_for_block,
    slot,
    tally,
)
from .messages import Envelope, compact_payload, sign, topic
from .round import (
    Aggregate,
    MinerPhase,
    Publish,
)

log = logging.getLogger("bfl.node")


class MinerSteps:
    """Steps of ``Node`` (node.py): they read and change the node's state."""

    def enter_mine(self, now: float) -> list:
        """Enter AGGREGATING. Preconditions: a miner of the round, COLLECTING, and every
        validator's tx in or the validate deadline passed (baselines: every update in)."""
        ctx = self.ctx
        assert ctx is not None and ctx.roles.is_miner(self.me) and ctx.miner is MinerPhase.COLLECTING
        ctx.miner = MinerPhase.AGGREGATING
        ctx.mine_tries += 1
        before = self._signed_before("block")
        if before is not None:
            ctx.miner = MinerPhase.PROPOSED
            self.candidates.setdefault(ctx.round, {})[before.id] = before
            return [Publish(topic(self.run, "block", self.me), before.payload(), wire=compact_payload(before))]
        evidence = [item for d, item in sorted(self.evidence.items()) if d not in self.state.slashed]
        wtxs = _one_per_worker(list(ctx.wtxs.values()), {d for d in self.evidence if d not in self.state.slashed})
        wtxs, vtxs = select_for_block(self.genesis, self.state, wtxs, list(ctx.vtxs.values()))
        out = tally(self.genesis, self.state, self.me, wtxs, vtxs, doubled_senders(wtxs))
        ctx.mine_txs = (wtxs, vtxs, evidence)
        if not out.inputs:
            return self._propose(self.state.global_model)
        if out.inputs in self.aggregates:
            return self._propose(self.aggregates[out.inputs])
        return [Aggregate("mine", out.inputs, self.state.global_model)]

    def _mined(self, model_hash: str) -> list:
        """The aggregate of the accepted updates is ready: remember it, propose."""
        wtxs, vtxs, _ = self.ctx.mine_txs
        self.aggregates[tally(self.genesis, self.state, self.me, wtxs, vtxs, doubled_senders(wtxs)).inputs] = model_hash
        return self._propose(model_hash)

    def _propose(self, global_model: str) -> list:
        """Enter PROPOSED: sign and publish the candidate block."""
        ctx = self.ctx
        assert ctx is not None
        wtxs, vtxs, evidence = ctx.mine_txs
        body = build_block(self.genesis, self.state, self.me, wtxs, vtxs, global_model, evidence)
        env = sign(self.key, body)
        ctx.miner = MinerPhase.PROPOSED
        self.seen.add(env.id)
        self.slots[slot(env)] = self.signed[slot(env)] = env
        self.candidates.setdefault(ctx.round, {})[env.id] = env
        return [Publish(topic(self.run, "block", self.me), env.payload(), wire=compact_payload(env))]


def _one_per_worker(wtxs: list[Envelope], proven: set[str]) -> list[Envelope]:
    """The worker txs a miner may put in a block: one per worker, or both of a worker whose
    equivocation it holds evidence of (the block carries that evidence). Of two without
    evidence -- the second has just arrived -- the lowest id, the same choice everywhere."""
    keep: dict[str, Envelope] = {}
    out = []
    for w in sorted(wtxs, key=lambda e: (e.sender, e.id)):
        if w.sender in proven or keep.setdefault(w.sender, w) is w:
            out.append(w)
    return out
