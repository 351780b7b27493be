"""What the Node exchanges with its shell, and the phases of a round.

Events (the shell -> Node): a received message, a finished task, the clock. Actions (Node ->
the shell): publish, store or delete a blob, train, evaluate, aggregate, persist or roll back
blocks. Phases: one enum per role, kept in ``RoundCtx``; node.py's ``_rules`` is the table of
transitions between them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum

from .ledger import Outcome, State
from .messages import Envelope
from .roles import Roles

__all__ = [
    "FUTURE_ROUNDS",
    "FUTURE_LIMIT",
    "SYNC_RETRY_S",
    "SYNC_GIVEUP_S",
    "PULL_GRACE_S",
    "WTX_PULL_S",
    "PULL_BATCH",
    "REORG_DEPTH",
    "PENDING_BLOBS_PER_SENDER",
    "CHECK_TRIES",
    "BLOB_GRACE_MIN_S",
    "Received",
    "HostBlob",
    "TrainingDone",
    "TaskFailed",
    "EvaluationDone",
    "AggregateDone",
    "GlobalEvaluated",
    "Publish",
    "StoreBlob",
    "DeleteBlob",
    "Train",
    "Evaluate",
    "Score",
    "Aggregate",
    "CommitBlock",
    "Rollback",
    "RoundStarted",
    "Dropped",
    "EvaluateGlobal",
    "Finished",
    "BlobRequestAnswer",
    "WorkerPhase",
    "ValidatorPhase",
    "MinerPhase",
    "ChainPhase",
    "RoundCtx",
    "seed_of",
]

FUTURE_ROUNDS = 2  # messages for up to this many rounds ahead are buffered
FUTURE_LIMIT = 2000  # per round
SYNC_RETRY_S = 3.0
PULL_GRACE_S = 1.0  # a peer's head claim is pulled on only once it is this old (see _sync_step)
SYNC_GIVEUP_S = 9.0  # a peer whose claimed blocks do not come in this time loses its claim
WTX_PULL_S = 5.0  # once no new worker tx came for this long, ask for the missing ones (then 2x, 4x, ...)
PULL_BATCH = 8  # blocks per catch-up answer
REORG_DEPTH = 2  # a better candidate for one of the last this many blocks reorganises
PENDING_BLOBS_PER_SENDER = 1
BLOB_GRACE_MIN_S = 5.0  # once every worker tx is in, missing blobs get max(this, train deadline / 10)
CHECK_TRIES = 10  # blob requests for one candidate before it is taken as unavailable  # blobs held in memory until a transaction names them


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class HostBlob:
    """A blob the node wants, found by the shell in the store it shares with co-located
    agents (``missing_blobs``; agent.py): taken when it is wanted and matches its hash."""

    hash: str
    data: bytes


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
    # what goes on the wire when it differs from ``payload`` (the signed message, which the
    # shell logs): a candidate block is sent compact (messages.compact_payload)
    wire: bytes | None = None

    @property
    def sent(self) -> bytes:
        return self.payload if self.wire is None else self.wire


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
class Score:
    """A validator scores an update as soon as its blob is in (the shell caches the score),
    so that its vote at the end of the train phase waits only for the last update."""

    round: int
    model: str


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
class RoundStarted:
    """The device entered round ``round`` with ``role`` (worker, validator, miner or idle)."""

    round: int
    role: str


@dataclass(frozen=True)
class Dropped:
    """A received message was dropped (``reason``: messages.DROP_REASONS), ``count`` of them."""

    reason: str
    count: int = 1


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
    check_tries: int = 0  # blob requests for the candidate being checked
    waiting_logged: bool = False
    wtx_pull_at: float = 0.0  # when to ask missing workers to re-publish (0: not yet due)
    wtx_pulls: int = 0  # asked so many times this round (the interval doubles)
    all_wtx_at: float = 0.0  # when every worker's tx had arrived
    wtx_at: dict[str, float] = field(default_factory=dict)  # model -> when the tx naming it came
    vtx_last_at: float = 0.0  # when the latest new validator tx came (a miner asks after a silence)
    asked: set[str] = field(default_factory=set)  # worker tx ids a miner asked validators for

    def elapsed_ms(self, now: float) -> float:
        return (now - self.started) * 1000

    def models(self) -> set[str]:
        return {e.body["model"] for e in self.wtxs.values()}

    def workers_in(self) -> set[str]:
        return {e.sender for e in self.wtxs.values()}


def seed_of(*parts: object) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)
