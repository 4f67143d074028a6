"""End-to-end speed of the harness against the seed's flow (pytest-benchmark).

    pytest bench/bench_engine.py                          # CPU, a small stack (~1 min)
    TOKENWISE_BENCH_FULL=1 pytest bench/bench_engine.py   # 4 Qwen3-8B-shaped layers, 16,640 tokens, CUDA

FULL: hidden 4096, intermediate 12288, 32 heads x 128, 8 KV heads, 4 layers, random weights
(the demo-model builder, with planted outlier channels), the embedded corpus at 130 x 128
tokens, grid ranks 8,16,32 x nvfp4@16. Measured in one run: save_xy tokens/s and peak host
and GPU memory (seed layout and compact layout, with their cache bytes); the engine's
seconds per config, SVD seconds per weight, error-matmul TFLOP/s (against the card's own
GEMM rate, measured here too) and peak memory; a W4A4 row; the seed's flow on the same grid.
Each test stores its figures in benchmark.extra_info; the last one writes a summary to
$TOKENWISE_BENCH_OUT (default bench_summary.json).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from tokenwise_harness import engine as evaluate
from tokenwise_harness.cache import XYCache
from tokenwise_harness.capture.save_xy import save_xy
from tokenwise_harness.checkpoint import ModelDir
from tokenwise_harness.grid import build_grid, parse_qspecs

FULL = os.environ.get("TOKENWISE_BENCH_FULL") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if FULL:
    SHAPE = dict(hidden_size=4096, intermediate_size=12288, num_heads=32, num_kv_heads=8, num_layers=4)
    SAMPLES = dict(cn=50, eu=80, length=128)
else:
    SHAPE = dict(hidden_size=128, intermediate_size=384, num_heads=2, num_kv_heads=1, num_layers=2)
    SAMPLES = dict(cn=2, eu=2, length=64)
GRID = build_grid([8, 16, 32], parse_qspecs("nvfp4@16"), "combined")
W4A4_GRID = build_grid([8, 16, 32], parse_qspecs("nvfp4@16"), "combined", parse_qspecs("nvfp4@16"))
CHUNK = 4096
SUMMARY: dict = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "shape": SHAPE,
                 "samples": SAMPLES, "grid": [c.key for c in GRID]}
_STATE: dict = {}


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.gpu_peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0

    def info(self) -> dict:
        return {"host_rss_peak_GiB": round(self.peak / 2**30, 3),
                "host_rss_growth_GiB": round((self.peak - self.base) / 2**30, 3),
                "gpu_peak_GiB": round(self.gpu_peak / 2**30, 3)}


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return Path(os.environ.get("TOKENWISE_BENCH_DIR") or tmp_path_factory.mktemp("bench_engine"))


@pytest.fixture(scope="module")
def model_dir(workdir):
    from tokenwise_harness.demo.models import make_demo_model

    out = workdir / "stack"
    if not (out / "config.json").is_file():
        t = time.perf_counter()
        make_demo_model("qwen3", out, **SHAPE)
        SUMMARY["model_build_s"] = round(time.perf_counter() - t, 1)
    return out


def _capture(model_dir, workdir, compact: bool) -> Path:
    key = "compact" if compact else "seed"
    if key not in _STATE:
        _STATE[key] = save_xy(model_dir, workdir / "cache", key, device=DEVICE, compact=compact, batch_size=16,
                              progress=False, log=lambda m: None, **SAMPLES)
    return _STATE[key]


@pytest.mark.parametrize("layout", ["seed", "compact"])
def test_save_xy(benchmark, model_dir, workdir, layout):
    with PeakRSS() as mem:
        path = benchmark.pedantic(lambda: _capture(model_dir, workdir, layout == "compact"), rounds=1, iterations=1)
    cache = XYCache(path)
    seconds = benchmark.stats.stats.mean if benchmark.stats else float("nan")
    info = {"tokens": cache.n_tokens, "tokens_per_s": round(cache.n_tokens / seconds, 1), "seconds": round(seconds, 2),
            "cache_bytes": path.stat().st_size, "cache_GiB": round(path.stat().st_size / 2**30, 3), **mem.info()}
    benchmark.extra_info.update(info)
    SUMMARY[f"save_xy_{layout}"] = info


def _engine(model_dir, cache_path, grid, verify=True):
    cache = XYCache(cache_path, verify=verify)
    stats = evaluate.EngineStats()
    source = evaluate.CheckpointWeights(ModelDir(model_dir), False)
    _sync()
    t = time.perf_counter()
    cache.verify_in_background()  # as eval_fake does: checksums hashed beside the engine
    results = evaluate.evaluate_grid(cache, source, grid, CHUNK, DEVICE, progress=False, stats=stats)
    _sync()
    cache.wait_verified()
    return results, stats, time.perf_counter() - t


@pytest.mark.parametrize("layout", ["seed", "compact"])
def test_engine(benchmark, model_dir, workdir, layout):
    path = _capture(model_dir, workdir, layout == "compact")
    with PeakRSS() as mem:
        results, stats, seconds = benchmark.pedantic(lambda: _engine(model_dir, path, GRID), rounds=1, iterations=1)
    info = {"seconds": round(seconds, 2), "seconds_per_config": round(seconds / len(GRID), 3),
            "svd_s_per_weight": round(stats.seconds_decompose / stats.weights, 4),
            "quantize_s": round(stats.seconds_quantize, 3), "error_phase_s": round(stats.seconds_error, 3),
            "error_phase_TFLOPs": round(stats.error_flops / stats.seconds_error / 1e12, 1),
            "decompositions": stats.decompositions, "weights": stats.weights, **mem.info()}
    benchmark.extra_info.update(info)
    SUMMARY[f"engine_{layout}"] = info
    _STATE[f"results_{layout}"] = results


def test_engine_unverified(benchmark, model_dir, workdir):
    """The seed layout again with per-tensor sha256 verification off (--no_verify_cache)."""
    path = _capture(model_dir, workdir, False)
    results, stats, seconds = benchmark.pedantic(lambda: _engine(model_dir, path, GRID, verify=False),
                                                 rounds=1, iterations=1)
    info = {"seconds": round(seconds, 2), "seconds_per_config": round(seconds / len(GRID), 3),
            "error_phase_s": round(stats.seconds_error, 3), "svd_s": round(stats.seconds_decompose, 2)}
    benchmark.extra_info.update(info)
    SUMMARY["engine_seed_unverified"] = info


def test_io_floor(benchmark, model_dir, workdir):
    """What the machine allows for the cache: one sequential read of the file, and sha256 speed."""
    import hashlib

    path = _capture(model_dir, workdir, False)
    buf = bytearray(64 << 20)
    view = memoryview(buf)

    def read_all():
        t, total = time.perf_counter(), 0
        with open(path, "rb", buffering=0) as fh:
            while (n := fh.readinto(view)) > 0:
                total += n
        return total, time.perf_counter() - t

    total, seconds = benchmark.pedantic(read_all, rounds=1, iterations=1)
    t = time.perf_counter()
    for _ in range(8):
        hashlib.sha256(view).digest()
    sha_s = time.perf_counter() - t
    info = {"file_read_GBs": round(total / seconds / 1e9, 2), "sha256_GBs_one_thread": round(8 * len(buf) / sha_s / 1e9, 2),
            "cache_bytes": total}
    benchmark.extra_info.update(info)
    SUMMARY["io_floor"] = info


def test_engine_w4a4(benchmark, model_dir, workdir):
    path = _capture(model_dir, workdir, True)
    results, stats, seconds = benchmark.pedantic(lambda: _engine(model_dir, path, W4A4_GRID), rounds=1, iterations=1)
    info = {"seconds": round(seconds, 2), "seconds_per_config": round(seconds / len(W4A4_GRID), 3),
            "error_phase_TFLOPs": round(stats.error_flops / stats.seconds_error / 1e12, 1)}
    benchmark.extra_info.update(info)
    SUMMARY["engine_w4a4_compact"] = info


def test_seed_way(benchmark, model_dir, workdir):
    from seed_way import seed_way_eval
    from transformers import AutoModelForCausalLM

    path = _capture(model_dir, workdir, False)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEVICE).eval()
    cache = XYCache(path)

    def run():
        _sync()
        t = time.perf_counter()
        out = seed_way_eval(model, cache, GRID, CHUNK, DEVICE)
        _sync()
        return out, time.perf_counter() - t

    results, seconds = benchmark.pedantic(run, rounds=1, iterations=1)
    info = {"seconds": round(seconds, 2), "seconds_per_config": round(seconds / len(GRID), 3), "dtype": str(dtype)}
    benchmark.extra_info.update(info)
    SUMMARY["seed_way"] = info
    ours = _STATE.get("results_seed")
    if ours:  # same numbers, up to the seed's 16-bit X·W~ᵀ - Y
        key = (0, "mlp", "down_proj")
        SUMMARY["nmse_check"] = {"engine": ours[key][GRID[0].key]["nmse"], "seed_way": results[key][GRID[0].key]["nmse"]}


def test_error_matmul_rate(benchmark):
    """The engine's error GEMM (X fp16 [tokens, in] · ΔWᵀ fp16, fp32 out) against the card's GEMM rate."""
    n, k, m = (16640, 4096, 12288) if FULL else (1024, 256, 768)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    x = torch.randn(n, k, device=DEVICE).to(dtype)
    w = torch.randn(m, k, device=DEVICE).to(dtype)
    mm = evaluate.ErrorMatmul(DEVICE, dtype)
    op_x, op_w = (x, 1.0), mm.prepare(w.float())

    def timed(fn, reps=10):
        fn()
        _sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync()
        return (time.perf_counter() - t) / reps

    flops = 2 * n * k * m
    engine_s = benchmark.pedantic(lambda: timed(lambda: mm(op_x, op_w)), rounds=1, iterations=1)
    info = {"engine_TFLOPs": round(flops / engine_s / 1e12, 3)}
    s = 8192 if FULL else 1024
    a, b = torch.randn(s, s, device=DEVICE).to(dtype), torch.randn(s, s, device=DEVICE).to(dtype)
    info["card_gemm_TFLOPs_" + str(dtype).split(".")[1]] = round(2 * s**3 / timed(lambda: a @ b) / 1e12, 3)
    if DEVICE == "cuda":
        a32, b32 = a.float(), b.float()
        torch.backends.cuda.matmul.allow_tf32 = True
        info["card_gemm_TFLOPs_tf32"] = round(2 * s**3 / timed(lambda: a32 @ b32) / 1e12, 1)
        torch.backends.cuda.matmul.allow_tf32 = False
        info["card_gemm_TFLOPs_fp32"] = round(2 * s**3 / timed(lambda: a32 @ b32, 3) / 1e12, 1)
        nbytes = a32.numel() * 4
        copy_s = timed(lambda: a32.clone())
        info["card_copy_GBs"] = round(2 * nbytes / copy_s / 1e9, 1)
    key = [k for k in info if k.startswith("card_gemm_TFLOPs_")][0]
    info["fraction_of_card"] = round(info["engine_TFLOPs"] / info[key], 3)
    benchmark.extra_info.update(info)
    SUMMARY["error_matmul"] = info


def test_write_summary():
    engine, seed = SUMMARY.get("engine_seed"), SUMMARY.get("seed_way")
    if engine and seed:
        SUMMARY["speedup_seed_layout"] = round(seed["seconds"] / engine["seconds"], 1)
    if SUMMARY.get("engine_compact") and seed:
        SUMMARY["speedup_compact_layout"] = round(seed["seconds"] / SUMMARY["engine_compact"]["seconds"], 1)
    out = Path(os.environ.get("TOKENWISE_BENCH_OUT", "bench_summary.json"))
    out.write_text(json.dumps(SUMMARY, indent=2, sort_keys=True) + "\n")
    print(json.dumps(SUMMARY, indent=2, sort_keys=True))
