"""The report model: the seed's §2.5 JSON, built, written, read and validated.

Shape (extra fields allowed, none renamed):

    {"meta": {xy_path, xy_meta, grid_mode, ranks, qspecs, smooth, chunk_tokens, ...},
     "by_layer": {"<layer>": {"<block>": {"by_proj": {proj: {cfg_key: metrics}},
                                           "agg": {cfg_key: {nmse_mean_over_proj,
                                                             nmse_max_over_proj, n_proj}}}}}}

Decisions:
- Non-finite numbers. JSON has no NaN/Infinity, so every non-finite float is written as
  null (and `load_report` rejects NaN/Infinity literals). `sqnr_db = -10*log10(nmse)` is
  always derived from nmse here (a given value is replaced); it is null when nmse is 0
  (exact: +inf dB) or when nmse itself is null -- nmse tells the two apart.
- Aggregates. Per (layer, block, cfg), over the projections that carry that cfg:
  n_proj = their count; nmse mean (math.fsum / n) and max. If any of those nmse is null,
  mean and max are null too: a broken projection is never averaged away.
- Order. The output is canonical, so identical content gives identical bytes whatever the
  input dict order: meta's seed keys first (in §2.5 order), then other keys by name, nested
  dicts by name; layers numerically ("2" before "10"); blocks self_attn, mlp; projections in
  allowlist.PROJ_ORDER; config keys in the order of meta["configs"] (the grid's order) and
  any others after them by SvdqConfig.sort_key; metric and agg keys in their listed order,
  extras by name. Floats use Python's shortest round-trip repr.
- Run-specific data (timestamps, host, durations) belongs under meta["run"]; compare tools
  ignore it (see `comparable`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tokenwise_harness.allowlist import ALLOWED, PROJ_ORDER
from tokenwise_harness.atomic import check_writable_dir, write_text_atomic
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import parse_key
from tokenwise_harness.numerics import metrics as metric_math
from tokenwise_harness.numerics.metrics import METRIC_KEYS

META_KEYS = ("xy_path", "xy_meta", "grid_mode", "ranks", "qspecs", "smooth", "chunk_tokens")
AGG_KEYS = ("nmse_mean_over_proj", "nmse_max_over_proj", "n_proj")
BLOCK_ORDER = ("self_attn", "mlp")
RUN_KEY = "run"  # meta[RUN_KEY]: run-specific info, ignored when comparing reports

_SCHEMA_FILE = "report/schema/report.schema.json"


# ---------------------------------------------------------------- numbers

def finite_or_none(value: Any) -> float | None:
    """float(value), or None when it is None, NaN or +-inf."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def sqnr_db(nmse: float | None) -> float | None:
    """metrics.sqnr_db as JSON holds it: None for nmse 0 (+inf dB), None or non-finite."""
    nmse = finite_or_none(nmse)
    return None if nmse is None else finite_or_none(metric_math.sqnr_db(nmse))


def normalize_metrics(metrics: Mapping[str, Any], where: str = "metrics") -> dict:
    """The metric keys in canonical order as plain float/int/None; sqnr_db derived from nmse."""
    missing = [k for k in METRIC_KEYS if k != "sqnr_db" and k not in metrics]
    if missing:
        raise ValueError(f"{where}: missing metric key(s) {', '.join(missing)}")
    out = {k: finite_or_none(metrics[k]) for k in METRIC_KEYS if k not in ("sqnr_db", "n_tokens")}
    out["sqnr_db"] = sqnr_db(out["nmse"])
    out["n_tokens"] = int(metrics["n_tokens"])
    for key in sorted(set(metrics) - set(METRIC_KEYS)):
        out[key] = _plain(metrics[key])
    return _ordered(out, METRIC_KEYS)


def aggregate(nmses: list[float | None]) -> dict:
    """agg entry over one block's projections for one config."""
    n = len(nmses)
    if any(v is None for v in nmses):
        return {"nmse_mean_over_proj": None, "nmse_max_over_proj": None, "n_proj": n}
    return {"nmse_mean_over_proj": math.fsum(nmses) / n, "nmse_max_over_proj": max(nmses), "n_proj": n}


