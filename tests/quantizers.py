"""User-style model-level quantizers for tests of the --quantizer path (import path
`tests.quantizers:NAME`)."""

import torch

from tokenwise_harness.allowlist import iter_allowed_linears
from tokenwise_harness.numerics.svdq import fake_op as reference_fake_op


def accumulating_fake_op(model, svdq_cfg):
    """Deliberately stateful: perturbs the *current* weights, so repeated calls accumulate."""
    with torch.no_grad():
        for _, mod in iter_allowed_linears(model):
            w = mod.weight
            pattern = torch.linspace(-1.0, 1.0, w.numel(), dtype=w.dtype).reshape(w.shape)
            w.add_(0.01 * w.std() * pattern)


def correct_fake_op(model, svdq_cfg):
    """A user's wrapper around the harness's own kernel."""
    reference_fake_op(model, svdq_cfg)


def broken_fake_op(model, svdq_cfg):
    """A regressed kernel: the right quantization, then a scaling bug on every weight."""
    reference_fake_op(model, svdq_cfg)
    with torch.no_grad():
        for _, mod in iter_allowed_linears(model):
            mod.weight.mul_(1.05)


def nan_fake_op(model, svdq_cfg):
    """A broken kernel: the right quantization, then one NaN in every weight."""
    reference_fake_op(model, svdq_cfg)
    with torch.no_grad():
        for _, mod in iter_allowed_linears(model):
            mod.weight[0, 0] = float("nan")


def inf_fake_op(model, svdq_cfg):
    """A broken kernel: the right quantization, then one +inf in every weight."""
    reference_fake_op(model, svdq_cfg)
    with torch.no_grad():
        for _, mod in iter_allowed_linears(model):
            mod.weight[0, 0] = float("inf")
