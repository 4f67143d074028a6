"""Repo-level conftest: shows the intended use of the harness.

`pytest --model-dir M ...` is a precision gate run, separate from this repo's unit tests:
when a harness option is given, tests/ is not collected, so the run holds only the generated
tokenwise cases (`pytest --model-dir M -k q_proj` selects exactly the q_proj cases).
The harness itself comes from the installed package's pytest11 entry point; nothing needs
to be imported here.
"""

HARNESS_OPTIONS = ("model_dir", "smooth_model_dir", "xy_path")


def pytest_cmdline_main(config):
    """A gate run loads neither pytest-benchmark nor hypothesis's plugin (test/bench extras here,
    for tests/ and bench/): installed, the first prints its header into the gate's output and
    creates .benchmarks/, the second imports all of hypothesis at the terminal summary (~0.4 s
    with compiled bytecode, 2-3 s where pytest re-rewrites its asserts on every run)."""
    if any(config.getoption(name, None) for name in HARNESS_OPTIONS):
        config.pluginmanager.set_blocked("benchmark")
        config.pluginmanager.set_blocked("hypothesispytest")


def pytest_ignore_collect(collection_path, config):
    if any(config.getoption(name, None) for name in HARNESS_OPTIONS):
        return "tests" in collection_path.parts or "bench" in collection_path.parts
    return None
