"""Where a scoring process's wall time goes, phase by phase (issue 17, round two: process start).

    python bench/bench_start.py --model_dir M --xy_path C --out OUT [--runs 5] [--k layer1-]
    python bench/bench_start.py ... --tree before=/path/to/old/checkout --tree after=$PWD   # side by side

Each row is a fresh `python` process, timed from outside (wall) and marked from inside:
  start     interpreter start until the harness's front end is imported
  pre       until the engine starts scoring (imports incl. torch, pytest start-up and collection,
            validation, the cache's and the model's headers, the fingerprint when it is hashed up front)
  engine    first Evaluation.score call until the last one returns
  post      the rest of the front end's work (report/meta, baselines, terminal summary)
  exit      main's return until the process is gone (interpreter teardown: torch, CUDA, threads)
Scenarios: `cli_cold` (`tokenwise-precision eval_fake` with an empty digest memo and low-rank
store), `cli_warm` (the same again on the filled memo), `gate_warm` (`pytest -k K` with
the plugin, warm memo, baselines recorded first). Medians over --runs, runs of the trees
interleaved (the machine's load drifts). `--tree NAME=DIR` runs DIR's tokenwise_harness instead
of the installed one (the editable install's finder is taken out of the child's import path).
Writes OUT/bench_start.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
PHASES = ("start", "pre", "engine", "post", "exit", "wall")

# The child: marks phases, then runs the front end exactly as its console script would.
CHILD = r'''
import json, os, sys, time
t0 = time.time()
tree = os.environ.get("BENCH_TREE")
if tree:
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, tree)
marks = {"t0": t0}
def dump():
    marks["main_end"] = time.time()
    with open(os.environ["BENCH_MARKS"], "w") as fh:
        json.dump(marks, fh)
mode, argv = sys.argv[1], sys.argv[2:]
if mode == "cli":
    from tokenwise_harness import cli
else:
    import pytest
marks["front"] = time.time()
import tokenwise_harness.run as run
score = run.Evaluation.score
def timed(self, *a, **k):
    marks.setdefault("engine_start", time.time())
    try:
        return score(self, *a, **k)
    finally:
        marks["engine_end"] = time.time()
run.Evaluation.score = timed
if mode == "cli":
    main = cli.main
    def marked_main(argv=None):
        try:
            return main(argv)
        finally:
            dump()
    cli.main = marked_main
    sys.argv = ["tokenwise-precision", *argv]
    entry = getattr(cli, "console_main", None)
    if entry is not None:
        entry()
    else:
        raise SystemExit(marked_main())
else:
    sys.argv = ["pytest", *argv]
    try:
        code = pytest.main(argv)
    finally:
        dump()
    raise SystemExit(code)
'''


def run_once(python: str, mode: str, argv: list[str], env: dict, cwd: Path) -> dict:
    fd, marks_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = dict(env, BENCH_MARKS=marks_path)
    t = time.time()
    proc = subprocess.run([python, "-c", CHILD, mode, *argv], env=env, cwd=cwd, capture_output=True, text=True)
    end = time.time()
    try:
        m = json.loads(Path(marks_path).read_text())
    finally:
        os.unlink(marks_path)
    if proc.returncode not in (0, 1) or "engine_start" not in m:
        raise SystemExit(f"{mode} {' '.join(argv)}: rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return {"start": m["front"] - t, "pre": m["engine_start"] - m["front"],
            "engine": m["engine_end"] - m["engine_start"], "post": m["main_end"] - m["engine_end"],
            "exit": end - m["main_end"], "wall": end - t, "rc": proc.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--xy_path", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--k", default="layer1-", help="the gate's -k selection")
    ap.add_argument("--ranks", default="8,16")
    ap.add_argument("--qspecs", default="nvfp4@16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR: score with DIR's tokenwise_harness")
    ap.add_argument("--scenarios", default="cli_cold,cli_warm,gate_warm")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    trees = dict(t.split("=", 1) for t in a.tree) or {"installed": ""}
    model, xy = str(Path(a.model_dir).resolve()), str(Path(a.xy_path).resolve())
    dev = [f"--device={a.device}"] if a.device else []
    cli_args = ["eval_fake", f"--model_dir={model}", f"--xy_path={xy}", f"--ranks={a.ranks}",
                f"--qspecs={a.qspecs}", *dev]
    gate_args = ["-q", "-p", "no:cacheprovider", f"--model-dir={model}", f"--xy-path={xy}", f"--ranks={a.ranks}",
                 f"--qspecs={a.qspecs}", *[f"--device={a.device}"] * bool(a.device), "-k", a.k]
    work = Path(tempfile.mkdtemp(prefix="bench_start_", dir=out))
    rows: dict = {}
    scenarios = a.scenarios.split(",")
    for i in range(a.runs):
        for name, tree in trees.items():
            env = dict(os.environ, BENCH_TREE=str(Path(tree).resolve()) if tree else "")
            warm_memo = work / f"memo_warm_{name}"
            for sc in scenarios:
                if sc == "cli_cold":
                    memo = work / f"memo_cold_{name}_{i}"
                    r = run_once(sys.executable, "cli", [*cli_args, f"--out_json={work / 'r.json'}"],
                                 dict(env, TOKENWISE_CACHE_DIR=str(memo)), work)
                    shutil.rmtree(memo, ignore_errors=True)
                elif sc == "cli_warm":
                    if i == 0:  # fill the memo once
                        run_once(sys.executable, "cli", [*cli_args, f"--out_json={work / 'r.json'}"],
                                 dict(env, TOKENWISE_CACHE_DIR=str(warm_memo)), work)
                    r = run_once(sys.executable, "cli", [*cli_args, f"--out_json={work / 'r.json'}"],
                                 dict(env, TOKENWISE_CACHE_DIR=str(warm_memo)), work)
                elif sc == "gate_warm":
                    gate_dir = work / f"gate_{name}"
                    gate_dir.mkdir(exist_ok=True)
                    genv = dict(env, TOKENWISE_CACHE_DIR=str(warm_memo))
                    if i == 0:  # baselines for the selection, and a warm memo
                        run_once(sys.executable, "pytest", [*gate_args, f"--rootdir={gate_dir}",
                                                            "--update-baselines"], genv, gate_dir)
                    r = run_once(sys.executable, "pytest", [*gate_args, f"--rootdir={gate_dir}"], genv, gate_dir)
                    if r["rc"] != 0:
                        raise SystemExit(f"gate failed (rc {r['rc']})")
                else:
                    raise SystemExit(f"unknown scenario {sc}")
                rows.setdefault(f"{sc}/{name}", []).append(r)
                print(f"run {i} {sc}/{name}: " + " ".join(f"{p} {r[p]:.2f}" for p in PHASES), flush=True)
    summary = {key: {p: round(statistics.median(r[p] for r in runs), 3) for p in PHASES} | {"runs": len(runs)}
               for key, runs in rows.items()}
    (out / "bench_start.json").write_text(json.dumps({"medians": summary, "runs": rows}, indent=2) + "\n")
    print(f"\n| row | {' | '.join(PHASES)} |\n|---|{'---|' * len(PHASES)}")
    for key, med in summary.items():
        print(f"| {key} | " + " | ".join(f"{med[p]:.2f}" for p in PHASES) + " |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
