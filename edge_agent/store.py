"""On-disk chain of one agent: the genesis and an fsync'd append-only block log.

``<workdir>/<run>/genesis.json`` holds the signed genesis, ``chain.jsonl`` one canonical
block envelope per line, appended and fsync'd before the block is acted on. A torn last line
(a crash mid-write) is ignored on load; every block is re-validated by replaying it.
"""

from __future__ import annotations

import logging
import os
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
        with open(self.chain_path, "ab") as f:
            f.write(block.payload() + b"\n")
            f.flush()
            os.fsync(f.fileno())

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

    def rewrite(self, blocks: list[Envelope]) -> None:
        """Replace the log with ``blocks`` (after a torn write or an invalid block)."""
        tmp = self.chain_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for b in blocks:
                f.write(b.payload() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.chain_path)
