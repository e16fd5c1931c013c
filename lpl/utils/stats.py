"""Small statistics shared by the methods' checks and benchmarks."""

from __future__ import annotations

import torch


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties) of two CPU tensors of one length."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)
