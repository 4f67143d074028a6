"""`--weight-quantizer torchao`: SVDQuant weights through torchao's own NVFP4 / MX casts.

For a config (rank r, fmt, blk) and a weight W (float32 from the checkpoint's dtype):

    L = exact top-r branch of W          numerics.lowrank.LowRank, the engine's own
    R = W - L
    nvfp4@16:  NVFP4Tensor.to_nvfp4(R, 16, per_tensor_scale=per_tensor_amax_to_scale(amax|R|)).dequantize(fp32)
    mxfp4@B:   MXTensor.to_mx(R, torch.float4_e2m1fn_x2, B).dequantize(fp32)   (FLOOR scale rule)

returned as SvdqParts (so W4A4 configs work too). The residual cast is torchao's code, not
ours: a team pins torchao, gates its baselines with this adapter, and sees any numeric change
of a torchao upgrade as a regression. Supported: nvfp4 with blk 16 (torchao's NVFP4 block)
and mxfp4 with a block that divides the input dim (torchao pads nothing), plus rank-only
configs (fmt none); other formats are refused with a one-line error naming the config.

Agreement with the built-in engine: our formats follow torchao's recipes (numerics.formats),
so on the CPU both give the same residual bit for bit; on CUDA, torchao multiplies by
reciprocals where we divide, which can move a tie. tests/test_kernels.py asserts the nmse of
every case within TORCHAO_RTOL of the built-in engine's.
"""

from __future__ import annotations

from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import SvdqConfig
from tokenwise_harness.kernels.protocol import SvdqParts
from tokenwise_harness.kernels.weight_kernel import WeightKernel

NAME = "torchao"
TORCHAO_RTOL = 1e-3  # stated agreement with the built-in engine, relative, on every metric
INSTALL_HINT = "pip install 'tokenwise-harness[torchao]' (or pip install torchao)"


def load(flag: str = "--weight_quantizer") -> WeightKernel:
    casts = _import_casts(flag)
    return WeightKernel(_Kernel(casts), f"{NAME} adapter", version=f"torchao {casts['version']}", supports=unsupported)


def unsupported(cfg: SvdqConfig) -> str | None:
    """None when torchao can score the config, else why not."""
    if cfg.fmt == "none":
        return None
    if cfg.fmt == "nvfp4":
        return None if cfg.blk == 16 else f"torchao's NVFP4 has 16-element blocks only (got blk {cfg.blk}); use nvfp4@16"
    if cfg.fmt == "mxfp4":
        return None if isinstance(cfg.blk, int) else f"torchao's MX casts need an integer block (got blk {cfg.blk})"
    return f"the torchao adapter casts nvfp4 and mxfp4 only (got {cfg.fmt}); use the built-in engine for it"


def _import_casts(flag: str) -> dict:
    try:
        import torch
        import torchao
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except ImportError as exc:
        raise HarnessError(f"{flag} torchao: torchao is not importable ({exc}); {INSTALL_HINT}") from None
    return {"version": getattr(torchao, "__version__", "unknown"), "NVFP4Tensor": NVFP4Tensor,
            "per_tensor_amax_to_scale": per_tensor_amax_to_scale, "MXTensor": MXTensor,
            "fp4x2": torch.float4_e2m1fn_x2}


class _Kernel:
    """fn(weight, cfg) -> SvdqParts; keeps the last weight's decomposition for its next configs."""

    def __init__(self, casts: dict):
        self.casts = casts
        self._last = None  # (weight object, its version, float32 W, LowRank)

    def __call__(self, weight, cfg: SvdqConfig) -> SvdqParts:
        import torch

        W, lowrank = self._decomposed(weight, cfg.rank)
        rank = min(cfg.rank, *W.shape)
        if rank > 0:
            down, up = lowrank.L2[:rank], lowrank.L1[:, :rank]
            residual = W - up @ down
        else:
            down, up = W.new_zeros((0, W.shape[1])), W.new_zeros((W.shape[0], 0))
            residual = W
        if cfg.fmt == "none":
            q = torch.zeros_like(W) if rank > 0 else W
        elif cfg.fmt == "nvfp4":
            NV = self.casts["NVFP4Tensor"]
            scale = self.casts["per_tensor_amax_to_scale"](residual.abs().amax())
            q = NV.to_nvfp4(residual.contiguous(), 16, per_tensor_scale=scale).dequantize(torch.float32)
        elif cfg.fmt == "mxfp4":
            if W.shape[1] % cfg.blk:
                raise HarnessError(f"weight quantizer torchao cannot score {cfg.key}: the input dim {W.shape[1]} "
                                   f"is not a multiple of the block {cfg.blk} (torchao's MX casts do not pad)")
            MX = self.casts["MXTensor"]
            q = MX.to_mx(residual.contiguous(), self.casts["fp4x2"], cfg.blk).dequantize(torch.float32)
        else:  # refused by WeightKernel.check_config before the call
            raise HarnessError(f"weight quantizer torchao cannot score {cfg.key}: {unsupported(cfg)}")
        return SvdqParts(down, up, q)

    def _decomposed(self, weight, rank: int):
        """float32 W and an exact LowRank serving `rank`, reused across one weight's configs.

        The last weight object itself is held, so its identity cannot be reused by another
        tensor while the memo lives; an in-place change bumps its version and misses.
        """
        import torch

        from tokenwise_harness.numerics.lowrank import LowRank

        need = min(rank, *weight.shape)
        last = self._last
        if last is not None and last[0] is weight and last[1] == weight._version:
            W, lowrank = last[2], last[3]
            if need == 0 or (lowrank is not None and lowrank.max_rank >= need):
                return W, lowrank
        else:
            W, lowrank = weight.detach().to(torch.float32), None
        if need > 0:
            lowrank = LowRank(W, max(need, min(64, *W.shape)))
        self._last = (weight, weight._version, W, lowrank)
        return W, lowrank
