"""The shared user cache: captured X/Y caches and smoothed model dirs, reused across checkouts.

Where: `--tokenwise-cache-dir=DIR` (pytest), else `$TOKENWISE_CACHE_DIR`, else
`$XDG_CACHE_HOME/tokenwise_harness` (default `~/.cache/tokenwise_harness`), as the HF
ecosystem keeps its caches under the user cache dir.

Layout:

    <root>/xy/<model>-<model fp[:12]>-<data fp[:12]>[-full].safetensors   captured caches
    <root>/smoothed/<model>-<model fp[:12]>-<data fp[:12]>-smooth-<alpha>/  smoothed model dirs
    <root>/<kind>/<entry>.json    one record per entry: model dir, tokens, created; its mtime is
                                  the entry's last use (what `cache ls` shows and `prune` ages by)
    <root>/locks/<entry>.lock     one file lock per entry
    <root>/lowrank/, <root>/digests/   memo.py's low-rank factors and weight digests (many small
                                  files, no lock needed): listed as one entry each, pruned by file age

Entries are keyed by model and data fingerprints, so a changed model or capture size never
reuses a stale one. Building an entry holds its lock: a second run that wants the same entry
waits for the first and then reuses it, and the entry appears under its final name only when
complete (save_xy and smooth write atomically). When a new cache of a model dir is built, the
entries of the *same model dir* from an older version of its weights are deleted (they can
never match again); other models' entries and other capture sizes of this model are kept.

Nothing here imports torch at module level: `tokenwise-precision cache ls` stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenwise_harness.errors import HarnessError

APP_NAME = "tokenwise_harness"
KINDS = ("xy", "smoothed")
MEMO_KINDS = ("lowrank", "digests", "verified")  # memo.py's stores: listed and pruned as one entry each
RECORD_SUFFIX = ".json"


def default_root() -> Path:
    """$TOKENWISE_CACHE_DIR, else $XDG_CACHE_HOME/tokenwise_harness, else ~/.cache/tokenwise_harness
    (memo.default_root: the lookup lives in the lowest layer, checkpoint.ModelDir falls back to it)."""
    from tokenwise_harness.memo import default_root as memo_default_root

    return memo_default_root()


def resolve_root(option: str | os.PathLike | None) -> Path:
    """The cache root: the flag's value when given, else default_root(). The one resolution: front
    ends make it once and pass it on explicitly (CacheStore, run.EvalSpec.cache_dir ->
    checkpoint.ModelDir -> memo's digest memo and engine's low-rank store)."""
    return Path(option).expanduser() if option else default_root()


@dataclass(frozen=True)
class Entry:
    """One cached thing, as `cache ls` shows it."""

    kind: str  # "xy" or "smoothed"
    path: Path
    model: str  # model dir name
    model_dir: str  # the model dir it was built from ("" when unknown)
    tokens: int | None
    size: int  # bytes
    last_used: float  # epoch seconds

    @property
    def age_days(self) -> float:
        return max(0.0, (time.time() - self.last_used) / 86400)


class CacheStore:
    def __init__(self, root: str | os.PathLike | None = None, flag: str = "--tokenwise-cache-dir"):
        self.root = resolve_root(root)
        self.flag = flag

    # ------------------------------------------------------------ names
    def xy_path(self, model_name: str, model_fp: str, data_fp: str, compact: bool = True) -> Path:
        from tokenwise_harness.capture.save_xy import cache_path

        label = f"{model_name}-{model_fp[:12]}-{data_fp[:12]}{'' if compact else '-full'}"
        return cache_path(self.root / "xy", label)

    def smoothed_path(self, model_name: str, model_fp: str, data_fp: str, alpha) -> Path:
        return self.root / "smoothed" / f"{model_name}-{model_fp[:12]}-{data_fp[:12]}-smooth-{alpha}"

    @staticmethod
    def record_path(entry: Path) -> Path:
        return entry.parent / (entry.name + RECORD_SUFFIX)

    def lock(self, entry: Path):
        from filelock import FileLock

        return FileLock(str(self.root / "locks" / f"{entry.parent.name}-{entry.name}.lock"))

    # ------------------------------------------------------------ build once
    def ensure(self, entry: Path, build: Callable[[], object], record: dict, log=print) -> Path:
        """`entry`, built by `build()` when missing (under its lock, so concurrent runs build it once)."""
        from filelock import Timeout

        if self._complete(entry):
            self.touch(entry)
            return entry
        from tokenwise_harness.atomic import check_writable_dir

        check_writable_dir(entry.parent, self.flag, create=True)
        check_writable_dir(self.root / "locks", self.flag, create=True)
        lock = self.lock(entry)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log(f"waiting for another run that is building {entry} (lock {lock.lock_file})")
            lock.acquire()
        try:
            if not self._complete(entry):  # the other run may have built it meanwhile
                build()
                if not self._complete(entry):
                    raise HarnessError(f"{self.flag} {self.root}: building {entry.name} left no complete entry")
                self._write_record(entry, record)
                self._drop_older_versions(entry, record)
            self.touch(entry)
        finally:
            lock.release()
        return entry

    @staticmethod
    def _complete(entry: Path) -> bool:
        return (entry / "config.json").is_file() if entry.parent.name == "smoothed" else entry.is_file()

    def touch(self, entry: Path) -> None:
        """Mark `entry` used now (its record's mtime)."""
        rec = self.record_path(entry)
        try:
            if rec.is_file():
                os.utime(rec)
            else:
                self._write_record(entry, {})
        except OSError:
            pass  # a read-only shared cache still serves; it just does not age

    def _write_record(self, entry: Path, record: dict) -> None:
        from tokenwise_harness.atomic import atomic_path

        rec = {"created": time.time(), **record}
        with atomic_path(self.record_path(entry), self.flag) as tmp:
            Path(tmp).write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    def _drop_older_versions(self, entry: Path, record: dict) -> None:
        """Delete entries built from the same model dir but another version of its weights."""
        model_dir, fp = record.get("model_dir"), record.get("model_fingerprint")
        if not model_dir or not fp:
            return
        for other in self.entries():
            if (other.path != entry and other.model_dir == model_dir
                    and self._read_record(other.path).get("model_fingerprint") not in (None, fp)):
                self._remove(other, wait=False)

    # ------------------------------------------------------------ list / prune
    def entries(self) -> list[Entry]:
        """Every entry under the root, oldest use first."""
        out = []
        for kind in KINDS:
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.name.endswith(RECORD_SUFFIX) or path.name.startswith("."):
                    continue
                rec = self._read_record(path)
                tokens = rec.get("n_tokens")
                if tokens is None and kind == "xy":
                    tokens = _safetensors_meta(path).get("n_tokens")
                rec_path = self.record_path(path)
                used = rec_path.stat().st_mtime if rec_path.is_file() else path.stat().st_mtime
                out.append(Entry(kind, path, rec.get("model_name") or _safetensors_meta(path).get("model_name", "?"),
                                 rec.get("model_dir", ""), int(tokens) if tokens is not None else None,
                                 _size(path), used))
        for kind in MEMO_KINDS:
            files = _memo_files(self.root / kind)
            if files:
                out.append(Entry(kind, self.root / kind, "-", "", None, sum(st.st_size for _, st in files),
                                 max(st.st_mtime for _, st in files)))
        return sorted(out, key=lambda e: e.last_used)

    def prune(self, older_than_days: float | None = None, everything: bool = False, dry_run: bool = False) -> list[Entry]:
        """Remove entries not used for `older_than_days` days (or all); returns what was (or would be) removed.
        An entry being built by a running job (its lock held) is skipped."""
        if older_than_days is None and not everything:
            raise HarnessError("nothing to prune: give --older_than DAYS or --all")
        if older_than_days is not None and older_than_days < 0:
            raise HarnessError(f"--older_than {older_than_days} must be >= 0 days")
        entries = self.entries()
        chosen = [e for e in entries if e.kind in KINDS and (everything or e.age_days >= older_than_days)]
        for e in entries:  # memo stores: their old files (all of them with --all)
            cutoff = time.time() - (0 if everything else older_than_days * 86400)
            old = [(f, st) for f, st in _memo_files(e.path) if everything or st.st_mtime <= cutoff] if e.kind in MEMO_KINDS else []
            if old:
                if not dry_run:
                    for f, _ in old:
                        f.unlink(missing_ok=True)
                chosen.append(Entry(e.kind, e.path, "-", "", None, sum(st.st_size for _, st in old),
                                    max(st.st_mtime for _, st in old)))
        if dry_run:
            return chosen
        return [e for e in chosen if e.kind in MEMO_KINDS or self._remove(e, wait=False)]

    def _remove(self, entry: Entry, wait: bool) -> bool:
        from filelock import Timeout

        lock = self.lock(entry.path)
        try:
            (self.root / "locks").mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=-1 if wait else 0)
        except Timeout:
            return False
        except OSError as exc:
            raise HarnessError(f"{self.flag} {self.root}: cannot remove {entry.path} ({exc.strerror}); "
                               "the cache dir is not writable") from None
        try:
            if entry.path.is_dir():
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                entry.path.unlink(missing_ok=True)
            self.record_path(entry.path).unlink(missing_ok=True)
        finally:
            lock.release()
        return True

    def _read_record(self, entry: Path) -> dict:
        try:
            return json.loads(self.record_path(entry).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}


