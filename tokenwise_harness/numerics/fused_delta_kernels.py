"""The Triton kernels behind fused_delta.delta (see there for what they compute and why).

fused_delta(): ΔW = (B + Q(W − B)) − W per block of one row, every format of formats.py as one
constexpr branch; residual_amax(): max |W − B| over the tensor (nvfp4's per-tensor scale).
Each program takes a [TILE, BLOCK_P2] tile of blocks: one block per tile row, padded to a power
of two and masked.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(w_ptr, b_ptr, rows, cols, block, n_blocks_row, HAS_BRANCH: tl.constexpr, TILE: tl.constexpr,
          BLOCK_P2: tl.constexpr):
    """This program's blocks as a [TILE, BLOCK_P2] tile: (w, branch, residual, offsets, mask)."""
    bid = tl.program_id(0) * TILE + tl.arange(0, TILE)[:, None]
    j = tl.arange(0, BLOCK_P2)[None, :]
    row = bid // n_blocks_row
    col = (bid % n_blocks_row) * block + j
    mask = (row < rows) & (j < block) & (col < cols)
    offs = row.to(tl.int64) * cols + col
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    if HAS_BRANCH:
        b = tl.load(b_ptr + offs, mask=mask, other=0.0)
        r = w - b
    else:
        b = w  # unused
        r = w
    return w, b, r, offs, mask


@triton.jit
def residual_amax(w_ptr, b_ptr, amax_ptr, rows, cols, block, n_blocks_row, HAS_BRANCH: tl.constexpr,
                  TILE: tl.constexpr, BLOCK_P2: tl.constexpr):
    _, _, r, _, mask = _tile(w_ptr, b_ptr, rows, cols, block, n_blocks_row, HAS_BRANCH, TILE, BLOCK_P2)
    tl.atomic_max(amax_ptr, tl.max(tl.max(tl.where(mask, tl.abs(r), 0.0), axis=1), axis=0))


@triton.jit
def _e2m1(v):
    """Round half to even onto E2M1's grid, saturating at ±6; -0 comes out as +0 (formats.round_to_e2m1)."""
    a = tl.abs(v)
    q = tl.where(a <= 0.25, 0.0, tl.where(a < 0.75, 0.5, tl.where(a <= 1.25, 1.0, tl.where(
        a < 1.75, 1.5, tl.where(a <= 2.5, 2.0, tl.where(a < 3.5, 3.0, tl.where(a <= 5.0, 4.0, 6.0)))))))
    return tl.where(v < 0, 0.0 - q, q)


@triton.jit
def _e4m3(v):
    """Saturating round half to even onto FP8 E4M3, subnormals kept (formats.round_to_e4m3).

    Done in float32 arithmetic rather than with a float8 cast, so that it is the same on every
    GPU and in the interpreter: v times the power-of-two reciprocal of its binade's step (3
    mantissa bits; 2**-9 below the smallest normal 2**-6) is exact, _rint rounds that quotient
    (|.| < 16), and the product with the step is exact again.
    """
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    e = ((tl.abs(v).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 |v|) for normal floats
    step = tl.where(e >= -6, ((e - 3 + 127) << 23).to(tl.float32, bitcast=True), 0.001953125)
    inv_step = tl.where(e >= -6, ((127 - e + 3) << 23).to(tl.float32, bitcast=True), 512.0)
    return _rint(v * inv_step) * step


@triton.jit
def _nonzero(s):
    return tl.where(s > 0, s, 1.0)


@triton.jit
def _rint(v):
    """Round half to even (torch.round) for |v| < 2**22: adding 1.5·2**23 leaves no fraction bits,
    so the float32 add itself rounds; every caller's |v| is at most 16 times a tiny factor."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _symmetric_int(r, amax, qmax):
    s = _nonzero(tl.math.div_rn(amax, qmax))
    return tl.minimum(tl.maximum(_rint(tl.math.div_rn(r, s)), -qmax), qmax) * s


@triton.jit
def fused_delta(w_ptr, b_ptr, out_ptr, gscale_ptr, rows, cols, block, n_blocks_row, FMT: tl.constexpr,
                HAS_BRANCH: tl.constexpr, TILE: tl.constexpr, BLOCK_P2: tl.constexpr):
    w, b, r, offs, mask = _tile(w_ptr, b_ptr, rows, cols, block, n_blocks_row, HAS_BRANCH, TILE, BLOCK_P2)
    amax = tl.max(tl.where(mask, tl.abs(r), 0.0), axis=1)[:, None]
    if FMT == 0:  # nvfp4: E4M3 block scale times the per-tensor FP32 scale
        g = tl.load(gscale_ptr)
        s = _e4m3(tl.minimum(tl.maximum(tl.math.div_rn(tl.math.div_rn(amax, 6.0), g), 0.015625), 448.0))
        total = g * s
        vals = _e2m1(tl.math.div_rn(r, total)) * total
    elif FMT == 1:  # mxfp4: E8M0 scale 2**clamp(floor(log2 amax) - 2, -127, 127)
        biased = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # 0 for zero and subnormal amax
        e = tl.maximum(biased - 129, -127)
        bits = tl.where(e >= -126, (e + 127) << 23, 0x00400000)  # 2**-127 is an fp32 subnormal
        s = bits.to(tl.float32, bitcast=True)
        vals = _e2m1(tl.math.div_rn(r, s)) * s
    elif FMT == 2:  # fp4: FP32 scale amax / 6
        s = _nonzero(tl.math.div_rn(amax, 6.0))
        vals = _e2m1(tl.math.div_rn(r, s)) * s
    elif FMT == 3:  # int4, symmetric
        vals = _symmetric_int(r, amax, 7.0)
    elif FMT == 4:  # int8, symmetric
        vals = _symmetric_int(r, amax, 127.0)
    elif FMT == 5:  # int4_asym: the range [min, max] extended to hold 0, a zero point
        lo = tl.minimum(tl.min(tl.where(mask, r, float("inf")), axis=1)[:, None], 0.0)
        hi = tl.maximum(tl.max(tl.where(mask, r, float("-inf")), axis=1)[:, None], 0.0)
        s = _nonzero(tl.math.div_rn(hi - lo, 15.0))
        z = tl.minimum(tl.maximum(_rint(tl.math.div_rn(0.0 - lo, s)), 0.0), 15.0)
        codes = tl.minimum(tl.maximum(_rint(tl.math.div_rn(r, s)) + z, 0.0), 15.0)
        vals = (codes - z) * s
    else:  # fp8: E4M3 elements, FP32 scale amax / 448
        s = _nonzero(tl.math.div_rn(amax, 448.0))
        vals = _e4m3(tl.math.div_rn(r, s)) * s
    if HAS_BRANCH:
        vals = b + vals
    tl.store(out_ptr + offs, vals - w, mask=mask)
