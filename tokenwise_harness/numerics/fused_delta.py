"""ΔW = (B + Q(W − B)) − W in one GPU pass: the formats' casts fused into a Triton kernel.

A config's error term needs only ΔW (engine.py: E = X ΔWᵀ + r). Composed from torch ops,
ΔW = fake_quantize_weight(W) − W costs about twenty passes over the weight (the residual, its
absolute value, block maxima, the scaled values, the rounding table's lookup, the dequantized
values, the sum with the branch, the difference with W), which on an H200 made quantization
the largest part of a config's marginal cost. Here one kernel reads W and the low-rank branch B
once and writes ΔW; nvfp4 first needs the residual's per-tensor amax, one more read pass.

Bit for bit the same numbers as the torch composition (formats.py is the specification, and
tests/test_fused_delta.py checks every format, block and awkward shape against it on CUDA):
the same float32 operations in the same order, every division a correctly rounded `div_rn`
(formats.py divides by device tensors for the same reason), round-half-to-even everywhere, and
no fused multiply-adds (`enable_fp_fusion=False`: B + codes·scale must round twice, as in torch).

`delta()` returns None where it does not apply (no CUDA tensor, no Triton, a block wider than
MAX_BLOCK): the caller then composes the torch ops. Blocks are handled exactly as formats.py
does: a short last block of a row is padded with the row's last element there, which changes no
block statistic; here its missing elements are masked out of the statistics instead.
"""

from __future__ import annotations

import functools

import torch

from tokenwise_harness.numerics import formats

# Formats by the code the kernel branches on (a constexpr: one compiled variant each).
FORMAT_CODES = {"nvfp4": 0, "mxfp4": 1, "fp4": 2, "int4": 3, "int8": 4, "int4_asym": 5, "fp8": 6}
assert set(FORMAT_CODES) == set(formats.FORMATS)

# A block is held in registers as one power-of-two wide row of a tile; wider blocks (per-channel
# "in" on very wide weights) use the torch ops.
MAX_BLOCK = 8192
# Elements per program: tiles of TILE_ELEMS // block_p2 blocks.
TILE_ELEMS = 4096


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def applies(w: torch.Tensor, blk: int | str) -> bool:
    """Whether delta() runs the fused kernel for this tensor and block (a float32 CUDA matrix
    with Triton installed, a block of at most MAX_BLOCK elements)."""
    if not (w.is_cuda and w.dtype == torch.float32 and w.dim() == 2 and w.numel() > 0 and available()):
        return False
    return _next_pow2(_block(w.shape[1], blk)) <= MAX_BLOCK


# The background warm-up's Future (warm_up). Until it is done the engine composes the torch ops
# (ready() is False) and delta() waits for it, so the kernels are never compiled by two threads.
_warming = None


def ready() -> bool:
    """False while warm_up's thread is still starting Triton: a caller that would rather not wait
    (svdq.quantization_delta) then composes the torch ops, which give the same bits."""
    return _warming is None or _warming.done()


def warm_up(device, qspecs: list[tuple[str, int | str]]) -> None:
    """Load Triton and the kernels of these (fmt, blk) on a background thread, once per process.

    Triton's first launch in a process hashes Triton's own sources for its cache key, asks
    ptxas for its version (a subprocess) and loads each compiled variant: 0.5-1.5 s measured
    on the H200 that would otherwise land on the first config, while the engine is still
    reading weights and decomposing. Meanwhile the engine's first configs take the torch
    composition (ready()), so no config waits for Triton. A variant is warmed on a small matrix
    whose sizes the JIT specializes like a real weight's (multiples of 16)."""
    global _warming
    if _warming is not None or not torch.cuda.is_available():
        return
    from concurrent.futures import Future

    _warming = Future()

    def run():
        try:
            if available():
                for fmt, blk in qspecs:
                    cols = 16 * (16 if blk == "in" else min(int(blk), MAX_BLOCK // 16))
                    w = torch.ones(16, cols, device=device)
                    for branch in (None, w):
                        _launch(w, fmt, blk, branch)
                torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001, S110  (the real call will meet and report the same failure)
            pass
        _warming.set_result(None)

    import threading

    threading.Thread(target=run, name="tokenwise-triton-warm-up", daemon=True).start()


def delta(w: torch.Tensor, fmt: str, blk: int | str, branch: torch.Tensor | None = None) -> torch.Tensor:
    """(branch + Q(w − branch)) − w, float32, where applies(w, blk).

    w: float32 [rows, cols] on CUDA, finite (the caller checked); branch: the same shape,
    or None for a plain Q(w) − w. fmt/blk: a checked qspec (formats.check_qspec)."""
    if _warming is not None:
        _warming.result()
    return _launch(w, fmt, blk, branch)


def _launch(w, fmt, blk, branch):
    kernels = _kernels()
    rows, cols = w.shape
    block = _block(cols, blk)
    block_p2 = _next_pow2(block)
    w = w.contiguous()
    b = w if branch is None else branch.to(torch.float32).contiguous()  # not read without a branch
    n_blocks_row = -(-cols // block)
    tile = max(1, TILE_ELEMS // block_p2)
    grid = (-(-rows * n_blocks_row // tile),)
    shape_args = (rows, cols, block, n_blocks_row)
    gscale = torch.ones((), dtype=torch.float32, device=w.device)
    if fmt == "nvfp4":
        amax = torch.zeros((), dtype=torch.float32, device=w.device)
        kernels.residual_amax[grid](w, b, amax, *shape_args, HAS_BRANCH=branch is not None, TILE=tile,
                                    BLOCK_P2=block_p2)
        gscale = formats._nonzero(formats._div(amax, formats.E4M3_MAX * formats.E2M1_MAX))
    out = torch.empty_like(w)
    kernels.fused_delta[grid](w, b, out, gscale, *shape_args, FMT=FORMAT_CODES[fmt], HAS_BRANCH=branch is not None,
                              TILE=tile, BLOCK_P2=block_p2, enable_fp_fusion=False)
    return out


def _block(cols: int, blk: int | str) -> int:
    """The block width formats.py uses: a row for "in", and never wider than the row."""
    return cols if blk == "in" else min(int(blk), cols)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
def _kernels():
    """Imported on first use: Triton is loaded only when a CUDA delta is asked for."""
    from tokenwise_harness.numerics import fused_delta_kernels

    return fused_delta_kernels
