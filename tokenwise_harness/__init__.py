"""tokenwise_harness: per-projection precision regression for SVDQuant-style fake quantization.

Kept import-light on purpose: the pytest11 plugin module imports this package in every
pytest run of an environment that has it, so nothing here may pull in torch.
"""

import logging

__version__ = "0.1.0"

# torchao (the [torchao] extra, which transformers imports whenever it is installed) logs one
# warning per optional CUDA extension a CPU-only machine cannot load, and torch one per enum it
# registers: lines that would bury our one-line errors. Nothing else of either logger is muted.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# The public types of the weight-level kernel protocol (kernels/protocol.py, torch-free):
#   tokenwise_harness.QuantConfig  the frozen config a kernel receives (rank, fmt, blk, iters, key)
#   tokenwise_harness.SvdqParts    (lora_down, lora_up, residual), what a W4A4 kernel returns
_PUBLIC = {"QuantConfig", "SvdqParts"}


def __getattr__(name):
    if name in _PUBLIC:
        from tokenwise_harness.kernels import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'tokenwise_harness' has no attribute {name!r}")
