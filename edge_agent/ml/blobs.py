"""Model blobs: canonical safetensors bytes, SHA-256 addressing, a disk store, FedAvg.

Chain blocks and transactions carry model hashes only; the bytes live in a
content-addressed :class:`BlobStore`. Every device recomputes the global model with
:func:`fedavg` and must obtain the same bytes (hence the same hash), so both the encoding
and the averaging are deterministic across machines. numpy + safetensors only (no torch,
no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import safetensors.numpy

from .arch import check_params

__all__ = ["BlobStore", "blob_hash", "blob_path", "decode", "encode", "fedavg"]

_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def encode(params: dict[str, np.ndarray]) -> bytes:
    """Canonical safetensors bytes of float32 ``params`` (same params -> same bytes).

    Written here rather than by ``safetensors.numpy.save`` so the byte layout cannot
    change with the library version: tensors in sorted name order, contiguous
    little-endian data, compact JSON header with sorted keys and no metadata, padded
    with spaces to a multiple of 8 bytes (as the safetensors format specifies).
    """
    header: dict[str, dict] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(params):
        arr = np.asarray(params[name])
        if arr.dtype != np.float32:
            raise ValueError(f"param {name} has dtype {arr.dtype}, expected float32")
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def decode(data: bytes, arch: str, finite: bool = True) -> dict[str, np.ndarray]:
    """Parse safetensors bytes into writable float32 arrays; ValueError unless a valid ``arch``
    model (``finite=False`` lets NaN/inf through, e.g. to score a diverged model)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"model blob must be bytes, got {type(data).__name__}")
    try:
        loaded = safetensors.numpy.load(bytes(data))
    except Exception as exc:  # SafetensorError, or anything else raised on garbage
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"malformed model blob ({len(data)} bytes): {reason}") from None
    params = {k: np.array(v, dtype=v.dtype, copy=True, order="C") for k, v in loaded.items()}
    check_params(arch, params, finite=finite)
    return params


def blob_hash(data: bytes) -> str:
    """Lowercase hex SHA-256 of a blob: its address."""
    return hashlib.sha256(data).hexdigest()


def _check_hash(h: str) -> str:
    if not isinstance(h, str) or not _HASH_RE.match(h):
        raise ValueError(f"not a lowercase hex SHA-256: {h!r}")
    return h


def blob_path(root: str | Path, h: str) -> Path:
    """Where a :class:`BlobStore` rooted at ``root`` keeps blob ``h`` (no directory is created)."""
    return Path(root) / _check_hash(h)[:2] / f"{h}.safetensors"


class BlobStore:
    """Content-addressed blob files ``root/<hh>/<hash>.safetensors``; thread-safe, crash-safe.

    Writes go to a temporary file in the target directory which is fsync'd and then
    atomically renamed, so a crash never leaves a partial blob under its final name.
    Reads verify the content hash and treat a mismatching file as absent.
    """

    def __init__(self, root: str | Path, shared: BlobStore | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # co-located agents of one `bfl run` (compute.SharedCache): a blob is written once
        # per host and hard-linked into each agent's store
        self.shared = shared

    def path(self, h: str) -> Path:
        return blob_path(self.root, h)

    def has(self, h: str) -> bool:
        return self.path(h).is_file()

    def put(self, data: bytes, h: str | None = None) -> str:
        """Store ``data`` and return its hash (idempotent). ``h``: its hash, when the caller
        has just checked it (the protocol core checks every blob it accepts); a CNN blob
        costs about 4 ms of SHA-256, and every agent stores every update."""
        data = bytes(data)
        h = h or blob_hash(data)
        final = self.path(h)
        with self._lock:
            if final.is_file():
                return h
            final.parent.mkdir(parents=True, exist_ok=True)
            if self.shared is not None:
                self.shared.put(data, h)
                try:
                    os.link(self.shared.path(h), final)
                    return h
                except FileExistsError:
                    return h
                except OSError:  # another file system: write our own copy
                    pass
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=final.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            _fsync_dir(final.parent)
        return h

    def get(self, h: str, verify: bool = True) -> bytes | None:
        """The blob with hash ``h``, or None if absent (or corrupt on disk). ``verify=False``
        only where the bytes are checked right after (the core's rule for host blobs)."""
        p = self.path(h)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        if verify and blob_hash(data) != h:
            return None
        return data

    def delete(self, h: str) -> bool:
        """Remove the blob with hash ``h``; False if it was not there."""
        try:
            self.path(h).unlink()
        except FileNotFoundError:
            return False
        return True

    def put_params(self, params: dict[str, np.ndarray]) -> str:
        return self.put(encode(params))

    def get_params(self, h: str, arch: str) -> dict[str, np.ndarray] | None:
        data = self.get(h)
        return None if data is None else decode(data, arch)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fedavg(updates: Iterable[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """FedAvg (McMahan et al. 2017): the average of models weighted by their sample counts.

    Deterministic across machines: element-wise accumulation in float64 in the given
    order (callers sort the updates canonically), one division, cast to float32. ``updates``
    may be a generator: one update at a time is held besides the sum.
    """
    acc: dict[str, np.ndarray] | None = None
    names: list[str] = []
    total = 0
    for i, (params, n) in enumerate(updates):
        if acc is None:
            names = sorted(params)
            acc = {k: np.zeros(np.shape(params[k]), dtype=np.float64) for k in names}
        if isinstance(n, bool) or int(n) != n or int(n) <= 0:
            raise ValueError(f"update {i} has sample count {n!r}; expected a positive integer")
        if sorted(params) != names:
            raise ValueError(f"update {i} has parameters {sorted(params)}, expected {names}")
        w = float(int(n))
        for k in names:
            v = np.asarray(params[k])
            if v.shape != acc[k].shape:
                raise ValueError(f"update {i} param {k} has shape {v.shape}, expected {acc[k].shape}")
            acc[k] += v.astype(np.float64) * w
        total += int(n)
    if acc is None:
        raise ValueError("fedavg needs at least one update")
    return {k: (acc[k] / float(total)).astype(np.float32) for k in names}
