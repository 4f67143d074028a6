"""The test suite, a package: pytest then puts the repo root (not tests/) on sys.path, so no test
module shadows an installed top-level package of the same name (tests/kernels.py once hid
Hugging Face's `kernels` from transformers)."""
