"""What SVDQuant's calibration recipe buys and costs (calibrate.py, issue 11).

    pytest bench/bench_calibrate.py -s                          # CPU, a small 1-layer demo model (~1 min)
    TOKENWISE_BENCH_FULL=1 pytest bench/bench_calibrate.py -s   # one Qwen3-8B-shaped layer, 16,640 tokens, CUDA
    python bench/bench_calibrate.py [--full] [--model_dir M --xy_path C] [--out calib.json]

Steps, each timed end to end through the library (what the CLI runs) and scored by the
engine's nmse on the cache, for the grid --ranks 32 --qspecs nvfp4@16 by default:

    eval_fake  --lowrank_iters 1 / 3 / 10         one-shot vs iterated low-rank branch
    smooth --alpha 0.5       + eval_smooth         fixed SmoothQuant exponent
    smooth --alpha search    + eval_smooth         searched exponent per layer and input group
    smooth --alpha search    + eval_smooth --lowrank_iters 10

Each row: seconds, mean nmse over projections, and the geometric mean over projections of
nmse / nmse(one-shot, unsmoothed) ("ratio": 0.5 = half the error; "ratio_worst" the largest
per-projection ratio; "pooled_ratio" = mean nmse / mean one-shot nmse). FULL builds the demo
model (random weights with planted outlier channels, the demo builder) at Qwen3-8B's shape
(hidden 4096, intermediate 12288, 32 x 128 heads, 8 KV heads), one layer, and captures
130 x 128 tokens in fp16; give --model_dir/--xy_path to measure a real checkpoint instead
(e.g. SmolLM2). TOKENWISE_BENCH_ITERS=1,3,10,100 changes the iteration counts. The summary
goes to $TOKENWISE_BENCH_OUT (default bench_calibrate.json) and each test's extra_info.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

FULL = os.environ.get("TOKENWISE_BENCH_FULL") == "1"
ITERS = tuple(int(n) for n in os.environ.get("TOKENWISE_BENCH_ITERS", "1,3,10").split(","))
RANKS, QSPECS = "32", "nvfp4@16"
QUIET = dict(progress=False, log=lambda msg: None)
NMSE_FLOOR = 1e-9  # one-shot nmse below this is float rounding, left out of the ratios


def _device(device=None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def build_inputs(workdir, full: bool = FULL, device=None) -> tuple[Path, Path]:
    """A 1-layer demo model (Qwen3-8B-shaped when full) and an X/Y cache of it."""
    from tokenwise_harness.capture.save_xy import save_xy
    from tokenwise_harness.demo.models import make_demo_model

    workdir = Path(workdir)
    shape = (dict(hidden_size=4096, intermediate_size=12288, num_heads=32, num_kv_heads=8) if full
             else dict(hidden_size=256, intermediate_size=768, num_heads=4, num_kv_heads=2))
    samples = dict(cn=50, eu=80, length=128, save_dtype="fp16") if full else dict(cn=4, eu=4, length=64,
                                                                                   save_dtype="fp32")
    model_dir = make_demo_model("qwen3", workdir / "model", num_layers=1, **shape)
    cache = save_xy(model_dir, workdir / "cache", "c", device=_device(device), **samples, **QUIET)
    return model_dir, cache


def _nmse(report: dict) -> dict:
    """{(layer, proj, cfg without ;iters): nmse}."""
    out = {}
    for layer, blocks in report["by_layer"].items():
        for block in blocks.values():
            for proj, cfgs in block["by_proj"].items():
                for key, m in cfgs.items():
                    out[(layer, proj, key.split(";iters=")[0])] = m["nmse"]
    return out


def _row(name: str, seconds: float, nmse: dict, base: dict | None, **extra) -> dict:
    row = {"step": name, "seconds": round(seconds, 3), "nmse_mean": sum(nmse.values()) / len(nmse)}
    if base:
        # projections the one-shot config already reproduces to float rounding (a rank at or
        # above min(out, in)) carry no signal: their ratios are noise over noise
        keys = [k for k in base if base[k] > NMSE_FLOOR and nmse.get(k, 0) > 0]
        row["ratio"] = math.exp(sum(math.log(nmse[k] / base[k]) for k in keys) / len(keys)) if keys else None
        row["ratio_worst"] = max((nmse[k] / base[k] for k in keys), default=None)
        row["pooled_ratio"] = sum(nmse[k] for k in keys) / sum(base[k] for k in keys) if keys else None
    row.update(extra)
    return row


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Calibration:
    """The steps of the recipe on one model + cache; each method returns one summary row."""

    def __init__(self, model_dir, xy_path, workdir, device=None, ranks=RANKS, qspecs=QSPECS):
        self.model_dir, self.xy_path, self.workdir = str(model_dir), str(xy_path), Path(workdir)
        self.device, self.ranks, self.qspecs = _device(device), ranks, qspecs
        self.base: dict | None = None
        self.seconds_smooth: dict = {}  # alpha -> seconds of the smooth step (reused by later rows)

    def _eval(self, model_dir, smooth: bool, iters: int) -> tuple[float, dict]:
        from tokenwise_harness.run import EvalSpec, run_eval

        spec = EvalSpec.from_text(self.ranks, self.qspecs, model_dir=str(model_dir), xy_path=self.xy_path,
                                  smooth=smooth, lowrank_iters=iters, device=self.device,
                                  model_flag="--smooth_model_dir" if smooth else "--model_dir")
        _sync(self.device)
        t0 = time.perf_counter()
        report = run_eval(spec, **QUIET)
        _sync(self.device)
        return time.perf_counter() - t0, _nmse(report)

    def eval_fake(self, iters: int) -> dict:
        seconds, nmse = self._eval(self.model_dir, False, iters)
        if iters == 1:
            self.base = nmse
        return _row(f"eval_fake --lowrank_iters {iters}", seconds, nmse, self.base)

    def smooth(self, alpha, iters: int = 1) -> dict:
        from tokenwise_harness.calib.smooth import smooth

        out = self.workdir / f"smooth_{alpha}"
        if alpha not in self.seconds_smooth:
            _sync(self.device)
            t0 = time.perf_counter()
            # the search scores candidates with the grid's own (first) rank and qspec
            smooth(self.model_dir, self.xy_path, out, alpha=alpha, device=self.device, log=lambda m: None,
                   search_qspec=self.qspecs.split(",")[0], search_rank=int(self.ranks.split(",")[0]))
            _sync(self.device)
            self.seconds_smooth[alpha] = time.perf_counter() - t0
        seconds_smooth = self.seconds_smooth[alpha]
        seconds_eval, nmse = self._eval(out, True, iters)
        extra = {"seconds_smooth": round(seconds_smooth, 3), "seconds_eval": round(seconds_eval, 3)}
        if alpha == "search":
            meta = json.loads((out / "tokenwise_smooth.json").read_text())
            extra["alphas"] = {g: (c["a"], c["b"]) for g, c in meta["alphas"].items()}
        name = f"smooth --alpha {alpha} + eval_smooth" + (f" --lowrank_iters {iters}" if iters > 1 else "")
        return _row(name, seconds_smooth + seconds_eval, nmse, self.base, **extra)


def bench_calibration(model_dir=None, xy_path=None, full: bool = FULL, device=None, iters=ITERS,
                      workdir=None, ranks=RANKS, qspecs=QSPECS, log=print) -> dict:
    """Every step once; returns {"device", "shape", "rows": [...]} (and logs one line per row)."""
    import torch

    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_calib.")) if own else Path(workdir)
    try:
        t0 = time.perf_counter()
        if model_dir is None:
            model_dir, xy_path = build_inputs(workdir, full, device)
        setup = time.perf_counter() - t0
        cal = Calibration(model_dir, xy_path, workdir, device, ranks, qspecs)
        rows = [cal.eval_fake(n) for n in sorted(set(iters) | {1})]
        rows += [cal.smooth(0.5), cal.smooth("search"), cal.smooth("search", max(iters))]
        for row in rows:
            log(f"{row['step']:<58} {row['seconds']:8.2f} s  nmse {row['nmse_mean']:.3e}  "
                f"ratio {row.get('ratio') or float('nan'):.3f}  worst {row.get('ratio_worst') or float('nan'):.3f}  "
                f"pooled {row.get('pooled_ratio') or float('nan'):.3f}")
        gpu = torch.cuda.get_device_name() if cal.device.startswith("cuda") else None
        return {"device": cal.device, "gpu": gpu, "model_dir": str(model_dir), "xy_path": str(xy_path),
                "grid": {"ranks": ranks, "qspecs": qspecs}, "setup_seconds": round(setup, 1), "rows": rows}
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


# ----------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # plain `python bench/bench_calibrate.py` needs no pytest
    pytest = None

if pytest is not None:
    SUMMARY: list[dict] = []

    @pytest.fixture(scope="module")
    def calib(tmp_path_factory):
        workdir = tmp_path_factory.mktemp("calib")
        model_dir, xy_path = build_inputs(workdir)
        return Calibration(model_dir, xy_path, workdir)

    def _bench(benchmark, fn):
        row = benchmark.pedantic(fn, rounds=1, iterations=1)
        benchmark.extra_info.update(row)
        SUMMARY.append(row)
        print(f"\n{row}")
        return row

    @pytest.mark.parametrize("iters", sorted(set(ITERS) | {1}))
    def test_eval_fake_lowrank_iters(benchmark, calib, iters):
        row = _bench(benchmark, lambda: calib.eval_fake(iters))
        if iters > 1:
            assert row["ratio_worst"] <= 1.0  # the best iterate is kept: never worse

    def test_smooth_fixed(benchmark, calib):
        _bench(benchmark, lambda: calib.smooth(0.5))

    def test_smooth_search(benchmark, calib):
        _bench(benchmark, lambda: calib.smooth("search"))

    def test_smooth_search_iterated(benchmark, calib):
        _bench(benchmark, lambda: calib.smooth("search", max(ITERS)))
        out = Path(os.environ.get("TOKENWISE_BENCH_OUT", "bench_calibrate.json"))
        out.write_text(json.dumps({"device": calib.device, "rows": SUMMARY}, indent=2) + "\n")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="Qwen3-8B-shaped layer (default: small)")
    p.add_argument("--model_dir", default=None)
    p.add_argument("--xy_path", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--iters", default=",".join(map(str, ITERS)))
    p.add_argument("--ranks", default=RANKS)
    p.add_argument("--qspecs", default=QSPECS)
    p.add_argument("--out", default=None, help="write the summary JSON here")
    a = p.parse_args(argv)
    if (a.model_dir is None) != (a.xy_path is None):
        p.error("--model_dir and --xy_path go together")
    result = bench_calibration(a.model_dir, a.xy_path, a.full or FULL, a.device,
                               tuple(int(n) for n in a.iters.split(",")), ranks=a.ranks, qspecs=a.qspecs)
    text = json.dumps(result, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
