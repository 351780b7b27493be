"""Canonical JSON (RFC 8785, JSON Canonicalization Scheme) for signed bodies.

Signed bodies in this project hold only strings, integers, booleans, null, lists and
objects: floats are refused outright (accuracies travel in basis points, learning rates in
millionths, stakes as integers), so the number-formatting part of RFC 8785 reduces to the
decimal form of an integer inside the I-JSON safe range (|n| <= 2**53 - 1).

Object members are sorted by the UTF-16 code units of their names (RFC 8785 section 3.2.3);
strings are written as ECMAScript's JSON.stringify writes them: only '"', '\\\\' and control
characters are escaped, everything else is literal UTF-8.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

MAX_SAFE_INT = 2**53 - 1

_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


class CanonicalError(ValueError):
    """The value cannot be put in a signed body (a float, a huge int, a bad key...)."""


def _utf16_key(name: str) -> bytes:
    return name.encode("utf-16-be", "surrogatepass")


def _string(s: str) -> str:
    out = ['"']
    for ch in s:
        esc = _SHORT_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch < " ":
            out.append("\\u%04x" % ord(ch))
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            raise CanonicalError("lone surrogate in string")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise CanonicalError(f"integer {value} outside the I-JSON safe range")
        out.append(str(int(value)))
    elif isinstance(value, float):
        raise CanonicalError("floats are not allowed in signed bodies; use integers")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise CanonicalError("object keys must be strings")
        out.append("{")
        for i, key in enumerate(sorted(value, key=_utf16_key)):
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _encode(value[key], out)
        out.append("}")
    else:
        raise CanonicalError(f"type {type(value).__name__} cannot be canonicalized")


def canonical_bytes(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of ``value``."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out).encode("utf-8")


def canonical_bytes_checked(value: Any) -> bytes:
    """``canonical_bytes`` of a value already known to hold only what a signed body may hold
    (what :func:`parse` returns, or a body :func:`canonical_bytes` accepted before): the same
    bytes, written by ``json.dumps`` in C instead of the checking encoder above -- about
    20 x faster on a 500 KB candidate block, which every device hashes and verifies for
    every miner. The two agree on such values (same escapes, integers only) except in the
    order of object members whose names hold a character outside the Basic Multilingual
    Plane (code points here, UTF-16 code units in RFC 8785): text holding one is encoded
    again by the checking encoder. ``tests/test_canonical.py`` checks the equality."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
    if not text.isascii() and max(text) > "\uffff":
        return canonical_bytes(value)
    return text.encode("utf-8")


#: Deepest nesting of lists and objects ``parse`` accepts. The deepest message (a chain
#: answer: blocks holding transactions holding votes) nests about 10 levels; json.loads and
#: the encoder above recurse, so a deeper payload is refused before it is parsed.
MAX_DEPTH = 32

# The longest decimal form of a safe integer: "-9007199254740991".
_MAX_INT_CHARS = len(str(-MAX_SAFE_INT))
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE = re.compile("[\ud800-\udfff]")
# Strict UTF-8 decoding refuses encoded surrogates, so one can only come from an escape.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_floats(_: str) -> Any:
    raise CanonicalError("floats are not allowed in signed bodies")


def _safe_int(text: str) -> int:
    """json.loads' integer hook: the literal is checked before ``int`` sees it, so a
    5 000-digit number costs nothing (and never meets Python's int-digit limit)."""
    if len(text) > _MAX_INT_CHARS:
        raise CanonicalError("integer outside the I-JSON safe range")
    value = int(text)
    if abs(value) > MAX_SAFE_INT:
        raise CanonicalError(f"integer {value} outside the I-JSON safe range")
    return value


def _max_depth(text: str) -> int:
    """An upper bound of the nesting json.loads would reach on ``text``, in linear time.

    Escaped backslashes, then escaped quotes are removed; the remaining quotes delimit the
    strings, so every other piece lies outside them and its brackets count. On text that
    is not JSON the count may be off, but only after the point where json.loads stops.
    """
    bare = text.replace("\\\\", "").replace('\\"', "")
    outside = _NOT_BRACKETS.sub("", "".join(bare.split('"')[::2]))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, outside)), default=0)


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates (a ``"\\ud800"`` escape): they have no UTF-8 form."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise CanonicalError("lone surrogate in string")
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())


def _pairs(items: list[tuple[str, Any]]) -> dict:
    obj: dict = {}
    for k, v in items:
        if k in obj:
            raise CanonicalError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def parse(data: bytes) -> Any:
    """Parse JSON bytes into a value ``canonical_bytes`` accepts; raises only CanonicalError.

    Refused: anything but UTF-8, floats, NaN and Infinity, integers outside the safe range,
    duplicate object keys, lone surrogates, nesting deeper than ``MAX_DEPTH``.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CanonicalError("payload is not UTF-8") from exc
    if _max_depth(text) > MAX_DEPTH:
        raise CanonicalError(f"nested deeper than {MAX_DEPTH}")
    try:
        value = json.loads(
            text,
            parse_float=_no_floats,
            parse_int=_safe_int,
            parse_constant=_no_floats,
            object_pairs_hook=_pairs,
        )
    except CanonicalError:
        raise
    except json.JSONDecodeError as exc:
        raise CanonicalError(f"malformed JSON: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:  # not expected after the checks above
        raise CanonicalError(f"malformed JSON: {type(exc).__name__}") from exc
    if _SURROGATE_ESCAPE.search(text):  # rare: canonical bytes write non-BMP characters as UTF-8
        _check_strings(value)
    return value
