"""Test tiers: every test has exactly one, so each loop runs only what it can afford.

- ``unit``: one process, no second interpreter, no process group across processes. The loop of
  seconds: ``python -m pytest -q -m unit tests``. Any test without a tier gets this one.
- ``gloo``: more than one process without the trainer: ranks over a gloo group (mp.spawn +
  file:// store), the deepspeed launcher running a small worker script, or a second interpreter
  checking that a result is the same in another process.
- ``e2e``: the real launcher running the trainer (tests/e2e), or a tool run end to end as a CLI.

A module that spawns processes says so in one line near its top (``pytestmark =
pytest.mark.gloo``); a module that mixes tiers marks its spawning tests one by one. Two tiers on
one test stop the run. While a ``unit`` test runs, starting a process raises, so a test that
needs one is told to take the ``gloo`` or ``e2e`` mark instead of silently slowing the loop.
"""

import multiprocessing.process
import sys

import pytest

TIERS = {
    "unit": "one process, no process group across processes: the seconds-long loop (the default tier)",
    "gloo": "several processes without the trainer: gloo ranks, the launcher on a worker script, "
            "or a second interpreter",
    "e2e": "the real launcher running the trainer, or a tool run end to end",
}

# Audit events raised whenever Python starts a process (fork, exec, posix_spawn, subprocess).
_SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
                           "os.exec", "os.system"})
_guard = {"test": None}  # node id of the unit test now running, or None


def pytest_configure(config):
    for name, help_ in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {help_}")
    if config.option.durations is None:  # the slowest tests in every log (CI's budget is watched)
        config.option.durations = 15


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects, so untiered tests are already ``unit``
def pytest_collection_modifyitems(config, items):
    clashes = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if not tiers:
            item.add_marker(pytest.mark.unit)
        elif len(tiers) > 1:
            clashes.append(f"{item.nodeid}: {' and '.join(tiers)}")
    if clashes:
        raise pytest.UsageError("each test takes exactly one tier (unit, gloo, e2e); these have more:\n  "
                                + "\n  ".join(clashes))


def _refuse_in_unit_test(what: str) -> None:
    if _guard["test"] is not None:
        raise RuntimeError(f"unit test {_guard['test']} started a process ({what}); "
                           "mark it pytest.mark.gloo or pytest.mark.e2e")


def _audit(event, args):
    if event in _SPAWN_EVENTS:
        _refuse_in_unit_test(event)


sys.addaudithook(_audit)
# multiprocessing's spawn and forkserver start methods exec through _posixsubprocess directly,
# which raises no audit event; every start method goes through BaseProcess.start.
_start = multiprocessing.process.BaseProcess.start


def _guarded_start(self):
    _refuse_in_unit_test("multiprocessing start")
    return _start(self)


multiprocessing.process.BaseProcess.start = _guarded_start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _guard["test"] = item.nodeid if item.get_closest_marker("unit") else None
    try:
        return (yield)
    finally:
        _guard["test"] = None
