"""Candidate blocks travel compact (messages.compact_payload / decode_block): the header and
the ids of the block's transactions, which every device already holds. Real nodes in the
in-memory network (tests/simnet.py), real signatures; the attacks are crafted bytes signed
with a real miner's key."""

from __future__ import annotations

import dataclasses

import pytest

from edge_agent.protocol import ledger
from edge_agent.protocol.canonical import canonical_bytes, parse
from edge_agent.protocol.messages import (
    Drop,
    compact_payload,
    decode,
    decode_block,
    from_json,
    sign,
    signed_view,
)
from simnet import SimNet


def _blocks(net):
    return [p for p in net.published if "/block/" in p.topic]


def test_candidates_go_out_compact_and_every_device_rebuilds_the_signed_block():
    net = SimNet(n=8, roles=(4, 2, 2), rounds=3)
    net.start()
    net.run()
    pubs = _blocks(net)
    assert len(pubs) == 2 * 3  # two miners a round
    for p in pubs:
        full = decode(p.payload)
        assert full.body["wtxs"] and full.body["vtxs"]
        assert parse(p.sent)["refs"]["wtxs"] == [from_json(w).id for w in full.body["wtxs"]]
        assert len(p.sent) * 3 < len(p.payload)  # the transactions are not sent again
    chain = net.nodes["d00"].chain
    assert len(chain) == 3 and ledger.replay(net.genesis, chain).head == chain[-1].id
    for d, n in net.nodes.items():
        assert [b.id for b in n.chain] == [b.id for b in chain]
        assert n.drops["unknown_tx"] == 0 and not n.incomplete
    # what they appended is the block the miner signed, byte for byte
    signed = {decode(p.payload).id: p.payload for p in pubs}
    assert all(b.payload() == signed[b.id] for b in chain)


def test_decode_block_gives_the_header_and_the_missing_ids_when_a_tx_is_not_held():
    net = SimNet(n=6, roles=(3, 2, 1), rounds=1)
    net.start()
    net.run()
    (pub,) = _blocks(net)
    full = decode(pub.payload)
    held = {from_json(t).id: from_json(t) for t in full.body["wtxs"] + full.body["vtxs"]}
    lost = from_json(full.body["vtxs"][0]).id
    hdr, missing = decode_block(pub.sent, lambda i: None if i == lost else held.get(i))
    assert missing == [lost] and hdr.id == full.id and hdr.body == signed_view(full.body)
    blk, missing = decode_block(pub.sent, held.get)
    assert not missing and blk.payload() == pub.payload
    assert decode_block(pub.payload, lambda i: None) == (full, [])  # a full block is still a block


def test_a_device_that_lost_a_tx_asks_the_miner_for_the_whole_block():
    """One validator's vote never reaches d00: d00 cannot rebuild the candidates that carry
    it, waits PULL_GRACE_S for it, then asks their miners for the whole blocks, and ends with
    the same chain as everyone."""
    net = SimNet(n=8, roles=(4, 2, 2), rounds=2)
    r1 = ledger.roles_for(net.genesis, ledger.genesis_state(net.genesis))
    lost_from = r1.validators[0]
    victim = next(d for d in net.nodes if d not in r1.miners and d != lost_from)
    net.lose = lambda dest, pub: dest == victim and pub.topic.endswith(f"/vtx/{lost_from}")
    net.start()
    net.run()
    v = net.nodes[victim]
    asked = [parse(p.payload)["body"] for p in net.published if p.topic.endswith(f"/sync/{victim}")]
    assert any(b.get("block_ids") and b.get("target") in r1.miners for b in asked)
    assert v.drops["unknown_tx"] >= 1
    assert [b.id for b in v.chain] == [b.id for b in net.nodes[r1.miners[0]].chain] and len(v.chain) == 2


def _rewrite_blocks(craft):
    """A tamper hook: every compact block a miner sends is replaced by ``craft(full, refs)``."""

    def tamper(dev, pub):
        if "/block/" not in pub.topic:
            return pub
        obj = parse(pub.sent)
        return dataclasses.replace(pub, wire=canonical_bytes(craft(decode(pub.payload), obj)))

    return tamper


