"""Numeric TOKENWISE_* settings: a set but unusable value is a one-line error naming the variable,
in the CLI (exit 2, nothing written) and in pytest (a usage error) -- never a traceback, never a
silent fallback to the default."""

from __future__ import annotations

import pytest

import tokenwise_harness.cache  # noqa: F401  (in-process pytester runs: keep these loaded)
import tokenwise_harness.engine  # noqa: F401
import tokenwise_harness.pytest_plugin.session  # noqa: F401
import tokenwise_harness.run  # noqa: F401
import tokenwise_harness.verdict.baselines  # noqa: F401
import tokenwise_harness.verdict.thresholds  # noqa: F401
from tests.helpers import one_line_error, run_cli
from tokenwise_harness.envvars import INT_SETTINGS, check_settings, int_setting
from tokenwise_harness.errors import HarnessError

try:  # hypothesis's pytest plugin imports it at every run's summary: keep it loaded
    import hypothesis  # noqa: F401
except ImportError:
    pass

pytest_plugins = ["pytester"]

BAD = [("TOKENWISE_READ_THREADS", "eight"), ("TOKENWISE_READ_THREADS", "0"), ("TOKENWISE_STREAM_SLOTS", "3"),
       ("TOKENWISE_STREAM_SLOTS", "1.5"), ("TOKENWISE_LOWRANK_STORE_BYTES", "-1"),
       ("TOKENWISE_LOWRANK_STORE_BYTES", "8GB")]


def test_values_defaults_and_refusals(monkeypatch):
    for name in INT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
        assert int_setting(name, 7) == 7
        monkeypatch.setenv(name, " ")
        assert int_setting(name, 7) == 7  # empty is unset
    monkeypatch.setenv("TOKENWISE_STREAM_SLOTS", "2")
    monkeypatch.setenv("TOKENWISE_READ_THREADS", " 12 ")
    monkeypatch.setenv("TOKENWISE_LOWRANK_STORE_BYTES", "0")
    assert (int_setting("TOKENWISE_STREAM_SLOTS", 1), int_setting("TOKENWISE_READ_THREADS", 4),
            int_setting("TOKENWISE_LOWRANK_STORE_BYTES", 5)) == (2, 12, 0)
    check_settings()
    for name, value in BAD:
        monkeypatch.setenv(name, value)
        with pytest.raises(HarnessError, match=f"environment variable {name}='{value}' is not an integer"):
            check_settings()
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tokenwise_harness.capture.save_xy import save_xy
    from tokenwise_harness.demo.models import make_demo_model

    root = tmp_path_factory.mktemp("envvars")
    model = make_demo_model("qwen3", root / "m", num_layers=1)
    cache = save_xy(model, root / "c", "c", cn=1, eu=1, length=16, progress=False, log=lambda m: None)
    return model, cache


@pytest.mark.parametrize(("name", "value"), BAD[::2])
def test_the_cli_refuses_a_bad_setting_in_one_line(tiny, tmp_path, monkeypatch, name, value):
    model, cache = tiny
    monkeypatch.setenv(name, value)
    out = tmp_path / "r.json"
    proc = run_cli("eval_fake", f"--model_dir={model}", f"--xy_path={cache}", "--ranks=8", "--qspecs=nvfp4@16",
                   f"--out_json={out}", "--device=cpu")
    assert f"environment variable {name}='{value}'" in one_line_error(proc)
    assert not out.exists()


def test_pytest_refuses_a_bad_setting_as_a_usage_error(pytester, tiny, monkeypatch):
    model, cache = tiny
    monkeypatch.setenv("TOKENWISE_STREAM_SLOTS", "two")
    result = pytester.runpytest(f"--model-dir={model}", f"--xy-path={cache}", "--ranks=8", "--qspecs=nvfp4@16",
                                "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR: ")]
    assert len(errors) == 1 and "environment variable TOKENWISE_STREAM_SLOTS='two'" in errors[0], result.errlines
    text = "\n".join(result.outlines + result.errlines)
    assert "INTERNALERROR" not in text and "Traceback" not in text
