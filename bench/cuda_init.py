"""bench_process.py's host-memory baselines: a process that imports torch and starts CUDA, and
(`--libs`) one that also loads every library the engine's GPU path uses, on tiny tensors:
cuBLAS (16-bit GEMMs with float32 output, float32 and float64 GEMMs), cuSOLVER (eigh, qr) and
Triton with the fused ΔW kernel. Their pages are resident in any process that scores on the GPU,
so the second is the floor against which the engine's own data (chunks, staging) is measured."""

import sys

import torch

if torch.cuda.is_available():
    torch.zeros(1, device="cuda")
    if "--libs" in sys.argv:
        from tokenwise_harness.grid import SvdqConfig
        from tokenwise_harness.numerics import svdq
        from tokenwise_harness.numerics.lowrank import LowRank

        a = torch.randn(256, 256, device="cuda")
        for low in (torch.float16, torch.bfloat16):
            torch.mm(a.to(low), a.to(low).T, out_dtype=torch.float32)
        g = (a @ a.T).double()
        torch.linalg.eigh(g)
        torch.linalg.qr(g)
        svdq.quantization_delta(a, SvdqConfig(8, "nvfp4", 16), LowRank(a, 8))
    torch.cuda.synchronize()
