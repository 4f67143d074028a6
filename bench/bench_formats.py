"""Speed of the format casts and of the low-rank build (pytest-benchmark).

    pytest bench/bench_formats.py                          # CPU, small shapes (< 2 min)
    TOKENWISE_BENCH_FULL=1 pytest bench/bench_formats.py   # 4096x4096 and 5120x25600, on CUDA
                                                           # when there is one

Not part of the default test run (testpaths = tests). A quantizer is a memory-bound pass, so
each cast reports `GB/s` = (bytes read + bytes written) / mean time in extra_info, next to a
plain device copy of the same tensor (`test_copy_reference`), the bandwidth ceiling. The
LowRank rows report the seconds of one exact top-r build (float64 Gram + eigh).
"""

from __future__ import annotations

import os

import pytest
import torch

from tokenwise_harness.numerics import formats
from tokenwise_harness.numerics.lowrank import LowRank

FULL = os.environ.get("TOKENWISE_BENCH_FULL") == "1"
DEVICE = "cuda" if FULL and torch.cuda.is_available() else "cpu"
SHAPES = [(4096, 4096), (5120, 25600)] if FULL else [(512, 512), (640, 3200)]
ROUNDS = 10 if FULL else 5
QSPECS = [(name, spec.default_blk) for name, spec in sorted(formats.FORMATS.items())] + [("nvfp4", 128)]
LOWRANK_MAX_RANK = 128


def _ids(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


def _weight(shape) -> torch.Tensor:
    # float32: the residual W - L1 L2 that the operator quantizes is float32.
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32)


def _timed(benchmark, fn, rounds: int = ROUNDS):
    """Run fn under pytest-benchmark, waiting for the device so the time is the kernel's."""

    def call():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    return stats.stats.mean if stats is not None else None  # None under --benchmark-disable


def _record(benchmark, mean: float | None, nbytes: int, **info) -> None:
    benchmark.extra_info.update(device=DEVICE, **info)
    if mean:
        benchmark.extra_info["GB/s"] = round(nbytes / mean / 1e9, 2)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_copy_reference(benchmark, shape):
    w = _weight(shape)
    mean = _timed(benchmark, w.clone)
    _record(benchmark, mean, 2 * w.numel() * w.element_size(), op="copy", shape=_ids(shape))


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("fmt,blk", QSPECS, ids=[f"{f}@{b}" for f, b in QSPECS])
def test_fake_quantize(benchmark, fmt, blk, shape):
    w = _weight(shape)
    mean = _timed(benchmark, lambda: formats.fake_quantize(w, fmt, blk))
    nbytes = w.numel() * (w.element_size() + 4)  # read the input, write float32 output
    _record(benchmark, mean, nbytes, op="fake_quantize", qspec=f"{fmt}@{blk}", shape=_ids(shape))


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_lowrank_build(benchmark, shape):
    w = _weight(shape)
    mean = _timed(benchmark, lambda: LowRank(w, LOWRANK_MAX_RANK), rounds=3 if FULL else 2)
    benchmark.extra_info.update(device=DEVICE, op="LowRank", max_rank=LOWRANK_MAX_RANK, shape=_ids(shape))
    if mean:
        benchmark.extra_info["seconds"] = round(mean, 4)
