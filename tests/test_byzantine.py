"""A byzantine insider with its own valid key, in the in-memory network (the real protocol
core, real signatures and blobs), every message delivered in a random order: the honest
devices still end with one head, the chain replays, and the equivocator is slashed.

Each behaviour is a function (net, device, Publish) -> [(destinations, Publish)]: what the
byzantine device sends instead of each of its honest publications. Those that need no
targeting are the agent shell's own (edge_agent/byzantine.py, what `bfl run --attack`
injects); the two equivocations show each half of the network a different message."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent import byzantine
from edge_agent.protocol import ledger
from edge_agent.protocol import node as nd
from edge_agent.protocol.crypto import sha256_hex
from edge_agent.protocol.messages import decode, from_json, sign, topic

from simnet import DIM, SimNet, blob_of, make_run

N, ROLES = 8, (4, 2, 2)


def round1_roles():
    genesis, _, _ = make_run(n=N, roles=ROLES, rounds=4)
    return ledger.roles_for(genesis, ledger.genesis_state(genesis))


#: the byzantine device of each behaviour has the role the behaviour needs in round 1
ROUND1 = round1_roles()
BYZ = ROUND1.miners[0]


def _halves(net):
    devs = sorted(net.nodes)
    return devs[::2], devs[1::2]


def equivocating_miner(net, dev, pub):
    """Its candidate to half of the devices, a second, different valid block (an empty one)
    to the other half, and both to one device."""
    if "/block/" not in pub.topic:
        return [(None, pub)]
    node = net.nodes[dev]
    empty = sign(net.keys[dev], ledger.build_block(net.genesis, node.state, dev, [], [], node.state.global_model))
    a, b = _halves(net)
    # one device gets both (with each half seeing only one, nobody could notice when the
    # other miner's block wins in both halves -- harmless, but then nothing is slashed)
    return [(a + b[:1], pub), (b, nd.Publish(pub.topic, empty.payload()))]


def equivocating_worker(net, dev, pub):
    """Two worker txs for its round, with two different published models, to two halves."""
    if "/wtx/" not in pub.topic:
        return [(None, pub)]
    env = decode(pub.payload)
    other = blob_of(np.full(DIM, 0.5, np.float32) + np.float32(env.round))
    h = sha256_hex(other)
    second = sign(net.keys[dev], dict(env.body, model=h))
    a, b = _halves(net)
    return [
        (None, nd.Publish(topic(net.genesis.run, "blob", dev, h), other)),
        (a, pub),
        (b, nd.Publish(pub.topic, second.payload())),
    ]


def shell(name):
    """The agent shell's own behaviour ``name`` (edge_agent/byzantine.py, what ``bfl run
    --attack NAME`` injects), as a SimNet hook."""

    def run(net, dev, pub):
        acts = byzantine.apply(name, net.nodes[dev], net.keys[dev], [pub])
        return [(None, a) for a in acts if isinstance(a, nd.Publish)]

    return run


BEHAVIOURS = {
    "equivocating_miner": equivocating_miner,
    "equivocating_worker": equivocating_worker,
    "phantom_update": shell("withhold_blob"),  # a worker tx whose blob is never published
    "junk_validator": shell("junk_votes"),  # a real tx named 5 000 times; a vote for a ghost
    "lying_head": shell("false_head"),  # with each head, a claim of the last height
    "blob_spam": shell("blob_spam"),  # blobs with a correct SHA-256 that nothing names
}


def compose(*fns):
    def run(net, dev, pub):
        sends = [(None, pub)]
        for fn in fns:
            sends = [(d2 if d2 is not None else d1, p2) for d1, p in sends for d2, p2 in fn(net, dev, p)]
        return sends

    return run


class WatchedNet(SimNet):
    """SimNet that checks, after every event, that the honest devices agree on every block
    all of them have built on: once each has gone one round further, height h is settled."""

    def deliver(self, dev, event):
        super().deliver(dev, event)
        chains = [n.chain for d, n in self.nodes.items() if d not in self.byzantine]
        settled = min(len(c) for c in chains) - 1
        for h in range(settled):
            assert len({c[h].id for c in chains}) == 1, f"honest devices still differ on block {h + 1}"


def run_with(behaviours, seed: int, byz: str, rounds: int = 4) -> SimNet:
    net = WatchedNet(n=N, roles=ROLES, rounds=rounds, rng=np.random.default_rng(seed),
                     byzantine={byz: compose(*(BEHAVIOURS[b] for b in behaviours))})  # fmt: skip
    net.start()
    net.run(max_steps=400_000)
    return net


def assert_one_honest_chain(net):
    honest = [d for d in net.nodes if d not in net.byzantine]
    heads = {net.nodes[d].state.head for d in honest}
    assert len(heads) == 1, {d: net.nodes[d].state.height for d in honest}
    chain = net.nodes[honest[0]].chain
    assert len(chain) == net.genesis.rounds
    assert ledger.replay(net.genesis, chain).head == chain[-1].id
    for d in honest:  # what each device persisted is the chain it holds
        assert [b.id for b in net.committed[d]] == [b.id for b in net.nodes[d].chain]
    return chain


ROLE_OF = {
    "equivocating_miner": ROUND1.miners[0],
    "equivocating_worker": ROUND1.workers[0],
    "phantom_update": ROUND1.workers[0],
    "junk_validator": ROUND1.validators[0],
    "lying_head": ROUND1.validators[0],
    "blob_spam": ROUND1.workers[0],
}


@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
def test_each_byzantine_behaviour_alone(behaviour):
    byz = ROLE_OF[behaviour]
    net = run_with([behaviour], seed=1, byz=byz)
    chain = assert_one_honest_chain(net)
    state = ledger.replay(net.genesis, chain)
    honest = [d for d in net.nodes if d != byz]
    drops = sum((net.nodes[d].drops for d in honest), start=Counter())
    # no inflation: a validator earns at most |W| verifications + |W| votes a round (Eq. 2)
    w = net.genesis.roles[0]
    assert all(v <= 2 * w * len(chain) for d, v in state.stakes.items() if d not in _workers_of(chain))
    if behaviour in ("equivocating_miner", "equivocating_worker"):
        # the evidence went into a block: slashed, blacklisted, never accepted again
        assert byz in state.slashed and state.stake(byz) == 0 and byz in state.blacklist
        assert any(e["a"]["body"]["sender"] == byz for b in chain for e in b.body["evidence"])
    if behaviour == "equivocating_miner":  # the honest miner's block won round 1
        assert chain[0].sender != byz
    if behaviour == "phantom_update":  # its update never enters G_j; the others' do
        assert byz in chain[0].body["rejected"] and len(chain[0].body["accepted"]) == w - 1
    if behaviour == "junk_validator":  # both forged txs dropped, its real vote counted
        assert drops["duplicate_id"] >= len(honest) and drops["vote_mismatch"] >= len(honest)
        assert any(from_json(v).sender == byz for v in chain[0].body["vtxs"])
    if behaviour == "lying_head":  # every honest device gave up on the claim, once per height
        assert drops["bad_claim"] >= len(honest)
    if behaviour == "blob_spam":  # held in memory at most one per sender, never stored
        assert all(len(net.nodes[d].pending.get(byz, {})) <= nd.PENDING_BLOBS_PER_SENDER for d in honest)
        assert drops["too_many_blobs"] >= len(honest)


def _workers_of(chain):
    return {raw["body"]["sender"] for b in chain for raw in b.body["wtxs"]}


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1))
def test_every_behaviour_at_once_in_random_delivery_orders(seed):
    check_every_behaviour_at_once(seed)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1))
def test_every_behaviour_at_once_in_many_more_orders(seed):
    """The same, exploring 100 new orders on every run (the default suite's are fixed)."""
    check_every_behaviour_at_once(seed)


def check_every_behaviour_at_once(seed):
    net = run_with(sorted(BEHAVIOURS), seed=seed, byz=BYZ)
    chain = assert_one_honest_chain(net)
    assert BYZ in ledger.replay(net.genesis, chain).slashed
    honest = [d for d in net.nodes if d != BYZ]
    # every honest device kept only blobs some transaction or block named
    for d in honest:
        assert not net.nodes[d].pending or all(len(v) <= nd.PENDING_BLOBS_PER_SENDER for v in net.nodes[d].pending.values())


def test_validator_and_miner_restarted_mid_round_cost_at_most_a_deadline():
    """Both crash once the round's worker txs are out and come back: they pull the txs they
    missed, the round completes well before its deadlines and keeps every honest update.
    A restarted device never signs a second message for a slot (it re-publishes its own)."""
    net = SimNet(n=8, roles=(4, 2, 2), rounds=2)
    roles = ledger.roles_for(net.genesis, ledger.genesis_state(net.genesis))
    victims = (roles.validators[0], roles.miners[0])
    net.start()
    net.run(until=lambda: all(any(f"/wtx/{w}" in p.topic for p in net.published) for w in roles.workers))
    net.silent |= set(victims)
    net.run(until=lambda: net.now >= 2)
    for v in victims:
        net.restart(v)
    net.run()
    chain = assert_one_honest_chain_all(net)
    assert len(chain[0].body["accepted"]) == len(roles.workers)
    assert {from_json(v).sender for v in chain[0].body["vtxs"]} == set(roles.validators)
    assert net.now < net.genesis.deadlines["train"] / 1000  # not a single deadline waited
    assert not any(ledger.replay(net.genesis, chain).slashed)


def test_restarted_worker_republishes_instead_of_signing_again():
    net = SimNet(n=8, roles=(4, 2, 2), rounds=1)
    worker = ledger.roles_for(net.genesis, ledger.genesis_state(net.genesis)).workers[0]
    net.start()
    net.run(until=lambda: any(f"/wtx/{worker}" in p.topic for p in net.published))
    net.silent.add(worker)
    net.restart(worker)
    net.run()
    chain = assert_one_honest_chain_all(net)
    assert worker in chain[0].body["accepted"] and not chain[0].body["evidence"]
    assert len({e.id for e in net.signed[worker] if e.kind == "wtx"}) == 1


def assert_one_honest_chain_all(net):
    heads = {n.state.head for n in net.nodes.values()}
    assert len(heads) == 1
    return net.nodes[sorted(net.nodes)[0]].chain


def _round1_candidates(net):
    blocks = {e.id: e for e in (decode(p.payload) for p in net.published if "/block/" in p.topic) if e.round == 1}
    return sorted(blocks.values(), key=lambda e: e.id)


def test_a_better_candidate_that_arrives_late_reorganises():
    """One device gets the fork-choice winner of round 1 only after it has appended the
    other miner's block: it rolls back, appends the winner, and ends with the same chain,
    stakes and G_j as everyone (from the winner itself, or from its peers' heads)."""
    net = SimNet(n=8, roles=(4, 2, 2), rounds=3)
    late = "d05"
    cut_off = {"/head/", "/chain/", "/block/"}  # no block of round 1, nor a hint of one
    lose = lambda dest, pub: dest == late and any(k in pub.topic for k in cut_off)  # noqa: E731
    net.lose = lose
    net.start()
    net.run(until=lambda: len(_round1_candidates(net)) == 2)
    winner, loser = ledger.fork_choice_order(ledger.genesis_state(net.genesis), _round1_candidates(net))
    net.lose = None
    net.send(nd.Publish(ledger_topic(net, loser), loser.payload()), [late])
    net.lose = lose
    net.run(until=lambda: net.nodes[late].state.height >= 1)
    assert net.nodes[late].chain[0].id == loser.id
    net.lose = None
    net.send(nd.Publish(ledger_topic(net, winner), winner.payload()), [late])
    for t, payload in net.retained.items():  # the heads it missed, delayed rather than lost
        net.queue.append((late, nd.Received(t, payload)))
    net.run()
    assert net.nodes[late].reorgs == 1
    chain = assert_one_honest_chain_all(net)
    assert chain[0].id == winner.id
    assert net.nodes[late].state == ledger.replay(net.genesis, chain)
    assert [b.id for b in net.committed[late]] == [b.id for b in chain]


def ledger_topic(net, env):
    return topic(net.genesis.run, env.kind, env.sender)


def test_chain_answers_from_a_lying_peer_cannot_split_the_network():
    """A device that was down catches up from a byzantine peer that answers every pull with
    the round-1 candidate the network did not choose (validly signed by its miner): the
    device notices the fork from its peers' heads and pulls, and reorganises to the chain
    every honest device has."""
    net = SimNet(n=8, roles=(4, 2, 2), rounds=4)
    late, liar = "d07", "d00"
    net.silent = {late}
    net.start()
    net.run(until=lambda: min(n.state.height for d, n in net.nodes.items() if d != late) >= 2)
    chosen = net.nodes["d01"].chain[0]
    loser = next(c for c in _round1_candidates(net) if c.id != chosen.id)

    def lie(net_, dev, pub):
        if "/chain/" not in pub.topic:
            return [(None, pub)]
        env = decode(pub.payload)
        blocks = [loser.to_json() if b["body"]["height"] == 1 else b for b in env.body["blocks"]]
        return [(None, nd.Publish(pub.topic, sign(net_.keys[dev], dict(env.body, blocks=blocks)).payload()))]

    net.byzantine[liar] = lie
    net.revive(late)
    net.run()
    heads = {d: n.state.head for d, n in net.nodes.items() if d != liar}
    assert len(set(heads.values())) == 1 and net.nodes[late].chain[0].id == chosen.id


def test_a_miner_blacklisted_by_its_own_block_is_still_caught_equivocating_at_that_height():
    """Miner M's block A for height 1 carries evidence against M itself (two worker txs M
    signed for round 1), so every device that appends A blacklists M. M's second block B
    for height 1 is judged against the state it builds on (genesis, where M is not
    blacklisted): with A it is the evidence that M equivocated at height 1, and every
    device reorganises to the other miner's block C. Dropped on arrival because M is
    blacklisted in the device's current state (before 6d1d936), B left them all on A."""
    net = SimNet(n=N, roles=ROLES, rounds=2)
    g, s0 = net.genesis, ledger.genesis_state(net.genesis)
    m, m2 = ledger.roles_for(g, s0).miners
    held: dict[str, nd.Publish] = {}

    def withhold(net_, dev, pub):
        if "/block/" in pub.topic and decode(pub.payload).round == 1:
            held.setdefault(dev, pub)
            return []
        return [(None, pub)]

    net.byzantine = {m: withhold}
    net.lose = lambda dest, pub: f"/block/{m2}" in pub.topic and bool(held.setdefault(m2, pub))
    net.start()
    net.run(until=lambda: {m, m2} <= set(held))
    honest_a = decode(held[m].payload)
    c = decode(held[m2].payload)

    def a_with_evidence_against_m(i: int):
        wtx = [sign(net.keys[m], ledger.make_wtx(g, s0, m, f"{i + k:064x}")) for k in (0, 1)]
        item = ledger.evidence_item(*wtx)
        body = ledger.build_block(g, s0, m, [from_json(w) for w in honest_a.body["wtxs"]],
                                  [from_json(v) for v in honest_a.body["vtxs"]], honest_a.body["global_model"],
                                  evidence=[item])  # fmt: skip
        return sign(net.keys[m], body)

    # M grinds its evidence until A wins the stake tie against C (lowest hash first)
    a = next(blk for blk in map(a_with_evidence_against_m, range(0, 400, 2)) if blk.id < c.id)
    b = sign(net.keys[m], ledger.build_block(g, s0, m, [], [], s0.global_model))
    net.byzantine = {m: lambda net_, dev, pub: [] if "/block/" in pub.topic else [(None, pub)]}
    net.lose = lambda dest, pub: f"/block/{m2}" in pub.topic and decode(pub.payload).round == 1
    net.send(nd.Publish(ledger_topic(net, a), a.payload()))
    honest = [d for d in net.nodes if d != m]
    net.run(until=lambda: all(net.nodes[d].state.height >= 1 for d in honest))
    for d in honest:
        assert net.nodes[d].chain[0].id == a.id and m in net.nodes[d].state.blacklist
    net.lose = None
    net.send(held[m2])  # C, and M's second block for height 1
    net.send(nd.Publish(ledger_topic(net, b), b.payload()))
    net.run()
    for d in honest:
        node = net.nodes[d]
        assert node.chain[0].id == c.id, d
        assert m in node.state.slashed  # the equivocation at height 1, put in block 2
    assert ledger.replay(g, net.nodes[honest[0]].chain).head == net.nodes[honest[0]].state.head
