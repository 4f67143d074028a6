"""Number formats: one registry of fake quantize-dequantize casts.

Layout (after torchao's mx_formats): the format *specs* (`FormatSpec`, `FORMATS`) are plain
constants; the *casts* are separate functions. Every format quantizes a 2-D tensor
`[rows, cols]` in blocks of `blk` consecutive elements along the last dim of each row (weights
`[out, in]`: per output channel along the input dim; activations `[tokens, in]`: per token,
with scales computed on the fly). `blk="in"` is one block per row. When `blk` does not divide
`cols` the last block of each row is short: rows are padded on the right with copies of their
own last element, which leaves every block statistic (amax, min, max) of the short block
unchanged, and the padding is cropped off again. Blocks never span two rows.

Recipes (all arithmetic in float32, in this order, round-half-to-even everywhere):

nvfp4 -- NVIDIA FP4: E2M1 elements, an FP8 E4M3 scale per block, one FP32 scale per tensor.
    torchao's two-level recipe with the dynamic per-tensor scale, in this order:
        global  = amax(|x|) / (448 * 6)                       # FP32 per-tensor scale
        s_blk   = e4m3(clamp((amax_blk / 6) / global, 2**-6, 448))
        total   = global * s_blk
        q       = e2m1(clamp(x / total, -6, 6))
        x~      = q * total
    The global scale maps the tensor's largest block scale onto E4M3's top (448), so the
    E4M3 block scales use their whole range. Subtleties kept from torchao: the block scale is
    clamped from below to E4M3's smallest *normal* (2**-6), so blocks whose amax is below
    amax_tensor / 28672 get a coarser scale than needed and E4M3 subnormal scales never
    occur; `clamp(.., 448)` also catches a 1-ulp overshoot of amax_blk == amax_tensor.
    NVIDIA ModelOpt's `NVFP4QTensor` is the same recipe except that it computes the block
    scale as `amax_blk / (6 * global)` (one fp32 rounding fewer, which can move a tie), has no
    lower clamp (subnormal E4M3 scales, zero scales set to 1.0). Where they differ we follow
    torchao. `global_amax=` lets a caller fix the per-tensor amax (calibrated activations);
    values above it saturate, as in torchao's static per-tensor mode.
mxfp4 -- OCP Microscaling v1.0 MXFP4: E2M1 elements, an E8M0 (power of two) scale per block:
        X  = 2 ** clamp(floor(log2(amax_blk)) - 2, -127, 127)   # 2 = emax of E2M1
        x~ = e2m1(clamp(x / X, -6, 6)) * X
    This is the spec's rule and torchao's default `ScaleCalculationMode.FLOOR` (whose bit
    extraction of the fp32 exponent gives the same X after the clamp); a zero block takes
    X = 2**-127 as in torchao. (ModelOpt's MXFP4QTensor rounds the exponent up instead:
    ceil(log2(amax / 6)); torchao calls that CEIL/RCEIL and does not default to it.)
fp4   -- E2M1 elements with a full-precision FP32 scale per block: s = amax_blk / 6,
        x~ = e2m1(clamp(x / s, -6, 6)) * s.
int4  -- symmetric: s = amax_blk / 7, x~ = clamp(round(x / s), -7, 7) * s. The restricted
        range [-7, 7] keeps zero exact and the grid symmetric; -8 is never produced.
int8  -- symmetric: s = amax_blk / 127, levels -127..127.
int4_asym -- asymmetric with a zero point: lo = min(min_blk, 0), hi = max(max_blk, 0),
        s = (hi - lo) / 15, z = round(-lo / s), q = clamp(round(x / s) + z, 0, 15),
        x~ = (q - z) * s. Extending the range to include 0 (as GPTQ and PyTorch's observers
        do) keeps zero exact and gives constant blocks a usable scale.
fp8   -- E4M3 elements (saturating, subnormals kept) with an FP32 scale s = amax_blk / 448.

Devices: every division is a true IEEE float32 division on CPU and CUDA alike, so results
are bit-identical across devices (a baseline taken on a GPU holds on a CPU). torchao's code
divides by Python scalars (`max_abs / 6.0`, `amax / (448 * 6)`), which PyTorch's CUDA kernel
evaluates as a multiplication by the float32 reciprocal: torchao's own outputs then differ by
an ulp of the global scale between CPU and CUDA. Our scales equal torchao's on the CPU (= the
IEEE reading).

How this relates to torchao (torchao.prototype.mx_formats, checked against 0.18.0 by
tests/test_formats.py whenever torchao is installed; it is in the `test` extra):
  nvfp4 vs `NVFP4Tensor.to_nvfp4(x, 16, per_tensor_scale=per_tensor_amax_to_scale(amax|x|))
    .dequantize(torch.float32)`: the per-tensor scale and every E4M3 block scale are equal bit
    for bit, and so is dequantization (codes * (global * s_blk), in that order). The element
    step is not: since pytorch/ao #4031 torchao multiplies by a reciprocal, to match the MSLK
    Triton kernel, `x * ((1 / global) / s_blk)`, where we divide, `x / (global * s_blk)`. The
    two scaled values are a few float32 ulps apart, so the E2M1 codes differ exactly where the
    two values fall on opposite sides of an E2M1 rounding midpoint (0.25, 0.75, ..., 5), or
    one of them sits on it: there they are one E2M1 step apart. Random float32 data almost
    never comes within ulps of a midpoint (0 of the tests' 58,240 elements). bfloat16 data
    does, now and then: x, amax and the E4M3 scale all have short mantissas, so x / total is
    often a ratio of small integers, exactly a midpoint (19 of 58,240 elements differ in the
    tests, ~0.03%; real bf16 checkpoints are in this case). Values placed on midpoints of the
    total scale (synthetic or re-quantized data) differ far more often (~10%). We keep the
    division: it is the recipe read as IEEE arithmetic (ties to even, where torchao's side of
    a tie depends on the reciprocal's rounding), identical on CPU and CUDA, and it keeps
    existing baselines valid.
  mxfp4 vs `MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32).dequantize(torch.float32)`: equal
    bit for bit (codes, E8M0 scales, values), except blocks with 0 < amax < 2**-124: torchao
    clamps the float32 scale it divides by to 2**-126 (float32's smallest normal, for Triton)
    but dequantizes with the stored E8M0 scale 2**-127, so such blocks come back at about half
    their value; we use 2**-127 both ways.
  Zeros, NaN, Inf: an all-zero tensor gives zeros here (global scale 1) where torchao's nvfp4
    divides 0 by 0 and returns NaN (both libraries give zeros for mxfp4 and for zero blocks of
    a non-zero tensor). NaN/Inf input raises a HarnessError here; torchao computes on: its
    nvfp4 per-tensor scale becomes non-finite and the whole tensor NaN; its mxfp4 block
    holding a NaN is all NaN, one holding an Inf is +-inf there and 0 elsewhere.
  torchao needs cols % blk == 0 (and blk 16 for nvfp4); we pad short last blocks (above).

Zero blocks: a block whose fp32 scale is 0 (all zeros, or an amax so small that amax / 6
underflows) uses scale 1 instead; its elements then quantize to 0. Output is float32, same
shape and device as the input; NaN or Inf in the input is a HarnessError naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenwise_harness.errors import HarnessError

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6  # torch.finfo(torch.float8_e4m3fn).tiny; torchao's E4M3_EPS
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
E2M1_EMAX = 2  # exponent of E2M1's largest power of two (4 = 2**2); OCP MX "emax_elem"


def _e2m1_values() -> tuple[float, ...]:
    mags = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    return tuple(sorted({s * m for m in mags for s in (1.0, -1.0)}))


def _e4m3_values() -> tuple[float, ...]:
    """Every finite float8_e4m3fn value, read off its 256 bit patterns."""
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals)]
    return tuple(sorted(set(vals.tolist())))


def _int_values(lo: int, hi: int) -> tuple[float, ...]:
    return tuple(float(v) for v in range(lo, hi + 1))


@dataclass(frozen=True)
class FormatSpec:
    """What a format is: element grid, scale storage, default block. No code here."""

    name: str
    default_blk: int | str  # a positive int, or "in" (one block per row)
    description: str
    elem: str  # element type: "e2m1", "e4m3", "int"
    elem_values: tuple[float, ...]  # every value an element (code) can take, ascending
    scale: str  # how a block scale is stored: "e4m3" (x fp32 tensor scale), "e8m0", "fp32"


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("nvfp4", 16, "NVIDIA FP4: E2M1, E4M3 block scale, FP32 tensor scale (torchao recipe)",
                   "e2m1", _e2m1_values(), "e4m3"),
        FormatSpec("mxfp4", 32, "OCP MX FP4: E2M1, E8M0 power-of-two block scale (floor rule)",
                   "e2m1", _e2m1_values(), "e8m0"),
        # fp4 defaults to 16 like nvfp4, so fp4 vs nvfp4 isolates the cost of the E4M3 scale.
        FormatSpec("fp4", 16, "E2M1 with an FP32 scale amax/6 per block",
                   "e2m1", _e2m1_values(), "fp32"),
        # 128: the usual group size of int4 weight-only recipes (AWQ, GPTQ).
        FormatSpec("int4", 128, "symmetric int4, levels -7..7, FP32 scale amax/7",
                   "int", _int_values(-7, 7), "fp32"),
        FormatSpec("int4_asym", 128, "asymmetric int4, levels 0..15 with a zero point, FP32 scale",
                   "int", _int_values(0, 15), "fp32"),
        # int8 / fp8 default to per-channel (per-token for activations): their usual granularity.
        FormatSpec("int8", "in", "symmetric int8, levels -127..127, FP32 scale amax/127",
                   "int", _int_values(-127, 127), "fp32"),
        FormatSpec("fp8", "in", "FP8 E4M3 elements with an FP32 scale amax/448",
                   "e4m3", _e4m3_values(), "fp32"),
    )
}


# ----------------------------------------------------------------------------- element casts


_E2M1_TABLES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per device


def _e2m1_rounding_table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid, boundaries) such that grid[bucketize(v, boundaries)] is v rounded to E2M1.

    The boundaries are the midpoints of neighbouring grid values. A value exactly on a
    midpoint must go to the neighbour with the even mantissa (round half to even): where that
    is the upper one, the boundary is moved down by one float32 ulp, since bucketize sends
    x == boundary to the lower bucket. Beyond the outer grid values the table saturates at +-6.
    """
    key = str(device)
    if key not in _E2M1_TABLES:
        grid = torch.tensor(sorted(set(_e2m1_values())), dtype=torch.float32)
        even = {0.0, 1.0, 2.0, 4.0}  # |value| with mantissa bit 0: codes 0, 2, 4, 6
        mids = (grid[:-1] + grid[1:]) / 2
        upper_even = torch.tensor([abs(h) in even for h in grid[1:].tolist()])
        bounds = torch.where(upper_even, torch.nextafter(mids, torch.tensor(-float("inf"))), mids)
        _E2M1_TABLES[key] = (grid.to(device), bounds.to(device))
    return _E2M1_TABLES[key]


