"""I/O benchmark (issue 17, round two): how fast the harness reads its files, 1 thread vs N.

    python bench/bench_io.py --out OUT                       # GPU box: 8 GB cache + 1.6 GB of weights on /dev/shm
    python bench/bench_io.py --out OUT --cache_gb 1 --weights_gb 0.4   # CPU box

Writes a synthetic cache (Qwen3-8B widths: X [N, 4096] and [N, 12288] fp16, with checksums,
through the harness's own StreamingSafetensorsWriter) and a one-file fp32 checkpoint of
[12288, 4096] weights into --work (default /dev/shm when it exists, else /tmp), or uses
--cache / --model_dir given. Rows (OUT/bench_io.json, also printed):
  file_read_seq_GBs      the cache file read front to back with one thread, 64 MiB readinto (the
                         "sequential bandwidth" bench_process.py reports)
  file_read_{k}t_GBs     the same bytes by k threads of positioned reads (safetensors_io.ParallelReader)
  stream_{k}t_GBs        XYCache.stream of every key, chunk by chunk, to --device, with k reader
                         threads (k = 1: the old one-read-per-key-per-chunk path), verify off
  stream_verify_GBs      the same at the default thread count with in-stream sha256 verification
  weights_{k}t_GBs       ModelDir.read of every weight to --device with k threads
  weights_4workers_*     every weight read on 4 threads at once (the engine's prefetch), by
                         ModelDir.read (pread) and by safetensors' mmap reader (its old path):
                         seconds and the growth of the process's VmRSS while reading (MiB)
Each rate is the better of two passes (the first settles the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(fn, passes: int = 2) -> float:
    return min(fn() for _ in range(passes))


def make_cache(path: Path, gb: float) -> None:
    import torch

    from tokenwise_harness.cache import StreamingSafetensorsWriter

    widths = {"model.layers.0.self_attn.q_proj.X": 4096, "model.layers.0.mlp.down_proj.X": 12288,
              "model.layers.0.mlp.gate_proj.X": 4096}
    n = max(64, int(gb * 1e9 / (2 * sum(widths.values()))))
    shapes = {k: (n, w) for k, w in widths.items()}
    meta = {"seed": "0", "cn": "1", "eu": "1", "length": str(n), "save_dtype": "fp16", "format_version": "1",
            "n_tokens": str(n)}
    writer = StreamingSafetensorsWriter(path, shapes, "fp16", meta)
    block = 2048
    for k, (rows, w) in shapes.items():
        base = torch.randn(block, w).half()
        for s in range(0, rows, block):
            writer.write_rows(k, base[: min(block, rows - s)])
    writer.finish()


def make_model(path: Path, gb: float) -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    count = max(1, round(gb * 1e9 / (12288 * 4096 * 4)))
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(12288, 4096, generator=g) for i in range(count)}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def file_read_1t(path: Path) -> float:
    buf = memoryview(bytearray(64 << 20))
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf) > 0:
            pass
    return time.perf_counter() - t


def file_read_parallel(path: Path, threads: int, window: int = 256 << 20) -> float:
    """The whole file in `window`-byte steps, each split into pieces read side by side (two
    windows in flight, like the chunk stream's double buffer)."""
    from tokenwise_harness.safetensors_io import ParallelReader

    size = path.stat().st_size
    bufs = [bytearray(min(window, size)) for _ in range(2)]
    fd = os.open(path, os.O_RDONLY)
    t = time.perf_counter()
    try:
        with ParallelReader(threads) as reader:
            pending = []
            for i, off in enumerate(range(0, size, window)):
                n = min(window, size - off)
                if len(pending) == 2:
                    for f in pending.pop(0):
                        f.result()
                pending.append(reader.submit(fd, memoryview(bufs[i % 2])[:n], off, "short read"))
            for fs in pending:
                for f in fs:
                    f.result()
    finally:
        os.close(fd)
    return time.perf_counter() - t


def stream_time(cache_path: Path, chunk: int, device: str, threads: int | None, verify: bool) -> tuple[float, int]:
    from tokenwise_harness.cache import XYCache

    cache = XYCache(cache_path, verify=verify)
    keys = sorted({k for e in cache.entries for k in (e.x_key, e.y_key) if k})
    streamed = 0
    sync(device)
    t = time.perf_counter()
    for key in keys:
        for _, _, (x,) in cache.stream([key], chunk, device, threads=threads):
            streamed += x.numel() * x.element_size()
    sync(device)
    return time.perf_counter() - t, streamed


def weights_time(model_dir: Path, device: str, threads: str | None) -> tuple[float, int]:
    from tokenwise_harness.checkpoint import ModelDir

    if threads:
        os.environ["TOKENWISE_READ_THREADS"] = threads
    else:
        os.environ.pop("TOKENWISE_READ_THREADS", None)
    mdir = ModelDir(model_dir)
    total = 0
    sync(device)
    t = time.perf_counter()
    for name in sorted(mdir.safetensors_index):
        w = mdir.read(name, device)
        total += w.numel() * w.element_size()
        del w
    sync(device)
    os.environ.pop("TOKENWISE_READ_THREADS", None)
    return time.perf_counter() - t, total


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def weights_peak_rss(model_dir: Path, device: str, how: str, workers: int = 4) -> tuple[float, float]:
    """(seconds, peak VmRSS growth in MiB) reading every weight to `device` on `workers` threads at
    once, as the engine's prefetch does, each dropped when read. how: 'pread' (ModelDir.read) or
    'safetensors' (safe_open(device=...).get_tensor, the mmap reader ModelDir.read used before)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from safetensors import safe_open

    from tokenwise_harness.checkpoint import ModelDir

    mdir = ModelDir(model_dir)
    names = sorted(mdir.safetensors_index)
    streams = [torch.cuda.Stream() for _ in range(workers)] if device.startswith("cuda") else None

    def one(i, name):
        ctx = torch.cuda.stream(streams[i % workers]) if streams else _null()
        with ctx:
            if how == "pread":
                w = mdir.read(name, device)
            else:
                with safe_open(str(mdir.safetensors_index[name]), framework="pt", device=device) as fh:
                    w = fh.get_tensor(name)
            if w.device.type == "cpu":
                float(w.view(-1)[::512].float().sum())  # touch every page, as the engine's use of it does
            sync(device)
            return w.numel()

    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(names)), names))
    secs = time.perf_counter() - t
    done.set()
    sampler.join()
    return secs, round((max(peak[0], rss_bytes()) - base) / 2**20, 1)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    import torch

    from tokenwise_harness.safetensors_io import read_threads

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--work", type=Path, default=Path("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp") / "bench_io")
    p.add_argument("--cache", type=Path, help="an existing cache file (default: write one into --work)")
    p.add_argument("--model_dir", type=Path, help="an existing safetensors model dir (default: write one)")
    p.add_argument("--cache_gb", type=float, default=8.0)
    p.add_argument("--weights_gb", type=float, default=1.6)
    p.add_argument("--chunk_tokens", type=int, default=4096)
    p.add_argument("--threads", default=None, help="thread counts to compare, e.g. 1,4,8,16 (default 1,4,N)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--keep", action="store_true", help="keep the files written into --work")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    n_default = read_threads()
    counts = sorted({int(x) for x in (a.threads or f"1,4,{n_default}").split(",")})
    rows: dict = {"cpu_count": os.cpu_count(), "default_threads": n_default, "device": a.device,
                  "chunk_tokens": a.chunk_tokens}

    def record(key, value):
        rows[key] = value
        print(f"{key}: {value}", flush=True)
        (a.out / "bench_io.json").write_text(json.dumps(rows, indent=2) + "\n")

    a.work.mkdir(parents=True, exist_ok=True)
    written = []
    cache = a.cache
    if cache is None:
        cache = a.work / "xy.safetensors"
        t = time.perf_counter()
        make_cache(cache, a.cache_gb)
        written.append(cache)
        record("cache_written_s", round(time.perf_counter() - t, 1))
    size = cache.stat().st_size
    record("cache_bytes", size)
    try:
        record("file_read_seq_GBs", round(size / best_of(lambda: file_read_1t(cache)) / 1e9, 2))
        for k in counts:
            record(f"file_read_{k}t_GBs", round(size / best_of(lambda: file_read_parallel(cache, k)) / 1e9, 2))
        for k in counts:
            secs = best_of(lambda: stream_time(cache, a.chunk_tokens, a.device, k, False)[0])
            record(f"stream_{k}t_GBs", round(size_streamed(cache) / secs / 1e9, 2))
        secs = best_of(lambda: stream_time(cache, a.chunk_tokens, a.device, None, True)[0], 1)
        record("stream_verify_GBs", round(size_streamed(cache) / secs / 1e9, 2))
        best_file = max(v for k, v in rows.items() if k.startswith("file_read_"))
        record("stream_default_vs_best_file_read", round(rows[f"stream_{n_default}t_GBs"] / best_file, 3)
               if f"stream_{n_default}t_GBs" in rows else None)

        model_dir = a.model_dir
        if model_dir is None:
            model_dir = a.work / "model"
            make_model(model_dir, a.weights_gb)
            written.append(model_dir)
        for k in counts:
            secs, total = min(weights_time(model_dir, a.device, str(k)) for _ in range(2))
            record(f"weights_{k}t_GBs", round(total / secs / 1e9, 2))
        for how in ("safetensors", "pread", "safetensors", "pread"):  # twice each, interleaved
            secs, grow = weights_peak_rss(model_dir, a.device, how)
            record(f"weights_4workers_{how}_s", round(secs, 2))
            record(f"weights_4workers_{how}_rss_growth_MiB", grow)
    finally:
        if not a.keep:
            import shutil

            for f in written:
                shutil.rmtree(f) if f.is_dir() else f.unlink()


def size_streamed(cache_path: Path) -> int:
    from tokenwise_harness.cache import XYCache

    cache = XYCache(cache_path, verify=False)
    keys = {k for e in cache.entries for k in (e.x_key, e.y_key) if k}
    total = 0
    for k in keys:
        shape = cache.shapes[k][1]
        total += shape[0] * shape[1] * cache.torch_dtype(k).itemsize
    return total


if __name__ == "__main__":
    main()
