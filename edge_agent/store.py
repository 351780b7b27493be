"""On-disk chain of one agent: the genesis and an fsync'd append-only block log.

``<workdir>/<run>/genesis.json`` holds the signed genesis, ``chain.jsonl`` one canonical
block envelope per line, appended and fsync'd before the block is acted on. A torn last line
(a crash mid-write) is ignored on load; every block is re-validated by replaying it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path

from .protocol.canonical import CanonicalError, parse
from .protocol.messages import Drop, Envelope, from_json

log = logging.getLogger("bfl.store")


class ChainStore:
    def __init__(self, root: str | Path, run: str):
        self.dir = Path(root) / run
        self.dir.mkdir(parents=True, exist_ok=True)
        self.genesis_path = self.dir / "genesis.json"
        self.chain_path = self.dir / "chain.jsonl"
        self.own_path = self.dir / "signed.jsonl"

    def save_genesis(self, env: Envelope) -> None:
        tmp = self.genesis_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(env.payload())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.genesis_path)

    def load_genesis(self) -> Envelope | None:
        if not self.genesis_path.exists():
            return None
        return from_json(parse(self.genesis_path.read_bytes()))

    def append(self, block: Envelope) -> None:
        _append_line(self.chain_path, block.payload())

    def load_blocks(self) -> list[Envelope]:
        if not self.chain_path.exists():
            return []
        blocks = []
        data = self.chain_path.read_bytes()
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if not line:
                continue
            try:
                blocks.append(from_json(parse(line)))
            except (CanonicalError, Drop) as exc:
                if i >= len(lines) - 2:  # torn final write
                    log.warning("%s: ignoring a torn last line (%s)", self.chain_path, exc)
                    self.rewrite(blocks)
                    break
                raise
        return blocks

    def save_signed(self, payload: bytes) -> None:
        """Record a transaction or block this device signed, before it is published: after a
        restart the device re-publishes it rather than signing a second, different one for
        the same slot, which peers would take for equivocation and slash."""
        _append_line(self.own_path, payload)

    def load_signed(self) -> list[Envelope]:
        if not self.own_path.exists():
            return []
        out = []
        for line in self.own_path.read_bytes().split(b"\n"):
            try:
                out.append(from_json(parse(line)))
            except (CanonicalError, Drop):
                continue  # a torn last write: that message was never published
        return out

    def rewrite(self, blocks: list[Envelope]) -> None:
        """Replace the log with ``blocks`` (after a torn write or an invalid block)."""
        tmp = self.chain_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for b in blocks:
                f.write(b.payload() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.chain_path)


def _append_line(path: Path, payload: bytes) -> None:
    """Append one line and fsync it before returning (a crash leaves at most a torn last line)."""
    with open(path, "ab") as f:
        f.write(payload + b"\n")
        f.flush()
        os.fsync(f.fileno())


def block_blobs(body: dict) -> set[str]:
    """The blob hashes a block names: every worker tx's model (accepted or not) and G_j."""
    return {raw["body"]["model"] for raw in body["wtxs"]} | {body["global_model"]}


class BlobRetention:
    """Which model blobs a device may delete as its chain grows (``bfl-agent run --keep-rounds K``).

    Every device stores each update and global model it receives: with the paper's CNN
    (6.6 MB a blob) and 12 workers, about 86 MB a round, which fills a Raspberry Pi's SD card
    in a long run. With ``keep`` = K > 0, once block h is appended the blobs named by block
    h-K and by no block in h-K+1..h are deleted; with K = 0 nothing is. Only blobs a block
    names are ever deleted, so an update that is still in flight for the next round, or
    blobs of blocks being caught up on, are safe. The price: a peer that falls more than K
    rounds behind cannot fetch the older blobs from this device (it needs another that keeps
    them, e.g. the operator's consolidated store).
    """

    def __init__(self, keep: int, init_model: str, blocks: list[dict]):
        if keep < 0:
            raise ValueError("keep must be >= 0")
        self.keep = keep
        # the blobs each of the last K+1 blocks names, oldest first; the genesis names G_0
        self.window: deque[set[str]] = deque(
            ([{init_model}] + [block_blobs(b) for b in blocks])[-(keep + 1) :], maxlen=keep + 1
        )

    def committed(self, body: dict) -> set[str]:
        """Record the block just appended; return the hashes that may now be deleted."""
        self.window.append(block_blobs(body))
        if self.keep == 0 or len(self.window) <= self.keep:
            return set()
        leaving, *kept = self.window
        return leaving - set().union(*kept)
