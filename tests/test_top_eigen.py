"""The certified top-r eigensolver (numerics/top_eigen.py) against a full float64 eigh.

Spectra are the ones low-rank branches meet: a random weight's Marchenko–Pastur top (the
hardest: its top eigenvalues sit 0.1–0.3 % apart), a bulk with outlier directions (real LLM
weights), a power-law decay, a rank-deficient matrix, and an eigenvalue repeated inside the top
r. The oracle is torch.linalg.eigh in float64 on the same matrix; what is compared is the rank-k
part of G (P_k G, unique whenever λ_k > λ_{k+1}), not individual vectors (unique only up to sign
and rotations inside repeated eigenvalues).
"""

from __future__ import annotations

import pytest
import torch

from tokenwise_harness.numerics import lowrank, top_eigen


def _orthonormal(n, k, gen):
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q


def _gram_of(W):
    return W @ W.T


def _spectra(n, seed):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, 3 * n, generator=gen, dtype=torch.float64) / n**0.5
    outliers = _orthonormal(n, 6, gen) * torch.tensor([80.0, 40, 25, 12, 6, 3], dtype=torch.float64)
    spiky = W + outliers @ torch.randn(6, 3 * n, generator=gen, dtype=torch.float64) / (3 * n) ** 0.5
    basis = _orthonormal(n, n, gen)
    power = torch.arange(1, n + 1, dtype=torch.float64) ** -1.0
    repeated = power.clone()
    repeated[2:6] = repeated[2]  # λ3 = λ4 = λ5 = λ6, well inside the top 8
    low_rank = torch.randn(n, 10, generator=gen, dtype=torch.float64) @ torch.randn(10, 2 * n, generator=gen,
                                                                                   dtype=torch.float64)
    return {
        "marchenko-pastur": _gram_of(W),
        "outliers+bulk": _gram_of(spiky),
        "power-law": (basis * power) @ basis.T,
        "repeated": (basis * repeated) @ basis.T,
        "rank-10": _gram_of(low_rank),
    }


def _rank_k_part(G, V, k):
    P = V[:, :k] @ V[:, :k].T
    return P @ G


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("r", [8, 32])
def test_matches_full_eigh_on_every_spectrum(seed, r):
    for name, G in _spectra(384, seed).items():
        V = top_eigen.top_eigenvectors(G, r)
        assert V is not None, name
        evals, evecs = torch.linalg.eigh(G)
        ref = evecs.flip(-1)
        top = evals[-1]
        # The certificate: every vector an eigenvector to 1e-11 of λ1, and orthonormal.
        theta = (V * (G @ V)).sum(0)
        assert ((G @ V - V * theta).norm(dim=0) <= top_eigen.TOL * top * 1.01).all(), name
        torch.testing.assert_close(V.T @ V, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)
        # The right eigenvalues (the r largest, in order) and the right rank-k parts of G.
        torch.testing.assert_close(theta, evals.flip(0)[:r], atol=1e-10 * float(top), rtol=0)
        for k in {1, r // 2, r}:
            gap = float(evals[-k] - evals[-k - 1])
            if gap <= 1e-6 * float(top):  # λ_k = λ_{k+1}: the rank-k part is not unique
                continue
            want = _rank_k_part(G, ref, k)
            err = (_rank_k_part(G, V, k) - want).norm() / want.norm()
            assert err < 1e-8, (name, k, float(err))


def test_lowrank_factors_match_the_full_eigh_path_within_the_promise():
    """LowRank's rank-r products from the filtered solver are within 1e-6 (DESIGN.md) of the
    full-eigh path, for a wide and a tall weight (both Gram sides)."""
    gen = torch.Generator().manual_seed(3)
    for shape in [(300, 700), (900, 350)]:
        W = torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[1] ** 0.5
        W[:, 7] *= 30  # an outlier input channel, as in real activations' weights
        U1, S1, Vt1 = lowrank._top_svd(W, 32, filtered=True)
        U2, S2, Vt2 = lowrank._top_svd(W, 32, filtered=False)
        for r in (8, 16, 32):
            a, b = (U1[:, :r] * S1[:r]) @ Vt1[:r], (U2[:, :r] * S2[:r]) @ Vt2[:r]
            assert (a - b).norm() / b.norm() < 1e-6, (shape, r)
        torch.testing.assert_close(S1, S2, rtol=1e-9, atol=0)


def test_deterministic():
    G = _spectra(256, 5)["outliers+bulk"]
    a, b = top_eigen.top_eigenvectors(G, 16), top_eigen.top_eigenvectors(G, 16)
    assert torch.equal(a, b)


def test_declines_what_it_cannot_certify():
    """None, so the caller runs a full eigh: non-finite or zero matrices, a block as wide as the
    matrix, and a budget too small to converge (counted)."""
    G = _spectra(256, 6)["marchenko-pastur"]
    bad = G.clone()
    bad[3, 4] = float("nan")
    assert top_eigen.top_eigenvectors(bad, 8) is None
    inf = G.clone()
    inf[0, 0] = float("inf")
    assert top_eigen.top_eigenvectors(inf, 8) is None
    assert top_eigen.top_eigenvectors(torch.zeros(256, 256, dtype=torch.float64), 8) is None
    assert top_eigen.top_eigenvectors(G[:40, :40], 32) is None
    before = top_eigen.COUNTS["gave_up"]
    assert top_eigen.top_eigenvectors(G, 32, max_products=3) is None
    assert top_eigen.COUNTS["gave_up"] == before + 1


def test_lowrank_falls_back_to_full_eigh_when_the_solver_declines(monkeypatch):
    """When the solver gives up (here: a budget of 2 products), LowRank gets the full eigh's
    answer, bit for bit."""
    W = torch.randn(200, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(top_eigen, "MAX_PRODUCTS", 2)
    before = top_eigen.COUNTS["gave_up"]
    got = lowrank._top_svd(W, 8, filtered=True)
    assert top_eigen.COUNTS["gave_up"] == before + 1
    for a, b in zip(got, lowrank._top_svd(W, 8, filtered=False)):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_lowrank_uses_the_filtered_solver_within_the_promise():
    """On CUDA a LowRank of a large weight goes through the filtered solver (counted, certified,
    no fallback) and its rank-r products are within 1e-6 of the full eigh's, on both Gram sides."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    for shape in [(1536, 2048), (3072, 1024)]:
        W = torch.randn(*shape, device="cuda", generator=gen) / shape[1] ** 0.5
        W[:, 3] *= 25
        before = dict(top_eigen.COUNTS)
        lr = lowrank.LowRank(W, 32)
        assert top_eigen.COUNTS["solves"] == before["solves"] + 1
        assert top_eigen.COUNTS["gave_up"] == before["gave_up"]
        U, S, Vt = lowrank._top_svd(W.double(), 32, filtered=False)
        for r in (8, 16, 32):
            want = (U[:, :r] * S[:r]) @ Vt[:r]
            assert (lr.product(r).double() - want).norm() / want.norm() < 1e-6, (shape, r)
