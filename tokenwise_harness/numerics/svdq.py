"""The fake SVDQuant operator: an exact low-rank branch plus a quantized residual.

For a weight W [out, in] (smoothed: W * s along the input dim, when a smooth factor is
given) and a config (rank r, fmt, blk):

    L1 = U_r diag(S_r)   [out, r]      L2 = V_r^T   [r, in]      (top-r SVD of W)
    W~ = L1 L2 + Q(W - L1 L2)          Q = formats.fake_quantize(., fmt, blk)

rank 0 is quantization alone; fmt "none" keeps the rank-r branch and drops the residual
(rank 0 with fmt "none" leaves W untouched: the activation-only rows of a W4A4 grid).

The branch must be the exact top-r subspace (DESIGN.md: randomized SVD is off by 7-48% on
real MLP weights). `LowRank` gets it from a float64 eigendecomposition of the smaller Gram
matrix, once per weight, and serves every rank of a grid from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from tokenwise_harness.allowlist import iter_allowed_linears
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import SvdqConfig, parse_key
from tokenwise_harness.numerics import formats, fused_delta
from tokenwise_harness.numerics.lowrank import LowRank
from tokenwise_harness.numerics.metrics import output_error


def fake_quantize_weight(
    W: torch.Tensor,
    cfg: SvdqConfig,
    lowrank: LowRank | None = None,
    smooth: torch.Tensor | None = None,
    name: str = "weight",
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """W~ (float32) for one config: L1 L2 + Q(W - L1 L2), on W's device.

    `smooth` [in] multiplies W along the input dim first (the caller divides X by it).
    `lowrank`, when given, must have been built from that same (smoothed) W with a max_rank
    of at least the config's rank: the engine builds one per weight and reuses it across
    the grid. A rank above min(out, in) means the full decomposition.

    cfg.iters > 1 refines the branch iteratively (calibrate.iterated_lowrank: iterate 0 is
    the one-shot W~, the iterate with the lowest output error on the cache is kept). It needs
    `gram`, the input Gram matrix H = XᵀX [in, in] of the inputs this weight multiplies --
    of X / s when `smooth` is given -- and is an error without it. One-shot configs ignore it.
    """
    if cfg.iters < 1:
        raise HarnessError(f"config {cfg.key}: iters {cfg.iters} must be >= 1 (1 = one-shot SVD)")
    if cfg.iters > 1 and gram is None:
        raise HarnessError(f"config {cfg.key}: the iterated low-rank branch (iters={cfg.iters}) is scored on the "
                           "cached inputs and needs their Gram matrix (gram=XᵀX); the model-level "
                           "fake_op path cannot run it, use the per-weight engine")
    formats.check_finite(W, name)
    if cfg.fmt != "none":
        formats.check_qspec(cfg.fmt, cfg.blk)
    Wf = W.detach().to(torch.float32)
    if smooth is not None:
        formats.check_finite(smooth, f"{name} smooth factor")
        Wf = Wf * smooth.detach().to(device=Wf.device, dtype=torch.float32)[None, :]

    rank = min(cfg.rank, *Wf.shape)
    if rank == 0:
        if cfg.fmt == "none":
            return Wf.clone()  # nothing to do to the weight (activation-only configs)
        return formats.fake_quantize(Wf, cfg.fmt, cfg.blk, name=name)

    if cfg.iters > 1 and cfg.fmt != "none":
        return iterated_lowrank(Wf, cfg, gram, lowrank=lowrank, name=name).weight
    branch = _branch(Wf, rank, lowrank, name)
    if cfg.fmt == "none":
        return branch
    return branch + formats.fake_quantize(Wf - branch, cfg.fmt, cfg.blk, name=f"{name} residual")


def quantization_delta(W: torch.Tensor, cfg: SvdqConfig, lowrank: LowRank | None = None,
                       name: str = "weight", gram: torch.Tensor | None = None,
                       finite_checked: bool = False) -> torch.Tensor:
    """ΔW = fake_quantize_weight(W, cfg, lowrank, gram=gram) − W, bit for bit: what the engine's error needs.

    For a float32 CUDA W and a one-shot config the residual's cast, the sum with the branch and
    the difference with W run as one fused kernel (numerics.fused_delta) instead of ~20 torch
    passes over the weight; everywhere else (iterated configs: their `gram`) it is the composition itself.
    finite_checked: the caller already refused a non-finite W (the engine checks each weight once,
    not once per config: the check is a pass over W and a wait for the GPU). While Triton is still
    starting on its warm-up thread (fused_delta.ready), the composition runs instead of waiting.
    """
    if cfg.iters > 1 or cfg.fmt == "none" or not fused_delta.applies(W, cfg.blk) or not fused_delta.ready():
        return fake_quantize_weight(W, cfg, lowrank=lowrank, name=name, gram=gram) - W
    if not finite_checked:
        formats.check_finite(W, name)
    formats.check_qspec(cfg.fmt, cfg.blk)
    rank = min(cfg.rank, *W.shape)
    branch = _branch(W, rank, lowrank, name) if rank > 0 else None
    return fused_delta.delta(W, cfg.fmt, cfg.blk, branch)


def _branch(Wf: torch.Tensor, rank: int, lowrank: LowRank | None, name: str) -> torch.Tensor:
    """The rank-r branch L1 L2 (float32, on Wf's device) from `lowrank`, or from a fresh decomposition."""
    if lowrank is None:
        lowrank = LowRank(Wf, rank)
    elif lowrank.shape != tuple(Wf.shape) or lowrank.max_rank < rank:
        raise ValueError(
            f"{name}: LowRank of shape {lowrank.shape} and max_rank {lowrank.max_rank} "
            f"cannot serve rank {rank} of a {tuple(Wf.shape)} weight"
        )
    return lowrank.product(rank).to(device=Wf.device, dtype=torch.float32)


def _as_config(svdq_cfg: SvdqConfig | str | Mapping) -> SvdqConfig:
    """Accept an SvdqConfig, a key string 'rank=16;fmt=nvfp4;blk=128', or a mapping."""
    if isinstance(svdq_cfg, SvdqConfig):
        return svdq_cfg
    if isinstance(svdq_cfg, str):
        return parse_key(svdq_cfg)
    if isinstance(svdq_cfg, Mapping):
        return SvdqConfig(int(svdq_cfg["rank"]), svdq_cfg.get("fmt", "none"), svdq_cfg.get("blk"))
    raise TypeError(f"svdq_cfg must be an SvdqConfig, a config key or a mapping, not {type(svdq_cfg)!r}")


@torch.no_grad()
def fake_op(model: torch.nn.Module, svdq_cfg: SvdqConfig | str | Mapping) -> None:
    """The seed's interface: fake-SVDQuant every allowlisted nn.Linear of `model` in place.

    Each weight is replaced by its W~ in the weight's own dtype; nothing else (biases,
    embeddings, lm_head, norms, other linears, `smooth_factor` buffers) is touched. A smoothed
    model's linears already hold W * s, so their weights are quantized as they are.
    """
    cfg = _as_config(svdq_cfg)
    for target, module in iter_allowed_linears(model):
        weight = module.weight
        w_new = fake_quantize_weight(weight.data, cfg, name=f"{target.path} weight")
        weight.data.copy_(w_new.to(dtype=weight.dtype))


# An iterate must lower the best error by more than this fraction to count as an improvement:
# below it, the difference is under the float32 rounding of the engine's own error pass.
IMPROVE_RTOL = 1e-6


def with_gram(quantize_fn: Callable[..., torch.Tensor], gram: torch.Tensor) -> Callable[..., torch.Tensor]:
    """quantize_fn(w, cfg, **kw) that also gets gram= for iterated configs (iters > 1).

    One-shot configs call quantize_fn exactly as before, so a user's quantize_fn without a
    `gram` parameter keeps working for them. W4A4 configs (afmt) cannot iterate yet: their
    residual branch W~ − L must use the refined L, which a W~ alone does not reveal.
    """

    def fn(w: torch.Tensor, cfg: SvdqConfig, **kw) -> torch.Tensor:
        if cfg.iters <= 1:
            return quantize_fn(w, cfg, **kw)
        if cfg.afmt is not None:
            raise HarnessError(f"config {cfg.key}: the iterated low-rank branch (--lowrank_iters > 1) is not "
                               "supported with activation quantization (--act_qspecs) yet; drop one of them")
        return quantize_fn(w, cfg, gram=gram, **kw)

    return fn


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


def iterated_lowrank(W: torch.Tensor, cfg: SvdqConfig, gram: torch.Tensor, lowrank: LowRank | None = None,
                     name: str = "weight") -> IterResult:
    """The iterated low-rank branch of one (already smoothed, when smoothing) weight.

    `gram` is H of the inputs W multiplies ([in, in]; moved to W's device in float64).
    `lowrank`, when given, is the engine's exact decomposition of W (max_rank >= rank): its
    rank-r product is L₀, so iterate 0 is bit for bit the one-shot W~. `cfg.iters` bounds the
    number of iterates. Everything runs on W's device.
    """
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
    q = None  # the previous iterate's quantized residual (set on the first pass)
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
