"""thresholds.yaml: per-case metric limits, baseline tolerances, and an optional default grid.

The commented `thresholds.yaml` at the repo root is the user-facing description of the
format; this module is its parser and the one place its semantics live:

- version: 1 (optional; any other value is an error, so a future format fails loudly).
- grid: ranks / qspecs / grid_mode / act_qspecs / iters, used for whatever --ranks,
  --qspecs, ... leave unset. Parsed here, so a bad qspec names this file, not a flag.
- capture: cn / eu / length / seed of the cache pytest captures, for whatever --xy-cn,
  --xy-eu, --xy-length, --xy-seed leave unset.
- select: {layer, block, proj} in the rules' match syntax: only those projections get cases
  (a layer subset a CI budget affords); other projections are not generated at all.
- defaults: {metric: limit}. rules: [{match: {...}, limits: {...}}], tried in order; for
  each metric the first matching rule that mentions it sets its limit (null = no limit),
  a metric no matching rule mentions falls back to defaults.
- Every metric is an upper bound except sqnr_db, a lower bound (higher is better); sqnr_db
  is derived from nmse (-10*log10) so a rule can gate in dB whatever the engine reports.
- baseline: {default: {rtol, atol}, metrics: {metric: {rtol, atol} | null}}: a case
  regresses when value > base + |base|*rtol + atol (for sqnr_db: value < base - ...);
  for the non-negative error metrics that is the familiar base*(1+rtol)+atol. null: the
  metric is not compared; sqnr_db is compared only when listed (nmse covers it otherwise).

Every problem is a one-line HarnessError naming the file and the key at fault.
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokenwise_harness.allowlist import PROJ_ORDER
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import GRID_MODES, parse_qspecs, parse_ranks
from tokenwise_harness.numerics.metrics import METRIC_KEYS, NONFINITE_WHY, nonfinite_metrics, sqnr_db
from tokenwise_harness.verdict.cases import Case

VERSION = 1
# metric -> "max" (upper bound: fail above) or "min" (lower bound: fail below).
# Every metric but the bookkeeping ones (denom, n_tokens); only sqnr_db is better when higher.
METRICS: dict[str, str] = {m: "min" if m == "sqnr_db" else "max" for m in METRIC_KEYS if m not in ("denom", "n_tokens")}
DERIVED = ("sqnr_db",)  # computed from nmse, never taken from the run (see gated_values)
TOP_KEYS = ("version", "grid", "capture", "select", "defaults", "rules", "baseline")
GRID_KEYS = ("ranks", "qspecs", "grid_mode", "act_qspecs", "iters")
CAPTURE_KEYS = ("cn", "eu", "length", "seed")  # save_xy's sampling: --xy-cn, --xy-eu, --xy-length, --xy-seed
SELECT_FIELDS = ("layer", "block", "proj")
MATCH_FIELDS = ("layer", "block", "proj", "rank", "fmt", "blk", "afmt", "ablk", "iters", "smooth")
# Used for every metric that thresholds.yaml gives no tolerance: 5% relative, plus an atol
# that only matters for metrics that are exactly 0 in the baseline.
BUILTIN_TOLERANCE = (0.05, 1e-9)
BUILTIN_SOURCE = "built-in defaults"


@dataclass(frozen=True)
class Limit:
    metric: str
    value: float
    kind: str  # "max" or "min"
    rule: str  # "defaults" or "rules[0]: layer 0-3, proj q_proj|k_proj"

    def violated_by(self, value: float) -> bool:
        return value > self.value if self.kind == "max" else value < self.value


@dataclass(frozen=True)
class _Condition:
    """One match field of a rule: its text as shown in messages and its test."""

    field: str
    text: str
    test: Callable[[Any], bool]


@dataclass(frozen=True)
class Rule:
    index: int
    conditions: tuple[_Condition, ...]
    limits: dict[str, float | None]  # None: "no limit" (overrides defaults and later rules)

    @property
    def description(self) -> str:
        what = ", ".join(f"{c.field} {c.text}" for c in self.conditions) or "every case"
        return f"rules[{self.index}]: {what}"

    def matches(self, case: Case) -> bool:
        return all(c.test(_case_field(case, c.field)) for c in self.conditions)


@dataclass
class Thresholds:
    source: str = BUILTIN_SOURCE  # the file as shown in messages
    defaults: dict[str, float] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    default_tolerance: tuple[float, float] = BUILTIN_TOLERANCE
    tolerances: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    tolerance_default_source: str = BUILTIN_SOURCE
    # Only the keys the file sets: ranks (list[int]), qspecs / act_qspecs (list[QSpec]),
    # grid_mode (str), iters (int). None when the file has no grid section.
    grid: dict | None = None
    capture: dict = field(default_factory=dict)  # only the keys the file sets: cn, eu, length, seed (ints)
    select: tuple = ()  # conditions on layer / block / proj; () = every projection

    def selects(self, layer: int, block: str, proj: str) -> bool:
        """Whether the select section keeps this projection (always, without one)."""
        values = {"layer": layer, "block": block, "proj": proj}
        return all(c.test(values[c.field]) for c in self.select)

    @property
    def select_text(self) -> str:
        return ", ".join(f"{c.field} {c.text}" for c in self.select) or "every projection"
    source_path: Path | None = None  # the file read (None: built-in defaults, or a parsed doc)

    def limits_for(self, case: Case) -> dict[str, Limit]:
        """metric -> Limit for this case, in METRICS order; metrics without a limit are absent."""
        chosen: dict[str, tuple[float | None, str]] = {}
        for rule in self.rules:
            if rule.matches(case):
                for metric, value in rule.limits.items():
                    chosen.setdefault(metric, (value, rule.description))
        for metric, value in self.defaults.items():
            chosen.setdefault(metric, (value, "defaults"))
        return {
            m: Limit(m, chosen[m][0], METRICS[m], chosen[m][1])
            for m in METRICS
            if m in chosen and chosen[m][0] is not None
        }

    def tolerance(self, metric: str) -> tuple[float, float] | None:
        """(rtol, atol) for comparing `metric` with its baseline; None: not compared.

        sqnr_db is compared only when baseline.metrics names it: it is a function of nmse,
        so by default the nmse comparison covers it and a regression is reported once.
        """
        if metric in DERIVED and metric not in self.tolerances:
            return None
        return self.tolerances.get(metric, self.default_tolerance)

    def tolerance_rule(self, metric: str) -> str:
        """Where tolerance(metric) comes from, for messages."""
        if metric in self.tolerances:
            return f"{self.source} baseline.metrics.{metric}"
        return self.tolerance_default_source

    def check(self, case: Case, metrics: Mapping[str, Any]) -> list[str]:
        """Failure messages of one case against its limits; [] when it passes.

        A non-finite gated metric (NaN, or None as report.normalize_metrics writes it)
        always fails; so does a limited metric the run did not report.
        """
        cid = case.case_id
        values, derived = gated_values(metrics)
        limits = self.limits_for(case)
        bad = nonfinite_metrics(metrics)
        failures = [f"{cid}: {metric} = {shown} is not a finite number (always fails: {NONFINITE_WHY})" for metric, shown in bad.items()]
        for metric in METRICS:
            value = values.get(metric)
            limit = limits.get(metric)
            if metric in bad or (metric in derived and "nmse" in bad):
                continue  # said once above (a derived sqnr_db follows from nmse)
            elif limit is None:
                continue
            elif value is None:
                failures.append(
                    f"{cid}: {metric} has a limit ({self.source} {limit.rule}) but the run reported no {metric}"
                )
            elif limit.violated_by(value):
                sign = ">" if limit.kind == "max" else "<"
                shown, bound = format_pair(value, limit.value)
                failures.append(f"{cid}: {metric} = {shown} {sign} limit {bound} ({self.source} {limit.rule})")
        return failures




def gated_values(metrics: Mapping[str, Any]) -> tuple[dict[str, float], set[str]]:
    """The METRICS values of a metrics dict as floats (None -> NaN), sqnr_db derived from nmse.

    Returns (values, names of derived metrics). sqnr_db is always recomputed from nmse when
    nmse is there, as report.py does: nmse 0 gives +inf dB, a non-finite nmse gives NaN.
    """
    values = {m: _as_float(metrics[m]) for m in METRICS if m in metrics}
    derived = set()
    if "nmse" in values:
        values["sqnr_db"] = sqnr_db(values["nmse"])
        derived.add("sqnr_db")
    return values, derived


def regression_bound(base: float, rtol: float, atol: float, kind: str = "max") -> float:
    """The worst value that still passes against `base`: base + |base|*rtol + atol (max metrics)."""
    slack = abs(base) * rtol + atol
    return base + slack if kind == "max" else base - slack


def format_pair(a: float, b: float) -> tuple[str, str]:
    """Two numbers with just enough significant digits to tell them apart (4 at least)."""
    for digits in range(4, 16):
        sa, sb = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if sa != sb:
            return sa, sb
    return repr(a), repr(b)  # shortest round-trip text: distinct floats always differ


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _case_field(case: Case, name: str) -> Any:
    """A case's value of a match field; blocks and formats as words ('128', 'in', 'none')."""
    cfg = case.cfg
    return {
        "layer": case.layer,
        "block": case.block,
        "proj": case.proj,
        "rank": cfg.rank,
        "fmt": cfg.fmt,
        "blk": _word(cfg.blk),
        "afmt": _word(cfg.afmt),
        "ablk": _word(cfg.ablk),
        "iters": cfg.iters,
        "smooth": case.smooth,
    }[name]


