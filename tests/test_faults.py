"""Faults beyond single bad inputs (issue 18): fuzzed readers, concurrent and killed writers.

- Property-based fuzzing (hypothesis) of the three readers of user files: the X/Y cache, the
  thresholds loader and the baseline store. Random bytes, truncations and wrong types in
  every field must end in a HarnessError (one line, the user's fault, named) or a correct
  result, never in another exception. Kept fast: bounded examples, no deadline.
- Several processes updating one baseline store at once keep every update (the store is
  locked for its read-modify-write; each run re-reads under the lock).
- Writers SIGKILLed at seeded random points (the baseline store's flush, save_xy) leave every
  file under its final name complete; their temp files are never read and the next run
  removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenwise_harness.errors import HarnessError

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SEED = 20261203
REPO = Path(__file__).resolve().parents[1]

# JSON values of every type, small: what a hand-edited or damaged file may hold anywhere.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


# ---------------------------------------------------------------- the X/Y cache

X_KEY, Y_KEY = "model.layers.0.self_attn.q_proj.X", "model.layers.0.self_attn.q_proj.Y"


def _tiny_cache() -> tuple[bytes, dict]:
    """A valid 2-tensor cache (6 tokens, 8 -> 4), with checksums: its bytes and its tensors."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tensors = {X_KEY: torch.randn(6, 8, generator=g).half(), Y_KEY: torch.randn(6, 4, generator=g).half()}
    sums = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in tensors.items()}
    meta = {"seed": "0", "cn": "1", "eu": "1", "length": "3", "save_dtype": "fp16", "format_version": "1",
            "n_tokens": "6", "checksums": json.dumps(sums, sort_keys=True)}
    return save(tensors, metadata=meta), tensors


CACHE_BYTES, CACHE_TENSORS = _tiny_cache()


def _read_cache(path: Path):
    """XYCache's whole read path: open, validate, stream every tensor (checksums verified)."""
    from tokenwise_harness.cache import XYCache

    cache = XYCache(path)
    out = {}
    for entry in cache.entries:
        keys = [entry.x_key, entry.y_key]
        parts = [[], []]
        for _, _, rows in cache.stream(keys, 4, "cpu"):
            for i, r in enumerate(rows):
                if r is not None:
                    parts[i].append(r)
        for key, chunks in zip(keys, parts):
            if key is not None:
                import torch

                out[key] = torch.cat(chunks)
    return cache, out


def _expect_clear_or_correct(path: Path) -> None:
    try:
        cache, out = _read_cache(path)
    except HarnessError as exc:
        assert "\n" not in str(exc)
        return
    for key, t in out.items():  # a successful read of a checksummed tensor is the original
        if key in cache.checksums and key in CACHE_TENSORS:
            assert t.dtype == CACHE_TENSORS[key].dtype and t.equal(CACHE_TENSORS[key]), key


@FUZZ
@given(cut=st.integers(0, len(CACHE_BYTES)))
def test_fuzz_cache_truncated(tmp_path_factory, cut):
    path = tmp_path_factory.mktemp("cut") / "c.safetensors"
    path.write_bytes(CACHE_BYTES[:cut])
    if cut == len(CACHE_BYTES):
        _, out = _read_cache(path)
        assert all(out[k].equal(v) for k, v in CACHE_TENSORS.items())
        return
    with pytest.raises(HarnessError):
        _read_cache(path)


@FUZZ
@given(data=st.binary(max_size=300), prefix=st.booleans())
def test_fuzz_cache_random_bytes(tmp_path_factory, data, prefix):
    """Random bytes, or a plausible header length followed by random bytes."""
    path = tmp_path_factory.mktemp("rand") / "c.safetensors"
    path.write_bytes((struct.pack("<Q", len(data)) if prefix else b"") + data)
    with pytest.raises(HarnessError):
        _read_cache(path)


def _header() -> tuple[dict, bytes]:
    (hlen,) = struct.unpack("<Q", CACHE_BYTES[:8])
    return json.loads(CACHE_BYTES[8:8 + hlen]), CACHE_BYTES[8 + hlen:]


FIELDS = [(X_KEY,), (Y_KEY,), (X_KEY, "dtype"), (X_KEY, "shape"), (X_KEY, "data_offsets"), (Y_KEY, "shape"),
          ("__metadata__",), ("__metadata__", "checksums"), ("__metadata__", "x_aliases"),
          ("__metadata__", "n_tokens"), ("__metadata__", "model_fingerprint"), ("model.layers.0.mlp.up_proj.X",)]


