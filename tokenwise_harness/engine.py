"""The evaluation engine: every config of a grid, one weight at a time (seed §2, §3).

For a projection with cached input X, cached output Y, weight W and bias b, a config's
fake-quantized weight W~ gives Y~ = X W~ᵀ + b. The engine forms the error directly:

    E = Y~ - Y = X ΔWᵀ + r,    ΔW = W~ - W,    r = X Wᵀ + b - Y

r is the cached Y's own rounding (zero when Y is not cached and is recomputed): one term per
weight and chunk, shared by every config. Computing E as X ΔWᵀ never subtracts two nearly
equal large tensors, which is what loses the error's digits in low precision.

With smoothing (eval_smooth) the stored weight is already W·diag(s) and X is divided by s.

Walk order: input group by input group (weights read from the checkpoint's safetensors
shards, no model is instantiated), one low-rank decomposition per weight shared by every
rank, and all ΔW of the group's weights and configs resident together while the X chunks
stream past. The weights that read the same input (q/k/v, gate/up) read one cached X --
stored once in the compact layout, or in the seed layout stored per weight under one checksum
(cache.XYCache._same_x) -- so X is read once per group. Everything per weight -- the reference X·Wᵀ + b - Y,
each error term, X / s for its smooth factor -- is computed as in a pass of its own, so the
numbers do not depend on the grouping.

Decompositions are never redone: a checkpoint weight's factors are kept in a content-keyed
store (memo.LowRankStore under the model dir's cache root: keyed by the weight's and
smoothing's content ids, the rank and iters), so a rerun on unchanged weights does no eigendecomposition. On CUDA the next weights
are read and decomposed (or loaded from the store) on worker threads with their own CUDA
streams while X streams for the current one.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from tokenwise_harness.allowlist import Target, iter_allowed_linears
from tokenwise_harness.cache import XYCache
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import SvdqConfig
from tokenwise_harness.numerics.metrics import TokenwiseAccumulator

# All ΔW of a pass over X (an input group's weights x their configs) stay resident while X
# streams; past this many bytes the pass is split and X is streamed once per part (pass_plan).
DELTA_BUDGET_BYTES = 2 << 30


@dataclass
class WeightTriple:
    weight: "object"  # float32 [out, in] on the compute device
    bias: "object | None"
    smooth: "object | None"  # [in] or None
    native: "object | None" = None  # the same weight in the checkpoint's dtype (what a weight-level kernel gets)

    @property
    def stored(self):
        return self.weight if self.native is None else self.native


@dataclass
class EngineStats:
    weights: int = 0
    configs: int = 0
    decompositions: int = 0  # computed here (eigendecompositions)
    decompositions_loaded: int = 0  # served by the low-rank store
    seconds_decompose: float = 0.0
    seconds_quantize: float = 0.0
    seconds_error: float = 0.0
    error_flops: int = 0


class CheckpointWeights:
    """Weights straight from a model dir's safetensors shards."""

    def __init__(self, model_dir, smooth: bool):
        self.model_dir = model_dir
        self.smooth = smooth

    def targets(self) -> list[Target]:
        return self.model_dir.targets()

    @cached_property
    def lowrank_store(self):
        """The low-rank store under the model dir's cache root (beside its digest memo, whose
        digests key it); None with TOKENWISE_NO_MEMO."""
        from tokenwise_harness import memo

        return memo.LowRankStore(self.model_dir.cache_root) if memo.enabled() else None

    def content_id(self, target: Target) -> tuple[str, str | None] | None:
        """(weight id, smoothing id): what the weight's low-rank factors depend on (memo keys).
        None when either is not known (absent, or its file's digest still hashing)."""
        weight_id = self.model_dir.tensor_id(target.path + ".weight")
        if weight_id is None:
            return None
        if not self.smooth:
            return weight_id, None
        smooth_id = self.model_dir.tensor_id(target.path + ".smooth_factor")
        return None if smooth_id is None else (weight_id, smooth_id)

    def store_later(self, target: Target, rank: int, tensors: dict, store) -> None:
        """Put factors decomposed before the weight's content id was known (its file's digest
        still hashing beside the engine) into the store once the fingerprint is known."""
        from tokenwise_harness import memo

        host = {k: v.detach().to("cpu") for k, v in tensors.items()}

        def put():
            ids = self.content_id(target)
            if ids is not None:
                store.put(memo.lowrank_key(ids[0], ids[1], rank), host)

        self.model_dir.when_fingerprinted(put)

    def get(self, target: Target, device) -> WeightTriple:
        import torch

        on = device if str(device).startswith("cuda") else "cpu"  # straight to the GPU, no host copy kept
        w = self.model_dir.read(target.path + ".weight", on)
        b = self.model_dir.read(target.path + ".bias", on)
        s = self.model_dir.read(target.path + ".smooth_factor", on) if self.smooth else None
        if self.smooth and s is None:
            raise HarnessError(f"{target.path} has no smooth_factor buffer; create the smoothed model with "
                               "`tokenwise-precision smooth`")
        conv = lambda t: None if t is None else t.to(device=device, dtype=torch.float32)  # noqa: E731
        native = w.to(device=device)
        return WeightTriple(native.to(torch.float32), conv(b), conv(s), native)


