"""Algorithm 1 of the paper: a validator's vote on one local update.

    if A^v(G_{j-1}) - A^v(L_j^w) > vh:  vote negative  else: positive

The reference accuracy is selectable (genesis ``hp.vote_ref``), because what the paper
writes and what its experiments ran differ:

- ``global``  : A^v(G_{j-1}) itself, as Algorithm 1 is written. Under label-shard non-IID
  data an honest 5-epoch local model can lose more than vh against G_{j-1}, and in round 1
  (G_0 random, ~10 %) a noise-poisoned model loses nothing, so it is not rejected.
- ``trained`` : the validator's own copy of G_{j-1} after one local epoch on its data, as in
  the VBFL reference code of the paper's case study. Needs torch on the validator.
- ``median``  : the median accuracy of all updates the validator evaluated this round; torch
  free, and the default here (see docs for the measured false rejections of each).

Accuracies are integers in basis points (1/100 of a percent); vh likewise (0.08 = 800).

Composed with Algorithm 1, an optional loss guard (genesis ``hp.loss_guard``, 0 = off):
vote negative also when the update's mean cross-entropy on the validator's test split is
more than ``loss_guard`` times the lower median of the round's updates. Measured on Fashion-MNIST
label shards (MLP, round 1): honest 2-class models score 7-25 % accuracy and 5.8-9 nats,
models with N(0, 1) noise 4-20 % accuracy and 2 200-5 700 nats. Accuracy alone cannot tell
them apart in the early rounds of non-IID training; the loss can. Set ``--vote-ref global
--loss-guard 0`` for Algorithm 1 exactly as the paper writes it.
"""

from __future__ import annotations


def vote(reference_bp: int, local_bp: int, vh_bp: int) -> bool:
    """True = positive vote. Algorithm 1, lines 2-5."""
    return not (reference_bp - local_bp > vh_bp)


def loss_guard_ok(loss_milli: int, median_loss_milli: int, factor: int) -> bool:
    """False when the update's loss exceeds ``factor`` x the round's median (0 = no guard)."""
    if factor <= 0:
        return True
    return loss_milli <= factor * max(median_loss_milli, 1)


def median_bp(values: list[int]) -> int:
    """Upper median of integer accuracies (deterministic, integer).

    The upper one, so that with an even number of updates of which half are poisoned the
    reference is still an honest update's accuracy.
    """
    if not values:
        raise ValueError("median of no values")
    s = sorted(values)
    return s[len(s) // 2]


def lower_median(values: list[int]) -> int:
    """Lower median: the loss guard's reference. Honest updates have the lower losses, so
    with half of a round's updates poisoned this is still an honest update's loss."""
    if not values:
        raise ValueError("median of no values")
    s = sorted(values)
    return s[(len(s) - 1) // 2]


def reference_bp(mode: str, global_bp: int, trained_bp: int | None, local_bps: list[int]) -> int:
    if mode == "global":
        return global_bp
    if mode == "trained":
        if trained_bp is None:
            raise ValueError("vote_ref 'trained' needs the validator-trained accuracy")
        return trained_bp
    if mode == "median":
        return median_bp(local_bps)
    raise ValueError(f"unknown vote reference {mode!r}")
