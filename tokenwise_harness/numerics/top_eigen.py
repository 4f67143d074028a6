"""The top-r eigenvectors of a large symmetric PSD matrix, to a residual certificate, without a full eigh.

A float64 `eigh` of a 4096×4096 Gram matrix costs ~105 ms on an H200 and cuSOLVER's syevd does
not overlap with itself, so a 36-layer 8B model's 252 decompositions are bound at ~27 s. The
low-rank branch needs only the top r ≤ 32 eigenvectors, and exactly (DESIGN.md: a randomized
SVD without convergence is 7–48 % off on real MLP weights). This module gets them by
Chebyshev-filtered subspace iteration (Zhou & Saad's scaled filter) in float64: a block of
p = r + guard vectors is filtered by a Chebyshev polynomial of G that damps [0, cutoff] and
amplifies the top of the spectrum, then orthonormalized and Rayleigh–Ritz rotated; leading
Ritz pairs whose residual ‖G v − θ v‖ is below `tol`·θ₁ are locked. The work is matrix
products (tensor-core float64 on a GPU), so decompositions overlap on streams.

It either returns vectors that meet the residual certificate or None (no convergence within
the budget, a zero or non-finite matrix): the caller then falls back to a full eigh, so the
result is never worse than the certificate. With per-vector residuals ≤ tol·θ₁, the top-k
subspace is off by at most √k·tol·θ₁ / (λ_k − λ_{k+1}) (Davis–Kahan): for tol = 1e-11 and
the 0.15 % relative gaps of a random 4096² weight's top singular values, ~4e-8, far below the
1e-6 the low-rank branch promises.
"""

from __future__ import annotations

import math

import torch

TOL = 1e-11  # residual certificate, relative to the largest eigenvalue
# Largest amplification of one filter pass between the top active Ritz value and the wanted
# ones: the orthonormalization after it keeps ~16 - log10(this) digits of the smaller directions.
MAX_SPREAD = 1e6
MAX_LEAK = 1e10
MAX_DEGREE = 24  # of one filter pass
MAX_PRODUCTS = 360  # G @ block products before giving up (then the caller runs a full eigh)

# Work done in this process (benchmarks and tests read it): solves, G @ block products, and
# solves that gave up (their caller ran a full eigh instead).
COUNTS = {"solves": 0, "products": 0, "gave_up": 0}


def guard_vectors(r: int) -> int:
    """Extra block columns beyond r: the filter's rate is set by λ_r against λ_{r+guard+1}."""
    return max(16, r)


def top_eigenvectors(G: torch.Tensor, r: int, *, tol: float = TOL, seed: int = 0,
                     max_products: int | None = None) -> torch.Tensor | None:
    """Eigenvectors [n, r] of the r largest eigenvalues of symmetric PSD `G` (largest first), each
    with ‖G v − θ v‖ ≤ tol·θ₁; None when that is not reached within `max_products` block products
    (default MAX_PRODUCTS). The residuals certify eigenpairs; that they are the r largest rests,
    as for every subspace or Krylov method, on the random start having a component along each
    of them (true with probability one), which the filter then amplifies above all the rest."""
    max_products = MAX_PRODUCTS if max_products is None else max_products
    n = G.shape[0]
    p = min(n, r + guard_vectors(r))
    if r <= 0 or p >= n:
        return None
    if not bool(torch.isfinite(G).all()):
        return None
    gen = torch.Generator(device=G.device).manual_seed(seed)
    block = torch.linalg.qr(torch.randn(n, p, generator=gen, device=G.device, dtype=G.dtype)).Q
    locked = G.new_empty(n, 0)
    theta, block, _ = _rayleigh_ritz(G, block, locked)
    products = 1
    top = float(theta[0])
    if not top > 0:
        return None
    COUNTS["solves"] += 1
    while products < max_products:
        degree = _degree(theta, r - locked.shape[1], top)
        cutoff = max(float(theta[-1]), 1e-9 * top)  # rounding can make a PSD matrix's last Ritz value ≤ 0
        filtered = _chebyshev(G, block, degree, cutoff=cutoff, top=max(float(theta[0]), cutoff))
        theta, block, residual = _rayleigh_ritz(G, filtered, locked)
        products += degree + 1
        COUNTS["products"] += degree + 1
        top = max(top, float(theta[0]))
        done = _converged_prefix(residual, tol * top, r - locked.shape[1])
        if done:
            locked = torch.cat([locked, block[:, :done]], dim=1)
            block, theta = block[:, done:], theta[done:]
        if locked.shape[1] >= r:
            return locked[:, :r]
    COUNTS["gave_up"] += 1
    return None


