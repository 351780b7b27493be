"""Byzantine behaviours the operator injects into a device (``bfl run --attack NAME`` or
``--malicious-ids d03=NAME``), applied by the agent shell to the actions its Node returns;
the protocol core (``protocol/``) knows nothing of them. Each is a way an insider with its
own valid key can misbehave on the wire (docs/security.md: what stops each):

``invert_votes``   vote against its own evaluation. A vote must follow from the evaluation
                   it records (rule ``vote_not_evaluated``), so the liar also rewrites what it
                   records: the updates it wants accepted get the reference accuracy and one
                   ordinary loss, those it wants rejected are recorded as unusable. Only the
                   other validators' votes can outweigh it.
``equivocate``     sign a second, different message for each slot it fills: a worker tx
                   naming another model, a validator tx with every vote inverted (and its
                   numbers rewritten to match), an empty block.
``withhold_blob``  publish its worker tx but never the model it names.
``false_head``     with each head it publishes, claim the run's last height.
``junk_votes``     before its validator tx, one naming a real worker tx 5 000 times and one
                   voting for a worker that does not exist.
``blob_spam``      with each transaction, 5 blobs (correct SHA-256) that nothing names.
"""

from __future__ import annotations

import os

from .protocol import node as nd
from .protocol.canonical import CanonicalError
from .protocol.crypto import KeyPair, sha256_hex
from .protocol.ledger import LOSS_UNUSABLE, build_block
from .protocol.messages import Drop, Envelope, decode, parse_topic, sign, topic

LIE_LOSS_MILLI = 1000
PROTOCOL_ATTACKS = ("invert_votes", "equivocate", "withhold_blob", "false_head", "junk_votes", "blob_spam")


def apply(name: str, node: nd.Node, key: KeyPair, actions: list) -> list:
    """The actions a device with behaviour ``name`` really carries out instead of ``actions``."""
    fn = BEHAVIOURS.get(name)
    if fn is None:
        return actions
    out: list = []
    for a in actions:
        out += fn(node, key, a)
    return out


def _own(node: nd.Node, action, kind: str) -> Envelope | None:
    """The envelope of our own published message of ``kind``, else None."""
    if not isinstance(action, nd.Publish):
        return None
    try:
        tp = parse_topic(action.topic)
        if tp.kind != kind or tp.device != node.me or kind == "blob":
            return None
        return decode(action.payload)
    except (Drop, CanonicalError):
        return None


def _publish(env: Envelope, retain: bool = False) -> nd.Publish:
    return nd.Publish(topic(env.body["run"], env.kind, env.sender), env.payload(), retain)


def invert_votes(node: nd.Node, key: KeyPair, action) -> list:
    env = _own(node, action, "vtx")
    if env is None:
        return [action]
    votes = [dict(v, positive=not v["positive"]) for v in env.body["votes"]]
    ref = votes[0]["ref_bp"] if any(v["positive"] for v in votes) else 0
    for v in votes:
        v["local_bp"], v["ref_bp"] = (ref if v["positive"] else 0), ref
        v["loss_milli"] = LIE_LOSS_MILLI if v["positive"] else LOSS_UNUSABLE
    return [_publish(sign(key, dict(env.body, votes=votes)))]


def equivocate(node: nd.Node, key: KeyPair, action) -> list:
    for kind in ("wtx", "vtx", "block"):
        env = _own(node, action, kind)
        if env is None:
            continue
        if kind == "wtx":
            other = dict(env.body, model=sha256_hex(env.body["model"].encode()))
        elif kind == "vtx":
            if not env.body["votes"]:
                return [action]  # no vote to change: no valid second version
            return [action] + invert_votes(node, key, action)  # valid too: the votes follow their numbers
        else:
            st = node.state
            other = build_block(node.genesis, st, node.me, [], [], st.global_model)
            if other == env.body:
                return [action]
        return [action, _publish(sign(key, other))]
    return [action]


def withhold_blob(node: nd.Node, key: KeyPair, action) -> list:
    if isinstance(action, nd.BlobRequestAnswer):
        return []
    if isinstance(action, nd.Publish) and f"/blob/{node.me}/" in action.topic:
        return []
    return [action]


def false_head(node: nd.Node, key: KeyPair, action) -> list:
    env = _own(node, action, "head")
    if env is None:
        return [action]
    last = node.genesis.rounds
    claim = dict(env.body, round=last, height=last, head=sha256_hex(b"no such block"))
    return [action, _publish(sign(key, claim), retain=True)]


def junk_votes(node: nd.Node, key: KeyPair, action) -> list:
    env = _own(node, action, "vtx")
    if env is None or not env.body["verified"]:
        return [action]
    inflated = dict(env.body, verified=[env.body["verified"][0]] * 5000)
    ghost = {"wtx": "cd" * 32, "worker": "ghost", "model": "cd" * 32, "positive": True, "local_bp": 0, "ref_bp": 0,
             "loss_milli": 0}  # fmt: skip
    with_ghost = dict(env.body, verified=sorted(set(env.body["verified"]) | {"cd" * 32}),
                      votes=sorted(env.body["votes"] + [ghost], key=lambda v: v["worker"]))  # fmt: skip
    return [_publish(sign(key, inflated)), _publish(sign(key, with_ghost)), action]


def blob_spam(node: nd.Node, key: KeyPair, action) -> list:
    if _own(node, action, "wtx") is None and _own(node, action, "vtx") is None:
        return [action]
    spam = [os.urandom(4096) for _ in range(5)]
    return [action] + [nd.Publish(topic(node.run, "blob", node.me, sha256_hex(b)), b) for b in spam]


BEHAVIOURS = {
    "invert_votes": invert_votes,
    "equivocate": equivocate,
    "withhold_blob": withhold_blob,
    "false_head": false_head,
    "junk_votes": junk_votes,
    "blob_spam": blob_spam,
}
assert tuple(BEHAVIOURS) == PROTOCOL_ATTACKS
