"""The scoring device: `auto` picks CUDA when present; a CUDA request without CUDA is bad input.

start_cuda_driver: CUDA's driver start, begun beside `import torch` instead of after it.
"""

from __future__ import annotations

import os
import sys
import threading

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


def start_cuda_driver(device: str | None) -> threading.Thread | None:
    """Initialise the CUDA driver and make the device's primary context on a daemon thread, now.

    Why: a scoring process first imports torch (1.3-1.8 s of Python work that holds the GIL on
    the H200 machine), then starts CUDA (cuInit and the primary context: driver work that needs
    no Python). Called before torch is imported, this does the driver's part through ctypes,
    which releases the GIL around each foreign call, so it runs beside the import (0.44-0.47 s
    there, all of it hidden); torch's own start then finds the driver initialised and the context
    made (the runtime API works in the device's primary context) and does only its own part:
    0.02-0.03 s after the import instead of 0.14-0.17 s (bench/cuda_overlap.py). It changes
    nothing torch decides: which device, and every error, come from torch's own start as before.
    Nothing starts for a CPU request, once torch is imported (too late to gain), or without
    libcuda; any failure here is left for torch's start to meet and report.

    `device`: the front end's --device value (None / auto / cpu / cuda / cuda:N). Returns the
    thread (tests join it), or None when nothing was started.
    """
    text = "auto" if device is None else str(device)
    if "torch" in sys.modules or not (text == "auto" or text.startswith("cuda")):
        return None
    index = text.partition(":")[2]
    if index and not index.isdigit():
        return None  # pick_device refuses it, in one line
    # what torch's CUDA start sets, unless the user did, before its cuInit: the driver reads it there
    os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")
    thread = threading.Thread(target=_driver_start, args=(int(index or 0),), name="tokenwise-cuda-start", daemon=True)
    thread.start()
    return thread


def _driver_start(index: int) -> None:
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver here
        return
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    if cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(dev), index) == 0:
        # held for the process's life, as torch's own retain is: the context is torch's to use
        cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
