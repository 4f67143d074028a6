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

import time
from dataclasses import dataclass, field

import torch

from tokenwise_harness import formats
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import SvdqConfig

# The smoothing exponents searched (a), as in deepcompressor's 20-point grid without 0 and 1.
ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
# An iterate must lower the best error by more than this fraction to count as an improvement:
# below it, the difference is under the float32 rounding of the engine's own error pass.
IMPROVE_RTOL = 1e-6
# The search config's defaults (smooth --search_qspec / --search_rank).
SEARCH_QSPEC = "nvfp4@16"
SEARCH_RANK = 32


# ----------------------------------------------------------------------------- Gram and scoring


class GramAccumulator:
    """H = XᵀX and max_t |X_tj| of a stream of X chunks [n, in], in float64 on `device`."""

    def __init__(self, in_dim: int, device="cpu"):
        self.gram = torch.zeros(in_dim, in_dim, dtype=torch.float64, device=device)
        self.amax = torch.zeros(in_dim, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.to(device=self.gram.device, dtype=torch.float64)
        self.gram.addmm_(x.T, x)
        if x.shape[0]:
            self.amax = torch.maximum(self.amax, x.abs().amax(dim=0))
        self.n_tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        # XᵀX is symmetric in exact arithmetic; make it so bit for bit.
        return (self.gram + self.gram.T) * 0.5


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


def input_gram(cache, target, chunk_tokens: int = 4096, device="cpu", smooth: torch.Tensor | None = None):
    """H = XᵀX (float64) of a projection's cached input; with `smooth`, of X / s (= H_s)."""
    gram, _ = input_stats(cache, target, chunk_tokens, device)
    return gram if smooth is None else scale_gram(gram, smooth)


def scale_gram(gram: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """diag(1/s) H diag(1/s): the Gram of X / s, from the Gram of X."""
    inv = 1.0 / smooth.to(device=gram.device, dtype=torch.float64)
    return gram * inv[:, None] * inv[None, :]


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) = ||X ΔWᵀ||²_F in float64, for ΔW [out, in] and H = XᵀX [in, in]."""
    d = delta.to(device=gram.device, dtype=torch.float64)
    return max(0.0, float(((d @ gram) * d).sum()))


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


def with_gram(quantize_fn, gram: torch.Tensor):
    """quantize_fn(w, cfg, **kw) that also gets gram= for iterated configs (iters > 1).

    One-shot configs call quantize_fn exactly as before, so a user's quantize_fn without a
    `gram` parameter keeps working for them. W4A4 configs (afmt) cannot iterate yet: their
    residual branch W~ − L must use the refined L, which a W~ alone does not reveal.
    """

    def fn(w, cfg, **kw):
        if cfg.iters <= 1:
            return quantize_fn(w, cfg, **kw)
        if cfg.afmt is not None:
            raise HarnessError(f"config {cfg.key}: the iterated low-rank branch (--lowrank_iters > 1) is not "
                               "supported with activation quantization (--act_qspecs) yet; drop one of them")
        return quantize_fn(w, cfg, gram=gram, **kw)

    return fn


# ----------------------------------------------------------------------------- (b) iterated branch


@dataclass
class IterResult:
    """The best iterate of the refined low-rank branch."""

    weight: torch.Tensor  # W~ of the best iterate, float32, on W's device
    best_iter: int  # 0 = the one-shot branch
    errors: list[float] = field(default_factory=list)  # tr(ΔW_k H ΔW_kᵀ) of every iterate run
    seconds: float = 0.0
    branch: torch.Tensor | None = None  # L of the best iterate (W~ − branch = its quantized residual)

    @property
    def iters_run(self) -> int:
        return len(self.errors)


def iterated_lowrank(W: torch.Tensor, cfg: SvdqConfig, gram: torch.Tensor, lowrank=None,
                     name: str = "weight") -> IterResult:
    """The iterated low-rank branch of one (already smoothed, when smoothing) weight.

    `gram` is H of the inputs W multiplies ([in, in]; moved to W's device in float64).
    `lowrank`, when given, is the engine's exact decomposition of W (max_rank >= rank): its
    rank-r product is L₀, so iterate 0 is bit for bit the one-shot W~. `cfg.iters` bounds the
    number of iterates. Everything runs on W's device.
    """
    from tokenwise_harness.svdq import LowRank

    started = time.perf_counter()
    Wf = W.detach().to(torch.float32)
    if cfg.iters < 1:
        raise HarnessError(f"config {cfg.key}: iters must be >= 1 (1 = one-shot SVD)")
    in_dim = Wf.shape[1]
    if tuple(gram.shape) != (in_dim, in_dim):
        raise ValueError(f"{name}: Gram matrix of shape {tuple(gram.shape)} does not match the weight's "
                         f"input dim {in_dim}")
    H = gram.to(device=Wf.device, dtype=torch.float64)
    rank = min(cfg.rank, *Wf.shape)
    if rank == 0 or cfg.fmt == "none":
        from tokenwise_harness.svdq import fake_quantize_weight

        w1 = fake_quantize_weight(Wf, _one_shot(cfg), lowrank=lowrank, name=name)
        branch = None if rank == 0 else (w1 if cfg.fmt == "none" else None)
        return IterResult(w1, 0, [output_error(w1 - Wf, H)], time.perf_counter() - started, branch)
    formats.check_qspec(cfg.fmt, cfg.blk)
    if lowrank is None:
        lowrank = LowRank(Wf, rank)
    elif lowrank.shape != tuple(Wf.shape) or lowrank.max_rank < rank:
        raise ValueError(f"{name}: LowRank of shape {lowrank.shape} and max_rank {lowrank.max_rank} "
                         f"cannot serve rank {rank} of a {tuple(Wf.shape)} weight")
    branch = lowrank.product(rank).to(device=Wf.device, dtype=torch.float32)
    best, best_err, best_iter, best_branch, errors = None, None, 0, None, []
    for k in range(cfg.iters):
        if k > 0:
            branch = LowRank(Wf - q, rank).product(rank).to(device=Wf.device, dtype=torch.float32)
        q = formats.fake_quantize(Wf - branch, cfg.fmt, cfg.blk, name=f"{name} residual")
        w_tilde = branch + q
        err = output_error(w_tilde - Wf, H)
        errors.append(err)
        if best is None or err < best_err * (1.0 - IMPROVE_RTOL):
            best, best_err, best_iter, best_branch = w_tilde, err, k, branch
        else:
            break  # no improvement for one step
    return IterResult(best, best_iter, errors, time.perf_counter() - started, best_branch)


def _one_shot(cfg: SvdqConfig) -> SvdqConfig:
    return SvdqConfig(cfg.rank, cfg.fmt, cfg.blk, cfg.afmt, cfg.ablk, 1)


# ----------------------------------------------------------------------------- (a) smoothing search


def smoothing_candidates(alphas=ALPHA_GRID) -> list[tuple[float, float]]:
    """(a, b) pairs in search order: no smoothing, then b = 1 − a, then b = 0."""
    out = [(0.0, 0.0)]
    out += [(float(a), round(1.0 - a, 10)) for a in alphas]
    out += [(float(a), 0.0) for a in alphas]
    return out


@dataclass
class SmoothChoice:
    """The searched factor of one input group and how it scored."""

    s: torch.Tensor  # [in] float32
    a: float
    b: float
    error: float  # Σ_members tr(ΔW' H_s ΔW'ᵀ) of the chosen s
    baseline_error: float  # the same with no smoothing (s = 1)
    fixed_error: float | None  # the same with the fixed default (a = b = 0.5), when searched
    signal: float  # Σ_members tr(W H Wᵀ) = ||X Wᵀ||² (error / signal is an nmse without bias)
    errors: dict = field(default_factory=dict)  # (a, b) -> error, every candidate

    def meta(self) -> dict:
        return {"a": self.a, "b": self.b, "error": self.error, "baseline_error": self.baseline_error,
                "fixed_error": self.fixed_error, "signal": self.signal}


def smoothed_error(weights: list[torch.Tensor], gram: torch.Tensor, s: torch.Tensor, cfg: SvdqConfig,
                   names: list[str] | None = None) -> float:
    """Σ over members of the output error of W·s fake-quantized with `cfg`, on X / s.

    `gram` is H of the unsmoothed X; every weight [out_m, in] is float32 on gram's device.
    """
    from tokenwise_harness.svdq import fake_quantize_weight

    names = names or [f"weight {i}" for i in range(len(weights))]
    inv = 1.0 / s.to(device=gram.device, dtype=torch.float64)
    deltas = []
    for w, name in zip(weights, names):
        w_s = w.to(torch.float32) * s.to(device=w.device, dtype=torch.float32)[None, :]
        w_tilde = fake_quantize_weight(w, _one_shot(cfg), smooth=s, name=name)
        deltas.append((w_tilde - w_s).to(torch.float64) * inv[None, :])  # back to X's coordinates
    return output_error(torch.cat(deltas, dim=0), gram)


def search_group(weights: list[torch.Tensor], gram: torch.Tensor, act_amax: torch.Tensor, cfg: SvdqConfig,
                 alphas=ALPHA_GRID, names: list[str] | None = None) -> SmoothChoice:
    """Search the smoothing exponent of one input group (members share X, H and s)."""
    from tokenwise_harness.smooth import smooth_factor

    w_amax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(0)
    act = act_amax.to(device=w_amax.device)
    signal = sum(output_error(w, gram) for w in weights)
    best = None
    errors = {}
    for a, b in smoothing_candidates(alphas):
        s = smooth_factor(act, w_amax, a, beta=b)
        err = smoothed_error(weights, gram, s, cfg, names)
        errors[(a, b)] = err
        if best is None or err < best[0]:
            best = (err, a, b, s)
    err, a, b, s = best
    return SmoothChoice(s.cpu(), a, b, err, errors[(0.0, 0.0)], errors.get((0.5, 0.5)), signal, errors)


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
