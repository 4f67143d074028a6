"""One scoring flow for both front ends: validate, pick the engine path, score, build `meta`.

The CLI (eval_fake / eval_smooth) and the pytest plugin both score through `Evaluation`:

    spec = EvalSpec(...)            # options, as the front end parsed them
    spec.validate()                 # every check that needs no cache (cheap: at configure time)
    ev = Evaluation(spec, cache)    # + the cache: model match, engine path, checksums
    ev.score(configs, targets)      # {(layer, block, proj): {cfg key: metrics}}; or ev.score(plan=...)
    ev.meta()                       # the §2.5 report's meta

The CLI scores every weight at once (`run_eval`); the plugin scores one input group at a time
(the weights reading one cached X), only the configs `-k` selected, each weight decomposed once
and the model (when one has to be loaded) loaded once per Evaluation. Every refusal, the engine-path decision (checkpoint
shards, loaded model, or a model-level fake_op), the checksum verification and the meta
fields exist here only; front ends differ in their flag spelling alone (`flag_style`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from tokenwise_harness import __version__
from tokenwise_harness.allowlist import Target
from tokenwise_harness.cache import XYCache
from tokenwise_harness.checkpoint import SMOOTH_META_FILE, ModelDir, load_model, load_model_layers, resolve_torch_dtype
from tokenwise_harness.device import pick_device
from tokenwise_harness.envvars import check_settings
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import QSpec, SvdqConfig, build_grid, parse_qspecs, parse_ranks
from tokenwise_harness.kernels import BUILTIN_QUANTIZER, WeightKernel, load_weight_quantizer, resolve_callable
from tokenwise_harness.text import plural

if TYPE_CHECKING:
    import torch

DEFAULT_QUANTIZER = BUILTIN_QUANTIZER
ENGINE_MODEL_OP = "model-level fake_op"
ENGINE_SHARDS = "per-weight (checkpoint shards)"
ENGINE_LOADED = "per-weight (loaded model)"
WEIGHT_KERNEL = ", weight-level kernel"  # appended to the per-weight engine's name when a user kernel runs
Results = dict[tuple[int, str, str], dict[str, dict]]


@dataclass
class Quantizers:
    """Which kernel scores the grid: the built-in one, a weight-level kernel, or a model-level fake_op."""

    fake_op: Callable | None = None  # --quantizer: the seed's model-level fake_op(model, cfg)
    kernel: WeightKernel | None = None  # --weight_quantizer: fn(weight, cfg) inside the per-weight engine
    label: str = DEFAULT_QUANTIZER  # what the report's meta.quantizer and the baselines' provenance record


@dataclass
class EvalSpec:
    """Everything an evaluation needs, validated before any heavy work."""

    model_dir: str
    xy_path: str
    ranks: list[int]
    qspecs: list[QSpec]
    grid_mode: str = "combined"
    chunk_tokens: int = 4096
    smooth: bool = False
    quantizer: str | None = None  # model-level fake_op(model, cfg), the seed's protocol
    weight_quantizer: str | None = None  # weight-level fn(weight, cfg) -> W~ | SvdqParts, or "torchao"
    no_restore: bool = False
    torch_dtype: str = "auto"
    device_map: str | None = None
    device: str | None = None
    act_qspecs: list[QSpec] = field(default_factory=list)
    lowrank_iters: int = 1
    verify_cache: bool = False  # check every tensor's checksum up front
    no_verify_cache: bool = False  # skip the checksum check done while each tensor streams
    model_flag: str = "--model_dir"
    # The cache root the front end resolved (cache_store.resolve_root): the model dir's digest
    # memo and the engine's low-rank store live under it; None: memo.default_root().
    cache_dir: Path | None = None
    flag_style: str = "_"  # how the front end spells flags: "_" (CLI: --chunk_tokens), "-" (pytest: --chunk-tokens)

    @classmethod
    def from_text(cls, ranks: str, qspecs: str, **kw) -> EvalSpec:
        return cls(ranks=parse_ranks(ranks), qspecs=parse_qspecs(qspecs), **kw)

    @cached_property
    def mdir(self) -> ModelDir:
        """The model dir, validated once (validate, Evaluation and the plugin share it)."""
        return ModelDir(self.model_dir, self.model_flag, cache_root=self.cache_dir)

    def with_xy_path(self, xy_path: str) -> EvalSpec:
        """A copy of this spec reading the cache at `xy_path` (the pytest plugin finds its cache after
        validating), sharing its validated model dir; this spec is left as it is."""
        spec = replace(self, xy_path=xy_path)
        spec.mdir = self.mdir  # the cached_property's value: one ModelDir (and fingerprint) per model
        return spec

    def flag(self, name: str) -> str:
        """The front end's spelling of an option: flag('chunk_tokens') -> --chunk_tokens or --chunk-tokens."""
        return "--" + (name.replace("_", "-") if self.flag_style == "-" else name)

    def grid(self) -> list[SvdqConfig]:
        if self.lowrank_iters < 1:
            raise HarnessError(f"{self.flag('lowrank_iters')} {self.lowrank_iters} must be >= 1 (1 = one-shot SVD)")
        try:
            return build_grid(self.ranks, self.qspecs, self.grid_mode, self.act_qspecs, self.lowrank_iters)
        except HarnessError as exc:
            raise HarnessError(str(exc).replace("--grid_mode", self.flag("grid_mode"))) from None

    def validate(self) -> Quantizers:
        """Every check that needs no cache; the kernel that scores (loaded). Raises HarnessError."""
        if self.chunk_tokens <= 0:
            raise HarnessError(f"{self.flag('chunk_tokens')} {self.chunk_tokens} must be positive (a token count)")
        check_settings()
        grid = self.grid()
        resolve_torch_dtype(self.torch_dtype, self.flag("torch_dtype"))
        pick_device(self.device, self.flag("device"))
        quantizers = self.quantizers()
        if quantizers.kernel is not None:
            for cfg in grid:
                if cfg.iters > 1:  # the format checks are per config, at scoring (pytest: -k may drop them)
                    quantizers.kernel.check_config(cfg)
        self.mdir  # noqa: B018  (a bad model dir fails here, in one line)
        return quantizers

    def quantizers(self) -> Quantizers:
        """Load --quantizer / --weight_quantizer: the one place both front ends do it."""
        q_flag, wq_flag, act_flag = self.flag("quantizer"), self.flag("weight_quantizer"), self.flag("act_qspecs")
        if self.quantizer and self.weight_quantizer:
            raise HarnessError(f"{q_flag} (model-level fake_op) and {wq_flag} (weight-level kernel) are two ways "
                               "to plug in one kernel; give one of them")
        if self.quantizer:
            if self.act_qspecs:
                raise HarnessError(f"{act_flag} cannot be combined with {q_flag}: a model-level fake_op quantizes "
                                   "weights only, so the residual branch cannot be separated; use "
                                   f"{wq_flag} with a kernel returning SvdqParts")
            return Quantizers(fake_op=resolve_callable(self.quantizer, q_flag), label=self.quantizer)
        if self.weight_quantizer:
            kernel = load_weight_quantizer(self.weight_quantizer, wq_flag)
            return Quantizers(kernel=kernel, label=kernel.label)
        return Quantizers()


