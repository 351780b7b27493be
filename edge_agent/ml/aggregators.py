"""Robust aggregation rules used as comparators for PoS-BFL (numpy only, no torch).

The survey behind the testbed (Sections 2.2.2-2.2.3) contrasts PoS-BFL's vote-based
filtering of poisoned updates with Byzantine-robust aggregation at the server:

* ``"fedavg"``: sample-weighted average (McMahan et al. 2017, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data"); delegates to
  :func:`edge_agent.ml.blobs.fedavg`. Not robust: one bad update can move it arbitrarily.
* ``"median"``: coordinate-wise median and ``"trimmed_mean"``: coordinate-wise
  beta-trimmed mean (Yin, Chen, Ramchandran and Bartlett 2018, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates", ICML). Both are unweighted
  by sample counts, as in the paper.
* ``"multi_krum"``: Multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer 2017,
  "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS):
  every update is scored by the sum of squared Euclidean distances to its n - f - 2
  nearest neighbours; the m lowest-scoring updates are averaged (here weighted by their
  sample counts, via FedAvg). Requires n > 2f + 2.

``updates`` is ``list[tuple[dict[str, np.ndarray], int]]`` (parameters, sample count) as
for :func:`blobs.fedavg`. Every rule is deterministic for a given input order: float64
accumulation, float32 result, ties broken by update index. Bad input raises a one-line
ValueError. :func:`aggregate` gives every rule the uniform result
``(params, selected_indices)``.
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np

from .arch import layout_mismatch
from .blobs import fedavg

__all__ = [
    "AGGREGATORS",
    "aggregate",
    "aggregate_for_genesis",
    "coordinate_median",
    "fedavg_weighted",
    "multi_krum",
    "trimmed_mean",
]

Params = dict[str, np.ndarray]
Updates = list[tuple[Params, int]]


def _check(updates: Updates, rule: str) -> list[str]:
    """Validate ``updates``; return the sorted parameter names."""
    if not updates:
        raise ValueError(f"{rule} needs at least one update")
    first = updates[0][0]
    names = sorted(first)
    for i, (params, n) in enumerate(updates):
        if isinstance(n, bool) or int(n) != n or int(n) <= 0:
            raise ValueError(f"{rule}: update {i} has sample count {n!r}; expected a positive integer")
        mismatch = layout_mismatch(params, first)
        if mismatch:
            raise ValueError(f"{rule}: update {i} {mismatch}")
    return names


def _stack(updates: Updates, name: str) -> np.ndarray:
    return np.stack([np.asarray(p[name], dtype=np.float64) for p, _ in updates])


def fedavg_weighted(updates: Updates) -> Params:
    """Sample-weighted FedAvg (:func:`blobs.fedavg`)."""
    _check(updates, "fedavg")
    return fedavg(updates)


def coordinate_median(updates: Updates) -> Params:
    """Coordinate-wise median (Yin et al. 2018); even n averages the two middle values."""
    names = _check(updates, "median")
    return {k: np.median(_stack(updates, k), axis=0).astype(np.float32) for k in names}


def trimmed_mean(updates: Updates, trim_ratio: float = 0.1) -> Params:
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    For every coordinate the ``k = floor(trim_ratio * n)`` largest and ``k`` smallest
    values are dropped and the remaining ``n - 2k`` averaged (so with n = 5 a ratio of
    at least 0.2 is needed to trim anything). ``0 <= trim_ratio < 0.5``.
    """
    names = _check(updates, "trimmed_mean")
    trim_ratio = float(trim_ratio)
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    n = len(updates)
    k = int(np.floor(trim_ratio * n))
    out = {}
    for name in names:
        s = np.sort(_stack(updates, name), axis=0)
        out[name] = s[k : n - k].mean(axis=0).astype(np.float32)
    return out


def _flat(params: Params, names: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(params[k], dtype=np.float64).ravel() for k in names])


