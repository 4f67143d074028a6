"""The seed's evaluation flow, reproduced as the baseline the engine is measured against.

Per config: fake-quantize the whole model in place (a full torch.linalg.svd of every
allowlisted weight, the rank-r branch, the quantized residual), then for every projection
compute Y~ = X·W~ᵀ (+ b) in the model's dtype from the cached X and compare it with the
cached Y, then restore every weight from the CPU backup. This is what a user would run
without the harness (seed §2).
"""

from __future__ import annotations

import torch

from tokenwise_harness.allowlist import iter_allowed_linears
from tokenwise_harness.numerics import formats
from tokenwise_harness.numerics.metrics import TokenwiseAccumulator


def seed_fake_op(model, cfg) -> None:
    """In place, the straightforward way: one full SVD per weight per config."""
    with torch.no_grad():
        for _, mod in iter_allowed_linears(model):
            w = mod.weight.float()
            branch = torch.zeros_like(w)
            if cfg.rank > 0:
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                branch = (u[:, :cfg.rank] * s[:cfg.rank]) @ vh[:cfg.rank]
            w_tilde = branch + formats.fake_quantize(w - branch, cfg.fmt, cfg.blk) if cfg.fmt != "none" else branch
            mod.weight.copy_(w_tilde.to(mod.weight.dtype))


def seed_way_eval(model, cache, grid, chunk_tokens: int, device) -> dict:
    targets = list(iter_allowed_linears(model))
    backup = {t: mod.weight.detach().to("cpu", copy=True) for t, mod in targets}
    results = {}
    for cfg in grid:
        seed_fake_op(model, cfg)
        for target, mod in targets:
            entry = cache.entry(target)
            acc = TokenwiseAccumulator()
            with torch.no_grad():
                for start in range(0, cache.n_tokens, chunk_tokens):
                    end = min(start + chunk_tokens, cache.n_tokens)
                    x = cache.rows(entry.x_key, start, end).to(device=device, dtype=mod.weight.dtype)
                    y = cache.rows(entry.y_key, start, end).to(device=device, dtype=torch.float32)
                    y_tilde = mod(x).float()
                    acc.update(y_tilde - y, (y * y).sum(dim=1))
            results.setdefault((target.layer, target.block, target.proj), {})[cfg.key] = acc.result()
        with torch.no_grad():
            for target, mod in targets:
                mod.weight.copy_(backup[target])
    return results


def main(argv=None) -> int:
    """The seed's flow as a process: load the model (transformers, bf16 on CUDA), score the grid."""
    import argparse
    import json
    import time

    from transformers import AutoModelForCausalLM

    from tokenwise_harness.cache import XYCache
    from tokenwise_harness.grid import build_grid, parse_qspecs, parse_ranks

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--xy_path", required=True)
    p.add_argument("--out_json", required=True)
    p.add_argument("--ranks", default="8,16,32")
    p.add_argument("--qspecs", default="nvfp4@16")
    p.add_argument("--chunk_tokens", type=int, default=4096)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype).to(device).eval()
    grid = build_grid(parse_ranks(a.ranks), parse_qspecs(a.qspecs), "combined")
    t = time.perf_counter()
    results = seed_way_eval(model, XYCache(a.xy_path), grid, a.chunk_tokens, device)
    seconds = time.perf_counter() - t
    out = {"eval_seconds": seconds, "results": {f"{k[0]}.{k[1]}.{k[2]}": v for k, v in results.items()}}
    with open(a.out_json, "w") as fh:
        json.dump(out, fh)
    print(f"seed_way: {len(results)} projections x {len(grid)} configs in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