def _word(value: Any) -> str:
    return "none" if value is None else str(value)


# ---------------------------------------------------------------- loading


# Bounds on a thresholds file: a real one is a few KiB, a few levels deep, with a handful of
# aliases. A YAML alias bomb (billion laughs) stays small as a document but expands
# exponentially when printed or walked; deep nesting overflows the recursive composer.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000  # nodes of the document with every alias expanded


def load_thresholds(path: Path | str | None, *, explicit: bool = True, default: Path | str | None = None
                    ) -> Thresholds:
    """Parse a thresholds file; built-in defaults (no limits) when there is none.

    path None -> `default` (the default location, thresholds.yaml at the rootdir), or built-in
    defaults when there is no default either. A named file (explicit=True, i.e. --thresholds)
    must be a readable YAML file; an empty name (`--thresholds=`) is an error. The default
    location may be absent (built-in defaults), but anything there that is not a readable
    file -- a directory, a dangling symlink -- is an error: it never turns the gate off.
    """
    if path is None and default is not None:
        path, explicit = default, False
    if path is None:
        return Thresholds()
    if not str(path).strip():
        raise HarnessError("--thresholds= is empty; give a YAML file as --thresholds=PATH, or leave the option out")
    path = Path(path)
    what = "--thresholds:" if explicit else "thresholds.yaml at the rootdir:"
    if not explicit and not path.exists() and not path.is_symlink():
        return Thresholds()
    if path.is_symlink() and not path.exists():
        raise HarnessError(f"{what} {path} is a dangling symlink (to {os.readlink(path)}); "
                           "fix the link or remove it")
    if path.is_dir():
        raise HarnessError(f"{what} {path} is a directory; give a YAML file")
    if not path.is_file():
        raise HarnessError(f"{what} {path} does not exist or is not a file; give an existing YAML file")
    src = display_path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise HarnessError(f"{src}: {size} bytes is too large for a thresholds file "
                               f"(at most {MAX_FILE_BYTES >> 20} MiB); is it the right file?")
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise HarnessError(f"{src}: not valid YAML: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{what} cannot read {path}: {_one_line(exc)}") from None
    except (RecursionError, MemoryError):  # a backstop: the loader's bounds should come first
        raise HarnessError(f"{src}: too deeply nested or too large to load; simplify the file") from None
    th = parse_thresholds(doc, src)
    th.source_path = path
    return th


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def parse_thresholds(doc: Any, src: str) -> Thresholds:
    """Thresholds from an already-loaded YAML document; `src` names it in messages."""
    if doc is None:  # an empty (or all-comment) file
        doc = {}
    if not isinstance(doc, dict):
        raise HarnessError(f"{src}: the top level must be a mapping with keys {', '.join(TOP_KEYS)}")
    _check_keys(doc, TOP_KEYS, src, "top level")
    version = doc.get("version", VERSION)
    if version != VERSION or isinstance(version, bool):
        raise HarnessError(f"{src}: version {version!r} is not supported; this harness reads version {VERSION}")
    th = Thresholds(source=src)
    th.defaults = _parse_limits(doc.get("defaults"), src, "defaults")
    th.rules = _parse_rules(doc.get("rules"), src)
    _parse_baseline(doc.get("baseline"), src, th)
    if doc.get("grid") is not None:
        th.grid = _parse_grid(doc["grid"], src)
    th.capture = _parse_capture(doc.get("capture"), src)
    select = _mapping(doc.get("select"), src, "select")
    for name in select:
        if name not in SELECT_FIELDS:
            raise HarnessError(f"{src}: select: unknown field {name!r}; known: {', '.join(SELECT_FIELDS)}")
    th.select = tuple(_condition(name, spec, src, "select") for name, spec in select.items())
    return th