def round_to_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Saturating round-half-to-even cast of float32 `v` to E2M1, as float32 values.

    Two memory passes (a bucketize and a table lookup), where arithmetic rounding takes ten.
    A negative value that rounds to zero gives +0.
    """
    grid, bounds = _e2m1_rounding_table(v.device)
    return grid[torch.bucketize(v, bounds, out_int32=True)]


def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Saturating round-half-to-even cast to FP8 E4M3 (subnormals kept), as float32 values."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def pow2_floor_exponent(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for a > 0, exactly (frexp reads the exponent, no log rounding)."""
    _, exp = torch.frexp(a)
    return exp - 1  # a = m * 2**exp with m in [0.5, 1)


def exact_pow2(exp: torch.Tensor) -> torch.Tensor:
    """2**exp as float32 for integer exp in [-127, 127], built from float64 exponent bits.

    Bit assembly is exact on every device (exp2/pow promise ~1 ulp); 2**-127 is an fp32
    subnormal, so the float64 -> float32 narrowing is exact too.
    """
    bits = (exp.to(torch.int64) + 1023) << 52
    return bits.view(torch.float64).to(torch.float32)


# ----------------------------------------------------------------------------- blocks


@dataclass
class QuantizedBlocks:
    """A quantized tensor in blocks: value = (codes - zero) * scale, times global_scale.

    codes/scale/zero are [rows, n_blocks, blk] / [rows, n_blocks, 1]; `cols` is the unpadded
    width. `scale` holds exactly the stored block scales (E4M3 values for nvfp4, powers of
    two for mxfp4, fp32 otherwise).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    cols: int
    zero: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        if self.global_scale is not None:
            # torchao's order: the two scales are multiplied first, then the codes.
            vals = self.codes * (self.global_scale * self.scale)
        elif self.zero is not None:
            vals = (self.codes - self.zero) * self.scale
        else:
            vals = self.codes * self.scale
        return vals.reshape(vals.shape[0], -1)[:, : self.cols]


def _to_blocks(x: torch.Tensor, blk: int) -> torch.Tensor:
    """[rows, cols] -> [rows, n_blocks, blk], padding each row with its own last element."""
    rows, cols = x.shape
    pad = (-cols) % blk
    if pad:
        x = torch.cat([x, x[:, -1:].expand(rows, pad)], dim=1)
    return x.reshape(rows, -1, blk)


def _amax(xb: torch.Tensor) -> torch.Tensor:
    return xb.abs().amax(dim=-1, keepdim=True)


def _div(t: torch.Tensor, c: float) -> torch.Tensor:
    """t / c as a true IEEE division on every device.

    On CUDA, PyTorch divides by a Python (or CPU) scalar by multiplying with its reciprocal,
    which is an ulp off now and then: a device tensor divisor keeps CPU and GPU bit-identical.
    """
    return t / torch.full((), c, dtype=t.dtype, device=t.device)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """A zero scale (all-zero block) becomes 1: its codes are 0 either way, and no 0/0."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# ----------------------------------------------------------------------------- recipes


