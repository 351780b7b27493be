"""Signed messages and the MQTT topic layout.

Every protocol message is an envelope ``{"body": {...}, "sig": hex}`` whose signature is
Ed25519 over the RFC 8785 bytes of ``body``. A body always carries ``run``, ``kind``,
``round`` and ``sender``; its id is the SHA-256 of those canonical bytes.

Topics (one subtree per kind; the publishing device's id is its own level so a broker ACL
can confine each device to its own subtrees, see ``broker/mosquitto.py``)::

    bfl/v1/devices/<device>/hello      retained  signed announcement: public key, capabilities
    bfl/v1/devices/<device>/status     retained  online / offline (last will)
    bfl/v1/<run>/genesis               retained  signed by the operator, block 0
    bfl/v1/<run>/cmd/<device>          retained  signed by the operator (fault injection)
    bfl/v1/<run>/ack/<device>                    device acknowledges a command
    bfl/v1/<run>/wtx/<device>                    worker transaction (Section 5.3.1)
    bfl/v1/<run>/blob/<device>/<sha256>          safetensors model bytes, content-addressed
    bfl/v1/<run>/vtx/<device>                    validator transaction (votes, Algorithm 1)
    bfl/v1/<run>/block/<device>                  a miner's candidate block (compact: see below)
    bfl/v1/<run>/sync/<device>                   request for missing blocks or blobs (pull)
    bfl/v1/<run>/chain/<device>                  answer to a block request: signed blocks
    bfl/v1/<run>/head/<device>         retained  the device's chain head
    bfl/v1/<run>/evidence/<device>               two signed messages of one sender for one slot
    bfl/v1/<run>/report/<device>                 accuracy of G_j on the device's test split
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .canonical import CanonicalError, canonical_bytes, canonical_bytes_checked, parse
from .crypto import KeyPair, sha256_hex, verify

PREFIX = "bfl/v1"

# Kinds published under a run, each by the device named in the topic.
RUN_KINDS = ("wtx", "vtx", "block", "blob", "sync", "chain", "head", "report", "ack", "evidence")
OPERATOR_KINDS = ("genesis", "cmd")

MAX_JSON_BYTES = 1 << 20  # blocks embed every transaction of a round; well under this
DEFAULT_MAX_BLOB_BYTES = 64 << 20

_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def valid_id(name: str) -> bool:
    """Device and run ids: safe as one MQTT topic level and as a file name."""
    return bool(_ID_RE.match(name)) and name not in (".", "..")


def valid_hash(h: Any) -> bool:
    return isinstance(h, str) and bool(_HASH_RE.match(h))


#: Every reason a message can be dropped for (the ``reason`` label of
#: ``bfl_messages_dropped_total``; tests/test_metrics.py checks the code uses no other).
DROP_REASONS = (
    "bad_claim", "bad_content", "bad_evidence", "bad_genesis", "bad_signature", "bad_topic", "blacklisted",
    "buffer_full", "busy", "duplicate", "duplicate_id", "duplicate_sender", "equivocation",
    "future_round", "hash_mismatch", "internal_error", "malformed", "not_canonical", "not_for_us",
    "stale_round", "too_large", "too_many_blobs", "topic_mismatch", "unavailable", "unexpected_kind",
    "unknown_operator", "unknown_sender", "unknown_tx", "unvoted_update", "vote_mismatch",
    "vote_not_evaluated", "wrong_global_model", "wrong_height", "wrong_kind", "wrong_outcome",
    "wrong_prev", "wrong_rewards", "wrong_role", "wrong_round", "wrong_run",
)  # fmt: skip


class Drop(Exception):
    """A received message is dropped; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Envelope:
    body: dict
    sig: str
    id: str  # sha256 of canonical(body)
    # the bytes the signature covers, kept by ``sign`` and ``from_json`` (which computed them
    # for the id) so that checking the signature does not encode the body again; an envelope
    # built otherwise (a forgery in a test) has none and they are computed from its body
    signed: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str:
        return self.body["kind"]

    @property
    def sender(self) -> str:
        return self.body["sender"]

    @property
    def round(self) -> int:
        return self.body["round"]

    def to_json(self) -> dict:
        return {"body": self.body, "sig": self.sig}

    def payload(self) -> bytes:
        # (its body went through ``sign`` or ``parse``: the fast encoder writes the same bytes)
        return canonical_bytes_checked(self.to_json())


