"""Every validity rule of a block, one row each: a block that breaks exactly that rule (every
transaction and the block re-signed with the right keys, the outcome recomputed) is
rejected with that rule's own reason, and the unbroken block is valid. Real keys, real
signatures, the real ``ledger.process_block``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edge_agent.protocol import ledger
from edge_agent.protocol.messages import DROP_REASONS, Envelope, header, sign

from simnet import make_run

GOOD = (8000, 500)  # accuracy bp, loss milli-nats
POISONED = (900, 4_000_000)


@dataclass
class Round:
    genesis: object
    keys: dict
    state: ledger.State
    roles: object
    wtxs: list
    vtxs: list

    @property
    def miner(self) -> str:
        return self.roles.miners[0]

    def retx(self, tx: Envelope, **changes) -> Envelope:
        """The transaction with ``changes``, re-signed by its own sender."""
        return sign(self.keys[tx.sender], dict(tx.body, **changes))

    def vtx(self, validator: str, wtxs=None, verified=None, edit_votes=None) -> Envelope:
        wtxs = self.wtxs if wtxs is None else wtxs
        scores = {w.body["model"]: (POISONED if i == 2 else GOOD) for i, w in enumerate(wtxs)}
        votes = ledger.cast_votes(self.genesis, wtxs, scores, 1000, None)
        if edit_votes:
            votes = edit_votes(votes)
        ids = [w.id for w in wtxs] if verified is None else verified
        body = ledger.make_vtx(self.genesis, self.state, validator, ids, votes)
        if verified is not None:
            body["verified"] = verified
        return sign(self.keys[validator], body)

    def block(self, wtxs=None, vtxs=None, evidence=(), edit=None, signer=None, sender=None) -> Envelope:
        wtxs = self.wtxs if wtxs is None else wtxs
        vtxs = self.vtxs if vtxs is None else vtxs
        gm = "ab" * 32
        body = ledger.build_block(self.genesis, self.state, sender or self.miner, wtxs, vtxs, gm, list(evidence))
        body["wtxs"] = [w.to_json() for w in wtxs]  # in the order given (canonical by default)
        body["vtxs"] = [v.to_json() for v in vtxs]
        if edit:
            edit(body)
        return sign(self.keys[signer or sender or self.miner], body)


def make_round() -> Round:
    genesis, keys, _ = make_run(n=7, roles=(3, 2, 1))
    state = ledger.genesis_state(genesis)
    roles = ledger.roles_for(genesis, state)
    wtxs = sorted(
        (sign(keys[w], ledger.make_wtx(genesis, state, w, f"{i:064x}")) for i, w in enumerate(roles.workers, 1)),
        key=lambda e: e.sender,
    )
    r = Round(genesis, keys, state, roles, wtxs, [])
    r.vtxs = [r.vtx(v) for v in sorted(roles.validators)]
    return r


def _edit(**fields):
    def edit(body):
        body.update(fields)

    return edit


def _reversed(items):
    return list(reversed(items))


def _second_wtx(r: Round) -> Envelope:
    return r.retx(r.wtxs[0], model="cd" * 32)


def _idle(r: Round) -> str:
    """A device with no role this round."""
    busy = set(r.roles.workers) | set(r.roles.validators) | set(r.roles.miners)
    return next(d for d in r.genesis.device_ids if d not in busy)


# (rule id, expected reason, how to build the breaking block from a valid round)
RULES = [
    # header and miner
    ("block has exactly a block's fields", "malformed", lambda r: r.block(edit=_edit(padding="x" * 100))),
    ("block of this run", "wrong_run", lambda r: r.block(edit=_edit(run="another-run"))),
    ("block at the next height", "wrong_height", lambda r: r.block(edit=_edit(height=2, round=2))),
    ("block on the head", "wrong_prev", lambda r: r.block(edit=_edit(prev="00" * 32))),
    ("sender is a miner of the round", "wrong_role", lambda r: r.block(sender=r.roles.workers[0])),
    ("miner's signature", "bad_signature", lambda r: r.block(signer=r.roles.workers[0])),
    # worker transactions
    ("wtx has exactly a wtx's fields", "malformed",
     lambda r: r.block(wtxs=[r.retx(r.wtxs[0], extra=1)] + r.wtxs[1:])),
    ("wtx of this run", "wrong_run", lambda r: r.block(wtxs=[r.retx(r.wtxs[0], run="x")] + r.wtxs[1:])),
    ("wtx for this round", "wrong_round", lambda r: r.block(wtxs=[r.retx(r.wtxs[0], round=2)] + r.wtxs[1:])),
    ("wtx on the head", "wrong_prev", lambda r: r.block(wtxs=[r.retx(r.wtxs[0], prev="11" * 32)] + r.wtxs[1:])),
    ("wtx sender is a worker", "wrong_role",
     lambda r: r.block(wtxs=r.wtxs + [sign(r.keys[_idle(r)], ledger.make_wtx(r.genesis, r.state, _idle(r), "ee" * 32))])),
    ("wtx model is a hash", "malformed", lambda r: r.block(wtxs=[r.retx(r.wtxs[0], model="zz")] + r.wtxs[1:])),
    ("wtx |train| and le are the genesis'", "bad_claim",
     lambda r: r.block(wtxs=[r.retx(r.wtxs[0], n_train=10**6)] + r.wtxs[1:])),
    ("wtx expected reward is Eq. 1", "bad_claim", lambda r: r.block(wtxs=[r.retx(r.wtxs[0], reward=1)] + r.wtxs[1:])),
    ("wtx signature", "bad_signature",
     lambda r: r.block(wtxs=[Envelope(dict(r.wtxs[0].body, model="cd" * 32), r.wtxs[0].sig, r.wtxs[0].id)] + r.wtxs[1:])),
    ("one wtx per worker unless the evidence shows two", "duplicate_sender",
     lambda r: r.block(wtxs=sorted(r.wtxs + [_second_wtx(r)], key=lambda e: (e.sender, e.id)),
                       vtxs=[r.vtx(v, sorted(r.wtxs + [_second_wtx(r)], key=lambda e: (e.sender, e.id)))
                             for v in sorted(r.roles.validators)])),
    ("wtxs in worker order", "not_canonical", lambda r: r.block(wtxs=_reversed(r.wtxs))),
    ("every update was voted on", "unvoted_update",
     lambda r: r.block(vtxs=[r.vtx(v, r.wtxs[:2]) for v in sorted(r.roles.validators)])),
    # validator transactions
    ("vtx has exactly a vtx's fields", "malformed", lambda r: r.block(vtxs=[r.retx(r.vtxs[0], x=0)] + r.vtxs[1:])),
    ("vtx sender is a validator", "wrong_role",
     lambda r: r.block(vtxs=sorted(r.vtxs + [r.vtx(_idle(r))], key=lambda e: e.sender))),
    ("vtx names no worker tx twice", "duplicate_id",
     lambda r: r.block(vtxs=[r.vtx(r.vtxs[0].sender, verified=sorted([r.wtxs[0].id] * 2 + [w.id for w in r.wtxs[1:]]))]
                       + r.vtxs[1:])),
    ("vtx names only the round's worker txs", "unknown_tx",
     lambda r: r.block(vtxs=[r.vtx(r.vtxs[0].sender, verified=sorted([w.id for w in r.wtxs] + ["99" * 32]))]
                       + r.vtxs[1:])),
    ("vtx names at most one tx per worker", "unknown_tx",
     lambda r: r.block(vtxs=[r.vtx(r.vtxs[0].sender, verified=sorted(f"{i:064x}" for i in range(9)))] + r.vtxs[1:])),
    ("one vote per worker tx", "duplicate_id",
     lambda r: r.block(vtxs=[r.vtx(r.vtxs[0].sender, edit_votes=lambda vs: vs + vs[-1:])] + r.vtxs[1:])),
    ("votes in worker order", "not_canonical",
     lambda r: r.block(vtxs=[r.retx(r.vtxs[0], votes=_reversed(r.vtxs[0].body["votes"]))] + r.vtxs[1:])),
    ("a vote names its tx's own worker", "vote_mismatch",
     lambda r: r.block(vtxs=[r.retx(r.vtxs[0], votes=[dict(r.vtxs[0].body["votes"][0], model="cd" * 32)]
                                    + r.vtxs[0].body["votes"][1:])] + r.vtxs[1:])),
    ("a vote is for a worker of the round", "vote_mismatch",
     lambda r: r.block(vtxs=[r.retx(r.vtxs[0], votes=r.vtxs[0].body["votes"][:-1]
                                    + [dict(r.vtxs[0].body["votes"][-1], worker="zz99")])] + r.vtxs[1:])),
    ("a vote follows from its evaluation", "vote_not_evaluated",
     lambda r: r.block(vtxs=[r.retx(r.vtxs[0], votes=[dict(v, positive=not v["positive"]) for v in r.vtxs[0].body["votes"]])]
                       + r.vtxs[1:])),
    ("votes share the median reference", "vote_not_evaluated",
     lambda r: r.block(vtxs=[r.retx(r.vtxs[0], votes=[dict(v, ref_bp=v["ref_bp"] - 1) for v in r.vtxs[0].body["votes"]])]
                       + r.vtxs[1:])),
    ("vote numbers in range", "malformed",
     lambda r: r.block(vtxs=[r.retx(r.vtxs[0], votes=[dict(v, local_bp=10**6) for v in r.vtxs[0].body["votes"]])]
                       + r.vtxs[1:])),
    ("vtx signature", "bad_signature",
     lambda r: r.block(vtxs=[Envelope(r.vtxs[0].body, r.vtxs[1].sig, r.vtxs[0].id)] + r.vtxs[1:])),
    ("one vtx per validator", "duplicate_sender",
     lambda r: r.block(vtxs=sorted(r.vtxs + [r.vtx(r.vtxs[0].sender, edit_votes=lambda vs: vs[:2])],
                                   key=lambda e: e.sender))),
    ("vtxs in validator order", "not_canonical", lambda r: r.block(vtxs=_reversed(r.vtxs))),
    # outcome, rewards, global model
    ("accepted as the votes give", "wrong_outcome", lambda r: r.block(edit=lambda b: b.update(accepted=sorted(r.roles.workers)))),
    ("rejected as the votes give", "wrong_outcome", lambda r: r.block(edit=_edit(rejected=[]))),
    ("rewards are Eq. 1-3", "wrong_rewards",
     lambda r: r.block(edit=lambda b: b["rewards"].update({r.miner: b["rewards"][r.miner] + 1}))),
    ("G_j is a hash", "wrong_global_model", lambda r: r.block(edit=_edit(global_model="G"))),
    ("G_j unchanged when nothing is accepted", "wrong_global_model",
     lambda r: r.block(vtxs=[], wtxs=[], edit=_edit(global_model="cd" * 32))),
    # evidence
    ("evidence is a pair", "bad_evidence", lambda r: r.block(evidence=[{"a": r.wtxs[0].to_json()}])),
    ("evidence fills one slot", "bad_evidence",
     lambda r: r.block(evidence=[ledger.evidence_item(r.wtxs[0], r.retx(r.wtxs[0], round=2, prev="22" * 32))])),
    ("evidence is two different messages", "bad_evidence",
     lambda r: r.block(evidence=[{"a": r.wtxs[0].to_json(), "b": r.wtxs[0].to_json()}])),
    ("evidence signed by the equivocator", "bad_evidence",
     lambda r: r.block(evidence=[ledger.evidence_item(r.wtxs[0], Envelope(dict(r.wtxs[0].body, model="cd" * 32),
                                                                            r.wtxs[0].sig, "ff" * 32))])),
    ("block evidence as headers", "bad_evidence", lambda r: r.block(evidence=[_full_block_pair(r)])),
    ("each equivocator punished once", "bad_evidence",
     lambda r: r.block(edit=_edit(evidence=[ledger.evidence_item(r.wtxs[0], _second_wtx(r))] * 2))),
]  # fmt: skip


def _full_block_pair(r: Round) -> dict:
    a, b = r.block(edit=_edit(global_model="01" * 32)), r.block(edit=_edit(global_model="02" * 32))
    a, b = sorted((a, b), key=lambda e: e.id)
    return {"a": a.to_json(), "b": b.to_json()}


def test_the_unbroken_round_is_valid():
    r = make_round()
    state, outcome = ledger.process_block(r.genesis, r.state, r.block())
    assert state.height == 1 and outcome.rejected == [r.wtxs[2].sender]
    assert len(outcome.accepted) == 2 and outcome.inputs


@pytest.mark.parametrize("rule, reason, build", RULES, ids=[row[0] for row in RULES])
def test_each_rule_rejects_the_block_that_breaks_it(rule, reason, build):
    r = make_round()
    block = build(r)
    with pytest.raises(ledger.InvalidBlock) as exc:
        ledger.process_block(r.genesis, r.state, block)
    assert exc.value.reason == reason, f"{rule}: {exc.value}"
    assert reason in DROP_REASONS and reason in ledger.BLOCK_RULES


def test_block_over_the_message_limit(monkeypatch):
    """Blocks fit by construction (next test); the rule itself, with a smaller limit."""
    r = make_round()
    block = r.block()
    monkeypatch.setattr(ledger, "MAX_BLOCK_BYTES", ledger.block_bytes(block.body) - 1)
    with pytest.raises(ledger.InvalidBlock) as exc:
        ledger.process_block(r.genesis, r.state, block)
    assert exc.value.reason == "too_large"


def test_role_counts_whose_blocks_could_exceed_the_limit_are_refused():
    from edge_agent.protocol.genesis import check_genesis_body
    from edge_agent.protocol.messages import Drop

    r = make_round()
    body = dict(r.genesis.body, devices={f"d{i:03d}": {"pubkey": "ab" * 32} for i in range(200)}, roles=[120, 50, 30])
    with pytest.raises(Drop, match="over the limit"):
        check_genesis_body(body)
    body["roles"] = [60, 25, 15]  # 100 devices' setting of the scaling issue: fits
    assert ledger.worst_case_block_bytes(body) <= ledger.MAX_BLOCK_BYTES
    check_genesis_body(body)


def test_evidence_slashes_and_blacklists_the_equivocator():
    r = make_round()
    worker = r.wtxs[0].sender
    second = _second_wtx(r)
    both = sorted(r.wtxs + [second], key=lambda e: (e.sender, e.id))
    vtxs = [r.vtx(v, both) for v in sorted(r.roles.validators)]
    evidence = [ledger.evidence_item(r.wtxs[0], second)]
    block = r.block(wtxs=both, vtxs=vtxs, evidence=evidence)
    state, outcome = ledger.process_block(r.genesis, r.state, block)
    assert outcome.slashed == (worker,) and worker in outcome.rejected
    assert state.stake(worker) == 0 and worker in state.blacklist and worker in state.slashed
    # the validators are paid for verifying and voting on both of its txs (Eq. 2)
    assert state.stake(vtxs[0].sender) == 2 * len(both)
    # once slashed, the same evidence cannot punish it again
    body2 = dict(block.body)
    with pytest.raises(ledger.InvalidBlock):
        ledger.process_block(r.genesis, state, sign(r.keys[r.miner], body2))


def test_block_equivocation_evidence_is_two_headers():
    r = make_round()
    a, b = r.block(edit=_edit(global_model="01" * 32)), r.block(edit=_edit(global_model="02" * 32))
    item = ledger.evidence_item(a, b)
    assert all("content" in item[k]["body"] and "wtxs" not in item[k]["body"] for k in "ab")
    assert ledger.check_evidence(r.genesis, item) == r.miner
    assert header(a).id == a.id  # a header has its block's id and signature


def test_fork_choice_depends_only_on_the_set_of_candidates():
    r = make_round()
    a, b = r.block(edit=_edit(global_model="01" * 32)), r.block(edit=_edit(global_model="02" * 32))
    orders = {tuple(c.id for c in ledger.fork_choice_order(r.state, cs)) for cs in ([a, b], [b, a], [b, a, b])}
    assert len(orders) == 1
    # a miner that signed two candidates goes after every other miner, whatever its stake
    rich = ledger.State(0, r.state.head, r.state.global_model, {r.miner: 10**6})
    other = Envelope(dict(a.body, sender="zz"), a.sig, "00" * 32)
    assert ledger.fork_choice_order(rich, [a, b, other])[0] is other
    assert ledger.fork_choice_order(rich, [a, other])[0] is a