def _quant_nvfp4(xb: torch.Tensor, cols: int, global_amax=None) -> QuantizedBlocks:
    mag = xb.abs()
    amax_t = mag.amax() if global_amax is None else torch.as_tensor(global_amax)
    global_scale = _nonzero(_div(amax_t.to(device=xb.device, dtype=torch.float32), E4M3_MAX * E2M1_MAX))
    block = _div(mag.amax(dim=-1, keepdim=True), E2M1_MAX)
    scale = round_to_e4m3((block / global_scale).clamp(E4M3_MIN_NORMAL, E4M3_MAX))
    total = global_scale * scale
    codes = round_to_e2m1(xb / total)
    return QuantizedBlocks(codes, scale, cols, global_scale=global_scale)


def _quant_mxfp4(xb: torch.Tensor, cols: int, global_amax=None) -> QuantizedBlocks:
    amax = _amax(xb)
    exp = pow2_floor_exponent(amax) - E2M1_EMAX
    exp = torch.where(amax > 0, exp, E8M0_MIN_EXP).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    scale = exact_pow2(exp)
    codes = round_to_e2m1(xb / scale)
    return QuantizedBlocks(codes, scale, cols)


def _quant_fp4(xb: torch.Tensor, cols: int, global_amax=None) -> QuantizedBlocks:
    scale = _nonzero(_div(_amax(xb), E2M1_MAX))
    return QuantizedBlocks(round_to_e2m1(xb / scale), scale, cols)


