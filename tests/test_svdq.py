"""The low-rank branch against torch.linalg.svd, the operator's semantics, and fake_op."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    W = torch.randn(48, 80, generator=gen(5))
    assert torch.equal(fake_quantize_weight(W, SvdqConfig(0, "nvfp4", 16)), formats.fake_quantize(W, "nvfp4", 16))
    lr = LowRank(W, 16)
    assert torch.equal(fake_quantize_weight(W, SvdqConfig(16, "none", None), lowrank=lr), lr.product(16))
    assert torch.equal(fake_quantize_weight(W, SvdqConfig(0, "none", None)), W)
    cfg = SvdqConfig(8, "int4", 32)
    want = lr.product(8) + formats.fake_quantize(W - lr.product(8), "int4", 32)
    assert torch.equal(fake_quantize_weight(W, cfg, lowrank=lr), want)
    assert torch.equal(fake_quantize_weight(W, cfg), fake_quantize_weight(W, cfg, lowrank=LowRank(W, 8)))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_operator_on_cuda_stays_on_device_and_matches_cpu():
    W = decaying(128, 256)
    cfg = SvdqConfig(16, "nvfp4", 16)
    gpu = fake_quantize_weight(W.cuda(), cfg, lowrank=LowRank(W.cuda(), 16, dtype=torch.float64))
    cpu = fake_quantize_weight(W, cfg, lowrank=LowRank(W, 16, dtype=torch.float64))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-6, rtol=0)


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
    model = tiny_llama(dtype)
    model.model.layers[0].mlp.up_proj.register_buffer("smooth_factor", torch.rand(64) + 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SvdqConfig(4, "nvfp4", 16)
    fake_op(model, cfg)
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    expected = sorted(k for k in before if k.endswith(ALLOWED_SUFFIXES))
    assert len(expected) == 14 and changed == expected
    for k in expected:
        want = fake_quantize_weight(before[k], cfg).to(dtype)
        assert after[k].dtype == dtype and torch.equal(after[k], want), k
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])


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
