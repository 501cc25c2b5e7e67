"""What the suite spends its time on: `pytest -p tests.suite_stats` counts XLA compilations and the
subprocesses the tests start, per test and in all, and prints them after the run (docs/testing.md).

Three counts, because the compilation cache hides some of the work:
- backend compiles in the pytest process(es): XLA really compiled (a cache miss), with their seconds;
- persistent-cache hits there: an executable loaded instead of compiled;
- entries in the session's compilation cache at the end: every program any process (train.py
  subprocesses included) compiled once, since every compile is written there (tests/conftest.py sets
  the size and time thresholds to zero).
Subprocesses are those the test processes start (`subprocess.Popen`); what a child starts (grain
workers, a multi-process run's peers) is not counted.

With pytest-xdist each worker writes its counts beside the cache and the controller sums them. The
controller also sums each test's seconds (setup, call and teardown: pytest-xdist hands it every report)
and prints the 30 slowest tests and the seconds per module."""
import collections
import glob
import json
import os
import shutil
import subprocess
import time

import jax
import pytest

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class _Counts:
    def __init__(self):
        self.current_test = "(collection)"
        self.compiles = collections.Counter()
        self.compile_seconds = collections.Counter()
        self.cache_hits = collections.Counter()
        self.subprocesses = collections.Counter()
        self.commands = collections.Counter()

    def as_dict(self) -> dict:
        return {name: dict(getattr(self, name)) for name in
                ("compiles", "compile_seconds", "cache_hits", "subprocesses", "commands")}


_COUNTS = _Counts()


def _on_duration(event: str, duration: float, **_) -> None:
    if event == _COMPILE_EVENT:
        _COUNTS.compiles[_COUNTS.current_test] += 1
        _COUNTS.compile_seconds[_COUNTS.current_test] += duration


def _on_event(event: str, **_) -> None:
    if event == _CACHE_HIT_EVENT:
        _COUNTS.cache_hits[_COUNTS.current_test] += 1


def _command_name(args) -> str:
    words = [args] if isinstance(args, (str, bytes)) else [str(word) for word in args]
    names = [os.path.basename(word) for word in words[:3] if not word.startswith("-")]
    return " ".join(names[:2])


_original_popen_init = subprocess.Popen.__init__


def _counting_popen_init(self, args, *rest, **kwargs):
    _COUNTS.subprocesses[_COUNTS.current_test] += 1
    _COUNTS.commands[_command_name(args)] += 1
    _original_popen_init(self, args, *rest, **kwargs)


def pytest_configure(config):
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)
    subprocess.Popen.__init__ = _counting_popen_init
    config._suite_stats_start = time.monotonic()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _COUNTS.current_test = item.nodeid
    yield
    _COUNTS.current_test = "(between tests)"


_SECONDS_BY_TEST: collections.Counter = collections.Counter()


def pytest_runtest_logreport(report):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller, or the only process without xdist
        _SECONDS_BY_TEST[report.nodeid] += report.duration


def _stats_dir() -> str:
    return os.environ["JAX_COMPILATION_CACHE_DIR"] + "_stats"


def pytest_sessionfinish(session):
    os.makedirs(_stats_dir(), exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(_stats_dir(), f"{worker}.json"), "w") as stream:
        json.dump(_COUNTS.as_dict(), stream)


def pytest_terminal_summary(terminalreporter, config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    totals = _Counts()
    for path in glob.glob(os.path.join(_stats_dir(), "*.json")):
        with open(path) as stream:
            counts = json.load(stream)
        for name, values in counts.items():
            getattr(totals, name).update(values)
    shutil.rmtree(_stats_dir(), ignore_errors=True)  # read once; the cache itself goes at unconfigure
    cache_entries = [name for name in os.listdir(os.environ["JAX_COMPILATION_CACHE_DIR"])
                     if not name.endswith("-atime")]
    write = terminalreporter.write_line
    terminalreporter.section("suite stats (tests/suite_stats.py)")
    write(f"wall {time.monotonic() - config._suite_stats_start:.0f} s; load average {os.getloadavg()}")
    write(f"backend compiles in the test processes: {sum(totals.compiles.values())} "
          f"({sum(totals.compile_seconds.values()):.0f} s); persistent-cache hits: {sum(totals.cache_hits.values())}")
    write(f"programs in the compilation cache (all processes): {len(cache_entries)}")
    write(f"subprocesses started by tests: {sum(totals.subprocesses.values())}: "
          + ", ".join(f"{name} x{count}" for name, count in totals.commands.most_common()))
    write("most compile seconds (test: compiles, seconds, subprocesses):")
    for test, seconds in totals.compile_seconds.most_common(30):
        write(f"  {test}: {totals.compiles[test]}, {seconds:.1f} s, {totals.subprocesses[test]}")
    write("most subprocesses:")
    for test, count in totals.subprocesses.most_common(15):
        write(f"  {test}: {count}")
    write("slowest 30 tests (seconds, setup + call + teardown):")
    for test, seconds in _SECONDS_BY_TEST.most_common(30):
        write(f"  {seconds:6.1f}  {test}")
    by_module = collections.Counter()
    for test, seconds in _SECONDS_BY_TEST.items():
        by_module[test.split("::")[0]] += seconds
    write(f"seconds by module ({sum(by_module.values()):.0f} s in all, over the workers): "
          + ", ".join(f"{os.path.basename(module)} {seconds:.0f}" for module, seconds in by_module.most_common()))