def check_cache_model(cache: XYCache, mdir: ModelDir, smooth: bool, wait: bool = True) -> bool:
    """A cache must come from this model (or, for a smoothed dir, from the model it was made from).

    True when checked. wait=False (the model's fingerprint still hashing in the background,
    ModelDir.start_fingerprint): every check that needs no digest is made, and False is returned
    when the one that does has to wait; call again (the refusal is the same either way)."""
    if not smooth and mdir.smoothed:
        raise HarnessError(f"{mdir.flag} {mdir.path} is a smoothed model dir (W*s in its weights): scoring it as a "
                           f"plain model ignores the smoothing; give it as --smooth_model_dir (eval_smooth; pytest: "
                           f"--smooth-model-dir={mdir.path})")
    if smooth and not cache.metadata.get("model_fingerprint"):
        raise HarnessError(f"{cache.flag} {cache.path} has no model_fingerprint, so it cannot be matched with the "
                           f"model {mdir.flag} {mdir.path} was smoothed from; re-capture it with save_xy")
    fingerprint = None
    if smooth and (mdir.path / SMOOTH_META_FILE).is_file():
        fingerprint = _read_smooth_meta(mdir).get("source_model_fingerprint")
    if fingerprint is None and cache.metadata.get("model_fingerprint"):  # else nothing to compare
        fingerprint = mdir.fingerprint if wait else mdir.fingerprint_if_known()
        if fingerprint is None:
            return False
    hint = f"tokenwise-precision save_xy --model_dir <the model> --save_path {cache.path.parent} " \
           f"--label {cache.path.stem}"
    cache.check_model(fingerprint or "", mdir.flag, hint)
    return True