def krum_scores(updates: Updates, n_malicious: int) -> np.ndarray:
    """Krum score of every update: sum of squared distances to its n - f - 2 nearest others."""
    names = _check(updates, "multi_krum")
    n, f = len(updates), int(n_malicious)
    if f < 0:
        raise ValueError(f"multi_krum: n_malicious must be >= 0, got {n_malicious}")
    if n <= 2 * f + 2:
        raise ValueError(f"multi_krum needs n > 2f + 2 updates, got n={n}, f={f}")
    vecs = [_flat(p, names) for p, _ in updates]
    dist = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            d = vecs[i] - vecs[j]
            dist[i, j] = dist[j, i] = float(np.dot(d, d))
    closest = n - f - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.sort(np.delete(dist[i], i))
        scores[i] = others[:closest].sum()
    return scores


def multi_krum(updates: Updates, n_malicious: int, m: int | None = None) -> tuple[Params, list[int]]:
    """Multi-Krum (Blanchard et al. 2017): average of the ``m`` lowest-score updates.

    ``m`` defaults to ``n - f``; with ``m = 1`` this is Krum. Returns the sample-weighted
    average of the selected updates and their indices in ascending order. Updates with
    non-finite parameters get score +inf (never preferred to a finite one).
    """
    scores = krum_scores(updates, n_malicious)
    n = len(updates)
    m = n - int(n_malicious) if m is None else int(m)
    if not 1 <= m <= n:
        raise ValueError(f"multi_krum: m must be in 1..{n}, got {m}")
    scores = np.where(np.isfinite(scores), scores, np.inf)
    order = np.lexsort((np.arange(n), scores))  # by score, ties by index
    selected = sorted(int(i) for i in order[:m])
    return fedavg([updates[i] for i in selected]), selected


AGGREGATORS: dict[str, Callable[..., object]] = {
    "fedavg": fedavg_weighted,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "multi_krum": multi_krum,
}


def aggregate(name: str, updates: Updates, n_malicious: int = 0, **kw) -> tuple[Params, list[int]]:
    """Run aggregator ``name``; returns ``(params, selected_indices)``.

    ``n_malicious`` (f) is used by Multi-Krum only; rules that do not select return all
    indices. Extra keywords go to the rule (``trim_ratio``, ``m``).
    """
    try:
        rule = AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; expected one of {', '.join(AGGREGATORS)}") from None
    if name == "multi_krum":
        return multi_krum(updates, n_malicious, **kw)
    return rule(updates, **kw), list(range(len(updates)))


def aggregate_for_genesis(
    hp: dict, arch: str, updates: list[tuple[bytes, int]], warn: Callable[[str], None] | None = None
) -> Params | None:
    """G_j as every device computes it: the one definition (``Runtime.aggregate``, ``bfl verify``).

    ``updates`` are the accepted updates' blob bytes (or functions returning them, read one
    at a time) with their sample counts, in
    ``ledger.aggregation_inputs`` order. An update that does not decode to finite parameters
    of ``arch`` (e.g. a diverged baseline) is skipped -- the same rule on every device, so
    every device still computes the same G_j. The genesis' ``hp.aggregator`` picks the rule:
    FedAvg, or a robust rule that falls back to FedAvg when it does not apply (e.g. too few
    updates for Multi-Krum's f). Returns None when no usable update is left: then
    G_j = G_{j-1}. ``warn`` receives a one-line note for every skip or fallback.
    """
    from .blobs import blob_hash, decode

    def note(msg: str) -> None:
        if warn is not None:
            warn(msg)

    def decoded():
        for data, n in updates:
            raw = data() if callable(data) else data
            try:
                yield decode(raw, arch), n
            except ValueError as exc:
                note(f"FedAvg skips update {blob_hash(raw)[:12]}: {exc}")

    rule = hp.get("aggregator", "fedavg")
    if rule == "fedavg":  # streamed: one update in memory at a time
        stream = decoded()
        first = next(stream, None)
        return None if first is None else fedavg(itertools.chain([first], stream))
    usable: Updates = list(decoded())
    if not usable:
        return None
    kw = {"trim_ratio": hp.get("trim_ratio_bp", 1000) / 10000} if rule == "trimmed_mean" else {}
    try:
        g, _ = aggregate(rule, usable, n_malicious=hp.get("krum_f", 0), **kw)
    except ValueError as exc:  # not applicable: fall back, the same on every device
        note(f"{rule} not applicable ({exc}); using FedAvg")
        g = fedavg(usable)
    return g