@pytest.mark.parametrize(
    "attack, reason",
    [
        # two transactions swapped: every id is held, the content digest is not the signed one
        ("swap", "bad_content"),
        # the header of another block (its height changed): the signature does not cover it
        ("header", "bad_signature"),
        # a reference that is not a hash
        ("junk_ref", "malformed"),
        # the whole block's body with refs beside it
        ("full_body", "malformed"),
    ],
)
def test_a_crafted_compact_block_is_dropped_for_its_reason_and_the_genuine_one_pulled(attack, reason):
    def craft(full, obj):
        refs = obj["refs"]
        if attack == "swap":
            refs["wtxs"] = refs["wtxs"][::-1]
        elif attack == "header":
            obj["body"] = dict(obj["body"], rewarded=1)
        elif attack == "junk_ref":
            refs["vtxs"] = refs["vtxs"][:-1] + ["not-a-hash"]
        elif attack == "full_body":
            obj["body"] = full.body
        return obj

    net = SimNet(n=6, roles=(3, 2, 1), rounds=1)
    net.tamper = _rewrite_blocks(craft)
    net.start()
    net.run()
    (miner,) = ledger.roles_for(net.genesis, ledger.genesis_state(net.genesis)).miners
    others = [n for d, n in net.nodes.items() if d != miner]
    assert all(n.drops[reason] >= 1 for n in others), {d: dict(n.drops) for d, n in net.nodes.items()}
    # nobody appended a crafted block; they pulled the genuine one from the miner's chain
    genuine = net.nodes[miner].chain[0]
    assert all([b.id for b in n.chain] == [genuine.id] for n in others)


def test_a_forged_header_naming_unknown_txs_costs_no_request():
    """A compact block whose txs we lack makes us ask its miner for it, but only once its
    header's signature is verified: a forgery in a miner's name triggers no traffic."""
    net = SimNet(n=6, roles=(3, 2, 1), rounds=1)
    net.start()
    net.run()
    (pub,) = _blocks(net)
    full = decode(pub.payload)
    node = next(n for d, n in net.nodes.items() if d != full.sender)
    obj = parse(pub.sent)
    obj["refs"]["wtxs"] = ["ab" * 32] + obj["refs"]["wtxs"][1:]  # a tx nobody holds
    forged = dict(obj, body=dict(obj["body"], height=1), sig="00" * 64)
    from edge_agent.protocol.node import Received

    acts = node.handle(Received(pub.topic, canonical_bytes(forged)), net.now)
    assert node.drops["bad_signature"] == 1 and not node.incomplete
    assert not [a for a in acts if "/sync/" in getattr(a, "topic", "")]


def test_compact_payload_round_trips_a_block_with_evidence():
    """Evidence is sent in full inside the compact form (a device may not hold it)."""
    net = SimNet(n=6, roles=(3, 2, 1), rounds=1)
    net.start()
    net.run()
    full = net.nodes["d00"].chain[0]
    miner_key = net.keys[full.sender]
    evidence = [{"kind": "test", "a": 1}]
    body = dict(full.body, evidence=evidence)
    env = sign(miner_key, body)
    held = {from_json(t).id: from_json(t) for t in body["wtxs"] + body["vtxs"]}
    blk, missing = decode_block(compact_payload(env), held.get)
    assert not missing and blk.id == env.id and blk.body["evidence"] == evidence
    with pytest.raises(Drop) as e:
        decode_block(compact_payload(sign(miner_key, dict(body, evidence=[]))).replace(b'"evidence":[]', b'"evidence":[1]'), held.get)
    assert e.value.reason == "bad_content"


def test_content_bytes_from_each_txs_kept_bytes_are_the_canonical_encoding():
    """The content digest is computed from the bytes each tx's signature covers; it must be
    the RFC 8785 encoding of the content, whatever the evidence holds and however the txs
    were made (received, or signed here)."""
    from edge_agent.protocol.messages import Envelope, _content_bytes

    net = SimNet(n=6, roles=(3, 2, 1), rounds=1)
    net.start()
    net.run()
    blk = net.nodes["d00"].chain[0]
    received = [from_json(t) for t in blk.body["wtxs"] + blk.body["vtxs"]]
    resigned = [sign(net.keys[e.sender], e.body) for e in received]
    bare = [Envelope(e.body, e.sig, e.id) for e in received]  # no kept bytes
    evidence = [{"note": "caf\u00e9 \U0001f600 \"quoted\"", "n": -(2**53) + 1, "z": [], "a": {"b": None}}]
    w = len(blk.body["wtxs"])
    for txs in (received, resigned, bare):
        content = {"evidence": evidence, "vtxs": [e.to_json() for e in txs[w:]], "wtxs": [e.to_json() for e in txs[:w]]}
        assert _content_bytes(txs[:w], txs[w:], evidence) == canonical_bytes(content)


