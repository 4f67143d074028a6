"""Where the warm 4-layer eval_fake process's wall time goes (issue 17's last row), in one call:

    python bench/warm_timeline.py --out OUT [--reps 3] [--variants NAME=ENV,...]

Builds bench_process's synthetic 4-layer model and seed-layout cache, runs one cold eval_fake
(it fills the digest memo, the low-rank store and Triton's kernel cache), then:
  * floors, each a fresh process: `python -c pass`, `import torch`, torch + CUDA start
    (bench/cuda_init.py), the same with every GPU library loaded (--libs), `--help`;
  * bench/cuda_overlap.py seq|overlap on the cache file: can CUDA's start overlap reads?
  * the warm eval_fake process `--reps` times, and once under bench/sample_eval.py (a timeline
    of every thread); `--variants` adds warm reps with extra environment (NAME=K:V;K:V).
Rows go to OUT/bench_process.json / .log as bench_process writes them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_process as bp  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no_floors", action="store_true", help="skip the floor and cuda_overlap processes")
    p.add_argument("--sampled", type=int, default=1, help="warm runs under sample_eval.py (default 1)")
    p.add_argument("--variants", default="", help="NAME=K:V;K:V,... extra warm reps with that environment")
    a = p.parse_args()
    bp.OUT = Path(a.out)
    bp.OUT.mkdir(parents=True, exist_ok=True)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path("/dev/shm/tokenwise_timeline" if Path("/dev/shm").is_dir() else "/tmp/tokenwise_timeline")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    m4, cache = work / "m4", work / "seed.safetensors"
    small = device == "cpu"
    shape = dict(hidden=128, inter=384, heads=4, kv_heads=2) if small else dict(hidden=4096, inter=12288, heads=32,
                                                                                  kv_heads=8)
    n_tokens, chunk = (1024, 256) if small else (16640, 4096)
    bp.write_big_model(m4, device=device, dtype_name="float32", layers=4, vocab=1024, layers_per_shard=4, **shape)
    os.environ["TOKENWISE_CACHE_DIR"] = str(work / "memo_setup")
    bp.write_synthetic_cache(cache, m4, n_tokens, device, compact=False)
    env = {"TOKENWISE_CACHE_DIR": str(work / "memo")}
    root = str(bp.ROOT)

    if not a.no_floors:
        bp.process("floor_python", ["-c", "pass"])
        bp.process("floor_import_torch", ["-c", "import torch"])
        bp.process("floor_cuda", [f"{root}/bench/cuda_init.py"])
        bp.process("floor_cuda_libs", [f"{root}/bench/cuda_init.py", "--libs"])
        bp.process("floor_help", ["-m", "tokenwise_harness", "--help"])
    if device == "cuda" and not a.no_floors:
        for rep in range(2):
            for mode in ("seq", "overlap", "prestart"):
                bp.process(f"cuda_overlap_{mode}_{rep}", [f"{root}/bench/cuda_overlap.py", str(cache), mode])

    args = ["eval_fake", f"--model_dir={m4}", f"--xy_path={cache}", "--ranks=8,16,32", "--qspecs=nvfp4@16",
            f"--chunk_tokens={chunk}"]
    bp.process("eval_cold", ["-m", "tokenwise_harness", *args, f"--out_json={work / 'cold.json'}"], env)
    for rep in range(a.reps):
        bp.process(f"eval_warm_{rep}", ["-m", "tokenwise_harness", *args, f"--out_json={work / 'w.json'}"], env)
    for spec in filter(None, a.variants.split(",")):
        name, _, kvs = spec.partition("=")
        extra = dict(kv.split(":", 1) for kv in filter(None, kvs.split(";")))
        for rep in range(a.reps):
            bp.process(f"eval_warm_{name}_{rep}", ["-m", "tokenwise_harness", *args, f"--out_json={work / 'v.json'}"],
                       {**env, **extra})
    for rep in range(a.sampled):
        bp.process(f"eval_warm_sampled_{rep}", [f"{root}/bench/sample_eval.py",
                                                f"--out={bp.OUT / f'timeline_warm_{rep}.txt'}", "--", *args,
                                                f"--out_json={work / 's.json'}"], env)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
