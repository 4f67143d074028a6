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

from collections.abc import Mapping

import torch

from tokenwise_harness import formats
from tokenwise_harness.allowlist import iter_allowed_linears
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import SvdqConfig, parse_key


class LowRank:
    """Exact top-`max_rank` SVD factors of a 2-D W, reusable for any rank r <= max_rank.

    With G the smaller Gram matrix (W W^T if out <= in, else W^T W) in float64, the top
    eigenvectors of G are the top left (resp. right) singular vectors. The other factor is
    then read off W itself (U^T W = S V^T, or W V = U S), and the singular values are that
    product's row (column) norms: more accurate than sqrt(eigenvalue), and never a division
    by a zero singular value. Signs are fixed so that the largest-magnitude entry of every
    left singular vector is positive (the svd_flip convention), so results are reproducible.
    Everything is computed on W's device; factors are stored in `dtype`.
    """

    def __init__(self, W: torch.Tensor, max_rank: int, dtype: torch.dtype = torch.float32):
        if W.dim() != 2:
            raise ValueError(f"LowRank needs a 2-D weight, got shape {tuple(W.shape)}")
        out_f, in_f = W.shape
        self.shape = (out_f, in_f)
        self.max_rank = max(0, min(int(max_rank), out_f, in_f))
        self.dtype = dtype
        U, S, Vt = _top_svd(W.detach().to(torch.float64), self.max_rank)
        self.S = S.to(dtype)  # [max_rank], descending
        self.L1 = (U * S).to(dtype)  # [out, max_rank] = U diag(S)
        self.L2 = Vt.to(dtype)  # [max_rank, in] = V^T

    def _check(self, r: int) -> int:
        if not 0 <= r <= self.max_rank:
            raise ValueError(f"rank {r} is outside 0..{self.max_rank} of this LowRank")
        return r

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L1 [out, r], L2 [r, in]) of the rank-r truncated SVD (views, no copy)."""
        r = self._check(r)
        return self.L1[:, :r], self.L2[:r]

    def product(self, r: int) -> torch.Tensor:
        """L1 L2 of rank r, in `dtype` (zeros for r = 0)."""
        L1, L2 = self.factors(r)
        return L1 @ L2


def _top_svd(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r (U [out, r], S [r], V^T [r, in]) of a float64 W via its smaller Gram matrix."""
    out_f, in_f = W.shape
    if out_f <= in_f:
        U = _top_eigvecs(W @ W.T, r)  # left singular vectors
        SVt = U.T @ W  # [r, in]
        S = SVt.norm(dim=1)
        Vt = SVt / torch.where(S > 0, S, 1.0)[:, None]
    else:
        V = _top_eigvecs(W.T @ W, r)  # right singular vectors
        US = W @ V  # [out, r]
        S = US.norm(dim=0)
        U = US / torch.where(S > 0, S, 1.0)
        Vt = V.T
    # Eigen-order and the recomputed norms can disagree for near-equal values: sort by S.
    order = torch.argsort(S, descending=True, stable=True)
    U, S, Vt = U[:, order], S[order], Vt[order]
    sign = _svd_flip_sign(U)
    return U * sign, S, Vt * sign[:, None]


# On the CPU, eigh of a Gram matrix up to this size runs on one thread: LAPACK's threaded
# tridiagonalisation gains nothing there and, with the cores shared (pytest -n, a busy CI
# box), ran ~20x slower; one thread also makes the result independent of the thread count.
SINGLE_THREAD_EIGH_MAX = 2048


def _top_eigvecs(gram: torch.Tensor, r: int) -> torch.Tensor:
    """Eigenvectors of the r largest eigenvalues of a symmetric matrix, largest first."""
    if gram.device.type == "cpu" and gram.shape[0] <= SINGLE_THREAD_EIGH_MAX:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _, vecs = torch.linalg.eigh(gram)
        finally:
            torch.set_num_threads(threads)
    else:
        _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    n = gram.shape[0]
    return vecs[:, n - r :].flip(-1)


def _svd_flip_sign(U: torch.Tensor) -> torch.Tensor:
    """+1/-1 per column making each column's largest-|.| entry positive."""
    if U.shape[1] == 0:
        return torch.ones(0, dtype=U.dtype, device=U.device)
    idx = U.abs().argmax(dim=0)
    peak = U.gather(0, idx[None, :])[0]
    return torch.where(peak < 0, -1.0, 1.0).to(U.dtype)


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
        from tokenwise_harness.calibrate import iterated_lowrank

        return iterated_lowrank(Wf, cfg, gram, lowrank=lowrank, name=name).weight
    if lowrank is None:
        lowrank = LowRank(Wf, rank)
    elif lowrank.shape != tuple(Wf.shape) or lowrank.max_rank < rank:
        raise ValueError(
            f"{name}: LowRank of shape {lowrank.shape} and max_rank {lowrank.max_rank} "
            f"cannot serve rank {rank} of a {tuple(Wf.shape)} weight"
        )
    branch = lowrank.product(rank).to(device=Wf.device, dtype=torch.float32)
    if cfg.fmt == "none":
        return branch
    return branch + formats.fake_quantize(Wf - branch, cfg.fmt, cfg.blk, name=f"{name} residual")


def _as_config(svdq_cfg) -> SvdqConfig:
    """Accept an SvdqConfig, a key string 'rank=16;fmt=nvfp4;blk=128', or a mapping."""
    if isinstance(svdq_cfg, SvdqConfig):
        return svdq_cfg
    if isinstance(svdq_cfg, str):
        return parse_key(svdq_cfg)
    if isinstance(svdq_cfg, Mapping):
        return SvdqConfig(int(svdq_cfg["rank"]), svdq_cfg.get("fmt", "none"), svdq_cfg.get("blk"))
    raise TypeError(f"svdq_cfg must be an SvdqConfig, a config key or a mapping, not {type(svdq_cfg)!r}")


@torch.no_grad()
def fake_op(model, svdq_cfg) -> None:
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
