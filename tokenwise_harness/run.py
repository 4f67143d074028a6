"""The seed's evaluation flows end to end: resolve inputs, run the engine, write the report.

Shared by the CLI (eval_fake / eval_smooth) and the pytest plugin, so both score the same
numbers from the same code.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenwise_harness import __version__
from tokenwise_harness.cache import XYCache
from tokenwise_harness.calib.smooth import SMOOTH_META_FILE
from tokenwise_harness.checkpoint import ModelDir, load_model, resolve_torch_dtype
from tokenwise_harness.device import pick_device
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import QSpec, SvdqConfig, build_grid, parse_qspecs, parse_ranks


def resolve_callable(spec: str, flag: str) -> Callable:
    """'package.module:function' -> the function (a user's own implementation)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HarnessError(f"{flag} {spec!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HarnessError(f"{flag} {spec!r}: cannot import {module_name} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise HarnessError(f"{flag} {spec!r}: {module_name} has no function {attr}")
    return fn


@dataclass
class EvalSpec:
    """Everything an evaluation needs, validated before any heavy work."""

    model_dir: str
    xy_path: str
    ranks: list[int]
    qspecs: list[QSpec]
    grid_mode: str = "combined"
    chunk_tokens: int = 4096
    smooth: bool = False
    quantizer: str | None = None
    no_restore: bool = False
    torch_dtype: str = "auto"
    device_map: str | None = None
    device: str | None = None
    act_qspecs: list[QSpec] = field(default_factory=list)
    lowrank_iters: int = 1
    verify_cache: bool = False  # check every tensor's checksum up front
    no_verify_cache: bool = False  # skip the checksum check done while each tensor streams
    model_flag: str = "--model_dir"

    @classmethod
    def from_text(cls, ranks: str, qspecs: str, **kw) -> "EvalSpec":
        return cls(ranks=parse_ranks(ranks), qspecs=parse_qspecs(qspecs), **kw)

    def grid(self) -> list[SvdqConfig]:
        return build_grid(self.ranks, self.qspecs, self.grid_mode, self.act_qspecs, self.lowrank_iters)


def check_cache_model(cache: XYCache, mdir: ModelDir, smooth: bool) -> None:
    """A cache must come from this model (or, for a smoothed dir, from the model it was made from)."""
    fingerprint = mdir.fingerprint
    if smooth:

        meta_file = mdir.path / SMOOTH_META_FILE
        if meta_file.is_file():
            fingerprint = _read_smooth_meta(mdir).get("source_model_fingerprint", fingerprint)
    hint = f"tokenwise-precision save_xy --model_dir <the model> --save_path {cache.path.parent} " \
           f"--label {cache.path.stem}"
    cache.check_model(fingerprint, "--smooth_model_dir" if smooth else "--model_dir", hint)


def run_eval(spec: EvalSpec, progress: bool = True, log=print) -> dict:
    """Score the grid; return the §2.5 report (not yet written)."""
    from tokenwise_harness.report import document as report

    if spec.chunk_tokens <= 0:
        raise HarnessError(f"--chunk_tokens {spec.chunk_tokens} must be a positive token count")
    grid = spec.grid()
    resolve_torch_dtype(spec.torch_dtype)
    device = pick_device(spec.device)
    fake_op = resolve_callable(spec.quantizer, "--quantizer") if spec.quantizer else None
    if fake_op is not None and spec.act_qspecs:
        raise HarnessError("--act_qspecs cannot be combined with --quantizer: a model-level fake_op quantizes "
                           "weights only, so the residual branch cannot be separated")
    mdir = ModelDir(spec.model_dir, spec.model_flag)
    cache = XYCache(spec.xy_path, verify=not spec.no_verify_cache)
    check_cache_model(cache, mdir, spec.smooth)
    if spec.verify_cache:
        cache.verify_checksums()
    else:
        cache.verify_in_background()  # joined below, before anything is written
    started = time.perf_counter()
    try:
        results, engine = _score(spec, mdir, cache, grid, device, fake_op, progress)
    except BaseException:
        cache.stop_background()
        raise
    cache.wait_verified()
    meta = {
        "xy_path": str(spec.xy_path),
        "xy_meta": cache.meta,
        "grid_mode": spec.grid_mode,
        "ranks": list(spec.ranks),
        "qspecs": [[q.fmt, str(q.blk)] for q in spec.qspecs],
        "smooth": spec.smooth,
        "chunk_tokens": spec.chunk_tokens,
        "model_dir": str(spec.model_dir),
        "model_fingerprint": mdir.fingerprint,
        "configs": [c.key for c in grid],
        "quantizer": spec.quantizer or "tokenwise_harness.numerics.svdq:fake_op",
        "engine": engine,
        "harness_version": __version__,
    }
    if spec.act_qspecs:
        meta["act_qspecs"] = [[q.fmt, str(q.blk)] for q in spec.act_qspecs]
    smooth_meta = _smooth_meta(mdir) if spec.smooth else None
    if smooth_meta:
        meta["smooth_meta"] = smooth_meta
    log(f"eval: {len(results)} projections x {len(grid)} configs in {time.perf_counter() - started:.1f} s "
        f"({engine}; {_reuse_line()})")
    return report.build_report(meta, results)


def _score(spec: EvalSpec, mdir: ModelDir, cache: XYCache, grid, device, fake_op, progress):
    """Run the right engine path; return (results, a name for it)."""
    from tokenwise_harness import engine as evaluate

    if fake_op is not None:
        model = _load_for_eval(mdir, spec)
        return evaluate.evaluate_with_model_op(cache, model, fake_op, grid, spec.chunk_tokens, device, spec.smooth,
                                               spec.no_restore, progress), "model-level fake_op"
    if mdir.safetensors_index is not None and mdir.targets():
        source, engine = evaluate.CheckpointWeights(mdir, spec.smooth), "per-weight (checkpoint shards)"
    else:
        source, engine = evaluate.ModuleWeights(_load_for_eval(mdir, spec), spec.smooth), "per-weight (loaded model)"
    return evaluate.evaluate_grid(cache, source, grid, spec.chunk_tokens, device, progress=progress), engine


def _reuse_line() -> str:
    """What this process hashed and decomposed, and what it reused (memo.py): one log phrase."""
    from tokenwise_harness import memo
    from tokenwise_harness.numerics.lowrank import COUNTS

    c = memo.COUNTERS
    return (f"weight bytes hashed {c['bytes_hashed']}, digests reused {c['digest_memo_hits']}, "
            f"eigendecompositions {COUNTS['eigh']}, factors reused {c['lowrank_hits']}")


def _smooth_meta(mdir: ModelDir) -> dict | None:

    f = mdir.path / SMOOTH_META_FILE
    if not f.is_file():
        return None
    data = _read_smooth_meta(mdir)
    return {k: v for k, v in data.items() if k in ("alpha", "formula", "alphas", "source_model_fingerprint")}


def _read_smooth_meta(mdir: ModelDir) -> dict:
    import json

    path = mdir.path / SMOOTH_META_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HarnessError(f"{mdir.flag} {mdir.path}: {SMOOTH_META_FILE} is unreadable ({exc}); "
                           "re-create the dir with `tokenwise-precision smooth`") from None
    if not isinstance(data, dict):
        raise HarnessError(f"{mdir.flag} {mdir.path}: {SMOOTH_META_FILE} is not a JSON object; "
                           "re-create the dir with `tokenwise-precision smooth`")
    return data


def _load_for_eval(mdir: ModelDir, spec: EvalSpec):
    if spec.smooth:
        from tokenwise_harness.calib.smooth import load_smoothed_model

        return load_smoothed_model(str(mdir.path))
    return load_model(mdir, spec.torch_dtype, spec.device_map)
