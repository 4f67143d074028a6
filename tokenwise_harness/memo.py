"""Persistent memos that let a rerun skip work whose inputs did not change.

* `file_digest(path, root)`: sha256 of a weight file, memoized on disk by the file's identity
  (resolved path, device, inode, size, mtime_ns). A rerun on an unchanged checkpoint stats
  the files and reads no weight bytes; any rewrite (new inode, size or mtime) is rehashed.
* `cache_verified(path, token, root)` / `remember_cache_verified`: an X/Y cache whose every tensor
  passed its sha256 check is remembered by the same file identity, so a rerun on an unchanged
  cache does not hash its gigabytes again (a rewrite, copy or truncation is a new identity and
  is checked again; bytes changed under an unchanged identity are what this trusts).
* `LowRankStore`: a size-capped, content-keyed store of low-rank factors (one safetensors
  file per entry, atomic writes, least-recently-used entries pruned past the cap), so a rerun
  on unchanged weights does no eigendecomposition.

All three live under a cache root the caller passes in (`<root>/digests/`, `<root>/verified/`,
`<root>/lowrank/`): the one cache_store.resolve_root chose (pytest's --tokenwise-cache-dir, the
CLI's --cache_dir), so they sit beside the captured caches; `default_root()`
($TOKENWISE_CACHE_DIR, else $XDG_CACHE_HOME/tokenwise_harness, else ~/.cache/tokenwise_harness)
is where that resolution starts when no flag is given. Nothing here keeps a root of its own.
Every entry is its own small file, written to a temp name and renamed, so concurrent runs never
see half an entry and need no lock; a memo that cannot be written (read-only home, full disk)
is skipped, never an error. `TOKENWISE_NO_MEMO=1` turns them off. `COUNTERS` counts the bytes
hashed and the memos' hits and misses (tests and benchmarks read it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

from tokenwise_harness.envvars import int_setting

# Bump when an entry's meaning changes: old entries are then simply never found again.
MEMO_VERSION = "1"
DEFAULT_STORE_CAP_BYTES = 8 << 30

COUNTERS = {"bytes_hashed": 0, "files_hashed": 0, "digest_memo_hits": 0,
            "lowrank_hits": 0, "lowrank_misses": 0, "lowrank_writes": 0, "cache_verify_hits": 0}

_PROCESS_DIGESTS: dict[tuple, str] = {}
_LOCK = threading.Lock()  # digests are computed on several threads at once


def _count(name: str, n: int = 1) -> None:
    with _LOCK:
        COUNTERS[name] += n


def reset_counters() -> None:
    for k in COUNTERS:
        COUNTERS[k] = 0


def clear_process_memo() -> None:
    """Forget the in-process digest memo (the on-disk memo stays): as a new process would start."""
    _PROCESS_DIGESTS.clear()


def enabled() -> bool:
    return os.environ.get("TOKENWISE_NO_MEMO", "") not in ("1", "true", "yes")


def default_root() -> Path:
    """The cache root when no flag names one: $TOKENWISE_CACHE_DIR, else
    $XDG_CACHE_HOME/tokenwise_harness, else ~/.cache/tokenwise_harness (read when called)."""
    env = os.environ.get("TOKENWISE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).expanduser() / "tokenwise_harness"


# Held while an entry is written: a process that exits without waiting for its threads
# (cli.console_main) takes it first, so no background write is cut off half-way.
WRITE_LOCK = threading.Lock()


def _write_atomic(final: Path, data: bytes) -> bool:
    """Write `data` under `final` via a temp file + rename; False (and nothing left) on failure."""
    with WRITE_LOCK:
        return _write_atomic_unlocked(final, data)


def _write_atomic_unlocked(final: Path, data: bytes) -> bool:
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{final.name}.{os.getpid()}.", dir=final.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, final)
        return True
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False


# ------------------------------------------------------------------ file digests


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _entry_file(root: Path | None, kind: str, key: list) -> Path | None:
    """Where the on-disk memo of `root` keeps the `kind` entry of `key` (JSON-able parts, the
    file identity among them); None when it is off."""
    if root is None or not enabled():
        return None
    name = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:40]
    return Path(root) / kind / name[:2] / f"{name}.json"


def _read_entry(file: Path | None, identity: tuple) -> dict | None:
    """The JSON entry in `file` when it is one and vouches for this very identity, else None."""
    if file is None:
        return None
    try:
        entry = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("identity") == list(identity) else None


def _memo_file(identity: tuple, root: Path | None) -> Path | None:
    """Where the on-disk memo of `root` keeps this identity's digest; None when it is off."""
    return _entry_file(root, "digests", [MEMO_VERSION, *identity])


def _remembered(identity: tuple, root: Path | None) -> str | None:
    """The digest of a file with this identity from the in-process or the on-disk memo, else None."""
    got = _PROCESS_DIGESTS.get(identity)
    if got is not None:
        return got
    entry = _read_entry(_memo_file(identity, root), identity)
    if entry is not None and isinstance(entry.get("sha256"), str):
        _count("digest_memo_hits")
        _PROCESS_DIGESTS[identity] = entry["sha256"]
        return entry["sha256"]
    return None


