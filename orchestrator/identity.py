"""What makes a run repeatable: its id and its keys follow from its settings and ``--seed``.

The run id is a hash of everything that shapes the chain -- the genesis settings, the attacks
and the seed -- and not of where the output goes or how the host runs the agents. The keys
of the local devices and of the operator are derived from the run id and a secret kept on
this host (HMAC-SHA256, RFC 2104, as the Ed25519 seed): the same command on the same machine
gives the same genesis, hence the same roles, training seeds, votes and blocks, while nobody
can compute the keys from the command line alone. Everything else in a block is a function
of the genesis and the messages before it (no wall-clock time is signed).

The secret is created once (32 random bytes, owner-only) in ``$BFL_HOME/host-secret``
(default ``$XDG_DATA_HOME/bfl``, i.e. ``~/.local/share/bfl``). Deleting it changes every
derived key, so later runs no longer repeat earlier ones.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import asdict
from pathlib import Path

from edge_agent.protocol.crypto import KeyPair

__all__ = ["SHAPING_FIELDS", "derived_key", "host_secret", "run_id_for", "secret_path"]

#: the RunConfig fields a run id depends on: they set the genesis, the attacks and the seed.
#: Output folders, broker, threads, training slots, metrics and timeouts do not change a chain.
SHAPING_FIELDS = (
    "protocol", "devices", "roles", "malicious", "malicious_ids", "attacks", "attack", "rounds", "dataset",
    "model", "partition", "alpha", "samples_per_device", "test_per_device", "local_epochs", "batch_size", "lr",
    "vh", "vote_ref", "loss_guard", "aggregator", "krum_f", "knockout", "unit_reward", "deadlines_s", "seed",
)  # fmt: skip


def secret_path() -> Path:
    home = os.environ.get("BFL_HOME")
    if home:
        return Path(home) / "host-secret"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "bfl" / "host-secret"


def host_secret() -> bytes:
    """This host's secret, created on first use (concurrent first uses agree on one)."""
    path = secret_path()
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    try:
        os.link(tmp, path)  # fails if another process created it first: then use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != 32:
        raise ValueError(f"{path}: not a host secret (64 hex characters); delete it to make a new one")
    return secret


def run_id_for(cfg) -> str:
    """``r`` and 16 hex digits of SHA-256 over the settings that shape the run."""
    fields = asdict(cfg)
    shaping = {k: fields[k] for k in SHAPING_FIELDS}
    text = json.dumps(shaping, sort_keys=True, separators=(",", ":"), default=str)
    return "r" + hashlib.sha256(text.encode()).hexdigest()[:16]


def derived_key(run_id: str, name: str, secret: bytes | None = None) -> KeyPair:
    """The Ed25519 key of ``name`` (a device id, or ``operator``) in run ``run_id``."""
    secret = host_secret() if secret is None else secret
    seed = hmac.new(secret, f"bfl-key-v1/{run_id}/{name}".encode(), hashlib.sha256).hexdigest()
    return KeyPair.from_seed_hex(seed)
