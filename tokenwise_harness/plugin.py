"""pytest11 entry point of tokenwise_harness.

Imported by every pytest run in an environment that has the package, so it stays free of
torch/transformers imports; the harness adds nothing unless --model-dir or --xy-path is given.
"""

from __future__ import annotations


def pytest_addoption(parser):
    group = parser.getgroup("tokenwise", "tokenwise precision harness")
    group.addoption("--model-dir", default=None, help="Hugging Face model dir to gate")
    group.addoption("--xy-path", default=None, help="existing save_xy cache")
