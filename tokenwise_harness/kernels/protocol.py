"""The public types of the weight-level kernel protocol (torch-free: imported by the package root).

    fn(weight, cfg) -> torch.Tensor | SvdqParts

`weight` is one allowlisted projection's 2-D weight `[out_features, in_features]`, in the
checkpoint's dtype, on the scoring device (the GPU when there is one), already multiplied by
the smoothing factors on a smoothed model. `cfg` is a `QuantConfig` (frozen): `rank`, `fmt`,
`blk`, `iters`, `key` (plus `afmt` / `ablk` for W4A4 configs). The function returns W~, the
effective weight the quantized layer computes with (for SVDQuant: the low-rank branch plus
the dequantized residual), of the weight's shape, any float dtype, on any device. For W4A4
configs (`--act_qspecs`) it returns `SvdqParts` instead, so the engine can quantize the
residual branch's activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenwise_harness.grid import SvdqConfig

# The public, frozen config a kernel receives: rank, fmt, blk, iters, key (and afmt, ablk).
QuantConfig = SvdqConfig


@dataclass(frozen=True)
class SvdqParts:
    """An SVDQuant layer as a kernel computes it: Y = X·(lora_up·lora_down)ᵀ + X·residualᵀ (+ b).

    lora_down [rank, in], lora_up [out, rank]: the 16-bit low-rank branch (rank may be 0);
    residual [out, in]: the dequantized 4-bit residual, the branch whose activations a W4A4
    kernel quantizes. The effective weight is lora_up @ lora_down + residual.
    """

    lora_down: Any
    lora_up: Any
    residual: Any
