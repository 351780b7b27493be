"""The chain as pure functions over typed state, written as a consensus spec.

``process_block(genesis, state, block) -> (state, outcome)`` is a short list of named steps;
each step's checks, under "Verify that ..." comments, are the validity rules of a block, and
each rule fails with its own reason (``InvalidBlock.reason``, also a drop reason of the node).
It does no I/O: the one thing it cannot check alone -- that ``global_model`` is the aggregate
of the accepted updates' blobs -- the caller checks with ``outcome.inputs``.

Round j (block height j), paper Section 5.3 / Fig. 5:
  worker tx    {model hash, |train|, le, expected reward Eq. 1}          (``make_wtx``)
  validator tx {verified worker-tx ids, votes by Algorithm 1}            (``make_vtx``)
  block        {those signed txs, accepted/rejected, rewards Eq. 1-3,
                blacklist changes, G_j hash, equivocation evidence}      (``build_block``)
An update is accepted iff it got at least one vote and N+ >= N-. A device that was a worker
and had its update rejected ``knockout`` times in a row (counting only its worker rounds)
is blacklisted: it gets no role and its messages are dropped from then on. A device that
signed two different messages for one slot (``slot``) is slashed: its stake becomes 0 and it
is blacklisted, once the evidence is in a block.

Which attack each rule stops is in docs/security.md; tests/test_ledger_rules.py holds one
block per rule that breaks exactly that rule.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from . import rewards as eq
from . import voting
from .canonical import canonical_bytes_checked
from .genesis import Genesis
from .messages import (
    BLOCK_CONTENT,
    MAX_JSON_BYTES,
    Drop,
    Envelope,
    check_signature,
    from_json,
    header,
    valid_hash,
)
from .roles import Roles, assign_roles, assign_roles_all_train

PROTOCOLS = ("pos-bfl", "vanilla", "pfedme")

#: A vote's loss for a model the validator could not use (blob missing, undecodable or not
#: finite): such a vote is always negative. Every loss is at most this.
LOSS_UNUSABLE = 10**9
MAX_BP = 10_000

WTX_FIELDS = frozenset({"run", "kind", "round", "prev", "sender", "model", "n_train", "local_epochs", "reward"})
VTX_FIELDS = frozenset({"run", "kind", "round", "prev", "sender", "verified", "votes"})
VOTE_FIELDS = frozenset({"wtx", "worker", "model", "positive", "local_bp", "ref_bp", "loss_milli"})
BLOCK_FIELDS = frozenset(
    {"run", "kind", "round", "height", "prev", "sender", "accepted", "rejected", "rewards", "blacklisted",
     "global_model", *BLOCK_CONTENT}
)  # fmt: skip
#: Every reason a block can be invalid for (each also a drop reason of messages.DROP_REASONS).
BLOCK_RULES = (
    "malformed", "wrong_run", "wrong_height", "wrong_prev", "wrong_role", "bad_signature", "too_large",
    "wrong_round", "bad_claim", "duplicate_sender", "not_canonical", "unvoted_update", "duplicate_id",
    "unknown_tx", "vote_mismatch", "vote_not_evaluated", "wrong_outcome", "wrong_rewards",
    "wrong_global_model", "bad_evidence",
)  # fmt: skip


class InvalidBlock(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def verify(cond: bool, reason: str, detail: str = "") -> None:
    """One validity rule: raise ``Drop(reason)`` unless ``cond`` holds."""
    if not cond:
        raise Drop(reason, detail)


@dataclass(frozen=True)
class State:
    height: int
    head: str
    global_model: str
    stakes: dict[str, int] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)
    blacklist: frozenset[str] = frozenset()
    slashed: frozenset[str] = frozenset()

    def stake(self, device: str) -> int:
        return self.stakes.get(device, 0)


def genesis_state(genesis: Genesis) -> State:
    return State(
        height=0,
        head=genesis.hash,
        global_model=genesis.init_model,
        stakes={d: 0 for d in genesis.device_ids},
        strikes={d: 0 for d in genesis.device_ids},
    )


def validated(genesis: Genesis) -> bool:
    """PoS-BFL votes on updates; the baselines average every update."""
    return genesis.protocol == "pos-bfl"


def roles_for(genesis: Genesis, state: State) -> Roles:
    """Roles of round state.height + 1."""
    if not validated(genesis):
        return assign_roles_all_train(state.head, genesis.devices, state.blacklist, genesis.roles[2])
    return assign_roles(state.head, genesis.devices, state.blacklist, genesis.roles)


def expected_n_train(genesis: Genesis) -> int:
    return genesis.data["samples_per_device"]


def slot(env: Envelope) -> tuple:
    """The slot a signed message fills: one message per (sender, kind, round, parent).
    Two different messages for one slot are an equivocation."""
    return (env.sender, env.kind, env.round, env.body.get("prev"))


# ---- transaction bodies ---------------------------------------------------------------


def make_wtx(genesis: Genesis, state: State, sender: str, model_hash: str) -> dict:
    le = genesis.hp["local_epochs"]
    n = expected_n_train(genesis)
    return {
        "run": genesis.run,
        "kind": "wtx",
        "round": state.height + 1,
        "prev": state.head,
        "sender": sender,
        "model": model_hash,
        "n_train": n,
        "local_epochs": le,
        "reward": eq.worker_reward(le, n, genesis.hp["unit_reward"], True),
    }


def make_vtx(genesis: Genesis, state: State, sender: str, verified: list[str], votes: list[dict]) -> dict:
    """votes: [{"wtx", "worker", "model", "positive", "local_bp", "ref_bp", "loss_milli"}]."""
    return {
        "run": genesis.run,
        "kind": "vtx",
        "round": state.height + 1,
        "prev": state.head,
        "sender": sender,
        "verified": sorted(set(verified)),
        "votes": sorted(votes, key=lambda v: v["worker"]),
    }


def cast_votes(genesis: Genesis, wtxs: list[Envelope], scores: dict[str, tuple[int, int]], global_bp: int,
               trained_bp: int | None) -> list[dict]:  # fmt: skip
    """A validator's votes on ``wtxs`` (Algorithm 1 with the genesis' reference and loss
    guard, voting.py) from its evaluation ``scores``: model hash -> (accuracy bp, loss
    milli-nats). A model missing from ``scores`` was not available: it is voted down with
    ``LOSS_UNUSABLE``. ``vote_follows_from_evaluation`` is the same rule, checked."""
    usable = [scores[w.body["model"]] for w in wtxs if scores.get(w.body["model"], (0, LOSS_UNUSABLE))[1] < LOSS_UNUSABLE]
    ref = _reference(genesis, [acc for acc, _ in usable], global_bp, trained_bp)
    med_loss = voting.lower_median([loss for _, loss in usable]) if usable else 0
    votes = []
    for w in sorted(wtxs, key=lambda e: e.sender):
        acc, loss = scores.get(w.body["model"], (0, LOSS_UNUSABLE))
        acc, loss = min(max(acc, 0), MAX_BP), min(max(loss, 0), LOSS_UNUSABLE)
        votes.append({
            "wtx": w.id, "worker": w.sender, "model": w.body["model"],
            "positive": _positive(genesis, ref, acc, loss, med_loss),
            "local_bp": acc, "ref_bp": ref, "loss_milli": loss,
        })  # fmt: skip
    return votes


def _reference(genesis: Genesis, usable_bps: list[int], global_bp: int, trained_bp: int | None) -> int:
    mode = genesis.hp["vote_ref"]
    if mode == "median":
        return voting.median_bp(usable_bps) if usable_bps else 0
    ref = voting.reference_bp(mode, global_bp, trained_bp, usable_bps)
    return min(max(ref, 0), MAX_BP)


def _positive(genesis: Genesis, ref: int, acc: int, loss: int, med_loss: int) -> bool:
    return (
        loss < LOSS_UNUSABLE
        and voting.vote(ref, acc, genesis.hp["vh_bp"])
        and voting.loss_guard_ok(loss, med_loss, genesis.hp.get("loss_guard", 0))
    )


# ---- transactions: the rules one transaction must pass, alone or in a block ------------


def _exact_fields(body: dict, fields: frozenset, what: str) -> None:
    # Verify that the message has exactly the fields of its kind (no padding, nothing missing)
    verify(isinstance(body, dict) and set(body) == fields, "malformed", f"{what} fields")


def _in_round(genesis: Genesis, state: State, env: Envelope) -> None:
    b = env.body
    # Verify that the transaction is of this run, for the round after ``state``, on its head
    verify(b["run"] == genesis.run, "wrong_run", b["run"])
    verify(b["round"] == state.height + 1, "wrong_round", f"{b['round']} != {state.height + 1}")
    verify(b["prev"] == state.head, "wrong_prev", env.sender)


def _int_in(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def process_worker_tx(genesis: Genesis, state: State, roles: Roles, tx: Envelope) -> None:
    """The rules of one worker transaction (Section 5.3.1)."""
    b = tx.body
    _exact_fields(b, WTX_FIELDS, "wtx")
    verify(tx.kind == "wtx", "malformed", "not a worker tx")
    _in_round(genesis, state, tx)
    # Verify that the sender is a worker of the round (so: admitted, not blacklisted)
    verify(tx.sender in roles.workers, "wrong_role", f"{tx.sender} is not a worker")
    # Verify that the model is named by its hash
    verify(valid_hash(b["model"]), "malformed", "wtx.model")
    # Verify that |train|, le and the expected reward are the genesis' (Eq. 1)
    le, n = genesis.hp["local_epochs"], expected_n_train(genesis)
    verify(b["n_train"] == n and b["local_epochs"] == le, "bad_claim", f"|train|={b['n_train']} le={b['local_epochs']}")
    verify(b["reward"] == eq.worker_reward(le, n, genesis.hp["unit_reward"], True), "bad_claim", "reward is not Eq. 1")
    # Verify the worker's signature
    check_signature(tx, genesis.pubkey(tx.sender))


def process_validator_tx(
    genesis: Genesis, state: State, roles: Roles, tx: Envelope, wtxs: dict[str, Envelope] | None
) -> None:
    """The rules of one validator transaction (Algorithm 1). ``wtxs`` (id -> worker tx) are
    the round's worker transactions when known (in a block); a gossiped one is checked
    against the round's roles only, as its validator may hold txs this device lacks."""
    b = tx.body
    _exact_fields(b, VTX_FIELDS, "vtx")
    verify(tx.kind == "vtx", "malformed", "not a validator tx")
    _in_round(genesis, state, tx)
    # Verify that the sender is a validator of the round
    verify(tx.sender in roles.validators, "wrong_role", f"{tx.sender} is not a validator")
    verified, votes = b["verified"], b["votes"]
    verify(isinstance(verified, list) and all(valid_hash(t) for t in verified), "malformed", "vtx.verified")
    verify(isinstance(votes, list), "malformed", "vtx.votes")
    # Verify that no worker tx is named twice, in id order
    verify(len(set(verified)) == len(verified), "duplicate_id", "vtx.verified")
    verify(verified == sorted(verified), "not_canonical", "vtx.verified")
    # Verify that every named worker tx is one of the round's (Eq. 2 pays for each): in a
    # block, one of its worker txs; gossiped, at most two (an equivocator's) per worker
    verify(len(verified) <= 2 * len(roles.workers), "unknown_tx", "more txs than the round's workers made")
    verify(wtxs is None or all(t in wtxs for t in verified), "unknown_tx", "vtx.verified")
    for v in votes:
        _exact_fields(v, VOTE_FIELDS, "vote")
        verify(
            valid_hash(v["wtx"]) and valid_hash(v["model"]) and isinstance(v["worker"], str)
            and isinstance(v["positive"], bool) and _int_in(v["local_bp"], 0, MAX_BP)
            and _int_in(v["ref_bp"], 0, MAX_BP) and _int_in(v["loss_milli"], 0, LOSS_UNUSABLE),
            "malformed", "vote",
        )  # fmt: skip
    # Verify that each vote is on a distinct verified worker tx, in worker order
    voted = [v["wtx"] for v in votes]
    verify(len(set(voted)) == len(voted) and set(voted) <= set(verified), "duplicate_id", "votes")
    verify([v["worker"] for v in votes] == sorted(v["worker"] for v in votes), "not_canonical", "votes")
    # Verify that each vote names a worker of the round and that tx's own worker and model
    for v in votes:
        verify(v["worker"] in roles.workers, "vote_mismatch", f"vote for {v['worker']}, not a worker")
        w = wtxs.get(v["wtx"]) if wtxs is not None else None
        verify(w is None or (w.sender, w.body["model"]) == (v["worker"], v["model"]), "vote_mismatch", v["worker"])
    # Verify that every vote follows from the evaluation it records (Algorithm 1, reference, loss guard)
    verify(votes_follow_from_evaluation(genesis, votes), "vote_not_evaluated", tx.sender)
    # Verify the validator's signature
    check_signature(tx, genesis.pubkey(tx.sender))


