"""Role assignment (paper Section 5.3.1): worker, validator, miner, rotating every round.

Every device computes the same assignment from the hash of the previous block, the devices
that are not blacklisted and the role counts of the genesis; nothing is negotiated. Each
worker is associated with one validator (the paper's "randomly associated validator").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Roles:
    workers: tuple[str, ...]
    validators: tuple[str, ...]
    miners: tuple[str, ...]
    association: dict[str, str] = field(default_factory=dict)  # worker -> validator

    def role_of(self, device: str) -> str | None:
        """The device's role; in the baselines a miner also trains (see ``is_worker``)."""
        if device in self.miners:
            return "miner"
        if device in self.workers:
            return "worker"
        if device in self.validators:
            return "validator"
        return None

    def is_worker(self, device: str) -> bool:
        return device in self.workers

    def is_miner(self, device: str) -> bool:
        return device in self.miners

    def is_validator(self, device: str) -> bool:
        return device in self.validators


def _rank(seed: bytes, device: str) -> bytes:
    return hashlib.sha256(seed + device.encode()).digest()


def role_counts(n_active: int, w: int, v: int, m: int) -> tuple[int, int, int]:
    """Shrink the worker count first when blacklisting has removed devices."""
    m = min(m, n_active)
    v = min(v, n_active - m)
    w = min(w, n_active - m - v)
    return w, v, m


def assign_roles(
    prev_hash: str,
    devices: dict[str, dict],
    blacklist: frozenset[str] | set[str],
    counts: tuple[int, int, int],
) -> Roles:
    """Deterministic role assignment for the round that builds on block ``prev_hash``.

    Devices are ordered by SHA-256(seed || id) with seed = SHA-256("roles" || prev_hash).
    Workers are the first |W| devices able to train; miners and validators follow from the
    rest in the same order. Devices beyond |W|+|V|+|M| sit the round out.
    """
    seed = hashlib.sha256(b"roles|" + prev_hash.encode()).digest()
    active = [d for d in devices if d not in blacklist]
    order = sorted(active, key=lambda d: _rank(seed, d))
    w, v, m = role_counts(len(order), *counts)
    can_train = [d for d in order if "train" in devices[d].get("caps", ("train",))]
    workers = tuple(can_train[:w])
    rest = [d for d in order if d not in workers]
    miners = tuple(rest[:m])
    validators = tuple(rest[m : m + v])
    association = {wk: validators[i % len(validators)] for i, wk in enumerate(workers)} if validators else {}
    return Roles(workers, validators, miners, association)


def assign_roles_all_train(
    prev_hash: str, devices: dict[str, dict], blacklist: frozenset[str] | set[str], n_miners: int
) -> Roles:
    """The baselines (vanilla FL, pFedMe): every device able to train is a worker, nobody
    validates, and ``n_miners`` devices (drawn in the same hash order, and also training)
    assemble the round's block in place of the central server of plain FL."""
    seed = hashlib.sha256(b"roles|" + prev_hash.encode()).digest()
    order = sorted((d for d in devices if d not in blacklist), key=lambda d: _rank(seed, d))
    workers = tuple(sorted(d for d in order if "train" in devices[d].get("caps", ("train",))))
    miners = tuple(order[: min(n_miners, len(order))])
    return Roles(workers, (), miners, {})
