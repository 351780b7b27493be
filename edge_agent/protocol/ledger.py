"""The chain as pure functions over typed state, in the style of a consensus spec.

``process_block(genesis, state, block) -> state`` validates a candidate block against the
state after its parent and returns the state after it; it raises ``InvalidBlock``. It does
no I/O: the one thing it cannot check alone -- that ``global_model`` is the sample-weighted
FedAvg of the accepted updates' blobs -- is checked by the caller with ``aggregation_inputs``.

Round j (block height j), paper Section 5.3 / Fig. 5:
  worker tx   {model hash, |train|, le, expected reward Eq. 1}           (``make_wtx``)
  validator tx{verified worker-tx ids, votes by Algorithm 1}             (``make_vtx``)
  block       {all those signed txs, accepted/rejected, rewards Eq. 1-3,
               blacklist changes, G_j hash}                              (``build_block``)
An update is accepted iff it got at least one vote and N+ >= N-. A device that was a worker
and had its update rejected ``knockout`` times in a row (counting only its worker rounds)
is blacklisted: it gets no role and its messages are dropped from then on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import rewards as eq
from .genesis import Genesis
from .messages import Drop, Envelope, check_signature, from_json, valid_hash
from .roles import Roles, assign_roles, assign_roles_all_train

PROTOCOLS = ("pos-bfl", "vanilla", "pfedme")


class InvalidBlock(Exception):
    pass


@dataclass(frozen=True)
class State:
    height: int
    head: str
    global_model: str
    stakes: dict[str, int] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)
    blacklist: frozenset[str] = frozenset()

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


def make_vtx(
    genesis: Genesis, state: State, sender: str, verified: list[str], votes: list[dict]
) -> dict:
    """votes: [{"wtx", "worker", "model", "positive", "local_bp", "ref_bp"}]."""
    return {
        "run": genesis.run,
        "kind": "vtx",
        "round": state.height + 1,
        "prev": state.head,
        "sender": sender,
        "verified": sorted(set(verified)),
        "votes": sorted(votes, key=lambda v: v["worker"]),
    }


def check_tx(genesis: Genesis, state: State, env: Envelope, roles: Roles) -> None:
    """Checks a worker or validator transaction against the round; raises Drop."""
    b = env.body
    if b["run"] != genesis.run:
        raise Drop("wrong_run", b["run"])
    if b["round"] != state.height + 1:
        raise Drop("wrong_round", f"{b['round']} != {state.height + 1}")
    if b.get("prev") != state.head:
        raise Drop("wrong_prev", env.sender)
    pub = genesis.pubkey(env.sender)
    if pub is None:
        raise Drop("unknown_sender", env.sender)
    if env.sender in state.blacklist:
        raise Drop("blacklisted", env.sender)
    if env.kind == "wtx":
        if env.sender not in roles.workers:
            raise Drop("wrong_role", f"{env.sender} is not a worker")
        le, n = genesis.hp["local_epochs"], expected_n_train(genesis)
        if not valid_hash(b.get("model")):
            raise Drop("malformed", "wtx.model")
        if b.get("n_train") != n or b.get("local_epochs") != le:
            raise Drop("bad_claim", f"{env.sender} claims |train|={b.get('n_train')} le={b.get('local_epochs')}")
        if b.get("reward") != eq.worker_reward(le, n, genesis.hp["unit_reward"], True):
            raise Drop("bad_claim", "expected reward differs from Eq. 1")
    elif env.kind == "vtx":
        if env.sender not in roles.validators:
            raise Drop("wrong_role", f"{env.sender} is not a validator")
        verified, votes = b.get("verified"), b.get("votes")
        if not isinstance(verified, list) or not all(valid_hash(v) for v in verified):
            raise Drop("malformed", "vtx.verified")
        if not isinstance(votes, list):
            raise Drop("malformed", "vtx.votes")
        seen = set()
        for v in votes:
            if not (
                isinstance(v, dict)
                and valid_hash(v.get("wtx"))
                and valid_hash(v.get("model"))
                and isinstance(v.get("worker"), str)
                and isinstance(v.get("positive"), bool)
                and isinstance(v.get("local_bp"), int)
                and isinstance(v.get("ref_bp"), int)
                and isinstance(v.get("loss_milli", 0), int)
            ):
                raise Drop("malformed", "vtx vote")
            if v["wtx"] in seen or v["wtx"] not in verified:
                raise Drop("malformed", "vote twice or on an unverified tx")
            seen.add(v["wtx"])
    else:
        raise Drop("wrong_kind", env.kind)
    check_signature(env, pub)


# ---- the round outcome ----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    accepted: list[str]  # worker ids, sorted
    rejected: list[str]
    rewards: dict[str, int]  # only non-zero entries
    blacklisted: list[str]  # newly blacklisted
    strikes: dict[str, int]
    votes: dict[str, tuple[int, int]]  # worker -> (N+, N-)


def tally(genesis: Genesis, state: State, miner: str, wtxs: list[Envelope], vtxs: list[Envelope]) -> Outcome:
    """Votes -> decisions, Eq. (1)-(3) rewards and knock-out. Inputs already checked."""
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
    for w in wtxs:
        dev = w.sender
        if not validated(genesis):  # vanilla FL / pFedMe: no validation, all averaged
            accepted.append(dev)
            credit(dev, eq.worker_reward(w.body["local_epochs"], w.body["n_train"], unit, True))
            continue
        if pos[dev] + neg[dev] == 0:
            continue  # nobody voted (late or missing blob): neither reward nor strike
        ok = eq.accepted(pos[dev], neg[dev])
        credit(dev, eq.worker_reward(w.body["local_epochs"], w.body["n_train"], unit, ok))  # Eq. 1
        (accepted if ok else rejected).append(dev)
        strikes[dev] = 0 if ok else strikes.get(dev, 0) + 1
    ko = genesis.hp["knockout"]
    newly = sorted(d for d in rejected if ko and strikes[d] >= ko and d not in state.blacklist)
    return Outcome(
        accepted=sorted(accepted),
        rejected=sorted(rejected),
        rewards=dict(sorted(rewards.items())),
        blacklisted=newly,
        strikes=strikes,
        votes={d: (pos[d], neg[d]) for d in pos},
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


def build_block(
    genesis: Genesis,
    state: State,
    miner: str,
    wtxs: list[Envelope],
    vtxs: list[Envelope],
    global_model: str,
) -> dict:
    """A miner's candidate block body. ``global_model`` = FedAvg of ``outcome.accepted``."""
    outcome = tally(genesis, state, miner, wtxs, vtxs)
    return {
        "run": genesis.run,
        "kind": "block",
        "round": state.height + 1,
        "height": state.height + 1,
        "prev": state.head,
        "sender": miner,
        "wtxs": [w.to_json() for w in sorted(wtxs, key=lambda e: e.sender)],
        "vtxs": [v.to_json() for v in sorted(vtxs, key=lambda e: e.sender)],
        "accepted": outcome.accepted,
        "rejected": outcome.rejected,
        "rewards": outcome.rewards,
        "blacklisted": outcome.blacklisted,
        "global_model": global_model,
    }


