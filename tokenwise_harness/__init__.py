"""tokenwise_harness: per-projection precision regression for SVDQuant-style fake quantization.

Kept import-light on purpose: the pytest11 plugin module imports this package in every
pytest run of an environment that has it, so nothing here may pull in torch.
"""

__version__ = "0.1.0"
