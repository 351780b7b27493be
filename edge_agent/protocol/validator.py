"""The validator's steps (Algorithm 1, Fig. 5 step 3): once every worker's transaction and
blob arrived or the train deadline passed, evaluate each update and vote (ledger.cast_votes).
Phase: COLLECTING -> EVALUATING (``enter_evaluate``) -> VOTED (``_publish_vtx``)."""

from __future__ import annotations

import logging

from .ledger import (
    cast_votes,
    make_vtx,
    slot,
)
from .messages import sign, topic
from .round import (
    Evaluate,
    EvaluationDone,
    Publish,
    ValidatorPhase,
    seed_of,
)

log = logging.getLogger("bfl.node")


class ValidatorSteps:
    """Steps of ``Node`` (node.py): they read and change the node's state."""

    def enter_evaluate(self, now: float) -> list:
        """Enter EVALUATING. Preconditions: a validator of the round, COLLECTING, and every
        worker's tx and blob in or the train deadline passed."""
        ctx = self.ctx
        assert ctx is not None and ctx.roles.is_validator(self.me) and ctx.validator is ValidatorPhase.COLLECTING
        before = self._signed_before("vtx")
        if before is not None:
            ctx.validator = ValidatorPhase.VOTED
            ctx.vtxs[self.me] = self.my_vtx = before
            self.my_vtx_at = now
            return [Publish(topic(self.run, "vtx", self.me), before.payload())]
        models = tuple(sorted(ctx.models() & self.blobs))
        if not models:
            return self._publish_vtx(EvaluationDone(ctx.round, 0, None, {}), now)
        ctx.validator = ValidatorPhase.EVALUATING
        want_trained = self.genesis.hp["vote_ref"] == "trained"
        return [
            Evaluate(
                ctx.round, self.state.global_model, models, want_trained, seed_of(self.run, self.me, ctx.round, "ref")
            )
        ]

    def _evaluation_done(self, ev: EvaluationDone, now: float) -> list:
        ctx = self.ctx
        if ctx is None or ev.round != ctx.round or ctx.validator is not ValidatorPhase.EVALUATING:
            return []
        return self._publish_vtx(ev, now)

    def _publish_vtx(self, ev: EvaluationDone, now: float) -> list:
        """Enter VOTED: one vote on every worker tx held (a model not evaluated is voted down
        as unavailable), signed as this round's validator tx."""
        ctx = self.ctx
        assert ctx is not None
        ctx.validator = ValidatorPhase.VOTED
        wtxs = sorted(ctx.wtxs.values(), key=lambda e: (e.sender, e.id))
        scores = {h: (acc, ev.local_loss.get(h, 10**9)) for h, acc in ev.local_bp.items()}
        votes = cast_votes(self.genesis, wtxs, scores, ev.global_bp, ev.trained_bp)
        env = sign(self.key, make_vtx(self.genesis, self.state, self.me, [e.id for e in wtxs], votes))
        self.seen.add(env.id)
        self.slots[slot(env)] = self.signed[slot(env)] = env
        ctx.vtxs[self.me] = env
        self.my_vtx, self.my_vtx_at = env, now
        return [Publish(topic(self.run, "vtx", self.me), env.payload())]
