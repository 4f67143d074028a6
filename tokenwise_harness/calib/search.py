"""Calibration from the cache: SVDQuant's shipped recipe (issue 11).

Two searches, both scored on the cached inputs:

(a) the SmoothQuant exponent, searched per layer and input group (qkv, o, gate_up, down);
(b) the low-rank branch, refined iteratively against the quantized residual.

Scoring. For a projection with cached input X [N, in] and a weight perturbation ΔW [out, in],
the output error on the cache is

    ||X ΔWᵀ||²_F = tr(ΔW H ΔWᵀ),      H = XᵀX   [in, in]

H is accumulated once per input (float64, chunk by chunk over the cache; the products of
fp32/fp16/bf16 values are exact in float64), after which any number of candidate ΔW are scored
exactly, at the cost of one [out, in] x [in, in] float64 matmul each, without reading X again.
Smoothing divides X by s, so the smoothed input's Gram is H_s = diag(1/s) H diag(1/s); a
smoothed weight's error ΔW' (of W' = W·diag(s)) scores as tr(D H Dᵀ) with D = ΔW'·diag(1/s).
The score is the quantization error alone: the cached Y's own rounding (the engine's per-weight
term r = X Wᵀ + b − Y) and activation quantization (W4A4 configs) are not part of it.

(a) Smoothing search (`smooth --alpha search`). For every input group, the candidates are

    s_j = max_t |X_tj|^a / max_i |W_ij|^b       a ∈ {0.05, 0.10, …, 0.95},  b ∈ {1 − a, 0}

(max_i over the rows of every projection sharing the input, clamped like the fixed formula),
plus no smoothing (s = 1, recorded as a = b = 0): 39 candidates. Each is scored with the
low-rank branch and the quantized residual in place: for every member W, W' = W·s is
fake-quantized with the search config (`--search_rank`, default 32, one-shot exact top-r;
`--search_qspec`, default nvfp4@16), and the group's error is Σ_members tr(ΔW' H_s ΔW'ᵀ).
The lowest wins; ties keep the earlier candidate in the order (no smoothing, then a ascending
with b = 1 − a, then a ascending with b = 0), so the result is deterministic and a plain
fixed α = 0.5 (= candidate a = 0.5, b = 0.5) can only be matched or beaten.

(b) Iterated low-rank branch (`--lowrank_iters N`, config key suffix `;iters=N`):

    L₀ = SVD_r(W)                       (the engine's exact top-r: iterate 0 is the one-shot W~)
    L_k = SVD_r(W − Q(W − L_{k−1}))     W~_k = L_k + Q(W − L_k)

scored by tr(ΔW_k H ΔW_kᵀ). The best iterate is kept; the loop stops at the first iterate that
does not improve on the best by more than IMPROVE_RTOL (relative), or after N iterates (N
decompositions in all, so N = 1 is the one-shot branch). Every SVD_r is svdq.LowRank's exact
top-r (float64 Gram eigh), computed on W's device: on the GPU when the weight is there.
Rank-only (fmt=none) and quant-only (rank 0) configs have nothing to iterate and return the
one-shot W~. This is deepcompressor's QuantLowRankCalibrator with early stopping, applied per
projection (deepcompressor can also share one branch across q/k/v; we do not).
"""

from __future__ import annotations

import torch

from tokenwise_harness.allowlist import Target
from tokenwise_harness.cache import XYCache
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import SvdqConfig
from tokenwise_harness.numerics import formats
from tokenwise_harness.numerics.metrics import GramAccumulator, scale_gram
from tokenwise_harness.numerics.smoothing import ALPHA_GRID, search_group

# The search config's defaults (smooth --search_qspec / --search_rank).
SEARCH_QSPEC = "nvfp4@16"
SEARCH_RANK = 32


# ----------------------------------------------------------------------------- Gram and scoring




def input_stats(cache, target, chunk_tokens: int = 4096, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(H = XᵀX [in, in] float64, max_t |X_tj| [in] float64) of one projection's cached input.

    X is read once, in chunks of `chunk_tokens` rows; NaN/Inf is a HarnessError.
    """
    entry = cache.entry(target)
    acc = GramAccumulator(entry.in_dim, device)
    for start in range(0, cache.n_tokens, chunk_tokens):
        x = cache.rows(entry.x_key, start, min(start + chunk_tokens, cache.n_tokens))
        x = x.to(device=device, dtype=torch.float32)
        if not torch.isfinite(x).all():
            raise HarnessError(f"{cache.flag} {cache.path}: {entry.x_key} holds NaN/Inf activations; "
                               "re-capture with --save_dtype fp32")
        acc.update(x)
    return acc.result(), acc.amax


def input_gram(cache: XYCache, target: Target, chunk_tokens: int = 4096, device: str = "cpu",
               smooth: torch.Tensor | None = None) -> torch.Tensor:
    """H = XᵀX (float64) of a projection's cached input; with `smooth`, of X / s (= H_s)."""
    gram, _ = input_stats(cache, target, chunk_tokens, device)
    return gram if smooth is None else scale_gram(gram, smooth)






class GramCache:
    """The engine's per-target Gram for iterated configs: one X pass per input group.

    Siblings reading the same input (q/k/v, gate/up) are walked consecutively, so only the
    last group's H is kept. `get(target, smooth)` returns H of X (or of X / s with smooth).
    """

    def __init__(self, cache, chunk_tokens: int, device):
        self.cache = cache
        self.chunk_tokens = chunk_tokens
        self.device = device
        self._group = None
        self._gram = None

    def get(self, target, smooth: torch.Tensor | None = None) -> torch.Tensor:
        if self._group != target.input_group:
            self._gram, _ = input_stats(self.cache, target, self.chunk_tokens, self.device)
            self._group = target.input_group
        return self._gram if smooth is None else scale_gram(self._gram, smooth)




# ----------------------------------------------------------------------------- (b) iterated branch








# ----------------------------------------------------------------------------- (a) smoothing search










def search_factors(mdir, cache, cfg: SvdqConfig, chunk_tokens: int = 4096, device="cpu", alphas=ALPHA_GRID,
                   log=None) -> tuple[dict, dict]:
    """({target: s (CPU float32)}, {input group: SmoothChoice.meta()}) for a whole model."""
    groups: dict[str, list] = {}
    for target in mdir.targets():
        groups.setdefault(target.input_group, []).append(target)
    factors, alphas_meta = {}, {}
    for group, members in groups.items():
        gram, act = input_stats(cache, members[0], chunk_tokens, device)
        weights = [mdir.read(t.path + ".weight").to(device=device, dtype=torch.float32) for t in members]
        for t, w in zip(members, weights):
            if w.shape[1] != act.shape[0]:
                raise HarnessError(f"--xy_path {cache.path}: {t.path}.X has {act.shape[0]} channels but the "
                                   f"weight has {w.shape[1]}; the cache is from another model")
            formats.check_finite(w, f"{t.path}.weight")
        choice = search_group(weights, gram, act, cfg, alphas, [f"{t.path} weight" for t in members])
        for t in members:
            factors[t] = choice.s
        alphas_meta[group] = choice.meta()
        if log is not None:
            log(f"smooth search: {group}: a={choice.a:g} b={choice.b:g} error/baseline="
                f"{choice.error / max(choice.baseline_error, 1e-300):.4f}")
    return factors, alphas_meta
