"""The worker's steps (paper Section 5.3.1, Fig. 5 step 2): train G_{j-1} on the local
shard, publish the update as a content-addressed blob and a signed worker transaction.
Phase: IDLE -> TRAINING (``enter_train``) -> SUBMITTED (``_training_done``)."""

from __future__ import annotations

import logging

from .crypto import sha256_hex
from .ledger import (
    make_wtx,
    slot,
)
from .messages import Envelope, sign, topic
from .round import (
    BlobRequestAnswer,
    Publish,
    Train,
    TrainingDone,
    WorkerPhase,
    seed_of,
)

log = logging.getLogger("bfl.node")


class WorkerSteps:
    """Steps of ``Node`` (node.py): they read and change the node's state."""

    def enter_train(self, now: float) -> list:
        """Enter TRAINING. Preconditions: a worker of the round, IDLE, not catching up."""
        ctx = self.ctx
        assert ctx is not None and ctx.roles.is_worker(self.me) and ctx.worker is WorkerPhase.IDLE
        ctx.worker = WorkerPhase.TRAINING
        before = self._signed_before("wtx")
        if before is not None:  # signed before a restart: publish that one again
            ctx.worker = WorkerPhase.SUBMITTED
            ctx.wtxs[before.id] = self.my_wtx = before
            self.my_wtx_at = now
            self.own_blobs.add(before.body["model"])
            if self.have_blob(before.body["model"]):
                self.blobs.add(before.body["model"])
            return [Publish(topic(self.run, "wtx", self.me), before.payload()), BlobRequestAnswer(before.body["model"])]
        return [Train(ctx.round, self.state.global_model, seed_of(self.run, self.me, ctx.round))]

    def _signed_before(self, kind: str) -> Envelope | None:
        """Our own message of this kind for the current slot, signed earlier (before a
        restart, or before a reorganisation brought the round back): never sign another."""
        return self.signed.get((self.me, kind, self.state.height + 1, self.state.head))

    def _training_done(self, ev: TrainingDone, now: float) -> list:
        ctx = self.ctx
        if ctx is None or ev.round != ctx.round or ctx.worker is not WorkerPhase.TRAINING:
            log.info("%s: training result for round %d arrived late; discarded", self.me, ev.round)
            return []
        if len(ev.blob) > self.max_blob_bytes:
            log.error("%s: own model exceeds the blob size limit", self.me)
            return []
        ctx.worker = WorkerPhase.SUBMITTED
        model_hash = sha256_hex(ev.blob)
        self.own_blobs.add(model_hash)
        env = sign(self.key, make_wtx(self.genesis, self.state, self.me, model_hash))
        self.seen.add(env.id)
        self.slots[slot(env)] = self.signed[slot(env)] = env
        ctx.wtxs[env.id] = env
        self.my_wtx, self.my_wtx_at = env, now
        acts = self._accept_blob(model_hash, ev.blob)
        acts.append(Publish(topic(self.run, "blob", self.me, model_hash), ev.blob))
        acts.append(Publish(topic(self.run, "wtx", self.me), env.payload()))
        return acts
