"""The scoring device: `auto` picks CUDA when present; a CUDA request without CUDA is bad input."""

from __future__ import annotations

from tokenwise_harness.errors import HarnessError


def pick_device(device: str | None, flag: str = "--device") -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"{flag} {device}: CUDA is not available on this machine; use {flag} cpu")
    if not (str(device) == "cpu" or str(device).startswith("cuda")):
        raise HarnessError(f"{flag} {device!r} is unknown; use cpu, cuda or cuda:N")
    return str(device)
