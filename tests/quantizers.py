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


# What counting_fake_op saw, one entry per call: (cfg key, the linears of the decoder layers it found).
MODEL_OP_CALLS: list[tuple[str, tuple[str, ...]]] = []


def counting_fake_op(model, svdq_cfg):
    """The reference kernel, recording the decoder-layer linears a user's own walk over
    named_modules() finds (as a user's fake_op written without the harness's allowlist would)."""
    seen = tuple(name for name, mod in model.named_modules()
                 if isinstance(mod, torch.nn.Linear) and ".layers." in name)
    MODEL_OP_CALLS.append((getattr(svdq_cfg, "key", str(svdq_cfg)), seen))
    reference_fake_op(model, svdq_cfg)
