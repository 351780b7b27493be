"""The device's round state machine, sans-io (paper Section 5.3, Fig. 5).

``Node`` does no I/O and never blocks. The transport feeds it events -- a received MQTT
message, a finished training / evaluation / aggregation, the clock -- and carries out the
actions it returns: publish, store or delete a blob, train, evaluate, aggregate, persist or
roll back blocks. Heavy work is an action whose result comes back as an event, so the round
logic can be tested without a broker or a model (tests/simnet.py).

Round j, for a device whose chain head is block j-1. Each role has an explicit phase
(``WorkerPhase``, ``ValidatorPhase``, ``MinerPhase``, ``ChainPhase``); ``_advance`` is a table
of (role, phase, step) rules, and each ``enter_*`` step opens with its preconditions:
  1. roles = assign_roles(hash of block j-1, ...)                         (roles.py)
  2. worker    IDLE -> TRAINING -> SUBMITTED: train, publish blob + signed worker tx
  3. validator COLLECTING -> EVALUATING -> VOTED: when every worker's tx and blob arrived or
     the train deadline passed, evaluate and vote (Algorithm 1, ledger.cast_votes)
  4. miner     COLLECTING -> AGGREGATING -> PROPOSED: when every validator's tx arrived or the
     validate deadline passed, tally, aggregate the accepted updates, sign a candidate
  5. chain     WAITING -> CHECKING -> (commit): when every miner's candidate arrived or the
     mine deadline passed, fork choice over the set of candidates (ledger.fork_choice_order),
     process_block, check G_j by aggregating the accepted blobs itself, append.

Byzantine peers (docs/security.md): two different signed messages for one slot are evidence,
relayed and put in a block; a candidate that loses fork choice later, or evidence against the
head's miner, reorganises the chain (``Rollback``); a peer's head claim is a hint, dropped
when its blocks do not come; blobs are kept only when a transaction or block names them.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from .crypto import KeyPair, sha256_hex
from .genesis import Genesis
from .ledger import (
    InvalidBlock,
    Outcome,
    State,
    build_block,
    cast_votes,
    check_evidence,
    check_tx,
    equivocators,
    evidence_item,
    fork_choice_order,
    genesis_state,
    make_vtx,
    make_wtx,
    process_block,
    roles_for,
    select_for_block,
    slot,
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
SYNC_GIVEUP_S = 9.0  # a peer whose claimed blocks do not come in this time loses its claim
WTX_PULL_S = 5.0  # after the first worker tx of a round, ask for the missing ones this often
PULL_BATCH = 8  # blocks per catch-up answer
REORG_DEPTH = 2  # a better candidate for one of the last this many blocks reorganises
PENDING_BLOBS_PER_SENDER = 1  # blobs held in memory until a transaction names them


# ---- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class TrainingDone:
    round: int
    blob: bytes  # safetensors bytes of L_j^w


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
class DeleteBlob:
    """A blob this device stored for a round that no block of its chain names."""

    hash: str


@dataclass(frozen=True)
class Train:
    round: int
    base_model: str
    seed: int


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
    outcome: Outcome | None = None


@dataclass(frozen=True)
class Rollback:
    """Drop the blocks above ``height`` (a better candidate or evidence reorganises)."""

    height: int
    state: State


@dataclass(frozen=True)
class EvaluateGlobal:
    height: int
    model_hash: str


@dataclass(frozen=True)
class Finished:
    state: State


@dataclass(frozen=True)
class BlobRequestAnswer:
    """Publish our own blob ``hash`` again (a peer asked for it)."""

    hash: str


# ---- phases ---------------------------------------------------------------------------


class WorkerPhase(Enum):
    IDLE = "idle"
    TRAINING = "training"
    SUBMITTED = "submitted"


class ValidatorPhase(Enum):
    COLLECTING = "collecting"
    EVALUATING = "evaluating"
    VOTED = "voted"


class MinerPhase(Enum):
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    PROPOSED = "proposed"


class ChainPhase(Enum):
    WAITING = "waiting"
    CHECKING = "checking"  # aggregating a candidate's accepted blobs to check its G_j


@dataclass
class RoundCtx:
    round: int
    roles: Roles
    started: float
    wtxs: dict[str, Envelope] = field(default_factory=dict)  # id -> worker tx (two per equivocator)
    vtxs: dict[str, Envelope] = field(default_factory=dict)  # validator -> its first validator tx
    worker: WorkerPhase = WorkerPhase.IDLE
    validator: ValidatorPhase = ValidatorPhase.COLLECTING
    miner: MinerPhase = MinerPhase.COLLECTING
    chain: ChainPhase = ChainPhase.WAITING
    catching_up: bool = False  # the network has moved on: decide on what we hold, do no role work
    checking: str | None = None  # block id whose G_j is being aggregated
    retry_at: float = 0.0  # when to retry an aggregation that lacked blobs
    mine_txs: tuple = ()  # the (wtxs, vtxs, evidence) the miner is aggregating for
    mine_tries: int = 0
    waiting_logged: bool = False
    wtx_pull_at: float = 0.0  # when to ask missing workers to re-publish (0: not yet due)
    asked: set[str] = field(default_factory=set)  # worker tx ids a miner asked validators for

    def elapsed_ms(self, now: float) -> float:
        return (now - self.started) * 1000

    def models(self) -> set[str]:
        return {e.body["model"] for e in self.wtxs.values()}

    def workers_in(self) -> set[str]:
        return {e.sender for e in self.wtxs.values()}


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
        signed: list[Envelope] = (),
        resumed: bool = False,
    ):
        if genesis.pubkey(me) != key.public_hex:
            raise ValueError(f"{me}: key does not match the genesis entry")
        self.me = me
        self.key = key
        self.genesis = genesis
        self.run = genesis.run
        self.max_blob_bytes = max_blob_bytes
        self.have_blob = have_blob  # read-only view of the blob store
        self.states: list[State] = [genesis_state(genesis)]
        self.chain: list[Envelope] = []
        for blk in blocks or []:
            state, _ = process_block(genesis, self.state, blk)
            self.states.append(state)
            self.chain.append(blk)
        self.ctx: RoundCtx | None = None
        self.future: dict[int, list[Received]] = {}
        self.my_wtx: Envelope | None = None  # re-published when a peer reports it missing
        self.my_vtx: Envelope | None = None
        self.seen: set[str] = set()
        self.blobs: set[str] = set()  # stored (named by a tx or block we hold)
        self.own_blobs: set[str] = set()
        self.round_blobs: set[str] = set()  # stored during the current round
        self.pending: dict[str, dict[str, bytes]] = {}  # sender -> {hash: bytes} not yet named
        self.aggregates: dict[tuple, str] = {}
        self.drops: Counter[str] = Counter()
        self.duplicates = 0
        self.reorgs = 0
        self.finished = False
        # candidates for each height (gossiped or pulled), verdicts, evidence
        self.candidates: dict[int, dict[str, Envelope]] = {}
        self.invalid: set[str] = set()
        self.pulled: set[str] = set()  # candidates pulled from a peer that had appended them
        self.slots: dict[tuple, Envelope] = {}  # slot -> first message seen for it
        self.evidence: dict[str, dict] = {}  # equivocator -> evidence item
        self.block_evidence: dict[int, set[str]] = {}  # height -> miners that signed two blocks
        # chain sync: peers' head claims are hints
        self.peer_heights: dict[str, int] = {}
        self.claim_since: dict[str, float] = {}
        self.distrusted: dict[str, int] = {}  # peer -> our height when its claim failed
        self.sync_target: str | None = None
        self.next_pull = 0.0
        self.pull_from: int | None = None  # set when a peer's chain forks below our head
        # what this device signed before a restart (the shell's log): re-published, never re-signed
        self.signed: dict[tuple, Envelope] = {slot(e): e for e in signed if e.sender == me}
        self.slots.update(self.signed)
        self.resumed = resumed  # the process restarted: the round may have begun without us

    @property
    def state(self) -> State:
        return self.states[-1]

    @property
    def dl(self) -> dict[str, int]:
        return self.genesis.deadlines

    # -- public API --

    def start(self, now: float) -> list:
        return self._begin_round(now)

    def handle(self, event, now: float) -> list:
        if isinstance(event, Received):
            acts = self._receive(event, now)
        elif isinstance(event, TrainingDone):
            acts = self._training_done(event, now)
        elif isinstance(event, EvaluationDone):
            acts = self._evaluation_done(event, now)
        elif isinstance(event, AggregateDone):
            acts = self._aggregate_done(event, now)
        elif isinstance(event, GlobalEvaluated):
            acts = self._report(event)
        elif isinstance(event, TaskFailed):
            acts = self._task_failed(event, now)
        else:
            raise TypeError(f"unknown event {event!r}")
        return acts + self._advance(now)

    def tick(self, now: float) -> list:
        return self._advance(now)

    def role(self) -> str | None:
        return self.ctx.roles.role_of(self.me) if self.ctx else None

    def behind(self) -> bool:
        """A trusted peer claims a block we do not have (a hint, see ``_sync_step``)."""
        return bool(self._claims())

    # -- the round: phases and the rules that move them --

    def _begin_round(self, now: float) -> list:
        if self.state.height >= self.genesis.rounds:
            if not self.finished:
                self.finished = True
                return [Finished(self.state)]
            return []
        # (a knocked-out device gets no role from roles_for; it still follows the chain)
        j = self.state.height + 1
        self.ctx = RoundCtx(round=j, roles=roles_for(self.genesis, self.state), started=now)
        self.ctx.catching_up = self._network_moved_on(j)
        if self.resumed:  # restarted mid-run: ask for the round's txs we may have missed
            self.resumed = False
            self.ctx.wtx_pull_at = now + WTX_PULL_S
        self.round_blobs = set()
        acts: list = []
        pending = self.future.pop(j, [])
        for r in [r for r in self.future if r < j]:
            self.drops["stale_round"] += len(self.future.pop(r))
        for msg in pending:
            acts += self._receive(msg, now)
        return acts + self._advance(now)

    def _network_moved_on(self, j: int) -> bool:
        """We hold a candidate for round j that some block of round j+1 builds on, or that we
        pulled from a peer that has appended it: deciding now cannot wait for a deadline."""
        ids = set(self.candidates.get(j, {}))
        return bool(ids & self.pulled) or any(b.body.get("prev") in ids for b in self.candidates.get(j + 1, {}).values())

    def _advance(self, now: float) -> list:
        ctx = self.ctx
        if ctx is None or self.finished:
            return []
        acts: list = []
        for applies, step in self._rules():
            if self.ctx is not ctx:
                break  # a step committed a block: the new round has run its own rules
            if applies(ctx, now):
                acts += step(now)
        return acts + self._sync_step(now)

    def _rules(self):
        """(guard, step): the transitions of every role, in order. Guards read the phase."""
        me = self.me
        return (
            (lambda c, now: c.roles.is_worker(me) and c.worker is WorkerPhase.IDLE and self._may_work(c), self.enter_train),
            (lambda c, now: c.roles.is_validator(me) and c.validator is ValidatorPhase.COLLECTING
             and self._may_work(c) and self._validator_ready(c, now), self.enter_evaluate),
            (lambda c, now: c.roles.is_miner(me) and c.miner is MinerPhase.COLLECTING and self._may_work(c)
             and now >= c.retry_at and self._miner_ready(c, now), self.enter_mine),
            (lambda c, now: self._waiting_for_updates(c) and c.wtx_pull_at and now >= c.wtx_pull_at, self._pull_updates),
            (lambda c, now: c.chain is ChainPhase.WAITING and self._decision_due(c, now), self.enter_decide),
            (lambda c, now: c.chain is ChainPhase.CHECKING and c.retry_at and now >= c.retry_at, self._retry_check),
        )  # fmt: skip

    def _may_work(self, ctx: RoundCtx) -> bool:
        """Role work waits while a trusted peer claims blocks we lack (at most SYNC_GIVEUP_S
        per claim), and is skipped for a round the network has already finished."""
        return not ctx.catching_up and not self._claims()

    def _validator_ready(self, ctx: RoundCtx, now: float) -> bool:
        return self._updates_complete() or ctx.elapsed_ms(now) >= self.dl["train"]

    def _miner_ready(self, ctx: RoundCtx, now: float) -> bool:
        t = ctx.elapsed_ms(now)
        if validated(self.genesis):
            named_all = ctx.asked <= set(ctx.wtxs)
            return (set(ctx.roles.validators) <= set(ctx.vtxs) and named_all) or t >= self.dl["train"] + self.dl["validate"]
        return self._updates_complete() or t >= self.dl["train"]  # baselines: no votes

    def _waiting_for_updates(self, ctx: RoundCtx) -> bool:
        return (ctx.roles.is_validator(self.me) and ctx.validator is ValidatorPhase.COLLECTING) or (
            ctx.roles.is_miner(self.me) and ctx.miner is MinerPhase.COLLECTING
        )

    def _decision_due(self, ctx: RoundCtx, now: float) -> bool:
        cands = self.candidates.get(ctx.round, {})
        if not cands:
            late = ctx.elapsed_ms(now) >= self.dl["train"] + self.dl["validate"] + self.dl["mine"]
            if late and not ctx.waiting_logged:
                ctx.waiting_logged = True
                log.warning("%s: round %d: no candidate block by the deadline; waiting", self.me, ctx.round)
            return False
        all_in = set(ctx.roles.miners) <= {c.sender for c in cands.values()}
        late = ctx.elapsed_ms(now) >= self.dl["train"] + self.dl["validate"] + self.dl["mine"]
        return all_in or late or ctx.catching_up or self._network_moved_on(ctx.round)

    def _updates_complete(self) -> bool:
        ctx = self.ctx
        assert ctx is not None
        return set(ctx.roles.workers) <= ctx.workers_in() and ctx.models() <= self.blobs

    # -- receiving --

    def _receive(self, msg: Received, now: float) -> list:
        try:
            return self._dispatch(msg, now)
        except Drop as exc:
            self.drops[exc.reason] += 1
            log.info("%s: dropped %s (%s)", self.me, msg.topic, exc)
            return []
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            # a signed body of an unexpected shape: hostile or broken, never fatal
            self.drops["malformed"] += 1
            log.info("%s: dropped %s (malformed: %r)", self.me, msg.topic, exc)
            return []

    def _dispatch(self, msg: Received, now: float) -> list:
        tp = parse_topic(msg.topic)
        if tp.run != self.run:
            raise Drop("wrong_run", msg.topic)
        if tp.device is None or self.genesis.pubkey(tp.device) is None:
            raise Drop("unknown_sender", msg.topic)
        if tp.device in self.state.blacklist:
            raise Drop("blacklisted", tp.device)
        if tp.kind == "blob":
            return self._on_blob(tp.device, tp.extra, msg.payload)
        if tp.kind not in ("wtx", "vtx", "block", "sync", "head", "chain", "evidence"):
            raise Drop("unexpected_kind", tp.kind)
        env = decode(msg.payload)
        if env.kind != tp.kind or env.sender != tp.device:
            raise Drop("topic_mismatch", f"{env.kind}/{env.sender} on {msg.topic}")
        if env.body["run"] != self.run:
            raise Drop("wrong_run", env.body["run"])
        if env.id in self.seen:
            self.duplicates += 1
            return []
        handler = {
            "sync": self._on_sync, "head": self._on_head, "chain": self._on_chain, "evidence": self._on_evidence,
        }.get(env.kind)  # fmt: skip
        if handler is not None:
            return handler(env, now)
        if env.kind == "block":
            return self._on_block(env, now, pulled_from=None)
        ctx = self.ctx
        if ctx is None or env.round < ctx.round:
            raise Drop("stale_round", f"{env.kind} for round {env.round}")
        if env.round > ctx.round:
            return self._buffer(msg, env)
        return self._on_tx(env, now)

    def _buffer(self, msg: Received, env: Envelope) -> list:
        ctx = self.ctx
        assert ctx is not None
        if env.round > ctx.round + FUTURE_ROUNDS:
            raise Drop("future_round", f"round {env.round}")
        queue = self.future.setdefault(env.round, [])
        if len(queue) >= FUTURE_LIMIT:
            raise Drop("buffer_full", f"round {env.round}")
        queue.append(msg)
        return []

    def _on_tx(self, env: Envelope, now: float) -> list:
        ctx = self.ctx
        assert ctx is not None
        check_tx(self.genesis, self.state, env, ctx.roles)
        self.seen.add(env.id)
        acts = self._note_slot(env, now)
        if env.kind == "wtx":
            if sum(1 for e in ctx.wtxs.values() if e.sender == env.sender) < 2:
                ctx.wtxs[env.id] = env
                acts += self._adopt_pending(env.sender, env.body["model"])
            if not ctx.wtx_pull_at:
                ctx.wtx_pull_at = now + WTX_PULL_S
        else:
            ctx.vtxs.setdefault(env.sender, env)
            acts += self._fetch_named_txs(env, now)
        return acts

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
        return [self._sync_request(ctx.round, now, ("txs", vtx.sender), target=vtx.sender, tx_ids=unknown[:64], blobs=[])]

    # -- equivocation evidence --

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
        if who not in self.evidence and who not in self.state.slashed:
            self.evidence[who] = item
            log.warning("%s: %s signed two %s messages for round %d: evidence", self.me, who, a.kind, a.round)
            if publish:
                body = {"run": self.run, "kind": "evidence", "round": a.round, "sender": self.me, "item": item}
                env = sign(self.key, body)
                self.seen.add(env.id)
                acts.append(Publish(topic(self.run, "evidence", self.me), env.payload()))
        if a.kind == "block" and who not in self.block_evidence.setdefault(a.round, set()):
            self.block_evidence[a.round].add(who)
            acts += self._reconsider(a.round, now)
        return acts

    def _on_evidence(self, env: Envelope, now: float) -> list:
        check_signature(env, self.genesis.pubkey(env.sender))
        self.seen.add(env.id)
        if set(env.body) != {"run", "kind", "round", "sender", "item"}:
            raise Drop("malformed", "evidence fields")
        try:
            return self._learn_evidence(env.body["item"], now, publish=False)
        except Drop as exc:
            raise Drop("bad_evidence", exc.detail) from None

    # -- blobs: stored only when a transaction or block names them --

    def _on_blob(self, sender: str, blob_hash: str, data: bytes) -> list:
        if len(data) > self.max_blob_bytes:
            raise Drop("too_large", f"blob of {len(data)} bytes")
        if sha256_hex(data) != blob_hash:
            raise Drop("hash_mismatch", f"blob from {sender}")
        if blob_hash in self.blobs:
            self.duplicates += 1
            return []
        if blob_hash in self._wanted():
            return self._accept_blob(blob_hash, data)
        # not (yet) named: e.g. a worker's blob that arrives before its worker tx. Held in
        # memory, at most PENDING_BLOBS_PER_SENDER per sender, until a tx names it.
        held = self.pending.setdefault(sender, {})
        if blob_hash not in held and len(held) >= PENDING_BLOBS_PER_SENDER:
            raise Drop("too_many_blobs", sender)
        held[blob_hash] = data
        return []

    def _adopt_pending(self, sender: str, blob_hash: str) -> list:
        data = self.pending.get(sender, {}).pop(blob_hash, None)
        if data is None or blob_hash in self.blobs:
            return []
        return self._accept_blob(blob_hash, data)

    def _accept_blob(self, blob_hash: str, data: bytes) -> list:
        self.blobs.add(blob_hash)
        self.round_blobs.add(blob_hash)
        return [StoreBlob(blob_hash, data)]

    def _wanted(self) -> set[str]:
        """Blobs named by this round's worker txs or by candidate blocks we may check."""
        ctx = self.ctx
        wanted = set(ctx.models()) if ctx is not None else set()
        for h in (self.state.height, self.state.height + 1):
            for blk in self.candidates.get(h, {}).values():
                wanted |= set(_named_models(blk))
        return wanted

    # -- chain sync: candidates, head hints, pull --

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
            return []
        if sum(1 for c in held.values() if c.sender == env.sender) >= 2:
            raise Drop("equivocation", f"third block from {env.sender}")
        held[env.id] = env
        if pulled_from is not None and self.peer_heights.get(pulled_from, 0) >= h:
            self.pulled.add(env.id)  # its sender has appended it: the network moved on
        acts = self._note_slot(env, now)
        if h <= head_h:
            acts += self._reconsider(h, now)
        elif self.ctx is not None and self._network_moved_on(self.ctx.round):
            self.ctx.catching_up = True
        return acts

    def _on_head(self, env: Envelope, now: float) -> list:
        check_signature(env, self.genesis.pubkey(env.sender))
        height, head = env.body.get("height"), env.body.get("head")
        if not isinstance(height, int) or height < 0 or height > self.genesis.rounds or not valid_hash(head):
            raise Drop("malformed", "head")
        mine = self.states[height].head if height <= self.state.height else None
        if height > self.state.height and self.distrusted.get(env.sender) != self.state.height:
            if self.peer_heights.get(env.sender, -1) < height:
                self.peer_heights[env.sender] = height
                self.claim_since.setdefault(env.sender, now)
        elif mine is not None and head != mine and height > self.state.height - REORG_DEPTH and height >= 1:
            # a peer's head differs from ours at that height: fetch its block (it may be the
            # better candidate, or the second block of an equivocating miner)
            known = any(c.id == head for c in self.candidates.get(height, {}).values())
            if not known:
                return [self._sync_request(height, now, ("fork", env.sender), target=env.sender, from_height=height, blobs=[])]
        return []

    def _claims(self) -> dict[str, int]:
        return {d: h for d, h in self.peer_heights.items() if h > self.state.height}

    def _sync_step(self, now: float) -> list:
        """Pull from the most advanced trusted claimer; a claim whose blocks do not come
        within SYNC_GIVEUP_S is dropped and its peer distrusted until our height moves."""
        claims = self._claims()
        for d in [d for d in self.peer_heights if d not in claims]:
            self.peer_heights.pop(d)
            self.claim_since.pop(d, None)
        for d in [d for d in claims if now - self.claim_since.get(d, now) > SYNC_GIVEUP_S]:
            log.warning("%s: %s claimed height %d but sent no block; ignoring its claim", self.me, d, claims.pop(d))
            self.peer_heights.pop(d)
            self.claim_since.pop(d, None)
            self.distrusted[d] = self.state.height
            self.drops["bad_claim"] += 1
        if not claims or now < self.next_pull:
            return []
        self.next_pull = now + SYNC_RETRY_S
        self.sync_target = max(sorted(claims), key=lambda d: claims[d])
        log.info("%s: behind at height %d; pulling blocks from %s", self.me, self.state.height, self.sync_target)
        h = self.state.height + 1
        if self.pull_from is not None and self.pull_from > self.state.height - REORG_DEPTH:
            h = self.pull_from
        self.pull_from = None
        return [self._sync_request(h, now, ("pull",), target=self.sync_target, from_height=h, blobs=[])]

    def _sync_request(self, round_: int, now: float, tag: tuple, **fields) -> Publish:
        """A signed pull request (missing txs, blocks or blobs) on our sync topic."""
        body = {"run": self.run, "kind": "sync", "round": round_, "sender": self.me, **fields}
        body["nonce"] = _seed(now, self.me, *tag)
        req = sign(self.key, body)
        self.seen.add(req.id)
        return Publish(topic(self.run, "sync", self.me), req.payload())

    def _pull_updates(self, now: float) -> list:
        """Ask workers (and, for a miner, validators) whose tx or blob has not arrived to
        publish them again: a message can be lost, or this device restarted mid-round."""
        ctx = self.ctx
        assert ctx is not None
        ctx.wtx_pull_at = now + WTX_PULL_S
        missing = sorted(set(ctx.roles.workers) - ctx.workers_in())
        vtx_of = sorted(set(ctx.roles.validators) - set(ctx.vtxs)) if ctx.roles.is_miner(self.me) else []
        blobs = sorted(ctx.models() - self.blobs)
        if not missing and not blobs and not vtx_of:
            return []
        log.info("%s: round %d: asking %d peer(s) to re-publish", self.me, ctx.round, len(missing) + len(blobs) + len(vtx_of))
        return [self._sync_request(ctx.round, now, ("wtx",), wtx_of=missing, vtx_of=vtx_of, blobs=blobs[:64])]

    def _on_sync(self, env: Envelope, now: float) -> list:
        check_signature(env, self.genesis.pubkey(env.sender))
        self.seen.add(env.id)
        b = env.body
        hashes, wtx_of, vtx_of, tx_ids = b.get("blobs", []), b.get("wtx_of", []), b.get("vtx_of", []), b.get("tx_ids", [])
        for name, value in (("blobs", hashes), ("wtx_of", wtx_of), ("vtx_of", vtx_of), ("tx_ids", tx_ids)):
            if not isinstance(value, list) or len(value) > 64 or not all(isinstance(x, str) for x in value):
                raise Drop("malformed", f"sync.{name}")
        if not all(valid_hash(h) for h in hashes):
            raise Drop("malformed", "sync.blobs")
        targeted = b.get("target") == self.me
        acts: list = []
        ctx = self.ctx
        current = ctx is not None and env.round == ctx.round
        for mine, asked in ((self.my_wtx, wtx_of), (self.my_vtx, vtx_of)):
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
            acts.append(Publish(topic(self.run, "chain", self.me), sign(self.key, body).payload()))
        start = b.get("from_height")
        if targeted and isinstance(start, int) and not isinstance(start, bool) and 1 <= start <= len(self.chain):
            blocks = self.chain[start - 1 : start - 1 + PULL_BATCH]
            body = {
                "run": self.run,
                "kind": "chain",
                "round": start,
                "sender": self.me,
                "to": env.sender,
                "blocks": [blk.to_json() for blk in blocks],
            }
            acts.append(Publish(topic(self.run, "chain", self.me), sign(self.key, body).payload()))
        return acts

    def _on_chain(self, env: Envelope, now: float) -> list:
        """An answer to our pull: each block passes the same rules as a gossiped one."""
        if env.body.get("to") != self.me:
            return []  # an answer to someone else
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
                self.drops[exc.reason] += 1
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
                self.drops[exc.reason] += 1
                if exc.reason == "wrong_prev" and blk is not None and blk.body.get("height") == self.state.height + 1 >= 2:
                    # the peer's chain forks below our head: next time pull from our height
                    self.pull_from = self.state.height
        if got and env.sender in self.claim_since:
            self.claim_since[env.sender] = now  # the claimer delivers: keep its claim alive
        return acts

    # -- worker --

    def enter_train(self, now: float) -> list:
        """Enter TRAINING. Preconditions: a worker of the round, IDLE, not catching up."""
        ctx = self.ctx
        assert ctx is not None and ctx.roles.is_worker(self.me) and ctx.worker is WorkerPhase.IDLE
        ctx.worker = WorkerPhase.TRAINING
        before = self._signed_before("wtx")
        if before is not None:  # signed before a restart: publish that one again
            ctx.worker = WorkerPhase.SUBMITTED
            ctx.wtxs[before.id] = self.my_wtx = before
            self.own_blobs.add(before.body["model"])
            if self.have_blob(before.body["model"]):
                self.blobs.add(before.body["model"])
            return [Publish(topic(self.run, "wtx", self.me), before.payload()), BlobRequestAnswer(before.body["model"])]
        return [Train(ctx.round, self.state.global_model, _seed(self.run, self.me, ctx.round))]

    def _signed_before(self, kind: str) -> Envelope | None:
        """Our own message of this kind for the current slot, signed before a restart."""
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
        self.slots[slot(env)] = env
        ctx.wtxs[env.id] = env
        self.my_wtx = env
        acts = self._accept_blob(model_hash, ev.blob)
        acts.append(Publish(topic(self.run, "blob", self.me, model_hash), ev.blob))
        acts.append(Publish(topic(self.run, "wtx", self.me), env.payload()))
        return acts

    # -- validator --

    def enter_evaluate(self, now: float) -> list:
        """Enter EVALUATING. Preconditions: a validator of the round, COLLECTING, and every
        worker's tx and blob in or the train deadline passed."""
        ctx = self.ctx
        assert ctx is not None and ctx.roles.is_validator(self.me) and ctx.validator is ValidatorPhase.COLLECTING
        before = self._signed_before("vtx")
        if before is not None:
            ctx.validator = ValidatorPhase.VOTED
            ctx.vtxs[self.me] = self.my_vtx = before
            return [Publish(topic(self.run, "vtx", self.me), before.payload())]
        models = tuple(sorted(ctx.models() & self.blobs))
        if not models:
            return self._publish_vtx(EvaluationDone(ctx.round, 0, None, {}))
        ctx.validator = ValidatorPhase.EVALUATING
        want_trained = self.genesis.hp["vote_ref"] == "trained"
        return [Evaluate(ctx.round, self.state.global_model, models, want_trained, _seed(self.run, self.me, ctx.round, "ref"))]

    def _evaluation_done(self, ev: EvaluationDone, now: float) -> list:
        ctx = self.ctx
        if ctx is None or ev.round != ctx.round or ctx.validator is not ValidatorPhase.EVALUATING:
            return []
        return self._publish_vtx(ev)

    def _publish_vtx(self, ev: EvaluationDone) -> list:
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
        self.slots[slot(env)] = env
        ctx.vtxs[self.me] = env
        self.my_vtx = env
        return [Publish(topic(self.run, "vtx", self.me), env.payload())]

    # -- miner --

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
            return [Publish(topic(self.run, "block", self.me), before.payload())]
        evidence = [item for d, item in sorted(self.evidence.items()) if d not in self.state.slashed]
        wtxs = _one_per_worker(list(ctx.wtxs.values()), {d for d in self.evidence if d not in self.state.slashed})
        wtxs, vtxs = select_for_block(self.genesis, self.state, wtxs, list(ctx.vtxs.values()))
        out = tally(self.genesis, self.state, self.me, wtxs, vtxs, _doubled(wtxs))
        ctx.mine_txs = (wtxs, vtxs, evidence)
        if not out.inputs:
            return self._propose(self.state.global_model)
        if out.inputs in self.aggregates:
            return self._propose(self.aggregates[out.inputs])
        return [Aggregate("mine", out.inputs, self.state.global_model)]

    def _propose(self, global_model: str) -> list:
        """Enter PROPOSED: sign and publish the candidate block."""
        ctx = self.ctx
        assert ctx is not None
        wtxs, vtxs, evidence = ctx.mine_txs
        body = build_block(self.genesis, self.state, self.me, wtxs, vtxs, global_model, evidence)
        env = sign(self.key, body)
        ctx.miner = MinerPhase.PROPOSED
        self.seen.add(env.id)
        self.slots[slot(env)] = env
        self.candidates.setdefault(ctx.round, {})[env.id] = env
        return [Publish(topic(self.run, "block", self.me), env.payload())]

    def _aggregate_done(self, ev: AggregateDone, now: float) -> list:
        ctx = self.ctx
        if ctx is None:
            return []
        if ev.model_hash is None:
            return self._blobs_missing(ev, now)
        if ev.key == "mine":
            if ctx.miner is not MinerPhase.AGGREGATING:
                return []
            wtxs, vtxs, _ = ctx.mine_txs
            self.aggregates[tally(self.genesis, self.state, self.me, wtxs, vtxs, _doubled(wtxs)).inputs] = ev.model_hash
            return self._propose(ev.model_hash)
        if ctx.checking != ev.key:
            return []
        blk = self.candidates.get(ctx.round, {}).get(ev.key)
        ctx.checking, ctx.chain, ctx.retry_at = None, ChainPhase.WAITING, 0.0
        if blk is None:
            return []
        _, outcome = process_block(self.genesis, self.state, blk)
        self.aggregates[outcome.inputs] = ev.model_hash
        if ev.model_hash != blk.body["global_model"]:
            self._reject(blk, "wrong_global_model", "G_j differs from our aggregate")
            return self.enter_decide(now)
        if next((c for c in self._ordered(ctx.round) if c.id not in self.invalid), None) is not blk:
            return self.enter_decide(now)  # a better candidate or evidence came meanwhile
        return self._commit(blk, now)

    def _blobs_missing(self, ev: AggregateDone, now: float) -> list:
        """An aggregation lacked blobs: ask for them and retry. A miner that still lacks them
        when the mine deadline passes leaves those updates out; a device checking a
        candidate gives up on it then and takes the next in fork-choice order."""
        ctx = self.ctx
        assert ctx is not None
        late = ctx.elapsed_ms(now) >= self.dl["train"] + self.dl["validate"] + self.dl["mine"]
        target = self.sync_target if ctx.catching_up else None
        if ev.key == "mine":
            ctx.miner = MinerPhase.COLLECTING
            if late:
                missing = set(ev.missing)
                ctx.wtxs = {i: e for i, e in ctx.wtxs.items() if e.body["model"] not in missing}
                ctx.vtxs = {d: v for d, v in ctx.vtxs.items() if set(v.body["verified"]) <= set(ctx.wtxs)}
        elif ctx.checking == ev.key:
            blk = self.candidates.get(ctx.round, {}).get(ev.key)
            if late and not ctx.catching_up and blk is not None:
                ctx.checking, ctx.chain = None, ChainPhase.WAITING
                self._reject(blk, "unavailable", "its accepted updates' blobs never came")
                return self.enter_decide(now)
            target = blk.sender if blk is not None and not ctx.catching_up else target
        else:
            return []
        ctx.retry_at = now + SYNC_RETRY_S
        log.warning("%s: missing %d blob(s) for %s; requesting", self.me, len(ev.missing), ev.key)
        return [self._sync_request(ctx.round, now, (ev.key,), target=target, blobs=sorted(ev.missing)[:64])]

    def _retry_check(self, now: float) -> list:
        ctx = self.ctx
        assert ctx is not None
        ctx.retry_at = 0.0
        blk = self.candidates.get(ctx.round, {}).get(ctx.checking or "")
        if blk is None:
            ctx.checking, ctx.chain = None, ChainPhase.WAITING
            return []
        _, outcome = process_block(self.genesis, self.state, blk)
        return [Aggregate(blk.id, outcome.inputs, self.state.global_model)]

    # -- everyone: fork choice, append, reorganise --

    def _ordered(self, height: int) -> list[Envelope]:
        parent = self.states[height - 1]
        cands = [c for c in self.candidates.get(height, {}).values() if c.body.get("prev") == parent.head]
        bad = equivocators(cands) | self.block_evidence.get(height, set())
        return fork_choice_order(parent, cands, bad)

    def enter_decide(self, now: float) -> list:
        """Enter CHECKING for the best candidate in fork-choice order that is not known
        invalid; commit it at once when its G_j is already known."""
        ctx = self.ctx
        assert ctx is not None and ctx.chain is ChainPhase.WAITING
        for blk in self._ordered(ctx.round):
            if blk.id in self.invalid:
                continue
            try:
                _, outcome = process_block(self.genesis, self.state, blk)
            except InvalidBlock as exc:
                self._reject(blk, exc.reason, exc.detail)
                continue
            if not outcome.inputs:
                return self._commit(blk, now)
            if outcome.inputs in self.aggregates:
                if self.aggregates[outcome.inputs] == blk.body["global_model"]:
                    return self._commit(blk, now)
                self._reject(blk, "wrong_global_model", "G_j differs from our aggregate")
                continue
            ctx.chain, ctx.checking = ChainPhase.CHECKING, blk.id
            return [Aggregate(blk.id, outcome.inputs, self.state.global_model)]
        return []

    def _reject(self, blk: Envelope, reason: str, detail: str) -> None:
        self.invalid.add(blk.id)
        self.drops[reason] += 1
        log.warning("%s: invalid block %s from %s: %s: %s", self.me, blk.id[:12], blk.sender, reason, detail)

    def _commit(self, blk: Envelope, now: float) -> list:
        state, outcome = process_block(self.genesis, self.state, blk)
        self.states.append(state)
        self.chain.append(blk)
        for d in self.distrusted:
            self.distrusted[d] = -1  # our height moved: claims count again
        acts: list = [CommitBlock(blk, state, outcome), self._head_message()]
        named = {state.global_model} | self.own_blobs
        for cand in self.candidates.get(state.height, {}).values():
            named |= set(_named_models(cand))
        acts += [DeleteBlob(h) for h in sorted(self.round_blobs - named)]
        self.blobs -= self.round_blobs - named
        acts.append(EvaluateGlobal(state.height, state.global_model))
        self.ctx = None
        self.seen = set()  # dedupe is per round; older messages are stale or held candidates
        self.pending = {}
        self.aggregates = {}
        for h in [h for h in self.candidates if h < state.height - REORG_DEPTH]:
            del self.candidates[h]
        self.slots = {k: v for k, v in self.slots.items() if k[2] > state.height - REORG_DEPTH}
        return acts + self._begin_round(now)

    def _head_message(self) -> Publish:
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
        return Publish(topic(self.run, "head", self.me), head.payload(), retain=True)

    def _reconsider(self, height: int, now: float) -> list:
        """A new candidate or evidence for a height we already appended: when fork choice now
        puts another candidate first, roll back to its parent and decide that height again."""
        if not 1 <= height <= self.state.height or height <= self.state.height - REORG_DEPTH:
            return []
        ours = self.chain[height - 1].id
        for blk in self._ordered(height):
            if blk.id == ours:
                return []
            if blk.id not in self.invalid:
                break
        else:
            return []
        log.warning("%s: a better candidate for height %d: reorganising", self.me, height)
        self.reorgs += 1
        self.states = self.states[:height]
        self.chain = self.chain[: height - 1]
        self.ctx = None
        self.finished = False
        return [Rollback(height - 1, self.state)] + self._begin_round(now)

    def _report(self, ev: GlobalEvaluated) -> list:
        if ev.height > len(self.chain):
            return []  # rolled back since
        body = {
            "run": self.run,
            "kind": "report",
            "round": ev.height,
            "sender": self.me,
            "head": self.chain[ev.height - 1].id if 0 < ev.height else self.genesis.hash,
            "global_model": ev.model_hash,
            "acc_bp": ev.acc_bp,
            "stake": self.states[ev.height].stake(self.me),
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
        if ev.task == "evaluate" and ctx.validator is ValidatorPhase.EVALUATING:
            return self._publish_vtx(EvaluationDone(ctx.round, 0, None, {}))
        if ev.task == "aggregate" and ctx.checking == ev.key:
            ctx.checking, ctx.chain = None, ChainPhase.WAITING
            self.invalid.add(ev.key)
            return self.enter_decide(now)
        if ev.task == "aggregate" and ev.key == "mine" and ctx.miner is MinerPhase.AGGREGATING:
            ctx.miner = MinerPhase.COLLECTING
            ctx.retry_at = now + SYNC_RETRY_S
        return []


def _named_models(blk: Envelope) -> list[str]:
    """Blob hashes a (not yet validated) block names: its worker txs' models."""
    out = []
    wtxs = blk.body.get("wtxs")
    for raw in wtxs if isinstance(wtxs, list) else []:
        model = raw.get("body", {}).get("model") if isinstance(raw, dict) and isinstance(raw.get("body"), dict) else None
        if valid_hash(model):
            out.append(model)
    return out


def _doubled(wtxs: list[Envelope]) -> frozenset[str]:
    senders = Counter(w.sender for w in wtxs)
    return frozenset(d for d, n in senders.items() if n > 1)


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
