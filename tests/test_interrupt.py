"""Interruption: SIGINT and SIGKILL at seeded random points of save_xy, eval_fake and smooth.

Each interrupted run is a real `python -m tokenwise_harness`-style process. A small driver
wraps the code at the points where output is being produced (each batch of rows the capture
writes, each cache slice the engine reads, the report write, the smoothed shard write) to
print a tick and pause briefly, so the test can send the signal at the k-th tick, k drawn
from a seeded RNG. The code paths are the real ones; the pauses only widen the window.

After every interruption: no file under the final name. After SIGINT: exit 130, the temp
file is already gone, one line says so. After SIGKILL: at most a `.tmp-*` left beside the
final name, which the next run removes, saying "starting clean", and then succeeds.
"""

from __future__ import annotations

import inspect
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import files_under, run_cli
from tokenwise_harness.cache import XYCache
from tokenwise_harness.capture.save_xy import save_xy

SEED = 20251125
PAUSE = 0.004  # seconds per tick in the driver
CLEAN = "removed temp files of an interrupted earlier run; starting clean"
INTERRUPTED = "interrupted; no output was written under its final name"

DRIVER = r"""
import sys, time

PAUSE = float(sys.argv[1])
ticks = [0]

def tick(what):
    ticks[0] += 1
    print(f"TICK {ticks[0]} {what}", flush=True)
    time.sleep(PAUSE)

from tokenwise_harness import cache
from tokenwise_harness.report import document as report
import safetensors.torch as st

write_rows = cache.StreamingSafetensorsWriter.write_rows
def ticking_write_rows(self, name, rows):
    write_rows(self, name, rows)
    tick("rows")
cache.StreamingSafetensorsWriter.write_rows = ticking_write_rows

finish = cache.StreamingSafetensorsWriter.finish
def ticking_finish(self):
    tick("finish")
    finish(self)
cache.StreamingSafetensorsWriter.finish = ticking_finish

rows = cache.XYCache.rows
def ticking_rows(self, key, start, end):
    out = rows(self, key, start, end)
    tick("read")
    return out
cache.XYCache.rows = ticking_rows

if hasattr(cache.XYCache, "stream"):  # the engine's prefetching chunk reader, where there is one
    stream = cache.XYCache.stream
    def ticking_stream(self, *a, **k):
        for item in stream(self, *a, **k):
            tick("read")
            yield item
    cache.XYCache.stream = ticking_stream

def half_written_report(final, text, flag="output"):
    from tokenwise_harness.atomic import atomic_path
    with atomic_path(final, flag) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text[: len(text) // 2])
            fh.flush()
            print("TICK 0 report-half-written", flush=True)
            time.sleep(30)
            fh.write(text[len(text) // 2:])
report.write_text_atomic = half_written_report

save_file = st.save_file
def ticking_save_file(*a, **k):
    save_file(*a, **k)
    print("TICK 0 shard-written", flush=True)
    time.sleep(30)
st.save_file = ticking_save_file

from tokenwise_harness.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def interrupt(argv: list, sig: int, at: str | int, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI under the driver; send `sig` at tick number `at` (or the first tick named `at`)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(PAUSE), *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stdout:
            if line.startswith("TICK "):
                _, n, what = line.split()
                seen.append(what)
                if (isinstance(at, int) and int(n) == at) or at == what:
                    proc.send_signal(sig)
                    break
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen, f"the run ended before any tick: {err}"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def assert_interrupted(proc, sig):
    if sig == signal.SIGINT:
        assert proc.returncode == 130, (proc.returncode, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].endswith(INTERRUPTED), proc.stderr
    else:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".tmp-*"))


CAPTURE = dict(cn=6, eu=6, length=32)  # 384 tokens; batches of 2 -> 6 batches x 28 tensors = 168 row writes


@pytest.fixture(scope="module")
def cache(demo_model_dir, tmp_path_factory):
    return save_xy(demo_model_dir, tmp_path_factory.mktemp("interrupt"), "c", batch_size=2, progress=False,
                   log=lambda m: None, **CAPTURE)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_save_xy(demo_model_dir, tmp_path, sig):
    # any row write, or (the last tick) the header rewrite in finish
    at = random.Random(f"{SEED}-save_xy-{sig.name}").randrange(1, 6 * 28 + 2)
    argv = ["save_xy", "--model_dir", demo_model_dir, "--save_path", tmp_path, "--label", "c", "--batch_size", 2,
            *[x for k, v in CAPTURE.items() for x in (f"--{k}", v)]]
    assert_interrupted(interrupt(argv, sig, at, tmp_path), sig)
    assert not (tmp_path / "c.safetensors").exists()
    left = temps(tmp_path)
    assert left == [] if sig == signal.SIGINT else (len(left) == 1 and left[0].startswith(".tmp-c.safetensors.")), left

    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    assert (CLEAN in proc.stdout) == (sig == signal.SIGKILL), proc.stdout
    assert files_under(tmp_path) == ["c.safetensors"] and temps(tmp_path) == []
    XYCache(tmp_path / "c.safetensors").verify_checksums()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint-while-scoring", "sigkill-while-writing"])
def test_eval_fake(demo_model_dir, cache, tmp_path, sig):
    out = tmp_path / "r.json"
    argv = ["eval_fake", "--model_dir", demo_model_dir, "--xy_path", cache, "--out_json", out, "--ranks", "8",
            "--qspecs", "nvfp4@16", "--chunk_tokens", "64"]
    # 14 weights x 6 chunks: at least 84 ticks (more where X and Y are read slice by slice).
    at = random.Random(f"{SEED}-eval_fake").randrange(1, 80) if sig == signal.SIGINT else "report-half-written"
    assert_interrupted(interrupt(argv, sig, at, tmp_path), sig)
    assert not out.exists()
    left = temps(tmp_path)
    assert left == [] if sig == signal.SIGINT else (len(left) == 1 and left[0].startswith(".tmp-r.json.")), left

    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    assert (CLEAN in proc.stdout) == (sig == signal.SIGKILL), proc.stdout
    assert files_under(tmp_path) == ["r.json"]
    reference = tmp_path / "ref" / "r.json"
    assert run_cli(*argv[:6], reference, *argv[7:]).returncode == 0
    assert out.read_bytes() == reference.read_bytes()


def test_smooth_sigkill(demo_model_dir, cache, tmp_path):
    out = tmp_path / "smoothed"
    argv = ["smooth", "--model_dir", demo_model_dir, "--xy_path", cache, "--out_dir", out]
    assert_interrupted(interrupt(argv, signal.SIGKILL, "shard-written", tmp_path), signal.SIGKILL)
    left = temps(tmp_path)
    assert not out.exists() and len(left) == 1 and left[0].startswith(".tmp-smoothed."), left

    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    assert CLEAN in proc.stdout
    assert temps(tmp_path) == [] and (out / "tokenwise_smooth.json").is_file()


def test_demo_resumes_after_an_interruption(demo_model_dir, tmp_path, monkeypatch):
    """A demo killed after smoothing: the rerun reuses the smoothed model, cleans the temp report, and says so.

    The kill itself is exercised per step above; here its aftermath is laid out by hand.
    The analysis step (rankings, heatmaps, HTML) is stubbed: matplotlib would dominate the time.
    """
    from tokenwise_harness.demo import job
    from tokenwise_harness.demo.job import run_demo
    from tokenwise_harness.errors import HarnessError

    monkeypatch.setattr(job, "run_analysis", lambda out, nocalib, smooth, progress=False: {"analysis_html": out})
    kw = dict(model_dir=demo_model_dir, cn=2, eu=2, length=16, ranks="8", qspecs="nvfp4@16")
    if "harness" in inspect.signature(run_demo).parameters:
        kw["harness"] = False  # the demo's pytest step is not what this test is about
    out = tmp_path / "demo"
    first = run_demo(out, log=lambda m: None, **kw)
    expected = first["report_smooth"].read_bytes()
    first["report_smooth"].unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "results" / f".tmp-tokenwise_smooth.json.{int(dead.stdout)}.x1y2").write_text('{"meta": {')

    logs = []
    again = run_demo(out, log=logs.append, **kw)
    assert any("model-smoothed is from an earlier run" in m and "resuming" in m for m in logs), logs
    assert any(m.endswith(f"tokenwise_smooth.json: {CLEAN}") for m in logs), logs
    assert again["report_smooth"].read_bytes() == expected
    assert temps(out / "results") == []

    meta = out / "model-smoothed" / "tokenwise_smooth.json"
    meta.write_text(meta.read_text().replace('"alpha": 0.5', '"alpha": 0.3'))
    with pytest.raises(HarnessError, match="model-smoothed exists; use a fresh --out directory"):
        run_demo(out, log=lambda m: None, **kw)