class Evaluation:
    """One model dir scored against one cache (see the module docstring).

    overlap_fingerprint (the CLI's run_eval): when the digest memo does not know every weight
    file, the model's fingerprint is hashed on a background thread while the engine runs
    instead of before it. What needs the digest then waits for it as follows:
    * the refusal of a cache captured from another model (check_cache_model) is made as soon
      as the digest is known: before each weight is read, and at the latest when scoring ends
      (before any result is returned, so no report is written); same message, same exit;
    * the low-rank store is keyed by the weight files' digests (ModelDir.tensor_id): a weight
      read before its file's digest is known is decomposed without a store lookup (on a cold
      digest memo the store can only hold it if the memo alone was lost; the numbers are the
      same exact decomposition either way), and its factors are put under their key once the
      digest is known (engine.CheckpointWeights.store_later), so a rerun finds them all;
    * the report's meta waits for the fingerprint (`meta`).
    A warm digest memo starts no thread: the fingerprint is known up front (0 bytes hashed).
    """

    def __init__(self, spec: EvalSpec, cache: XYCache | None = None, overlap_fingerprint: bool = False):
        self.spec = spec
        self.quantizers = spec.validate()
        self.fake_op, self.kernel = self.quantizers.fake_op, self.quantizers.kernel
        self.grid = spec.grid()
        self.device = pick_device(spec.device, spec.flag("device"))
        self.mdir = spec.mdir
        self.cache = cache if cache is not None else XYCache(spec.xy_path, spec.flag("xy_path"),
                                                              verify=not spec.no_verify_cache, cache_root=spec.cache_dir)
        if overlap_fingerprint:
            self.mdir.start_fingerprint()
        self._model_checked = check_cache_model(self.cache, self.mdir, spec.smooth, wait=not overlap_fingerprint)
        self._model = None
        self._model_layers: set[int] | None = None  # the decoder layers self._model holds (None: all)
        self._source = None

    # ------------------------------------------------------------ engine path
    @cached_property
    def engine(self) -> str:
        """Which engine path scores this model (decided without loading anything)."""
        if self.fake_op is not None:
            return ENGINE_MODEL_OP
        kernel = WEIGHT_KERNEL if self.kernel is not None else ""
        if self.mdir.safetensors_index is not None and self.mdir.targets():
            return ENGINE_SHARDS + kernel
        return ENGINE_LOADED + kernel

    def model(self, layers: Iterable[int] | None = None) -> torch.nn.Module:
        """The instantiated model: for a .bin checkpoint or a user's fake_op.

        `layers`: the decoder layers the caller needs (None: all). When they are some of the
        layers, the model holds only those (checkpoint.load_model_layers: the others are empty
        placeholders, embeddings and lm_head stay on meta; not runnable end to end), so a
        model-level fake_op under a -k selection quantizes only the selected layers' weights.
        A model already made is reused when it holds every layer asked for; the whole model is
        loaded (at most once) when no layers are named or a partial load is not possible.
        """
        wanted = None if layers is None else set(layers)
        have = self._model_layers
        if self._model is not None and (have is None or (wanted is not None and wanted <= have)):
            return self._model
        partial = None
        if wanted is not None:
            wanted |= have or set()
            partial = load_model_layers(self.mdir, wanted, self.spec.torch_dtype)
        if partial is not None:
            from tokenwise_harness import engine

            # The layers left out are never instantiated: compare the cache with the shards' projections.
            engine.check_alignment(self.cache, self.mdir.targets(), self.spec.model_flag)
            if self.spec.smooth:
                from tokenwise_harness.calib.smooth import attach_smooth_factors

                partial = attach_smooth_factors(partial, self.mdir)
            self._model, self._model_layers = partial, wanted
        elif self.spec.smooth:
            from tokenwise_harness.calib.smooth import load_smoothed_model

            self._model, self._model_layers = load_smoothed_model(str(self.mdir.path), self.spec.torch_dtype,
                                                                  self.spec.device_map), None
        else:
            self._model, self._model_layers = load_model(self.mdir, self.spec.torch_dtype,
                                                         self.spec.device_map), None
        return self._model

    def check_model(self, wait: bool = True) -> None:
        """The cache-from-another-model refusal, once its fingerprint is known (see the class doc);
        wait=False returns at once while it is still hashing."""
        if not self._model_checked:
            self._model_checked = check_cache_model(self.cache, self.mdir, self.spec.smooth, wait=wait)

    def _weights(self):
        """The per-weight engine's weight source, made once; its projections must match the cache's."""
        from tokenwise_harness import engine

        if self._source is None:
            if self.engine.startswith(ENGINE_SHARDS):
                source = engine.CheckpointWeights(self.mdir, self.spec.smooth)
            else:
                source = engine.ModuleWeights(self.model(), self.spec.smooth)
            engine.check_alignment(self.cache, source.targets(), self.spec.model_flag)
            self._source = source
        if not self._model_checked:
            return _CheckedWeights(self._source, self.check_model)
        return self._source

    # ------------------------------------------------------------ scoring
    def score(self, configs: Iterable[SvdqConfig] | None = None, targets: Iterable[Target] | None = None,
              progress: bool = False, plan: dict[Target, list[SvdqConfig]] | None = None,
              failed: dict[Target, str] | None = None) -> Results:
        """{(layer, block, proj): {cfg key: metrics}} of `configs` (default: the grid) on `targets`
        (default: every projection), or of each target's own configs in `plan` (the plugin: each
        weight's -k selected configs).

        Each target is decomposed once for all its configs, and targets reading one cached X
        (q/k/v, gate/up) share one pass over it; a weight-level kernel is called
        once per (target, config), and every config is checked to be one it can score before any
        is. `failed`: where an error that belongs to one weight goes (engine.evaluate_plan);
        without it the first error is raised. A model-level fake_op quantizes the whole model per
        config (its protocol), and only the targets are scored; when they lie in some decoder
        layers only, the model it gets holds only those layers (see `model`). Every cached tensor
        the numbers come from has passed its checksum when they are returned: a whole-cache run
        hashes on a thread pool beside the engine (or up front with verify_cache), a partial one
        as each tensor streams.
        """
        from tokenwise_harness import engine

        whole = targets is None and plan is None
        if plan is None:
            configs = list(self.grid if configs is None else configs)
            plan = None if whole else {t: configs for t in targets}
        else:
            configs = list(dict.fromkeys(cfg for cfgs in plan.values() for cfg in cfgs))
        if self.kernel is not None:
            for cfg in configs:
                self.kernel.check_config(cfg)
        if whole and self.spec.verify_cache:
            self.cache.verify_checksums()
        elif whole:
            self.cache.verify_in_background()  # joined below, before anything is returned
        try:
            if self.fake_op is not None:
                targets = None if whole else list(plan)
                model = self.model(None if whole else {t.layer for t in targets})
                results = engine.evaluate_with_model_op(
                    self.cache, model, self.fake_op, configs, self.spec.chunk_tokens, self.device,
                    self.spec.smooth, self.spec.no_restore, progress, targets=targets, layers=self._model_layers)
            else:
                source = self._weights()
                plan = plan if plan is not None else {t: configs for t in source.targets()}
                results = engine.evaluate_plan(self.cache, source, plan, self.spec.chunk_tokens, self.device,
                                               progress=progress, quantize_fn=self.kernel, failed=failed)
        except BaseException as exc:
            self.cache.stop_background()
            if isinstance(exc, Exception):
                self.check_model()  # the refusal an up-front check would have made comes first
            raise
        self.cache.wait_verified()
        self.check_model()  # a fingerprint hashed beside the engine: refuse before anything is returned
        return results

    # ------------------------------------------------------------ report meta
    def meta(self) -> dict:
        """The §2.5 report's meta for this evaluation (the grid, not only what was scored)."""
        spec = self.spec
        meta = {
            "xy_path": str(spec.xy_path),
            "xy_meta": self.cache.meta,
            "grid_mode": spec.grid_mode,
            "ranks": list(spec.ranks),
            "qspecs": [[q.fmt, str(q.blk)] for q in spec.qspecs],
            "smooth": spec.smooth,
            "chunk_tokens": spec.chunk_tokens,
            "model_dir": str(spec.model_dir),
            "model_fingerprint": self.mdir.fingerprint,
            "configs": [c.key for c in self.grid],
            "quantizer": self.quantizers.label,
            "engine": self.engine,
            "harness_version": __version__,
        }
        if spec.act_qspecs:
            meta["act_qspecs"] = [[q.fmt, str(q.blk)] for q in spec.act_qspecs]
        smooth_meta = _smooth_meta(self.mdir) if spec.smooth else None
        if smooth_meta:
            meta["smooth_meta"] = smooth_meta
        return meta


