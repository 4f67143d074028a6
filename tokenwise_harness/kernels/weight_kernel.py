"""A weight-level kernel as the engine calls it, and the checks of what it returns.

`WeightKernel` calls the user's fn(weight, cfg) once per (weight, config), turns an exception
into a one-line error naming the kernel, the weight and the config, and checks the output
(shape, float dtype, finite; SvdqParts for W4A4 configs) before anything is scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import SvdqConfig
from tokenwise_harness.kernels.protocol import SvdqParts


class WeightKernel:
    """A weight-level kernel as the engine calls it: `kernel(weight, cfg, name=...)`.

    Returns the checked output: W~ (float32, on the weight's device) or, when the kernel gave
    SvdqParts, SvdqParts of float32 tensors on that device. `weight_level` tells the engine to
    pass the weight in the checkpoint's dtype and to skip its own decomposition.
    """

    weight_level = True

    def __init__(self, fn: Callable, name: str, version: str | None = None,
                 supports: Callable[[SvdqConfig], str | None] | None = None):
        self.fn = fn
        self.name = name  # import path or adapter name
        self.version = version
        self._supports = supports  # cfg -> None, or why the kernel cannot run it

    @property
    def label(self) -> str:
        """What meta.quantizer records: the import path, or the adapter and its version."""
        return f"{self.name} ({self.version})" if self.version else self.name

    def check_grid(self, grid: Iterable[SvdqConfig]) -> None:
        """Refuse, before any work, the configs this kernel cannot score."""
        for cfg in grid:
            self.check_config(cfg)

    def check_config(self, cfg: SvdqConfig) -> None:
        if cfg.iters > 1:
            raise HarnessError(f"weight quantizer {self.name}: config {cfg.key}: the iterated low-rank branch "
                               "(--lowrank_iters > 1) is scored on the cached inputs, which a weight-level kernel "
                               "does not see; drop --lowrank_iters or the kernel")
        why = self._supports(cfg) if self._supports is not None else None
        if why:
            raise HarnessError(f"weight quantizer {self.label} cannot score {cfg.key}: {why}")

    def __call__(self, weight, cfg: SvdqConfig, *, name: str = "weight", **_ignored):
        self.check_config(cfg)
        version = weight._version
        try:
            out = self.fn(weight, cfg)
        except HarnessError:
            raise
        except Exception as exc:
            raise HarnessError(f"weight quantizer {self.name} raised {type(exc).__name__} on {name}.weight "
                               f"{_shape(weight)} under {cfg.key}: {first_line(exc)}") from None
        if weight._version != version:
            raise HarnessError(f"weight quantizer {self.name} modified its input {name}.weight in place under "
                               f"{cfg.key}; it must return W~ and leave the weight as it is (clone it first)")
        return check_output(out, weight, cfg, self.name, name)


def check_output(out, weight, cfg: SvdqConfig, kernel: str, name: str):
    """The kernel's output, checked and as float32 on the weight's device; else a one-line HarnessError."""
    where = f"weight quantizer {kernel} on {name}.weight {_shape(weight)} under {cfg.key}"
    rows, cols = weight.shape
    if isinstance(out, SvdqParts):
        down = _as_tensor(out.lora_down, where, "SvdqParts.lora_down", weight)
        up = _as_tensor(out.lora_up, where, "SvdqParts.lora_up", weight)
        residual = _as_tensor(out.residual, where, "SvdqParts.residual", weight)
        if down.dim() != 2 or down.shape[1] != cols:
            raise HarnessError(f"{where}: SvdqParts.lora_down has shape {_shape(down)}; it must be [rank, {cols}]")
        if up.dim() != 2 or tuple(up.shape) != (rows, down.shape[0]):
            raise HarnessError(f"{where}: SvdqParts.lora_up has shape {_shape(up)}; it must be "
                               f"[{rows}, {down.shape[0]}] (rank from lora_down)")
        if tuple(residual.shape) != (rows, cols):
            raise HarnessError(f"{where}: SvdqParts.residual has shape {_shape(residual)}; it must be the "
                               f"weight's [{rows}, {cols}]")
        return SvdqParts(down, up, residual)
    if cfg.afmt is not None:
        raise HarnessError(f"{where}: returned a plain tensor, but a W4A4 config (--act_qspecs) needs "
                           "SvdqParts(lora_down, lora_up, residual) so the residual branch's activations can be "
                           "quantized; return SvdqParts or drop --act_qspecs")
    w_tilde = _as_tensor(out, where, "the result", weight)
    if tuple(w_tilde.shape) != (rows, cols):
        raise HarnessError(f"{where}: returned shape {_shape(w_tilde)}; it must return W~ of the weight's shape "
                           f"[{rows}, {cols}]")
    return w_tilde


def _as_tensor(t, where: str, what: str, weight):
    import torch

    if not isinstance(t, torch.Tensor):
        raise HarnessError(f"{where}: {what} is a {type(t).__name__}, not a torch.Tensor")
    if not t.is_floating_point():
        raise HarnessError(f"{where}: {what} has dtype {t.dtype}; it must be a float tensor (the dequantized values)")
    t = t.detach().to(device=weight.device, dtype=torch.float32)
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise HarnessError(f"{where}: {what} holds {bad} NaN/Inf values")
    return t


def _shape(t) -> str:
    return "[" + ", ".join(str(d) for d in getattr(t, "shape", ())) + "]"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else repr(exc)
    return line if len(line) <= 300 else line[:297] + "..."
