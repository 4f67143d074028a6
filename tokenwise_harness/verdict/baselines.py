"""The baseline store: each case's metrics from a trusted run, kept in git beside the tests.

Storage and comparison are apart, as in syrupy and pytest-regressions: BaselineStore reads
and writes files; compare_metrics judges a run against stored numbers with the tolerances
of thresholds.yaml; explain_provenance says whether stored numbers are comparable at all.

Layout: one file per model layer, `<baselines-dir>/<model-id>/layer<N>.json`. Per layer
because one file per case would be thousands of files, and one file per model would make
every update a conflict; a layer file holds ~100 cases, and updates of different layers
never touch the same file.

    {
      "schema_version": 1,
      "provenance": {
        "5d0c3e9a1b7f": {"cache_fingerprint": "...", "cuda_version": "12.4", "device": "NVIDIA H100",
                         "dtype": "bfloat16", "git_commit": "...", "harness_version": "0.1.0",
                         "model_fingerprint": "...", "torch_version": "2.5.1"}
      },
      "cases": {
        "layer0-mlp-down_proj-rank16-nvfp4-blk128": {"nmse": 0.0123, ..., "n_tokens": 256,
                                                      "provenance": "5d0c3e9a1b7f"}
      }
    }

- One line per case (metrics in report.METRIC_KEYS order, then any extras by name, then the
  case's provenance ref), cases in natural order (rank8 before rank16), floats in Python's
  shortest round-trip repr, non-finite numbers as null (as in the report), a trailing
  newline: the same content always gives the same bytes, and a diff shows one line per case.
- Provenance is per case, by reference to a table keyed by a hash of its content: an update
  under `-k` rewrites some cases of a file and keeps the others, which were recorded by
  another run; a single file-level block would relabel them.
- An update leaves a case alone when its metrics and its provenance (ignoring the commit,
  which changes on every run) are unchanged, so re-running an update produces no diff.
- model-id is `<model dir basename>-<10 hex of sha256(model fingerprint)>`; model ids and case
  ids are checked to be plain names, so no id can lead outside the baselines directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import re
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tokenwise_harness.atomic import TMP_PREFIX, check_writable_dir, clear_leftovers, write_text_atomic
from tokenwise_harness.errors import HarnessError

# report.py's canonical-JSON helpers: the same one-line-per-leaf text and key order as the report.
from tokenwise_harness.report.document import METRIC_KEYS, _ordered, _to_text, finite_or_none
from tokenwise_harness.verdict.cases import Case
from tokenwise_harness.verdict.thresholds import (
    METRICS,
    Thresholds,
    display_path,
    format_pair,
    gated_values,
    regression_bound,
)

SCHEMA_VERSION = 1
PROVENANCE_KEYS = (
    "model_fingerprint", "cache_fingerprint", "harness_version", "torch_version",
    "cuda_version", "device", "dtype", "git_commit",
)
# A difference here makes stored numbers meaningless to compare against.
HARD_KEYS = {
    "model_fingerprint": "the model's weights",
    "cache_fingerprint": "the cached activations (data, seed or length)",
}
# Differs on every run by design; not a reason to rewrite an otherwise unchanged case.
VOLATILE_KEYS = ("git_commit",)
REF_KEY = "provenance"  # inside a case entry: its provenance ref
DEFAULT_HINT = "pytest --update-baselines"
LOCK_TIMEOUT_S = 600

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_CASE_LAYER = re.compile(r"^layer(\d+)-")
_LAYER_FILE = re.compile(r"^layer(\d+)\.json$")


# ---------------------------------------------------------------- names


def model_id(model_name: str, fingerprint: str) -> str:
    """Filesystem-safe id: basename of the model dir (or hub id) plus a short fingerprint hash."""
    base = re.split(r"[\\/]", str(model_name).rstrip("/\\"))[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base)
    base = re.sub(r"\.{2,}", ".", base).strip("._-")[:64] or "model"
    short = hashlib.sha256(str(fingerprint).encode("utf-8")).hexdigest()[:10]
    return f"{base}-{short}"


def _is_plain(name: Any) -> bool:
    """A single file-name part: no separator, no '..', not hidden."""
    return isinstance(name, str) and bool(_SAFE_NAME.match(name)) and ".." not in name


def check_name(name: str, what: str) -> str:
    """`name` when it is a plain file name part; else HarnessError."""
    if not _is_plain(name):
        raise HarnessError(f"baselines: {what} {name!r} is not a plain name (letters, digits, '._+-')")
    return name


def _file_layer(case_id: Any) -> int | None:
    """The layer whose file holds a case id, None for anything that is not a plain layer<N>- id."""
    m = _CASE_LAYER.match(case_id) if _is_plain(case_id) else None
    return int(m[1]) if m else None


def _layer_of(case_id: str) -> int:
    layer = _file_layer(case_id)
    if layer is None:
        raise HarnessError(f"baselines: case id {case_id!r} is not a plain name starting with layer<N>-")
    return layer


def natural_key(text: str) -> tuple:
    """'rank8' sorts before 'rank16'."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


