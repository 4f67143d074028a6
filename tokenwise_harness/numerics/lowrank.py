"""The exact top-r decomposition of a weight: one float64 Gram eigendecomposition per weight.

The low-rank branch must be the exact top-r subspace (DESIGN.md: randomized SVD is off by
7-48% on real MLP weights). `LowRank` gets it from a float64 eigendecomposition of the smaller
Gram matrix, once per weight, and serves every rank of a grid from it. On a GPU, a large Gram
matrix's top eigenvectors come from the certified Chebyshev-filtered solver (top_eigen: matrix
products, ~5x cheaper than cuSOLVER's syevd, and they overlap across streams); a full eigh
answers everything else, and whatever that solver does not certify.
"""

from __future__ import annotations

import torch

from tokenwise_harness.numerics import top_eigen

# Decompositions run in this process, by either solver (tests and benchmarks read it: a warm
# rerun does none).
COUNTS = {"eigh": 0}

# The filtered solver runs on CUDA Gram matrices from this size on: below it a full eigh is cheap,
# and on a CPU its matrix products cost more than LAPACK's eigh.
FILTERED_MIN_N = 1024


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

    def __init__(self, W: torch.Tensor, max_rank: int, dtype: torch.dtype = torch.float32) -> None:
        if W.dim() != 2:
            raise ValueError(f"LowRank needs a 2-D weight, got shape {tuple(W.shape)}")
        out_f, in_f = W.shape
        self.shape = (out_f, in_f)
        self.max_rank = max(0, min(int(max_rank), out_f, in_f))
        self.dtype = dtype
        U, S, Vt = _top_svd(W.detach().to(torch.float64), self.max_rank, filtered=None)
        self.S = S.to(dtype)  # [max_rank], descending
        self.L1 = (U * S).to(dtype)  # [out, max_rank] = U diag(S)
        self.L2 = Vt.to(dtype)  # [max_rank, in] = V^T

    @classmethod
    def from_factors(cls, L1: torch.Tensor, L2: torch.Tensor, S: torch.Tensor) -> "LowRank":
        """A LowRank from factors an earlier LowRank produced (L1 = U·S [out, r], L2 = Vᵀ [r, in])."""
        if L1.dim() != 2 or L2.dim() != 2 or L1.shape[1] != L2.shape[0] or S.shape != (L1.shape[1],):
            raise ValueError(f"inconsistent low-rank factors {tuple(L1.shape)}, {tuple(L2.shape)}, {tuple(S.shape)}")
        self = cls.__new__(cls)
        self.shape = (L1.shape[0], L2.shape[1])
        self.max_rank = L1.shape[1]
        self.dtype = L1.dtype
        self.L1, self.L2, self.S = L1, L2.to(L1.dtype), S.to(L1.dtype)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The factors, by name (what from_factors takes back)."""
        return {"L1": self.L1, "L2": self.L2, "S": self.S}

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


def _top_svd(W: torch.Tensor, r: int, filtered: bool | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r (U [out, r], S [r], V^T [r, in]) of a float64 W via its smaller Gram matrix
    (`filtered`: try the filtered solver first; None: on CUDA from FILTERED_MIN_N on)."""
    out_f, in_f = W.shape
    if filtered is None:
        filtered = W.is_cuda and min(out_f, in_f) >= FILTERED_MIN_N
    if out_f <= in_f:
        U = _top_eigvecs(W @ W.T, r, filtered)  # left singular vectors
        SVt = U.T @ W  # [r, in]
        S = SVt.norm(dim=1)
        Vt = SVt / torch.where(S > 0, S, 1.0)[:, None]
    else:
        V = _top_eigvecs(W.T @ W, r, filtered)  # right singular vectors
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


def _top_eigvecs(gram: torch.Tensor, r: int, filtered: bool) -> torch.Tensor:
    """Eigenvectors of the r largest eigenvalues of a symmetric PSD matrix, largest first."""
    COUNTS["eigh"] += 1
    if filtered:
        vecs = top_eigen.top_eigenvectors(gram, r)
        if vecs is not None:
            return vecs
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
