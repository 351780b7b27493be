"""Byzantine behaviours the operator injects, applied by the shell to the Node's outgoing
actions; the protocol core (``protocol/``) knows nothing of them.

``invert_votes``: a validator that votes against its own evaluation. Since a vote must
follow from the evaluation it records (ledger rule ``vote_not_evaluated``), the liar also
rewrites what it records: the updates it wants accepted all get the reference accuracy and
one ordinary loss, those it wants rejected are recorded as unusable. The result passes every
rule; only the other validators' votes can outweigh it.
"""

from __future__ import annotations

from .protocol import node as nd
from .protocol.canonical import CanonicalError
from .protocol.crypto import KeyPair
from .protocol.genesis import Genesis
from .protocol.ledger import LOSS_UNUSABLE
from .protocol.messages import Drop, decode, parse_topic, sign

LIE_LOSS_MILLI = 1000


def invert_votes(genesis: Genesis, key: KeyPair, action):
    """The same action, or for our validator tx a re-signed one with every vote inverted."""
    if not isinstance(action, nd.Publish):
        return action
    try:
        if parse_topic(action.topic).kind != "vtx":
            return action
        env = decode(action.payload)
    except (Drop, CanonicalError):
        return action
    votes = [dict(v, positive=not v["positive"]) for v in env.body["votes"]]
    ref = votes[0]["ref_bp"] if any(v["positive"] for v in votes) else 0
    for v in votes:
        v["local_bp"], v["ref_bp"] = (ref if v["positive"] else 0), ref
        v["loss_milli"] = LIE_LOSS_MILLI if v["positive"] else LOSS_UNUSABLE
    forged = sign(key, dict(env.body, votes=votes))
    return nd.Publish(action.topic, forged.payload(), action.retain)