def test_with_more_than_64_missing_workers_pull_requests_stay_valid_and_cover_all():
    """At 200 devices 120 workers train: a device that asked for every missing worker's tx
    in one request sent 120 names, and every receiver dropped it (a request names at most
    64). Each request now names 64, the next request the next 64."""
    from edge_agent.protocol.node import Received

    net = SimNet(n=74, roles=(70, 2, 2), rounds=1)
    asker, other = net.nodes["d00"], net.nodes["d01"]
    asker.start(0.0)
    other.start(0.0)
    named: set[str] = set()
    for k in range(3):
        (req,) = asker._pull_updates(float(k))
        body = parse(req.payload)["body"]
        assert len(body["wtx_of"]) <= 64
        named |= set(body["wtx_of"])
        other.handle(Received(req.topic, req.payload), float(k))
    assert named == set(asker.ctx.roles.workers)  # (none has trained yet)
    assert other.drops["malformed"] == 0


def test_a_compact_block_on_another_kinds_topic_is_a_topic_mismatch():
    """decode() of a compact block gives its header, whose kind shows it is on the wrong
    topic (the reason a full block there gets), not a shapeless 'malformed'."""
    from edge_agent.protocol.node import Received

    net = SimNet(n=6, roles=(3, 2, 1), rounds=1)
    net.start()
    net.run()
    (pub,) = _blocks(net)
    node = next(n for d, n in net.nodes.items() if d != decode(pub.payload).sender)
    assert decode(pub.sent).kind == "block" and "content" in decode(pub.sent).body
    node.handle(Received(pub.topic.replace("/block/", "/wtx/"), pub.sent), net.now)
    assert node.drops["topic_mismatch"] == 1 and node.drops["malformed"] == 0


def test_votes_in_flight_are_not_asked_for_nor_published_again():
    """A miner asks for missing votes only once no new one came for WTX_PULL_S, and a
    validator does not publish again a vote it sent less than WTX_PULL_S ago: the validators
    vote at about the same time, and at 200 devices asking for votes still in flight made each
    validator send its tx to every device again and again (10 GB a round)."""
    from edge_agent.protocol import node as nd
    from edge_agent.protocol.round import WTX_PULL_S, seed_of

    net = SimNet(n=8, roles=(4, 2, 2), rounds=1)
    r1 = ledger.roles_for(net.genesis, ledger.genesis_state(net.genesis))
    (v, late), m = r1.validators, r1.miners[0]
    net.lose = lambda dest, pub: dest == m and pub.topic.endswith(f"/vtx/{late}")
    net.start()
    net.run(until=lambda: v in (net.nodes[m].ctx.vtxs if net.nodes[m].ctx else {}))
    miner = net.nodes[m]
    heard = miner.ctx.vtx_last_at

    def asked(now):
        pubs = miner._pull_updates(now)
        return [b for b in (parse(p.payload)["body"] for p in pubs)]

    assert all(not b.get("vtx_of") for b in asked(heard + 1))
    assert any(b.get("vtx_of") == [late] for b in asked(heard + WTX_PULL_S + 1))

    validator = net.nodes[v]
    sent = validator.my_vtx_at

    def republished(now):
        body = {"run": net.genesis.run, "kind": "sync", "round": 1, "sender": m, "vtx_of": [v], "blobs": [],
                "nonce": seed_of(now, m, "test")}  # fmt: skip
        req = sign(net.keys[m], body)
        acts = validator.handle(nd.Received(f"bfl/v1/{net.genesis.run}/sync/{m}", req.payload()), now)
        return [a for a in acts if isinstance(a, nd.Publish) and "/vtx/" in a.topic]

    assert republished(sent + 1) == []  # in flight
    assert len(republished(sent + WTX_PULL_S + 1)) == 1  # lost, then: published again
