"""The console script's surface (issue 19, items 4 and 5; issue 17's fast --help): help text
with an example for every subcommand and flag, both spellings of each, the seed's forms
first, closest-name suggestions, `formats` from the registry, `cache ls|prune`, --help with
neither torch nor transformers imported, and pytest-benchmark kept out of gate runs.
"""

import argparse
import gc
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tokenwise_harness.cache  # noqa: F401  (in-process pytester runs: keep these loaded)
import tokenwise_harness.engine  # noqa: F401
import tokenwise_harness.pytest_plugin.session  # noqa: F401
import tokenwise_harness.run  # noqa: F401
import tokenwise_harness.verdict.baselines  # noqa: F401
import tokenwise_harness.verdict.thresholds  # noqa: F401
from tests.helpers import one_line_error, run_cli
from tokenwise_harness.cache_store import CacheStore
from tokenwise_harness.cli import PROG, build_parser, parse_args

try:  # hypothesis's pytest plugin imports it at every run's summary: keep it loaded
    import hypothesis  # noqa: F401
except ImportError:
    pass

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
# The seed's flags (DESIGN.md "User-facing contracts"), underscored, shown first in --help.
SEED_FLAGS = ("--model_dir", "--xy_path", "--out_json", "--ranks", "--qspecs", "--grid_mode", "--chunk_tokens",
              "--no_restore", "--smooth_model_dir", "--seed", "--cn", "--eu", "--length", "--torch_dtype",
              "--device_map", "--save_dtype", "--use_cache", "--save_path", "--label")


def subcommands(parser=None, prefix=()):
    """(path, parser) of every (leaf or not) subcommand, each once under its first spelling."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                yield (*prefix, name), sub
                yield from subcommands(sub, (*prefix, name))


def flags(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


# ---------------------------------------------------------------- help text


def test_every_subcommand_and_flag_has_help_with_an_example():
    top = build_parser()
    assert all("e.g." in a.help for a in flags(top))
    assert "the three flows" in top.epilog
    missing = []
    for path, sub in subcommands():
        name = " ".join(path)
        if not sub.description or f"example:\n  {PROG} {name}" not in (sub.epilog or ""):
            missing.append(f"{name}: description / example")
        for a in flags(sub):
            if not a.help or "e.g." not in a.help:
                missing.append(f"{name} {a.option_strings[0]}: {a.help!r}")
    assert missing == []


def test_help_lists_what_each_subcommand_does_and_both_spellings(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert re.search(r"save_xy \(save-xy\)\s+cache every allowlisted projection", out)
    assert re.search(r"make-demo-model \(make_demo_model\)\s+build a small", out)
    for cmd in ("eval_fake", "eval_smooth", "smooth", "analyze", "formats", "cache", "import-gguf", "demo"):
        assert re.search(rf"^    {cmd}\b.*\s+\w+", out, re.M), cmd
    with pytest.raises(SystemExit):
        parse_args(["save-xy", "--help"])
    out = capsys.readouterr().out
    assert "--model_dir, --model-dir MODEL_DIR" in out and "--use_cache, --use-cache" in out
    assert f"example:\n  {PROG} save_xy --model_dir" in out


# ---------------------------------------------------------------- spellings


def test_both_spellings_of_every_flag_seed_form_first():
    for path, sub in [((), build_parser()), *subcommands()]:
        for a in flags(sub):
            longs = [o for o in a.option_strings if o.startswith("--")]
            body = longs[0][2:]
            if "_" in body or "-" in body:
                assert sorted(longs) == sorted({"--" + body.replace("-", "_"), "--" + body.replace("_", "-")}), longs
            if longs[0].replace("-", "_").replace("__", "--", 1) in SEED_FLAGS:
                assert longs[0] in SEED_FLAGS, (path, longs)  # the seed's (underscored) form first


def test_both_spellings_parse_the_same():
    seed = ["save_xy", "--model_dir", "m", "--save_path", "s", "--label", "l", "--save_dtype", "fp32", "--use_cache"]
    dashed = ["save-xy", "--model-dir=m", "--save-path", "s", "--label", "l", "--save-dtype", "fp32", "--use-cache"]
    a, b = vars(parse_args(seed)), vars(parse_args(dashed))
    assert a.pop("_parser").prog == b.pop("_parser").prog == f"{PROG} save_xy"
    assert a == b and a["command"] == "save_xy" and a["save_dtype"] == "fp32" and a["use_cache"] is True
    a = parse_args(["make_demo_model", "--out", "o"])
    assert a.command == "make-demo-model" and a.out == "o"
    assert parse_args(["cache", "prune", "--older-than", "3"]).older_than == 3.0


def test_the_readme_flows_parse_verbatim():
    """README "The three flows": every command, optional flags included, parses as written."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## The three flows", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    assert len(commands) == 5
    for cmd in commands:
        argv = cmd.replace("[", "").replace("]", "").split()
        assert argv[0] == PROG
        args = parse_args(argv[1:])
        assert args.command == argv[1]


