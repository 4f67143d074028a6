"""Tokenwise error metrics, accumulated chunk by chunk (seed §2.2).

For an error E = Y~ - Y and reference Y, both [n_tokens, out]:
  sse   = sum ||E_t||^2          denom = sum ||Y_t||^2          nmse = sse / denom
  token_l2_t = ||E_t||           token_rel_l2_t = ||E_t|| / ||Y_t||
  token_l2_mean/max, token_rel_l2_mean/max over tokens;  sqnr_db = 10 log10(denom / sse)
Per-token squared norms are reduced in float32 on the device (one pass over E); the sums
across tokens and chunks are kept in float64, so the result does not depend on chunking
beyond float32 rounding of single rows.
A token whose ||Y_t|| is 0 has relative error 0 when ||E_t|| is 0 and +inf otherwise.
"""

from __future__ import annotations

import math

METRIC_NAMES = ("nmse", "sqnr_db", "token_l2_mean", "token_l2_max", "token_rel_l2_mean",
                "token_rel_l2_max", "sse", "denom", "n_tokens")


class TokenwiseAccumulator:
    """Running sums for one (projection, config)."""

    def __init__(self):
        self.sse = 0.0
        self.denom = 0.0
        self.n_tokens = 0
        self.l2_sum = 0.0
        self.l2_max = 0.0
        self.rel_sum = 0.0
        self.rel_max = 0.0

    def update(self, err, y_sq):
        """err: [n, out] float32 error rows; y_sq: [n] float32 squared norms of the reference rows."""
        import torch

        e_sq = (err * err).sum(dim=1)
        e_l2 = e_sq.sqrt()
        y_l2 = y_sq.sqrt()
        rel = torch.where(y_l2 > 0, e_l2 / y_l2.clamp_min(torch.finfo(torch.float32).tiny),
                          torch.where(e_l2 > 0, torch.inf, 0.0))
        stats = torch.stack([e_sq.double().sum(), y_sq.double().sum(), e_l2.double().sum(),
                             e_l2.max().double(), rel.double().sum(), rel.max().double()]).tolist()
        self.sse += stats[0]
        self.denom += stats[1]
        self.l2_sum += stats[2]
        self.l2_max = max(self.l2_max, stats[3])
        self.rel_sum += stats[4]
        self.rel_max = max(self.rel_max, stats[5])
        self.n_tokens += err.shape[0]

    def result(self) -> dict:
        n = max(self.n_tokens, 1)
        nmse = self.sse / self.denom if self.denom > 0 else (0.0 if self.sse == 0 else math.inf)
        return {
            "nmse": nmse,
            "sqnr_db": sqnr_db(nmse),
            "token_l2_mean": self.l2_sum / n,
            "token_l2_max": self.l2_max,
            "token_rel_l2_mean": self.rel_sum / n,
            "token_rel_l2_max": self.rel_max,
            "sse": self.sse,
            "denom": self.denom,
            "n_tokens": self.n_tokens,
        }


def sqnr_db(nmse: float) -> float:
    """Signal-to-quantization-noise ratio in dB: -10 log10(nmse); +inf for an exact result."""
    if nmse <= 0:
        return math.inf
    if math.isinf(nmse) or math.isnan(nmse):
        return -math.inf if math.isinf(nmse) else math.nan
    return -10.0 * math.log10(nmse)
