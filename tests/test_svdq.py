"""The low-rank branch against torch.linalg.svd, the operator's semantics, and fake_op."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.oracles import assert_bitwise, fake_quantize_ref, truncated_svd64
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import SvdqConfig
from tokenwise_harness.numerics import formats
from tokenwise_harness.numerics.lowrank import LowRank
from tokenwise_harness.numerics.svdq import fake_op, fake_quantize_weight

FMTS = sorted(formats.FORMATS)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def decaying(out_f: int, in_f: int, ratio: float = 0.85, seed: int = 0) -> torch.Tensor:
    """A weight with singular values ratio**i and random singular vectors."""
    g = gen(seed)
    k = min(out_f, in_f)
    U, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64))
    S = ratio ** torch.arange(k, dtype=torch.float64)
    return ((U * S) @ V.T).float()


# ----------------------------------------------------------------------------- LowRank


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32), (1, 9), (9, 1)])
def test_lowrank_matches_torch_svd_in_float64(shape):
    W = torch.randn(*shape, generator=gen(1), dtype=torch.float64)
    k = min(shape)
    lr = LowRank(W, k, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(lr.S, S, rtol=1e-12, atol=1e-13)
    for r in sorted({0, 1, k // 2, k}):
        ref = (U[:, :r] * S[:r]) @ Vh[:r]
        got = lr.product(r)
        assert got.dtype == torch.float64 and got.shape == shape
        assert (got - ref).abs().max().item() <= 1e-12 * S[0].item()


@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(1, 24), in_f=st.integers(1, 24), seed=st.integers(0, 10_000))
def test_property_lowrank_product_is_the_truncated_svd(out_f, in_f, seed):
    W = torch.randn(out_f, in_f, generator=gen(seed), dtype=torch.float64)
    k = min(out_f, in_f)
    lr = LowRank(W, k, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(lr.S, S, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lr.product(k), W, rtol=0, atol=1e-12)
    for r in range(1, k):
        if S[r - 1] - S[r] > 1e-6 * S[0]:  # the rank-r subspace is unique only at a gap
            ref = (U[:, :r] * S[:r]) @ Vh[:r]
            torch.testing.assert_close(lr.product(r), ref, rtol=0, atol=1e-9 * S[0].item())


def test_lowrank_factors_shapes_orthonormality_and_signs():
    W = torch.randn(30, 50, generator=gen(2))
    lr = LowRank(W, 8)
    L1, L2 = lr.factors(8)
    assert L1.shape == (30, 8) and L2.shape == (8, 50) and L1.dtype == torch.float32
    torch.testing.assert_close(L2 @ L2.T, torch.eye(8), atol=1e-5, rtol=0)
    U = L1 / lr.S
    peak = U.gather(0, U.abs().argmax(dim=0)[None])[0]
    assert (peak > 0).all()  # svd_flip convention: deterministic signs
    again = LowRank(W.clone(), 8)
    assert torch.equal(again.L1, lr.L1) and torch.equal(again.L2, lr.L2)
    # A tall W takes the other Gram branch and gives the transposed factors.
    lr_t = LowRank(W.T.contiguous(), 8)
    torch.testing.assert_close(lr_t.product(8), lr.product(8).T, atol=1e-5, rtol=0)


def test_lowrank_rank_zero_full_and_bounds():
    W = torch.randn(12, 20, generator=gen(3))
    lr = LowRank(W, 100)  # capped at min(out, in)
    assert lr.max_rank == 12
    L1, L2 = lr.factors(0)
    assert L1.shape == (12, 0) and L2.shape == (0, 20)
    assert torch.equal(lr.product(0), torch.zeros(12, 20))
    torch.testing.assert_close(lr.product(12), W, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        lr.product(13)
    assert LowRank(W, 0).product(0).abs().sum() == 0


def test_lowrank_of_a_rank_deficient_weight_has_no_nan():
    g = gen(4)
    W = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 30, generator=g, dtype=torch.float64)
    lr = LowRank(W, 20, dtype=torch.float64)
    assert torch.isfinite(lr.L1).all() and torch.isfinite(lr.L2).all()
    assert lr.S[3:].abs().max() < 1e-10 * lr.S[0]
    torch.testing.assert_close(lr.product(3), W, atol=1e-11, rtol=0)
    torch.testing.assert_close(lr.product(20), W, atol=1e-11, rtol=0)


# ----------------------------------------------------------------------------- the operator


@pytest.mark.parametrize("fmt,blk", [("nvfp4", 16), ("mxfp4", 32), ("fp4", "in"), ("int4", 128),
                                     ("int4_asym", 64), ("int8", "in"), ("fp8", 16)])
def test_error_does_not_grow_with_rank_on_a_decaying_spectrum(fmt, blk):
    W = decaying(96, 160)
    lr = LowRank(W, 96)
    errs = [(fake_quantize_weight(W, SvdqConfig(r, fmt, blk), lowrank=lr) - W).norm().item()
            for r in (0, 1, 2, 4, 8, 16, 32, 64, 96)]
    assert all(b <= a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-5 * W.norm().item()  # full rank: nothing left to quantize


def test_quant_only_rank_only_and_identity_semantics():
    """Against independent references: the numpy/ml_dtypes format oracle and a float64 SVD."""
    W = torch.randn(48, 80, generator=gen(5))
    assert_bitwise(fake_quantize_weight(W, SvdqConfig(0, "nvfp4", 16)), fake_quantize_ref(W, "nvfp4", 16), "quant-only")
    ref16 = truncated_svd64(W, 16)
    rank_only = fake_quantize_weight(W, SvdqConfig(16, "none", None))
    assert rank_only.dtype == torch.float32
    assert (rank_only.double() - ref16).norm() <= 1e-6 * ref16.norm()
    assert torch.equal(fake_quantize_weight(W, SvdqConfig(0, "none", None)), W)
    # W~ = L + Q(W - L): the residual of the branch actually used, quantized by the oracle
    lr = LowRank(W, 16)
    branch = lr.product(8)
    assert (branch.double() - truncated_svd64(W, 8)).norm() <= 1e-6 * W.norm()
    got = fake_quantize_weight(W, SvdqConfig(8, "int4", 32), lowrank=lr)
    want = branch.double().numpy() + fake_quantize_ref(W - branch, "int4", 32)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-6 * W.abs().max().item())
    # without a shared decomposition the result is the same (one built from W itself)
    assert torch.equal(fake_quantize_weight(W, SvdqConfig(8, "int4", 32)),
                       fake_quantize_weight(W, SvdqConfig(8, "int4", 32), lowrank=LowRank(W, 8)))


def test_rank_above_min_dim_is_the_full_decomposition():
    W = torch.randn(10, 40, generator=gen(6))
    out = fake_quantize_weight(W, SvdqConfig(64, "nvfp4", 16))
    torch.testing.assert_close(out, W, atol=1e-5, rtol=0)


def test_smooth_factor_multiplies_the_input_dim_first():
    W = torch.randn(24, 64, generator=gen(7))
    s = torch.rand(64, generator=gen(8)) + 0.5
    for cfg in (SvdqConfig(4, "nvfp4", 16), SvdqConfig(0, "int4", 32), SvdqConfig(4, "none", None)):
        assert torch.equal(fake_quantize_weight(W, cfg, smooth=s), fake_quantize_weight(W * s[None, :], cfg))
    lr = LowRank(W * s, 4)
    assert torch.equal(fake_quantize_weight(W, SvdqConfig(4, "fp4", 16), lowrank=lr, smooth=s),
                       fake_quantize_weight(W * s, SvdqConfig(4, "fp4", 16)))


def test_half_precision_weights_are_accepted():
    W = torch.randn(32, 64, generator=gen(9)).bfloat16()
    out = fake_quantize_weight(W, SvdqConfig(4, "nvfp4", 16))
    assert out.dtype == torch.float32
    assert torch.equal(out, fake_quantize_weight(W.float(), SvdqConfig(4, "nvfp4", 16)))


def test_operator_errors():
    W = torch.randn(16, 32)
    with pytest.raises(ValueError):
        fake_quantize_weight(W, SvdqConfig(8, "nvfp4", 16), lowrank=LowRank(W, 4))
    with pytest.raises(HarnessError, match="nvfp4@0"):
        fake_quantize_weight(W, SvdqConfig(4, "nvfp4", 0))
    bad = W.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(HarnessError, match="q_proj weight has NaN/Inf"):
        fake_quantize_weight(bad, SvdqConfig(4, "nvfp4", 16), name="model.layers.0.self_attn.q_proj weight")
    with pytest.raises(HarnessError, match="smooth factor has NaN/Inf"):
        fake_quantize_weight(W, SvdqConfig(4, "nvfp4", 16), smooth=torch.full((32,), float("inf")))


@pytest.mark.cuda
def test_operator_on_cuda_stays_on_device_and_matches_cpu():
    W = decaying(128, 256)
    cfg = SvdqConfig(16, "nvfp4", 16)
    gpu = fake_quantize_weight(W.cuda(), cfg, lowrank=LowRank(W.cuda(), 16, dtype=torch.float64))
    cpu = fake_quantize_weight(W, cfg, lowrank=LowRank(W, 16, dtype=torch.float64))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-6, rtol=0)
    # quant-only on the device is the oracle's, bit for bit
    assert_bitwise(fake_quantize_weight(W.cuda(), SvdqConfig(0, "nvfp4", 16)), fake_quantize_ref(W, "nvfp4", 16),
                   "cuda quant-only")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(256, 512), (512, 256), (96, 96)])
def test_lowrank_on_cuda_matches_float64_svd(shape):
    """LowRank computed on the GPU (float64 Gram eigh there), stored float32 or float64: its
    rank-r products are the float64 SVD's within 1e-6 relative (at a spectral gap)."""
    W = decaying(*shape, ratio=0.9, seed=11)
    for dtype in (torch.float32, torch.float64):
        lr = LowRank(W.cuda(), 64, dtype=dtype)
        assert lr.L1.device.type == "cuda" and lr.L1.dtype == dtype
        S = torch.linalg.svdvals(W.double())
        torch.testing.assert_close(lr.S.cpu().double(), S[:64], rtol=1e-6, atol=0)
        for r in (1, 8, 32, 64):
            ref = truncated_svd64(W, r)
            assert (lr.product(r).cpu().double() - ref).norm() <= 1e-6 * ref.norm(), (dtype, r)