def known_digest(path: Path, root: Path | None) -> str | None:
    """file_digest(path, root) when a memo already holds it (no byte of the file is read), else None."""
    return _remembered(_identity(Path(path)), root)


def file_digest(path: Path, root: Path | None) -> str:
    """sha256 hex digest of a file's bytes; read from the memo under the cache root `root` when
    the file is unchanged (root None: the in-process memo only)."""
    path = Path(path)
    identity = _identity(path)
    got = _remembered(identity, root)
    if got is not None:
        return got
    memo = _memo_file(identity, root)
    h = hashlib.sha256()
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while (n := fh.readinto(view)) > 0:
            h.update(view[:n])
            _count("bytes_hashed", n)
    _count("files_hashed")
    digest = h.hexdigest()
    if _identity(path) == identity:  # unchanged while we read it: safe to remember
        _PROCESS_DIGESTS[identity] = digest
        if memo is not None:
            _write_atomic(memo, json.dumps({"identity": list(identity), "sha256": digest}).encode())
    return digest


# ------------------------------------------------------------------ verified X/Y caches


def _verified_file(identity: tuple, token: str, root: Path | None) -> Path | None:
    return _entry_file(root, "verified", [MEMO_VERSION, "verified", *identity, token])


def cache_verified(path: Path, token: str, root: Path | None) -> bool:
    """Whether this very file (same identity) passed every checksum of `token` (its checksum set)
    before, by the memo under the cache root `root` (None: off)."""
    try:
        identity = _identity(Path(path))
    except OSError:
        return False
    entry = _read_entry(_verified_file(identity, token, root), identity)
    if entry is None or entry.get("token") != token:
        return False
    _count("cache_verify_hits")
    return True


def remember_cache_verified(path: Path, token: str, root: Path | None) -> None:
    """Record under `root` that every checksum of `token` matched this file's bytes. Never raises."""
    try:
        identity = _identity(Path(path))
    except OSError:
        return
    file = _verified_file(identity, token, root)
    if file is not None:
        _write_atomic(file, json.dumps({"identity": list(identity), "token": token}).encode())


# ------------------------------------------------------------------ low-rank factors


def lowrank_key(weight_id: str, smooth_id: str | None, rank: int, iters: int = 1) -> str:
    """Content key of one decomposition: the weight's and smoothing's content ids, rank, iters."""
    text = json.dumps({"v": MEMO_VERSION, "weight": weight_id, "smooth": smooth_id, "rank": int(rank),
                       "iters": int(iters), "dtype": "float32"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class LowRankStore:
    """Content-keyed low-rank factors on disk (L1 = U·S, L2 = Vᵀ, S) under `<root>/lowrank/` of the
    cache root `root`, capped in bytes, LRU-pruned."""

    def __init__(self, root: Path, cap_bytes: int | None = None):
        self.dir = Path(root) / "lowrank"
        self.cap_bytes = int(cap_bytes if cap_bytes is not None
                             else int_setting("TOKENWISE_LOWRANK_STORE_BYTES", DEFAULT_STORE_CAP_BYTES))
        self._total: int | None = None  # bytes in the store, known after the first scan

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str, device="cpu"):
        """{"L1", "L2", "S"} tensors on `device`, or None when absent or unreadable."""
        path = self._path(key)
        if not path.is_file():
            _count("lowrank_misses")
            return None
        try:
            from safetensors.torch import load_file

            tensors = load_file(str(path), device=str(device))
            if set(tensors) != {"L1", "L2", "S"}:
                raise ValueError("wrong tensors")
        except Exception:  # a damaged entry is a miss; it gets rewritten
            _count("lowrank_misses")
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently used = oldest mtime
        _count("lowrank_hits")
        return tensors

    def put(self, key: str, tensors: dict) -> None:
        """Store the factors (CPU copies are made here); prune past the cap. Never raises."""
        try:
            from safetensors.torch import save

            data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
        except Exception:
            return
        if len(data) > self.cap_bytes:
            return
        if _write_atomic(self._path(key), data):
            _count("lowrank_writes")
            if self._total is None:
                self.prune()  # one scan per process; later writes only add to the running total
            else:
                self._total += len(data)
                if self._total > self.cap_bytes:
                    self.prune()

    def prune(self) -> None:
        """Delete the least recently used entries until the store fits its cap."""
        entries = []
        try:
            for sub in self.dir.iterdir():
                if not sub.is_dir():
                    continue
                for f in sub.iterdir():
                    if f.suffix == ".safetensors" and not f.name.startswith(".tmp-"):
                        with contextlib.suppress(OSError):
                            st = f.stat()
                            entries.append((st.st_mtime_ns, st.st_size, f))
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        for _, size, f in sorted(entries, key=lambda e: e[0]):
            if total <= self.cap_bytes:
                break
            with contextlib.suppress(OSError):
                f.unlink()
                total -= size
        self._total = total