class ModuleWeights:
    """Weights of an instantiated model (a .bin checkpoint, or a user's model-level fake_op)."""

    def __init__(self, model, smooth: bool):
        self.modules = dict(iter_allowed_linears(model))
        self.smooth = smooth

    def targets(self) -> list[Target]:
        return sorted(self.modules, key=Target.sort_key)

    def content_id(self, target: Target) -> None:
        return None  # an instantiated model's tensors have no file identity: nothing is stored

    def get(self, target: Target, device, weight=None) -> WeightTriple:
        import torch

        mod = self.modules[target]
        s = getattr(mod, "smooth_factor", None) if self.smooth else None
        if self.smooth and s is None:
            raise HarnessError(f"{target.path} has no smooth_factor buffer")
        conv = lambda t: None if t is None else t.detach().to(device=device, dtype=torch.float32)  # noqa: E731
        native = (mod.weight if weight is None else weight).detach().to(device=device)
        return WeightTriple(native.to(torch.float32), conv(mod.bias), conv(s), native)


def check_alignment(cache: XYCache, targets: list[Target], model_flag: str,
                    layers: Iterable[int] | None = None) -> list[Target]:
    """The targets both sides hold; a projection on one side only is an error.
    `layers`: the decoder layers the model side holds (None: all); the cache's others are not compared."""
    layers = None if layers is None else set(layers)
    in_cache = {t for t in cache.targets if layers is None or t.layer in layers}
    in_model = set(targets)
    if in_model - in_cache:
        missing = sorted(in_model - in_cache, key=Target.sort_key)[0]
        raise HarnessError(f"{cache.flag} {cache.path} lacks key {missing.path}.X that {model_flag} has; "
                           "the cache is from another model or incomplete: re-run save_xy")
    if in_cache - in_model:
        extra = sorted(in_cache - in_model, key=Target.sort_key)[0]
        raise HarnessError(f"{cache.flag} {cache.path} holds {extra.path}.X but {model_flag} has no such "
                           "projection; the cache is from another model")
    return sorted(in_model, key=Target.sort_key)


def check_ranks(grid: Iterable[SvdqConfig], target: Target, weight_shape) -> None:
    limit = min(weight_shape)
    for cfg in grid:
        if cfg.rank > limit:
            raise HarnessError(f"--ranks: rank {cfg.rank} exceeds min(out, in) = {limit} of {target.path}")


@dataclass
class ConfigTerm:
    """What one config contributes to the error of one projection.

    dw: ΔW = W~ - W.  For W4A4 configs also act = (afmt, ablk) and qr = Q_w(R), the quantized
    residual that multiplies the quantized activations: E gains (Q_a(X) - X)·Q_w(R)ᵀ.
    """

    dw: "object"
    act: tuple | None = None
    qr: "object | None" = None


class ErrorMatmul:
    """X·Mᵀ for the error terms, at the precision the metrics need.

    On CUDA with a 16-bit cache, X is used in its storage dtype (exact: the cache holds
    exactly those values) and M is scaled by a power of two into that dtype's range and
    rounded once; products accumulate in float32 (out_dtype) and are scaled back exactly.
    The only rounding is M's last bit (2^-11 relative for fp16), which perturbs the SSE by
    a few 1e-5 relative on real weights, up to ~1e-4 when a few outlier input channels
    dominate XᵀX (1.14e-4 measured on the demo model's layer-0 v_proj), never more than about
    2·2^-11: far below any difference a grid resolves, at the tensor-core rate. On the CPU, or
    with an fp32 cache, everything stays float32.
    """

    def __init__(self, device, x_dtype):
        import torch

        self.low = x_dtype if (str(device).startswith("cuda") and x_dtype in (torch.float16, torch.bfloat16)) else None

    def prepare(self, m):
        """M (float32) -> (operand, scale back)."""
        return self.prepare_all([m])[0]

    def prepare_all(self, ms: list) -> list:
        """prepare() of each M, with one wait for the GPU for all of them (a weight's configs):
        each scale is a power of two chosen on the host from max |M|."""
        import torch

        if self.low is None:
            return [(m, 1.0) for m in ms]
        # max |m| in one pass each, no |m| temporary; read back together
        amaxes = torch.stack([torch.linalg.vector_norm(m, ord=math.inf) for m in ms]).tolist() if ms else []
        return [self._scaled(m, amax) for m, amax in zip(ms, amaxes)]

    def _scaled(self, m, amax: float):
        if amax == 0.0 or not math.isfinite(amax):
            return m.to(self.low), 1.0
        shift = math.floor(math.log2(8192.0 / amax))  # largest |entry| lands in [2^12, 2^13)
        return (m * 2.0**shift).to(self.low), 2.0**-shift

    def split(self, m):
        """M (float32) as a list of prepared operands whose products sum to X·Mᵀ at about float32
        accuracy: on the 16-bit path M = hi + lo, two tensor-core GEMMs with ~22 significant
        bits instead of one float32 GEMM at a tenth of the rate; else [M] itself."""
        if self.low is None:
            return [(m, 1.0)]
        hi, scale = self.prepare(m)
        lo = (m * (1.0 / scale) - hi.float()).to(self.low)  # the part fp16 rounding of M lost
        return [(hi, scale), (lo, scale)]

    def raw(self, x_operand, m_operand):
        """(X·Mᵀ before its power-of-two scale, that scale): the caller folds the scale in later."""
        import torch

        (x, x_scale), (m, m_scale) = x_operand, m_operand
        if self.low is None:
            return x @ m.T, x_scale * m_scale
        try:
            return torch.mm(x, m.T, out_dtype=torch.float32), x_scale * m_scale
        except (RuntimeError, TypeError):  # a torch without mm's out_dtype
            return (x @ m.T).float(), x_scale * m_scale

    def __call__(self, x_operand, m_operand, add=None):
        """X·Mᵀ (+ add) in float32 from two prepared operands (one fused GEMM when it can)."""
        import torch

        (x, _), (m, _) = x_operand, m_operand
        scale = x_operand[1] * m_operand[1]
        if add is not None and self.low is not None:
            try:
                return torch.addmm(add, x, m.T, beta=1.0, alpha=scale, out_dtype=torch.float32)
            except (RuntimeError, TypeError):  # a torch without addmm's out_dtype
                pass
        out, scale = self.raw(x_operand, m_operand)
        if scale != 1.0:
            out.mul_(scale)
        return out.add_(add) if add is not None else out


