"""The shared user cache (issue 19, item 1): where it lives, build-once under a file lock
(two processes), list / prune, and the pytest harness capturing into it: compact layout by
default, `--xy-full`, log lines, a tokens/s progress bar on a TTY only, quiet under -q -q,
and two concurrent pytest runs capturing once.
"""

import gc
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tokenwise_harness.cache  # noqa: F401  (in-process pytester runs: keep these loaded)
import tokenwise_harness.engine  # noqa: F401
import tokenwise_harness.pytest_plugin.session  # noqa: F401
import tokenwise_harness.run  # noqa: F401
import tokenwise_harness.verdict.baselines  # noqa: F401
import tokenwise_harness.verdict.thresholds  # noqa: F401
from tokenwise_harness.cache_store import APP_NAME, CacheStore, default_root, resolve_root
from tokenwise_harness.checkpoint import ModelDir
from tokenwise_harness.demo.models import make_demo_model
from tokenwise_harness.errors import HarnessError

try:  # hypothesis's pytest plugin imports it at every run's summary: keep it loaded
    import hypothesis  # noqa: F401
except ImportError:
    pass

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
XY_SMALL = ["--xy-cn=2", "--xy-eu=2", "--xy-length=16"]  # (2 + 2) x 16 = 64 tokens
ONE_CASE = ["--ranks=8", "--qspecs=nvfp4@16", "-k", "layer0-self_attn-q_proj", "--update-baselines", "-p", "no:randomly"]


def header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


# ---------------------------------------------------------------- where


