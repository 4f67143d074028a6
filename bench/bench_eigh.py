"""How many top-32 decompositions per second the GPU sustains, by solver and concurrency (issue 17).

A cold run decomposes every weight once (numerics.lowrank: the top eigenvectors of the
4096×4096 float64 Gram matrix of a Qwen3-8B-shaped weight); the engine overlaps them on
PREFETCH_DEPTH worker threads with their own CUDA streams. This prints decompositions/s for
1, 2, 4, 8 and 16 such workers, for a full `eigh` and for the certified filtered solver
(numerics.top_eigen), and the filtered solver's error against the full eigh: the rank-k part
of G for k = 8, 16, 32, on a random weight (Marchenko–Pastur top, the hardest case) and on one
with outlier directions.

    python bench/bench_eigh.py --out OUT [--n 4096] [--count 32] [--solvers eigh,filtered]
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
    p.add_argument("--solvers", default="eigh,filtered")
    a = p.parse_args()
    from tokenwise_harness.numerics import top_eigen

    dev = torch.device("cuda")
    torch.linalg.eigh(torch.eye(2, dtype=torch.float64, device=dev))  # lazy CUDA linalg init, once
    w = torch.randn(a.n, 3 * a.n, device=dev, dtype=torch.float64)
    gram = w @ w.T
    solve = {"eigh": lambda g: torch.linalg.eigh(g), "filtered": lambda g: top_eigen.top_eigenvectors(g, 32)}
    rows = {}
    for solver in a.solvers.split(","):
        rows[solver] = _rates(torch, dev, gram, solve[solver], solver, a)
    accuracy = _accuracy(torch, dev, a.n, top_eigen)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench_eigh.json").write_text(json.dumps({"n": a.n, "count": a.count, "rows": rows,
                                                             "accuracy": accuracy}, indent=2))
    return 0


def _rates(torch, dev, gram, solve, solver, a):
    rows = {}
    for k in map(int, a.workers.split(",")):
        streams = [torch.cuda.Stream(dev) for _ in range(k)]

        def one(i):
            with torch.cuda.device(dev), torch.cuda.stream(streams[i % k]):
                solve(gram)
                streams[i % k].synchronize()

        with ThreadPoolExecutor(max_workers=k) as pool:
            list(pool.map(one, range(k)))  # warm-up: each worker's handle and workspace
            torch.cuda.synchronize()
            t = time.perf_counter()
            list(pool.map(one, range(a.count)))
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t
        rows[k] = {"seconds": round(seconds, 3), "per_s": round(a.count / seconds, 2)}
        print(f"{solver:8s} workers {k:2d}: {a.count} top-32 of {a.n}x{a.n} float64 in {seconds:.2f} s = "
              f"{a.count / seconds:.1f}/s", flush=True)
    return rows


def _accuracy(torch, dev, n, top_eigen):
    """The filtered solver's rank-k parts of G against the full eigh's, and its work per solve."""
    g = torch.Generator(device=dev).manual_seed(1)
    W = torch.randn(n, 3 * n, device=dev, dtype=torch.float64, generator=g) / n**0.5
    spikes = torch.linalg.qr(torch.randn(n, 6, device=dev, dtype=torch.float64, generator=g)).Q
    spikes = spikes * torch.tensor([80.0, 40, 25, 12, 6, 3], device=dev, dtype=torch.float64)
    spiky = W + spikes @ torch.randn(6, 3 * n, device=dev, dtype=torch.float64, generator=g) / (3 * n) ** 0.5
    out = {}
    for name, M in (("random", W), ("outliers", spiky)):
        G = M @ M.T
        evals, evecs = torch.linalg.eigh(G)
        ref = evecs.flip(-1)
        before = dict(top_eigen.COUNTS)
        V = top_eigen.top_eigenvectors(G, 32)
        row = {"products": top_eigen.COUNTS["products"] - before["products"],
               "gave_up": top_eigen.COUNTS["gave_up"] - before["gave_up"]}
        for k in (8, 16, 32):
            want = ref[:, :k] @ (ref[:, :k].T @ G)
            got = V[:, :k] @ (V[:, :k].T @ G)
            row[f"rank{k}_rel_err"] = float((got - want).norm() / want.norm())
            row[f"gap{k}_rel"] = float((evals[-k] - evals[-k - 1]) / evals[-1])
        out[name] = row
        print(f"accuracy {name}: {row}", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