def votes_follow_from_evaluation(genesis: Genesis, votes: list[dict]) -> bool:
    """A vote is positive iff Algorithm 1 and the loss guard say so on the accuracies and
    losses the vote records; all votes share one reference, which in ``median`` mode is the
    upper median of the usable models' accuracies (``cast_votes`` is the honest side)."""
    if not votes:
        return True
    refs = {v["ref_bp"] for v in votes}
    if len(refs) != 1:
        return False
    (ref,) = refs
    usable = [v for v in votes if v["loss_milli"] < LOSS_UNUSABLE]
    if genesis.hp["vote_ref"] == "median":
        if ref != (voting.median_bp([v["local_bp"] for v in usable]) if usable else 0):
            return False
    med_loss = voting.lower_median([v["loss_milli"] for v in usable]) if usable else 0
    return all(v["positive"] == _positive(genesis, ref, v["local_bp"], v["loss_milli"], med_loss) for v in votes)


def check_tx(genesis: Genesis, state: State, env: Envelope, roles: Roles) -> None:
    """A gossiped worker or validator transaction, against the round; raises Drop."""
    try:
        if env.kind == "wtx":
            process_worker_tx(genesis, state, roles, env)
        elif env.kind == "vtx":
            process_validator_tx(genesis, state, roles, env, None)
        else:
            raise Drop("wrong_kind", env.kind)
    except (KeyError, TypeError) as exc:
        raise Drop("malformed", repr(exc)) from None


