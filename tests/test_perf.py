"""A rerun redoes nothing (issue 17): the digest memo, the low-rank store, stray weight files,
and what a scoring process imports. A CPU-sized benchmark (pytest-benchmark) of the warm rerun.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenwise_harness import engine as evaluate
from tokenwise_harness import memo
from tokenwise_harness.cache import XYCache
from tokenwise_harness.checkpoint import ModelDir
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import build_grid, parse_qspecs
from tokenwise_harness.numerics import lowrank

GRID = build_grid([8, 16], parse_qspecs("nvfp4@16"))


@pytest.fixture(scope="module")
def small(tmp_path_factory, demo_model_dir):
    """(model dir, cache) of the 2-layer demo model, 64 tokens."""
    from tokenwise_harness.capture.save_xy import save_xy

    cache = save_xy(demo_model_dir, tmp_path_factory.mktemp("perf_cache"), "c", cn=1, eu=1, length=32, device="cpu",
                    progress=False, log=lambda m: None)
    return Path(demo_model_dir), Path(cache)


@pytest.fixture
def memo_dir(tmp_path, monkeypatch):
    """A fresh, empty digest memo and low-rank store, as on a new machine."""
    d = tmp_path / "memo"
    monkeypatch.setenv("TOKENWISE_CACHE_DIR", str(d))
    fresh_process()
    return d


def fresh_process():
    """What a new process starts with: no in-process digests, zeroed counters."""
    memo.clear_process_memo()
    memo.reset_counters()
    lowrank.COUNTS["eigh"] = 0


def score(model_dir, cache, grid=GRID):
    mdir = ModelDir(model_dir)
    results = evaluate.evaluate_grid(XYCache(cache), evaluate.CheckpointWeights(mdir, False), grid, 4096, "cpu",
                                     progress=False)
    return mdir.fingerprint, results


def scaled_copy(src: Path, dst: Path, factor: float) -> None:
    """A weight file with the same tensor names as src, every value times `factor`."""
    save_file({k: (v.float() * factor).to(v.dtype) for k, v in load_file(str(src)).items()}, str(dst),
              metadata={"format": "pt"})


def test_stray_safetensors_change_neither_fingerprint_nor_scores(tmp_path, small, memo_dir):
    model, cache = small
    m = shutil.copytree(model, tmp_path / "m")
    fp0, res0 = score(m, cache)
    scaled_copy(m / "model.safetensors", m / "a-stray.safetensors", 10.0)  # sorts before model.safetensors
    scaled_copy(m / "model.safetensors", m / "zz-old.safetensors", -3.0)  # and after it
    shutil.copy(cache, m / "xy.safetensors")  # a cache saved into the model dir
    fp1, res1 = score(m, cache)
    assert ModelDir(m).weight_files == [m / "model.safetensors"]
    assert fp1 == fp0 and res1 == res0


def test_old_shard_beside_an_index_changes_neither_fingerprint_nor_scores(tmp_path, small, memo_dir):
    model, cache = small
    _, res0 = score(model, cache)
    m = shutil.copytree(model, tmp_path / "sharded")
    tensors = load_file(str(m / "model.safetensors"))
    (m / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(m / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    fp1, res1 = score(m, cache)
    assert res1 == res0  # the same tensors, split over two shards
    # an old shard of an earlier save (other values, every tensor name) left beside the index
    save_file({k: v * 7 for k, v in tensors.items()}, str(m / "model-00001-of-00003.safetensors"),
              metadata={"format": "pt"})
    fp2, res2 = score(m, cache)
    assert (fp2, res2) == (fp1, res1)
    assert [f.name for f in ModelDir(m).weight_files] == list(shards)
    (m / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(HarnessError, match="names shard model-00002-of-00002.safetensors, which is missing"):
        ModelDir(m)


def test_digest_memo_reads_no_bytes_on_rerun_and_sees_rewrites(tmp_path, memo_dir):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100_000)
    first = memo.file_digest(f, memo_dir)
    assert memo.COUNTERS["bytes_hashed"] == 100_000
    fresh_process()
    assert memo.file_digest(f, memo_dir) == first and memo.COUNTERS["bytes_hashed"] == 0
    # rewritten in place, same size: mtime moves, so it is hashed again
    st = f.stat()
    f.write_bytes(b"b" * 100_000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    fresh_process()
    assert memo.file_digest(f, memo_dir) != first and memo.COUNTERS["bytes_hashed"] == 100_000
    # replaced by a new file (new inode), as save_pretrained does
    tmp = tmp_path / "w.tmp"
    tmp.write_bytes(b"a" * 100_000)
    os.replace(tmp, f)
    fresh_process()
    assert memo.file_digest(f, memo_dir) == first and memo.COUNTERS["bytes_hashed"] == 100_000


def test_stored_factors_are_exact_against_float64_svd(tmp_path):
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(160, 96, generator=g, dtype=torch.float64))
    w = ((u * torch.logspace(1, -2, 96, dtype=torch.float64)) @ v.T).float()  # distinct singular values
    built = lowrank.LowRank(w, 24)
    store = memo.LowRankStore(tmp_path / "store")
    key = memo.lowrank_key("weight-id", None, 24)
    store.put(key, built.tensors())
    back = lowrank.LowRank.from_factors(**store.get(key))
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    for r in (1, 8, 16, 24):
        exact = (U[:, :r] * S[:r]) @ Vh[:r]
        assert torch.equal(back.product(r), built.product(r))
        assert float((back.product(r).double() - exact).norm() / exact.norm()) <= 1e-6


def test_lowrank_store_prunes_least_recently_used_to_its_cap(tmp_path):
    t = {"L1": torch.ones(64, 4), "L2": torch.ones(4, 64), "S": torch.ones(4)}
    one = len(__import__("safetensors.torch", fromlist=["save"]).save(t))
    store = memo.LowRankStore(tmp_path, cap_bytes=3 * one)
    keys = [memo.lowrank_key(f"w{i}", None, 4) for i in range(4)]
    for i, key in enumerate(keys[:3]):
        store.put(key, t)
        os.utime(store._path(key), ns=(i * 10**9, i * 10**9))  # distinct ages, oldest first
    assert store.get(keys[0]) is not None  # used: now the most recent
    store.put(keys[3], t)
    assert [store._path(k).is_file() for k in keys] == [True, False, True, True]
    assert not list(tmp_path.rglob(".tmp-*"))


def test_warm_rerun_hashes_zero_bytes_and_does_no_eigh(benchmark, small, memo_dir, tmp_path):
    """The CPU-sized benchmark: a cold eval_fake fills the memo and the store, the timed warm
    reruns (each as a fresh process would start) read no weight bytes and decompose nothing."""
    from tokenwise_harness.cli import main

    model, cache = small
    args = ["eval_fake", f"--model_dir={model}", f"--xy_path={cache}", "--ranks=8,16", "--qspecs=nvfp4@16",
            "--device=cpu"]
    assert main([*args, f"--out_json={tmp_path / 'cold.json'}"]) == 0
    n_weights = len(ModelDir(model).targets())
    assert memo.COUNTERS["bytes_hashed"] > 0 and lowrank.COUNTS["eigh"] == n_weights

    def warm():
        fresh_process()
        assert main([*args, f"--out_json={tmp_path / 'warm.json'}"]) == 0
        return dict(memo.COUNTERS, eigh=lowrank.COUNTS["eigh"])

    counts = benchmark.pedantic(warm, rounds=2, iterations=1)
    assert counts["bytes_hashed"] == 0 and counts["eigh"] == 0
    assert counts["lowrank_hits"] == n_weights and counts["lowrank_misses"] == 0
    cold, again = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cold", "warm"))
    assert again["by_layer"] == cold["by_layer"]  # bit for bit the same numbers
    benchmark.extra_info.update(counts)


def test_scoring_process_imports_no_transformers(small, tmp_path):
    """`python -m tokenwise_harness eval_fake` on a safetensors checkpoint: transformers is never
    imported (-X importtime lists every import); a second process rereads nothing."""
    model, cache = small
    env = dict(os.environ, TOKENWISE_CACHE_DIR=str(tmp_path / "memo"))
    cmd = [sys.executable, "-X", "importtime", "-m", "tokenwise_harness", "eval_fake", f"--model_dir={model}",
           f"--xy_path={cache}", f"--out_json={tmp_path / 'r.json'}", "--ranks=8", "--qspecs=nvfp4@16",
           "--device=cpu"]
    runs = [subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
        imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()
                    if line.startswith("import time:")]
        assert "torch" in imported  # the probe sees imports at all
        assert not [m for m in imported if m.split(".")[0] == "transformers"]
    assert "eigendecompositions 0" not in runs[0].stdout
    assert "weight bytes hashed 0," in runs[1].stdout and "eigendecompositions 0," in runs[1].stdout


# ---------------------------------------------------------------- the fingerprint hashed beside the engine


def _gate_hashing(mp, release_after: int, wait_for_digest: bool = False, after_decomposing: bool = False) -> list:
    """Hold the (real) weight-file hash back until the engine has read `release_after` weights, so
    the engine provably runs while the fingerprint is unknown; the targets read are returned.
    wait_for_digest: the release then also waits until the fingerprint is known.
    after_decomposing: release only once the last of those weights is also decomposed (else the
    hash can finish between its read and its store lookup, which then is a real lookup)."""
    release = threading.Event()
    real_digest, real_get, real_lowrank = memo.file_digest, evaluate.CheckpointWeights.get, evaluate._lowrank
    reads, decomposed = [], []

    def held_digest(path, root):
        assert release.wait(120)
        return real_digest(path, root)

    def get(self, target, device):
        reads.append(target)
        if len(reads) == release_after and not after_decomposing:
            release.set()
            if wait_for_digest:
                self.model_dir._hashing.result(timeout=120)
        return real_get(self, target, device)

    def lowrank_then_release(*args, **kwargs):
        out = real_lowrank(*args, **kwargs)
        decomposed.append(args[1])
        if len(decomposed) == release_after:
            release.set()
        return out

    mp.setattr(memo, "file_digest", held_digest)
    mp.setattr(evaluate.CheckpointWeights, "get", get)
    if after_decomposing:
        mp.setattr(evaluate, "_lowrank", lowrank_then_release)
    return reads


def test_cold_overlap_refuses_another_models_cache_between_weights(tmp_path, small, memo_dir, monkeypatch):
    """A cold digest memo hashes the fingerprint while the engine runs; a cache captured from
    another model is still refused with the one-line message of the up-front check (exit 2),
    before the next weight is read once the digest is known, and nothing is written."""
    from tests.helpers import files_under, one_line_error, run_cli

    model, cache = small
    changed = shutil.copytree(model, tmp_path / "changed")
    w = load_file(str(changed / "model.safetensors"))
    w["model.norm.weight"] = w["model.norm.weight"] * 1.01  # same shapes, another model
    save_file(w, str(changed / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    args = ["eval_fake", f"--model_dir={changed}", f"--xy_path={cache}", f"--out_json={out / 'r.json'}",
            "--ranks=8", "--qspecs=nvfp4@16", "--device=cpu"]
    with monkeypatch.context() as mp:
        reads = _gate_hashing(mp, release_after=2, wait_for_digest=True)
        line = one_line_error(run_cli(*args))
    assert "different model" in line and "save_xy" in line
    assert len(reads) == 2 < len(ModelDir(changed).targets())  # refused before the third weight was read
    assert memo.COUNTERS["bytes_hashed"] > 0 and files_under(out) == []
    fresh_process()  # warm digest memo: the up-front check, the same line
    assert one_line_error(run_cli(*args)) == line and memo.COUNTERS["bytes_hashed"] == 0
    assert files_under(out) == []


def test_cold_overlap_stores_factors_under_their_digest_keys(tmp_path, small, memo_dir, monkeypatch):
    """Weights decomposed before their file's digest is known skip the store (no lookup under an
    unknown key) and are put under the digest's key once it is known: the keys match the
    sha256 of the file computed here, the factors are exact, and a warm rerun hashes 0 bytes,
    decomposes nothing and reuses every factor."""
    from tokenwise_harness.cli import main

    model, cache = small
    targets = ModelDir(model).targets()
    args = ["eval_fake", f"--model_dir={model}", f"--xy_path={cache}", "--ranks=8,16", "--qspecs=nvfp4@16",
            "--device=cpu"]
    with monkeypatch.context() as mp:
        reads = _gate_hashing(mp, release_after=len(targets), after_decomposing=True)  # all before the digest
        assert main([*args, f"--out_json={tmp_path / 'cold.json'}"]) == 0
    assert len(reads) == len(targets)
    c = memo.COUNTERS
    assert c["lowrank_misses"] == 0 and c["lowrank_hits"] == 0 and lowrank.COUNTS["eigh"] == len(targets)
    assert c["lowrank_writes"] == len(targets)
    digest = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    weights = load_file(str(model / "model.safetensors"))
    store = memo.LowRankStore(memo_dir)
    for t in targets:
        w = weights[t.path + ".weight"].double()
        rank = min(16, *w.shape)
        stored = store.get(memo.lowrank_key(f"{digest}:{t.path}.weight", None, rank))
        assert stored is not None, t.path
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        back = lowrank.LowRank.from_factors(stored["L1"], stored["L2"], stored["S"])
        for r in (8, rank):
            exact = (U[:, :r] * S[:r]) @ Vh[:r]
            assert float((back.product(r).double() - exact).norm() / exact.norm()) <= 1e-6
    fresh_process()
    assert main([*args, f"--out_json={tmp_path / 'warm.json'}"]) == 0
    assert c["bytes_hashed"] == 0 and lowrank.COUNTS["eigh"] == 0
    assert c["lowrank_hits"] == len(targets) and c["lowrank_misses"] == 0
    assert not [t for t in threading.enumerate() if t.name == "tokenwise-fingerprint" and t.is_alive()]
    cold, warm = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cold", "warm"))
    assert warm == cold  # the same numbers and the same meta (fingerprint included)


def test_a_verified_cache_is_not_hashed_again_until_it_changes(tmp_path, small, memo_dir, monkeypatch):
    """Every tensor of an X/Y cache passing its sha256 records the file (by identity) in the memo:
    a later open trusts it without reading a byte, while a changed byte (a new identity) is
    checked again and refused, and with the memo off nothing is trusted."""
    _, cache = small
    copy = tmp_path / "xy.safetensors"
    shutil.copy(cache, copy)
    first = XYCache(copy)
    assert first.checksums and not first._verified
    first.verify_checksums()  # the last tensor's check records the whole file
    fresh_process()
    second = XYCache(copy)
    assert second._verified == set(second.checksums) and memo.COUNTERS["cache_verify_hits"] == 1
    second.verify_in_background()
    assert not getattr(second, "_background", {})  # nothing left to hash
    before = memo._identity(copy)
    key = sorted(second.checksums)[0]
    with open(copy, "r+b") as fh:  # one byte of the first tensor's data, same size
        fh.seek(second.offsets[key] + 5)
        b = fh.read(1)
        fh.seek(second.offsets[key] + 5)
        fh.write(bytes([b[0] ^ 0x40]))
    assert memo._identity(copy) != before
    third = XYCache(copy)
    assert not third._verified
    with pytest.raises(HarnessError, match="fails its checksum"):
        third.verify_checksums()
    shutil.copy(cache, copy)
    XYCache(copy).verify_checksums()
    monkeypatch.setenv("TOKENWISE_NO_MEMO", "1")
    assert not XYCache(copy)._verified
