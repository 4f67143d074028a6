"""The model-level path (`--quantizer pkg.mod:fake_op`) under a -k selection: the model handed
to fake_op holds only the selected decoder layers (run.Evaluation.model), and the numbers of the
selected cases equal those of the whole-model path (which today's runs without -k still take).

Kernel: tests.quantizers:counting_fake_op (the reference fake_op + a record of the linears
a named_modules() walk finds). Demo models: the 2-layer qwen3 / llama / qwen2 fixtures.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

import tokenwise_harness.run  # noqa: F401  (kept loaded across in-process pytester runs)
from tests import quantizers
from tokenwise_harness.allowlist import PROJ_ORDER, SHARED_INPUT, Target
from tokenwise_harness.capture.save_xy import save_xy

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[1]
OP = "tests.quantizers:counting_fake_op"
LAYER1 = sorted((Target(1, block, proj) for (block, proj) in SHARED_INPUT), key=Target.sort_key)
ALL_LINEARS = {f"model.layers.{i}.{b}.{p}" for i in (0, 1) for (b, p) in SHARED_INPUT}
assert len(PROJ_ORDER) == len(SHARED_INPUT) == 7


@pytest.fixture(scope="module")
def caches(demo_model_dirs, tmp_path_factory):
    """{family: cache path} for the three 2-layer demo models."""
    root = tmp_path_factory.mktemp("model_level_caches")
    out = {family: Path(save_xy(mdir, root / family, "c", cn=2, eu=2, length=16, progress=False,
                                log=lambda m: None))
           for family, mdir in demo_model_dirs.items()}
    gc.collect()
    return out


def _evaluation(model_dir, cache, smooth=False):
    from tokenwise_harness.run import EvalSpec, Evaluation

    spec = EvalSpec.from_text("0,8", "nvfp4@16,int4@64", model_dir=str(model_dir), xy_path=str(cache), quantizer=OP,
                              smooth=smooth, model_flag="--smooth_model_dir" if smooth else "--model_dir")
    return Evaluation(spec)


def _score_both(model_dir, cache, smooth=False):
    """(selected: layer 1's projections only, full: every projection, no selection) and the calls each made."""
    quantizers.MODEL_OP_CALLS.clear()
    partial_ev = _evaluation(model_dir, cache, smooth)
    selected = partial_ev.score(targets=LAYER1)
    partial_calls = list(quantizers.MODEL_OP_CALLS)
    quantizers.MODEL_OP_CALLS.clear()
    full_ev = _evaluation(model_dir, cache, smooth)
    full = full_ev.score()
    full_calls = list(quantizers.MODEL_OP_CALLS)
    return partial_ev, selected, partial_calls, full_ev, full, full_calls


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_selected_layer_only_and_same_numbers(family, demo_model_dirs, caches):
    partial_ev, selected, calls, full_ev, full, full_calls = _score_both(demo_model_dirs[family], caches[family])
    # (a) the selected cases' numbers are exactly those of the whole-model path
    assert set(selected) == {(t.layer, t.block, t.proj) for t in LAYER1}
    assert len(full) == 14
    for key, by_cfg in selected.items():
        assert by_cfg == full[key], key
    # (b) fake_op ran once per config and saw only layer 1's seven linears; the whole path saw all 14
    layer1 = {t.path for t in LAYER1}
    assert [c[0] for c in calls] == [c.key for c in partial_ev.grid]
    assert all(set(seen) == layer1 for _, seen in calls), calls
    assert all(set(seen) == ALL_LINEARS for _, seen in full_calls)
    model = partial_ev.model({1})  # the model fake_op was handed (reused: nothing reloaded)
    assert model is partial_ev._model and partial_ev._model_layers == {1}
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "cpu"
    assert model.model.embed_tokens.weight.is_meta and model.lm_head.weight.is_meta
    assert not list(model.model.layers[0].children()) and not list(model.model.layers[0].parameters())
    # the kept layer holds the checkpoint's tensors, biases and norms included (weights restored after fake_op)
    from tokenwise_harness.checkpoint import ModelDir

    mdir = ModelDir(demo_model_dirs[family])
    for name, tensor in model.model.layers[1].state_dict().items():
        stored = mdir.read(f"model.layers.1.{name}")
        assert stored is not None and tensor.dtype == stored.dtype and bool((tensor == stored).all()), name
    if family == "qwen2":
        assert model.model.layers[1].self_attn.q_proj.bias is not None
    assert full_ev._model_layers is None and not any(p.is_meta for p in full_ev.model().parameters())


def test_smoothed_dir(demo_model_dirs, caches, tmp_path):
    from tokenwise_harness.calib.smooth import smooth

    out = smooth(demo_model_dirs["qwen3"], caches["qwen3"], tmp_path / "smoothed", alpha=0.5, log=lambda m: None)
    partial_ev, selected, calls, _, full, _ = _score_both(out, caches["qwen3"], smooth=True)
    for key, by_cfg in selected.items():
        assert by_cfg == full[key], key
    assert all(set(seen) == {t.path for t in LAYER1} for _, seen in calls)
    q = partial_ev.model({1}).model.layers[1].self_attn.q_proj
    assert q.smooth_factor.shape == (q.in_features,) and (q.smooth_factor > 0).all()


def test_no_selection_loads_the_whole_model(demo_model_dirs, caches):
    """Every layer named (as a run without -k names them): the whole model, as before."""
    ev = _evaluation(demo_model_dirs["qwen3"], caches["qwen3"])
    targets = [Target(i, t.block, t.proj) for i in (0, 1) for t in LAYER1]
    ev.score(targets=targets)
    assert ev._model_layers is None and not any(p.is_meta for p in ev.model().parameters())


def test_pytest_k_one_layer(demo_model_dirs, caches, pytester, monkeypatch):
    """The plugin end to end: -k on layer 1 gives the same numbers as the run without -k, and
    the model-level fake_op sees layer 1's linears only."""
    from tokenwise_harness.report import document as report

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    model, cache = demo_model_dirs["qwen3"], caches["qwen3"]
    base = [f"--model-dir={model}", f"--xy-path={cache}", "--ranks", "8", "--qspecs", "nvfp4@16",
            f"--quantizer={OP}", "--update-baselines", f"--baselines-dir={pytester.path / 'b'}",
            "-p", "no:cacheprovider"]
    quantizers.MODEL_OP_CALLS.clear()
    pytester.runpytest(*base, "-k", "layer1-", f"--tokenwise-report={pytester.path / 'k.json'}").assert_outcomes(
        passed=7)
    assert [set(seen) for _, seen in quantizers.MODEL_OP_CALLS] == [{t.path for t in LAYER1}]
    quantizers.MODEL_OP_CALLS.clear()
    pytester.runpytest(*base, f"--tokenwise-report={pytester.path / 'all.json'}").assert_outcomes(passed=14)
    assert [set(seen) for _, seen in quantizers.MODEL_OP_CALLS] == [ALL_LINEARS]
    selected = report.load_report(pytester.path / "k.json")
    every = report.load_report(pytester.path / "all.json")
    assert len(selected["cases"]) == 7 and all("layer1-" in case for case in selected["cases"])
    assert list(selected["by_layer"]) == ["1"] and sorted(every["by_layer"]) == ["0", "1"]
    assert selected["by_layer"]["1"] == every["by_layer"]["1"]  # every metric of every selected case


@pytest.mark.parametrize("dtype", ["auto", "bf16", "fp16"])
def test_kept_layer_equals_from_pretrained(dtype, demo_model_dirs):
    """The kept layer's tensors and dtype are from_pretrained's, for every --torch-dtype."""
    import torch

    from tokenwise_harness.checkpoint import ModelDir, load_model, load_model_layers

    mdir = ModelDir(demo_model_dirs["qwen2"])
    full, partial = load_model(mdir, dtype), load_model_layers(mdir, {0}, dtype)
    want, got = full.model.layers[0].state_dict(), partial.model.layers[0].state_dict()
    assert want.keys() == got.keys() and any(k.endswith(".bias") for k in got)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert not list(partial.model.layers[1].parameters())


def test_bin_checkpoint_and_all_layers_load_whole(demo_model_dirs, tmp_path):
    """A .bin checkpoint has no per-tensor reader: None, and the caller loads the whole model."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from tokenwise_harness.checkpoint import ModelDir, load_model_layers

    src = Path(demo_model_dirs["llama"])
    shutil.copy(src / "config.json", tmp_path / "config.json")
    torch.save(load_file(str(src / "model.safetensors")), tmp_path / "pytorch_model.bin")
    assert load_model_layers(ModelDir(tmp_path), {1}) is None
    assert load_model_layers(ModelDir(src), {0, 1}) is None  # every layer: the whole load, as without -k


def test_more_layers_asked_later(demo_model_dirs, caches):
    """A model holding layer 1 is reused for layer 1; asking for layer 0 too gives the whole model."""
    ev = _evaluation(demo_model_dirs["qwen3"], caches["qwen3"])
    first = ev.model({1})
    assert ev.model({1}) is first and ev._model_layers == {1}
    whole = ev.model({0})
    assert whole is not first and ev._model_layers is None and not any(p.is_meta for p in whole.parameters())