# ---- evidence of equivocation -------------------------------------------------------------


def evidence_item(a: Envelope, b: Envelope) -> dict:
    """Two different signed messages for one slot; blocks as headers, in id order."""
    first, second = sorted((a, b), key=lambda e: e.id)
    return {"a": _compact(first).to_json(), "b": _compact(second).to_json()}


def _compact(env: Envelope) -> Envelope:
    return header(env) if env.kind == "block" else env


def check_evidence(genesis: Genesis, item) -> str:
    """The rules of one piece of evidence; returns the equivocator."""
    # Verify that the evidence is a pair {a, b} of signed messages, blocks as headers
    verify(isinstance(item, dict) and set(item) == {"a", "b"}, "bad_evidence", "not a pair")
    try:
        a, b = from_json(item["a"]), from_json(item["b"])
    except Drop as exc:
        raise Drop("bad_evidence", exc.detail) from None
    # Verify that both are of this run, of a kind that fills a slot, for a round of the run,
    # blocks given as headers
    for e in (a, b):
        verify(e.body["run"] == genesis.run and e.kind in ("wtx", "vtx", "block"), "bad_evidence", "kind or run")
        verify(1 <= e.round <= genesis.rounds, "bad_evidence", f"round {e.round}")
        verify(e.kind != "block" or "content" in e.body, "bad_evidence", "a block, not its header")
    # Verify that they fill one slot, differ, and come in id order
    verify(slot(a) == slot(b), "bad_evidence", "two slots")
    verify(a.id < b.id, "bad_evidence", "not two messages in id order")
    # Verify that both are signed by the equivocator, an admitted device
    pub = genesis.pubkey(a.sender)
    verify(pub is not None, "bad_evidence", f"unknown device {a.sender}")
    try:
        check_signature(a, pub)
        check_signature(b, pub)
    except Drop:
        raise Drop("bad_evidence", f"signature of {a.sender}") from None
    return a.sender


