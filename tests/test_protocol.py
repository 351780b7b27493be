"""The protocol core without a broker: canonical bytes, signatures, rewards (Eq. 1-3),
Algorithm 1, role assignment, fork choice, process_block and whole rounds on SimNet."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.protocol import ledger, rewards, roles, voting
from edge_agent.protocol.canonical import CanonicalError, canonical_bytes, canonical_bytes_checked, parse
from edge_agent.protocol.crypto import KeyPair
from edge_agent.protocol.messages import Drop, check_signature, decode, from_json, sign, topic
from edge_agent.protocol.node import Received

from simnet import SimNet, make_run


# ---- canonical JSON (RFC 8785) ---------------------------------------------------------


def test_rfc8785_key_order_is_utf16():
    # RFC 8785 section 3.2.3 sorting example: the emoji (U+1F600, surrogates D83D DE00)
    # sorts before U+FB33 in UTF-16 although it is after it in code points.
    obj = {"\u20ac": 1, "\r": 2, "\ufb33": 3, "1": 4, "\U0001f600": 5, "\u0080": 6, "\u00f6": 7}
    out = canonical_bytes(obj).decode()
    keys = [k for k in obj]
    order = sorted(keys, key=lambda k: out.index('"' + k.replace("\r", "\\r") + '"'))
    assert order == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


def test_canonical_escapes_and_whitespace():
    assert canonical_bytes({"b": [1, True, None], "a": "x\n\"\u0001é"}) == (
        b'{"a":"x\\n\\"\\u0001\xc3\xa9","b":[1,true,null]}'
    )


@pytest.mark.parametrize("bad", [1.5, {"x": 0.1}, 2**60, {1: "a"}])
def test_canonical_refuses_floats_and_unsafe_values(bad):
    with pytest.raises(CanonicalError):
        canonical_bytes(bad)


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)  # every code point but surrogates
_signed_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(_signed_values)
def test_the_fast_encoder_writes_the_canonical_bytes(value):
    """canonical_bytes_checked (json.dumps) and the checking RFC 8785 encoder agree on every
    value a signed body may hold, parsed back or not -- including the member order of names
    outside the Basic Multilingual Plane, where code points and UTF-16 differ."""
    data = canonical_bytes(value)
    assert canonical_bytes_checked(value) == data
    assert canonical_bytes_checked(parse(data)) == data


def test_the_fast_encoder_orders_names_by_utf16():
    obj = {"\ufb33": 1, "\U0001f600": 2, "a": {"\U0001f600": 3, "\ue000": [4]}}
    assert canonical_bytes_checked(obj) == canonical_bytes(obj)
    assert canonical_bytes_checked(obj).index("\U0001f600".encode()) < canonical_bytes_checked(obj).index("\ufb33".encode())


def test_parse_refuses_floats_and_duplicate_keys():
    with pytest.raises(CanonicalError):
        parse(b'{"a": 0.5}')
    with pytest.raises(CanonicalError):
        parse(b'{"a": 1, "a": 2}')


# ---- signatures --------------------------------------------------------------------------


def _body(**kw):
    body = {"run": "r1", "kind": "wtx", "round": 1, "sender": "d00"}
    body.update(kw)
    return body


def test_sign_verify_round_trip_and_tamper():
    key = KeyPair.generate()
    env = sign(key, _body(model="ab" * 32))
    back = decode(env.payload())
    assert back.id == env.id
    check_signature(back, key.public_hex)
    tampered = dict(back.to_json())
    tampered["body"] = dict(back.body, round=2)
    with pytest.raises(Drop) as exc:
        check_signature(from_json(tampered), key.public_hex)
    assert exc.value.reason == "bad_signature"
    with pytest.raises(Drop):
        check_signature(back, KeyPair.generate().public_hex)


def test_key_file_round_trip(tmp_path):
    key = KeyPair.generate()
    key.save(tmp_path / "k")
    assert KeyPair.load(tmp_path / "k").public_hex == key.public_hex
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0
    (tmp_path / "bad").write_text("nope")
    with pytest.raises(ValueError, match="not an Ed25519 key file"):
        KeyPair.load(tmp_path / "bad")


@pytest.mark.parametrize(
    "payload,reason",
    [(b"\xff\xfe", "malformed"), (b"[1]", "malformed"), (b'{"body":{},"sig":""}', "malformed"), (b"x" * (2 << 20), "too_large")],
)
def test_decode_rejects_garbage(payload, reason):
    with pytest.raises(Drop) as exc:
        decode(payload)
    assert exc.value.reason == reason


# ---- Eq. 1-3 and Algorithm 1 --------------------------------------------------------------


def test_algorithm1_threshold():
    assert voting.vote(9000, 8200, 800) is True  # a drop of exactly vh is tolerated
    assert voting.vote(9000, 8199, 800) is False
    assert voting.vote(1000, 9000, 800) is True
    assert voting.median_bp([5, 1, 9, 7]) == 7  # accuracy: upper median
    assert voting.lower_median([5, 1, 9, 7]) == 5  # loss: lower median
    # half the updates poisoned (huge losses): the guard's reference is still an honest loss
    losses = [6000, 9000, 3_000_000, 5_000_000]
    ref = voting.lower_median(losses)
    assert [voting.loss_guard_ok(x, ref, 10) for x in losses] == [True, True, False, False]
    assert voting.reference_bp("global", 7000, None, [1]) == 7000


def test_rewards_equal_eq_1_to_3_on_a_hand_worked_example():
    """3 workers (|train|=100, le=5, r=1), 2 validators, miner m.

    v1 verified all three worker txs and voted on all three; v2 verified three but could
    fetch only two blobs, so voted on two. Votes: w1 ++ (accepted), w2 +- (accepted, tie),
    w3 -- (rejected).
      Eq. 1: w1 = w2 = 5*100*1 = 500, w3 = 0
      Eq. 2: v1 = 3 + 3 = 6, v2 = 3 + 2 = 5
      Eq. 3: m = 2 validator txs = 2
    """
    genesis, keys, _ = make_run(n=6, roles=(3, 2, 1))
    genesis.data["samples_per_device"] = 100
    state = ledger.genesis_state(genesis)
    rl = ledger.roles_for(genesis, state)
    w1, w2, w3 = rl.workers
    v1, v2 = rl.validators
    (m,) = rl.miners
    wtx = {w: sign(keys[w], ledger.make_wtx(genesis, state, w, f"{i:064x}")) for i, w in enumerate((w1, w2, w3), 1)}

    def votes(pos):
        return [
            {"wtx": wtx[w].id, "worker": w, "model": wtx[w].body["model"], "positive": p, "local_bp": 1, "ref_bp": 1}
            for w, p in pos.items()
        ]

    ids = [e.id for e in wtx.values()]
    vt1 = sign(keys[v1], ledger.make_vtx(genesis, state, v1, ids, votes({w1: True, w2: True, w3: False})))
    vt2 = sign(keys[v2], ledger.make_vtx(genesis, state, v2, ids, votes({w1: True, w2: False})))
    out = ledger.tally(genesis, state, m, list(wtx.values()), [vt1, vt2])
    assert out.accepted == sorted([w1, w2]) and out.rejected == [w3]
    assert out.rewards == dict(sorted({w1: 500, w2: 500, v1: 6, v2: 5, m: 2}.items()))
    assert rewards.worker_reward(5, 100, 1, True) == 500
    assert rewards.accepted(0, 0) is False  # nobody voted: not accepted


# ---- roles ---------------------------------------------------------------------------------


def test_role_assignment_deterministic_rotating_and_complete():
    genesis, _, _ = make_run(n=20, roles=(12, 5, 3))
    a = roles.assign_roles("aa" * 32, genesis.devices, frozenset(), genesis.roles)
    b = roles.assign_roles("aa" * 32, dict(reversed(list(genesis.devices.items()))), set(), genesis.roles)
    assert a == b  # same on every device, whatever order it lists devices in
    assert (len(a.workers), len(a.validators), len(a.miners)) == (12, 5, 3)
    assert set(a.workers) | set(a.validators) | set(a.miners) == set(genesis.devices)
    assert set(a.association) == set(a.workers) and set(a.association.values()) <= set(a.validators)
    c = roles.assign_roles("bb" * 32, genesis.devices, frozenset(), genesis.roles)
    assert c.miners != a.miners or c.workers != a.workers  # rotates with the previous hash
    bl = frozenset(list(genesis.devices)[:3])
    d = roles.assign_roles("aa" * 32, genesis.devices, bl, genesis.roles)
    assert not bl & set(d.workers + d.validators + d.miners)
    assert (len(d.workers), len(d.validators), len(d.miners)) == (9, 5, 3)


def test_workers_only_from_devices_that_can_train():
    genesis, _, _ = make_run(n=6, roles=(2, 2, 2))
    devices = {d: dict(info) for d, info in genesis.devices.items()}
    for d in list(devices)[:4]:
        devices[d]["caps"] = ["validate", "mine"]
    r = roles.assign_roles("cc" * 32, devices, frozenset(), (2, 2, 2))
    assert set(r.workers) == set(list(devices)[4:])


# ---- whole rounds on the in-memory network ----------------------------------------------------


def _heads(net):
    return {d: n.state.head for d, n in net.nodes.items() if d not in net.silent}


def test_three_rounds_agree_and_vote_out_noise():
    net = SimNet(n=8, roles=(4, 2, 2), rounds=3, malicious=("d01", "d05"))
    net.start()
    net.run()
    heads = _heads(net)
    assert len(set(heads.values())) == 1
    chain = net.nodes["d00"].chain
    assert len(chain) == 3
    malicious_worker_rounds = 0
    for blk in chain:
        for m in ("d01", "d05"):
            if any(w["body"]["sender"] == m for w in blk.body["wtxs"]):
                malicious_worker_rounds += 1
                assert m in blk.body["rejected"] and m not in blk.body["accepted"]
        assert blk.body["accepted"], "honest updates must be accepted"
        assert not {"d01", "d05"} & set(blk.body["accepted"])
    assert malicious_worker_rounds >= 1
    # stakes recomputed from the chain match every node's
    replayed = ledger.replay(net.genesis, chain)
    for n in net.nodes.values():
        assert n.state.stakes == replayed.stakes
    # accuracy of G_j rises
    accs = [ev.acc_bp for d, ev in net.reports if d == "d00"]
    assert accs == sorted(accs) and accs[-1] > accs[0]


def test_silent_validator_does_not_stall_the_round():
    net = SimNet(n=8, roles=(4, 2, 2), rounds=2)
    first = ledger.roles_for(net.genesis, ledger.genesis_state(net.genesis))
    net.silent = {first.validators[0]}
    net.start()
    net.run()
    assert len(set(_heads(net).values())) == 1
    assert net.nodes[first.workers[0]].state.height == 2
    assert net.now >= 10  # it waited for the train deadline, once


def test_silent_miner_does_not_stall_and_lower_stake_loses():
    net = SimNet(n=8, roles=(4, 2, 2), rounds=3)
    net.start()
    net.run()
    for blk_index, blk in enumerate(net.nodes["d00"].chain):
        # the winning miner had the highest stake among the round's miners (ties: lowest hash)
        parent = ledger.replay(net.genesis, net.nodes["d00"].chain[:blk_index])
        miners = ledger.roles_for(net.genesis, parent).miners
        assert parent.stake(blk.sender) == max(parent.stake(m) for m in miners)


def test_fork_choice_prefers_stake_then_lowest_hash():
    genesis, keys, _ = make_run()
    state = ledger.genesis_state(genesis)
    a = sign(keys["d00"], {"run": "r1", "kind": "block", "round": 1, "sender": "d00", "n": 1})
    b = sign(keys["d01"], {"run": "r1", "kind": "block", "round": 1, "sender": "d01", "n": 2})
    tie = ledger.fork_choice_order(state, [a, b])
    assert tie[0].id == min(a.id, b.id)
    richer = ledger.State(state.height, state.head, state.global_model, {"d00": 1, "d01": 5})
    assert ledger.fork_choice_order(richer, [a, b])[0].sender == "d01"


def test_knock_out_blacklists_repeat_offender():
    net = SimNet(n=6, roles=(3, 2, 1), rounds=6, malicious=("d02",), knockout=1)
    net.start()
    net.run()
    state = net.nodes["d00"].state
    was_worker = any(
        any(w["body"]["sender"] == "d02" for w in blk.body["wtxs"]) for blk in net.nodes["d00"].chain
    )
    assert was_worker and "d02" in state.blacklist
    assert len(set(_heads(net).values())) == 1


def test_bad_messages_are_dropped_with_reasons():
    net = SimNet(n=8, roles=(4, 2, 2), rounds=1)
    net.start()
    net.run()
    victim = net.nodes["d00"]
    victim.finished = False
    from edge_agent.protocol.node import RoundCtx

    victim.ctx = RoundCtx(round=victim.state.height + 1, roles=ledger.roles_for(net.genesis, victim.state), started=0)
    worker = victim.ctx.roles.workers[0]
    good = sign(net.keys[worker], ledger.make_wtx(net.genesis, victim.state, worker, "ab" * 32))
    t = topic("r1", "wtx", worker)
    # tampered body
    raw = good.to_json()
    raw["body"] = dict(raw["body"], n_train=10**6)
    victim.handle(Received(t, canonical_bytes(raw)), 0)
    # foreign run: signed correctly, but for run r2
    foreign = sign(net.keys[worker], dict(good.body, run="r2"))
    victim.handle(Received(t, foreign.payload()), 0)
    # replay of a message from the previous round
    old = [p for p in net.published if p.topic == t]
    if old:
        victim.handle(Received(t, old[0].payload), 0)
    # unknown sender / sender not matching topic
    victim.handle(Received(topic("r1", "wtx", "zz"), good.payload()), 0)
    victim.handle(Received(topic("r1", "wtx", victim.ctx.roles.miners[0]), good.payload()), 0)
    # garbage
    victim.handle(Received(t, b"not json"), 0)
    victim.handle(Received("bfl/v1/r1/nonsense", b"{}"), 0)
    # blob whose content does not match its address
    victim.handle(Received(topic("r1", "blob", worker, "00" * 32), b"data"), 0)
    # the good one is accepted, twice is idempotent
    victim.handle(Received(t, good.payload()), 0)
    victim.handle(Received(t, good.payload()), 0)
    assert good.id in victim.ctx.wtxs
    d = victim.drops
    assert d["bad_claim"] >= 1 or d["bad_signature"] >= 1
    assert d["wrong_run"] == 1
    assert d["unknown_sender"] == 1 and d["topic_mismatch"] == 1
    assert d["malformed"] == 1 and d["bad_topic"] == 1 and d["hash_mismatch"] == 1
    if old:
        assert d["stale_round"] == 1
    assert victim.duplicates >= 1


def test_tampered_block_is_rejected_by_everyone():
    def tamper(dev, pub):
        if "/block/" in pub.topic:
            env = decode(pub.payload)
            body = dict(env.body, rewards={**env.body["rewards"], env.sender: 10**6})
            from edge_agent.protocol.messages import Envelope

            forged = Envelope(body, env.sig, env.id)  # signature no longer matches
            return type(pub)(pub.topic, forged.payload(), pub.retain)
        return pub

    net = SimNet(n=6, roles=(3, 2, 1), rounds=1)
    net.tamper = tamper
    net.start()
    net.run()
    (miner,) = ledger.roles_for(net.genesis, ledger.genesis_state(net.genesis)).miners
    # nobody accepts the forged copy ...
    assert sum(n.drops["bad_signature"] for n in net.nodes.values()) == 5
    # ... but the miner appended its genuine block, and the others pulled it from it
    genuine = net.nodes[miner].chain[0]
    assert genuine.body["rewards"] == ledger.tally(
        net.genesis, ledger.genesis_state(net.genesis), miner,
        [from_json(w) for w in genuine.body["wtxs"]], [from_json(v) for v in genuine.body["vtxs"]],
    ).rewards  # fmt: skip
    assert {n.state.head for n in net.nodes.values()} == {genuine.id}


def test_device_that_was_down_catches_up_by_pulling_blocks():
    net = SimNet(n=8, roles=(4, 2, 2), rounds=4)
    late = "d03"
    net.silent = {late}
    net.start()
    net.run(until=lambda: min(n.state.height for d, n in net.nodes.items() if d != late) >= 2)
    assert net.nodes[late].state.height == 0
    net.revive(late)
    net.run()
    heads = _heads(net)
    assert len(set(heads.values())) == 1 and net.nodes[late].state.height == 4
    assert [b.id for b in net.nodes[late].chain] == [b.id for b in net.nodes["d00"].chain]


@pytest.mark.parametrize("protocol", ["vanilla", "pfedme"])
def test_baselines_train_everywhere_and_average_everything(protocol):
    """Vanilla FL and pFedMe on the same chain: every device trains (miners too), nobody
    votes, every update is accepted and averaged -- so noise gets in."""
    net = SimNet(n=6, roles=(3, 2, 1), rounds=2, malicious=("d02",), protocol=protocol)
    net.start()
    net.run()
    assert len(set(_heads(net).values())) == 1
    for blk in net.nodes["d00"].chain:
        assert blk.body["accepted"] == sorted(net.nodes) and blk.body["vtxs"] == []
        # rewards: Eq. 1 for every worker, nothing for (absent) validators or the miner's Eq. 3
        assert set(blk.body["rewards"]) == set(net.nodes)
    r = ledger.roles_for(net.genesis, ledger.genesis_state(net.genesis))
    assert set(r.workers) == set(net.nodes) and len(r.miners) == 1 and r.validators == ()
    assert net.nodes["d00"].state.stakes == ledger.replay(net.genesis, net.nodes["d00"].chain).stakes


def test_lost_worker_tx_is_pulled_again_before_the_deadline():
    """A worker's tx and blob never reach the validators the first time (e.g. published
    before they subscribed); they ask for it and it is published again."""
    net = SimNet(n=8, roles=(4, 2, 2), rounds=1)
    r1 = ledger.roles_for(net.genesis, ledger.genesis_state(net.genesis))
    victim = r1.workers[0]
    lost = set()

    def lose(dest, pub):
        key = (dest, pub.topic)
        if f"/{victim}" in pub.topic and ("/wtx/" in pub.topic or "/blob/" in pub.topic) and key not in lost:
            lost.add(key)
            return dest != victim
        return False

    net.lose = lose
    net.start()
    net.run()
    blk = net.nodes["d00"].chain[0]
    assert victim in blk.body["accepted"]
    assert net.now < net.genesis.deadlines["train"] / 1000  # recovered by the pull, not the deadline
