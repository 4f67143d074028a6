"""The pytest harness session: options, collection, running items, recording (syrupy's shape).

One HarnessSession per pytest process lives in config.stash; hooks.py's hooks delegate to
it; xdist.py groups and transports cases, terminal.py prints, run.py scores. Cases are
keyed by our case id (layer, block, projection, config, smooth), never by pytest's nodeid (xdist appends `@group` under --dist loadgroup).

Flow: options are validated at configure (a HarnessError becomes a pytest usage error);
the cache is resolved or captured once at session start on the controller; collection
generates one item per projection x config; running a case computes, on first use, every
*selected* config of that case's weight and of the selected weights reading the same cached X
(one decomposition per weight, one pass over their X) and keeps the metrics; each item's
metrics travel on its report (user_properties), so under xdist the controller sees every
case and alone writes the JSON artifact and the baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from tokenwise_harness.errors import HarnessError
from tokenwise_harness.pytest_plugin import terminal, xdist
from tokenwise_harness.pytest_plugin.rerun import PATH_OPTIONS, rerun_command
from tokenwise_harness.report.document import METRIC_KEYS

if TYPE_CHECKING:
    from tokenwise_harness.run import Evaluation
    from tokenwise_harness.verdict.baselines import BaselineStore
    from tokenwise_harness.verdict.cases import Case

T = TypeVar("T")

NO_BASELINE = "no baseline"  # a case's verdict and failure text when its baseline is missing


class CaseFailure(Exception):
    """A case that computed fine but broke a threshold or regressed past its baseline."""


@dataclass(frozen=True)
class Variant:
    """One model to score: the plain model, or a smoothed one (X / s)."""

    smooth: bool
    model_dir: str
    flag: str


class TokenwiseItem(pytest.Item):
    def __init__(self, *, case: Case, variant: Variant, harness: HarnessSession, **kw) -> None:
        super().__init__(**kw)
        self.case = case
        self.variant = variant
        self.harness = harness

    def runtest(self) -> None:
        self.harness.run_item(self)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: str | None = None) -> object:
        if isinstance(excinfo.value, (CaseFailure, HarnessError)):
            # pytest already names the case (its nodeid): drop the repeated "<case id>: " so the
            # short summary line shows the reason itself.
            prefix = f"{self.case.case_id}: "
            return "\n".join(line.removeprefix(prefix) for line in str(excinfo.value).splitlines())
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, self.case.case_id


class TokenwiseCollector(pytest.Collector):
    def collect(self) -> list:
        return []


def _usage(fn: Callable[[], T]) -> T:
    """Run fn; a HarnessError becomes a pytest usage error (exit 4, one line, no traceback)."""
    try:
        return fn()
    except HarnessError as exc:
        raise pytest.UsageError(f"tokenwise: {exc}") from None


class HarnessSession:
    @classmethod
    def start(cls, config: pytest.Config) -> HarnessSession:
        return _usage(lambda: cls(config))

    def __init__(self, config: pytest.Config) -> None:
        from tokenwise_harness.grid import parse_qspecs, parse_ranks
        from tokenwise_harness.verdict.thresholds import load_thresholds

        self.config = config
        _check_rootdir(config)
        opt = config.getoption
        self.is_worker = xdist.is_worker(config)
        self.rootdir = Path(config.rootpath)
        self.cache_root = self._cache_root()  # captured caches, smoothed models, digest memo, low-rank store
        self.thresholds = load_thresholds(opt("--thresholds"), default=self.rootdir / "thresholds.yaml")
        self.thresholds_path = self.thresholds.source_path  # None: built-in defaults
        grid_cfg = self.thresholds.grid or {}  # already parsed: ranks list[int], qspecs list[QSpec]
        iters = opt("--lowrank-iters")
        # Every option the scoring uses, in pytest's spelling; EvalSpec.validate checks them (run.py).
        self.spec_options = dict(
            ranks=parse_ranks(opt("--ranks"), "--ranks") if opt("--ranks") else grid_cfg.get("ranks", [16, 32]),
            qspecs=(parse_qspecs(opt("--qspecs"), "--qspecs") if opt("--qspecs")
                    else grid_cfg.get("qspecs") or parse_qspecs("nvfp4@128")),
            act_qspecs=(parse_qspecs(opt("--act-qspecs"), "--act-qspecs") if opt("--act-qspecs")
                        else grid_cfg.get("act_qspecs") or []),
            grid_mode=opt("--grid-mode") or grid_cfg.get("grid_mode", "combined"),
            lowrank_iters=iters if iters is not None else int(grid_cfg.get("iters", 1)),
            chunk_tokens=opt("--chunk-tokens"), quantizer=opt("--quantizer"),
            weight_quantizer=opt("--weight-quantizer"), torch_dtype=opt("--torch-dtype"), flag_style="-",
            cache_dir=self.cache_root)
        self._specs: dict = {}  # per variant: run.EvalSpec (its model dir validated once)
        self.variants = self._variants()
        self.device = self._device()
        self.spec_options["device"] = self.device
        for variant in self.variants:
            self.quantizers = self._spec(variant).validate()  # the kernel's label (meta, provenance)
        self.grid = self._spec(self.variants[0]).grid()
        self.chunk_tokens = self.spec_options["chunk_tokens"]
        self.xy_path = opt("--xy-path")
        self.update = opt("--update-baselines")
        self.update_new = opt("--update-baselines-new")
        self.baselines_root = Path(opt("--baselines-dir") or self.rootdir / "baselines")
        self.report_path = self._output_path("--tokenwise-report")
        self.html_path = self._output_path("--tokenwise-html")
        if self.update or self.update_new:  # fail now, not after every case has run
            from tokenwise_harness.atomic import check_writable_dir

            check_writable_dir(self.baselines_root, "--baselines-dir", create=True)
        self.cache = None
        self.cases: dict[str, object] = {}
        self.items: list[TokenwiseItem] = []
        self.computed: dict[tuple, dict] = {}
        self.failed: dict[tuple, dict[str, str]] = {}  # (variant, weight) -> {cfg key: error}: never recomputed
        self.recorded: dict[str, dict] = {}
        self.update_summaries: list = []
        self.stale: list[str] = []
        self.warnings: list[str] = []
        self._provenance: dict = {}  # per variant, computed once
        self._evaluations: dict = {}  # per variant: run.Evaluation (models loaded at most once)
        self._stores: dict = {}  # per variant, one baseline store
        config.pluginmanager.register(self, "tokenwise-session")

    # ------------------------------------------------------------ options
    def _output_path(self, flag: str) -> Path | None:
        """An artifact option's path, checked now: relative to where pytest was invoked (as
        --junitxml), never an input or inside the baseline store, its directory creatable
        (created at session end)."""
        from tokenwise_harness.atomic import check_output_file

        opt = self.config.getoption
        if not opt(flag):
            return None
        return check_output_file(Path(self.config.invocation_params.dir, opt(flag)), flag, inputs=[
            *((v.flag, v.model_dir) for v in self.variants), ("--xy-path", self.xy_path),
            ("--thresholds", self.thresholds.source_path),
            ("--tokenwise-cache-dir", self.cache_root)],
            stores=[("--baselines-dir", self.baselines_root)], create=False)

    def _cache_root(self) -> Path:
        """The cache root, resolved once: --tokenwise-cache-dir (relative to where pytest was
        invoked) or the default (cache_store.resolve_root), made absolute; an xdist worker takes the
        controller's (configure_node), so every process reads and writes the same one."""
        from tokenwise_harness.cache_store import resolve_root

        shared = xdist.from_controller(self.config, xdist.CACHE_ROOT)
        if shared is not None:
            return Path(shared)
        return Path(self.config.invocation_params.dir, resolve_root(self.config.getoption("--tokenwise-cache-dir")))

    def configure_node(self, node: object) -> None:
        """An xdist worker being started (on the controller): hand it this session's cache root."""
        xdist.to_worker(node, xdist.CACHE_ROOT, str(self.cache_root))

    def _variants(self) -> list[Variant]:
        opt = self.config.getoption
        variants = []
        if opt("--model-dir"):
            variants.append(Variant(False, opt("--model-dir"), "--model-dir"))
        if opt("--smooth-model-dir"):
            if opt("--smooth-alpha") is not None:
                raise HarnessError("--smooth-alpha smooths --model-dir itself; give it or --smooth-model-dir, not both")
            variants.append(Variant(True, opt("--smooth-model-dir"), "--smooth-model-dir"))
        if not variants:
            raise HarnessError("--xy-path needs --model-dir (or --smooth-model-dir) for the weights to score")
        return variants

    def _device(self) -> str:
        from tokenwise_harness.device import pick_device, start_cuda_driver

        if not xdist.is_worker(self.config):  # an xdist worker's GPU is known only after torch
            start_cuda_driver(self.config.getoption("--device"))
        return xdist.worker_device(self.config, pick_device(self.config.getoption("--device"), "--device"))

    # ------------------------------------------------------------ cache
    def prepare_cache(self) -> None:
        _usage(self._prepare_cache)

    def _prepare_cache(self) -> None:
        from tokenwise_harness.cache import XYCache

        if self.xy_path:
            self.cache = XYCache(self.xy_path, "--xy-path", cache_root=self.cache_root)
        else:
            self.cache = XYCache(self._captured_cache(), "--xy-path", cache_root=self.cache_root)
        for v in self.variants:
            self.evaluation(v)  # the cache must come from this model
        if self.config.getoption("--smooth-alpha") is not None:
            self.variants.append(self._smoothed_variant())

    def _smoothed_variant(self) -> Variant:
        """--smooth-alpha A|search: smooth --model-dir on the session's cache (once, kept in the shared
        user cache beside the captured caches, keyed by model, data and alpha) and gate it too."""
        from tokenwise_harness.cache_store import CacheStore, smoothed_model
        from tokenwise_harness.calib.smooth import parse_alpha
        from tokenwise_harness.pytest_plugin.progress import log_line

        opt = self.config.getoption
        plain = [v for v in self.variants if not v.smooth]
        if not plain:
            raise HarnessError("--smooth-alpha needs --model-dir: it smooths that model on the cache")
        alpha = parse_alpha(opt("--smooth-alpha"), flag="--smooth-alpha")
        out = smoothed_model(CacheStore(self.cache_root, "--tokenwise-cache-dir"), self.model_dir(plain[0]),
                             self.cache, alpha, build=not self.is_worker, chunk_tokens=self.chunk_tokens,
                             device=self.device, log=log_line(self.config))
        return Variant(True, str(out), "--smooth-alpha")

    def _captured_cache(self) -> Path:
        """The shared user cache's X/Y cache for --model-dir (cache_store.py); captured when missing."""
        from tokenwise_harness.cache_store import CacheStore, captured_xy
        from tokenwise_harness.pytest_plugin.progress import log_line, progress_stream

        plain = [v for v in self.variants if not v.smooth]
        if not plain:
            raise HarnessError("--smooth-model-dir without --xy-path needs --model-dir to capture a cache from")
        opt = self.config.getoption
        size = self.capture_size()
        try:
            return captured_xy(CacheStore(self.cache_root, "--tokenwise-cache-dir"), self.model_dir(plain[0]),
                               seed=size["seed"], cn=size["cn"], eu=size["eu"], length=size["length"],
                               torch_dtype=opt("--torch-dtype"), device=self.device, compact=not opt("--xy-full"),
                               build=not self.is_worker, progress=progress_stream(self.config), log=log_line(self.config))
        except HarnessError as exc:  # data.py names the CLI flags; here they are --xy-cn, --xy-eu, --xy-length
            import re

            raise HarnessError(re.sub(r"--(cn|eu|length)\b", r"--xy-\1", str(exc))) from None

    def capture_size(self) -> dict:
        """cn / eu / length / seed of the captured cache: the --xy-* options, else thresholds.yaml's
        capture section, else save_xy's defaults."""
        defaults = {"cn": 50, "eu": 80, "length": 128, "seed": 0}
        out = {}
        for key, default in defaults.items():
            given = self.config.getoption(f"--xy-{key}")
            out[key] = given if given is not None else self.thresholds.capture.get(key, default)
        return out

    # ------------------------------------------------------------ collection
    def collect(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        parent = TokenwiseCollector.from_parent(session, name="tokenwise", nodeid="tokenwise",
                                                path=self.rootdir / "tokenwise")
        new = []
        for variant, case in self._generated():
            item = TokenwiseItem.from_parent(parent, name=case.case_id, case=case, variant=variant, harness=self)
            item.add_marker(pytest.mark.tokenwise)
            item.add_marker(pytest.mark.xdist_group(name=xdist.group_name(case, self.cache)))
            new.append(item)
        self.items = new
        items.extend(new)
        # Report the generated items as a collection result, so counts and --co listings see them.
        config = session.config
        config.hook.pytest_collectreport(report=pytest.CollectReport(parent.nodeid, "passed", None, new))

    def _generated(self) -> list[tuple]:
        """(variant, Case) of every case this run generates, before any selection.

        Derived from the cache and the grid alone, so the xdist controller (which collects
        nothing) knows the same cases as its workers: stale baselines are judged against it.
        """
        from tokenwise_harness.verdict.cases import Case

        out = []
        for variant in self.variants:
            for target in self.cache.targets:
                if not self.thresholds.selects(target.layer, target.block, target.proj):
                    continue  # thresholds.yaml select: outside the gated subset
                for cfg in self.grid:
                    case = Case(target.layer, target.block, target.proj, cfg, variant.smooth)
                    self.cases[case.case_id] = case
                    out.append((variant, case))
        return out

    def make_scheduler(self, log: object) -> object | None:
        return xdist.make_scheduler(self.config, log, self.cache)

    # ------------------------------------------------------------ running
    def run_item(self, item: TokenwiseItem) -> None:
        case = item.case
        metrics = self._metrics(item)
        failures = list(self.thresholds.check(case, metrics))
        limits = {m: {"limit": lim.value, "rule": lim.rule} for m, lim in self.thresholds.limits_for(case).items()}
        store = self._store(item.variant)
        baseline = store.get(case.case_id)
        # --update-baselines rewrites every baseline that runs: nothing to compare against.
        # --update-baselines-new only creates missing ones: existing ones still gate the case.
        updating = self.update or self.update_new
        # A missing baseline fails the case with a short outcome; the session summary says once
        # how many are missing and the command that creates them (terminal.missing_baselines).
        missing = baseline is None and not updating
        if baseline is not None and not self.update:
            failures += self._baseline_failures(store, case, metrics, item.variant)
        verdict = "failed" if failures else NO_BASELINE if missing else "passed"
        payload = {"case_id": case.case_id, "layer": case.layer, "block": case.block, "proj": case.proj,
                   "config": case.cfg.key, "smooth": case.smooth, "metrics": metrics, "limits": limits,
                   "baseline": baseline, "verdict": verdict, "no_baseline": missing,
                   "model_dir": item.variant.model_dir}
        xdist.attach(item, payload, METRIC_KEYS)
        if failures or missing:
            raise CaseFailure("\n".join(failures + ([NO_BASELINE] if missing else [])))

    def _baseline_failures(self, store: BaselineStore, case: Case, metrics: dict, variant: Variant) -> list[str]:
        return list(store.compare(case, metrics, self.thresholds, provenance=self.provenance(variant)))

    def _metrics(self, item: TokenwiseItem) -> dict:
        # A HarnessError here (e.g. a rank above the weight's size) fails this case with its
        # one-line message (TokenwiseItem.repr_failure); the session goes on. Errors are kept
        # for every selected case they belong to and never recomputed: a kernel runs once per
        # selected case, even when it fails.
        key = _weight_key(item.variant, item.case.target)
        cfg_key = item.case.cfg.key
        if cfg_key not in self.computed.get(key, {}) and cfg_key not in self.failed.get(key, {}):
            self._compute(item)
        if cfg_key in self.failed.get(key, {}):
            raise HarnessError(self.failed[key][cfg_key])
        return self.computed[key][cfg_key]

    def _selected(self, item: TokenwiseItem) -> dict:
        """{target: its configs that survived -k selection (compute only those)} of the item's
        variant, among the items this process collected (an xdist worker collects every selected
        case, but the scheduler sends it whole input groups: those reading the item's X are its own)."""
        from tokenwise_harness.allowlist import Target

        selected: dict = {item.case.target: [item.case.cfg]}
        for it in item.session.items:
            if isinstance(it, TokenwiseItem) and it.variant == item.variant:
                cfgs = selected.setdefault(it.case.target, [])
                if it.case.cfg not in cfgs:
                    cfgs.append(it.case.cfg)
        return dict(sorted(selected.items(), key=lambda kv: Target.sort_key(kv[0])))

    def _plan(self, item: TokenwiseItem, evaluation: Evaluation) -> dict:
        """{target: configs} to score now, none of them scored before: the item's weight and every
        selected weight reading the same cached X (one pass over it: q/k/v,
        gate/up, or the weight alone), each with its selected configs. A
        model-level fake_op quantizes the whole model per config, so with one every selected
        weight gets every selected config."""
        selected = self._selected(item)
        if evaluation.fake_op is not None:
            every = list(dict.fromkeys(cfg for cfgs in selected.values() for cfg in cfgs))
            selected = {t: every for t in selected}
        else:
            x_key = self.cache.entry(item.case.target).x_key
            selected = {t: cfgs for t, cfgs in selected.items() if self.cache.entry(t).x_key == x_key}
        plan = {}
        for target, cfgs in selected.items():
            done = {**self.computed.get(_weight_key(item.variant, target), {}),
                    **self.failed.get(_weight_key(item.variant, target), {})}
            todo = [cfg for cfg in cfgs if cfg.key not in done]
            if todo:
                plan[target] = todo
        return plan

    def _compute(self, item: TokenwiseItem) -> None:
        """Score the item's plan (_plan) in one call; keep its metrics, and each error for the
        cases it belongs to: a weight's own error for its cases, an error of the whole call (a
        model-level fake_op's, a corrupt X) for every case of the call."""
        variant = item.variant
        evaluation = self.evaluation(variant)
        plan = self._runnable(variant, evaluation, self._plan(item, evaluation))
        failed: dict = {}
        try:
            results = evaluation.score(plan=plan, failed=failed) if plan else {}
        except HarnessError as exc:
            results, failed = {}, {t: str(exc) for t in plan}
        for (layer, block, proj), metrics in results.items():
            self.computed.setdefault((variant, layer, block, proj), {}).update(metrics)
        for target, why in failed.items():
            for cfg in plan[target]:
                self.failed.setdefault(_weight_key(variant, target), {})[cfg.key] = why

    def _runnable(self, variant: Variant, evaluation: Evaluation, plan: dict) -> dict:
        """The plan without the configs a weight-level kernel cannot score (torchao and int4):
        such a config fails alone, not its weight's others."""
        if evaluation.kernel is None:
            return plan
        runnable = {}
        for target, cfgs in plan.items():
            for cfg in cfgs:
                try:
                    evaluation.kernel.check_config(cfg)
                    runnable.setdefault(target, []).append(cfg)
                except HarnessError as exc:
                    self.failed.setdefault(_weight_key(variant, target), {})[cfg.key] = str(exc)
        return runnable

    def _spec(self, variant: Variant):
        """A variant's EvalSpec, made once: its model dir is validated (and fingerprinted) once per
        session, whoever asks (configure, the header, the Evaluation, baselines, provenance)."""
        from tokenwise_harness.run import EvalSpec

        if variant not in self._specs:
            self._specs[variant] = EvalSpec(model_dir=variant.model_dir, xy_path="", smooth=variant.smooth,
                                            model_flag=variant.flag, **self.spec_options)
        return self._specs[variant]

    def model_dir(self, variant: Variant):
        """The variant's validated checkpoint.ModelDir (one per session)."""
        return self._spec(variant).mdir

    def evaluation(self, variant: Variant) -> Evaluation:
        """The run module's Evaluation of a variant on the session's cache (made once)."""
        from tokenwise_harness.run import Evaluation

        if variant not in self._evaluations:
            spec = self._spec(variant).with_xy_path(str(self.cache.path))  # the cached spec stays as made
            self._evaluations[variant] = Evaluation(spec, self.cache)
        return self._evaluations[variant]

    # ------------------------------------------------------------ baselines
    def _store(self, variant: Variant):
        from tokenwise_harness.verdict.baselines import BaselineStore, model_id

        if variant not in self._stores:
            mdir = self.model_dir(variant)
            hint = f"`{self.rerun_command('--update-baselines')}`"
            self._stores[variant] = BaselineStore(self.baselines_root, model_id(mdir.name, mdir.fingerprint),
                                                  update=self.update or self.update_new, hint=hint)
        return self._stores[variant]

    def provenance(self, variant: Variant) -> dict:
        """This run's provenance for a variant's baselines (computed once per variant)."""
        import torch

        from tokenwise_harness.verdict.baselines import build_provenance

        if variant not in self._provenance:
            mdir = self.model_dir(variant)
            on_cuda = self.device.startswith("cuda")
            self._provenance[variant] = dict(build_provenance(
                model_fingerprint=mdir.fingerprint,
                cache_fingerprint=self.cache.metadata.get("data_fingerprint", ""),
                dtype=self.config.getoption("--torch-dtype"),
                device=torch.cuda.get_device_name(self.device) if on_cuda else "cpu",
                torch_version=torch.__version__,
                cuda_version=torch.version.cuda if on_cuda else None,
                cwd=self.rootdir), quantizer=self.quantizers.label)
        return self._provenance[variant]

    def rerun_command(self, *add: str) -> str:
        """This pytest invocation as a command to paste, with `add` instead of its update flags."""
        return rerun_command(self.config, list(add))

    def store_dirs(self) -> list[Path]:
        """The baseline directory of each model this run gates."""
        return [self._store(v).dir for v in self.variants]

    # ------------------------------------------------------------ terminal
    def teststatus(self, report: pytest.TestReport) -> tuple | None:
        """A case without a baseline: still a failure (counted, exit code 1), shown as
        NO BASELINE under -v; None leaves every other report to pytest."""
        if report.failed:
            payload = xdist.received(report)
            if payload is not None and payload["verdict"] == NO_BASELINE:
                return "failed", "F", ("NO BASELINE", {"yellow": True})
        return None

    def header(self) -> list[str]:
        return _usage(lambda: terminal.header(self))

    def terminal_summary(self, tr: pytest.TerminalReporter) -> None:
        terminal.summary(self, tr)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> Generator[None, object, object]:
        """After pytest's short test summary (this wrapper is outside the terminal reporter's):
        the one message about missing baselines, last before the final counts line."""
        try:
            return (yield)
        finally:
            terminal.missing_baselines(self, terminalreporter)

    # ------------------------------------------------------------ recording (controller side)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        payload = xdist.received(report)
        if payload is not None:
            self.recorded[payload["case_id"]] = payload

    def finish(self, session: pytest.Session) -> None:
        if self.cache is not None:
            self.cache.close()  # its pinned arena: the cases are done
        if self.is_worker or not self.recorded:
            return
        try:
            self._write_baselines(session)
            if self.report_path or self.html_path:
                self._write_report()
        except HarnessError as exc:
            self.warnings.append(str(exc))
            session.exitstatus = pytest.ExitCode.USAGE_ERROR

    def _write_baselines(self, session: pytest.Session) -> None:
        by_variant: dict[Variant, list[dict]] = {}
        for payload in self.recorded.values():
            variant = next(v for v in self.variants if v.model_dir == payload["model_dir"]
                           and v.smooth == payload["smooth"])
            by_variant.setdefault(variant, []).append(payload)
        if not self.cases:
            self._generated()  # the xdist controller collected nothing itself
        for variant, payloads in by_variant.items():
            store = self._store(variant)
            stale = store.stale(set(self.cases), self._in_scope)
            self.stale += stale
            self.warnings += store.provenance_warnings([p["case_id"] for p in payloads], self.provenance(variant))
            if not (self.update or self.update_new):
                continue
            for p in payloads:
                store.record(p["case_id"], p["metrics"])
            if self.update and stale:
                store.delete(stale)
            self.update_summaries.append(store.flush(self.provenance(variant), new_only=self.update_new))

    def _in_scope(self, case_id: str) -> bool:
        """Would this run have generated and selected a case of this id, had it existed?

        Only such stored cases can be judged stale: a baseline of a config outside the current
        grid, or outside `-k`, is simply not part of this run.
        """
        # pytest has no public API that evaluates a -k expression on a name that is not a
        # collected item (here: a stored baseline's case id); Expression is what -k itself runs.
        from _pytest.mark.expression import Expression

        from tokenwise_harness.verdict.cases import parse_case_id

        case = parse_case_id(case_id)
        if case is None or case.cfg not in self.grid or not self.thresholds.selects(case.layer, case.block, case.proj):
            return False
        keyword = self.config.getoption("keyword")
        if not keyword:
            return True
        names = {case_id, "tokenwise"}
        return Expression.compile(keyword).evaluate(
            lambda name, **kw: any(name.lower() in n.lower() for n in names))

    def build_report(self) -> dict:
        """The §2.5 report of the cases that ran, plus each case's verdict, limits and baseline
        under "cases" (and its metrics there when the §2.5 part cannot hold them: smoothed
        cases of a run that gates two models)."""
        from tokenwise_harness.report import document as report

        results: dict = {}
        cases: dict = {}
        two_models = len(self.variants) > 1
        for p in self.recorded.values():
            if p["smooth"] and two_models:
                continue  # the §2.5 report holds one model; smoothed cases are listed under "cases"
            results.setdefault((p["layer"], p["block"], p["proj"]), {})[p["config"]] = p["metrics"]
        for cid in sorted(self.recorded):
            p = self.recorded[cid]
            cases[cid] = {k: p[k] for k in ("config", "smooth", "verdict", "limits", "baseline")}
            if p["smooth"] and two_models:
                cases[cid]["metrics"] = p["metrics"]
        meta = self.evaluation(self.variants[0]).meta()
        rep = report.build_report(meta, results)
        rep["cases"] = cases
        return rep

    def _write_report(self) -> None:
        from tokenwise_harness.report import document as report

        rep = self.build_report()
        if self.report_path:
            report.write_report(rep, Path(self.report_path), flag="--tokenwise-report")
        if self.html_path:
            from tokenwise_harness.report.html import write_html

            write_html(rep, self.html_path, "--tokenwise-html", title="tokenwise precision gate",
                       source=str(self.report_path) if self.report_path else None,
                       extra_meta=terminal.run_facts(self))



def _weight_key(variant: Variant, target) -> tuple:
    """The key of self.computed / self.failed: one weight of one variant."""
    return (variant, target.layer, target.block, target.proj)


def _check_rootdir(config: pytest.Config) -> None:
    """HarnessError when an option's value moved pytest's rootdir or ini file.

    pytest chooses the rootdir and ini file before it loads plugins, so it does not know our
    options yet and takes the value in `--model-dir /models/m` for a test path: the rootdir
    becomes an ancestor of the model dir, and the project's ini file (testpaths, addopts) and
    the default thresholds.yaml and baselines/ are looked for there.
    Rather than gate against the wrong files, say so and how to write the option.
    """
    import inspect
    import os
    import shlex

    args = shlex.split(os.environ.get("PYTEST_ADDOPTS", "")) + [str(a) for a in config.invocation_params.args]
    taken = [(a, b) for a, b in zip(args, args[1:]) if a in PATH_OPTIONS and not b.startswith("-")
             and Path(config.invocation_params.dir, b).exists()]
    if not taken:
        return
    # pytest has no public API that recomputes its rootdir/ini choice from other args:
    # determine_setup is what it ran itself (a private API: skip the check if it moved).
    try:
        from _pytest.config.findpaths import determine_setup

        kwargs = dict(inifile=config.option.inifilename, args=[str(a) for a in config.option.file_or_dir or ()],
                      rootdir_cmd_arg=config.option.rootdir or None, invocation_dir=config.invocation_params.dir)
        if "override_ini" in inspect.signature(determine_setup).parameters:
            kwargs["override_ini"] = config.option.override_ini
        rootpath, inipath = determine_setup(**kwargs)[:2]
    except Exception:
        return
    if (Path(rootpath), inipath and Path(inipath)) == (Path(config.rootpath), config.inipath):
        return
    opt, value = taken[0]
    ini = f"ini file {inipath}" if inipath else "no ini file"
    raise HarnessError(f"pytest took the value of `{opt} {value}` for a test path when choosing its rootdir: "
                       f"it got {config.rootpath} instead of {rootpath} ({ini}); write {opt}={value} "
                       "(with '=': pytest learns plugin options too late), or give --rootdir")
