"""Shared fixtures: offline demo models and the demo tokenizer, built once per session.

Everything here works with no network: the models are random-weight Hugging Face models
built by tokenwise_harness.demo.models, and the hub is switched off for the whole run so an
accidental hub lookup fails loudly instead of downloading.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "TOKENWISE_CACHE_DIR" not in os.environ:  # digest memo + low-rank store: one per test run, not ~/.cache
    import atexit
    import shutil
    import tempfile

    os.environ["TOKENWISE_CACHE_DIR"] = _MEMO_DIR = tempfile.mkdtemp(prefix="tokenwise-memo-")
    atexit.register(shutil.rmtree, _MEMO_DIR, True)

DEMO_FAMILIES = ("qwen3", "llama", "qwen2")


@pytest.fixture(scope="session", autouse=True)
def _private_tokenwise_cache(tmp_path_factory):
    """The harness's shared user cache (~/.cache/tokenwise_harness) stays out of the tests:
    every run of this session, inner pytester and subprocess runs included, uses a temp one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENWISE_CACHE_DIR", str(tmp_path_factory.mktemp("tokenwise_user_cache")))
        yield


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """A 2-layer Qwen3 demo model dir (seed 0, default sizes, planted outliers in layer 0)."""
    from tokenwise_harness.demo.models import make_demo_model

    return make_demo_model("qwen3", tmp_path_factory.mktemp("demo_models") / "qwen3")


@pytest.fixture(scope="session")
def demo_model_dirs(tmp_path_factory, demo_model_dir):
    """{family: model dir} for qwen3 (the same dir as demo_model_dir), llama and qwen2."""
    from tokenwise_harness.demo.models import make_demo_model

    root = tmp_path_factory.mktemp("demo_models_more")
    dirs = {"qwen3": demo_model_dir}
    for family in DEMO_FAMILIES[1:]:
        dirs[family] = make_demo_model(family, root / family)
    return dirs


@pytest.fixture(scope="session")
def demo_tokenizer():
    """The demo models' tokenizer (byte-level BPE, 1024 tokens, trained on the embedded corpus)."""
    from tokenwise_harness.demo.models import make_demo_tokenizer

    return make_demo_tokenizer()


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip on a machine without CUDA (select them with `-m cuda`)."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run with -m cuda on the GPU machine)")
    for item in marked:
        item.add_marker(skip)