@FUZZ
@given(field=st.sampled_from(FIELDS), value=JSON, as_text=st.booleans())
def test_fuzz_cache_header_field(tmp_path_factory, field, value, as_text):
    """Any header field (or metadata value, as JSON text or raw) replaced by a value of any type."""
    header, data = _header()
    node = header
    for part in field[:-1]:
        node = node[part]
    node[field[-1]] = json.dumps(value) if as_text and field[0] == "__metadata__" else value
    text = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("hdr") / "c.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    _expect_clear_or_correct(path)


# ---------------------------------------------------------------- thresholds.yaml

TOP = ["version", "grid", "defaults", "rules", "baseline", "capture", "select", "match", "limits", "nmse", "sqnr_db", "ranks", "qspecs",
       "layer", "proj", "rtol", "atol", "metrics", "default", "iters", "grid_mode", "blk", "fmt", "smooth"]
YAMLISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats() | st.sampled_from(
        ["nvfp4@16", "0-3", ">=16", "q_proj", "in", "none", "1e-3", "combined", "", "8,16"]) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(TOP) | st.text(max_size=5),
                                                               inner, max_size=4),
    max_leaves=14,
)


def _load_yaml_text(tmp_path_factory, text: str | bytes):
    from tokenwise_harness.verdict.cases import parse_case_id
    from tokenwise_harness.verdict.thresholds import load_thresholds

    path = tmp_path_factory.mktemp("th") / "t.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        th = load_thresholds(path)
    except HarnessError as exc:
        assert "\n" not in str(exc)
        return
    case = parse_case_id("layer3-self_attn-q_proj-rank16-nvfp4-blk16")
    th.limits_for(case)  # a loaded file is usable: limits, verdicts and tolerances never raise
    th.check(case, {"nmse": 0.01, "token_l2_max": 1.0, "sse": 2.0, "denom": 200.0, "n_tokens": 8})
    for metric in ("nmse", "sqnr_db", "sse"):
        th.tolerance(metric)


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(TOP[:7]) | st.text(max_size=5), YAMLISH, max_size=5) | YAMLISH)
def test_fuzz_thresholds_documents(tmp_path_factory, doc):
    _load_yaml_text(tmp_path_factory, yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("{}[]:,-&*!?|>'\"#% \n\tabnm0123456789.@")), max_size=200))
def test_fuzz_thresholds_text(tmp_path_factory, text):
    _load_yaml_text(tmp_path_factory, text)


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_thresholds_bytes(tmp_path_factory, data):
    _load_yaml_text(tmp_path_factory, data)


def test_thresholds_repo_file_still_loads():
    from tokenwise_harness.verdict.thresholds import load_thresholds

    th = load_thresholds(REPO / "thresholds.yaml")
    assert th.source_path == REPO / "thresholds.yaml" and th.grid


# ---------------------------------------------------------------- the baseline store

MODEL_ID = "m-0123456789"
CASES = [f"layer0-self_attn-q_proj-rank{r}-nvfp4-blk16" for r in (8, 16, 32)]
METRICS = {"nmse": 0.01, "sqnr_db": 20.0, "token_l2_mean": 0.1, "token_l2_max": 0.2, "token_rel_l2_mean": 0.01,
           "token_rel_l2_max": 0.02, "sse": 1.0, "denom": 100.0, "n_tokens": 8}
PROVENANCE = {"model_fingerprint": "f" * 64, "cache_fingerprint": "c" * 64, "git_commit": "abc"}


def _valid_layer_text(tmp: Path) -> str:
    from tokenwise_harness.verdict.baselines import BaselineStore

    store = BaselineStore(tmp, MODEL_ID, update=True)
    for i, cid in enumerate(CASES):
        store.record(cid, {**METRICS, "nmse": 0.01 * (i + 1)})
    store.flush(PROVENANCE)
    return (tmp / MODEL_ID / "layer0.json").read_text()


def _read_store(root: Path, update: bool):
    from tokenwise_harness.verdict.baselines import BaselineStore

    store = BaselineStore(root, MODEL_ID, update=update)
    try:
        got = {cid: (store.get(cid), store.provenance_of(cid)) for cid in CASES}
        store.case_ids()
    except HarnessError as exc:
        assert not update, "an update run treats an unreadable file as empty"
        assert "\n" not in str(exc)
        return None
    for metrics, prov in got.values():
        assert metrics is None or all(v is None or isinstance(v, (int, float)) for v in metrics.values())
        assert (metrics is None) == (prov is None)
    if update:  # and the update then rewrites it into a valid file
        store.record(CASES[0], METRICS)
        store.flush(PROVENANCE)
        assert BaselineStore(root, MODEL_ID).get(CASES[0]) == METRICS
    return got