def test_root_flag_then_env_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("TOKENWISE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".cache" / APP_NAME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / APP_NAME
    monkeypatch.setenv("TOKENWISE_CACHE_DIR", str(tmp_path / "env"))
    assert default_root() == tmp_path / "env"
    assert resolve_root(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_root(None) == tmp_path / "env"
    assert CacheStore("~/x").root == tmp_path / "home" / "x"


# ---------------------------------------------------------------- build once, list, prune

BUILD_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tokenwise_harness.cache_store import CacheStore
    root, counter = Path(sys.argv[1]), Path(sys.argv[2])
    store = CacheStore(root)
    entry = store.xy_path("m", "a" * 64, "b" * 64)
    def build():
        with open(counter, "a") as fh:
            fh.write("built\\n")
        time.sleep(1.5)
        entry.write_bytes(b"x" * 1000)
    print(store.ensure(entry, build, {"model_name": "m", "n_tokens": 64}, log=lambda m: print("LOG", m)))
""")


def test_two_processes_build_an_entry_once(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "root"), str(tmp_path / "counter")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert (tmp_path / "counter").read_text() == "built\n"  # one build, the other run reused it
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == b"x" * 1000


def _entry(store: CacheStore, name: str, size: int, days_ago: float, **record) -> Path:
    entry = store.xy_path(name, "a" * 64, "b" * 64)
    store.ensure(entry, lambda: entry.write_bytes(b"x" * size), {"model_name": name, **record})
    stamp = time.time() - days_ago * 86400
    os.utime(store.record_path(entry), (stamp, stamp))
    return entry


def test_ls_and_prune(tmp_path):
    store = CacheStore(tmp_path / "root")
    old = _entry(store, "old", 3000, 10, n_tokens=640)
    new = _entry(store, "new", 1000, 1, n_tokens=64)
    smoothed = store.smoothed_path("new", "a" * 64, "b" * 64, 0.5)
    store.ensure(smoothed, lambda: (smoothed.mkdir(parents=True), (smoothed / "config.json").write_text("{}"),
                                    (smoothed / "w.bin").write_bytes(b"y" * 500)), {"model_name": "new"})

    entries = store.entries()
    assert [(e.kind, e.path, e.model, e.tokens) for e in entries] == [
        ("xy", old, "old", 640), ("xy", new, "new", 64), ("smoothed", smoothed, "new", None)]
    assert [e.size for e in entries] == [3000, 1000, 500 + 2]
    assert 9.9 < entries[0].age_days < 10.1 and 0.9 < entries[1].age_days < 1.1 and entries[2].age_days < 0.01

    with pytest.raises(HarnessError, match="--older_than DAYS or --all"):
        store.prune()
    assert [e.path for e in store.prune(older_than_days=5, dry_run=True)] == [old] and old.exists()
    assert [e.path for e in store.prune(older_than_days=5)] == [old]
    assert not old.exists() and not store.record_path(old).exists() and new.exists()
    with store.lock(new):  # being built by another run: skipped, not deleted under its feet
        assert [e.path for e in store.prune(everything=True)] == [smoothed]
    assert new.exists() and not smoothed.exists()
    assert [e.path for e in store.prune(everything=True)] == [new] and store.entries() == []


def test_memo_stores_listed_and_pruned_by_file_age(tmp_path):
    """memo.py's low-rank store and digest memo share the root: one entry each, pruned by file age."""
    store = CacheStore(tmp_path / "root")
    old, new = tmp_path / "root" / "lowrank" / "ab" / "old.safetensors", tmp_path / "root" / "lowrank" / "cd" / "new.safetensors"
    for f, size, days in ((old, 700, 20), (new, 300, 0)):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"w" * size)
        os.utime(f, (time.time() - days * 86400,) * 2)
    (entry,) = store.entries()
    assert (entry.kind, entry.path, entry.size, entry.age_days < 0.01) == ("lowrank", old.parents[1], 1000, True)
    (gone,) = store.prune(older_than_days=7)
    assert (gone.kind, gone.size) == ("lowrank", 700) and not old.exists() and new.exists()
    assert [e.size for e in store.prune(everything=True)] == [300] and store.entries() == []


def test_reuse_refreshes_last_use_and_new_weights_drop_old_entries(tmp_path):
    store = CacheStore(tmp_path / "root")
    old = _entry(store, "m", 10, 30, model_dir="/models/m", model_fingerprint="1" * 64)
    other = _entry(store, "m2", 10, 30, model_dir="/elsewhere/m", model_fingerprint="3" * 64)
    store.ensure(old, lambda: pytest.fail("rebuilt an existing entry"), {})
    assert store.entries()[-1].path == old and store.entries()[-1].age_days < 0.01  # used now
    new = store.xy_path("m", "2" * 64, "b" * 64)
    store.ensure(new, lambda: new.write_bytes(b"z"), {"model_dir": "/models/m", "model_fingerprint": "2" * 64})
    assert not old.exists() and new.exists() and other.exists()


# ---------------------------------------------------------------- the pytest harness


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_demo_model("qwen3", tmp_path_factory.mktemp("store_model") / "m", num_layers=2)
    gc.collect()
    gc.freeze()  # in-process runs end in gc.collect(): skip walking torch's heap (as test_plugin.py)
    yield path
    gc.unfreeze()


def test_harness_captures_compact_by_default_and_full_on_request(pytester, model, monkeypatch):
    root = pytester.path / "uc"
    monkeypatch.setenv("TOKENWISE_CACHE_DIR", str(root))
    result = pytester.runpytest(f"--model-dir={model}", *XY_SMALL, *ONE_CASE)
    result.assert_outcomes(passed=1)
    (compact,) = (root / "xy").glob("*.safetensors")
    assert compact.name.startswith(f"m-{ModelDir(model).fingerprint[:12]}-") and "-full" not in compact.name
    keys = set(header(compact)) - {"__metadata__"}
    assert keys and not any(k.endswith(".Y") for k in keys) and "x_aliases" in header(compact)["__metadata__"]
    out = result.stdout.str()
    assert f"tokenwise: capturing 64 tokens of {model} -> {compact}" in out
    assert "tok/s" not in out  # not a TTY: log lines, no bar

    result = pytester.runpytest(f"--model-dir={model}", *XY_SMALL, *ONE_CASE, "--xy-full")
    result.assert_outcomes(passed=1)
    (full,) = (root / "xy").glob("*-full.safetensors")
    assert full.name == compact.name.replace(".safetensors", "-full.safetensors")
    assert sum(k.endswith(".Y") for k in header(full)) == 14 and compact.exists()

    full.unlink()  # -q -q: nothing of the capture on the terminal
    result = pytester.runpytest(f"--model-dir={model}", *XY_SMALL, *ONE_CASE, "--xy-full", "-qq")
    assert result.ret == 0
    assert full.exists() and "tokenwise:" not in result.stdout.str()


def _run_in_pty(args, env, cwd, timeout=300) -> str:
    """Run a command with a pseudo-terminal as its stdout/stderr; return everything it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    proc.wait(timeout=30)
    return b"".join(chunks).decode("utf-8", "replace")


def test_progress_bar_on_a_terminal(tmp_path, model):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENWISE_CACHE_DIR": str(tmp_path / "uc"), "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--rootdir={tmp_path}", f"--model-dir={model}",
           *XY_SMALL, *ONE_CASE, f"--baselines-dir={tmp_path / 'b'}"]
    text = _run_in_pty(cmd, env, tmp_path)
    assert "1 passed" in text, text
    assert "tokenwise: capturing 64 tokens" in text
    bar = [line for line in text.replace("\r", "\n").splitlines() if line.startswith("save_xy:")]
    # tokens done / total, elapsed<ETA, rate: "save_xy: 100%|###| 64.0/64.0 [00:00<00:00, 98.2tok/s]"
    assert bar and re.search(r"100%.*64(\.0)?/64(\.0)? \[\d\d:\d\d<\d\d:\d\d, *[\d.]+k?tok/s\]", bar[-1]), text

    quiet = _run_in_pty([*cmd, "-qq", "--xy-full"], env, tmp_path)  # a new capture, but -q -q
    assert "save_xy" not in quiet and "tokenwise:" not in quiet and list((tmp_path / "uc" / "xy").glob("*-full*"))


def test_two_concurrent_runs_capture_once(tmp_path, model):
    """Two pytest runs start while a third party holds the entry's lock: both wait, then one
    captures and the other reuses its cache."""
    root = tmp_path / "uc"
    store = CacheStore(root)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENWISE_CACHE_DIR": str(root)}
    # the entry's name: the same call the harness makes, without building
    from tokenwise_harness.cache_store import captured_xy

    entry = captured_xy(store, ModelDir(model), seed=0, cn=2, eu=2, length=16, build=False)
    (root / "locks").mkdir(parents=True)
    lock = store.lock(entry)
    lock.acquire()
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = []
    try:
        for i, log in enumerate(logs):
            cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--rootdir={tmp_path}",
                   f"--model-dir={model}", *XY_SMALL, *ONE_CASE, f"--baselines-dir={tmp_path / f'b{i}'}"]
            with open(log, "w") as fh:
                procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
        deadline = time.monotonic() + 240
        while not all("waiting for another run" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [x.read_text() for x in logs]
            time.sleep(0.5)
        assert not entry.exists()
    finally:
        lock.release()
        for p in procs:
            p.wait(timeout=300)
    outs = [log.read_text() for log in logs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("tokenwise: capturing" in out for out in outs) == 1, outs
    assert list((root / "xy").glob("*.safetensors")) == [entry]


# ---------------------------------------------------------------- the memos follow the chosen root


def _fresh_process():
    """What a new process starts with: no in-process digests, zeroed counters (as test_perf.py)."""
    from tokenwise_harness import memo
    from tokenwise_harness.numerics import lowrank

    memo.clear_process_memo()
    memo.reset_counters()
    lowrank.COUNTS["eigh"] = 0


def _counts() -> dict:
    from tokenwise_harness import memo
    from tokenwise_harness.numerics import lowrank

    return dict(memo.COUNTERS, eigh=lowrank.COUNTS["eigh"])


def _elsewhere(monkeypatch, tmp_path) -> Path:
    """$TOKENWISE_CACHE_DIR and $XDG_CACHE_HOME pointed at a dir the flag must win over."""
    other = tmp_path / "E"
    monkeypatch.setenv("TOKENWISE_CACHE_DIR", str(other / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(other / "xdg"))
    return other


def _memo_files(root: Path) -> dict[str, list[Path]]:
    return {kind: sorted(p for p in (root / kind).rglob("*") if p.is_file()) for kind in ("digests", "lowrank")}


def _cache_ls(root: Path, capsys) -> dict[str, tuple[str, Path]]:
    """`tokenwise-precision cache ls --cache_dir ROOT`: {kind: (size column, path)} of its rows."""
    from tokenwise_harness.cli import main

    capsys.readouterr()
    assert main(["cache", "ls", f"--cache_dir={root}"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[2:-1]:  # header, column titles ... hint
        kind, *_, path = line.split()
        rows[kind] = (line, Path(path))
    return rows


def test_cache_dir_flag_moves_the_digest_memo_and_lowrank_store(pytester, model, monkeypatch, tmp_path, capsys):
    """--tokenwise-cache-dir=D with $TOKENWISE_CACHE_DIR / $XDG_CACHE_HOME elsewhere: the digest memo
    and the low-rank store are written under D (nothing elsewhere), a second run is warm from them
    (0 bytes hashed, 0 eigh), and `cache ls --cache_dir D` lists them with their sizes."""
    root, other = tmp_path / "D", _elsewhere(monkeypatch, tmp_path)
    args = [f"--model-dir={model}", *XY_SMALL, *ONE_CASE, f"--tokenwise-cache-dir={root}"]
    _fresh_process()
    pytester.runpytest(*args).assert_outcomes(passed=1)
    cold = _counts()
    assert cold["bytes_hashed"] > 0 and cold["eigh"] >= 1 and cold["lowrank_writes"] == cold["eigh"]
    files = _memo_files(root)
    assert files["digests"] and len(files["lowrank"]) == cold["eigh"], files
    assert list((root / "xy").glob("*.safetensors")) and not other.exists()

    _fresh_process()  # a new process on the same root: everything reused
    pytester.runpytest(*args).assert_outcomes(passed=1)
    warm = _counts()
    assert warm["bytes_hashed"] == 0 and warm["eigh"] == 0 and warm["lowrank_hits"] == cold["eigh"]
    assert warm["lowrank_misses"] == 0 and warm["digest_memo_hits"] >= 1
    assert _memo_files(root) == files and not other.exists()

    from tokenwise_harness.cache_store import human_size

    rows = _cache_ls(root, capsys)
    assert set(rows) == {"xy", "digests", "lowrank"}
    for kind in ("digests", "lowrank"):
        line, path = rows[kind]
        assert path == root / kind and human_size(sum(f.stat().st_size for f in files[kind])) in line


def test_cli_cache_dir_moves_the_digest_memo_and_lowrank_store(model, monkeypatch, tmp_path, capsys):
    """eval_fake --cache_dir=D: the same, for the CLI."""
    from tokenwise_harness.capture.save_xy import save_xy
    from tokenwise_harness.cli import main

    xy = save_xy(model, tmp_path / "xy", "c", cn=1, eu=1, length=16, device="cpu", progress=False,
                 log=lambda m: None, cache_root=tmp_path / "capture_memo")
    root, other = tmp_path / "D", _elsewhere(monkeypatch, tmp_path)
    args = ["eval_fake", f"--model_dir={model}", f"--xy_path={xy}", "--ranks=8", "--qspecs=nvfp4@16",
            "--device=cpu", f"--cache_dir={root}"]
    n_weights = len(ModelDir(model).targets())
    _fresh_process()
    assert main([*args, f"--out_json={tmp_path / 'cold.json'}"]) == 0
    cold = _counts()
    assert cold["bytes_hashed"] > 0 and cold["eigh"] == n_weights
    files = _memo_files(root)
    assert files["digests"] and len(files["lowrank"]) == n_weights and not other.exists()

    _fresh_process()
    assert main([*args, f"--out_json={tmp_path / 'warm.json'}"]) == 0
    warm = _counts()
    assert warm["bytes_hashed"] == 0 and warm["eigh"] == 0 and warm["lowrank_hits"] == n_weights
    assert _memo_files(root) == files and not other.exists()
    assert {k: p for k, (_, p) in _cache_ls(root, capsys).items()} == {"digests": root / "digests",
                                                                       "lowrank": root / "lowrank",
                                                                       "verified": root / "verified"}


def test_xdist_workers_use_the_controllers_cache_dir(pytester, model, monkeypatch, tmp_path):
    """Under xdist the worker decomposes the weights: their low-rank factors and digests land
    under the controller's --tokenwise-cache-dir (given relative to where pytest runs)."""
    other = _elsewhere(monkeypatch, tmp_path)
    result = pytester.runpytest_subprocess(
        "-n", "1", f"--model-dir={model}", *XY_SMALL, "--ranks=8", "--qspecs=nvfp4@16", "-k", "layer0-self_attn",
        "--update-baselines", "-p", "no:randomly", "-p", "no:cacheprovider", "--tokenwise-cache-dir=rel/D",
        timeout=240)
    result.assert_outcomes(passed=4)
    root = pytester.path / "rel" / "D"
    files = _memo_files(root)
    assert files["digests"] and len(files["lowrank"]) == 4 and list((root / "xy").glob("*.safetensors"))
    assert not other.exists()