def captured_xy(store: CacheStore, mdir, *, seed: int, cn: int, eu: int, length: int, torch_dtype: str = "auto",
                device: str | None = None, compact: bool = True, build: bool = True, progress=False,
                log=print) -> Path:
    """The store's X/Y cache of `mdir` (a checkpoint.ModelDir) for this capture size; captured with
    save_xy when missing and `build` (False: only the path, e.g. on an xdist worker)."""
    from tokenwise_harness.capture import data
    from tokenwise_harness.capture.save_xy import save_xy
    from tokenwise_harness.checkpoint import load_tokenizer

    batch = data.get_veri_data(load_tokenizer(mdir), seed, cn, length, eu, length, "cpu")
    path = store.xy_path(mdir.name, mdir.fingerprint, data.data_fingerprint(batch), compact)
    if not build:
        return path
    record = {"model_name": mdir.name, "model_dir": str(mdir.path.resolve()), "model_fingerprint": mdir.fingerprint,
              "n_tokens": int(batch["input_ids"].numel()), "layout": "compact" if compact else "full",
              "seed": seed, "cn": cn, "eu": eu, "length": length}

    def capture():
        log(f"capturing {record['n_tokens']} tokens of {mdir.path} -> {path} "
            "(once per model and data; later runs reuse it)")
        save_xy(mdir.path, path.parent, path.name[:-len(path.suffix)], seed=seed, cn=cn, eu=eu, length=length,
                torch_dtype=torch_dtype, device=device, compact=compact, progress=progress, log=log,
                cache_root=store.root)

    return store.ensure(path, capture, record, log=log)