def check_dims(cache: XYCache, target: Target, weight) -> None:
    entry = cache.entry(target)
    if entry.in_dim != weight.shape[1] or (entry.out_dim is not None and entry.out_dim != weight.shape[0]):
        raise HarnessError(f"{cache.flag} {cache.path}: {target.path} X/Y dims ({entry.in_dim}, {entry.out_dim}) "
                           f"do not match the weight {tuple(weight.shape)}; the cache is from another model")


@dataclass
class Member:
    """One weight of a pass over X: its target, weights and config terms (cfg key -> ConfigTerm, or a bare W~)."""

    target: Target
    triple: WeightTriple
    terms: dict


def evaluate_weight(cache: XYCache, target: Target, triple: WeightTriple, terms: dict[str, "ConfigTerm | object"],
                    chunk_tokens: int, device, stats: "EngineStats | None" = None) -> dict[str, dict]:
    """Metrics of every config in `terms` (cfg key -> ConfigTerm, or a bare W~) for one projection."""
    check_dims(cache, target, triple.weight)
    return evaluate_weights(cache, [Member(target, triple, terms)], chunk_tokens, device, stats)[target]


def evaluate_weights(cache: XYCache, members: list[Member], chunk_tokens: int, device,
                     stats: "EngineStats | None" = None, chunks=None) -> dict[Target, dict[str, dict]]:
    """Metrics of every member's configs from one pass over the cached X they all read.

    Members share X (q/k/v or gate/up, or a weight alone: cache.CacheEntry.x_key): it is
    read, converted and (per distinct smooth factor) divided once per chunk. The reference
    term, Y and every error term stay per weight, with the arithmetic of a pass of its own,
    so the numbers are bit-identical to scoring each weight alone. `chunks`: (start, end,
    [X, each member's Y]) to score instead of the cache's stream (first_launches' random chunk).
    """
    x_key = cache.entry(members[0].target).x_key
    if any(cache.entry(m.target).x_key != x_key for m in members):
        raise ValueError("evaluate_weights: the members read different cached X tensors")
    mm = ErrorMatmul(device, cache.torch_dtype(x_key))
    scores = [_WeightScore(cache, m, mm, device) for m in members]
    same_s = _distinct_smooth([m.triple.smooth for m in members])
    finite = _FiniteWatch(cache)
    if chunks is None:
        chunks = cache.stream([x_key, *(s.y_key for s in scores)], chunk_tokens, device)
    for start, end, (x_stored, *ys) in chunks:
        finite.watch(x_stored, x_key)
        views: dict[int, _ChunkX] = {}  # first member with this smooth factor -> its view of the chunk
        for i, (score, y_stored) in enumerate(zip(scores, ys)):
            first = same_s[i]
            if first not in views:
                views[first] = _ChunkX(x_stored, members[first].triple.smooth, mm, finite, x_key)
            score.update(views[first], y_stored, end - start, stats, finite)
    finite.check()
    return {score.target: score.result() for score in scores}


def _distinct_smooth(factors: list) -> list[int]:
    """For each smooth factor, the index of the first equal one: X / s is then computed once per
    distinct s. The built-in smoothing gives siblings one s, but a smoothed model dir made
    elsewhere need not, so equality is checked, not assumed."""
    import torch

    firsts = []
    for i, s in enumerate(factors):
        firsts.append(next((j for j in firsts if (factors[j] is None) == (s is None)
                            and (s is None or torch.equal(factors[j], s))), i))
    return firsts


class _ChunkX:
    """One chunk of X as the weights dividing it by one smooth factor s (or by none) see it.

    Built lazily and shared by those weights: X in float32, X / s, its 16-bit GEMM operand
    and each activation format's Q_a(X) - X are made at most once per chunk.
    """

    def __init__(self, stored, s, mm: ErrorMatmul, finite: "_FiniteWatch", key: str):
        self.stored, self.s, self.mm, self.finite, self.key = stored, s, mm, finite, key
        # The cache's own 16-bit values are exact operands; a smoothed X/s is rounded once.
        self.exact = mm.low is not None and s is None
        self._act_errors: dict = {}

    @cached_property
    def x(self):
        x = self.stored.float()
        if self.s is not None:
            x = x / self.s
            self.finite.watch(x, self.key)
        return x

    @cached_property
    def op(self):
        return (self.stored, 1.0) if self.exact else self.mm.prepare(self.x)

    def act_error(self, act: tuple, name: str):
        """Q_a(X) - X for one activation spec (afmt, ablk), prepared as a GEMM operand."""
        from tokenwise_harness.numerics import formats

        if act not in self._act_errors:
            self.finite.check()  # a non-finite X is reported as such, not as the activation format's refusal
            q_x = formats.fake_quantize(self.x, act[0], act[1], name=name)
            self._act_errors[act] = self.mm.prepare(q_x - self.x)
        return self._act_errors[act]