def _parse_capture(value: Any, src: str) -> dict:
    section = _mapping(value, src, "capture")
    _check_keys(section, CAPTURE_KEYS, src, "capture")
    out = {}
    for key, v in section.items():
        least = 0 if key == "seed" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise HarnessError(f"{src}: capture.{key} {v!r} must be an integer >= {least}")
        out[key] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML would silently keep the last one),
    unhashable keys, nesting deeper than MAX_DEPTH and documents that expand (aliases
    followed) to more than MAX_NODES nodes."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _expanded_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not a {type(key).__name__}", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(root) -> None:
    """YAMLError unless the node graph, every alias expanded, is acyclic, at most MAX_DEPTH deep
    and at most MAX_NODES nodes (memoized: linear in the document, whatever the aliases)."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded depth)
    stack = [(root, False)]
    active: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if not done:
            if key in active:
                raise yaml.composer.ComposerError(None, None, "an alias refers to the node that contains it",
                                                  node.start_mark)
            active.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        active.discard(key)
        count = 1 + sum(sizes[id(c)][0] for c in children)
        depth = 1 + max((sizes[id(c)][1] for c in children), default=0)
        if count > MAX_NODES or depth > MAX_DEPTH:
            what = f"more than {MAX_NODES} nodes" if count > MAX_NODES else f"deeper than {MAX_DEPTH} levels"
            raise yaml.composer.ComposerError(None, None, f"aliases expand the document to {what}",
                                              node.start_mark)
        sizes[key] = (count, depth)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def display_path(path: Path) -> str:
    """The path relative to the cwd when it lies below it (short messages), else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _check_keys(mapping: dict, allowed: tuple[str, ...], src: str, where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise HarnessError(f"{src}: {where}: unknown key {key!r}; allowed: {', '.join(allowed)}")


def _mapping(value: Any, src: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HarnessError(f"{src}: {where} must be a mapping, not {type(value).__name__}")
    return value


def _number(value: Any, src: str, where: str, minimum: float | None = 0.0, hint: str = "") -> float:
    # PyYAML reads `1e-9` (no dot) as a string: accept numeric strings rather than trip users.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HarnessError(f"{src}: {where}: {value!r} is not a finite number{hint}")
    if minimum is not None and value < minimum:
        raise HarnessError(f"{src}: {where}: {value!r} is negative; it must be >= {minimum:g}")
    return float(value)


def _parse_limits(value: Any, src: str, where: str) -> dict[str, float | None]:
    limits = {}
    for metric, limit in _mapping(value, src, where).items():
        if metric not in METRICS:
            raise HarnessError(f"{src}: {where}: unknown metric {metric!r}; known: {', '.join(METRICS)}")
        # sqnr_db is a lower bound in dB and may be negative; the others are norms.
        minimum = None if METRICS[metric] == "min" else 0.0
        limits[metric] = (
            None if limit is None else _number(limit, src, f"{where}.{metric}", minimum, " (use null for no limit)")
        )
    return limits


def _parse_rules(value: Any, src: str) -> list[Rule]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise HarnessError(f"{src}: rules must be a list of {{match: ..., limits: ...}} entries")
    rules = []
    for i, entry in enumerate(value):
        where = f"rules[{i}]"
        if not isinstance(entry, dict):
            raise HarnessError(f"{src}: {where} must be a mapping with keys match, limits")
        _check_keys(entry, ("match", "limits"), src, where)
        if "limits" not in entry:
            raise HarnessError(f"{src}: {where} has no limits; give e.g. limits: {{nmse: 0.01}}")
        match = _mapping(entry.get("match"), src, f"{where}.match")
        conditions = tuple(_condition(name, spec, src, f"{where}.match") for name, spec in match.items())
        rules.append(Rule(i, conditions, _parse_limits(entry["limits"], src, f"{where}.limits")))
    return rules


def _parse_baseline(value: Any, src: str, th: Thresholds) -> None:
    section = _mapping(value, src, "baseline")
    _check_keys(section, ("default", "metrics"), src, "baseline")
    if section.get("default") is not None:
        th.default_tolerance = _tolerance(section["default"], BUILTIN_TOLERANCE, src, "baseline.default")
        th.tolerance_default_source = f"{src} baseline.default"
    for metric, tol in _mapping(section.get("metrics"), src, "baseline.metrics").items():
        where = f"baseline.metrics.{metric}"
        if metric not in METRICS:
            raise HarnessError(f"{src}: {where}: unknown metric {metric!r}; known: {', '.join(METRICS)}")
        th.tolerances[metric] = None if tol is None else _tolerance(tol, th.default_tolerance, src, where)


def _tolerance(value: Any, fallback: tuple[float, float], src: str, where: str) -> tuple[float, float]:
    tol = _mapping(value, src, where)
    _check_keys(tol, ("rtol", "atol"), src, where)
    rtol = _number(tol["rtol"], src, f"{where}.rtol") if "rtol" in tol else fallback[0]
    atol = _number(tol["atol"], src, f"{where}.atol") if "atol" in tol else fallback[1]
    return rtol, atol


def _parse_grid(value: Any, src: str) -> dict:
    section = _mapping(value, src, "grid")
    _check_keys(section, GRID_KEYS, src, "grid")
    grid: dict[str, Any] = {}
    if "ranks" in section:
        grid["ranks"] = parse_ranks(_comma_text(section["ranks"]), flag=f"{src}: grid.ranks")
    for key in ("qspecs", "act_qspecs"):
        if key in section:
            text = _comma_text(section[key])
            # An empty act_qspecs list is the documented way of saying "weights only".
            grid[key] = parse_qspecs(text, flag=f"{src}: grid.{key}") if text or key == "qspecs" else []
    if "grid_mode" in section:
        if section["grid_mode"] not in GRID_MODES:
            raise HarnessError(
                f"{src}: grid.grid_mode {section['grid_mode']!r} is unknown; use one of: {', '.join(GRID_MODES)}"
            )
        grid["grid_mode"] = section["grid_mode"]
    if "iters" in section:
        iters = section["iters"]
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise HarnessError(f"{src}: grid.iters {iters!r} must be an integer >= 1")
        grid["iters"] = iters
    return grid


def _comma_text(value: Any) -> str:
    """A YAML list ([8, 16]) or a flag-style string ("8,16") as the flag text parse_* read."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


# ---------------------------------------------------------------- match fields

_CMP_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
_CMP_RE = re.compile(r"^(>=|<=|>|<|==)\s*(\d+)$")
_RANGE_RE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_NUMERIC_HELP = "use N, 'A-B' (inclusive), '>=N', '>N', '<=N', '<N', or a list of those"


def _condition(name: Any, spec: Any, src: str, where: str) -> _Condition:
    if name not in _FIELD_PARSERS:
        raise HarnessError(f"{src}: {where}: unknown field {name!r}; known: {', '.join(MATCH_FIELDS)}")
    where = f"{where}.{name}"
    if name == "smooth":
        if not isinstance(spec, bool):
            raise HarnessError(f"{src}: {where}: {spec!r} must be true or false")
        return _Condition(name, str(spec).lower(), lambda v, want=spec: v == want)
    items = spec if isinstance(spec, list) else [spec]
    if not items:
        raise HarnessError(f"{src}: {where}: empty list matches nothing; remove the field or list values")
    terms = [_FIELD_PARSERS[name](item, src, where) for item in items]
    texts = [text for text, _ in terms]
    tests = [test for _, test in terms]
    return _Condition(name, "|".join(texts), lambda v: any(t(v) for t in tests))


def _numeric_term(item: Any, src: str, where: str) -> tuple[str, Callable[[int], bool]]:
    """3, "3", "0-3", ">=16" -> (text, test)."""
    if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
        return str(item), lambda v: v == item
    text = item.strip() if isinstance(item, str) else None
    if text and text.isdigit():
        n = int(text)
        return str(n), lambda v: v == n
    m = _RANGE_RE.match(text or "")
    if m:
        lo, hi = int(m[1]), int(m[2])
        if lo > hi:
            raise HarnessError(f"{src}: {where}: range {item!r} is empty (start > end); write it as '{hi}-{lo}'")
        return f"{lo}-{hi}", lambda v: lo <= v <= hi
    m = _CMP_RE.match(text or "")
    if m:
        op, n = _CMP_OPS[m[1]], int(m[2])
        return f"{m[1]}{n}", lambda v: op(v, n)
    raise HarnessError(f"{src}: {where}: bad value {item!r}; {_NUMERIC_HELP}")


def _word_term(known: Callable[[], set[str]], what: str):
    """Parser of a name field (block, proj, fmt, afmt): the value must be a known name."""

    def parse(item: Any, src: str, where: str) -> tuple[str, Callable[[str], bool]]:
        names = known()
        word = "none" if item is None else item
        if not isinstance(word, str) or word not in names:
            raise HarnessError(f"{src}: {where}: unknown {what} {item!r}; known: {', '.join(sorted(names))}")
        return word, lambda v: v == word

    return parse


def _blk_term(item: Any, src: str, where: str) -> tuple[str, Callable[[str], bool]]:
    """Block sizes: a positive integer, 'in' (whole row) or 'none' / null (not quantized)."""
    if isinstance(item, int) and not isinstance(item, bool) and item > 0:
        word = str(item)
    elif item is None or item in ("in", "none"):
        word = _word(item)
    elif isinstance(item, str) and item.isdigit() and int(item) > 0:
        word = str(int(item))
    else:
        raise HarnessError(f"{src}: {where}: bad block {item!r}; use a positive integer, 'in' or 'none'")
    return word, lambda v: v == word


def _format_names() -> set[str]:
    # Imported on demand: formats pulls in torch, which a rule without fmt never needs.
    from tokenwise_harness.numerics import formats

    return set(formats.FORMATS) | {"none"}


_FIELD_PARSERS: dict[str, Callable] = {
    "layer": _numeric_term,
    "block": _word_term(lambda: {"mlp", "self_attn"}, "block"),
    "proj": _word_term(lambda: set(PROJ_ORDER), "projection"),
    "rank": _numeric_term,
    "fmt": _word_term(_format_names, "format"),
    "blk": _blk_term,
    "afmt": _word_term(_format_names, "activation format"),
    "ablk": _blk_term,
    "iters": _numeric_term,
    "smooth": None,  # handled in _condition: a bool, not a list of terms
}
assert tuple(_FIELD_PARSERS) == MATCH_FIELDS