# ----------------------------------------------------------------------------- fake_op


def tiny_llama(dtype=torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


ALLOWED_SUFFIXES = tuple(f"{blk}.{p}.weight" for blk, ps in
                         (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                          ("mlp", ("gate_proj", "up_proj", "down_proj"))) for p in ps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_op_changes_exactly_the_allowlisted_linears(dtype):
    """Quant-only: every allowlisted weight is the format oracle's, bit for bit, in its dtype."""
    model = tiny_llama(dtype)
    model.model.layers[0].mlp.up_proj.register_buffer("smooth_factor", torch.rand(64) + 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fake_op(model, SvdqConfig(0, "nvfp4", 16))
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    expected = sorted(k for k in before if k.endswith(ALLOWED_SUFFIXES))
    assert len(expected) == 14 and changed == expected
    for k in expected:
        want = torch.from_numpy(fake_quantize_ref(before[k], "nvfp4", 16)).to(dtype)
        assert after[k].dtype == dtype and torch.equal(after[k], want), k


def test_fake_op_low_rank_branch_is_the_float64_svd():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(ALLOWED_SUFFIXES)}
    fake_op(model, SvdqConfig(8, "none", None))
    for k, w in before.items():
        ref = truncated_svd64(w, 8)
        assert (model.state_dict()[k].double() - ref).norm() <= 1e-6 * w.norm(), k


def test_fake_op_accepts_a_key_or_mapping_and_runs_the_model():
    ref, by_key, by_map = tiny_llama(), tiny_llama(), tiny_llama()
    fake_op(ref, SvdqConfig(8, "int4", 32))
    fake_op(by_key, "rank=8;fmt=int4;blk=32")
    fake_op(by_map, {"rank": 8, "fmt": "int4", "blk": 32})
    for m in (by_key, by_map):
        for (k, a), b in zip(ref.state_dict().items(), m.state_dict().values()):
            assert torch.equal(a, b), k
    logits = ref(torch.arange(10)[None]).logits
    assert torch.isfinite(logits).all()


def test_fake_op_names_the_module_with_nan_weights():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(HarnessError, match=r"model\.layers\.1\.mlp\.down_proj weight has NaN/Inf"):
        fake_op(model, SvdqConfig(4, "nvfp4", 16))
