"""Formats against independent oracles.

* tests/oracles.py's `fake_quantize_ref`: every recipe in numpy float64 with ml_dtypes casts,
  written from formats.py's docstring (see that module for why it is bit-exact).
* The element grids: every bit pattern of the ml_dtypes type, enumerated.
* torchao's own NVFP4 and MXFP4 casts, when torchao is installed: equal to ours everywhere
  except the two places formats.py's docstring names (pinned by the tests below).
"""

from __future__ import annotations

import inspect
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.oracles import (
    E2M1,
    E4M3,
    E8M0,
    assert_bitwise,
    cast,
    fake_quantize_ref,
    grid_of,
    mx_exponent,
    nvfp4_total_scale,
)
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.numerics import formats

ALL_FMTS = sorted(formats.FORMATS)


# ----------------------------------------------------------------------------- the oracle


def assert_matches_oracle(x: np.ndarray, fmt, blk, dtype=torch.float32):
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(dtype)
    got = formats.fake_quantize(t, fmt, blk)
    assert_bitwise(got, fake_quantize_ref(t.float(), fmt, blk), f"{fmt}@{blk} shape {tuple(x.shape)}", t.float())


# ----------------------------------------------------------------------------- inputs


def make_input(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if kind == "outliers":
        idx = rng.integers(0, x.size, size=max(1, x.size // 50))
        x.flat[idx] *= 100.0
    elif kind == "zeros":  # sprinkled zeros, an all-zero row, an all-zero first block
        x[rng.random(x.shape) < 0.2] = 0.0
        x[0] = 0.0
        if rows > 1:
            x[1, : min(cols, 16)] = 0.0
    elif kind == "huge":
        x *= np.float32(1e30)
    elif kind == "tiny":
        x *= np.float32(1e-30)
    elif kind == "spread":  # rows 10 orders of magnitude apart: tiny blocks vs the global amax
        x *= (10.0 ** np.linspace(-6, 4, rows)).astype(np.float32)[:, None]
    elif kind == "ties":
        # Even rows: exact E2M1 ties once the scale is 1 (amax 6). Odd rows: integer ties for
        # int4_asym with scale 1 (range [-6.5, 8.5]), including its zero point -lo/s = 6.5.
        e2m1_ties = np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -2.5, -5, -6])
        int_ties = np.array([-6.5, 8.5, 0.5, 1.5, 2.5, -0.5, -3.5, 4.5])
        for r in range(rows):
            x[r] = np.resize(e2m1_ties if r % 2 == 0 else int_ties, cols)
    return x


KINDS = ["normal", "outliers", "zeros", "huge", "tiny", "spread", "ties"]
SHAPES_BLKS = [((7, 37), 16), ((5, 64), 32), ((3, 100), 7), ((4, 48), "in"), ((6, 33), 1), ((2, 130), 128)]


# ----------------------------------------------------------------------------- oracle sanity


def test_oracle_casts_round_half_to_even():
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert cast(ties, E2M1).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    # E4M3 around 1: spacing 1/8; 1 + 1/16 ties to 1, 1 + 3/16 ties to 1.25.
    assert cast([1.0625, 1.1875, 2.0**-9 * 0.5, 2.0**-9 * 1.5], E4M3).tolist() == [1.0, 1.25, 0.0, 2.0**-8]


def test_e2m1_cast_matches_ml_dtypes_on_a_dense_sweep():
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    near = np.concatenate([np.nextafter(mids, np.float32(0)), mids, np.nextafter(mids, np.float32(9))])
    v = np.concatenate([np.linspace(-7, 7, 28001), near, -near, [6.0, -6.0, 1e30, -1e30, 0.0]]).astype(np.float32)
    got = formats.round_to_e2m1(torch.from_numpy(v)).numpy()
    assert np.array_equal(got, cast(np.clip(v, -6, 6), E2M1))


def test_e4m3_cast_matches_ml_dtypes_including_subnormals():
    v = np.concatenate([np.linspace(-460, 460, 20001), np.linspace(-2.0**-5, 2.0**-5, 4001)]).astype(np.float32)
    got = formats.round_to_e4m3(torch.from_numpy(v)).numpy()
    assert np.array_equal(got, cast(np.clip(v, -448, 448), E4M3))


# ----------------------------------------------------------------------------- bit for bit


@pytest.mark.parametrize("fmt", ALL_FMTS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_oracle(fmt, kind):
    rng = np.random.default_rng(zlib.crc32(f"{fmt}-{kind}".encode()))
    for shape, blk in SHAPES_BLKS:
        assert_matches_oracle(make_input(rng, *shape, kind), fmt, blk)


@pytest.mark.parametrize("fmt", ALL_FMTS)
def test_default_blocks_on_a_larger_matrix(fmt):
    rng = np.random.default_rng(7)
    x = make_input(rng, 64, 256, "outliers")
    assert_matches_oracle(x, fmt, formats.FORMATS[fmt].default_blk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ALL_FMTS)
def test_half_precision_inputs_match_oracle(fmt, dtype):
    rng = np.random.default_rng(11)
    assert_matches_oracle(make_input(rng, 9, 45, "outliers"), fmt, 16, dtype=dtype)


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(ALL_FMTS),
    rows=st.integers(1, 6),
    cols=st.integers(1, 70),
    blk=st.sampled_from([1, 2, 3, 7, 16, 32, "in"]),
    log_mag=st.integers(-35, 35),
    zero_frac=st.sampled_from([0.0, 0.3, 0.9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_oracle(fmt, rows, cols, blk, log_mag, zero_frac, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-2, 2, (rows, cols))
    x[rng.random(x.shape) < zero_frac] = 0.0
    assert_matches_oracle((x * 10.0**log_mag).astype(np.float32), fmt, blk)


# ----------------------------------------------------------------------------- grid and scales

# Each format's element grid, from an independent source: every bit pattern of the ml_dtypes
# type, or the integer range the format's definition names.
GRIDS = {
    "nvfp4": grid_of(E2M1), "mxfp4": grid_of(E2M1), "fp4": grid_of(E2M1), "fp8": grid_of(E4M3),
    "int4": np.arange(-7.0, 8.0), "int8": np.arange(-127.0, 128.0), "int4_asym": np.arange(0.0, 16.0),
}


def test_oracle_grids_are_the_enumerated_types():
    assert grid_of(E2M1).tolist() == sorted({s * m for m in (0, 0.5, 1, 1.5, 2, 3, 4, 6) for s in (1, -1)})
    e4m3 = grid_of(E4M3)
    assert len(e4m3) == 253 and e4m3.max() == 448.0 and e4m3[e4m3 > 0].min() == 2.0**-9


@pytest.mark.parametrize("fmt", ALL_FMTS)
def test_registry_grid_is_the_enumerated_grid(fmt):
    """FormatSpec.elem_values (what reports and kernels read) equals the type's real grid."""
    assert np.array_equal(np.asarray(formats.FORMATS[fmt].elem_values), GRIDS[fmt])


@pytest.mark.parametrize("fmt", ALL_FMTS)
def test_every_grid_value_is_reached_and_nothing_else(fmt):
    """The grid itself plus a dense sweep over its range, one block (scale ~1): the codes are
    exactly the grid, every value reached, nothing off it."""
    grid = GRIDS[fmt]
    sweep = np.linspace(grid.min(), grid.max(), 20 * len(grid) + 1)
    row = np.concatenate([grid, sweep]).astype(np.float32)
    qb = formats.quantize_blocks(torch.from_numpy(row[None]), fmt, "in")
    codes = np.unique(qb.codes.numpy().astype(np.float64) + 0.0)
    assert np.array_equal(codes, grid), sorted(set(codes.tolist()) ^ set(grid.tolist()))


@pytest.mark.parametrize("fmt", ALL_FMTS)
@pytest.mark.parametrize("blk", [16, 5, "in"])
def test_codes_on_grid_scales_in_their_type_dequantize_is_the_oracle(fmt, blk):
    rng = np.random.default_rng(3)
    w = torch.from_numpy(make_input(rng, 11, 50, "spread"))
    qb = formats.quantize_blocks(w, fmt, blk)
    codes = np.unique(qb.codes.numpy().astype(np.float64))
    assert np.isin(codes, GRIDS[fmt]).all(), codes[~np.isin(codes, GRIDS[fmt])]
    assert_bitwise(qb.dequantize(), fake_quantize_ref(w, fmt, blk), f"{fmt}@{blk} dequantize")
    scale = qb.scale.numpy().astype(np.float64)
    assert np.all(scale > 0)
    storage = formats.FORMATS[fmt].scale
    if storage == "e4m3":
        assert np.array_equal(cast(scale, E4M3), scale)
        assert scale.min() >= 2.0**-6 and scale.max() <= 448.0
        assert qb.global_scale is not None and qb.global_scale.numel() == 1
    elif storage == "e8m0":
        assert np.array_equal(cast(scale, E8M0), scale)
        amax = np.abs(w.numpy().astype(np.float64))
        # the stored power of two is the OCP rule's, block by block (rows x blocks)
        size = 50 if blk == "in" else blk
        want = [[2.0 ** mx_exponent(np.array([amax[r, c:c + size].max()]))[0] for c in range(0, 50, size)]
                for r in range(11)]
        assert np.array_equal(scale[..., 0], np.array(want))
    if fmt == "int4_asym":
        assert np.isin(qb.zero.numpy(), GRIDS[fmt]).all()


def test_spec_default_blocks():
    """NVFP4: 16 elements per E4M3 scale; OCP MX v1.0: k = 32 -- and torchao's defaults agree."""
    from tokenwise_harness.grid import parse_qspec

    want = {"nvfp4": 16, "mxfp4": 32}
    try:
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
    except ImportError:
        pass
    else:
        assert inspect.signature(NVFP4Tensor.to_nvfp4).parameters["block_size"].default == want["nvfp4"]
        assert inspect.signature(MXTensor.to_mx).parameters["block_size"].default == want["mxfp4"]
    for fmt, blk in want.items():
        assert parse_qspec(fmt).blk == blk
        assert_matches_oracle(make_input(np.random.default_rng(2), 4, 64, "normal"), fmt, parse_qspec(fmt).blk)


def test_nvfp4_global_scale_formula():
    w = torch.tensor([[3.0, -1.0, 0.5, 2.0] * 4, [0.1] * 16])
    qb = formats.quantize_blocks(w, "nvfp4", 16)
    assert qb.global_scale.item() == np.float32(3.0) / np.float32(2688.0)
    # The block holding the tensor amax gets the top E4M3 scale.
    assert qb.scale[0, 0, 0].item() == 448.0


@pytest.mark.parametrize("global_amax", [1.0, 0.37, 3.0, 50.0])
def test_nvfp4_fixed_global_amax_matches_oracle(global_amax):
    """A fixed global amax (calibrated activations): values above it saturate."""
    w = torch.from_numpy(make_input(np.random.default_rng(4), 6, 48, "outliers"))
    got = formats.fake_quantize(w, "nvfp4", 16, global_amax=global_amax)
    assert_bitwise(got, fake_quantize_ref(w, "nvfp4", 16, global_amax=global_amax), f"global_amax={global_amax}")
    if global_amax < w.abs().max().item():
        assert got.abs().max().item() <= global_amax * (1 + 2.0**-3)  # saturated near 6 * 448 * pts


def test_nvfp4_follows_torchao_rounding_order_not_modelopt():
    """Where torchao's (amax_blk / 6) / global and ModelOpt's amax_blk / (6 * global) round to
    the two sides of an E4M3 tie, we take torchao's side (found by search, see the report)."""
    amax_t, amax_b = np.float32(5.2772126), np.float32(0.0046013645)
    w = torch.zeros(2, 16)
    w[0, 0], w[1, 0] = float(amax_t), float(amax_b)
    qb = formats.quantize_blocks(w, "nvfp4", 16)
    pts = np.float32(amax_t / np.float32(2688.0))
    torchao = np.float32(np.float32(amax_b / np.float32(6.0)) / pts)
    modelopt = np.float32(amax_b / np.float32(np.float32(6.0) * pts))
    assert cast(torchao, E4M3) == 0.40625 and cast(modelopt, E4M3) == 0.375
    assert qb.scale[1, 0, 0].item() == 0.40625
    assert_matches_oracle(w.numpy(), "nvfp4", 16)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("fmt", ALL_FMTS)
def test_zero_tensor_and_zero_blocks_give_zeros(fmt):
    z = formats.fake_quantize(torch.zeros(3, 40), fmt, 16)
    assert torch.equal(z, torch.zeros(3, 40))
    w = torch.randn(2, 48)
    w[1, 16:32] = 0
    out = formats.fake_quantize(w, fmt, 16)
    assert torch.isfinite(out).all() and torch.equal(out[1, 16:32], torch.zeros(16))


@pytest.mark.parametrize("fmt", ALL_FMTS)
def test_ragged_blocks_never_mix_rows(fmt):
    """Each row alone is its own oracle (nvfp4 aside: its global scale is per tensor)."""
    w = torch.from_numpy(make_input(np.random.default_rng(8), 4, 37, "normal"))
    w[2] *= 1000.0
    out = formats.fake_quantize(w, fmt, 16)
    assert out.shape == w.shape and out.dtype == torch.float32
    for r in range(4):
        want = fake_quantize_ref(w[r : r + 1], fmt, 16)
        if fmt != "nvfp4":
            assert_bitwise(out[r : r + 1], want, f"{fmt} row {r}")


@pytest.mark.parametrize("fmt", ALL_FMTS)
def test_blk_larger_than_cols_is_one_block_per_row(fmt):
    w = torch.from_numpy(make_input(np.random.default_rng(9), 5, 20, "outliers"))
    for blk in (64, 20, "in"):
        assert_bitwise(formats.fake_quantize(w, fmt, blk), fake_quantize_ref(w, fmt, "in"), f"{fmt}@{blk}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt", ["nvfp4", "int8"])
def test_nan_inf_raise_naming_the_tensor(fmt, bad):
    w = torch.randn(4, 32)
    w[2, 5] = bad
    name = "model.layers.0.mlp.up_proj weight"
    with pytest.raises(HarnessError, match=r"model\.layers\.0\.mlp\.up_proj weight has NaN/Inf"):
        formats.fake_quantize(w, fmt, 16, name=name)
    with pytest.raises(HarnessError, match="NaN/Inf"):
        formats.fake_quantize(w.bfloat16(), fmt, 16, name=name)


@pytest.mark.parametrize("fmt,blk", [("nvfp5", 16), ("nvfp4", 0), ("nvfp4", -16), ("int4", "row"),
                                     ("fp4", 1.5), ("fp8", True), ("none", 16)])
def test_bad_qspec_is_a_one_line_error_naming_it(fmt, blk):
    with pytest.raises(HarnessError) as err:
        formats.fake_quantize(torch.randn(2, 16), fmt, blk)
    msg = str(err.value)
    assert f"{fmt}@{blk}" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- idempotence

# What each format guarantees when a quantized tensor is quantized again:
#  - mxfp4: bit-exact. The scale is a power of two read off amax's exponent, and the
#    requantized amax (4 or 6 times the same scale) has the same exponent.
#  - fp4, int4, int8, fp8, nvfp4: the codes are stable, but the scale is recomputed from the
#    dequantized amax (e.g. fl(fl(6*s)/6)), which can move it by an ulp, and nvfp4's global
#    scale likewise; so values agree to float32 rounding (rel 1e-6), not bit for bit.
#  - int4_asym: not guaranteed: a round-half-to-even tie in the zero point can shrink the
#    used range (15 -> 14 levels) and change the scale on the second pass.
IDEMPOTENT_EXACT = ["mxfp4"]
IDEMPOTENT_CODES = ["fp4", "int4", "int8", "fp8", "nvfp4"]


@pytest.mark.parametrize("fmt", IDEMPOTENT_EXACT)
@pytest.mark.parametrize("kind", ["normal", "outliers", "zeros", "huge", "tiny", "spread"])
def test_idempotent_bit_exact(fmt, kind):
    w = torch.from_numpy(make_input(np.random.default_rng(5), 8, 70, kind))
    once = formats.fake_quantize(w, fmt, 16)
    assert torch.equal(formats.fake_quantize(once, fmt, 16), once)


@pytest.mark.parametrize("fmt", IDEMPOTENT_CODES)
@pytest.mark.parametrize("kind", ["normal", "outliers", "zeros", "huge", "tiny"])
def test_idempotent_to_rounding(fmt, kind):
    w = torch.from_numpy(make_input(np.random.default_rng(5), 8, 70, kind))
    once = formats.quantize_blocks(w, fmt, 16)
    twice = formats.quantize_blocks(once.dequantize(), fmt, 16)
    assert torch.equal(twice.codes, once.codes)
    torch.testing.assert_close(twice.dequantize(), once.dequantize(), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- torchao's casts
# torchao's own NVFP4 / MXFP4 casts (torchao.prototype.mx_formats), when torchao is installed.
# formats.py's docstring says where they differ from ours; these tests pin exactly that.


def _torchao():
    torchao = pytest.importorskip("torchao")
    if tuple(int(p) for p in torchao.__version__.split(".")[:2]) < (0, 12):
        pytest.skip(f"torchao {torchao.__version__} is older than the test extra's 0.12")
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    return NVFP4Tensor, MXTensor, per_tensor_amax_to_scale


def torchao_nvfp4(x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """torchao's two-level NVFP4 cast with the dynamic per-tensor scale, dequantized to fp32."""
    NVFP4Tensor, _, per_tensor_amax_to_scale = _torchao()
    pts = per_tensor_amax_to_scale(x.float().abs().amax())
    t = NVFP4Tensor.to_nvfp4(x.contiguous(), block_size=16, per_tensor_scale=pts)
    return t.dequantize(torch.float32), t


def torchao_mxfp4(x: torch.Tensor, blk: int = 32) -> tuple[torch.Tensor, object]:
    """torchao's MXFP4 cast (default ScaleCalculationMode.FLOOR), dequantized to fp32."""
    _, MXTensor, _ = _torchao()
    t = MXTensor.to_mx(x.contiguous(), torch.float4_e2m1fn_x2, block_size=blk)
    return t.dequantize(torch.float32), t


# torchao needs the last dim to be a multiple of the block: awkward row counts, widths that are
# odd multiples of the block, a single block. (An all-zero tensor, the one deliberate nvfp4
# deviation, has its own test below; "zeros" inputs here have zero rows and blocks, not all.)
TORCHAO_SHAPES = [(2, 32), (7, 96), (33, 160), (3, 512), (64, 64)]
TORCHAO_KINDS = ["normal", "outliers", "zeros", "huge", "spread"]


def tie_input(rng: np.random.Generator, rows: int) -> np.ndarray:
    """nvfp4 blocks whose elements sit exactly on E2M1 rounding midpoints of our total scale
    (and a float32 ulp either side): where a reciprocal multiply and a division can part."""
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = np.zeros((rows, 32), np.float32)
    x[:, 0] = np.float32(7.3) * rng.uniform(0.01, 1.0, rows).astype(np.float32)
    x[:, 16] = x[:, 0] * np.float32(0.6)
    x[0, 0] = 7.3
    total = nvfp4_total_scale(x)  # [rows, 2], from the oracle's recipe
    for r in range(rows):
        for b in range(2):
            m = rng.choice(mids, 15) * rng.choice([-1.0, 1.0], 15)
            v = (m * total[r, b]).astype(np.float32)
            nudge = rng.choice([-1, 0, 0, 0, 1], 15)
            v = np.where(nudge > 0, np.nextafter(v, np.float32(np.inf)), v)
            v = np.where(nudge < 0, np.nextafter(v, np.float32(-np.inf)), v)
            x[r, 16 * b + 1 : 16 * b + 16] = v
    return x


def test_nvfp4_midpoints_of_the_total_scale_match_oracle():
    """Elements exactly on E2M1 midpoints of a non-trivial total scale (and an ulp off): the
    order of the last division matters here, and only here (no torchao needed)."""
    assert_matches_oracle(tie_input(np.random.default_rng(17), 64), "nvfp4", 16)


@pytest.mark.parametrize("kind", TORCHAO_KINDS)
def test_nvfp4_scales_equal_torchao(kind):
    """Same per-tensor scale and same E4M3 block scales as torchao, bit for bit."""
    rng = np.random.default_rng(zlib.crc32(f"ao-scales-{kind}".encode()))
    for shape in TORCHAO_SHAPES:
        x = torch.from_numpy(make_input(rng, *shape, kind))
        _, t = torchao_nvfp4(x)
        qb = formats.quantize_blocks(x, "nvfp4", 16)
        assert t.per_tensor_scale.item() == qb.global_scale.item(), shape
        assert torch.equal(t.scale.view(shape[0], -1).float(), qb.scale[..., 0]), shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", TORCHAO_KINDS + ["ties"])
def test_nvfp4_equals_torchao_except_where_the_reciprocal_crosses_a_midpoint(kind, dtype):
    """torchao (after pytorch/ao #4031) scales by x * fl(fl(1/pts) / s); we divide, x / fl(pts*s).
    The two scaled values are a few float32 ulps apart, so the E2M1 codes differ exactly where
    they fall on two sides of a rounding midpoint (or one lands on it): predicted here in float64
    from each library's order of operations, then checked element by element."""
    from tests.oracles import torchao_nvfp4_scaled

    rng = np.random.default_rng(zlib.crc32(f"ao-nv-{kind}".encode()))
    shapes = [(48, 32)] if kind == "ties" else TORCHAO_SHAPES
    differing = 0
    for shape in shapes:
        raw = tie_input(rng, shape[0]) if kind == "ties" else make_input(rng, *shape, kind)
        x = torch.from_numpy(raw).to(dtype)
        theirs, _ = torchao_nvfp4(x)
        ours = formats.fake_quantize(x, "nvfp4", 16)
        xs = x.float().numpy()
        s_ours, s_theirs = torchao_nvfp4_scaled(xs)
        q_ours, q_theirs = (cast(np.clip(v, -6, 6), E2M1) for v in (s_ours, s_theirs))
        predicted = q_ours != q_theirs
        observed = (ours != theirs).numpy()
        assert np.array_equal(observed, predicted), (shape, int(observed.sum()), int(predicted.sum()))
        if predicted.any():
            # one E2M1 step apart, and only next to a midpoint: |x/total - mid| within 4 ulps
            grid = grid_of(E2M1)
            step = np.abs(np.searchsorted(grid, q_ours[predicted]) - np.searchsorted(grid, q_theirs[predicted]))
            assert (step == 1).all()
            mids = (grid[:-1] + grid[1:]) / 2
            a = np.abs(s_ours[predicted])[:, None]
            assert (np.abs(a - np.abs(mids)[None]).min(axis=1) <= 4 * np.spacing(a[:, 0].astype(np.float32))).all()
        differing += int(predicted.sum())
        # everywhere else, torchao and the float64 oracle agree bit for bit
        assert_bitwise(theirs.masked_fill(torch.from_numpy(predicted), 0.0),
                       np.where(predicted, 0.0, fake_quantize_ref(xs, "nvfp4", 16)), f"torchao nvfp4 {shape}")
    if kind == "ties":
        assert differing > 100  # the difference is real, not hypothetical
    elif kind in ("normal", "outliers", "spread") and dtype == torch.float32:
        assert differing == 0  # random float32 data essentially never sits within ulps of a midpoint
    elif kind in ("normal", "outliers") and dtype == torch.bfloat16:
        # bf16 data (short mantissas: x / total is often exactly a midpoint) does, now and then
        assert 0 < differing < 0.002 * sum(r * c for r, c in shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", TORCHAO_KINDS + ["ties"])
def test_mxfp4_equals_torchao_bit_for_bit(kind, dtype):
    """MXFP4 divides by an exact power of two in both: no rounding-order difference exists."""
    rng = np.random.default_rng(zlib.crc32(f"ao-mx-{kind}".encode()))
    for shape in TORCHAO_SHAPES:
        x = torch.from_numpy(make_input(rng, *shape, kind)).to(dtype)
        theirs, t = torchao_mxfp4(x)
        assert torch.equal(formats.fake_quantize(x, "mxfp4", 32), theirs), shape
        qb = formats.quantize_blocks(x, "mxfp4", 32)
        assert torch.equal(t.scale.view(shape[0], -1).float(), qb.scale[..., 0]), shape


def test_mxfp4_differs_from_torchao_only_below_2_to_minus_124():
    """torchao clamps the fp32 scale it divides by to 2**-126 (the smallest normal) but
    dequantizes with the stored E8M0 scale 2**-127: blocks with 0 < amax < 2**-124 come back
    halved (their codes are computed at twice our scale). At 2**-124 and above: identical."""
    amax = np.array([2.0**-149, 2.0**-130, 2.0**-126, 1.5 * 2.0**-125, np.nextafter(2.0**-124, 0), 2.0**-124,
                     2.0**-123, 3.0 * 2.0**-120, 1.0], np.float32)
    rng = np.random.default_rng(21)
    x = (rng.uniform(-1, 1, (len(amax), 32)) * amax[:, None]).astype(np.float32)
    x[:, 0] = amax
    x = torch.from_numpy(x)
    theirs, _ = torchao_mxfp4(x)
    ours = formats.fake_quantize(x, "mxfp4", 32)
    assert_bitwise(ours, fake_quantize_ref(x, "mxfp4", 32), "ours")
    low = torch.from_numpy(amax < 2.0**-124)
    assert torch.equal(theirs[~low], ours[~low])
    # below: torchao's codes at scale 2**-126, times 2**-127 (the oracle at a doubled scale)
    codes = cast(np.clip(x[low].double().numpy() / 2.0**-126, -6, 6), E2M1)
    assert np.array_equal(theirs[low].double().numpy(), codes * 2.0**-127)
    assert not torch.equal(theirs[low], ours[low])


def test_all_zero_tensor_torchao_nan_ours_zero():
    """torchao's nvfp4 divides 0 by a zero per-tensor scale (NaN); ours returns zeros.
    mxfp4: both give zeros (E8M0 scale 2**-127)."""
    z = torch.zeros(4, 32)
    assert torch.isnan(torchao_nvfp4(z)[0]).all()
    assert torch.equal(formats.fake_quantize(z, "nvfp4", 16), z)
    assert torch.equal(torchao_mxfp4(z)[0], z) and torch.equal(formats.fake_quantize(z, "mxfp4", 32), z)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_torchao_propagates_ours_refuses(bad):
    """NaN/Inf: ours raises (HarnessError naming the tensor). torchao computes on: one NaN or
    Inf makes its nvfp4 per-tensor scale non-finite and the whole tensor NaN; mxfp4 poisons
    only its block (NaN: the whole block NaN; Inf: +-inf there, the block's finite values 0)."""
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    x[0, 3] = bad
    with pytest.raises(HarnessError, match="NaN/Inf"):
        formats.fake_quantize(x, "nvfp4", 16)
    with pytest.raises(HarnessError, match="NaN/Inf"):
        formats.fake_quantize(x, "mxfp4", 32)
    assert torch.isnan(torchao_nvfp4(x)[0]).all()
    mx, _ = torchao_mxfp4(x)
    assert torch.equal(mx[0, 32:], formats.fake_quantize(x[:, 32:], "mxfp4", 32)[0])  # other blocks intact
    assert torch.equal(mx[1], formats.fake_quantize(x[1:], "mxfp4", 32)[0])
    if bad != bad:  # NaN
        assert torch.isnan(mx[0, :32]).all()
    else:
        assert mx[0, 3].item() == float("inf") and (mx[0, :32].abs() == 0).sum() == 31


# ----------------------------------------------------------------------------- devices


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ALL_FMTS)
def test_cuda_matches_cpu_and_oracle_bit_for_bit(fmt):
    rng = np.random.default_rng(13)
    for kind in ["outliers", "zeros", "spread", "ties", "huge", "tiny"]:
        w = torch.from_numpy(make_input(rng, 33, 301, kind))
        for blk in (16, 32, 7, "in"):
            cpu = formats.fake_quantize(w, fmt, blk)
            gpu = formats.fake_quantize(w.cuda(), fmt, blk)
            assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
            assert torch.equal(gpu.cpu(), cpu), (fmt, kind, blk)
            assert_bitwise(gpu, fake_quantize_ref(w, fmt, blk), f"cuda {fmt}@{blk} {kind}")
        bf = formats.fake_quantize(w.cuda().bfloat16(), fmt, 16)
        assert torch.equal(bf.cpu(), formats.fake_quantize(w.bfloat16(), fmt, 16)), (fmt, kind, "bf16")


@pytest.mark.cuda
def test_cuda_nvfp4_fixed_global_amax_and_quantize_blocks_stay_on_device():
    w = torch.from_numpy(make_input(np.random.default_rng(14), 64, 128, "outliers"))
    gpu = formats.fake_quantize(w.cuda(), "nvfp4", 16, global_amax=torch.tensor(3.0, device="cuda"))
    assert torch.equal(gpu.cpu(), formats.fake_quantize(w, "nvfp4", 16, global_amax=3.0))
    qb = formats.quantize_blocks(w.cuda(), "mxfp4", 32)
    assert qb.codes.device.type == "cuda" and qb.scale.device.type == "cuda"
