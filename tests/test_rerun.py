"""pytest_plugin/rerun.py: the re-run command the "no baseline" message prints (its paste
test, which runs the printed command, is in test_plugin.py)."""

import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

from tokenwise_harness.pytest_plugin import rerun


def test_path_options_get_equals_and_update_flags_go():
    args = ["--model-dir", "/models/my model", "-k", "layer1- and nvfp4", "--update-baselines", "-m", "tokenwise",
            "--xy-path=/c/x.safetensors", "--baselines-dir", "b", "--update-baselines-new", "-n", "2", "tests/"]
    assert rerun.normalized_args(args) == [
        "--model-dir=/models/my model", "-k", "layer1- and nvfp4", "-m", "tokenwise", "--xy-path=/c/x.safetensors",
        "--baselines-dir=b", "-n", "2", "tests/"]


def test_command_is_shell_quoted_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = SimpleNamespace(invocation_params=SimpleNamespace(
        args=("--model-dir", "/m o'dd", "-k", "q_proj and not layer1-"), dir=tmp_path))
    cmd = rerun.rerun_command(config, ["--update-baselines-new"])
    words = shlex.split(cmd)
    assert words[-4:] == ["--model-dir=/m o'dd", "-k", "q_proj and not layer1-", "--update-baselines-new"]
    assert words[:-4] in (["pytest"], [sys.executable, "-m", "pytest"])
    # run from elsewhere: the command says where to run it
    monkeypatch.chdir(Path(tmp_path).parent)
    assert shlex.split(rerun.rerun_command(config, []))[:3] == ["cd", str(tmp_path), "&&"]
