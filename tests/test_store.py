"""Tests of edge_agent.store: the blob retention a device applies with --keep-rounds."""

from __future__ import annotations

import pytest

from edge_agent.ml.blobs import BlobStore
from edge_agent.store import BlobRetention, block_blobs


def H(name: str) -> str:
    """A readable fake hash: 'u1a' -> 64 hex digits (the retention never looks inside)."""
    return name.encode().hex().ljust(64, "0")


def block(updates: list[str], global_model: str) -> dict:
    return {"wtxs": [{"body": {"model": H(u)}} for u in updates], "global_model": H(global_model)}


# rounds 1..4; in round 3 a lazy worker resubmits G2, and round 4 accepts nothing (G4 = G3)
CHAIN = [
    block(["u1a", "u1b"], "g1"),
    block(["u2a", "u2b"], "g2"),
    block(["u3a", "g2"], "g3"),
    block(["u4a"], "g3"),
]


def test_block_names_every_update_and_the_global_model():
    assert block_blobs(CHAIN[2]) == {H("u3a"), H("g2"), H("g3")}


def test_keep_zero_deletes_nothing():
    r = BlobRetention(0, H("g0"), [])
    assert [r.committed(b) for b in CHAIN] == [set()] * 4


def test_keep_one_deletes_what_only_older_blocks_name():
    r = BlobRetention(1, H("g0"), [])
    deleted = [r.committed(b) for b in CHAIN]
    assert deleted[0] == {H("g0")}
    assert deleted[1] == {H("u1a"), H("u1b"), H("g1")}
    # G2 is also the lazy update of round 3: kept while block 3 names it
    assert deleted[2] == {H("u2a"), H("u2b")}
    # G3 is still the global model after block 4
    assert deleted[3] == {H("u3a"), H("g2")}
    survivors = set().union(*(block_blobs(b) for b in CHAIN)) | {H("g0")}
    survivors -= set().union(*deleted)
    assert survivors == block_blobs(CHAIN[3])


def test_keep_two_lags_one_more_block_and_restart_resumes_the_window():
    r = BlobRetention(2, H("g0"), [])
    assert r.committed(CHAIN[0]) == set()
    assert r.committed(CHAIN[1]) == {H("g0")}
    # a restart after block 2: the window is rebuilt from the chain on disk
    again = BlobRetention(2, H("g0"), CHAIN[:2])
    assert again.committed(CHAIN[2]) == r.committed(CHAIN[2]) == {H("u1a"), H("u1b"), H("g1")}


def test_negative_keep_is_refused():
    with pytest.raises(ValueError):
        BlobRetention(-1, H("g0"), [])


def test_blob_store_delete(tmp_path):
    store = BlobStore(tmp_path)
    h = store.put(b"model bytes")
    assert store.delete(h) and not store.has(h)
    assert store.delete(h) is False
