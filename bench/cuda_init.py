"""A process that only imports torch and starts CUDA: bench_process.py's host-memory baseline."""

import torch

if torch.cuda.is_available():
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
