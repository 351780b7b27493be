"""The device's round state machine, sans-io (paper Section 5.3, Fig. 5).

``Node`` does no I/O and never blocks. The transport feeds it events -- a received MQTT
message, a finished training / evaluation / aggregation, the clock -- and carries out the
actions it returns: publish, store or delete a blob, train, evaluate, aggregate, persist or
roll back blocks. Heavy work is an action whose result comes back as an event, so the round
logic can be tested without a broker or a model (tests/simnet.py).

Round j, for a device whose chain head is block j-1. Each role has an explicit phase
(``WorkerPhase``, ``ValidatorPhase``, ``MinerPhase``, ``ChainPhase``, in round.py); ``_rules``
is the table of (guard on role and phase, step) transitions that ``_advance`` runs, and each
``enter_*`` step opens with its preconditions. Each role's steps are in their own module:
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

import logging
from collections import Counter

from .chain_sync import ChainSync
from .crypto import KeyPair, sha256_hex
from .evidence import EvidenceBook
from .genesis import Genesis
from .ledger import (
    InvalidBlock,
    Outcome,
    State,
    check_tx,
    equivocators,
    fork_choice_order,
    genesis_state,
    process_block,
    roles_for,
    slot,
    validated,
)
from .messages import (
    DEFAULT_MAX_BLOB_BYTES,
    Drop,
    Envelope,
    check_signature,
    decode,
    decode_block,
    parse_topic,
    sign,
    topic,
    valid_hash,
)
from .miner import MinerSteps
from .round import *  # noqa: F403  (events, actions, phases: re-exported for the shell)
from .round import (
    PULL_GRACE_S,
    BLOB_GRACE_MIN_S,
    CHECK_TRIES,
    FUTURE_LIMIT,
    FUTURE_ROUNDS,
    PENDING_BLOBS_PER_SENDER,
    REORG_DEPTH,
    SYNC_RETRY_S,
    WTX_PULL_S,
    Aggregate,
    AggregateDone,
    ChainPhase,
    CommitBlock,
    DeleteBlob,
    Dropped,
    EvaluateGlobal,
    HostBlob,
    Score,
    EvaluationDone,
    Finished,
    GlobalEvaluated,
    MinerPhase,
    Publish,
    Received,
    Rollback,
    RoundCtx,
    RoundStarted,
    StoreBlob,
    TaskFailed,
    TrainingDone,
    ValidatorPhase,
    WorkerPhase,
)
from .round import __all__ as _round_names
from .validator import ValidatorSteps
from .worker import WorkerSteps

log = logging.getLogger("bfl.node")

__all__ = ["Node", *_round_names]


class Node(WorkerSteps, ValidatorSteps, MinerSteps, ChainSync, EvidenceBook):
    """One device's protocol state. The steps of each role live in their own module
    (worker.py, validator.py, miner.py; chain_sync.py and evidence.py for everyone); this
    class holds the state, dispatches events, and ``_rules`` is the transition table."""

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
        self.my_wtx_at = 0.0  # ... unless we published it less than WTX_PULL_S ago (in flight)
        self.my_vtx_at = 0.0  # (the same for our validator tx)
        self.my_vtx: Envelope | None = None
        self.seen: set[str] = set()
        self.blobs: set[str] = set()  # stored (named by a tx or block we hold)
        self.own_blobs: set[str] = set()
        self.round_blobs: set[str] = set()  # stored during the current round
        self.pending: dict[str, dict[str, bytes]] = {}  # sender -> {hash: bytes} not yet named
        # transactions of rounds before the current one, for rebuilding compact blocks that
        # come late (a competing candidate, a reorganisation): id -> tx, and the full blocks
        # asked of their miners because a transaction was missing
        self.old_txs: dict[str, Envelope] = {}
        self.incomplete: dict[str, tuple[Received, Envelope, float]] = {}  # block id -> (message, header, since)
        self.blocks_asked: set[str] = set()
        self.aggregates: dict[tuple, str] = {}
        self.drops: Counter[str] = Counter()
        self.duplicates = 0
        self.outbox: list = []  # actions raised deep in a step (drops), returned with its result
        self.reorgs = 0
        self.finished = False
        self.peers_finished: set[str] = set()  # peers that claim the run's last block (see agent.py)
        # candidates for each height (gossiped or pulled), verdicts, evidence
        self.candidates: dict[int, dict[str, Envelope]] = {}
        self.invalid: set[str] = set()
        self.processed: dict[str, tuple[State, Outcome]] = {}  # candidate id -> process_block's result
        self.named: dict[str, frozenset[str]] = {}  # candidate id -> the models it names (_named)
        self.unavailable: set[str] = set()  # candidates whose accepted blobs never came (until a peer has them)
        self.blob_source: dict[str, str] = {}  # candidate -> a peer that appended it (holds its blobs)
        self.pulled: set[str] = set()  # candidates pulled from a peer that had appended them
        self.slots: dict[tuple, Envelope] = {}  # slot -> first message seen for it
        self.evidence: dict[str, dict] = {}  # equivocator -> evidence item
        self.block_evidence: dict[int, set[str]] = {}  # height -> miners that signed two blocks
        # chain sync: peers' head claims are hints
        self.peer_heights: dict[str, int] = {}
        self.claim_since: dict[str, float] = {}
        self.asked_at: dict[str, float] = {}  # claimer -> when we first pulled from it for its claim
        self.distrusted: dict[str, int] = {}  # peer -> the height it claimed and did not deliver
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
        return self._flush(self._begin_round(now))

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
        elif isinstance(event, HostBlob):
            ok = event.hash in self.missing_blobs() and sha256_hex(event.data) == event.hash
            acts = self._accept_blob(event.hash, event.data) if ok else []
        else:
            raise TypeError(f"unknown event {event!r}")
        return self._flush(acts + self._advance(now))

    def tick(self, now: float) -> list:
        return self._flush(self._advance(now))

    def _flush(self, acts: list) -> list:
        out, self.outbox = self.outbox + acts, []
        return out

    def _count(self, reason: str, n: int = 1) -> None:
        """A dropped message: counted here (for the report) and told to the shell."""
        if n <= 0:
            return
        if reason == "duplicate":
            self.duplicates += n
        else:
            self.drops[reason] += n
        self.outbox.append(Dropped(reason, n))

    def role(self) -> str | None:
        return self.ctx.roles.role_of(self.me) if self.ctx else None

    # -- the round: phases and the rules that move them --

    def _begin_round(self, now: float, catching_up: bool = False) -> list:
        if self.state.height >= self.genesis.rounds:
            if not self.finished:
                self.finished = True
                return [Finished(self.state)]
            return []
        # (a knocked-out device gets no role from roles_for; it still follows the chain)
        j = self.state.height + 1
        self.ctx = RoundCtx(round=j, roles=roles_for(self.genesis, self.state), started=now)
        self.outbox.append(RoundStarted(j, self.ctx.roles.role_of(self.me) or "idle"))
        self.ctx.catching_up = catching_up or self._network_moved_on(j)
        if self.resumed:  # restarted mid-run: ask for the round's txs we may have missed
            self.resumed = False
            self.ctx.wtx_pull_at = now + WTX_PULL_S
        self.round_blobs = set()
        acts: list = []
        pending = self.future.pop(j, [])
        for r in [r for r in self.future if r < j]:
            self._count("stale_round", len(self.future.pop(r)))
        for msg in pending:
            acts += self._receive(msg, now)
        return acts + self._advance(now)

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
        if self.incomplete:
            acts += self._ask_incomplete(now)
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
        return self._updates_complete() or ctx.elapsed_ms(now) >= self.dl["train"] or self._blob_grace_over(ctx, now)

    def _blob_grace_over(self, ctx: RoundCtx, now: float) -> bool:
        """Every worker's tx is in but some blob is not, for longer than a tenth of the train
        deadline (at least BLOB_GRACE_MIN_S): a worker that never publishes the model it names
        costs the round that grace, not the whole train deadline."""
        if not set(ctx.roles.workers) <= ctx.workers_in():
            return False
        if not ctx.all_wtx_at:
            ctx.all_wtx_at = now
        return now - ctx.all_wtx_at >= max(BLOB_GRACE_MIN_S, self.dl["train"] / 10_000)

    def _miner_ready(self, ctx: RoundCtx, now: float) -> bool:
        t = ctx.elapsed_ms(now)
        if validated(self.genesis):
            named_all = ctx.asked <= set(ctx.wtxs)
            return (set(ctx.roles.validators) <= set(ctx.vtxs) and named_all) or t >= self.dl["train"] + self.dl[
                "validate"
            ]
        return self._updates_complete() or t >= self.dl["train"] or self._blob_grace_over(ctx, now)  # baselines

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
            self._count(exc.reason)
            log.info("%s: dropped %s (%s)", self.me, msg.topic, exc)
            return []
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            # a signed body of an unexpected shape: hostile or broken, never fatal
            self._count("malformed")
            log.info("%s: dropped %s (malformed: %r)", self.me, msg.topic, exc)
            return []

    def _dispatch(self, msg: Received, now: float) -> list:
        tp = parse_topic(msg.topic)
        if tp.run != self.run:
            raise Drop("wrong_run", msg.topic)
        if tp.device is None or self.genesis.pubkey(tp.device) is None:
            raise Drop("unknown_sender", msg.topic)
        if tp.device in self.state.blacklist and tp.kind != "block":
            # (a block is judged against the state it builds on, in _on_block: the other block
            # of a miner that equivocated at the height just appended -- and was blacklisted
            # by that very block -- is the evidence that makes the device reorganise)
            raise Drop("blacklisted", tp.device)
        if tp.kind == "blob":
            return self._on_blob(tp.device, tp.extra, msg.payload)
        if tp.kind not in ("wtx", "vtx", "block", "sync", "head", "chain", "evidence"):
            raise Drop("unexpected_kind", tp.kind)
        missing: list[str] = []
        if tp.kind == "block":  # full or compact (messages.decode_block)
            env, missing = decode_block(msg.payload, self._tx_held)
        else:
            env = decode(msg.payload)
        if env.kind != tp.kind or env.sender != tp.device:
            raise Drop("topic_mismatch", f"{env.kind}/{env.sender} on {msg.topic}")
        if env.body["run"] != self.run:
            raise Drop("wrong_run", env.body["run"])
        if env.id in self.seen or env.sender == self.me:
            # (our own messages come back from the broker: we hold what we signed, and the
            # shell may have rewritten it on the way out -- fault injection, byzantine.py)
            if env.id not in self.seen and env.kind in ("wtx", "vtx"):
                # signed with our key, not by us (rewritten on the way out, or our key is
                # known to someone else): a miner may have put it in a block we must rebuild
                check_signature(env, self.key.public_hex)
                self._count("duplicate")
                self.old_txs[env.id] = env
                return self._retry_incomplete(now) if self.incomplete else []
            self._count("duplicate")
            return []
        handler = {
            "sync": self._on_sync, "head": self._on_head, "chain": self._on_chain, "evidence": self._on_evidence,
        }.get(env.kind)  # fmt: skip
        if handler is not None:
            return handler(env, now)
        if env.kind == "block":
            if missing:
                return self._incomplete_block(msg, env, missing, now)
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
            if sum(1 for e in ctx.wtxs.values() if e.sender == env.sender) >= 2:
                raise Drop("equivocation", f"a third worker tx from {env.sender}")
            ctx.wtxs[env.id] = env
            ctx.wtx_at.setdefault(env.body["model"], now)
            acts += self._adopt_pending(env.sender, env.body["model"])
            # missing txs are asked for only after WTX_PULL_S without a new one: while the
            # host's trainer is still working through a queue of workers, their txs keep
            # coming and asking for the queued ones would reach every device for nothing
            ctx.wtx_pull_at = max(ctx.wtx_pull_at, now + WTX_PULL_S)
        else:
            if ctx.vtxs.setdefault(env.sender, env) is env:  # (not for an equivocator's second)
                ctx.vtx_last_at = now
                acts += self._fetch_named_txs(env, now)
        if self.incomplete:
            acts += self._retry_incomplete(now)
        return acts

    # -- equivocation evidence --

    # -- blobs: stored only when a transaction or block names them --

    def _on_blob(self, sender: str, blob_hash: str, data: bytes) -> list:
        if len(data) > self.max_blob_bytes:
            raise Drop("too_large", f"blob of {len(data)} bytes")
        if sha256_hex(data) != blob_hash:
            raise Drop("hash_mismatch", f"blob from {sender}")
        if blob_hash in self.blobs:
            self._count("duplicate")
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
        acts: list = [StoreBlob(blob_hash, data)]
        ctx = self.ctx
        if (
            ctx is not None
            and ctx.roles.is_validator(self.me)
            and ctx.validator is ValidatorPhase.COLLECTING
            and blob_hash in ctx.models()
        ):
            acts.append(Score(ctx.round, blob_hash))
        return acts

    def _named(self, blk: Envelope) -> frozenset[str]:
        """``_named_models`` of a held candidate, once: the shell asks for the missing blobs
        every tick, and at 200 devices 60 candidates of 120 worker txs each took 59 % of an
        agent's time (py-spy) when they were read again each time."""
        named = self.named.get(blk.id)
        if named is None:
            named = self.named[blk.id] = frozenset(_named_models(blk))
        return named

    def missing_blobs(self) -> set[str]:
        """Blobs this node needs and does not hold (the shell may find them in a store it
        shares with co-located agents, agent.py)."""
        return self._wanted() - self.blobs

    def _wanted(self) -> set[str]:
        """Blobs named by this round's worker txs or by candidate blocks we may check."""
        ctx = self.ctx
        wanted = set(ctx.models()) if ctx is not None else set()
        for h in (self.state.height, self.state.height + 1):
            for blk in self.candidates.get(h, {}).values():
                wanted |= self._named(blk)
        return wanted

    # -- chain sync: candidates, head hints, pull --

    # -- worker --

    # -- validator --

    # -- miner --

    def _aggregate_done(self, ev: AggregateDone, now: float) -> list:
        ctx = self.ctx
        if ctx is None:
            return []
        if ev.model_hash is None:
            return self._blobs_missing(ev, now)
        if ev.key == "mine":
            if ctx.miner is not MinerPhase.AGGREGATING:
                return []
            return self._mined(ev.model_hash)
        if ctx.checking != ev.key:
            return []
        blk = self.candidates.get(ctx.round, {}).get(ev.key)
        ctx.checking, ctx.chain, ctx.retry_at = None, ChainPhase.WAITING, 0.0
        if blk is None:
            return []
        _, outcome = self._process(blk)
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
            ctx.check_tries += 1
            if blk is not None and ((late and not ctx.catching_up) or ctx.check_tries > CHECK_TRIES):
                ctx.checking, ctx.chain = None, ChainPhase.WAITING
                self._reject(blk, "unavailable", "its accepted updates' blobs never came")
                self.unavailable.add(blk.id)
                return self.enter_decide(now)
            if blk is not None:
                target = self.blob_source.get(blk.id, target if ctx.catching_up else blk.sender)
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
        _, outcome = self._process(blk)
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
                _, outcome = self._process(blk)
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

    def _process(self, blk: Envelope) -> tuple[State, Outcome]:
        """``ledger.process_block`` on our head, once per candidate: deciding, checking G_j
        and appending reuse the result (a block's id fixes its parent, so the result holds
        for as long as the candidate does)."""
        hit = self.processed.get(blk.id)
        if hit is None:
            hit = self.processed[blk.id] = process_block(self.genesis, self.state, blk)
        return hit

    def _reject(self, blk: Envelope, reason: str, detail: str) -> None:
        self.invalid.add(blk.id)
        self._count(reason)
        log.warning("%s: invalid block %s from %s: %s: %s", self.me, blk.id[:12], blk.sender, reason, detail)

    def _commit(self, blk: Envelope, now: float) -> list:
        state, outcome = self._process(blk)
        self.states.append(state)
        self.chain.append(blk)
        acts: list = [CommitBlock(blk, state, outcome), self._head_message()]
        named = {state.global_model} | self.own_blobs
        for cand in self.candidates.get(state.height, {}).values():
            named |= self._named(cand)
        acts += [DeleteBlob(h) for h in sorted(self.round_blobs - named)]
        self.blobs -= self.round_blobs - named
        acts.append(EvaluateGlobal(state.height, state.global_model))
        self._keep_txs()
        self.ctx = None
        self.seen = set()  # dedupe is per round; older messages are stale or held candidates
        self.pending = {}
        self.aggregates = {}
        for h in [h for h in self.candidates if h < state.height - REORG_DEPTH]:
            for gone in self.candidates.pop(h):
                self.processed.pop(gone, None)
                self.named.pop(gone, None)
        for h in [h for h in self.block_evidence if h < state.height - REORG_DEPTH]:
            del self.block_evidence[h]
        self.slots = {k: v for k, v in self.slots.items() if k[2] > state.height - REORG_DEPTH}
        return acts + self._begin_round(now)

    def _tx_held(self, tx_id: str) -> Envelope | None:
        """A worker or validator tx we hold, for rebuilding a compact block."""
        ctx = self.ctx
        if ctx is not None:
            if tx_id in ctx.wtxs:
                return ctx.wtxs[tx_id]
            for v in ctx.vtxs.values():
                if v.id == tx_id:
                    return v
        return self.old_txs.get(tx_id)

    def _keep_txs(self) -> None:
        """The round's context is discarded: keep its txs for REORG_DEPTH rounds."""
        if self.ctx is not None:
            for e in [*self.ctx.wtxs.values(), *self.ctx.vtxs.values()]:
                self.old_txs[e.id] = e
        floor = self.state.height - REORG_DEPTH
        self.old_txs = {i: e for i, e in self.old_txs.items() if e.round > floor}

    def _incomplete_block(self, msg: Received, hdr: Envelope, missing: list[str], now: float) -> list:
        """A compact block naming txs we do not hold. One of a later round waits with that
        round's other messages; one of this round or an earlier one, once its header is
        verified, waits for its txs (messages from different senders may arrive in any
        order) and is rebuilt when they come (``_retry_incomplete``); if they have not come
        within PULL_GRACE_S, its miner is asked for the whole block (``_ask_incomplete``)."""
        self._count("unknown_tx")
        h = hdr.body.get("height")
        if isinstance(h, int) and not isinstance(h, bool) and h > self.state.height + 1:
            return self._buffer(msg, hdr) if self.ctx is not None else []
        check_signature(hdr, self.genesis.pubkey(hdr.sender))
        if hdr.id not in self.incomplete and len(self.incomplete) < 64:
            self.incomplete[hdr.id] = (msg, hdr, now)
        return []

    def _retry_incomplete(self, now: float) -> list:
        """A tx came: rebuild the compact blocks that now have all theirs."""
        acts: list = []
        for block_id, (msg, _, _) in list(self.incomplete.items()):
            try:
                complete = not decode_block(msg.payload, self._tx_held)[1]
            except Drop:
                complete = True  # (its content is wrong: _receive counts it)
            if complete:
                del self.incomplete[block_id]
                acts += self._receive(msg, now)
        return acts

    def _ask_incomplete(self, now: float) -> list:
        acts = []
        for block_id, (msg, hdr, since) in list(self.incomplete.items()):
            if hdr.body.get("height", 0) <= self.state.height - REORG_DEPTH:
                del self.incomplete[block_id]
            elif now - since >= PULL_GRACE_S and block_id not in self.blocks_asked:
                self.blocks_asked.add(block_id)
                log.info("%s: block %s from %s names txs we lack; asking for it", self.me, block_id[:12], hdr.sender)
                acts.append(self._sync_request(hdr.round, now, ("block", block_id), target=hdr.sender, block_ids=[block_id], blobs=[]))
        return acts

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
        self._keep_txs()
        self.ctx = None
        self.finished = False
        return [Rollback(height - 1, self.state)] + self._begin_round(now, catching_up=True)

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
            return self._publish_vtx(EvaluationDone(ctx.round, 0, None, {}), now)
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
        model = (
            raw.get("body", {}).get("model") if isinstance(raw, dict) and isinstance(raw.get("body"), dict) else None
        )
        if valid_hash(model):
            out.append(model)
    return out
