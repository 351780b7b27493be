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


def _no_floats(_: str) -> Any:
    raise CanonicalError("floats are not allowed in signed bodies")


def parse(data: bytes) -> Any:
    """Parse JSON bytes, refusing floats, NaN and duplicate object keys."""

    def pairs(items: list[tuple[str, Any]]) -> dict:
        obj: dict = {}
        for k, v in items:
            if k in obj:
                raise CanonicalError(f"duplicate key {k!r}")
            obj[k] = v
        return obj

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CanonicalError("payload is not UTF-8") from exc
    try:
        return json.loads(
            text,
            parse_float=_no_floats,
            parse_constant=_no_floats,
            object_pairs_hook=pairs,
        )
    except json.JSONDecodeError as exc:
        raise CanonicalError(f"malformed JSON: {exc.msg}") from exc