# ---------------------------------------------------------------- provenance


def git_commit(cwd: Path | str | None = None) -> str | None:
    """HEAD of the git checkout at cwd, or None (no git, not a checkout, anything else)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def build_provenance(
    *,
    model_fingerprint: str,
    cache_fingerprint: str,
    dtype: str,
    device: str,
    torch_version: str,
    cuda_version: str | None,
    cwd: Path | str | None = None,
) -> dict:
    """The provenance of this run; the caller (the plugin) knows torch, we add the rest."""
    from tokenwise_harness import __version__

    return {
        "model_fingerprint": model_fingerprint,
        "cache_fingerprint": cache_fingerprint,
        "harness_version": __version__,
        "torch_version": torch_version,
        "cuda_version": cuda_version,
        "device": device,
        "dtype": dtype,
        "git_commit": git_commit(cwd),
    }


class ProvenanceDiff(NamedTuple):
    warnings: list[str]  # benign: torch, CUDA, device, dtype, harness version, commit
    mismatches: list[str]  # model or cache fingerprint: the numbers are not comparable


def explain_provenance(stored: Mapping | None, current: Mapping) -> ProvenanceDiff:
    """How the run that recorded a baseline differs from this one."""
    stored = stored or {}
    keys = [k for k in PROVENANCE_KEYS if k in stored or k in current]
    keys += sorted((set(stored) | set(current)) - set(PROVENANCE_KEYS))
    warnings, mismatches = [], []
    for key in keys:
        old, new = stored.get(key), current.get(key)
        if old == new:
            continue
        if key in HARD_KEYS and old is not None and new is not None:
            mismatches.append(f"{key} differs: baseline {old}, this run {new} ({HARD_KEYS[key]} changed)")
        elif key in HARD_KEYS:
            side = "the baseline" if old is None else "this run"
            warnings.append(f"{key} is not recorded for {side}; cannot tell whether {HARD_KEYS[key]} changed")
        else:
            warnings.append(f"{key} differs: baseline {old}, this run {new}")
    return ProvenanceDiff(warnings, mismatches)


def _provenance_ref(provenance: Mapping) -> str:
    text = json.dumps(provenance, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _plain_provenance(provenance: Mapping) -> dict:
    """JSON scalars only (str/int/float/bool/None), keys sorted."""
    out = {}
    for key in sorted(provenance):
        value = provenance[key]
        out[str(key)] = value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
    return out


def _same_run(a: Mapping, b: Mapping) -> bool:
    strip = lambda p: {k: v for k, v in p.items() if k not in VOLATILE_KEYS}  # noqa: E731
    return strip(a) == strip(b)


# ---------------------------------------------------------------- comparison


def compare_metrics(
    case_id: str,
    metrics: Mapping[str, Any],
    baseline: Mapping[str, Any],
    thresholds: Thresholds,
    hint: str = DEFAULT_HINT,
) -> list[str]:
    """Regression messages of one case against its stored metrics; [] when none regressed.

    A metric regresses when it is worse than regression_bound(base, rtol, atol): above it
    for the error metrics, below it for sqnr_db. Metrics missing on either side, and those
    whose tolerance is null, are not compared. A non-finite current value is left to
    Thresholds.check, which always fails it, so it is not reported twice.
    """
    current, _ = gated_values(metrics)
    stored, derived = gated_values(baseline)
    failures = []
    for metric, kind in METRICS.items():
        tol = thresholds.tolerance(metric)
        if tol is None or metric not in current or metric not in stored or math.isnan(current[metric]):
            continue
        value, base = current[metric], stored[metric]
        if math.isnan(base):
            if metric not in derived:  # a null sqnr_db follows from a null nmse, reported once
                failures.append(
                    f"{case_id}: baseline {metric} is null (the recorded run gave a non-finite value); "
                    f"re-record it with {hint}"
                )
            continue
        rtol, atol = tol
        bound = regression_bound(base, rtol, atol, kind)
        if (value > bound) if kind == "max" else (value < bound):
            shown, allowed = format_pair(value, bound)
            sign = ">" if kind == "max" else "<"
            failures.append(
                f"{case_id}: {metric} = {shown} {sign} {allowed} allowed by baseline {base:.6g} "
                f"(rtol {rtol:g}, atol {atol:g}: {thresholds.tolerance_rule(metric)})"
            )
    return failures


# ---------------------------------------------------------------- files


class _BadFile(ValueError):
    """A layer file that cannot be used; the message says what is wrong with it."""


@dataclass
class _LayerFile:
    cases: dict[str, dict] = field(default_factory=dict)  # case id -> metrics
    refs: dict[str, str] = field(default_factory=dict)  # case id -> provenance ref
    provenance: dict[str, dict] = field(default_factory=dict)  # ref -> provenance

    def put(self, case_id: str, metrics: dict, provenance: dict) -> None:
        ref = _provenance_ref(provenance)
        self.cases[case_id] = metrics
        self.refs[case_id] = ref
        self.provenance[ref] = provenance

    def remove(self, case_id: str) -> None:
        del self.cases[case_id]
        del self.refs[case_id]

    def dumps(self) -> str:
        ids = sorted(self.cases, key=natural_key)
        used = sorted({self.refs[c] for c in ids})
        doc = {
            "schema_version": SCHEMA_VERSION,
            "provenance": {ref: self.provenance[ref] for ref in used},
            "cases": {c: {**_ordered(self.cases[c], METRIC_KEYS), REF_KEY: self.refs[c]} for c in ids},
        }
        return _to_text(doc, 0) + "\n"

    @classmethod
    def loads(cls, text: str, layer: int) -> "_LayerFile":
        try:
            doc = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise _BadFile(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
            version = doc.get("schema_version") if isinstance(doc, dict) else None
            raise _BadFile(f"schema_version {version!r} is not {SCHEMA_VERSION}")
        table, cases = doc.get("provenance"), doc.get("cases")
        if not isinstance(table, dict) or not isinstance(cases, dict):
            raise _BadFile("'provenance' and 'cases' must both be objects")
        out = cls(provenance={ref: p for ref, p in table.items() if isinstance(p, dict)})
        for case_id, entry in cases.items():
            ref = entry.get(REF_KEY) if isinstance(entry, dict) else None
            if not isinstance(ref, str) or ref not in out.provenance:
                raise _BadFile(f"case {case_id!r} has no valid {REF_KEY!r} reference")
            if _file_layer(case_id) != layer:
                raise _BadFile(f"case {case_id!r} does not belong to layer {layer}")
            metrics = {k: v for k, v in entry.items() if k != REF_KEY}
            bad = [k for k, v in metrics.items() if v is not None and not _is_number(v)]
            if bad:
                raise _BadFile(f"case {case_id!r}: {bad[0]} is not a number")
            out.cases[case_id], out.refs[case_id] = metrics, ref
        return out


def _reject_constant(name: str):
    raise _BadFile(f"{name} is not valid JSON (non-finite numbers are written as null)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain_metrics(metrics: Mapping[str, Any]) -> dict:
    """Ints stay ints (n_tokens); everything else a float, non-finite as None."""
    out = {}
    for key, value in metrics.items():
        if key == REF_KEY or isinstance(value, (bool, str)):
            raise TypeError(f"baseline metric {key!r}={value!r} is not a number")
        out[str(key)] = int(value) if isinstance(value, numbers.Integral) else finite_or_none(value)
    return out


# ---------------------------------------------------------------- the store


@dataclass
class UpdateSummary:
    """What flush did; lists hold case ids in natural order."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)  # same metrics, new environment
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # existed; kept as is in new_only mode
    deleted: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)  # changed case -> "nmse 0.01 -> 0.02"
    files: list[Path] = field(default_factory=list)  # written (or removed when emptied)
    replaced: list[Path] = field(default_factory=list)  # unreadable files rewritten from scratch

    def lines(self, max_ids: int = 10) -> list[str]:
        """A short terminal report: counts, then up to max_ids ids per kind."""
        kinds = ("added", "changed", "refreshed", "unchanged", "skipped", "deleted")
        counts = ", ".join(f"{len(getattr(self, k))} {k}" for k in kinds)
        out = [f"baselines: {counts}; {len(self.files)} file(s) updated"]
        out += [f"  replaced unreadable {path}" for path in self.replaced]
        for kind in ("added", "changed", "refreshed", "deleted"):
            ids = getattr(self, kind)
            for case_id in ids[:max_ids]:
                detail = f" ({self.details[case_id]})" if case_id in self.details else ""
                out.append(f"  {kind}: {case_id}{detail}")
            if len(ids) > max_ids:
                out.append(f"  ... and {len(ids) - max_ids} more {kind}")
        return out


