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
"""

from __future__ import annotations


def vote(reference_bp: int, local_bp: int, vh_bp: int) -> bool:
    """True = positive vote. Algorithm 1, lines 2-5."""
    return not (reference_bp - local_bp > vh_bp)


def median_bp(values: list[int]) -> int:
    """Upper median of integer accuracies (deterministic, integer).

    The upper one, so that with an even number of updates of which half are poisoned the
    reference is still an honest update's accuracy.
    """
    if not values:
        raise ValueError("median of no values")
    s = sorted(values)
    return s[len(s) // 2]


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