def _quant_fp8(xb: torch.Tensor, cols: int, global_amax=None) -> QuantizedBlocks:
    scale = _nonzero(_div(_amax(xb), E4M3_MAX))
    return QuantizedBlocks(round_to_e4m3(xb / scale), scale, cols)


def _symmetric_int(qmax: int):
    def quant(xb: torch.Tensor, cols: int, global_amax=None) -> QuantizedBlocks:
        scale = _nonzero(_div(_amax(xb), qmax))
        codes = torch.round(xb / scale).clamp(-qmax, qmax)
        return QuantizedBlocks(codes, scale, cols)

    return quant


def _quant_int4_asym(xb: torch.Tensor, cols: int, global_amax=None) -> QuantizedBlocks:
    qmax = 15
    lo = xb.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = xb.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = _nonzero(_div(hi - lo, qmax))
    zero = torch.round(-lo / scale).clamp(0, qmax)
    codes = (torch.round(xb / scale) + zero).clamp(0, qmax)
    return QuantizedBlocks(codes, scale, cols, zero=zero)


_RECIPES = {
    "nvfp4": _quant_nvfp4,
    "mxfp4": _quant_mxfp4,
    "fp4": _quant_fp4,
    "int4": _symmetric_int(7),
    "int8": _symmetric_int(127),
    "int4_asym": _quant_int4_asym,
    "fp8": _quant_fp8,
}
assert set(_RECIPES) == set(FORMATS)


