"""Loading a user's kernel: by import path, or a built-in adapter by name.

`resolve_callable` is the one loader behind every `package.module:function` flag
(--quantizer, --weight_quantizer, --data_fn).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from tokenwise_harness.errors import HarnessError
from tokenwise_harness.kernels.weight_kernel import WeightKernel, first_line

# meta.quantizer of a run of the built-in engine (the seed's name for the built-in operator).
BUILTIN_QUANTIZER = "tokenwise_harness.numerics.svdq:fake_op"
# Built-in adapters selected by a bare name instead of an import path.
ADAPTERS = ("torchao",)


def resolve_callable(spec: str, flag: str) -> Callable:
    """'package.module:function' -> the function (a user's own implementation)."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise HarnessError(f"{flag} {spec!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HarnessError(f"{flag} {spec!r}: cannot import {module_name} ({exc})") from None
    except Exception as exc:  # the user's module itself failed while importing
        raise HarnessError(f"{flag} {spec!r}: importing {module_name} raised {type(exc).__name__}: "
                           f"{first_line(exc)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise HarnessError(f"{flag} {spec!r}: {module_name} has no function {attr}")
    return fn


def load_weight_quantizer(spec: str, flag: str = "--weight_quantizer") -> WeightKernel:
    """A weight-level kernel: a built-in adapter by name (torchao) or a user's by import path."""
    if spec == "torchao":
        from tokenwise_harness.kernels import torchao_adapter as torchao

        return torchao.load(flag)
    if ":" not in str(spec):
        raise HarnessError(f"{flag} {spec!r} must look like package.module:function, or name a built-in "
                           f"adapter: {', '.join(ADAPTERS)}")
    return WeightKernel(resolve_callable(spec, flag), spec)
