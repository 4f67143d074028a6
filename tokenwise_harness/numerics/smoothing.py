"""SmoothQuant's numerics: the per-channel factor and the search over its exponents.

Pure torch: the factors' inputs (activation maxima, input Gram matrices) come from the cache,
read by tokenwise_harness.calib; the weights from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tokenwise_harness.grid import SvdqConfig
from tokenwise_harness.numerics.metrics import output_error
from tokenwise_harness.numerics.svdq import _one_shot, fake_quantize_weight

CLAMP = (1e-5, 1e5)


def smooth_factor(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float,
                  beta: float | None = None) -> torch.Tensor:
    """The SmoothQuant factor max|X|^alpha / max|W|^beta (beta defaults to 1 - alpha)."""
    beta = 1.0 - alpha if beta is None else beta
    a = act_amax.double().clamp_min(CLAMP[0])
    w = weight_amax.double().clamp_min(CLAMP[0])
    return (a.pow(alpha) / w.pow(beta)).clamp(*CLAMP).to(torch.float32)


# The smoothing exponents searched (a), as in deepcompressor's 20-point grid without 0 and 1.
ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))


def smoothing_candidates(alphas: Sequence[float] = ALPHA_GRID) -> list[tuple[float, float]]:
    """(a, b) pairs in search order: no smoothing, then b = 1 − a, then b = 0."""
    out = [(0.0, 0.0)]
    out += [(float(a), round(1.0 - a, 10)) for a in alphas]
    out += [(float(a), 0.0) for a in alphas]
    return out


@dataclass
class SmoothChoice:
    """The searched factor of one input group and how it scored."""

    s: torch.Tensor  # [in] float32
    a: float
    b: float
    error: float  # Σ_members tr(ΔW' H_s ΔW'ᵀ) of the chosen s
    baseline_error: float  # the same with no smoothing (s = 1)
    fixed_error: float | None  # the same with the fixed default (a = b = 0.5), when searched
    signal: float  # Σ_members tr(W H Wᵀ) = ||X Wᵀ||² (error / signal is an nmse without bias)
    errors: dict = field(default_factory=dict)  # (a, b) -> error, every candidate

    def meta(self) -> dict[str, float | None]:
        return {"a": self.a, "b": self.b, "error": self.error, "baseline_error": self.baseline_error,
                "fixed_error": self.fixed_error, "signal": self.signal}


def smoothed_error(weights: list[torch.Tensor], gram: torch.Tensor, s: torch.Tensor, cfg: SvdqConfig,
                   names: list[str] | None = None) -> float:
    """Σ over members of the output error of W·s fake-quantized with `cfg`, on X / s.

    `gram` is H of the unsmoothed X; every weight [out_m, in] is float32 on gram's device.
    """
    names = names or [f"weight {i}" for i in range(len(weights))]
    inv = 1.0 / s.to(device=gram.device, dtype=torch.float64)
    deltas = []
    for w, name in zip(weights, names):
        w_s = w.to(torch.float32) * s.to(device=w.device, dtype=torch.float32)[None, :]
        w_tilde = fake_quantize_weight(w, _one_shot(cfg), smooth=s, name=name)
        deltas.append((w_tilde - w_s).to(torch.float64) * inv[None, :])  # back to X's coordinates
    return output_error(torch.cat(deltas, dim=0), gram)


def search_group(weights: list[torch.Tensor], gram: torch.Tensor, act_amax: torch.Tensor, cfg: SvdqConfig,
                 alphas: Sequence[float] = ALPHA_GRID, names: list[str] | None = None) -> SmoothChoice:
    """Search the smoothing exponent of one input group (members share X, H and s)."""
    w_amax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(0)
    act = act_amax.to(device=w_amax.device)
    signal = sum(output_error(w, gram) for w in weights)
    best = None
    errors = {}
    for a, b in smoothing_candidates(alphas):
        s = smooth_factor(act, w_amax, a, beta=b)
        err = smoothed_error(weights, gram, s, cfg, names)
        errors[(a, b)] = err
        if best is None or err < best[0]:
            best = (err, a, b, s)
    err, a, b, s = best
    return SmoothChoice(s.cpu(), a, b, err, errors[(0.0, 0.0)], errors.get((0.5, 0.5)), signal, errors)