def select_for_block(
    genesis: Genesis, state: State, wtxs: list[Envelope], vtxs: list[Envelope]
) -> tuple[list[Envelope], list[Envelope]]:
    """A miner keeps the validator txs whose every vote refers to a worker tx it holds."""
    ids = {w.id for w in wtxs}
    kept = [v for v in vtxs if all(vote["wtx"] in ids for vote in v.body["votes"])]
    return wtxs, kept


def process_block(genesis: Genesis, state: State, block: Envelope) -> State:
    """Validate ``block`` on top of ``state`` and return the next state."""
    b = block.body
    try:
        if b["kind"] != "block" or b["run"] != genesis.run:
            raise InvalidBlock("not a block of this run")
        if b["height"] != state.height + 1 or b["round"] != b["height"]:
            raise InvalidBlock(f"height {b['height']} does not follow {state.height}")
        if b["prev"] != state.head:
            raise InvalidBlock("prev is not the head")
        roles = roles_for(genesis, state)
        miner = b["sender"]
        if miner not in roles.miners:
            raise InvalidBlock(f"{miner} is not a miner of round {b['height']}")
        check_signature(block, genesis.pubkey(miner))
        wtxs = [from_json(raw) for raw in b["wtxs"]]
        vtxs = [from_json(raw) for raw in b["vtxs"]]
        for tx in wtxs:
            if tx.kind != "wtx":
                raise InvalidBlock("non-wtx in wtxs")
            check_tx(genesis, state, tx, roles)
        for tx in vtxs:
            if tx.kind != "vtx":
                raise InvalidBlock("non-vtx in vtxs")
            check_tx(genesis, state, tx, roles)
        if len({t.sender for t in wtxs}) != len(wtxs) or len({t.sender for t in vtxs}) != len(vtxs):
            raise InvalidBlock("two transactions from one sender")
        ids = {t.id for t in wtxs}
        if any(v["wtx"] not in ids for t in vtxs for v in t.body["votes"]):
            raise InvalidBlock("a vote refers to a worker tx not in the block")
        if [t.sender for t in wtxs] != sorted(t.sender for t in wtxs) or [t.sender for t in vtxs] != sorted(
            t.sender for t in vtxs
        ):
            raise InvalidBlock("transactions not in canonical order")
        out = tally(genesis, state, miner, wtxs, vtxs)
        for key in ("accepted", "rejected", "rewards", "blacklisted"):
            if b[key] != getattr(out, key):
                raise InvalidBlock(f"{key} differs from the recomputed value")
        if not valid_hash(b["global_model"]):
            raise InvalidBlock("global_model is not a hash")
        if not out.accepted and b["global_model"] != state.global_model:
            raise InvalidBlock("no update accepted but the global model changed")
    except Drop as exc:
        raise InvalidBlock(f"{exc.reason}: {exc.detail}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidBlock(f"malformed block: {exc!r}") from None
    stakes = dict(state.stakes)
    for dev, amount in out.rewards.items():
        stakes[dev] = stakes.get(dev, 0) + amount
    return State(
        height=b["height"],
        head=block.id,
        global_model=b["global_model"],
        stakes=stakes,
        strikes=out.strikes,
        blacklist=state.blacklist | frozenset(out.blacklisted),
    )


def fork_choice_order(state: State, candidates: list[Envelope]) -> list[Envelope]:
    """Fork choice: the candidate of the miner with the highest stake (in the parent state)
    first; ties go to the lowest block hash. Validity is checked by the caller in order."""
    return sorted(candidates, key=lambda c: (-state.stake(c.sender), c.id))


def replay(genesis: Genesis, blocks: list[Envelope]) -> State:
    """Recompute the state (stakes, blacklist, ...) from a chain."""
    state = genesis_state(genesis)
    for blk in blocks:
        state = process_block(genesis, state, blk)
    return state
