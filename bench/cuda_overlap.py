"""Can CUDA's start overlap other work in one process? (issue 17: the warm process's floor)

    python bench/cuda_overlap.py FILE seq|overlap|prestart

seq:      import torch, start CUDA (context + one allocation), then read FILE with 8 threads.
overlap:  import torch, start CUDA on a thread while the main thread reads FILE with 8 threads.
prestart: the driver's cuInit and primary context made through ctypes on a thread before
          `import torch` (what the CLI does), then as seq.
Prints one line of phase times; run each mode in a fresh process.
"""

import ctypes
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

t0 = time.perf_counter()
path, mode = sys.argv[1], sys.argv[2]
PIECE = 64 << 20
got: dict = {}


def driver_start() -> None:
    t = time.perf_counter()
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    rc = [cuda.cuInit(0)]
    rc.append(cuda.cuDeviceGet(ctypes.byref(dev), 0))
    rc.append(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
    got["driver"] = (time.perf_counter() - t, rc)


if mode == "prestart":
    pre = threading.Thread(target=driver_start)
    pre.start()
import torch  # noqa: E402

t_import = time.perf_counter() - t0


def read_all() -> float:
    t = time.perf_counter()
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    bufs = [bytearray(PIECE) for _ in range(8)]

    def piece(i):
        buf = bufs[i % 8]
        os.preadv(fd, [memoryview(buf)[: min(PIECE, size - i * PIECE)]], i * PIECE)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(piece, range(-(-size // PIECE))))
    os.close(fd)
    return time.perf_counter() - t


def start_cuda(out: dict) -> None:
    t = time.perf_counter()
    torch.cuda.init()
    out["init"] = time.perf_counter() - t
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    out["cuda"] = time.perf_counter() - t


t1 = time.perf_counter()
if mode == "overlap":
    th = threading.Thread(target=start_cuda, args=(got,))
    th.start()
    got["read"] = read_all()
    th.join()
else:
    start_cuda(got)
    got["read"] = read_all()
print(f"cuda_overlap {mode}: import torch {t_import:.3f} s, then {time.perf_counter() - t1:.3f} s "
      f"(cuda.init {got['init']:.3f}, cuda ready {got['cuda']:.3f}, read {got['read']:.3f} s of "
      f"{os.path.getsize(path) / 1e9:.2f} GB; driver thread {got.get('driver')}); "
      f"whole {time.perf_counter() - t0:.3f} s", flush=True)
