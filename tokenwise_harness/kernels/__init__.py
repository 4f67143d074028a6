"""Kernels: what turns a weight into its fake-quantized W~, and how a user's kernel plugs in.

Two protocols, one loader (`resolve_callable`, for every `package.module:function` flag):

- weight level (the one real kernels fit; `--weight-quantizer` / `--weight_quantizer`):
  `fn(weight, cfg) -> Tensor | SvdqParts`, see `protocol.py`. It runs inside the per-weight
  engine: weights streamed from the checkpoint shards on the scoring device, the kernel called
  once per selected (weight, config), its output checked here (`WeightKernel`). The name
  `torchao` selects the built-in adapter over torchao's own NVFP4 / MX casts (`torchao.py`).
- model level (the seed's, `--quantizer`): `fake_op(model, cfg)` quantizes every allowlisted
  weight of the model in place, once per config; kept for compatibility (engine.evaluate_with_model_op).
  Under a -k selection the model holds only the selected decoder layers (run.Evaluation.model).

The built-in quantizer is numerics.svdq.fake_quantize_weight (exact top-r branch + formats).
"""

from tokenwise_harness.kernels.loader import BUILTIN_QUANTIZER, load_weight_quantizer, resolve_callable
from tokenwise_harness.kernels.protocol import QuantConfig, SvdqParts
from tokenwise_harness.kernels.weight_kernel import WeightKernel

__all__ = ["BUILTIN_QUANTIZER", "QuantConfig", "SvdqParts", "WeightKernel", "load_weight_quantizer",
           "resolve_callable"]