# ---- the round outcome ----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    accepted: list[str]  # worker ids, sorted
    rejected: list[str]
    rewards: dict[str, int]  # only non-zero entries
    blacklisted: list[str]  # newly blacklisted by knock-out
    strikes: dict[str, int]
    votes: dict[str, tuple[int, int]]  # worker -> (N+, N-)
    inputs: tuple[tuple[str, int], ...] = ()  # (model hash, |train|) of accepted, FedAvg's input
    slashed: tuple[str, ...] = ()  # equivocators punished by this block's evidence


def tally(
    genesis: Genesis, state: State, miner: str, wtxs: list[Envelope], vtxs: list[Envelope], equivocating=frozenset()
) -> Outcome:
    """Votes -> decisions, Eq. (1)-(3) rewards and knock-out. Inputs already checked. A worker
    in ``equivocating`` (two worker txs, with the block's evidence) is rejected, unpaid."""
    unit = genesis.hp["unit_reward"]
    by_id = {w.id: w for w in wtxs}
    pos = {w.sender: 0 for w in wtxs}
    neg = {w.sender: 0 for w in wtxs}
    rewards: dict[str, int] = {}

    def credit(dev: str, amount: int) -> None:
        if amount:
            rewards[dev] = rewards.get(dev, 0) + amount

    for vtx in vtxs:
        verified = [t for t in vtx.body["verified"] if t in by_id]
        votes = [v for v in vtx.body["votes"] if v["wtx"] in by_id]
        for v in votes:
            worker = by_id[v["wtx"]].sender
            if v["positive"]:
                pos[worker] += 1
            else:
                neg[worker] += 1
        credit(vtx.sender, eq.validator_reward(len(verified), len(votes), unit))  # Eq. 2
    if validated(genesis):
        credit(miner, eq.miner_reward(len(vtxs), unit))  # Eq. 3

    accepted, rejected = [], []
    strikes = dict(state.strikes)
    for dev in sorted(equivocating & set(pos)):
        rejected.append(dev)
        strikes[dev] = strikes.get(dev, 0) + 1
    for w in wtxs:
        dev = w.sender
        if dev in equivocating:
            continue
        if not validated(genesis):  # vanilla FL / pFedMe: no validation, all averaged
            accepted.append(dev)
            credit(dev, eq.worker_reward(w.body["local_epochs"], w.body["n_train"], unit, True))
            continue
        if pos[dev] + neg[dev] == 0:
            continue  # nobody voted: neither reward nor strike
        ok = eq.accepted(pos[dev], neg[dev])
        credit(dev, eq.worker_reward(w.body["local_epochs"], w.body["n_train"], unit, ok))  # Eq. 1
        (accepted if ok else rejected).append(dev)
        strikes[dev] = 0 if ok else strikes.get(dev, 0) + 1
    ko = genesis.hp["knockout"]
    newly = sorted(d for d in rejected if ko and strikes[d] >= ko and d not in state.blacklist)
    by_sender = {w.sender: w for w in wtxs}
    return Outcome(
        accepted=sorted(accepted),
        rejected=sorted(rejected),
        rewards=dict(sorted(rewards.items())),
        blacklisted=newly,
        strikes=strikes,
        votes={d: (pos[d], neg[d]) for d in pos},
        inputs=tuple((by_sender[d].body["model"], by_sender[d].body["n_train"]) for d in sorted(accepted)),
    )