#: The fields of a block that are its content, signed through their digest (see ``signed_view``).
BLOCK_CONTENT = ("wtxs", "vtxs", "evidence")


def signed_view(body: dict, encode=canonical_bytes) -> dict:
    """What a signature covers and an id hashes: the body itself, except for a block, whose
    content (its transactions and evidence) is replaced by ``content``, the SHA-256 of that
    content's canonical bytes. A block and its header (the block with ``content`` instead of
    the content) therefore have one id and one signature, so two headers are enough evidence
    of a miner's equivocation however large its blocks are.
    """
    if body.get("kind") != "block" or "content" in body:
        return body
    content = {k: body.get(k) for k in BLOCK_CONTENT}
    view = {k: v for k, v in body.items() if k not in BLOCK_CONTENT}
    view["content"] = sha256_hex(encode(content))
    return view


def header(env: "Envelope") -> "Envelope":
    """A block's header: the signed view, with the block's signature and id."""
    return Envelope(body=signed_view(env.body), sig=env.sig, id=env.id, signed=env.signed)


def sign(key: KeyPair, body: dict) -> Envelope:
    data = canonical_bytes(signed_view(body))
    return Envelope(body=body, sig=key.sign(data), id=sha256_hex(data), signed=data)


def _parse_payload(payload: bytes, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A received payload's JSON value: Drop("too_large") or Drop("malformed") otherwise."""
    if len(payload) > max_bytes:
        raise Drop("too_large", f"{len(payload)} bytes")
    try:
        return parse(payload)
    except CanonicalError as exc:
        raise Drop("malformed", str(exc)) from None


def decode(payload: bytes, max_bytes: int = MAX_JSON_BYTES) -> Envelope:
    """Parse an envelope and check its shape (not its signature)."""
    obj = _parse_payload(payload, max_bytes)
    if isinstance(obj, dict) and "refs" in obj:  # a compact block (decode_block): its header,
        obj = {k: v for k, v in obj.items() if k != "refs"}  # whose kind shows where it belongs
    return from_json(obj)


def from_json(obj: Any) -> Envelope:
    if not isinstance(obj, dict) or set(obj) != {"body", "sig"}:
        raise Drop("malformed", "envelope must be {body, sig}")
    body, sig = obj["body"], obj["sig"]
    if not isinstance(body, dict) or not isinstance(sig, str):
        raise Drop("malformed", "bad body or sig")
    for name, typ in (("run", str), ("kind", str), ("sender", str), ("round", int)):
        if not isinstance(body.get(name), typ) or isinstance(body.get(name), bool):
            raise Drop("malformed", f"body.{name} missing or not {typ.__name__}")
    if body["round"] < 0:
        raise Drop("malformed", "negative round")
    if body["kind"] == "block" and "content" in body and any(k in body for k in BLOCK_CONTENT):
        raise Drop("malformed", "a block header with content")
    try:
        data = _signed_bytes(body)
    except CanonicalError as exc:
        raise Drop("malformed", str(exc)) from None
    return Envelope(body=body, sig=sig, id=sha256_hex(data), signed=data)


def _signed_bytes(body: dict) -> bytes:
    """What the signature of a received body covers (``parse`` has checked every value, so
    the fast encoder writes the canonical bytes)."""
    return canonical_bytes_checked(signed_view(body, canonical_bytes_checked))


def check_signature(env: Envelope, public_hex: str) -> None:
    signed = env.signed if env.signed is not None else _signed_bytes(env.body)
    if not verify(public_hex, signed, env.sig):
        raise Drop("bad_signature", f"{env.kind} from {env.sender}")


# ---- compact blocks --------------------------------------------------------------------
#
# A candidate block embeds every transaction of its round, and every device already received
# those transactions when they were published: at 100 devices a candidate is 480 KB, of which
# 476 KB are transactions, and with M miners every device received M candidates a round. On
# the wire a miner sends its block *compact*: the header (``signed_view``, which carries the
# signature and the digest of the content) and the ids of its transactions, in order:
#
#     {"body": <header>, "sig": <hex>, "refs": {"wtxs": [id, ...], "vtxs": [id, ...],
#                                               "evidence": [<evidence items, in full>]}}
#
# A receiver rebuilds the block from the transactions it holds and checks that the rebuilt
# content has the header's digest, so the block it gets is the one the miner signed, byte for
# byte. One that lacks a transaction asks the miner for the whole block (``block_ids`` in a
# sync request). A full block is still accepted on the block topic.

MAX_REFS = 4096  # transaction ids in one compact block (a block is at most MAX_JSON_BYTES)


def compact_payload(env: Envelope) -> bytes:
    """The wire form of a full block ``env`` (see above)."""
    body = env.body
    refs = {
        "wtxs": [from_json(w).id for w in body["wtxs"]],
        "vtxs": [from_json(v).id for v in body["vtxs"]],
        "evidence": body["evidence"],
    }
    return canonical_bytes({"body": signed_view(body), "sig": env.sig, "refs": refs})


def decode_block(payload: bytes, lookup) -> tuple[Envelope, list[str]]:
    """A block from the wire, full or compact; ``lookup(tx_id)`` gives a transaction this
    device holds, or None. Returns ``(block, [])``, or ``(header, missing tx ids)`` when the
    compact form names transactions the device does not hold. Raises Drop if malformed or if
    the rebuilt content does not have the header's digest (``bad_content``)."""
    obj = _parse_payload(payload)
    if not (isinstance(obj, dict) and "refs" in obj):
        return from_json(obj), []
    refs = obj.pop("refs")
    hdr = from_json(obj)
    if hdr.kind != "block" or "content" not in hdr.body:
        raise Drop("malformed", "a compact block's body is not a block header")
    if not (isinstance(refs, dict) and set(refs) == {"wtxs", "vtxs", "evidence"}):
        raise Drop("malformed", "compact block refs")
    ids = [refs["wtxs"], refs["vtxs"]]
    if not all(isinstance(x, list) and len(x) <= MAX_REFS and all(valid_hash(i) for i in x) for x in ids):
        raise Drop("malformed", "compact block refs")
    found = {i: lookup(i) for i in ids[0] + ids[1]}
    missing = sorted(i for i, e in found.items() if e is None)
    if missing:
        return hdr, missing
    wtxs, vtxs = [found[i] for i in ids[0]], [found[i] for i in ids[1]]
    try:
        digest = sha256_hex(_content_bytes(wtxs, vtxs, refs["evidence"]))
    except CanonicalError as exc:
        raise Drop("malformed", str(exc)) from None
    if digest != hdr.body["content"]:
        raise Drop("bad_content", f"block {hdr.id[:12]} from {hdr.sender}: rebuilt content differs")
    body = {k: v for k, v in hdr.body.items() if k != "content"}
    body.update(wtxs=[e.to_json() for e in wtxs], vtxs=[e.to_json() for e in vtxs], evidence=refs["evidence"])
    return Envelope(body=body, sig=hdr.sig, id=hdr.id, signed=hdr.signed), []


def _content_bytes(wtxs: list[Envelope], vtxs: list[Envelope], evidence: Any) -> bytes:
    """The canonical bytes of a block's content ``{"evidence", "vtxs", "wtxs"}`` (keys in
    RFC 8785 order), put together from the bytes each tx's signature covers, which it keeps:
    a 200-device block is 800 KB of JSON that every device would otherwise encode again for
    each of the round's candidates."""

    def tx(e: Envelope) -> bytes:
        body = e.signed if e.signed is not None else canonical_bytes(e.body)
        return b'{"body":' + body + b',"sig":' + canonical_bytes_checked(e.sig) + b"}"

    return b"".join([
        b'{"evidence":', canonical_bytes_checked(evidence),
        b',"vtxs":[', b",".join(map(tx, vtxs)), b'],"wtxs":[', b",".join(map(tx, wtxs)), b"]}",
    ])  # fmt: skip


# ---- body fields ----------------------------------------------------------------------
#
# A field check is a type (``int`` never admits a bool) or a predicate. Receivers describe
# the fields they use in a table and call ``require_fields`` before touching the body.


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_id(v: Any) -> bool:
    return isinstance(v, str) and valid_id(v)


def int_in(lo: int, hi: int):
    return lambda v: is_int(v) and lo <= v <= hi


def one_of(*choices: Any):
    return lambda v: isinstance(v, str) and v in choices


def list_of(check):
    return lambda v: isinstance(v, list) and all(field_ok(check, x) for x in v)


def dict_of(check):
    """An object whose every value passes ``check`` (JSON keys are always strings)."""
    return lambda v: isinstance(v, dict) and all(field_ok(check, x) for x in v.values())


def is_envelope(v: Any) -> bool:
    """A signed message embedded in another one (a block's transactions)."""
    try:
        from_json(v)
    except Drop:
        return False
    return True


def field_ok(check, value: Any) -> bool:
    if check is int:
        return is_int(value)
    if isinstance(check, type):
        return isinstance(value, check)
    return bool(check(value))


def require_fields(body: dict, required: dict, optional: dict | None = None) -> None:
    """Check ``body``'s fields against the tables; raises Drop("malformed", kind.field)."""
    for name, check in required.items():
        if name not in body or not field_ok(check, body[name]):
            raise Drop("malformed", f"{body.get('kind')}.{name}")
    for name, check in (optional or {}).items():
        if name in body and not field_ok(check, body[name]):
            raise Drop("malformed", f"{body.get('kind')}.{name}")


# ---- topics -------------------------------------------------------------------------


def topic(run: str, kind: str, device: str | None = None, extra: str | None = None) -> str:
    parts = [PREFIX, run, kind]
    if device is not None:
        parts.append(device)
    if extra is not None:
        parts.append(extra)
    return "/".join(parts)


def device_topic(device: str, kind: str) -> str:
    return f"{PREFIX}/devices/{device}/{kind}"


@dataclass(frozen=True)
class Topic:
    run: str | None  # None for bfl/v1/devices/...
    kind: str
    device: str | None
    extra: str | None = None


def parse_topic(name: str) -> Topic:
    parts = name.split("/")
    if len(parts) < 3 or "/".join(parts[:2]) != PREFIX:
        raise Drop("bad_topic", name)
    if parts[2] == "devices":
        if len(parts) != 5 or not valid_id(parts[3]):
            raise Drop("bad_topic", name)
        return Topic(None, parts[4], parts[3])
    run, kind = parts[2], parts[3] if len(parts) > 3 else ""
    if kind == "genesis" and len(parts) == 4:
        return Topic(run, kind, None)
    if kind in RUN_KINDS + ("cmd",) and len(parts) == 5 and valid_id(parts[4]):
        return Topic(run, kind, parts[4])
    if kind == "blob" and len(parts) == 6 and valid_id(parts[4]) and valid_hash(parts[5]):
        return Topic(run, kind, parts[4], parts[5])
    if kind == "chain" and len(parts) == 6 and valid_id(parts[4]) and valid_id(parts[5]):
        return Topic(run, kind, parts[4], parts[5])  # an answer to one device: bfl/v1/<run>/chain/<from>/<to>
    raise Drop("bad_topic", name)
