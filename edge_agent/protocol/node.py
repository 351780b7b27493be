"""The device's round state machine, sans-io (paper Section 5.3, Fig. 5).

``Node`` does no I/O and never blocks. The transport feeds it events -- a received MQTT
message, a finished training / evaluation / aggregation, the clock -- and carries out the
actions it returns: publish, store a blob, train, evaluate, aggregate, persist a block.
Heavy work (PyTorch training, ONNX Runtime inference, FedAvg) is an action whose result
comes back as an event, so the round logic can be tested without a broker or a model.

Round j, for a device whose chain head is block j-1:
  1. roles = assign_roles(hash of block j-1, ...)              (roles.py)
  2. worker: Train -> publish blob + signed worker tx
  3. validator: when every worker's tx and blob arrived, or the train deadline passed:
     Evaluate -> Algorithm 1 votes (voting.py) -> signed validator tx
  4. miner: when every validator's tx arrived, or the validate deadline passed:
     tally + Eq. 1-3 (ledger.tally) -> Aggregate accepted updates -> signed candidate block
  5. everyone: when every miner's candidate arrived, or the mine deadline passed:
     fork choice (highest-stake miner, ties to lowest hash), process_block, check G_j by
     aggregating the accepted blobs itself, append, credit stakes, knock-out.
Every received message is checked and, if bad, dropped with a counted reason.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field

from . import voting
from .crypto import KeyPair, sha256_hex
from .genesis import Genesis
from .ledger import (
    InvalidBlock,
    State,
    aggregation_inputs,
    build_block,
    check_tx,
    fork_choice_order,
    genesis_state,
    make_vtx,
    make_wtx,
    process_block,
    roles_for,
    select_for_block,
    tally,
    validated,
)
from .messages import (
    DEFAULT_MAX_BLOB_BYTES,
    Drop,
    Envelope,
    check_signature,
    decode,
    from_json,
    parse_topic,
    sign,
    topic,
    valid_hash,
)
from .roles import Roles

log = logging.getLogger("bfl.node")

FUTURE_ROUNDS = 2  # messages for up to this many rounds ahead are buffered
FUTURE_LIMIT = 2000  # per round
SYNC_RETRY_S = 3.0
WTX_PULL_S = 5.0  # after the first worker tx of a round, ask for the missing ones this often
PULL_BATCH = 8  # blocks per catch-up answer
BLOBS_PER_SENDER = 2  # unsolicited blobs kept per sender and round


# ---- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class TrainingDone:
    round: int
    blob: bytes  # safetensors bytes of L_j^w (after any attack)


@dataclass(frozen=True)
class TaskFailed:
    task: str  # "train" | "evaluate" | "aggregate" | "evaluate_global"
    key: str
    error: str


@dataclass(frozen=True)
class EvaluationDone:
    round: int
    global_bp: int  # A^v(G_{j-1})
    trained_bp: int | None  # A^v of the validator's own one-epoch G_{j-1} (vote_ref=trained)
    local_bp: dict[str, int]  # model hash -> A^v(L_j^w); 0 for an undecodable blob
    local_loss: dict[str, int] = field(default_factory=dict)  # model hash -> milli-nats


@dataclass(frozen=True)
class AggregateDone:
    key: str
    model_hash: str | None
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class GlobalEvaluated:
    height: int
    model_hash: str
    acc_bp: int
    extra: dict = field(default_factory=dict)  # integer timings etc. from the shell


# ---- actions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class StoreBlob:
    hash: str
    data: bytes


@dataclass(frozen=True)
class Train:
    round: int
    base_model: str
    seed: int
    attack: dict | None


@dataclass(frozen=True)
class Evaluate:
    round: int
    base_model: str
    models: tuple[str, ...]
    want_trained: bool
    seed: int


@dataclass(frozen=True)
class Aggregate:
    key: str
    inputs: tuple[tuple[str, int], ...]  # (model hash, |train|) in canonical order
    base: str = ""  # G_{j-1}: the result when no input is usable


@dataclass(frozen=True)
class CommitBlock:
    block: Envelope
    state: State


@dataclass(frozen=True)
class EvaluateGlobal:
    height: int
    model_hash: str


@dataclass(frozen=True)
class Finished:
    state: State


# ---- the machine ----------------------------------------------------------------------


@dataclass
class RoundCtx:
    round: int
    roles: Roles
    started: float
    wtxs: dict[str, Envelope] = field(default_factory=dict)
    vtxs: dict[str, Envelope] = field(default_factory=dict)
    candidates: dict[str, Envelope] = field(default_factory=dict)
    training: bool = False
    evaluating: bool = False
    voted: bool = False
    mining: bool = False
    mined: bool = False
    checking: str | None = None  # block id whose G_j is being aggregated
    rejected_blocks: set[str] = field(default_factory=set)
    waiting_logged: bool = False
    sync_at: float = 0.0
    mine_retry_at: float = 0.0
    synced: bool = False  # the candidate was pulled from a peer that already appended it
    wtx_pull_at: float = 0.0  # when to ask missing workers to re-publish (0: not yet due)


def _seed(*parts: object) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


class Node:
    def __init__(
        self,
        me: str,
        key: KeyPair,
        genesis: Genesis,
        blocks: list[Envelope] | None = None,
        *,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        have_blob=lambda h: False,
    ):
        if genesis.pubkey(me) != key.public_hex:
            raise ValueError(f"{me}: key does not match the genesis entry")
        self.me = me
        self.key = key
        self.genesis = genesis
        self.run = genesis.run
        self.max_blob_bytes = max_blob_bytes
        self.have_blob = have_blob  # read-only view of the blob store
        self.attack: dict | None = None
        self.state = genesis_state(genesis)
        self.chain: list[Envelope] = []
        for blk in blocks or []:
            self.state = process_block(genesis, self.state, blk)
            self.chain.append(blk)
        self.ctx: RoundCtx | None = None
        self.future: dict[int, list[Received]] = {}
        self.unsolicited: Counter[str] = Counter()
        self.my_wtx: Envelope | None = None  # re-published when a peer reports it missing
        self.seen: set[str] = set()
        self.blobs: set[str] = set()
        self.own_blobs: set[str] = set()
        self.aggregates: dict[tuple, str] = {}
        self.drops: Counter[str] = Counter()
        self.duplicates = 0
        self.finished = False
        # catch-up: peers' heads (retained head topics) and blocks pulled from a peer
        self.peer_heights: dict[str, int] = {}
        self.pulled: dict[int, Envelope] = {}
        self.sync_target: str | None = None
        self.next_pull = 0.0

    # -- public API --

    @property
    def dl(self) -> dict[str, int]:
        return self.genesis.deadlines

    def start(self, now: float) -> list:
        return self._begin_round(now)

    def handle(self, event, now: float) -> list:
        acts: list = []
        if isinstance(event, Received):
            acts += self._receive(event, now)
        elif isinstance(event, TrainingDone):
            acts += self._training_done(event, now)
        elif isinstance(event, EvaluationDone):
            acts += self._evaluation_done(event, now)
        elif isinstance(event, AggregateDone):
            acts += self._aggregate_done(event, now)
        elif isinstance(event, GlobalEvaluated):
            acts += self._report(event)
        elif isinstance(event, TaskFailed):
            acts += self._task_failed(event, now)
        else:
            raise TypeError(f"unknown event {event!r}")
        acts += self._advance(now)
        return acts

    def tick(self, now: float) -> list:
        return self._advance(now)

    def _updates_complete(self) -> bool:
        ctx = self.ctx
        assert ctx is not None
        return all(w in ctx.wtxs and ctx.wtxs[w].body["model"] in self.blobs for w in ctx.roles.workers)

    def behind(self) -> bool:
        """Some peer has appended a block we do not have."""
        return any(h > self.state.height for h in self.peer_heights.values())

    def _sync_request(self, round_: int, now: float, tag: tuple, **fields) -> Publish:
        """A signed pull request (missing worker txs, blocks or blobs) on our sync topic."""
        body = {"run": self.run, "kind": "sync", "round": round_, "sender": self.me, **fields}
        body["nonce"] = _seed(now, self.me, *tag)
        req = sign(self.key, body)
        self.seen.add(req.id)
        return Publish(topic(self.run, "sync", self.me), req.payload())

    def _pull_updates(self, now: float) -> list:
        """Ask workers whose tx or blob has not arrived to publish them again (a message can
        be lost, e.g. published before this device subscribed)."""
        ctx = self.ctx
        assert ctx is not None
        ctx.wtx_pull_at = now + WTX_PULL_S
        missing = sorted(w for w in ctx.roles.workers if w not in ctx.wtxs)
        blobs = sorted(e.body["model"] for e in ctx.wtxs.values() if e.body["model"] not in self.blobs)
        if not missing and not blobs:
            return []
        log.info("%s: round %d: asking %d worker(s) to re-publish", self.me, ctx.round, len(missing) + len(blobs))
        return [self._sync_request(ctx.round, now, ("wtx",), wtx_of=missing, blobs=blobs[:64])]

    def _pull(self, now: float) -> list:
        """Ask the most advanced peer for the blocks after our head."""
        self.next_pull = now + SYNC_RETRY_S
        self.sync_target = max(sorted(self.peer_heights), key=lambda d: self.peer_heights[d])
        log.info("%s: behind at height %d; pulling blocks from %s", self.me, self.state.height, self.sync_target)
        return [
            self._sync_request(
                self.state.height + 1, now, ("pull",), target=self.sync_target, from_height=self.state.height + 1, blobs=[]
            )
        ]

    def role(self) -> str | None:
        return self.ctx.roles.role_of(self.me) if self.ctx else None

    # -- rounds --

    def _begin_round(self, now: float) -> list:
        if self.state.height >= self.genesis.rounds:
            if not self.finished:
                self.finished = True
                return [Finished(self.state)]
            return []
        # (a knocked-out device gets no role from roles_for; it still follows the chain)
        j = self.state.height + 1
        self.ctx = RoundCtx(round=j, roles=roles_for(self.genesis, self.state), started=now)
        acts: list = []
        if self.behind():
            # peers already appended this round's block: do not work on a past round
            self.ctx.training = self.ctx.voted = self.ctx.mined = True
            if j in self.pulled:
                blk = self.pulled.pop(j)
                self.ctx.candidates[blk.sender] = blk
                self.ctx.synced = True
        elif self.ctx.roles.is_worker(self.me):
            self.ctx.training = True
            acts.append(Train(j, self.state.global_model, _seed(self.run, self.me, j), self.attack))
        pending = self.future.pop(j, [])
        for r in [r for r in self.future if r < j]:
            self.drops["stale_round"] += len(self.future.pop(r))
        self.unsolicited.clear()
        for msg in pending:
            acts += self._receive(msg, now, replay=True)
        return acts + self._advance(now)

    def _advance(self, now: float) -> list:
        ctx = self.ctx
        if ctx is None or self.finished:
            return []
        acts: list = []
        t = (now - ctx.started) * 1000
        g = self.genesis
        if ctx.roles.is_validator(self.me) and not ctx.evaluating and not ctx.voted:
            if self._updates_complete() or t >= self.dl["train"]:
                models = tuple(sorted({e.body["model"] for e in ctx.wtxs.values() if e.body["model"] in self.blobs}))
                if models:
                    ctx.evaluating = True
                    acts.append(
                        Evaluate(
                            ctx.round,
                            self.state.global_model,
                            models,
                            g.hp["vote_ref"] == "trained",
                            _seed(self.run, self.me, ctx.round, "ref"),
                        )
                    )
                else:
                    acts += self._publish_vtx(EvaluationDone(ctx.round, 0, None, {}))
        if ctx.roles.is_miner(self.me) and not ctx.mining and not ctx.mined and now >= ctx.mine_retry_at:
            if validated(g):
                ready = set(ctx.roles.validators) <= set(ctx.vtxs) or t >= self.dl["train"] + self.dl["validate"]
            else:  # baselines: no votes, mine once every update (and its blob) is in
                ready = self._updates_complete() or t >= self.dl["train"]
            if ready:
                acts += self._mine()
        waiting_for_workers = (ctx.roles.is_validator(self.me) and not ctx.evaluating and not ctx.voted) or (
            ctx.roles.is_miner(self.me) and not validated(g) and not ctx.mining and not ctx.mined
        )
        if waiting_for_workers and ctx.wtx_pull_at and now >= ctx.wtx_pull_at:
            acts += self._pull_updates(now)
        if self.behind() and not ctx.synced and now >= self.next_pull:
            acts += self._pull(now)
        if ctx.checking is None:
            all_in = set(ctx.roles.miners) <= set(ctx.candidates) or ctx.synced
            late = t >= self.dl["train"] + self.dl["validate"] + self.dl["mine"]
            if (all_in or late) and ctx.candidates:
                acts += self._decide(now)
            elif late and not ctx.waiting_logged:
                ctx.waiting_logged = True
                log.warning("%s: round %d: no candidate block by the deadline; waiting", self.me, ctx.round)
        elif ctx.sync_at and now >= ctx.sync_at:
            # the aggregation lacked blobs: ask again and retry
            blk = next((c for c in ctx.candidates.values() if c.id == ctx.checking), None)
            ctx.sync_at = 0.0
            if blk is not None:
                acts.append(Aggregate(blk.id, tuple(aggregation_inputs(blk.body)), self.state.global_model))
        return acts

    # -- receiving --

    def _receive(self, msg: Received, now: float, replay: bool = False) -> list:
        try:
            return self._dispatch(msg, now, replay)
        except Drop as exc:
            self.drops[exc.reason] += 1
            log.info("%s: dropped %s (%s)", self.me, msg.topic, exc)
            return []

    def _dispatch(self, msg: Received, now: float, replay: bool) -> list:
        tp = parse_topic(msg.topic)
        if tp.run != self.run:
            raise Drop("wrong_run", msg.topic)
        if tp.device is None or self.genesis.pubkey(tp.device) is None:
            raise Drop("unknown_sender", msg.topic)
        if tp.device in self.state.blacklist:
            raise Drop("blacklisted", tp.device)
        if tp.kind == "blob":
            return self._on_blob(tp.device, tp.extra, msg.payload)
        if tp.kind not in ("wtx", "vtx", "block", "sync", "head", "chain"):
            raise Drop("unexpected_kind", tp.kind)
        env = decode(msg.payload)
        if env.kind != tp.kind or env.sender != tp.device:
            raise Drop("topic_mismatch", f"{env.kind}/{env.sender} on {msg.topic}")
        if env.body["run"] != self.run:
            raise Drop("wrong_run", env.body["run"])
        if env.id in self.seen:
            self.duplicates += 1
            return []
        if env.kind == "sync":
            return self._on_sync(env)
        if env.kind == "head":
            return self._on_head(env)
        if env.kind == "chain":
            return self._on_chain(env, now)
        ctx = self.ctx
        if ctx is None or env.round < ctx.round:
            raise Drop("stale_round", f"{env.kind} for round {env.round}")
        if env.round > ctx.round:
            if env.round > ctx.round + FUTURE_ROUNDS:
                raise Drop("future_round", f"round {env.round}")
            queue = self.future.setdefault(env.round, [])
            if len(queue) >= FUTURE_LIMIT:
                raise Drop("buffer_full", f"round {env.round}")
            queue.append(msg)
            return []
        if env.kind in ("wtx", "vtx"):
            check_tx(self.genesis, self.state, env, ctx.roles)
            book = ctx.wtxs if env.kind == "wtx" else ctx.vtxs
            if env.sender in book:
                raise Drop("equivocation", f"second {env.kind} from {env.sender}")
            self.seen.add(env.id)
            book[env.sender] = env
            if env.kind == "wtx" and not ctx.wtx_pull_at:
                ctx.wtx_pull_at = now + WTX_PULL_S
            return []
        # candidate block
        if env.body.get("prev") != self.state.head:
            raise Drop("wrong_prev", f"block from {env.sender}")
        if env.sender not in ctx.roles.miners:
            raise Drop("wrong_role", f"{env.sender} is not a miner")
        if env.sender in ctx.candidates:
            raise Drop("equivocation", f"second block from {env.sender}")
        check_signature(env, self.genesis.pubkey(env.sender))
        self.seen.add(env.id)
        ctx.candidates[env.sender] = env
        return []

    def _on_blob(self, sender: str, blob_hash: str, data: bytes) -> list:
        if len(data) > self.max_blob_bytes:
            raise Drop("too_large", f"blob of {len(data)} bytes")
        if sha256_hex(data) != blob_hash:
            raise Drop("hash_mismatch", f"blob from {sender}")
        if blob_hash in self.blobs:
            self.duplicates += 1
            return []
        ctx = self.ctx
        expected = ctx is not None and (sender in ctx.roles.workers or blob_hash in self._wanted())
        if not expected:
            # e.g. a faster worker's model for the next round: kept (on disk, not in memory),
            # but at most BLOBS_PER_SENDER unsolicited blobs per sender and round
            self.unsolicited[sender] += 1
            if self.unsolicited[sender] > BLOBS_PER_SENDER:
                raise Drop("too_many_blobs", sender)
        return self._accept_blob(blob_hash, data)

    def _accept_blob(self, blob_hash: str, data: bytes) -> list:
        self.blobs.add(blob_hash)
        return [StoreBlob(blob_hash, data)]

    def _wanted(self) -> set[str]:
        ctx = self.ctx
        if ctx is None:
            return set()
        wanted = {e.body["model"] for e in ctx.wtxs.values()}
        for blk in ctx.candidates.values():
            try:  # candidates are signed but not yet validated: tolerate any shape
                wanted |= {h for h, _ in aggregation_inputs(blk.body)}
            except (KeyError, TypeError, AttributeError):
                pass
        return wanted

    def _on_sync(self, env: Envelope) -> list:
        check_signature(env, self.genesis.pubkey(env.sender))
        self.seen.add(env.id)
        hashes = env.body.get("blobs")
        if not isinstance(hashes, list) or len(hashes) > 64 or not all(valid_hash(h) for h in hashes):
            raise Drop("malformed", "sync.blobs")
        targeted = env.body.get("target") == self.me
        wtx_of = env.body.get("wtx_of", [])
        if not isinstance(wtx_of, list):
            raise Drop("malformed", "sync.wtx_of")
        mine = self.my_wtx
        if self.me in wtx_of and mine is not None and mine.round == env.round and self.ctx and self.ctx.round == mine.round:
            # our update was missed: publish it again (receivers dedupe by id)
            return [Publish(topic(self.run, "wtx", self.me), mine.payload()), BlobRequestAnswer(mine.body["model"])]
        # Only a blob's author, or the peer named as target, answers: no N-fold fan-out.
        acts: list = [BlobRequestAnswer(h) for h in hashes if h in self.own_blobs or (targeted and self.have_blob(h))]
        start = env.body.get("from_height")
        if targeted and isinstance(start, int) and 1 <= start <= len(self.chain):
            blocks = self.chain[start - 1 : start - 1 + PULL_BATCH]
            body = {
                "run": self.run,
                "kind": "chain",
                "round": start,
                "sender": self.me,
                "to": env.sender,
                "blocks": [b.to_json() for b in blocks],
            }
            acts.append(Publish(topic(self.run, "chain", self.me), sign(self.key, body).payload()))
        return acts

    def _on_head(self, env: Envelope) -> list:
        check_signature(env, self.genesis.pubkey(env.sender))
        height = env.body.get("height")
        if not isinstance(height, int) or height < 0 or height > self.genesis.rounds:
            raise Drop("malformed", "head.height")
        self.peer_heights[env.sender] = max(height, self.peer_heights.get(env.sender, 0))
        return []

    def _on_chain(self, env: Envelope, now: float) -> list:
        if env.body.get("to") != self.me:
            return []  # an answer to someone else
        check_signature(env, self.genesis.pubkey(env.sender))
        self.seen.add(env.id)
        blocks = env.body.get("blocks")
        if not isinstance(blocks, list) or len(blocks) > PULL_BATCH:
            raise Drop("malformed", "chain.blocks")
        for raw in blocks:
            blk = from_json(raw)
            h = blk.body.get("height")
            if isinstance(h, int) and h > self.state.height:
                self.pulled[h] = blk
        ctx = self.ctx
        if ctx is not None and ctx.round in self.pulled and ctx.checking is None:
            blk = self.pulled.pop(ctx.round)
            ctx.candidates[blk.sender] = blk
            ctx.synced = True
        # forget what lies too far ahead to matter
        for h in [h for h in self.pulled if h > self.state.height + 4 * PULL_BATCH]:
            del self.pulled[h]
        return []

    # -- worker --

    def _training_done(self, ev: TrainingDone, now: float) -> list:
        ctx = self.ctx
        if ctx is None or ev.round != ctx.round or not ctx.roles.is_worker(self.me):
            log.info("%s: training result for round %d arrived late; discarded", self.me, ev.round)
            return []
        if len(ev.blob) > self.max_blob_bytes:
            log.error("%s: own model exceeds the blob size limit", self.me)
            return []
        model_hash = sha256_hex(ev.blob)
        self.own_blobs.add(model_hash)
        env = sign(self.key, make_wtx(self.genesis, self.state, self.me, model_hash))
        acts = self._accept_blob(model_hash, ev.blob)
        acts.append(Publish(topic(self.run, "blob", self.me, model_hash), ev.blob))
        acts.append(Publish(topic(self.run, "wtx", self.me), env.payload()))
        self.seen.add(env.id)
        ctx.wtxs[self.me] = env
        self.my_wtx = env
        return acts

    # -- validator --

    def _evaluation_done(self, ev: EvaluationDone, now: float) -> list:
        ctx = self.ctx
        if ctx is None or ev.round != ctx.round or ctx.voted:
            return []
        return self._publish_vtx(ev)

    def _publish_vtx(self, ev: EvaluationDone) -> list:
        ctx = self.ctx
        assert ctx is not None
        ctx.voted = True
        ctx.evaluating = False
        mode = self.genesis.hp["vote_ref"]
        vh = self.genesis.hp["vh_bp"]
        wtxs = sorted(ctx.wtxs.values(), key=lambda e: e.sender)
        voted = [e for e in wtxs if e.body["model"] in ev.local_bp]
        votes = []
        guard = self.genesis.hp.get("loss_guard", 0)
        if voted:
            ref = voting.reference_bp(mode, ev.global_bp, ev.trained_bp, [ev.local_bp[e.body["model"]] for e in voted])
            losses = [ev.local_loss.get(e.body["model"], 10**9) for e in voted]
            med_loss = voting.lower_median(losses)
            for e, loss in zip(voted, losses):
                acc = ev.local_bp[e.body["model"]]
                positive = voting.vote(ref, acc, vh) and voting.loss_guard_ok(loss, med_loss, guard)
                votes.append(
                    {
                        "wtx": e.id,
                        "worker": e.sender,
                        "model": e.body["model"],
                        "positive": positive,
                        "local_bp": acc,
                        "ref_bp": ref,
                        "loss_milli": loss,
                    }
                )
        if self.attack and self.attack.get("name") == "invert_votes":
            for v in votes:
                v["positive"] = not v["positive"]
        env = sign(self.key, make_vtx(self.genesis, self.state, self.me, [e.id for e in wtxs], votes))
        self.seen.add(env.id)
        ctx.vtxs[self.me] = env
        return [Publish(topic(self.run, "vtx", self.me), env.payload())]

    # -- miner --

    def _mine(self) -> list:
        ctx = self.ctx
        assert ctx is not None
        ctx.mining = True
        wtxs, vtxs = select_for_block(self.genesis, self.state, list(ctx.wtxs.values()), list(ctx.vtxs.values()))
        out = tally(self.genesis, self.state, self.me, wtxs, vtxs)
        wtx_by = {e.sender: e for e in wtxs}
        inputs = tuple((wtx_by[w].body["model"], wtx_by[w].body["n_train"]) for w in out.accepted)
        self._mine_txs = (wtxs, vtxs)
        if not inputs:
            return self._finish_mining(self.state.global_model)
        if inputs in self.aggregates:
            return self._finish_mining(self.aggregates[inputs])
        return [Aggregate("mine", inputs, self.state.global_model)]

    def _finish_mining(self, global_model: str) -> list:
        ctx = self.ctx
        assert ctx is not None
        wtxs, vtxs = self._mine_txs
        body = build_block(self.genesis, self.state, self.me, wtxs, vtxs, global_model)
        env = sign(self.key, body)
        ctx.mined = True
        self.seen.add(env.id)
        ctx.candidates[self.me] = env
        return [Publish(topic(self.run, "block", self.me), env.payload())]

    def _aggregate_done(self, ev: AggregateDone, now: float) -> list:
        ctx = self.ctx
        if ctx is None:
            return []
        if ev.model_hash is None:
            # missing blobs: ask their authors, retry shortly
            req = self._sync_request(
                ctx.round, now, (), target=self.sync_target if ctx.synced else None, blobs=sorted(ev.missing)[:64]
            )
            log.warning("%s: missing %d blob(s) for %s; requesting", self.me, len(ev.missing), ev.key)
            if ev.key == "mine":
                ctx.mining = False  # retried by _advance
                ctx.mine_retry_at = now + SYNC_RETRY_S
            else:
                ctx.sync_at = now + SYNC_RETRY_S
            return [req]
        if ev.key == "mine":
            if ctx.mined or not ctx.roles.is_miner(self.me):
                return []
            wtxs, vtxs = self._mine_txs
            out = tally(self.genesis, self.state, self.me, wtxs, vtxs)
            wtx_by = {e.sender: e for e in wtxs}
            self.aggregates[tuple((wtx_by[w].body["model"], wtx_by[w].body["n_train"]) for w in out.accepted)] = ev.model_hash
            return self._finish_mining(ev.model_hash)
        if ctx.checking != ev.key:
            return []
        blk = next((c for c in ctx.candidates.values() if c.id == ev.key), None)
        ctx.checking = None
        if blk is None:
            return []
        self.aggregates[tuple(aggregation_inputs(blk.body))] = ev.model_hash
        if ev.model_hash != blk.body["global_model"]:
            self.drops["invalid_block"] += 1
            log.warning("%s: block %s from %s: G_j hash differs from our FedAvg", self.me, blk.id[:12], blk.sender)
            ctx.rejected_blocks.add(blk.id)
            return self._decide(now)
        return self._commit(blk, now)

    # -- everyone: fork choice and append --

    def _decide(self, now: float) -> list:
        ctx = self.ctx
        assert ctx is not None
        for blk in fork_choice_order(self.state, list(ctx.candidates.values())):
            if blk.id in ctx.rejected_blocks:
                continue
            try:
                process_block(self.genesis, self.state, blk)
            except InvalidBlock as exc:
                self.drops["invalid_block"] += 1
                log.warning("%s: invalid block from %s: %s", self.me, blk.sender, exc)
                ctx.rejected_blocks.add(blk.id)
                continue
            inputs = tuple(aggregation_inputs(blk.body))
            if not inputs:
                return self._commit(blk, now)
            if inputs in self.aggregates:
                if self.aggregates[inputs] == blk.body["global_model"]:
                    return self._commit(blk, now)
                self.drops["invalid_block"] += 1
                ctx.rejected_blocks.add(blk.id)
                continue
            ctx.checking = blk.id
            return [Aggregate(blk.id, inputs, self.state.global_model)]
        return []

    def _commit(self, blk: Envelope, now: float) -> list:
        prev_state = self.state
        self.state = process_block(self.genesis, prev_state, blk)
        self.chain.append(blk)
        head = sign(
            self.key,
            {
                "run": self.run,
                "kind": "head",
                "round": self.state.height,
                "sender": self.me,
                "height": self.state.height,
                "head": self.state.head,
            },
        )
        acts: list = [
            CommitBlock(blk, self.state),
            Publish(topic(self.run, "head", self.me), head.payload(), retain=True),
            EvaluateGlobal(self.state.height, self.state.global_model),
        ]
        self.ctx = None
        # forget per-round memory that cannot matter any more
        self.seen = set()
        self.aggregates = {}
        return acts + self._begin_round(now)

    def _report(self, ev: GlobalEvaluated) -> list:
        body = {
            "run": self.run,
            "kind": "report",
            "round": ev.height,
            "sender": self.me,
            "head": self.chain[ev.height - 1].id if 0 < ev.height <= len(self.chain) else self.genesis.hash,
            "global_model": ev.model_hash,
            "acc_bp": ev.acc_bp,
            "stake": self.state.stake(self.me),
            "drops": dict(sorted(self.drops.items())),
            "extra": {k: v for k, v in ev.extra.items() if isinstance(v, int)},
        }
        env = sign(self.key, body)
        return [Publish(topic(self.run, "report", self.me), env.payload())]

    def _task_failed(self, ev: TaskFailed, now: float) -> list:
        log.error("%s: %s %s failed: %s", self.me, ev.task, ev.key, ev.error)
        ctx = self.ctx
        if ctx is None:
            return []
        if ev.task == "evaluate" and not ctx.voted:
            return self._publish_vtx(EvaluationDone(ctx.round, 0, None, {}))
        if ev.task == "aggregate" and ctx.checking == ev.key:
            ctx.checking = None
            ctx.rejected_blocks.add(ev.key)
            return self._decide(now)
        return []


@dataclass(frozen=True)
class BlobRequestAnswer:
    """Publish our own blob ``hash`` again (a peer asked for it)."""

    hash: str