def aggregation_inputs(block_body: dict) -> list[tuple[str, int]]:
    """(model hash, |train|) of the accepted updates, in worker order: FedAvg's input."""
    accepted = set(block_body["accepted"])
    items = []
    for raw in block_body["wtxs"]:
        b = raw["body"]
        if b["sender"] in accepted:
            items.append((b["sender"], b["model"], b["n_train"]))
    return [(h, n) for _, h, n in sorted(items)]


# ---- the miner's side: what goes into a block ---------------------------------------------


def select_for_block(
    genesis: Genesis, state: State, wtxs: list[Envelope], vtxs: list[Envelope]
) -> tuple[list[Envelope], list[Envelope]]:
    """A miner keeps the validator txs whose every named worker tx it holds, and (when votes
    are cast) only the worker txs some kept validator voted on: an update no validator
    could see cannot enter the chain (rule ``unvoted_update``)."""
    ids = {w.id for w in wtxs}
    kept = [v for v in vtxs if set(v.body["verified"]) <= ids]
    if validated(genesis):
        voted = {vote["wtx"] for v in kept for vote in v.body["votes"]}
        wtxs = [w for w in wtxs if w.id in voted]
    return wtxs, kept


def build_block(
    genesis: Genesis,
    state: State,
    miner: str,
    wtxs: list[Envelope],
    vtxs: list[Envelope],
    global_model: str,
    evidence: list[dict] = (),
) -> dict:
    """A miner's candidate block body. ``global_model`` = aggregate of ``outcome.inputs``.
    Evidence is added while the block stays within the message limit its peers enforce;
    transactions always fit (``worst_case_block_bytes``, checked with the genesis)."""
    body = {
        "run": genesis.run,
        "kind": "block",
        "round": state.height + 1,
        "height": state.height + 1,
        "prev": state.head,
        "sender": miner,
        "wtxs": [w.to_json() for w in sorted(wtxs, key=lambda e: (e.sender, e.id))],
        "vtxs": [v.to_json() for v in sorted(vtxs, key=lambda e: e.sender)],
        "accepted": [],
        "rejected": [],
        "rewards": {},
        "blacklisted": [],
        "global_model": global_model,
        "evidence": [],
    }
    doubled = doubled_senders(wtxs)
    size = block_bytes(body) + 64 * (len(wtxs) + len(vtxs) + 3)  # room for the outcome fields
    slashed = set(state.slashed)
    # evidence that a worker in the block signed two worker txs first: the block needs it
    for item in sorted(evidence, key=lambda i: (i["a"]["body"]["sender"] not in doubled, i["a"]["body"]["sender"])):
        who = item["a"]["body"]["sender"]
        cost = len(_canonical(item)) + 1
        if who in slashed or size + cost > MAX_BLOCK_BYTES:
            continue
        body["evidence"].append(item)
        slashed.add(who)
        size += cost
    body["evidence"].sort(key=lambda i: i["a"]["body"]["sender"])
    outcome = tally(genesis, state, miner, wtxs, vtxs, frozenset(doubled & slashed))
    body.update(accepted=outcome.accepted, rejected=outcome.rejected, rewards=outcome.rewards,
                blacklisted=outcome.blacklisted)  # fmt: skip
    return body