# ---------------------------------------------------------------- suggestions


@pytest.mark.parametrize("argv, expect", [
    (["savexy"], "invalid choice: 'savexy'; did you mean save_xy?"),
    (["eval-fak"], "did you mean eval_fake?"),
    (["save_xy", "--modeldir", "m", "--save_path", "s", "--label", "l"], "--modeldir; did you mean --model_dir?"),
    (["save-xy", "--model-dir", "m", "--save-path", "s", "--label", "l", "--lenght", "3"], "did you mean --length?"),
    (["demo", "--model", "smol"], "invalid choice: 'smol'; did you mean smollm2?"),
    (["cache", "lss"], "did you mean ls?"),
    (["eval_fake", "--model_dir", "m", "--xy_path", "x", "--out_json", "{tmp}/r.json", "--qspecs", "nvfp@16"],
     "unknown format 'nvfp'; did you mean nvfp4?"),
], ids=["command", "command-dashed", "flag-missing-required", "flag", "choice", "nested-command", "qspec-format"])
def test_errors_suggest_the_closest_name(argv, expect, tmp_path):
    line = one_line_error(run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in argv]))
    assert line.startswith(f"{PROG}") and expect in line, line


# ---------------------------------------------------------------- formats


def test_formats_lists_the_registry(monkeypatch):
    from tokenwise_harness.numerics import formats

    proc = run_cli("formats")
    assert proc.returncode == 0
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.strip() and not line.startswith("use")}
    assert set(rows) == set(formats.FORMATS)
    for name, spec in formats.FORMATS.items():
        assert rows[name].split()[:2] == [name, str(spec.default_blk)] and rows[name].endswith(spec.description)
    assert "--qspecs FMT@BLK" in proc.stdout
    # read from the registry at run time, not a copy: a new format shows up
    extra = formats.FormatSpec("int3", 32, "a format added to the registry", "int", (-3.0, 3.0), "fp32")
    monkeypatch.setitem(formats.FORMATS, "int3", extra)
    assert re.search(r"^int3\s+32\s+int\s+fp32\s+a format added to the registry$", run_cli("formats").stdout, re.M)


# ---------------------------------------------------------------- cache ls / prune