def smoothed_model(store: CacheStore, mdir, cache, alpha, *, build: bool = True, chunk_tokens: int = 4096,
                   device: str | None = None, log=print) -> Path:
    """The store's smoothed copy of `mdir` on `cache` (an XYCache) at `alpha`; built when missing."""
    from tokenwise_harness.calib.smooth import smooth

    data_fp = cache.metadata.get("data_fingerprint", "nodata")
    out = store.smoothed_path(mdir.name, mdir.fingerprint, data_fp, alpha)
    if not build:
        return out
    record = {"model_name": mdir.name, "model_dir": str(mdir.path.resolve()), "model_fingerprint": mdir.fingerprint,
              "n_tokens": int(cache.metadata.get("n_tokens", 0)) or None, "alpha": str(alpha),
              "xy_path": str(cache.path)}

    def build_it():
        log(f"smoothing {mdir.path} (alpha {alpha}) on {cache.path} -> {out}")
        smooth(mdir.path, cache.path, out, alpha=alpha, chunk_tokens=chunk_tokens, device=device, log=lambda msg: None,
               cache_root=store.root)

    return store.ensure(out, build_it, record, log=log)


def _memo_files(folder: Path) -> list[tuple[Path, os.stat_result]]:
    out = []
    if folder.is_dir():
        for f in folder.rglob("*"):
            try:
                if f.is_file() and not f.name.startswith(".tmp-"):
                    out.append((f, f.stat()))
            except OSError:
                pass
    return out


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _safetensors_meta(path: Path) -> dict:
    """A safetensors file's `__metadata__`, read from its header (no torch); {} when not one."""
    from tokenwise_harness.safetensors_io import FormatError, read_header

    try:
        return read_header(path).metadata
    except FormatError:
        return {}


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_age(days: float) -> str:
    seconds = days * 86400
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{days:.1f} d"
