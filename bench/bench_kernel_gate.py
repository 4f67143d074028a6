"""The kernel gate's speed (issue 16, item 6): built-in engine vs a user's kernel, one command.

    python bench/bench_kernel_gate.py --out "$OUT"            # GPU: 36-layer Qwen3-8B shape, 16,640 tokens
    python bench/bench_kernel_gate.py --small --out /tmp/kg   # CPU: tiny shapes, a couple of minutes

Builds (bench_process.py's builders) a 36-layer Qwen3-8B-shaped bf16 checkpoint in shards and
a synthetic compact X/Y cache of 16,640 tokens, then times, each as its own pytest process
(bench/peak_rss.py reports its peak RSS), the gate `-k "layer35-"` (7 projections x 3 configs
= 21 cases) with ranks 8,16,32 x nvfp4@16:

  builtin_cold     the built-in engine, empty low-rank store (it decomposes every weight)
  builtin_warm     the built-in engine again (factors from the store: the everyday CI rerun)
  weight_kernel    --weight-quantizer bench.user_kernel:svdq (independent torch SVDQuant: its own
                   float64 Gram eigh once per weight, its own casts; nothing reused across runs)
  torchao          --weight-quantizer torchao (torchao's NVFP4 cast), when torchao is installed
  model_level      --quantizer tokenwise_harness.numerics.svdq:fake_op (per config; under -k the model
                   holds only layer 35, the other layers empty placeholders: run.Evaluation.model)

The digest memo is warmed first (a checkpoint's bytes are hashed once per machine, whichever
path runs). Ratios against builtin_cold are the issue's targets: weight_kernel <= 1.5x,
model_level <= 3x. Baselines are recorded by builtin_cold (--update-baselines); the others are
gated against them, and their pass/fail counts are kept too. Writes OUT/bench_kernel_gate.json
(after every row) and OUT/bench_kernel_gate.log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SUMMARY: dict = {}
OUT = Path(".")


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(OUT / "bench_kernel_gate.log", "a") as fh:
        fh.write(line + "\n")


def record(name: str, info: dict) -> dict:
    SUMMARY[name] = info
    tmp = OUT / "bench_kernel_gate.json.tmp"
    tmp.write_text(json.dumps(SUMMARY, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, OUT / "bench_kernel_gate.json")
    log(f"{name}: {json.dumps(info, sort_keys=True)}")
    return info


def gate(name: str, args: list[str], cwd: Path, env: dict) -> dict:
    """One pytest gate process; wall seconds, exit code, outcome counts, peak RSS."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    PYTHONUNBUFFERED="1", **env)
    argv = [sys.executable, str(ROOT / "bench" / "peak_rss.py"), "-m", "pytest", "-p", "no:cacheprovider", "-q",
            f"--rootdir={cwd}", *args]
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=full_env, cwd=cwd)
    wall = time.perf_counter() - t
    with open(OUT / "bench_kernel_gate.log", "a") as fh:
        fh.write(f"--- {name}: {' '.join(argv)}\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}\n")
    peak = re.findall(r"PEAK_RSS_BYTES=(\d+)", r.stderr)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    info = {"wall_s": round(wall, 2), "rc": r.returncode,
            "outcome": {w: int(n) for n, w in re.findall(r"(\d+) (passed|failed|deselected|errors?)", last)},
            "pytest_s": float(m[-1]) if (m := re.findall(r" in ([\d.]+)s", last)) else None,
            "peak_rss_GiB": round(int(peak[-1]) / 2**30, 3) if peak else None, "args": args}
    if r.returncode not in (0, 1):
        info["stderr_tail"] = r.stderr[-800:]
    return record(name, info)


