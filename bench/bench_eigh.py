"""How many float64 eigendecompositions per second the GPU sustains, by concurrency (issue 17).

A cold run decomposes every weight once (numerics.lowrank: eigh of the 4096×4096 Gram matrix
of a Qwen3-8B-shaped weight in float64); the engine overlaps them on PREFETCH_DEPTH worker
threads with their own CUDA streams. This prints eigh/s for 1, 2, 4, 8 and 16 such workers, so
the depth can be chosen from a measurement.

    python bench/bench_eigh.py --out OUT [--n 4096] [--count 32]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--count", type=int, default=32, help="eigendecompositions per measurement")
    p.add_argument("--workers", default="1,2,4,8,16")
    a = p.parse_args()
    dev = torch.device("cuda")
    torch.linalg.eigh(torch.eye(2, dtype=torch.float64, device=dev))  # lazy CUDA linalg init, once
    w = torch.randn(a.n, 3 * a.n, device=dev, dtype=torch.float64)
    gram = w @ w.T
    rows = {}
    for k in map(int, a.workers.split(",")):
        streams = [torch.cuda.Stream(dev) for _ in range(k)]

        def one(i):
            with torch.cuda.device(dev), torch.cuda.stream(streams[i % k]):
                torch.linalg.eigh(gram)
                streams[i % k].synchronize()

        with ThreadPoolExecutor(max_workers=k) as pool:
            list(pool.map(one, range(k)))  # warm-up: each worker's handle and workspace
            torch.cuda.synchronize()
            t = time.perf_counter()
            list(pool.map(one, range(a.count)))
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t
        rows[k] = {"seconds": round(seconds, 3), "eigh_per_s": round(a.count / seconds, 2)}
        print(f"workers {k:2d}: {a.count} eigh of {a.n}x{a.n} float64 in {seconds:.2f} s = {a.count / seconds:.1f}/s",
              flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench_eigh.json").write_text(json.dumps({"n": a.n, "count": a.count, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