def test_cache_ls_and_prune(tmp_path, monkeypatch):
    store = CacheStore(tmp_path / "uc")
    entries = {}
    for name, days, tokens, size in (("old", 40, 10400, 2 * 2**20), ("new", 0.5, 64, 1000)):
        entry = store.xy_path(name, "a" * 64, "b" * 64)
        store.ensure(entry, lambda e=entry, n=size: e.write_bytes(b"x" * n), {"model_name": name, "n_tokens": tokens})
        os.utime(store.record_path(entry), (time.time() - days * 86400,) * 2)
        entries[name] = entry

    monkeypatch.setenv("TOKENWISE_CACHE_DIR", str(tmp_path / "uc"))  # the default root
    out = run_cli("cache", "ls").stdout.splitlines()
    assert out[0] == f"cache dir: {tmp_path / 'uc'} (2 entries, 2.0 MiB)"
    assert out[1].split() == ["kind", "model", "tokens", "size", "last", "used", "path"]
    assert re.fullmatch(rf"xy\s+old\s+10,400\s+2\.0 MiB\s+40\.0 d ago\s+{re.escape(str(entries['old']))}", out[2])
    assert re.fullmatch(rf"xy\s+new\s+64\s+1000 B\s+12\.0 h ago\s+{re.escape(str(entries['new']))}", out[3])

    monkeypatch.delenv("TOKENWISE_CACHE_DIR")
    flag = ["--cache-dir", str(tmp_path / "uc")]
    dry = run_cli("cache", "prune", "--older_than", "30", "--dry_run", *flag)
    assert dry.stdout.splitlines()[0] == f"would remove xy {entries['old']} (2.0 MiB)" and entries["old"].exists()
    proc = run_cli("cache", "prune", "--older-than", "30", *flag)
    assert proc.returncode == 0 and not entries["old"].exists() and entries["new"].exists()
    assert proc.stdout.splitlines()[-1] == f"removed 1 entry, 2.0 MiB, from {tmp_path / 'uc'}"
    assert "give one of them" in one_line_error(run_cli("cache", "prune", "--all", "--older_than", "1", *flag))
    assert "--older_than DAYS or --all" in one_line_error(run_cli("cache", "prune", *flag))
    assert run_cli("cache", "prune", "--all", *flag).returncode == 0 and not entries["new"].exists()
    assert run_cli("cache", "ls", *flag).stdout.startswith(f"cache dir: {tmp_path / 'uc'} (0 entries, 0 B)")


# ---------------------------------------------------------------- --help is fast

HELP_PROBE = """
import sys, time
from tokenwise_harness.cli import main
started = time.perf_counter()
for argv in {argvs!r}:
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
heavy = sorted(m for m in ("torch", "transformers", "safetensors", "numpy", "tokenizers") if m in sys.modules)
print("HEAVY", ",".join(heavy) or "-", "SECONDS", round(time.perf_counter() - started, 3))
"""


def test_help_and_cache_ls_import_neither_torch_nor_transformers(tmp_path):
    argvs = [["--help"], ["--version"]] + [[*path, "--help"] for path, _ in subcommands()] + [["cache", "ls"]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENWISE_CACHE_DIR": str(tmp_path / "uc")}
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE.format(argvs=argvs)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    heavy = proc.stdout.split("HEAVY ")[1].split()[0]
    assert heavy == "-", heavy  # every --help, and cache ls, without torch/transformers/numpy
    assert "save_xy (save-xy)" in proc.stdout and "cache dir:" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "tokenwise_harness", "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {PROG}")


# ---------------------------------------------------------------- dependencies (item 4)


def test_pytest_benchmark_is_not_a_runtime_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = [re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]]
    assert "pytest-benchmark" not in names and "filelock" in names
    for extra in ("test", "bench"):
        assert any(d.startswith("pytest-benchmark") for d in project["optional-dependencies"][extra]), extra


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tokenwise_harness.capture.save_xy import save_xy
    from tokenwise_harness.demo.models import make_demo_model

    root = tmp_path_factory.mktemp("cli_gate")
    model = make_demo_model("qwen3", root / "m", num_layers=1)
    cache = save_xy(model, root / "c", "c", cn=1, eu=1, length=16, progress=False, log=lambda m: None)
    gc.collect()
    gc.freeze()
    yield model, cache
    gc.unfreeze()


def test_a_gate_run_shows_nothing_of_pytest_benchmark(pytester, tiny):
    """The repo's conftest.py keeps pytest-benchmark (a test/bench extra) out of gate runs: no
    header line, no .benchmarks/. A plain test run in the same project still has it (control)."""
    model, cache = tiny
    pytester.makeconftest((REPO / "conftest.py").read_text(encoding="utf-8"))
    result = pytester.runpytest(f"--model-dir={model}", f"--xy-path={cache}", "--ranks=8", "--qspecs=nvfp4@16",
                                "-k", "q_proj", "--update-baselines", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not re.search(r"^benchmark:", result.stdout.str(), re.M)
    assert not (pytester.path / ".benchmarks").exists()
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        return
    pytester.makepyfile(test_plain="def test_one():\n    pass\n")
    control = pytester.runpytest("test_plain.py", "-p", "no:cacheprovider")
    control.assert_outcomes(passed=1)
    assert re.search(r"^benchmark:", control.stdout.str(), re.M) and (pytester.path / ".benchmarks").is_dir()
