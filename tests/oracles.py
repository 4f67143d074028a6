"""Independent references for the numerics tests (no code shared with tokenwise_harness).

* `fake_quantize_ref(x, fmt, blk)`: every format of numerics/formats.py, written from the
  recipes in its docstring, not from its code: numpy float64, each block of a row taken as it
  is (a short last block is its own array, no padding), ml_dtypes for every cast to a
  low-precision type, numpy's log2 for the MX exponent. Each float32 operation of a recipe is
  computed in float64 and rounded to float32 (`f32`); for a single +, -, *, / of two float32
  values that is exactly the float32 result, because float64 has more than 2*24+2 significand
  bits (double rounding is innocuous). So "bit for bit" means: same float32 values (+0 and -0
  compare equal).
* `grid_of(dtype)`: a low-precision type's every finite value, read off all its bit patterns
  with ml_dtypes (the exact enumeration a format's element grid must equal).
* `truncated_svd64(w, r)`: the rank-r truncated SVD in float64 (torch.linalg.svd).
* `torchao_nvfp4_scaled(...)`: what torchao's nvfp4_quantize feeds its E2M1 cast, recomputed
  in float64 from the order of operations of torchao's source (reciprocal multiply).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

E2M1 = ml_dtypes.float4_e2m1fn
E4M3 = ml_dtypes.float8_e4m3fn
E8M0 = ml_dtypes.float8_e8m0fnu


def f32(a) -> np.ndarray:
    """Round float64 values to float32 (and keep them as float64)."""
    return np.asarray(a, np.float64).astype(np.float32).astype(np.float64)


def cast(a, dtype) -> np.ndarray:
    """Round through an ml_dtypes type and back."""
    return np.asarray(a, np.float64).astype(dtype).astype(np.float64)


def grid_of(dtype) -> np.ndarray:
    """Every finite value of an 8-bit-or-narrower ml_dtypes type, ascending, -0 folded into 0."""
    bits = 16 if dtype == E2M1 else 256
    vals = np.arange(bits, dtype=np.uint8).view(dtype).astype(np.float64)
    return np.unique(vals[np.isfinite(vals)] + 0.0)


def _nz(s: np.ndarray) -> np.ndarray:
    return np.where(s > 0, s, 1.0)


# ----------------------------------------------------------------------------- per-block recipes
# Each takes b [n_blocks, size] (float64 holding float32 values) and returns x~ of the same shape.


def _amax(b):
    return np.abs(b).max(axis=1, keepdims=True)


def _nvfp4(b, pts):
    bs = f32(_amax(b) / 6.0)
    s = cast(np.clip(f32(bs / pts), 2.0**-6, 448.0), E4M3)
    total = f32(pts * s)
    q = cast(np.clip(f32(b / total), -6.0, 6.0), E2M1)
    return f32(q * total)


def mx_exponent(amax: np.ndarray) -> np.ndarray:
    """OCP MX v1.0: floor(log2(amax)) - emax(E2M1) = 2, clamped to E8M0's [-127, 127]; 0 -> -127."""
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2
    return np.where(amax > 0, np.clip(e, -127, 127), -127)


def _mxfp4(b):
    x = 2.0 ** mx_exponent(_amax(b))
    assert np.array_equal(cast(x, E8M0), x)  # an E8M0 value
    q = cast(np.clip(f32(b / x), -6.0, 6.0), E2M1)
    return f32(q * x)


def _fp4(b):
    s = _nz(f32(_amax(b) / 6.0))
    return f32(cast(np.clip(f32(b / s), -6.0, 6.0), E2M1) * s)


def _fp8(b):
    s = _nz(f32(_amax(b) / 448.0))
    return f32(cast(np.clip(f32(b / s), -448.0, 448.0), E4M3) * s)


def _int(b, qmax):
    s = _nz(f32(_amax(b) / qmax))
    return f32(np.clip(np.rint(f32(b / s)), -qmax, qmax) * s)