def _canonical(value) -> bytes:
    # (parsed or assembled from parsed parts: the fast encoder writes the canonical bytes)
    return canonical_bytes_checked(value)


def doubled_senders(wtxs) -> frozenset[str]:
    """Workers with two worker txs among ``wtxs`` (an equivocator's, allowed in a block only
    with the evidence that slashes it; its update is then rejected)."""
    senders = Counter(w.sender for w in wtxs)
    return frozenset(d for d, n in senders.items() if n > 1)


#: The largest block body: the message limit every peer enforces, less room for the block's
#: envelope and for a chain answer carrying it (a pull always gets at least one block).
MAX_BLOCK_BYTES = MAX_JSON_BYTES - 1024


def block_bytes(body: dict) -> int:
    return len(_canonical(body))


# ---- process_block: the validity rules of a block ------------------------------------------


def process_block(genesis: Genesis, state: State, block: Envelope) -> tuple[State, Outcome]:
    """Validate ``block`` on top of ``state``; return the next state and the round's outcome."""
    try:
        roles = process_block_header(genesis, state, block)
        slashed = process_evidence(genesis, state, block)
        wtxs = process_worker_txs(genesis, state, roles, block, slashed)
        vtxs = process_validator_txs(genesis, state, roles, block, wtxs)
        outcome = process_outcome(genesis, state, block, wtxs, vtxs, slashed)
        stakes = process_rewards(state, block, outcome)
        process_global_model(state, block, outcome)
    except Drop as exc:
        raise InvalidBlock(exc.reason, exc.detail) from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidBlock("malformed", repr(exc)) from None
    for dev in slashed:
        stakes[dev] = 0
    outcome = replace(outcome, slashed=tuple(slashed))
    next_state = State(
        height=block.body["height"],
        head=block.id,
        global_model=block.body["global_model"],
        stakes=stakes,
        strikes=outcome.strikes,
        blacklist=state.blacklist | frozenset(outcome.blacklisted) | frozenset(slashed),
        slashed=state.slashed | frozenset(slashed),
    )
    return next_state, outcome