# ----------------------------------------------------------------------------- public API


def check_qspec(fmt: str, blk: int | str) -> int | str:
    """Validate a (format, block) pair; returns the block as int or "in"."""
    qspec = f"{fmt}@{blk}"
    if fmt not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise HarnessError(f"qspec {qspec!r}: unknown format {fmt!r}; known formats: {known}")
    if isinstance(blk, str) and blk.strip().isdigit():
        blk = int(blk)
    if blk == "in":
        return blk
    if isinstance(blk, bool) or not isinstance(blk, int) or blk <= 0:
        raise HarnessError(f"qspec {qspec!r}: block {blk!r} must be a positive integer or 'in'")
    return blk


def check_finite(t: torch.Tensor, name: str) -> None:
    """NaN/Inf never propagates silently into a score: it is the user's broken tensor."""
    if t.numel() == 0:
        return
    # min and max propagate NaN and Inf: one fused reduction instead of isfinite's passes.
    lo, hi = torch.aminmax(t.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise HarnessError(
            f"{name} has NaN/Inf values; fix the checkpoint (or the cached activations) "
            f"before quantizing it"
        )


def quantize_blocks(
    w: torch.Tensor, fmt: str, blk: int | str, name: str = "tensor", global_amax: float | torch.Tensor | None = None
) -> QuantizedBlocks:
    """Quantize a 2-D tensor, keeping codes and scales (what fake_quantize dequantizes)."""
    blk = check_qspec(fmt, blk)
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(w.shape)}")
    check_finite(w, name)
    if w.numel() == 0:
        raise ValueError(f"{name}: cannot quantize an empty tensor of shape {tuple(w.shape)}")
    x = w.detach().to(torch.float32)
    cols = x.shape[1]
    # A block wider than the row is one block per row (the padding copies the row's last
    # element, so every block statistic is that of the row): the same numbers as `in`, and a
    # block size like 4000000 allocates nothing beyond the row.
    block = cols if blk == "in" else min(blk, cols)
    return _RECIPES[fmt](_to_blocks(x, block), cols, global_amax=global_amax)


def fake_quantize(
    w: torch.Tensor, fmt: str, blk: int | str, name: str = "tensor", global_amax: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize `w` [rows, cols] in `fmt`, blocks of `blk` along the last dim.

    Returns float32, same shape and device. `name` goes into error messages (e.g.
    "model.layers.0.mlp.up_proj weight"). `global_amax` (nvfp4 only) fixes the per-tensor
    amax instead of reading it from `w`; other formats ignore it.
    """
    if w.numel() == 0:
        check_qspec(fmt, blk)
        return w.detach().to(torch.float32).clone()
    return quantize_blocks(w, fmt, blk, name, global_amax).dequantize()