class _WeightScore:
    """One weight's part of a pass over X: its reference term, error terms and accumulators."""

    def __init__(self, cache: XYCache, member: Member, mm: ErrorMatmul, device):
        import torch

        entry = cache.entry(member.target)
        self.cache, self.target, self.x_key, self.y_key = cache, member.target, entry.x_key, entry.y_key
        self.mm, self.triple = mm, member.triple
        w = member.triple.weight
        self.terms = {k: t if isinstance(t, ConfigTerm) else ConfigTerm(t.to(device=device, dtype=torch.float32) - w)
                      for k, t in member.terms.items()}
        residual_keys = [k for k, t in self.terms.items() if t.qr is not None]
        prepared = iter(mm.prepare_all([t.dw for t in self.terms.values()]
                                       + [self.terms[k].qr for k in residual_keys]))
        dws = {k: next(prepared) for k in self.terms}
        qrs = {k: next(prepared) for k in residual_keys}
        self.operands = {k: (dws[k], qrs.get(k)) for k in self.terms}
        self.accs = {key: TokenwiseAccumulator() for key in self.terms}
        # On the exact 16-bit path the reference X·Wᵀ runs as two 16-bit GEMMs (W = hi + lo)
        # instead of float32.
        self.w_parts = mm.split(w) if (mm.low is not None and member.triple.smooth is None) else None

    def reference(self, chunk: _ChunkX):
        """X·Wᵀ + b of this chunk."""
        import torch

        w, b, mm = self.triple.weight, self.triple.bias, self.mm
        if chunk.exact:
            ref = mm(chunk.op, self.w_parts[0])
            for part in self.w_parts[1:]:
                ref = mm(chunk.op, part, add=ref)
            return ref.add_(b) if b is not None else ref
        return torch.addmm(b, chunk.x, w.T) if b is not None else chunk.x @ w.T

    def update(self, chunk: _ChunkX, y_stored, n_tokens: int, stats: "EngineStats | None",
               finite: "_FiniteWatch") -> None:
        import torch

        mm, x_op = self.mm, chunk.op
        ref = self.reference(chunk)
        if y_stored is not None:
            y = y_stored.float()
            finite.watch(y, self.y_key)
            resid = ref - y
        else:
            y, resid = ref, None
        y_sq = torch.linalg.vector_norm(y, dim=1).square_()
        for key, term in self.terms.items():
            if term.act is None and resid is None:
                err, scale = mm.raw(x_op, self.operands[key][0])  # the scale is folded into the metrics
                self.accs[key].update(err, y_sq, scale)
                continue
            if term.act is None:
                self.accs[key].update(mm(x_op, self.operands[key][0], add=resid), y_sq)
                continue
            err = mm(x_op, self.operands[key][0])
            err += mm(chunk.act_error(term.act, self.x_key), self.operands[key][1])
            if resid is not None:
                err += resid
            self.accs[key].update(err, y_sq)
        if stats is not None:
            w = self.triple.weight
            stats.error_flops += 2 * n_tokens * w.shape[0] * w.shape[1] * (
                len(self.terms) + sum(t.act is not None for t in self.terms.values()))

    def result(self) -> dict[str, dict]:
        return {key: acc.result() for key, acc in self.accs.items()}


class _FiniteWatch:
    """NaN/Inf checks of the X and Y chunks of one pass, read back once, at its end (or before X
    is quantized as an activation): a check per chunk was a wait for the GPU per chunk and weight.
    A non-finite tensor fails the pass with the same error either way; its scores are dropped."""

    def __init__(self, cache: XYCache):
        self.cache = cache
        self.bad: dict = {}  # key -> device bool: a non-finite value seen in it so far

    def watch(self, t, key: str) -> None:
        import torch

        bad = ~torch.isfinite(t).all()
        self.bad[key] = bad if key not in self.bad else self.bad[key] | bad

    def check(self) -> None:
        import torch

        if not self.bad:
            return
        keys = list(self.bad)
        flags = torch.stack([self.bad[k] for k in keys]).tolist()
        for key, bad in zip(keys, flags):
            if bad:
                self.cache.verify_tensor(key)  # a flipped bit can make a NaN: report corruption as corruption
                raise HarnessError(f"{self.cache.flag} {self.cache.path}: {key} holds NaN/Inf activations; "
                                   "re-capture with --save_dtype fp32")