def _plain(value: Any) -> Any:
    """JSON-ready copy: tuples to lists, numpy/torch scalars to Python, non-finite to None."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):  # numpy / torch scalar
        return _plain(value.item())
    return value


# ---------------------------------------------------------------- ordering

def _ordered(d: Mapping, first: Iterable[str], rest_key: Callable[[str], Any] | None = None) -> dict:
    """d with the keys of `first` (those present) first, the rest sorted by rest_key."""
    first = [k for k in first if k in d]
    rest = sorted((k for k in d if k not in first), key=rest_key)
    return {k: d[k] for k in first + rest}


def _sorted_deep(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _sorted_deep(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_deep(v) for v in value]
    return value


def _layer_key(key: str) -> tuple:
    return (0, int(key), "") if str(key).isdigit() else (1, 0, str(key))


def _cfg_sort_key(key: str) -> tuple:
    try:
        return (0, parse_key(key).sort_key(), key)
    except HarnessError:
        return (1, (), key)


def config_order(report_or_meta: Mapping, keys: Iterable[str]) -> list[str]:
    """keys ordered as in meta["configs"] (the grid order), unknown ones after by sort_key."""
    meta = report_or_meta.get("meta", report_or_meta)
    grid = [k for k in (meta.get("configs") or []) if isinstance(k, str)]
    keys = set(keys)
    known = [k for k in dict.fromkeys(grid) if k in keys]
    return known + sorted(keys - set(known), key=_cfg_sort_key)


def canonicalize(report: Mapping) -> dict:
    """A copy of report with every dict in the canonical order (see module docstring)."""
    meta = report.get("meta", {})
    out = {}
    if "meta" in report:
        meta_out = {k: (v if k in META_KEYS and k != "xy_meta" else _sorted_deep(v)) for k, v in meta.items()}
        out["meta"] = _ordered(meta_out, META_KEYS)
    if "by_layer" in report:
        out["by_layer"] = _canonical_by_layer(report["by_layer"], meta)
    for key in sorted(set(report) - {"meta", "by_layer"}):
        out[key] = _sorted_deep(report[key])
    return _ordered(out, ("meta", "by_layer"))


def _canonical_by_layer(by_layer: Mapping, meta: Mapping) -> dict:
    out = {}
    for lkey in sorted(by_layer, key=_layer_key):
        layer = by_layer[lkey]
        out[lkey] = {b: _canonical_block(layer[b], meta) for b in _ordered(layer, BLOCK_ORDER)}
    return out


def _canonical_block(block: Mapping, meta: Mapping) -> dict:
    out = {}
    for key in _ordered(block, ("by_proj", "agg")):
        if key == "by_proj":
            by_proj = block[key]
            out[key] = {p: _cfg_map(by_proj[p], meta, METRIC_KEYS) for p in _ordered(by_proj, PROJ_ORDER)}
        elif key == "agg":
            out[key] = _cfg_map(block[key], meta, AGG_KEYS)
        else:
            out[key] = _sorted_deep(block[key])
    return out


def _cfg_map(cfgs: Mapping, meta: Mapping, first: tuple) -> dict:
    return {c: _ordered(_sorted_deep(cfgs[c]), first) for c in config_order(meta, cfgs)}


# ---------------------------------------------------------------- building

def _split_case(case: Any) -> tuple[int, str, str]:
    """(layer, block, proj) from a tuple or an allowlist.Target."""
    if hasattr(case, "layer"):
        layer, block, proj = case.layer, case.block, case.proj
    else:
        layer, block, proj = case
    if (block, proj) not in ALLOWED:
        raise ValueError(f"{block}.{proj} is not an allowlisted projection")
    return int(layer), str(block), str(proj)


def _qspec_pair(spec: Any) -> list[str]:
    fmt, blk = (spec.fmt, spec.blk) if hasattr(spec, "fmt") else spec
    return [str(fmt), str(blk)]


def normalize_meta(meta: Mapping) -> dict:
    """meta as JSON-ready values: qspecs as [fmt, blk-string] pairs, configs as key strings."""
    out = {str(k): _plain(v) for k, v in meta.items() if k not in ("qspecs", "configs")}
    if "qspecs" in meta:
        out["qspecs"] = [_qspec_pair(s) for s in meta["qspecs"]]
    if "configs" in meta:
        out["configs"] = [getattr(c, "key", c) for c in meta["configs"]]
    if "ranks" in out:
        out["ranks"] = [int(r) for r in out["ranks"]]
    return out


def build_report(meta: Mapping, results: Mapping) -> dict:
    """The §2.5 report from meta and {(layer, block, proj): {cfg_key: metrics}}.

    `results` keys may also be allowlist.Target objects. See the module docstring for the
    number encoding, aggregation and ordering rules.
    """
    meta = normalize_meta(meta)
    by_layer: dict = {}
    for case, per_cfg in results.items():
        layer, block, proj = _split_case(case)
        where = f"layer {layer} {block}.{proj}"
        cfgs = {str(c): normalize_metrics(m, f"{where} {c}") for c, m in per_cfg.items()}
        by_layer.setdefault(str(layer), {}).setdefault(block, {"by_proj": {}})["by_proj"][proj] = cfgs
    for layer in by_layer.values():
        for block in layer.values():
            block["agg"] = _block_agg(block["by_proj"])
    return canonicalize({"meta": meta, "by_layer": by_layer})


def _block_agg(by_proj: Mapping) -> dict:
    cfgs: dict[str, list] = {}
    for proj in _ordered(by_proj, PROJ_ORDER):
        for cfg, metrics in by_proj[proj].items():
            cfgs.setdefault(cfg, []).append(metrics["nmse"])
    return {cfg: aggregate(nmses) for cfg, nmses in cfgs.items()}


# ---------------------------------------------------------------- JSON text

def dumps_report(report: Mapping) -> str:
    """Canonical JSON text; identical content -> identical bytes.

    Nested objects are indented by 2 spaces; a leaf (a list, or an object holding no object,
    such as one config's metrics or agg) sits on one line, so a diff shows one line per case.
    """
    return _to_text(_plain(canonicalize(report)), 0) + "\n"


def _to_text(value: Any, depth: int) -> str:
    if not isinstance(value, dict) or not value or not any(isinstance(v, dict) for v in value.values()):
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))
    pad = "  " * (depth + 1)
    items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {_to_text(v, depth + 1)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + "  " * depth + "}"


def comparable(report: Mapping) -> dict:
    """report without meta["run"]: the part two runs are compared on."""
    meta = {k: v for k, v in report.get("meta", {}).items() if k != RUN_KEY}
    return {**report, "meta": meta}


def write_report(report: Mapping, path: str | Path, flag: str = "--out_json") -> Path:
    """Validate, then write the canonical JSON atomically (creating the parent directory).

    The report written is the builder's own: its structure is checked here (structural_problem,
    no jsonschema import on the scoring path: ~0.25 s of a process); a report read back
    (load_report) gets the full schema check."""
    path = Path(path)
    problem = structural_problem(report)
    if problem:
        raise HarnessError(f"{flag} {path} does not match the report schema: {problem}")
    text = dumps_report(report)
    check_writable_dir(path.parent, flag, create=True)
    write_text_atomic(path, text, flag)
    return path


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (write null for non-finite numbers)")


def load_report(path: str | Path, flag: str = "--report") -> dict:
    """Read and validate a report; any problem is a one-line HarnessError naming flag and file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HarnessError(f"{flag}: {path} does not exist; give a report written by eval_fake/eval_smooth") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{flag}: cannot read {path}: {_one_line(exc)}") from None
    try:
        report = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise HarnessError(f"{flag}: {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:
        raise HarnessError(f"{flag}: {path}: {_one_line(exc)}") from None
    validate_report(report, f"{flag} {path}")
    return report


# ---------------------------------------------------------------- validation

def load_schema() -> dict:
    from importlib.resources import files

    return json.loads(files("tokenwise_harness").joinpath(_SCHEMA_FILE).read_text(encoding="utf-8"))


def validate_report(report: Any, name: str = "report") -> None:
    """Check report against schema/report.schema.json; HarnessError (one line) if it does not match.

    Uses jsonschema when installed, else a minimal structural check of the required keys.
    """
    try:
        import jsonschema
    except ImportError:
        problem = structural_problem(report)
    else:
        problem = _jsonschema_problem(jsonschema, report)
    if problem:
        raise HarnessError(f"{name} does not match the report schema: {problem}")


def _jsonschema_problem(jsonschema, report: Any) -> str | None:
    validator = jsonschema.Draft202012Validator(load_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(report))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"at {where}: {_one_line(error.message)}"


def _one_line(message: Any, limit: int = 200) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def structural_problem(report: Any) -> str | None:
    """Fallback check without jsonschema: the §2.5 required keys; a message or None."""
    if not isinstance(report, Mapping):
        return "at (top level): not an object"
    for key in ("meta", "by_layer"):
        if not isinstance(report.get(key), Mapping):
            return f"at (top level): '{key}' is a required object"
    missing = [k for k in META_KEYS if k not in report["meta"]]
    if missing:
        return f"at meta: '{missing[0]}' is a required property"
    for lkey, layer in report["by_layer"].items():
        problem = _layer_problem(str(lkey), layer)
        if problem:
            return problem
    return None


def _layer_problem(lkey: str, layer: Any) -> str | None:
    if not lkey.isdigit() or not isinstance(layer, Mapping):
        return f"at by_layer/{lkey}: not a layer index with an object"
    for bname, block in layer.items():
        where = f"by_layer/{lkey}/{bname}"
        if bname not in BLOCK_ORDER or not isinstance(block, Mapping):
            return f"at {where}: unknown block"
        for key in ("by_proj", "agg"):
            if not isinstance(block.get(key), Mapping):
                return f"at {where}: '{key}' is a required object"
        problem = _entries_problem(where, block)
        if problem:
            return problem
    return None


def _entries_problem(where: str, block: Mapping) -> str | None:
    for proj, cfgs in block["by_proj"].items():
        for cfg, metrics in cfgs.items():
            missing = [k for k in METRIC_KEYS if k not in metrics]
            if missing:
                return f"at {where}/by_proj/{proj}/{cfg}: '{missing[0]}' is a required property"
    for cfg, agg in block["agg"].items():
        missing = [k for k in AGG_KEYS if k not in agg]
        if missing:
            return f"at {where}/agg/{cfg}: '{missing[0]}' is a required property"
    return None


# ---------------------------------------------------------------- reading helpers

def iter_metrics(report: Mapping) -> Iterator[tuple[int, str, str, str, dict]]:
    """Yield (layer:int, block, proj, cfg_key, metrics) in canonical order."""
    report = canonicalize(report)
    for lkey, layer in report["by_layer"].items():
        for block, body in layer.items():
            for proj, cfgs in body["by_proj"].items():
                for cfg, metrics in cfgs.items():
                    yield int(lkey), block, proj, cfg, metrics


def iter_agg(report: Mapping) -> Iterator[tuple[int, str, str, dict]]:
    """Yield (layer:int, block, cfg_key, agg) in canonical order."""
    report = canonicalize(report)
    for lkey, layer in report["by_layer"].items():
        for block, body in layer.items():
            for cfg, agg in body["agg"].items():
                yield int(lkey), block, cfg, agg


def report_configs(report: Mapping) -> list[str]:
    """Every config key that appears in the report, in grid order."""
    keys = {cfg for *_, cfg, _ in iter_metrics(report)}
    return config_order(report, keys)
