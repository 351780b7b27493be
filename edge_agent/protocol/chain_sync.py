"""Chain sync: candidate blocks (gossiped or pulled), peers' head claims, pull requests and
their answers. A head claim is a hint: a peer whose claimed blocks do not come within
SYNC_GIVEUP_S loses its claim; every pulled block or transaction passes the same rules as a
gossiped one; a peer's head that differs from ours below our head is fetched (it may be
the better candidate, or the other block of an equivocating miner)."""

from __future__ import annotations

import logging

from .ledger import (
    roles_for,
)
from .messages import MAX_JSON_BYTES, Drop, Envelope, check_signature, from_json, sign, topic, valid_hash
from .round import (
    PULL_BATCH,
    PULL_GRACE_S,
    REORG_DEPTH,
    SYNC_GIVEUP_S,
    SYNC_RETRY_S,
    WTX_PULL_S,
    BlobRequestAnswer,
    Publish,
    Received,
    seed_of,
)

log = logging.getLogger("bfl.node")


class ChainSync:
    """Steps of ``Node`` (node.py): they read and change the node's state."""

    def behind(self) -> bool:
        """A trusted peer claims a block we do not have (a hint, see ``_sync_step``)."""
        return bool(self._claims())

    def _network_moved_on(self, j: int) -> bool:
        """We hold a candidate for round j that some block of round j+1 builds on, or that we
        pulled from a peer that has appended it: deciding now cannot wait for a deadline."""
        ids = set(self.candidates.get(j, {}))
        return bool(ids & self.pulled) or any(
            b.body.get("prev") in ids for b in self.candidates.get(j + 1, {}).values()
        )

    def _on_block(self, env: Envelope, now: float, pulled_from: str | None) -> list:
        """A candidate block, gossiped or pulled. Kept when signed by a miner of its round and
        linked to our chain (a pulled one also to a block we hold); every rule is checked
        when it is decided (``enter_decide``), whatever way it came."""
        h = env.body.get("height")
        if not isinstance(h, int) or isinstance(h, bool) or not 1 <= h <= self.genesis.rounds or env.round != h:
            raise Drop("malformed", "block.height")
        head_h = self.state.height
        if h <= head_h - REORG_DEPTH:
            raise Drop("stale_round", f"block for height {h}")
        if h <= head_h + 1:
            parent = self.states[h - 1]
            if env.body.get("prev") != parent.head:
                raise Drop("wrong_prev", f"block from {env.sender}")
            if env.sender not in roles_for(self.genesis, parent).miners:
                raise Drop("wrong_role", f"{env.sender} is not a miner of round {h}")
        elif pulled_from is None:
            return self._buffer(Received(topic(self.run, "block", env.sender), env.payload()), env)
        elif h > head_h + 4 * PULL_BATCH or env.body.get("prev") not in self.candidates.get(h - 1, {}):
            raise Drop("wrong_prev", f"pulled block {h} does not link to a block we hold")
        check_signature(env, self.genesis.pubkey(env.sender))
        self.seen.add(env.id)
        held = self.candidates.setdefault(h, {})
        if env.id in held:
            raise Drop("duplicate", f"block {env.id[:12]} held")
        if sum(1 for c in held.values() if c.sender == env.sender) >= 2:
            raise Drop("equivocation", f"third block from {env.sender}")
        held[env.id] = env
        if pulled_from is not None and self._backed(h, env.sender):
            self.pulled.add(env.id)  # peers have appended it: the network moved on
        acts = self._note_slot(env, now)
        if h <= head_h:
            acts += self._reconsider(h, now)
        elif self.ctx is not None and self._network_moved_on(self.ctx.round):
            self.ctx.catching_up = True
        return acts

    def _backed(self, height: int, miner: str) -> bool:
        """Do peers other than the block's own miner claim ``height``? (Two of them, or every
        other device in a tiny network.) One miner's word is not enough to skip a round."""
        backers = {d for d, h in self.peer_heights.items() if h >= height and d != miner}
        return len(backers) >= min(2, len(self.genesis.devices) - 2)

    def _on_head(self, env: Envelope, now: float) -> list:
        check_signature(env, self.genesis.pubkey(env.sender))
        self.seen.add(env.id)
        height, head = env.body.get("height"), env.body.get("head")
        if not isinstance(height, int) or height < 0 or height > self.genesis.rounds or not valid_hash(head):
            raise Drop("malformed", "head")
        if height == self.genesis.rounds:
            self.peers_finished.add(env.sender)
        mine = self.states[height].head if height <= self.state.height else None
        if height > self.state.height and self.distrusted.get(env.sender, -1) <= self.state.height:
            if self.peer_heights.get(env.sender, -1) < height:
                self.peer_heights[env.sender] = height
                self.claim_since.setdefault(env.sender, now)
        elif mine is not None and head != mine and height > self.state.height - REORG_DEPTH and height >= 1:
            # a peer's head differs from ours at that height: fetch its block (it may be the
            # better candidate, or the second block of an equivocating miner)
            known = head in self.candidates.get(height, {})
            if known and head in self.unavailable:
                # we gave up on its blobs, but this peer appended it: it holds them; ask it
                self.unavailable.discard(head)
                self.invalid.discard(head)
                self.blob_source[head] = env.sender
                return self._reconsider(height, now)
            if not known:
                return [
                    self._sync_request(
                        height, now, ("fork", env.sender), target=env.sender, from_height=height, blobs=[]
                    )
                ]
        return []

    def _claims(self) -> dict[str, int]:
        return {d: h for d, h in self.peer_heights.items() if h > self.state.height}

    def _sync_step(self, now: float) -> list:
        """Pull from the most advanced trusted claimer; a claim whose blocks do not come
        within SYNC_GIVEUP_S is dropped, and that peer's claims are ignored until our own
        height reaches the height it claimed (a liar costs one wait a run, not one a round)."""
        claims = self._claims()
        for d in [d for d in self.peer_heights if d not in claims]:
            self.peer_heights.pop(d)
            self.claim_since.pop(d, None)
            self.asked_at.pop(d, None)
        # (measured from our first pull to that peer: time spent before asking is not its fault)
        for d in [d for d in claims if now - self.asked_at.get(d, now) > SYNC_GIVEUP_S]:
            claimed = claims.pop(d)
            log.warning("%s: %s claimed height %d but sent no block; ignoring its claims below it", self.me, d, claimed)
            self.peer_heights.pop(d)
            self.claim_since.pop(d, None)
            self.asked_at.pop(d, None)
            self.distrusted[d] = claimed
            self._count("bad_claim")
        # a claim younger than PULL_GRACE_S is most likely a head that overtook its block (a
        # head is small, a block is not): pulling then sends a block every peer is receiving
        claims = {d: h for d, h in claims.items() if now - self.claim_since.get(d, now) >= PULL_GRACE_S}
        if not claims or now < self.next_pull:
            return []
        self.next_pull = now + SYNC_RETRY_S
        self.sync_target = max(sorted(claims), key=lambda d: claims[d])
        self.asked_at.setdefault(self.sync_target, now)
        log.info("%s: behind at height %d; pulling blocks from %s", self.me, self.state.height, self.sync_target)
        h = self.state.height + 1
        if self.pull_from is not None and self.pull_from > self.state.height - REORG_DEPTH:
            h = self.pull_from
        self.pull_from = None
        return [self._sync_request(h, now, ("pull",), target=self.sync_target, from_height=h, blobs=[])]

    def _sync_request(self, round_: int, now: float, tag: tuple, **fields) -> Publish:
        """A signed pull request (missing txs, blocks or blobs) on our sync topic."""
        body = {"run": self.run, "kind": "sync", "round": round_, "sender": self.me, **fields}
        body["nonce"] = seed_of(now, self.me, *tag)
        req = sign(self.key, body)
        self.seen.add(req.id)
        return Publish(topic(self.run, "sync", self.me), req.payload())

    def _pull_updates(self, now: float) -> list:
        """Ask workers (and, for a miner, validators) whose tx or blob has not arrived to
        publish them again: a message can be lost, or this device restarted mid-round."""
        ctx = self.ctx
        assert ctx is not None
        # doubling: a lost message is found within seconds, while N devices waiting for
        # workers that are still training ask O(log T) times a round, not T / WTX_PULL_S
        ctx.wtx_pulls += 1
        ctx.wtx_pull_at = now + WTX_PULL_S * 2 ** min(ctx.wtx_pulls, 6)
        missing = sorted(set(ctx.roles.workers) - ctx.workers_in())
        # votes are asked for only after WTX_PULL_S without a new one, as worker txs are: the
        # validators vote at about the same time, and asking for votes in flight made each
        # validator publish its tx to every device again (10 GB a round at 200 devices)
        vtx_quiet = now - ctx.vtx_last_at >= WTX_PULL_S
        vtx_of = sorted(set(ctx.roles.validators) - set(ctx.vtxs)) if ctx.roles.is_miner(self.me) and vtx_quiet else []
        # a blob whose tx came less than WTX_PULL_S ago is still in flight (a model is
        # megabytes; its tx a few hundred bytes): asking would have it sent to everyone twice
        blobs = sorted(h for h in ctx.models() - self.blobs if now - ctx.wtx_at.get(h, now) >= WTX_PULL_S)
        if not missing and not blobs and not vtx_of:
            return []
        log.info(
            "%s: round %d: asking %d peer(s) to re-publish", self.me, ctx.round, len(missing) + len(blobs) + len(vtx_of)
        )
        # a request names at most 64 of each (receivers drop longer lists): with more than
        # 64 missing, each request asks the next 64 in turn
        k = ctx.wtx_pulls
        return [self._sync_request(ctx.round, now, ("wtx",), wtx_of=_window(missing, k), vtx_of=_window(vtx_of, k),
                                   blobs=_window(blobs, k))]  # fmt: skip

    def _fetch_named_txs(self, vtx: Envelope, now: float) -> list:
        """A miner (or a validator still collecting) asks a validator for the worker txs its
        vote names and this device lacks: an equivocating worker may have sent each half of
        the network a different one, or this device restarted after they were published.
        Without them a miner could not put that validator's votes in its block."""
        ctx = self.ctx
        assert ctx is not None
        if not self._waiting_for_updates(ctx):
            return []
        unknown = sorted(set(vtx.body["verified"]) - set(ctx.wtxs) - ctx.asked)
        if not unknown:
            return []
        ctx.asked |= set(unknown)
        return [
            self._sync_request(ctx.round, now, ("txs", vtx.sender), target=vtx.sender, tx_ids=unknown[:64], blobs=[])
        ]

    def _on_sync(self, env: Envelope, now: float) -> list:
        check_signature(env, self.genesis.pubkey(env.sender))
        self.seen.add(env.id)
        b = env.body
        hashes, wtx_of, vtx_of, tx_ids, block_ids = (
            b.get("blobs", []),
            b.get("wtx_of", []),
            b.get("vtx_of", []),
            b.get("tx_ids", []),
            b.get("block_ids", []),
        )
        fields = (("blobs", hashes), ("wtx_of", wtx_of), ("vtx_of", vtx_of), ("tx_ids", tx_ids), ("block_ids", block_ids))
        for name, value in fields:
            if not isinstance(value, list) or len(value) > 64 or not all(isinstance(x, str) for x in value):
                raise Drop("malformed", f"sync.{name}")
        if not all(valid_hash(h) for h in hashes):
            raise Drop("malformed", "sync.blobs")
        targeted = b.get("target") == self.me
        acts: list = []
        ctx = self.ctx
        current = ctx is not None and env.round == ctx.round
        # (a tx we published under WTX_PULL_S ago is in flight: the request crossed it)
        fresh_wtx = now - self.my_wtx_at < WTX_PULL_S
        fresh_vtx = now - self.my_vtx_at < WTX_PULL_S
        for mine, asked in ((None if fresh_wtx else self.my_wtx, wtx_of), (None if fresh_vtx else self.my_vtx, vtx_of)):
            if self.me in asked and mine is not None and current and mine.round == ctx.round:
                # our tx was missed: publish it again (receivers dedupe by id)
                acts.append(Publish(topic(self.run, mine.kind, self.me), mine.payload()))
                if mine.kind == "wtx":
                    acts.append(BlobRequestAnswer(mine.body["model"]))
        # Only a blob's author, or the peer named as target, answers: no N-fold fan-out.
        acts += [BlobRequestAnswer(h) for h in hashes if h in self.own_blobs or (targeted and self.have_blob(h))]
        held = [ctx.wtxs[t] for t in tx_ids if current and t in ctx.wtxs] if targeted else []
        if held:
            body = {"run": self.run, "kind": "chain", "round": ctx.round, "sender": self.me, "to": env.sender,
                    "blocks": [], "txs": [t.to_json() for t in held]}  # fmt: skip
            acts.append(Publish(topic(self.run, "chain", self.me, env.sender), sign(self.key, body).payload()))
        # whole candidate blocks, asked by a device that could not rebuild their compact form
        asked = [c for cands in self.candidates.values() for c in cands.values() if c.id in block_ids] if targeted else []
        if asked:
            body = {"run": self.run, "kind": "chain", "round": env.round, "sender": self.me, "to": env.sender,
                    "blocks": [c.to_json() for c in asked[:1]]}  # fmt: skip
            acts.append(Publish(topic(self.run, "chain", self.me, env.sender), sign(self.key, body).payload()))
        start = b.get("from_height")
        if targeted and isinstance(start, int) and not isinstance(start, bool) and 1 <= start <= len(self.chain):
            body = {"run": self.run, "kind": "chain", "round": start, "sender": self.me, "to": env.sender, "blocks": []}
            size = len(sign(self.key, body).payload())
            for blk in self.chain[start - 1 : start - 1 + PULL_BATCH]:
                # as many blocks as fit the message limit (one always does: ledger.MAX_BLOCK_BYTES)
                cost = len(blk.payload()) + 1
                if body["blocks"] and size + cost > MAX_JSON_BYTES:
                    break
                body["blocks"].append(blk.to_json())
                size += cost
            acts.append(Publish(topic(self.run, "chain", self.me, env.sender), sign(self.key, body).payload()))
        return acts

    def _on_chain(self, env: Envelope, now: float) -> list:
        """An answer to our pull: each block passes the same rules as a gossiped one."""
        if env.body.get("to") != self.me:
            raise Drop("not_for_us", f"a chain answer to {env.body.get('to')!r}")
        check_signature(env, self.genesis.pubkey(env.sender))
        self.seen.add(env.id)
        blocks, txs = env.body.get("blocks"), env.body.get("txs", [])
        if not isinstance(blocks, list) or len(blocks) > PULL_BATCH or not isinstance(txs, list) or len(txs) > 64:
            raise Drop("malformed", "chain.blocks")
        acts: list = []
        for raw in txs:  # worker txs a validator named: the same rules as gossiped ones
            try:
                tx = from_json(raw)
                if tx.kind != "wtx" or self.ctx is None or tx.round != self.ctx.round:
                    raise Drop("malformed" if tx.kind != "wtx" else "stale_round", "chain.txs")
                if tx.id not in self.seen:
                    acts += self._on_tx(tx, now)
            except Drop as exc:
                self._count(exc.reason)
        got = False
        for raw in blocks:
            blk = None
            try:
                blk = from_json(raw)
                if blk.kind != "block":
                    raise Drop("malformed", "not a block")
                acts += self._on_block(blk, now, pulled_from=env.sender)
                got = True
            except Drop as exc:
                self._count(exc.reason)
                if (
                    exc.reason == "wrong_prev"
                    and blk is not None
                    and blk.body.get("height") == self.state.height + 1 >= 2
                ):
                    # the peer's chain forks below our head: next time pull from our height
                    self.pull_from = self.state.height
        if got and env.sender in self.claim_since:
            self.claim_since[env.sender] = now  # the claimer delivers: keep its claim alive
            if env.sender in self.asked_at:
                self.asked_at[env.sender] = now
        return acts


def _window(items: list, k: int, size: int = 64) -> list:
    """The k-th window of ``size`` items of ``items``, cyclically (all of them if they fit)."""
    if len(items) <= size:
        return items
    start = (k * size) % len(items)
    return (items[start:] + items[:start])[:size]