def delta_budget(device=None) -> int:
    """Bytes the resident ΔW of one pass over X may take: DELTA_BUDGET_BYTES, or on CUDA a
    quarter of the device's free memory when that is more."""
    budget = DELTA_BUDGET_BYTES
    if device is not None and str(device).startswith("cuda"):
        import torch

        budget = max(budget, torch.cuda.mem_get_info(torch.device(device))[0] // 4)
    return budget


def pass_plan(work: list[tuple[Target, int, list[SvdqConfig]]], device=None) -> list[dict[Target, list[SvdqConfig]]]:
    """Split one input group's work -- (target, weight numel, its configs) -- into passes over X.

    One pass holds the ΔW of every (weight, config) in it while X streams past, so X is read
    once per pass. When a group's ΔW do not fit delta_budget together, the group is split
    (config by config, in target order) and X is streamed once per pass: re-reading X costs
    I/O, holding more ΔW than memory holds fails the run. A group of one reduces to splitting
    that weight's configs.
    """
    budget = delta_budget(device)
    passes, used = [{}], 0
    for target, numel, cfgs in work:
        cost = 6 * max(1, numel)  # fp32 ΔW + its 16-bit GEMM operand
        for cfg in cfgs:
            if used and used + cost > budget:
                passes.append({})
                used = 0
            passes[-1].setdefault(target, []).append(cfg)
            used += cost
    return [p for p in passes if p]


def evaluate_grid(cache: XYCache, source, grid: list[SvdqConfig], chunk_tokens: int, device,
                  targets: list[Target] | None = None, progress: bool = True,
                  stats: EngineStats | None = None, quantize_fn: Callable | None = None) -> dict:
    """{(layer, block, proj): {cfg key: metrics}} of the whole grid on every target (default: all of them).

    quantize_fn: the built-in numerics.svdq.fake_quantize_weight by default, called as
    quantize_fn(w_float32, cfg, lowrank=, name=). A weight-level kernel (kernels.WeightKernel,
    `weight_level = True`) is called instead as kernel(w_in_checkpoint_dtype, cfg, name=) once per
    (target, config), and the engine's own decomposition is skipped.
    """
    targets = targets if targets is not None else check_alignment(cache, source.targets(), "the model")
    return evaluate_plan(cache, source, {t: list(grid) for t in targets}, chunk_tokens, device, progress, stats,
                         quantize_fn)


def evaluate_plan(cache: XYCache, source, plan: dict[Target, list[SvdqConfig]], chunk_tokens: int, device,
                  progress: bool = True, stats: EngineStats | None = None, quantize_fn: Callable | None = None,
                  failed: dict | None = None) -> dict:
    """{(layer, block, proj): {cfg key: metrics}} of each target's own configs in `plan`.

    Consecutive targets whose cached X is one tensor (q/k/v, gate/up: cache.CacheEntry.x_key) are
    scored in one pass over it (evaluate_weights): X is read once per input group, not once
    per weight. quantize_fn: as in evaluate_grid.

    failed: when given (the pytest plugin), an error that belongs to one weight -- its ranks,
    its values, its kernel's output -- is recorded as failed[target] = message and the other
    weights are still scored; an error during a pass over X (a corrupt or non-finite X) fails
    every weight of that pass. Without it the first error propagates (the CLI: no report).
    """
    from tqdm import tqdm

    from tokenwise_harness.calib import search as calibrate
    from tokenwise_harness.numerics import svdq

    walk = _Walk(cache, plan, chunk_tokens, device, stats if stats is not None else EngineStats(),
                 quantize_fn or svdq.fake_quantize_weight, failed)
    configs = {cfg for cfgs in plan.values() for cfg in cfgs}
    # Iterated low-rank configs (iters > 1) score their iterates on the cached inputs: H = XᵀX.
    grams = calibrate.GramCache(cache, chunk_tokens, device) if any(c.iters > 1 for c in configs) else None
    max_rank = 0 if walk.weight_level else max((c.rank for c in configs), default=0)  # a kernel: no decomposition
    targets = sorted(plan, key=Target.sort_key)
    cache.reserve_for(targets, chunk_tokens)  # the pinned arena, sized once for the widest input group
    if walk.quantize_fn is svdq.fake_quantize_weight and str(device).startswith("cuda"):
        from tokenwise_harness.numerics import fused_delta

        # Triton's per-process start-up overlaps the weight reads and decompositions below.
        fused_delta.warm_up(device, sorted({(c.fmt, c.blk) for c in configs if c.fmt != "none"}, key=str))
    def while_first_weights_read():  # on this thread, which would only wait for them
        cache.allocate_arena(device)  # page-locked now, not when X first streams
        if walk.quantize_fn is svdq.fake_quantize_weight and targets and str(device).startswith("cuda"):
            first_launches(cache, targets[0], plan[targets[0]], chunk_tokens, device)

    prepared = prepare_weights(source, {t: plan[t] for t in targets}, device, max_rank, walk.stats,
                               while_waiting=while_first_weights_read)
    bar = tqdm(total=len(targets), desc="eval", unit="proj", disable=not progress)
    try:
        for group in _shared_x_runs(cache, prepared):
            walk.score_group(group, grams)
            bar.update(len(group))
    finally:
        prepared.close()
        bar.close()
    walk.stats.configs = len(configs)
    return {(t.layer, t.block, t.proj): {cfg.key: walk.metrics[t][cfg.key] for cfg in plan[t]}
            for t in targets if t in walk.metrics}


def first_launches(cache: XYCache, target: Target, configs: list[SvdqConfig], chunk_tokens: int, device) -> None:
    """Score one chunk of random data of `target`'s shapes with its one-shot configs, through the
    engine's own functions, and drop the numbers (nothing when the cache has no Y to size W).

    A CUDA kernel's first launch in a process loads it (lazy module loading), and cuBLAS loads
    its GEMM kernels at their first call: on the H200 the first input group's main-thread work
    took ~0.5 s longer than a later group's for it. evaluate_plan runs this while the prepare
    workers read the first weights, when this thread would only wait. It changes no state the
    scoring reads (its tensors are its own), so the report is the same with or without it."""
    import torch

    from tokenwise_harness.numerics import svdq
    from tokenwise_harness.numerics.lowrank import LowRank

    entry = cache.entry(target)
    configs = [c for c in configs if c.iters == 1]
    if entry.out_dim is None or not configs:
        return
    rows = min(chunk_tokens, cache.n_tokens)
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(entry.out_dim, entry.in_dim, device=device, generator=gen) * 0.02
    rank = min(max(c.rank for c in configs), *w.shape)
    lowrank = LowRank.from_factors(w[:, :rank].clone(), w[:rank].clone(), torch.ones(rank, device=device))
    triple = WeightTriple(w, None, None)
    terms = {c.key: config_term(triple, c, lowrank, svdq.fake_quantize_weight, "first launches") for c in configs}
    x = torch.randn(rows, entry.in_dim, device=device, generator=gen).to(cache.torch_dtype(entry.x_key))
    y = torch.randn(rows, entry.out_dim, device=device, generator=gen).to(cache.torch_dtype(entry.y_key)) \
        if entry.y_key is not None else None
    evaluate_weights(cache, [Member(target, triple, terms)], rows, device, chunks=[(0, rows, [x, y])])


def _shared_x_runs(cache: XYCache, prepared):
    """Consecutive prepared weights that read one cached X tensor, as lists. Targets come in
    forward order, so siblings sharing an input (q/k/v, gate/up) are adjacent."""
    run: list = []
    for item in prepared:
        if run and cache.entry(item.target).x_key != cache.entry(run[0].target).x_key:
            yield run
            run = []
        run.append(item)
    if run:
        yield run


class _Walk:
    """evaluate_plan's state: per-target metrics so far, the stats, and where errors go."""

    def __init__(self, cache, plan, chunk_tokens, device, stats: EngineStats, quantize_fn, failed):
        self.cache, self.plan, self.chunk_tokens, self.device = cache, plan, chunk_tokens, device
        self.stats, self.quantize_fn, self.failed = stats, quantize_fn, failed
        self.weight_level = getattr(quantize_fn, "weight_level", False)
        self.metrics: dict[Target, dict] = {}
        self.dropped: set[Target] = set()  # failed: not scored in a later pass of its group

    def fail(self, target: Target, exc: HarnessError) -> None:
        if self.failed is None:
            raise exc
        self.failed[target] = str(exc)
        self.dropped.add(target)
        self.metrics.pop(target, None)

    def score_group(self, group: list, grams) -> None:
        """Every weight of one input group: one pass over its X, or more when the ΔW do not fit."""
        ready = {}
        for item in group:
            if item.error is not None:
                self.fail(item.target, item.error)
                continue
            gram = None  # H of the weight's inputs, for its iterated configs (config_term)
            if grams is not None and not self.weight_level:
                t1 = _now(self.device)
                gram = grams.get(item.target, item.triple.smooth)
                self.stats.seconds_decompose += _now(self.device) - t1
            ready[item.target] = (item, gram)
        work = [(t, item.triple.weight.numel(), self.plan[t]) for t, (item, _) in ready.items()]
        for one_pass in pass_plan(work, self.device):
            self.score_pass({t: ready[t] for t in one_pass if t not in self.dropped}, one_pass)
        self.stats.weights += sum(t in self.metrics for t in ready)

    def score_pass(self, ready: dict, one_pass: dict[Target, list[SvdqConfig]]) -> None:
        t2 = _now(self.device)
        members = []
        for target, (item, gram) in ready.items():
            try:
                check_dims(self.cache, target, item.triple.weight)
                terms = {cfg.key: config_term(item.triple, cfg, item.lowrank, self.quantize_fn, target.path, gram)
                         for cfg in one_pass[target]}
            except HarnessError as exc:
                self.fail(target, exc)
                continue
            members.append(Member(target, item.triple, terms))
        t3 = _now(self.device)
        self.stats.seconds_quantize += t3 - t2
        if not members:
            return
        try:
            got = evaluate_weights(self.cache, members, self.chunk_tokens, self.device, self.stats)
        except HarnessError as exc:
            for m in members:
                self.fail(m.target, exc)
            return
        finally:
            self.stats.seconds_error += _now(self.device) - t3
        for target, metrics in got.items():
            self.metrics.setdefault(target, {}).update(metrics)


# Weights read and decomposed ahead of the one being scored (CUDA only: one worker thread and
# CUDA stream each; a float64 eigh is latency-bound, so several run side by side). On the CPU
# everything stays in order on the caller's thread, so results never depend on scheduling.
PREFETCH_DEPTH = 4


class Prepared(NamedTuple):
    """A weight ready to score, or the error that made it unusable (error set, the rest None)."""

    target: Target
    triple: WeightTriple | None
    lowrank: object | None = None
    error: HarnessError | None = None


def prepare_weights(source, plan: dict[Target, list[SvdqConfig]], device, max_rank: int,
                    stats: EngineStats, store=None, while_waiting: Callable | None = None):
    """Yield a Prepared for each target of `plan` (target -> its configs), in the plan's order.

    A weight that cannot be scored (ranks above its size, NaN/Inf values, no smooth factor)
    comes as its error, so the caller decides whether it ends the run or only that weight.
    Each weight's factors come from the low-rank store when it holds them, else from one exact
    decomposition that is then stored. On CUDA, up to PREFETCH_DEPTH weights ahead are read and
    decomposed on worker threads, each on its own CUDA stream, overlapping the caller's
    streaming of X for the current input group. `while_waiting()` runs on the caller's thread
    once the first weights are being read, before it waits for the first (on the CPU: first).
    """
    import torch

    if store is None:  # a checkpoint's weights: the store under its cache root
        store = getattr(source, "lowrank_store", None)

    targets = list(plan)

    def prepare(target, stream=None):
        try:
            triple = source.get(target, device)
            check_ranks(plan[target], target, triple.weight.shape)
            _check_weight_finite(triple, target)
        except HarnessError as exc:
            return Prepared(target, None, error=exc), None, 0.0
        t0 = time.perf_counter()
        lowrank, computed = _lowrank(source, target, triple, max_rank, store, device)
        if stream is not None:
            stream.synchronize()
        return Prepared(target, triple, lowrank), computed, time.perf_counter() - t0

    def account(computed, seconds):
        stats.decompositions += computed is True
        stats.decompositions_loaded += computed is False
        stats.seconds_decompose += seconds

    if not str(device).startswith("cuda") or len(targets) < 2:
        if while_waiting is not None:
            while_waiting()
        for target in targets:
            item, computed, seconds = prepare(target)
            account(computed, seconds)
            yield item
        return

    from concurrent.futures import ThreadPoolExecutor

    dev = torch.device(device)
    main = torch.cuda.current_stream(dev)
    if any(cfg.iters > 1 for cfgs in plan.values() for cfg in cfgs):
        _start_linalg(dev)  # iterated configs call linalg on this thread, beside the workers' decompositions
    streams = [torch.cuda.Stream(dev) for _ in range(PREFETCH_DEPTH)]

    def on_worker(i, target):
        with torch.cuda.device(dev), torch.cuda.stream(streams[i % PREFETCH_DEPTH]):
            return prepare(target, streams[i % PREFETCH_DEPTH])

    pool = ThreadPoolExecutor(max_workers=PREFETCH_DEPTH, thread_name_prefix="tokenwise-prepare")
    pending = {}
    try:
        for i in range(min(PREFETCH_DEPTH, len(targets))):
            pending[i] = pool.submit(on_worker, i, targets[i])
        if while_waiting is not None:
            while_waiting()
        for i in range(len(targets)):
            item, computed, seconds = pending.pop(i).result()
            triple, lowrank = item.triple, item.lowrank
            for t in (*((triple.weight, triple.native, triple.bias, triple.smooth) if triple is not None else ()),
                      *(lowrank.tensors().values() if lowrank is not None else ())):
                if t is not None:
                    t.record_stream(main)  # made on a worker's stream, used (and freed) on this one
            account(computed, seconds)
            if i + PREFETCH_DEPTH < len(targets):
                pending[i + PREFETCH_DEPTH] = pool.submit(on_worker, i + PREFETCH_DEPTH, targets[i + PREFETCH_DEPTH])
            yield item
    finally:
        for f in pending.values():
            f.cancel()
        pool.shutdown(wait=True)


def _lowrank(source, target: Target, triple: WeightTriple, max_rank: int, store, device):
    """(LowRank | None, computed?): from the store when it holds this weight's factors."""
    from tokenwise_harness import memo
    from tokenwise_harness.numerics.lowrank import LowRank

    if max_rank <= 0:
        return None, None
    rank = min(max_rank, *triple.weight.shape)
    content_id = getattr(source, "content_id", None)  # a caller's own weight source may have none
    ids = content_id(target) if (store is not None and content_id is not None) else None
    key = memo.lowrank_key(ids[0], ids[1], rank) if ids is not None else None
    if key is not None:
        factors = store.get(key, device)
        if factors is not None and tuple(factors["L1"].shape) == (triple.weight.shape[0], rank) \
                and tuple(factors["L2"].shape) == (rank, triple.weight.shape[1]):
            return LowRank.from_factors(factors["L1"], factors["L2"], factors["S"]), False
    _start_linalg(triple.weight.device)
    lowrank = LowRank(triple.weight, max_rank)
    if key is not None:
        store.put(key, lowrank.tensors())
    elif store is not None and hasattr(source, "store_later"):  # the content id is not known yet
        source.store_later(target, rank, lowrank.tensors(), store)
    return lowrank, True


_LINALG_LOCK = threading.Lock()
_linalg_started = False


def _start_linalg(device) -> None:
    """Start CUDA linalg (cuSOLVER) with one tiny eigh, once per process, under a lock.

    torch starts it lazily at the first linalg call, and that start is not thread-safe ("lazy
    wrapper should be called at most once"), so the first decomposition -- on whichever prepare
    worker comes first -- makes it here before any other can start one. A rerun whose factors
    all come from the low-rank store never loads the library (its start and its resident pages)."""
    global _linalg_started
    if _linalg_started or not str(device).startswith("cuda"):
        return
    with _LINALG_LOCK:
        if not _linalg_started:
            import torch

            torch.linalg.eigh(torch.eye(2, dtype=torch.float64, device=device))
            _linalg_started = True


def config_term(triple: WeightTriple, cfg: SvdqConfig, lowrank, quantize_fn: Callable, name: str,
                gram=None) -> ConfigTerm:
    """ΔW of one config (and, for W4A4, Q_w(R): the residual branch the quantized X multiplies).

    The built-in quantizer's weights-only configs, one-shot or iterated, take
    svdq.quantization_delta (fused on CUDA). Otherwise a tensor-level quantize_fn returns W~
    (float32); a weight-level kernel returns its checked output, W~ or SvdqParts (the residual
    branch read off the parts). `gram`: H = XᵀX of the weight's (smoothed) inputs, which
    iterated configs (iters > 1) of a tensor-level quantizer are given (svdq.with_gram).
    """
    from tokenwise_harness.kernels.protocol import SvdqParts
    from tokenwise_harness.numerics import svdq

    w = triple.weight
    if quantize_fn is svdq.fake_quantize_weight and cfg.afmt is None:
        # fused on CUDA, same bits; prepare_weights refused a non-finite weight already
        return ConfigTerm(svdq.quantization_delta(w, cfg, lowrank, name, gram=gram, finite_checked=True))
    if getattr(quantize_fn, "weight_level", False):
        out = quantize_fn(triple.stored, cfg, name=name)
    else:
        qfn = quantize_fn if gram is None else svdq.with_gram(quantize_fn, gram)
        out = qfn(w, cfg, lowrank=lowrank, name=name)
    residual_q = None
    if isinstance(out, SvdqParts):
        residual_q = out.residual
        w_tilde = out.residual if out.lora_down.shape[0] == 0 else torch_addmm(out.residual, out.lora_up, out.lora_down)
    else:
        w_tilde = out
    if cfg.afmt is None:
        return ConfigTerm(w_tilde - w)
    if residual_q is None:
        branch = lowrank.product(cfg.rank) if cfg.rank > 0 else None
        residual_q = w_tilde if branch is None else w_tilde - branch
    return ConfigTerm(w_tilde - w, act=(cfg.afmt, cfg.ablk), qr=residual_q)


def torch_addmm(c, a, b):
    """c + a @ b (float32)."""
    import torch

    return torch.addmm(c, a, b)


def _now(device) -> float:
    """Wall clock after the device's queued work, so phase timings are honest on CUDA."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.current_stream(device).synchronize()  # not the device: the prefetch streams run on
    return time.perf_counter()


def _check_weight_finite(triple: WeightTriple, target: Target) -> None:
    import torch

    for name, t in (("weight", triple.weight), ("bias", triple.bias), ("smooth_factor", triple.smooth)):
        if t is not None and not torch.isfinite(t).all():
            raise HarnessError(f"{target.path}.{name} holds NaN/Inf values; fix the checkpoint")
    if triple.smooth is not None and not (triple.smooth > 0).all():
        raise HarnessError(f"{target.path}.smooth_factor has non-positive entries; re-run `tokenwise-precision smooth`")


def evaluate_with_model_op(cache: XYCache, model, fake_op: Callable, grid: list[SvdqConfig], chunk_tokens: int,
                           device, smooth: bool, no_restore: bool = False, progress: bool = True,
                           targets: list[Target] | None = None, layers: Iterable[int] | None = None) -> dict:
    """The seed's flow for a user's in-place model-level fake_op.

    fake_op(model, cfg) quantizes the whole model per config (that is the protocol); only
    `targets` (default: every allowlisted projection) are scored. `layers`: the decoder layers
    `model` holds when it holds only some (run.Evaluation.model under a -k selection; None: all). The model is moved to the
    scoring device when it fits there (so a GPU-only kernel runs), its allowlisted weights are
    backed up once (beside them when there is room, else on the CPU, as the seed does), and
    restored between configs unless no_restore.
    """
    import torch
    from tqdm import tqdm

    source = ModuleWeights(model, smooth)
    every = check_alignment(cache, source.targets(), "the model", layers)
    targets = every if targets is None else sorted(targets, key=Target.sort_key)
    cache.reserve_for(targets, chunk_tokens, grouped=False)  # evaluate_weight: one weight per stream
    backup_device = place_model(model, device, [source.modules[t].weight for t in every])
    backup = {t: source.modules[t].weight.detach().to(backup_device, copy=True) for t in every}
    results = {(t.layer, t.block, t.proj): {} for t in targets}
    for cfg in tqdm(grid, desc="eval (model-level fake_op)", unit="cfg", disable=not progress):
        with torch.no_grad():
            fake_op(model, cfg)
        for t in targets:
            original = source.get(t, device, weight=backup[t])
            _check_weight_finite(original, t)
            quantized = source.modules[t].weight.detach()
            metrics = evaluate_weight(cache, t, original, {cfg.key: quantized}, chunk_tokens, device)
            results[(t.layer, t.block, t.proj)][cfg.key] = metrics[cfg.key]
        if not no_restore:
            with torch.no_grad():
                for t in every:
                    source.modules[t].weight.copy_(backup[t])
    return results


# Headroom left free on the scoring GPU after the model and its weight backup.
GPU_HEADROOM_BYTES = 4 << 30


def place_model(model, device, backed_up) -> "str":
    """Move the model to the scoring device when it fits; return where the weight backup goes.

    A model spread by accelerate (hf_device_map) stays where it is. On a GPU the backup of the
    allowlisted weights stays on the GPU too when both fit with GPU_HEADROOM_BYTES to spare;
    otherwise it goes to the CPU (the seed's choice).
    """
    import torch

    device = str(device)
    if not device.startswith("cuda"):
        return "cpu"
    if getattr(model, "hf_device_map", None) and len(set(map(str, model.hf_device_map.values()))) > 1:
        return "cpu"
    # A model holding only some layers (run.Evaluation.model) keeps the rest on meta: not counted, not moved.
    held = [p for p in model.parameters() if not p.is_meta]
    params = sum(p.numel() * p.element_size() for p in held)
    params += sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_meta)
    backup = sum(w.numel() * w.element_size() for w in backed_up)
    on_device = all(str(p.device) == str(torch.device(device)) or (p.device.type == "cuda" and device == "cuda")
                    for p in held)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if not on_device:
        if params + GPU_HEADROOM_BYTES > free:
            return "cpu"
        _move_held(model, device)
        free -= params
    return device if backup + GPU_HEADROOM_BYTES <= free else "cpu"


def _move_held(model, device) -> None:
    """model.to(device) for the tensors that hold data; those left on meta stay there."""
    import torch

    if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to(device)
        return
    with torch.no_grad():
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None and not p.is_meta:
                    p.data = p.data.to(device)
            for name, b in module._buffers.items():
                if b is not None and not b.is_meta:
                    module._buffers[name] = b.to(device)