def _int4_asym(b):
    lo = np.minimum(b.min(axis=1, keepdims=True), 0.0)
    hi = np.maximum(b.max(axis=1, keepdims=True), 0.0)
    s = _nz(f32(f32(hi - lo) / 15.0))
    z = np.clip(np.rint(f32(-lo / s)), 0, 15)
    q = np.clip(np.rint(f32(b / s)) + z, 0, 15)
    return f32((q - z) * s)


def fake_quantize_ref(x, fmt: str, blk, global_amax=None) -> np.ndarray:
    """Fake-quantize a float32 matrix [rows, cols] (numpy or torch); returns float64 values."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x, np.float32).astype(np.float64)
    rows, cols = x.shape
    size = cols if blk == "in" else int(blk)
    amax_t = np.abs(x).max() if global_amax is None else float(np.float32(global_amax))
    pts = _nz(f32(amax_t / 2688.0))  # 448 * 6
    per_block = {
        "nvfp4": lambda b: _nvfp4(b, pts),
        "mxfp4": _mxfp4,
        "fp4": _fp4,
        "fp8": _fp8,
        "int4": lambda b: _int(b, 7),
        "int8": lambda b: _int(b, 127),
        "int4_asym": _int4_asym,
    }[fmt]
    out = np.empty_like(x)
    full = cols - cols % size
    if full:  # the whole blocks of every row
        out[:, :full] = per_block(x[:, :full].reshape(-1, size)).reshape(rows, full)
    if full < cols:  # the short last block of every row, as it is
        out[:, full:] = per_block(x[:, full:])
    return out


def assert_bitwise(got: torch.Tensor, want: np.ndarray, what: str, x=None) -> None:
    """got (any device) equals the float64-held float32 values `want` exactly."""
    g = got.detach().cpu().numpy().astype(np.float64)
    bad = np.argwhere(g != want)
    if bad.size:
        i = tuple(bad[0])
        xi = "" if x is None else f" (x={np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)[i]!r})"
        raise AssertionError(f"{what}: {len(bad)} mismatches, first at {i}: got {g[i]!r} want {want[i]!r}{xi}")


# ----------------------------------------------------------------------------- linear algebra


def truncated_svd64(w: torch.Tensor, r: int) -> torch.Tensor:
    """U_r S_r V_rᵀ of w in float64 (CPU), via torch.linalg.svd."""
    u, s, vt = torch.linalg.svd(w.detach().cpu().double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


# ----------------------------------------------------------------------------- torchao's nvfp4 order


def _nvfp4_scales(b: np.ndarray, amax_t: float) -> tuple[float, np.ndarray]:
    """(pts, s [rows, n_blocks, 1]) of blocks b [rows, n_blocks, blk], per the recipe."""
    pts = float(_nz(f32(amax_t / 2688.0)))
    s = cast(np.clip(f32(f32(np.abs(b).max(axis=2, keepdims=True) / 6.0) / pts), 2.0**-6, 448.0), E4M3)
    return pts, s


def nvfp4_total_scale(x: np.ndarray, blk: int = 16) -> np.ndarray:
    """fl(pts * s) per block [rows, n_blocks] of x [rows, cols], cols % blk == 0, per the recipe."""
    x = np.asarray(x, np.float32).astype(np.float64)
    b = x.reshape(x.shape[0], -1, blk)
    pts, s = _nvfp4_scales(b, np.abs(x).max())
    return f32(pts * s)[..., 0]


def torchao_nvfp4_scaled(x: np.ndarray, blk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(ours, torchao's) value handed to the E2M1 cast, float64-held float32, per element.

    Both use the same block scale s (E4M3) and tensor scale pts; they differ in the last step:
        ours     x / fl(pts * s)                      (a true division by the total scale)
        torchao  x * fl(fl(1 / pts) / s)              (nvfp4_quantize after pytorch/ao #4031)
    """
    x = np.asarray(x, np.float32).astype(np.float64)
    rows, cols = x.shape
    b = x.reshape(rows, cols // blk, blk)
    pts, s = _nvfp4_scales(b, np.abs(x).max())
    ours = f32(b / f32(pts * s))
    theirs = f32(b * f32(f32(1.0 / pts) / s))
    return ours.reshape(rows, cols), theirs.reshape(rows, cols)