def _write_layer(tmp_path_factory, data: bytes) -> Path:
    root = tmp_path_factory.mktemp("bl")
    (root / MODEL_ID).mkdir()
    (root / MODEL_ID / "layer0.json").write_bytes(data)
    return root


@FUZZ
@given(data=st.binary(max_size=300), update=st.booleans())
def test_fuzz_baselines_random_bytes(tmp_path_factory, data, update):
    _read_store(_write_layer(tmp_path_factory, data), update)


@pytest.fixture(scope="module")
def layer_text(tmp_path_factory):
    return _valid_layer_text(tmp_path_factory.mktemp("valid"))


@FUZZ
@given(cut=st.integers(0, 2000), update=st.booleans())
def test_fuzz_baselines_truncated(tmp_path_factory, layer_text, cut, update):
    data = layer_text.encode()
    got = _read_store(_write_layer(tmp_path_factory, data[:cut]), update)
    if cut >= len(data.rstrip()) and not update:  # all of it (the trailing newline aside): the stored numbers
        assert [m["nmse"] for m, _ in got.values()] == [0.01, 0.02, 0.03]


@FUZZ
@given(path=st.sampled_from([("schema_version",), ("provenance",), ("cases",), ("cases", CASES[0]),
                              ("cases", CASES[1], "nmse"), ("cases", CASES[1], "provenance"),
                              ("cases", CASES[2], "n_tokens"), ("provenance", "*")]),
       value=JSON, update=st.booleans())
def test_fuzz_baselines_wrong_types(tmp_path_factory, layer_text, path, value, update):
    doc = json.loads(layer_text)
    node = doc
    for part in path[:-1]:
        node = node[part]
    key = next(iter(node)) if path[-1] == "*" else path[-1]
    node[key] = value
    _read_store(_write_layer(tmp_path_factory, json.dumps(doc).encode()), update)


# ---------------------------------------------------------------- concurrent updates

WRITER = textwrap.dedent("""
    import os, sys, time
    from tokenwise_harness.verdict.baselines import BaselineStore

    root, model_id, me, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    store = BaselineStore(root, model_id, update=True)
    case = f"layer0-self_attn-q_proj-rank{8 * (me + 1)}-nvfp4-blk16"
    store.get(case)  # read the layer file before the others write: a stale copy unless re-read
    while not os.path.exists(go):
        time.sleep(0.001)
    store.record(case, {"nmse": 0.001 * (me + 1), "sse": 1.0, "denom": 100.0, "n_tokens": 8})
    store.flush({"model_fingerprint": "f", "cache_fingerprint": "c", "writer": str(me)})
""")


def test_concurrent_updates_keep_every_case(tmp_path):
    """7 processes update one layer file at once (issue 18: 4 of 7 were kept): all 7 are."""
    from tokenwise_harness.verdict.baselines import BaselineStore

    n = 7
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "b"), MODEL_ID, str(i), str(go)],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(n)]
    time.sleep(2.0)  # let every writer import and read the (absent) file
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    store = BaselineStore(tmp_path / "b", MODEL_ID)
    ids = store.case_ids()
    assert len(ids) == n, ids
    for i in range(n):
        assert store.get(f"layer0-self_attn-q_proj-rank{8 * (i + 1)}-nvfp4-blk16")["nmse"] == 0.001 * (i + 1)
    assert sorted(p.name for p in (tmp_path / "b" / MODEL_ID).iterdir()) == ["layer0.json"]


# ---------------------------------------------------------------- SIGKILL at random points

FLUSHER = textwrap.dedent("""
    import sys, time
    from tokenwise_harness import atomic
    from tokenwise_harness.verdict import baselines

    root, model_id, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real = atomic.write_text_atomic
    def slow_write(final, text, flag="output"):  # widen the window: half the file, a pause, the rest
        with atomic.atomic_path(final, flag) as tmp:
            with open(tmp, "w") as fh:
                fh.write(text[: len(text) // 2]); fh.flush()
                print("TICK", flush=True); time.sleep(0.01)
                fh.write(text[len(text) // 2:])
        print("TICK", flush=True)
    baselines.write_text_atomic = slow_write
    for r in range(rounds):
        store = baselines.BaselineStore(root, model_id, update=True)
        for layer in range(3):
            for rank in (8, 16, 32):
                store.record(f"layer{layer}-mlp-up_proj-rank{rank}-nvfp4-blk16",
                             {"nmse": r + rank / 1000, "sse": 1.0, "denom": 100.0, "n_tokens": 8})
        store.flush({"model_fingerprint": "f", "cache_fingerprint": "c", "round": str(r)})
""")


