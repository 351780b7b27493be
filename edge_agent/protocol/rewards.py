"""The PoS rewards of the paper, Section 5.3.2, Eq. (1)-(3). ``r`` is the unit reward.

Eq. (1) worker:    r_j^w = le_j^w * |train_w| * r   if N+(L_j^w) >= N-(L_j^w), else 0
Eq. (2) validator: r_j^v = |{tx_j^w}| * r + |{vr^v(L_j^w)}| * r
                   (worker transactions whose signature it verified, plus votes it cast)
Eq. (3) miner:     r_j^m = |{tx_j^v}| * r
                   (validator transactions whose signature it verified)
"""

from __future__ import annotations


def worker_reward(local_epochs: int, n_train: int, unit: int, accepted: bool) -> int:
    """Eq. (1)."""
    return local_epochs * n_train * unit if accepted else 0


def validator_reward(n_verified_wtx: int, n_votes: int, unit: int) -> int:
    """Eq. (2)."""
    return n_verified_wtx * unit + n_votes * unit


def miner_reward(n_verified_vtx: int, unit: int) -> int:
    """Eq. (3)."""
    return n_verified_vtx * unit


def accepted(n_pos: int, n_neg: int) -> bool:
    """The block's decision on one update: N+ >= N-, with at least one vote cast.

    The paper's rule alone would accept an update nobody voted on (0 >= 0); a worker could
    then slip past validation by publishing late. We require one vote.
    """
    return n_pos + n_neg > 0 and n_pos >= n_neg
