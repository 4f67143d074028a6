"""User-style weight-level kernels for tests of --weight-quantizer (import path `tests.weight_kernels:NAME`).

`svdq` is an independent implementation of the harness's SVDQuant recipe: it never calls the
engine's quantizer or formats. Its low-rank branch comes from a float64 `torch.linalg.svd`
(the engine uses an eigendecomposition of the Gram matrix), its E2M1 rounding is piecewise
`torch.round` by exponent range (the engine looks values up on a grid), and it multiplies by
reciprocals of the scales where the engine divides (torchao 0.18's own order): the same
formats, another rounding order. The others are deliberately broken.
"""

from __future__ import annotations

import os

import torch

from tokenwise_harness import QuantConfig, SvdqParts


def _blocks(x: torch.Tensor, blk) -> tuple[torch.Tensor, int]:
    """[rows, cols] -> [rows, nblocks, blk] (zero-padded: no symmetric block statistic changes)."""
    rows, cols = x.shape
    size = cols if blk == "in" else int(blk)
    pad = (-cols) % size
    if pad:
        x = torch.cat([x, x.new_zeros(rows, pad)], dim=1)
    return x.reshape(rows, -1, size), cols


def _unblock(xb: torch.Tensor, cols: int) -> torch.Tensor:
    return xb.reshape(xb.shape[0], -1)[:, :cols]


def e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round onto E2M1 {0, .5, 1, 1.5, 2, 3, 4, 6}, half to even, for |x| <= 6."""
    a = x.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.sign(x) * torch.round(a / step) * step


def nvfp4(x: torch.Tensor, blk=16) -> torch.Tensor:
    amax = x.abs().max()
    if amax == 0:
        return torch.zeros_like(x)
    g = amax / (448.0 * 6.0)
    xb, cols = _blocks(x, blk)
    s = (xb.abs().amax(-1, keepdim=True) / 6.0 / g).clamp(2.0**-6, 448.0)
    s = s.to(torch.float8_e4m3fn).to(torch.float32)
    q = e2m1((xb * ((1.0 / g) / s)).clamp(-6.0, 6.0))
    return _unblock(q * (g * s), cols)


def mxfp4(x: torch.Tensor, blk=32) -> torch.Tensor:
    xb, cols = _blocks(x, blk)
    _, exp = torch.frexp(xb.abs().amax(-1, keepdim=True))  # amax = m * 2**exp, m in [0.5, 1)
    scale = torch.ldexp(torch.ones_like(xb[..., :1]), (exp - 1 - 2).clamp(-127, 127))
    return _unblock(e2m1((xb / scale).clamp(-6.0, 6.0)) * scale, cols)


def int4(x: torch.Tensor, blk=128) -> torch.Tensor:
    xb, cols = _blocks(x, blk)
    amax = xb.abs().amax(-1, keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    q = torch.round(xb * (7.0 / safe)).clamp(-7, 7)
    return _unblock(q * (safe / 7.0), cols)


CASTS = {"nvfp4": nvfp4, "mxfp4": mxfp4, "int4": int4}
_LAST: list = []  # [weight object, its version, (U, S, Vh)]: one SVD per weight, shared by its configs


def _svd(weight: torch.Tensor):
    """float64 SVD of the weight, once per weight (the engine passes one tensor to all its configs;
    holding it keeps its identity from being reused). One thread: LAPACK's threaded SVD crawls on
    shared cores."""
    if _LAST and _LAST[0] is weight and _LAST[1] == weight._version:
        return _LAST[2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        usv = torch.linalg.svd(weight.double(), full_matrices=False)
    finally:
        torch.set_num_threads(threads)
    _LAST[:] = [weight, weight._version, usv]
    return usv


def parts(weight: torch.Tensor, cfg: QuantConfig) -> SvdqParts:
    """The independent SVDQuant decomposition: top-r branch (float64 SVD) + cast residual."""
    W = weight.to(torch.float32)
    r = min(cfg.rank, *W.shape)
    if r > 0:
        U, S, Vh = _svd(weight)
        up, down = (U[:, :r] * S[:r]).float(), Vh[:r].float()
        residual = W - up @ down
    else:
        up, down, residual = W.new_zeros(W.shape[0], 0), W.new_zeros(0, W.shape[1]), W
    if cfg.fmt == "none":
        q = torch.zeros_like(W) if r > 0 else W
    else:
        q = CASTS[cfg.fmt](residual, cfg.blk)
    return SvdqParts(down, up, q)


def svdq(weight: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """A correct independent kernel: W~ = lora_up @ lora_down + Q(residual), in the weight's dtype."""
    p = parts(weight, cfg)
    return (p.lora_up @ p.lora_down + p.residual).to(weight.dtype)


def svdq_parts(weight, cfg):
    """The same, returning SvdqParts (what a W4A4 kernel returns)."""
    return parts(weight, cfg)


def scale_bug(weight, cfg):
    """A regressed kernel: the residual dequantized with every scale 10% too large."""
    p = parts(weight, cfg)
    return p.lora_up @ p.lora_down + 1.1 * p.residual


def counting(weight, cfg):
    """svdq, appending `<shape> <cfg key>` to $TOKENWISE_KERNEL_CALLS per call (any process)."""
    with open(os.environ["TOKENWISE_KERNEL_CALLS"], "a", encoding="utf-8") as f:
        f.write(f"{'x'.join(map(str, weight.shape))} {weight.dtype} {cfg.key}\n")
    return svdq(weight, cfg)


def wrong_shape(weight, cfg):
    return weight[:, :-1].float()


def nan_out(weight, cfg):
    out = weight.float().clone()
    out[0, 0] = float("nan")
    return out


def int_out(weight, cfg):
    return weight.to(torch.int32)


def raising(weight, cfg):
    raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines the user never sees")


def in_place(weight, cfg):
    return weight.mul_(1.0)


def not_a_tensor(weight, cfg):
    return weight.tolist()