def run_eval(spec: EvalSpec, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Score the whole grid on every projection; return the §2.5 report (not yet written)."""
    from tokenwise_harness.report import document as report

    ev = Evaluation(spec, overlap_fingerprint=True)
    started = time.perf_counter()
    try:
        results = ev.score(progress=progress)
    finally:
        ev.cache.close()  # its pinned arena: nothing streams after this
    seconds = time.perf_counter() - started
    require_finite(results, spec)
    meta = ev.meta()  # waits for a fingerprint still hashing (and its store puts): the log counts them
    log(f"eval: {plural(len(results), 'projection')} x {plural(len(ev.grid), 'config')} in {seconds:.1f} s "
        f"({ev.engine}; {_reuse_line()})")
    return report.build_report(meta, results)


class _CheckedWeights:
    """A weight source that makes the cache's model check before each weight is read, as soon as
    the fingerprint hashed in the background is known (Evaluation's class doc)."""

    def __init__(self, source, check: Callable[..., None]):
        self._source, self._check = source, check

    def __getattr__(self, name: str):
        return getattr(self._source, name)

    def get(self, target: Target, device, *args, **kw):
        self._check(wait=False)
        return self._source.get(target, device, *args, **kw)


def require_finite(results: Results, spec: EvalSpec) -> None:
    """The CLI's verdict on non-finite metrics: an error naming the first one, no report (pytest
    fails the case instead: verdict.thresholds.Thresholds.check, from the same numerics.metrics.nonfinite_metrics)."""
    from tokenwise_harness.numerics.metrics import NONFINITE_WHY, nonfinite_metrics

    source = next((spec.flag(name) for name in ("quantizer", "weight_quantizer") if getattr(spec, name)),
                  spec.model_flag)
    for (layer, block, proj), by_cfg in sorted(results.items()):
        for cfg, metrics in by_cfg.items():
            bad = nonfinite_metrics(metrics)
            if bad:
                metric, shown = next(iter(bad.items()))
                raise HarnessError(f"model.layers.{layer}.{block}.{proj} {cfg}: {metric} = {shown} is not a finite "
                                   f"number ({NONFINITE_WHY}); no report written: check {source}")


def _reuse_line() -> str:
    """What this process hashed and decomposed, and what it reused (memo.py): one log phrase."""
    from tokenwise_harness import memo
    from tokenwise_harness.numerics.lowrank import COUNTS

    c = memo.COUNTERS
    return (f"weight bytes hashed {c['bytes_hashed']}, digests reused {c['digest_memo_hits']}, "
            f"eigendecompositions {COUNTS['eigh']}, factors reused {c['lowrank_hits']}")


def _smooth_meta(mdir: ModelDir) -> dict | None:
    if not (mdir.path / SMOOTH_META_FILE).is_file():
        return None
    data = _read_smooth_meta(mdir)
    return {k: v for k, v in data.items() if k in ("alpha", "formula", "alphas", "source_model_fingerprint")}


def _read_smooth_meta(mdir: ModelDir) -> dict:
    path = mdir.path / SMOOTH_META_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HarnessError(f"{mdir.flag} {mdir.path}: {SMOOTH_META_FILE} is unreadable ({exc}); "
                           "re-create the dir with `tokenwise-precision smooth`") from None
    if not isinstance(data, dict):
        raise HarnessError(f"{mdir.flag} {mdir.path}: {SMOOTH_META_FILE} is not a JSON object; "
                           "re-create the dir with `tokenwise-precision smooth`")
    return data