class BaselineStore:
    """Baselines of one model: `root/<model_id>/layer<N>.json`, loaded lazily per file.

    update=True is for --update-baselines runs: an unreadable file then counts as empty and
    is rewritten by flush (and reported), instead of stopping the session. `hint` is the
    command shown to users who need to create or re-record baselines.
    """

    def __init__(
        self,
        root: Path | str,
        model_id: str,
        *,
        update: bool = False,
        hint: str = DEFAULT_HINT,
    ):
        self.root = Path(root)
        self.model_id = check_name(model_id, "model id")
        self.dir = self.root / self.model_id
        self.update = update
        self.hint = hint
        self._files: dict[int, _LayerFile] = {}
        self._replaced: set[int] = set()
        self._pending: dict[str, dict] = {}
        self._deleted: set[str] = set()

    def path_for(self, case_id: str) -> Path:
        return self._path(_layer_of(case_id))

    def _path(self, layer: int) -> Path:
        return self.dir / f"layer{layer}.json"

    def _file(self, layer: int) -> _LayerFile:
        if layer not in self._files:
            self._files[layer] = self._read(layer)
        return self._files[layer]

    def _read(self, layer: int) -> _LayerFile:
        path = self._path(layer)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _LayerFile()
        except (OSError, UnicodeDecodeError) as exc:
            if self.update:
                self._replaced.add(layer)
                return _LayerFile()
            raise HarnessError(f"{display_path(path)}: cannot read baseline file ({exc})") from None
        try:
            return _LayerFile.loads(text, layer)
        except _BadFile as exc:
            if self.update:
                self._replaced.add(layer)
                return _LayerFile()
            raise HarnessError(
                f"{display_path(path)}: bad baseline file: {exc}; regenerate it with {self.hint}"
            ) from None

    # -- reading

    def get(self, case_id: str) -> dict | None:
        """The stored metrics of a case (a copy), or None when it has no baseline."""
        metrics = self._file(_layer_of(case_id)).cases.get(case_id)
        return None if metrics is None else dict(metrics)

    def provenance_of(self, case_id: str) -> dict | None:
        f = self._file(_layer_of(case_id))
        return dict(f.provenance[f.refs[case_id]]) if case_id in f.cases else None

    def case_ids(self) -> list[str]:
        """Every stored case id of this model, in natural order."""
        ids: list[str] = []
        if self.dir.is_dir():
            for path in self.dir.iterdir():
                m = _LAYER_FILE.match(path.name)
                if m:
                    ids += self._file(int(m[1])).cases
        return sorted(ids, key=natural_key)

    def compare(
        self,
        case: Case | str,
        metrics: Mapping[str, Any],
        thresholds: Thresholds,
        provenance: Mapping | None = None,
    ) -> list[str]:
        """Failure messages of a case against its baseline: missing, not comparable, or regressed.

        With `provenance` (this run's), a baseline recorded for another model or cache is not
        compared: the case fails saying why.
        """
        case_id = case.case_id if isinstance(case, Case) else case
        base = self.get(case_id)
        where = display_path(self.path_for(case_id))
        if base is None:
            return [f"{case_id}: no baseline in {where}; create it with {self.hint}"]
        if provenance is not None:
            mismatches = explain_provenance(self.provenance_of(case_id), provenance).mismatches
            if mismatches:
                why = "; ".join(mismatches)
                return [f"{case_id}: baseline in {where} is not comparable: {why}; re-record it with {self.hint}"]
        return compare_metrics(case_id, metrics, base, thresholds, self.hint)

    def provenance_warnings(self, case_ids: Iterable[str], current: Mapping) -> list[str]:
        """Benign provenance differences over some cases, each said once."""
        seen: dict[str, None] = {}
        for case_id in case_ids:
            stored = self.provenance_of(case_id)
            if stored is not None:
                seen.update(dict.fromkeys(explain_provenance(stored, current).warnings))
        return list(seen)

    def stale(self, ran: set[str], would_select: Callable[[str], bool] | None = None) -> list[str]:
        """Stored cases that no longer exist, judged only within the current selection.

        `ran`: the case ids of this run. `would_select(case_id)`: whether this run would have
        selected a case of that id had it existed (-k, -m, the grid, layer filters); None
        means every stored id was in scope. A stored id in scope that did not run is stale.
        """
        return [
            case_id
            for case_id in self.case_ids()
            if case_id not in ran and (would_select is None or would_select(case_id))
        ]

    # -- writing

    def record(self, case_id: str, metrics: Mapping[str, Any]) -> None:
        """Remember a case's metrics for the next flush (nothing is written yet)."""
        _layer_of(case_id)
        self._pending[case_id] = _plain_metrics(metrics)

    def delete(self, case_ids: Iterable[str]) -> None:
        """Drop these cases at the next flush (for stale cases, in update runs only)."""
        for case_id in case_ids:
            _layer_of(case_id)
            self._deleted.add(case_id)

    def flush(self, provenance: Mapping, new_only: bool = False) -> UpdateSummary:
        """Write the recorded and deleted cases, touching only the files they live in.

        new_only: create missing baselines, leave existing ones exactly as they are.
        Each file is rewritten atomically with its other cases kept; a file left with no
        case is removed.
        """
        provenance = _plain_provenance(provenance)
        summary = UpdateSummary()
        deleted, pending = _by_layer(self._deleted - set(self._pending)), _by_layer(self._pending)
        if deleted or pending:
            with self._locked():
                self._flush_locked(deleted, pending, provenance, new_only, summary)
        self._pending.clear()
        self._deleted.clear()
        return summary

    @contextlib.contextmanager
    def _locked(self):
        """Hold the store's lock (a real file lock: released by the OS if the holder dies).

        Another run updating the same store waits here; inside, the layer files are read
        afresh, so its updates are merged, never overwritten. Temp files of runs that died
        mid-write (SIGKILL) are removed; readers never look at them (only layer<N>.json).
        The lock file lives in the system temp dir, named by the store directory's
        (st_dev, st_ino): the same store reached by any path shares it, and the store (kept
        in git) gains no lock file.
        """
        import tempfile

        from filelock import FileLock, Timeout

        check_writable_dir(self.dir, "--baselines-dir", create=True)
        st = self.dir.stat()
        name = f"tokenwise-baselines-{st.st_dev:x}-{st.st_ino:x}.lock"
        lock = FileLock(os.path.join(tempfile.gettempdir(), name), timeout=LOCK_TIMEOUT_S, mode=0o666)
        try:
            lock.acquire()
        except Timeout:
            raise HarnessError(f"--baselines-dir: {display_path(self.dir)} stayed locked by another "
                               f"--update-baselines run for {LOCK_TIMEOUT_S} s; retry when it is done") from None
        except OSError as exc:  # e.g. another user's lock file in a sticky temp dir
            raise HarnessError(f"--baselines-dir: cannot take the lock {lock.lock_file} of {display_path(self.dir)} "
                               f"({exc.strerror}); remove it if no update is running") from None
        try:
            for tmp in self.dir.glob(f"{TMP_PREFIX}layer*.json.*"):
                m = re.match(rf"^{re.escape(TMP_PREFIX)}(layer\d+\.json)\.", tmp.name)
                if m:
                    clear_leftovers(self.dir / m[1])
            self._files.clear()  # re-read under the lock: another run may have written since
            self._replaced.clear()
            yield
        finally:
            lock.release()

    def _flush_locked(self, deleted, pending, provenance, new_only, summary) -> None:
        for layer in sorted(deleted.keys() | pending.keys()):
            f = self._file(layer)
            dirty = layer in self._replaced
            for case_id in deleted[layer]:
                if case_id in f.cases:
                    f.remove(case_id)
                    summary.deleted.append(case_id)
                    dirty = True
            for case_id in pending[layer]:
                kind = self._merge(f, case_id, self._pending[case_id], provenance, new_only, summary)
                getattr(summary, kind).append(case_id)
                dirty = dirty or kind in ("added", "changed", "refreshed")
            if dirty:
                self._write(layer, f, summary)

    def _merge(
        self, f: _LayerFile, case_id: str, metrics: dict, provenance: dict, new_only: bool, summary: UpdateSummary
    ) -> str:
        """Put one recorded case into its file; returns which UpdateSummary list it belongs to."""
        old = f.cases.get(case_id)
        if old is not None and new_only:
            return "skipped"
        if old is not None and _same_run(f.provenance[f.refs[case_id]], provenance) and old == metrics:
            return "unchanged"
        if old is None:
            kind = "added"
        elif old == metrics:
            kind = "refreshed"
        else:
            kind = "changed"
            summary.details[case_id] = _describe_change(old, metrics)
        f.put(case_id, metrics, provenance)
        return kind

    def _write(self, layer: int, f: _LayerFile, summary: UpdateSummary) -> None:
        path = self._path(layer)
        if f.cases:
            check_writable_dir(self.dir, "--baselines-dir", create=True)
            write_text_atomic(path, f.dumps(), "--baselines-dir")
        else:
            path.unlink(missing_ok=True)
        summary.files.append(path)
        if layer in self._replaced:
            summary.replaced.append(path)
            self._replaced.discard(layer)


def _by_layer(case_ids: Iterable[str]) -> defaultdict[int, list[str]]:
    groups: defaultdict[int, list[str]] = defaultdict(list)
    for case_id in sorted(case_ids, key=natural_key):
        groups[_layer_of(case_id)].append(case_id)
    return groups


def _describe_change(old: Mapping, new: Mapping) -> str:
    """'nmse 0.0123 -> 0.0131, sse 1.2 -> 1.3' over the metrics that differ, METRIC_KEYS first."""
    parts = []
    for key in _ordered({**old, **new}, METRIC_KEYS):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if _is_number(a) and _is_number(b):
            a, b = format_pair(a, b)
        parts.append(f"{key} {a} -> {b}")
    return ", ".join(parts)
