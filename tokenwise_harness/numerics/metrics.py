"""Tokenwise error metrics, accumulated chunk by chunk (seed §2.2).

For an error E = Y~ - Y and reference Y, both [n_tokens, out]:
  sse   = sum ||E_t||^2          denom = sum ||Y_t||^2          nmse = sse / denom
  token_l2_t = ||E_t||           token_rel_l2_t = ||E_t|| / ||Y_t||
  token_l2_mean/max, token_rel_l2_mean/max over tokens;  sqnr_db = 10 log10(denom / sse)
Per-token norms are computed in float32 on the device (one pass over E) and kept; the sums
and maxima over all tokens are taken once, in float64, so the result does not depend on the
chunking at all.
A token whose ||Y_t|| is 0 has relative error 0 when ||E_t|| is 0 and +inf otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it computes: the names below stay importable without it
    import torch

# Every metric a projection x config gets, in the order reports, baselines and tables list them.
METRIC_KEYS = ("nmse", "sqnr_db", "token_l2_mean", "token_l2_max", "token_rel_l2_mean",
               "token_rel_l2_max", "sse", "denom", "n_tokens")

# Every reported metric except sqnr_db (+inf for an exact result, derived from nmse) and the
# n_tokens count must be a finite number; a NaN or Inf anywhere fails the case (the CLI: an
# error). None is how reports and baselines write a non-finite value.
FINITE_METRICS = ("nmse", "token_l2_mean", "token_l2_max", "token_rel_l2_mean", "token_rel_l2_max", "sse", "denom")
NONFINITE_WHY = "NaN/Inf in the quantized weight, the activations or the error"


def nonfinite_metrics(metrics: Mapping[str, object]) -> dict[str, str]:
    """{metric: value as shown} of the FINITE_METRICS in `metrics` that are NaN, +-inf or null."""
    bad = {}
    for metric in FINITE_METRICS:
        if metric not in metrics:
            continue
        value = metrics[metric]
        if value is None:
            bad[metric] = "null"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad[metric] = repr(value) if not isinstance(value, float) else str(value)
    return bad


class TokenwiseAccumulator:
    """Per-token norms for one (projection, config), reduced once, in float64, at result().

    Each chunk leaves one float32 norm per token on the error's device (4 bytes a token: 66 KB
    for 16,640 tokens) and nothing else: a grid scores every config of every weight on every
    chunk, and a dozen small reductions per chunk made the kernel launches, not the GEMMs, most
    of the marginal cost of a config. The result does not depend on the chunking at all.
    """

    def __init__(self) -> None:
        self.n_tokens = 0
        self._e_l2: list = []  # per chunk: [n] float32 ||E_t|| (its scale folded in)
        self._y_sq: list = []  # per chunk: [n] float32 ||Y_t||^2 (shared by a weight's configs)
        self._totals_memo = None

    def update(self, err: torch.Tensor, y_sq: torch.Tensor, scale: float = 1.0) -> None:
        """err: [n, out] float32 error rows, times `scale` (the true error is err * scale);
        y_sq: [n] float32 squared norms of the reference rows."""
        import torch

        e_l2 = torch.linalg.vector_norm(err, dim=1)  # one pass over E, no E*E temporary
        if scale != 1.0:
            e_l2.mul_(abs(scale))
        self._e_l2.append(e_l2)
        self._y_sq.append(y_sq)
        self.n_tokens += err.shape[0]
        self._totals_memo = None

    def _totals(self) -> tuple[float, float, float, float, float, float]:
        if self._totals_memo is None:
            self._totals_memo = self._reduce()
        return self._totals_memo

    def _reduce(self) -> tuple[float, float, float, float, float, float]:
        import torch

        if not self.n_tokens:
            return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        e = torch.cat(self._e_l2).double()
        y_sq = torch.cat([y.to(e.device) for y in self._y_sq]).double()
        y_l2 = y_sq.sqrt()
        rel = torch.where(y_l2 > 0, e / torch.where(y_l2 > 0, y_l2, 1.0), torch.where(e > 0, torch.inf, 0.0))
        sse, denom, l2_sum, rel_sum, l2_max, rel_max = torch.stack(
            [(e * e).sum(), y_sq.sum(), e.sum(), rel.sum(), e.max(), rel.max()]).tolist()
        return sse, denom, l2_sum, l2_max, rel_sum, rel_max

    @property
    def sse(self) -> float:
        return self._totals()[0]

    @property
    def denom(self) -> float:
        return self._totals()[1]

    def result(self) -> dict[str, float]:
        n = max(self.n_tokens, 1)
        sse, denom, l2_sum, l2_max, rel_sum, rel_max = self._totals()
        nmse = sse / denom if denom > 0 else (0.0 if sse == 0 else math.inf)
        return {
            "nmse": nmse,
            "sqnr_db": sqnr_db(nmse),
            "token_l2_mean": l2_sum / n,
            "token_l2_max": l2_max,
            "token_rel_l2_mean": rel_sum / n,
            "token_rel_l2_max": rel_max,
            "sse": sse,
            "denom": denom,
            "n_tokens": self.n_tokens,
        }


def sqnr_db(nmse: float) -> float:
    """Signal-to-quantization-noise ratio in dB, -10 log10(nmse), the one definition everywhere:
    +inf for an exact result (nmse 0), -inf for nmse +inf, NaN for a NaN or negative nmse."""
    if math.isnan(nmse) or nmse < 0:
        return math.nan
    if nmse == 0:
        return math.inf
    return -math.inf if math.isinf(nmse) else -10.0 * math.log10(nmse)


class GramAccumulator:
    """H = XᵀX and max_t |X_tj| of a stream of X chunks [n, in], in float64 on `device`."""

    def __init__(self, in_dim: int, device: str | torch.device = "cpu") -> None:
        import torch

        self.gram = torch.zeros(in_dim, in_dim, dtype=torch.float64, device=device)
        self.amax = torch.zeros(in_dim, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def update(self, x: torch.Tensor) -> None:
        import torch

        x = x.to(device=self.gram.device, dtype=torch.float64)
        self.gram.addmm_(x.T, x)
        if x.shape[0]:
            self.amax = torch.maximum(self.amax, x.abs().amax(dim=0))
        self.n_tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        # XᵀX is symmetric in exact arithmetic; make it so bit for bit.
        return (self.gram + self.gram.T) * 0.5


def scale_gram(gram: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """diag(1/s) H diag(1/s): the Gram of X / s, from the Gram of X."""
    import torch

    inv = 1.0 / smooth.to(device=gram.device, dtype=torch.float64)
    return gram * inv[:, None] * inv[None, :]


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) = ||X ΔWᵀ||²_F in float64, for ΔW [out, in] and H = XᵀX [in, in]."""
    import torch

    d = delta.to(device=gram.device, dtype=torch.float64)
    return max(0.0, float(((d @ gram) * d).sum()))