def process_block_header(genesis: Genesis, state: State, block: Envelope) -> Roles:
    b = block.body
    # Verify that the block has exactly a block's fields
    _exact_fields(b, BLOCK_FIELDS, "block")
    verify(block.kind == "block", "malformed", "not a block")
    # Verify that the block fits the message limit every peer enforces
    verify(block_bytes(b) <= MAX_BLOCK_BYTES, "too_large", f"{block_bytes(b)} bytes")
    # Verify that the block is of this run and follows the state: next height, on its head
    verify(b["run"] == genesis.run, "wrong_run", b["run"])
    verify(b["height"] == state.height + 1 and b["round"] == b["height"], "wrong_height", f"{b['height']}")
    verify(b["prev"] == state.head, "wrong_prev", "prev is not the head")
    # Verify that the sender is a miner of the round
    roles = roles_for(genesis, state)
    verify(block.sender in roles.miners, "wrong_role", f"{block.sender} is not a miner of round {b['height']}")
    # Verify the miner's signature
    check_signature(block, genesis.pubkey(block.sender))
    return roles


def process_worker_txs(
    genesis: Genesis, state: State, roles: Roles, block: Envelope, evidence: dict[str, set[str]]
) -> dict[str, Envelope]:
    verify(isinstance(block.body["wtxs"], list), "malformed", "block.wtxs")
    wtxs = [from_json(raw) for raw in block.body["wtxs"]]
    for tx in wtxs:
        process_worker_tx(genesis, state, roles, tx)
    ids = [t.id for t in wtxs]
    senders = [t.sender for t in wtxs]
    # Verify that each worker has one transaction in the block, or two when this block's
    # evidence slashes it (it signed two for the round, or equivocated otherwise); in
    # (worker, id) order
    verify(len(set(ids)) == len(ids), "duplicate_id", "one worker tx twice")
    for dev in {d for d in senders if senders.count(d) > 1}:
        verify(senders.count(dev) == 2 and dev in evidence, "duplicate_sender", dev)
    verify([(t.sender, t.id) for t in wtxs] == sorted((t.sender, t.id) for t in wtxs), "not_canonical", "worker txs")
    return {t.id: t for t in wtxs}


def process_validator_txs(
    genesis: Genesis, state: State, roles: Roles, block: Envelope, wtxs: dict[str, Envelope]
) -> list[Envelope]:
    verify(isinstance(block.body["vtxs"], list), "malformed", "block.vtxs")
    vtxs = [from_json(raw) for raw in block.body["vtxs"]]
    for tx in vtxs:
        process_validator_tx(genesis, state, roles, tx, wtxs)
    senders = [t.sender for t in vtxs]
    # Verify that each validator has at most one transaction in the block, in validator order
    verify(len(set(senders)) == len(senders), "duplicate_sender", "two validator txs from one sender")
    verify(senders == sorted(senders), "not_canonical", "validator txs")
    if validated(genesis):
        # Verify that every update in the block was voted on: its blob reached a validator
        voted = {v["wtx"] for t in vtxs for v in t.body["votes"]}
        verify(set(wtxs) <= voted, "unvoted_update", "a worker tx no validator voted on")
    return vtxs


def process_outcome(
    genesis: Genesis, state: State, block: Envelope, wtxs: dict[str, Envelope], vtxs: list[Envelope],
    evidence: dict[str, set[str]],
) -> Outcome:
    out = tally(genesis, state, block.sender, list(wtxs.values()), vtxs, doubled_senders(wtxs.values()))
    # Verify that the accepted, rejected and knocked-out devices are those the votes give
    for key in ("accepted", "rejected", "blacklisted"):
        verify(block.body[key] == getattr(out, key), "wrong_outcome", f"{key} differs from the votes")
    return out


def process_rewards(state: State, block: Envelope, outcome: Outcome) -> dict[str, int]:
    # Verify that the rewards are Eq. 1-3 recomputed from the transactions
    verify(block.body["rewards"] == outcome.rewards, "wrong_rewards", "rewards differ from Eq. 1-3")
    stakes = dict(state.stakes)
    for dev, amount in outcome.rewards.items():
        stakes[dev] = stakes.get(dev, 0) + amount
    return stakes