def main(argv=None) -> int:
    global OUT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="where the JSON and log go (default $OUT)")
    p.add_argument("--work", default=None, help="scratch dir (default: /dev/shm when large enough, else a temp dir)")
    p.add_argument("--small", action="store_true", help="tiny shapes on the CPU (a smoke run of this script)")
    p.add_argument("--tokens", type=int, default=None, help="cached tokens (default 16,640; --small 256)")
    p.add_argument("--skip", default="", help="comma-separated rows to skip: builtin_warm, weight_kernel, torchao, "
                                               "model_level")
    p.add_argument("--only", default="", help="comma-separated rows to run (the others skipped); with --work, a "
                                               "second call reuses the first one's checkpoint, cache and baselines")
    a = p.parse_args(argv)
    OUT = Path(a.out)
    OUT.mkdir(parents=True, exist_ok=True)
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_process import write_big_model, write_synthetic_cache

    device = "cuda" if torch.cuda.is_available() and not a.small else "cpu"
    if a.small:
        shape = dict(layers=2, hidden=128, inter=384, heads=2, kv_heads=1, vocab=512, layers_per_shard=1)
    else:
        shape = dict(layers=36, hidden=4096, inter=12288, heads=32, kv_heads=8, vocab=151936, layers_per_shard=4)
    tokens = a.tokens or (256 if a.small else 16640)
    rows = ("builtin_warm", "weight_kernel", "torchao", "model_level")
    skip = set(filter(None, a.skip.split(",")))
    if a.only:
        skip |= set(rows) - set(a.only.split(","))
    shm = Path("/dev/shm")
    big_enough = shm.is_dir() and shutil.disk_usage(shm).free > 60e9
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="kgate-", dir=shm if big_enough and not a.small else None))
    work.mkdir(parents=True, exist_ok=True)
    SUMMARY.update({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "shape": shape,
                    "tokens": tokens, "grid": "ranks 8,16,32 x nvfp4@16", "selection": f"-k layer{shape['layers'] - 1}-",
                    "torch": torch.__version__})
    model, cache = work / "model", work / "cache.safetensors"
    t = time.perf_counter()
    reused = (model / "config.json").is_file() and cache.is_file()
    if not reused:  # a --work dir from an earlier call keeps them
        write_big_model(model, device=device, **shape)
        os.environ["TOKENWISE_CACHE_DIR"] = str(work / "memo_setup")
        write_synthetic_cache(cache, model, tokens, device, compact=True)
    record("build", {"seconds": round(time.perf_counter() - t, 1), "reused": reused,
                     "weights_GB": round(sum(f.stat().st_size for f in model.iterdir()) / 1e9, 2),
                     "cache_GB": round(cache.stat().st_size / 1e9, 2)})

    rootdir = work / "gate"
    rootdir.mkdir(exist_ok=True)
    memo = work / "memo"
    from importlib.metadata import entry_points

    installed = any(ep.name == "tokenwise" for ep in entry_points(group="pytest11"))
    plugin = [] if installed else ["-p", "tokenwise_harness.pytest_plugin.hooks"]
    common = [*plugin, f"--model-dir={model}", f"--xy-path={cache}", "--ranks=8,16,32", "--qspecs=nvfp4@16",
              f"--baselines-dir={rootdir / 'baselines'}", "-k", f"layer{shape['layers'] - 1}-"]
    if device == "cuda":
        common.append("--device=cuda")
    env = {"TOKENWISE_CACHE_DIR": str(memo)}
    # Warm the digest memo (every path fingerprints the checkpoint), then empty the low-rank store.
    gate("warmup_digests", [*common, "--update-baselines"], rootdir, env)
    shutil.rmtree(memo / "lowrank", ignore_errors=True)
    cold = gate("builtin_cold", [*common, "--update-baselines"], rootdir, env)
    if "builtin_warm" not in skip:
        gate("builtin_warm", common, rootdir, env)
    user = None
    if "weight_kernel" not in skip:
        user = gate("weight_kernel", [*common, "--weight-quantizer", "bench.user_kernel:svdq"], rootdir, env)
    if "torchao" not in skip:
        try:
            import torchao  # noqa: F401

            gate("torchao", [*common, "--weight-quantizer", "torchao"], rootdir, env)
        except ImportError:
            record("torchao", {"skipped": "torchao is not installed"})
    model_level = None
    if "model_level" not in skip:
        model_level = gate("model_level", [*common, "--quantizer", "tokenwise_harness.numerics.svdq:fake_op"], rootdir,
                           env)
    ratios = {"target_weight_kernel": 1.5, "target_model_level": 3.0}
    if user is not None:
        ratios["weight_kernel_over_builtin_cold"] = round(user["wall_s"] / cold["wall_s"], 2)
    if user is not None and "builtin_warm" in SUMMARY:
        ratios["weight_kernel_over_builtin_warm"] = round(user["wall_s"] / SUMMARY["builtin_warm"]["wall_s"], 2)
    if model_level is not None:
        ratios["model_level_over_builtin_cold"] = round(model_level["wall_s"] / cold["wall_s"], 2)
    record("ratios", ratios)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