def _degree(theta: torch.Tensor, wanted: int, top: float) -> int:
    """Filter degree for an active block with Ritz values `theta`, the first `wanted` of them
    wanted, `top` the largest eigenvalue seen (locked ones included). The cutoff, the smallest
    Ritz value, ≈ λ_p: everything below it is damped. As high as MAX_DEGREE while
    * the active top's growth over the last wanted value stays ≤ MAX_SPREAD: the wanted
      directions then keep ~16 − 6 digits through the orthonormalization, and
    * `top`'s growth over it stays ≤ MAX_LEAK: locked directions, present in the block at the
      rounding level (1e-16), grow to at most 1e-6 of it before they are projected out."""
    want, cutoff = float(theta[min(wanted, theta.shape[0]) - 1]), float(theta[-1])
    if want <= cutoff or not cutoff > 0:
        return MAX_DEGREE // 2  # the block does not separate yet: a moderate pass
    half = cutoff / 2

    def rate(value: float) -> float:  # log growth per degree of T_k at `value`
        return math.acosh(max(1.0, (value - half) / half))

    degree = MAX_DEGREE
    for higher, cap in ((float(theta[0]), MAX_SPREAD), (top, MAX_LEAK)):
        spread = rate(higher) - rate(want)
        if spread > 0:
            degree = min(degree, int(math.log(cap) / spread))
    return max(1, degree)


def _chebyshev(G, X, degree, *, cutoff, top):
    """T_degree of G mapped so that [0, cutoff] -> [-1, 1], applied to X, scaled so the component
    along eigenvalue `top` stays ~1 (Zhou & Saad's recurrence: no overflow at any degree)."""
    half = cutoff / 2  # centre and half-width of [0, cutoff]
    sigma1 = half / (top - half)
    sigma = sigma1
    Y = (G @ X - half * X) * (sigma1 / half)
    for _ in range(1, degree):
        sigma_next = 1.0 / (2.0 / sigma1 - sigma)
        Y_next = (G @ Y - half * Y) * (2.0 * sigma_next / half) - (sigma * sigma_next) * X
        X, Y, sigma = Y, Y_next, sigma_next
    return Y


def _orthonormal(Y, locked):
    """An orthonormal basis of Y's span with the locked vectors projected out (twice: one pass of
    block Gram–Schmidt loses orthogonality when Y leans on them)."""
    for _ in range(2):
        if locked.shape[1]:
            Y = Y - locked @ (locked.T @ Y)
    return torch.linalg.qr(Y).Q


def _rayleigh_ritz(G, Y, locked):
    """Ritz values (descending), vectors and residual norms ‖G v − θ v‖ of G on span(Y) ⟂ locked."""
    Q = _orthonormal(Y, locked)
    GQ = G @ Q
    H = Q.T @ GQ
    theta, V = torch.linalg.eigh((H + H.T) / 2)
    theta, V = theta.flip(0), V.flip(1)
    vectors = Q @ V
    return theta, vectors, (GQ @ V - vectors * theta).norm(dim=0)


def _converged_prefix(residual: torch.Tensor, bound: float, wanted: int) -> int:
    """How many leading Ritz vectors (at most `wanted`) have residual ≤ bound."""
    ok = (residual[:wanted] <= bound).tolist()
    return ok.index(False) if False in ok else len(ok)