def process_global_model(state: State, block: Envelope, outcome: Outcome) -> None:
    g = block.body["global_model"]
    # Verify that G_j is named by a hash, and is G_{j-1} when no update was accepted
    # (that it is the aggregate of ``outcome.inputs`` the caller checks with the blobs)
    verify(valid_hash(g), "wrong_global_model", "not a hash")
    verify(outcome.inputs or g == state.global_model, "wrong_global_model", "changed with no update accepted")


def process_evidence(genesis: Genesis, state: State, block: Envelope) -> dict[str, set[str]]:
    """Equivocators punished by this block -> the ids of the two messages it signed."""
    items = block.body["evidence"]
    verify(isinstance(items, list), "malformed", "block.evidence")
    offenders = [check_evidence(genesis, item) for item in items]
    # Verify that each equivocator is punished once: not slashed before, not twice here, in order
    verify(len(set(offenders)) == len(offenders), "bad_evidence", "one device twice")
    verify(not set(offenders) & state.slashed, "bad_evidence", "already slashed")
    verify(offenders == sorted(offenders), "not_canonical", "evidence")
    return {who: {from_json(i["a"]).id, from_json(i["b"]).id} for who, i in zip(offenders, items)}


# ---- fork choice --------------------------------------------------------------------------


def equivocators(candidates: list[Envelope]) -> set[str]:
    """Miners with two different candidates for one slot among ``candidates``."""
    seen: dict[tuple, str] = {}
    out = set()
    for c in candidates:
        first = seen.setdefault(slot(c), c.id)
        if first != c.id:
            out.add(c.sender)
    return out


def fork_choice_order(state: State, candidates: list[Envelope], bad: set[str] = frozenset()) -> list[Envelope]:
    """Fork choice, a function of the set of candidates only: the candidate of the miner with
    the highest stake (in the parent state) first, ties to the lowest block hash; candidates
    of a miner that signed two of them (or is in ``bad``: evidence of that) come after every
    other. The caller takes the first
    that is valid."""
    bad = set(bad) | equivocators(candidates)
    unique = {c.id: c for c in candidates}.values()
    return sorted(unique, key=lambda c: (c.sender in bad, -state.stake(c.sender), c.id))


def replay(genesis: Genesis, blocks: list[Envelope]) -> State:
    """Recompute the state (stakes, blacklist, ...) from a chain."""
    state = genesis_state(genesis)
    for blk in blocks:
        state, _ = process_block(genesis, state, blk)
    return state


def worst_case_block_bytes(body: dict) -> int:
    """The size of the largest block the rules admit for a genesis ``body``, without
    evidence: every worker and validator of the round with every field at its longest. A
    genesis is refused when it exceeds ``MAX_BLOCK_BYTES`` (``check_block_bound``), so every
    block fits the message limit by construction."""
    w, v, _ = body["roles"]
    longest = max(body["devices"], key=len)
    h, sig, big = "f" * 64, "f" * 128, 2**53 - 1
    wtx_body = {k: big for k in WTX_FIELDS} | {"run": body["run"], "kind": "wtx", "prev": h, "sender": longest, "model": h}
    vote = {"wtx": h, "worker": longest, "model": h, "positive": False, "local_bp": MAX_BP, "ref_bp": MAX_BP,
            "loss_milli": LOSS_UNUSABLE}  # fmt: skip
    vtx_body = {"run": body["run"], "kind": "vtx", "round": big, "prev": h, "sender": longest,
                "verified": [h] * w, "votes": [vote] * w}  # fmt: skip
    paid = min(len(body["devices"]), w + v + 1)
    block = {"run": body["run"], "kind": "block", "round": big, "height": big, "prev": h, "sender": longest,
             "wtxs": [{"body": wtx_body, "sig": sig}] * w, "vtxs": [{"body": vtx_body, "sig": sig}] * v,
             "accepted": [longest] * w, "rejected": [], "blacklisted": [longest] * w,
             "rewards": {f"{i:0{len(longest)}d}": big for i in range(paid)}, "global_model": h, "evidence": []}  # fmt: skip
    return block_bytes(block)


def check_block_bound(body: dict) -> None:
    """Raise Drop('bad_genesis') when a block of this genesis could exceed the message limit."""
    size = worst_case_block_bytes(body)
    roles = ",".join(map(str, body["roles"]))
    verify(size <= MAX_BLOCK_BYTES, "bad_genesis", f"a block of roles {roles} can reach {size} bytes, over the limit")
