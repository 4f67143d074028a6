"""The fused ΔW kernel (numerics.fused_delta) against its specification, the torch composition.

ΔW = (B + Q(W − B)) − W must come out bit for bit as formats.fake_quantize composes it, for every
format, block (powers of two, awkward widths, "in", wider than the row), shape (short last
blocks), with and without a low-rank branch, on data with outliers, zero blocks and tiny values.
On CUDA the kernel itself is compared; without a GPU the same kernels run in Triton's
interpreter (numpy on the CPU), which checks their logic in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tokenwise_harness.grid import SvdqConfig
from tokenwise_harness.numerics import formats, fused_delta, svdq
from tokenwise_harness.numerics.lowrank import LowRank

CASES = [((64, 256), 16), ((33, 200), 16), ((17, 70), "in"), ((40, 96), 32), ((24, 300), 128), ((9, 40), 128),
         ((12, 130), 48), ((8, 4100), 64), ((5, 50), 7)]


def hostile_weight(shape, seed: int) -> torch.Tensor:
    """Gaussian rows with spread scales, planted outlier columns, an all-zero block run and tiny rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0])[:, None]
    w[:, 3] *= 40.0  # an outlier input channel
    w[1, : min(40, shape[1])] = 0.0  # zero blocks
    w[2] *= 2.0**-120  # a row whose blocks sit near float32's smallest normals (mxfp4's E8M0 floor)
    return w


def composed(w: torch.Tensor, fmt: str, blk, branch: torch.Tensor | None) -> torch.Tensor:
    b = torch.zeros_like(w) if branch is None else branch
    q = formats.fake_quantize(w - b, fmt, blk)
    return (q if branch is None else b + q) - w


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_fused_delta_on_cuda_equals_the_composition(fmt):
    assert fused_delta.available()
    for i, (shape, blk) in enumerate(CASES):
        w = hostile_weight(shape, i)
        branch = LowRank(w, 4).product(4)
        for b in (None, branch):
            want = composed(w, fmt, blk, b)  # on the CPU: formats.py is bit-identical across devices
            assert fused_delta.applies(w.cuda(), blk)
            got = fused_delta.delta(w.cuda(), fmt, blk, None if b is None else b.cuda()).cpu()
            diff = (got != want).sum().item()
            assert diff == 0, f"{fmt}@{blk} {shape} branch={b is not None}: {diff} elements differ"


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", [SvdqConfig(0, "nvfp4", 16), SvdqConfig(8, "nvfp4", 16), SvdqConfig(16, "mxfp4", 32),
                                 SvdqConfig(8, "int4", 64), SvdqConfig(8, "int4_asym", 128), SvdqConfig(4, "none")])
def test_quantization_delta_on_cuda_is_the_weight_difference(cfg):
    w = hostile_weight((96, 320), 7).cuda()
    lowrank = LowRank(w, 16)
    want = svdq.fake_quantize_weight(w, cfg, lowrank=lowrank) - w
    assert torch.equal(svdq.quantization_delta(w, cfg, lowrank), want)


@pytest.mark.cuda
def test_the_background_warm_up_loads_the_kernels_and_changes_no_bit(monkeypatch):
    """warm_up() compiles (or loads) the variants on its own thread; the first delta() waits for
    it and then gives the composition's bits, for warmed and unwarmed variants alike."""
    monkeypatch.setattr(fused_delta, "_warming", None)
    fused_delta.warm_up("cuda", [("nvfp4", 16), ("int4", 64)])
    warming = fused_delta._warming
    assert warming is not None
    fused_delta.warm_up("cuda", [("mxfp4", 32)])  # once per process: a second call starts nothing
    assert fused_delta._warming is warming
    w = hostile_weight((64, 512), 3)
    for fmt, blk in (("nvfp4", 16), ("int4", 64), ("mxfp4", 32)):
        got = fused_delta.delta(w.cuda(), fmt, blk).cpu()
        assert warming.done()
        assert torch.equal(got, composed(w, fmt, blk, None)), (fmt, blk)


@pytest.mark.cuda
def test_no_config_waits_for_the_warm_up(monkeypatch):
    """While the warm-up thread is still starting Triton, quantization_delta composes the torch
    ops (the same bits) instead of waiting; once it is done, the fused kernel runs."""
    from concurrent.futures import Future

    launched = []
    real_launch = fused_delta._launch
    monkeypatch.setattr(fused_delta, "_launch", lambda *a: launched.append(a[1:3]) or real_launch(*a))
    monkeypatch.setattr(fused_delta, "_warming", Future())  # a warm-up that never finishes by itself
    w = hostile_weight((64, 512), 5).cuda()
    lowrank = LowRank(w, 8)
    cfg = SvdqConfig(8, "nvfp4", 16)
    want = svdq.fake_quantize_weight(w, cfg, lowrank=lowrank) - w
    assert not fused_delta.ready()
    assert torch.equal(svdq.quantization_delta(w, cfg, lowrank, finite_checked=True), want) and launched == []
    fused_delta._warming.set_result(None)
    assert fused_delta.ready()
    assert torch.equal(svdq.quantization_delta(w, cfg, lowrank, finite_checked=True), want)
    assert launched == [("nvfp4", 16)]


def test_the_fused_path_is_not_taken_where_it_does_not_apply():
    w = hostile_weight((8, 64), 1)
    assert not fused_delta.applies(w, 16)  # a CPU tensor
    if torch.cuda.is_available():
        assert not fused_delta.applies(w.cuda().double(), 16)
        assert not fused_delta.applies(torch.zeros(2, 2 * fused_delta.MAX_BLOCK, device="cuda"), "in")
    cfg = SvdqConfig(8, "nvfp4", 16)
    lowrank = LowRank(w, 8)
    assert torch.equal(svdq.quantization_delta(w, cfg, lowrank), svdq.fake_quantize_weight(w, cfg, lowrank=lowrank) - w)


INTERPRETED = textwrap.dedent("""
    import sys, torch
    from tests.test_fused_delta import CASES, composed, hostile_weight
    from tokenwise_harness.numerics import fused_delta
    from tokenwise_harness.numerics.lowrank import LowRank
    bad = []
    for fmt in sys.argv[1:]:
        for i, (shape, blk) in enumerate(CASES[:6]):
            w = hostile_weight(shape, i)
            for b in (None, LowRank(w, 4).product(4)):
                got, want = fused_delta.delta(w, fmt, blk, b), composed(w, fmt, blk, b)
                if not torch.equal(got, want):
                    bad.append(f"{fmt}@{blk} {shape} branch={b is not None}: {(got != want).sum().item()} differ")
    print("\\n".join(bad) or "ok")
""")


def test_fused_kernels_in_the_triton_interpreter():
    """The kernels' arithmetic, run by Triton's CPU interpreter (the E4M3 rounding is float32
    arithmetic, not a float8 cast, so it means the same there as on a GPU)."""
    pytest.importorskip("triton")
    fmts = sorted(formats.FORMATS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", INTERPRETED, *fmts], capture_output=True, text=True, env=env,
                         timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok", out.stdout
