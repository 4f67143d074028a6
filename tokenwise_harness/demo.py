"""The main job on an embedded default: model -> save_xy -> eval_fake -> smooth ->
eval_smooth -> analyze, every output under one directory.

The model is a small random-weight demo model built offline (with planted outlier channels
so smoothing and the low-rank branch have real work to do) unless --model_dir is given.
"""

from __future__ import annotations

import time
from pathlib import Path

from tokenwise_harness.atomic import clear_leftovers
from tokenwise_harness.errors import HarnessError

CLEAN = "removed temp files of an interrupted earlier run; starting clean"


def run_demo(out: Path, model_dir: str | None = None, family: str = "qwen3", ranks: str = "8,16,32",
             qspecs: str = "nvfp4@16,nvfp4@128,fp4@in", cn: int = 50, eu: int = 80, length: int = 128,
             grid_mode: str = "full", log=print) -> dict[str, Path]:
    from tokenwise_harness import report
    from tokenwise_harness.analyze import analyze
    from tokenwise_harness.capture import save_xy
    from tokenwise_harness.pipeline import EvalSpec, run_eval
    from tokenwise_harness.smooth import smooth

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths: dict[str, Path] = {}
    if model_dir is None:
        from tokenwise_harness.demo_models import make_demo_model

        model_dir = out / f"model-{family}"
        if not (model_dir / "config.json").is_file():
            if clear_leftovers(model_dir):
                log(f"demo: {model_dir.name}: {CLEAN}")
            make_demo_model(family, model_dir, num_layers=4)
        log(f"demo: model {model_dir}")
    paths["model"] = Path(model_dir)
    paths["cache"] = save_xy(model_dir, out / "cache_xy", "demo", cn=cn, eu=eu, length=length, log=log,
                             progress=False)
    common = dict(xy_path=str(paths["cache"]), grid_mode=grid_mode, chunk_tokens=4096)
    plain = run_eval(EvalSpec.from_text(ranks, qspecs, model_dir=str(model_dir), **common), progress=False, log=log)
    paths["report_nocalib"] = _write(report, plain, out / "results" / "tokenwise_nocalib.json", log)
    paths["smoothed_model"] = out / "model-smoothed"
    if not paths["smoothed_model"].exists():
        smooth(model_dir, paths["cache"], paths["smoothed_model"], alpha=0.5, log=log)
    elif _same_smoothing(paths["smoothed_model"], model_dir, paths["cache"], alpha=0.5):
        log(f"demo: {paths['smoothed_model']} is from an earlier run with the same model, cache and alpha; "
            "resuming with it")
    else:
        raise HarnessError(f"--out {out}: {paths['smoothed_model']} exists; use a fresh --out directory")
    smoothed = run_eval(EvalSpec.from_text(ranks, qspecs, model_dir=str(paths["smoothed_model"]), smooth=True,
                                           model_flag="--smooth_model_dir", **common), progress=False, log=log)
    paths["report_smooth"] = _write(report, smoothed, out / "results" / "tokenwise_smooth.json", log)
    for name in ("nocalib", "smooth"):
        for p in analyze(paths[f"report_{name}"], out / "analysis" / name):
            paths[f"analysis_{name}_{p.stem}"] = p
    log(f"demo: done in {time.perf_counter() - started:.1f} s; open {out / 'analysis' / 'nocalib' / 'ranking1.md'}")
    return paths


def _write(report, result, path: Path, log) -> Path:
    if clear_leftovers(path):
        log(f"demo: {path.name}: {CLEAN}")
    return report.write_report(result, path)


def _same_smoothing(smoothed: Path, model_dir, cache: Path, alpha: float) -> bool:
    """Whether a smoothed dir left by an earlier demo run is what smoothing now would write."""
    import json

    from tokenwise_harness.cache import XYCache
    from tokenwise_harness.checkpoint import ModelDir
    from tokenwise_harness.smooth import SMOOTH_META_FILE

    try:
        meta = json.loads((smoothed / SMOOTH_META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and meta.get("alpha") == alpha
            and meta.get("source_model_fingerprint") == ModelDir(model_dir).fingerprint
            and meta.get("xy_data_fingerprint") == XYCache(cache).metadata.get("data_fingerprint"))