def _kill_at(argv: list, tick: int, cwd: Path) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = 0
    try:
        for line in proc.stdout:
            if line.startswith("TICK"):
                seen += 1
                if seen == tick:
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return seen


def test_update_baselines_sigkill_at_random_points(tmp_path):
    """A flush killed anywhere leaves every layer file whole (old or new round, never mixed within
    a file); the temp files it leaves are never read, and the next update removes them."""
    from tokenwise_harness.verdict.baselines import BaselineStore

    rng = random.Random(f"{SEED}-baselines")
    root = tmp_path / "b"
    store_dir = root / MODEL_ID
    for kill in range(4):
        tick = rng.randrange(1, 3 * 2 * 5)  # 5 rounds x 3 layer files x 2 ticks per write
        seen = _kill_at([sys.executable, "-c", FLUSHER, str(root), MODEL_ID, "5"], tick, tmp_path)
        assert seen == tick
        store = BaselineStore(root, MODEL_ID)  # not an update run: an unreadable file would raise
        for cid in store.case_ids():
            rounds = {int(store.get(c)["nmse"]) for c in store.case_ids() if c.split("-")[0] == cid.split("-")[0]}
            assert len(rounds) == 1, (cid, rounds)  # one file = one round
    store = BaselineStore(root, MODEL_ID, update=True)
    store.record("layer0-mlp-up_proj-rank8-nvfp4-blk16", {"nmse": 9.0, "sse": 1.0, "denom": 1.0, "n_tokens": 8})
    store.flush({"model_fingerprint": "f", "cache_fingerprint": "c"})
    assert not list(store_dir.glob(".tmp-*")), "the next update removes the dead runs' temp files"


SAVE_XY = ["--cn", "2", "--eu", "2", "--length", "16", "--batch_size", "1"]


def test_save_xy_sigkill_at_random_points(demo_model_dir, tmp_path):
    """save_xy killed at 3 seeded random points of its writing (rows, header, rename): never a file
    under the final name until one run completes; each run removes its dead predecessors' temps."""
    from tests.test_interrupt import DRIVER
    from tokenwise_harness.cache import XYCache

    rng = random.Random(f"{SEED}-save_xy")
    argv = ["save_xy", "--model_dir", demo_model_dir, "--save_path", tmp_path / "c", "--label", "c", *SAVE_XY]
    final = tmp_path / "c" / "c.safetensors"
    for _ in range(3):
        tick = rng.randrange(1, 4 * 28 + 2)  # 4 batches x 28 row writes, then finish
        _kill_at([sys.executable, "-c", DRIVER, "0.002", *map(str, argv)], tick, tmp_path)
        assert not final.exists()
    # each run removed its killed predecessor's temp file before writing its own: one is left
    assert len(list((tmp_path / "c").glob(".tmp-c.safetensors.*"))) == 1
    from tests.helpers import run_cli

    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["c.safetensors"]
    XYCache(final).verify_checksums()


def test_baseline_temp_files_are_never_read(tmp_path):
    """A leftover `.tmp-layer0.json.<pid>.*` (even one that parses) is not a layer file."""
    from tokenwise_harness.verdict.baselines import BaselineStore

    text = _valid_layer_text(tmp_path / "src")
    d = tmp_path / "b" / MODEL_ID
    d.mkdir(parents=True)
    (d / ".tmp-layer0.json.999999999.abc").write_text(text)
    assert BaselineStore(tmp_path / "b", MODEL_ID).case_ids() == []
    assert BaselineStore(tmp_path / "b", MODEL_ID).get(CASES[0]) is None



def test_concurrent_pytest_update_baselines_keep_every_case(demo_model_dir, tmp_path):
    """The issue's own scenario, end to end: 3 `pytest --update-baselines` runs at once on one store,
    each selecting other projections of the same layer files; a check run then finds every case."""
    from tokenwise_harness.capture.save_xy import save_xy

    cache = save_xy(demo_model_dir, tmp_path / "xy", "c", cn=1, eu=1, length=8, progress=False, log=lambda m: None)
    (tmp_path / "conftest.py").write_text("")
    common = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={tmp_path}",
              f"--model-dir={demo_model_dir}", f"--xy-path={cache}", "--ranks=8", "--qspecs=nvfp4@16",
              f"--baselines-dir={tmp_path / 'b'}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    projs = ("q_proj", "k_proj", "v_proj")
    procs = [subprocess.Popen([*common, "--update-baselines", "-k", p], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in projs]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    check = subprocess.run([*common, "-k", " or ".join(projs)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "6 passed" in check.stdout, check.stdout  # 2 layers x 3 projections, every baseline kept
