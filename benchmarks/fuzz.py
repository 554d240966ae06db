"""python -m benchmarks.fuzz [--examples N] [--seed S] [--kinds ...] [--workers W] [--json FILE]: a fuzz campaign.

Runs every hypothesis fuzzer of the tests/test_fuzz*.py files (one "kind" of input each, named
by its TRIED[...] counter) on random inputs from one seed, N per kind, in a pytest subprocess, and reports per
kind the inputs tried, the failures (exception and falsifying example) and the time. Exits 1 when anything failed.
Not part of the test suite. Loaded into that subprocess with `-p benchmarks.fuzz`, this module is also the pytest
plugin that does the counting.
"""

from __future__ import annotations

import argparse
import ast
import glob
import inspect
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = tuple(sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_fuzz*.py"))))
_PROPERTY = "dualenc_fuzz"
_TEXT_LIMIT = 600  # characters kept of an exception message or a falsifying example


# ------------------------------------------------------------------------------------------------ pytest plugin

def _kind(test) -> str:
    """The TRIED[...] key a fuzzer counts under (its function name when it counts none)."""
    inner = test.hypothesis.inner_test
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(inner)))):
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "TRIED"
                and isinstance(node.slice, ast.Constant)):
            return node.slice.value
    return inner.__name__


def pytest_collection_modifyitems(config, items):
    wanted = set(json.loads(os.environ.get("DUALENC_FUZZ_KINDS", "[]")))
    kept, dropped, kinds, names = [], [], set(), set()
    for item in items:
        if not getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            dropped.append(item)
            continue
        item.fuzz_kind = _kind(item.obj)
        kinds.add(item.fuzz_kind)
        names.add(item.name)
        (kept if not wanted or wanted & {item.fuzz_kind, item.name} else dropped).append(item)
    if wanted - kinds - names:
        raise pytest.UsageError(f"unknown fuzz kinds {sorted(wanted - kinds - names)}; the kinds are "
                                f"{sorted(kinds)} (or their test functions' names)")
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """Counts the fuzzer's calls (its TRIED delta) and keeps hypothesis' per-phase statistics of the run."""
    from hypothesis.statistics import collector

    counter = getattr(sys.modules.get("test_fuzz"), "TRIED", None)
    before = dict(counter or {})
    outer = collector.value

    def keep(stats):
        pyfuncitem.fuzz_stats = stats
        if outer is not None:  # --hypothesis-show-statistics still gets them
            outer(stats)

    with collector.with_value(keep):
        yield
    pyfuncitem.fuzz_tried = {k: v - before.get(k, 0) for k, v in (counter or {}).items() if v != before.get(k, 0)}


def _phases(stats) -> dict:
    """Calls per phase of one hypothesis run: generated (valid or failing), invalid (rejected), shrinking."""
    out = {"generated": 0, "invalid": 0, "shrinking": 0}
    for phase, d in (stats or {}).items():
        if not phase.endswith("-phase"):
            continue
        for case in d.get("test-cases", []):
            if phase in ("shrink-phase", "explain-phase"):
                out["shrinking"] += 1
            elif case["status"] in ("valid", "interesting"):
                out["generated"] += 1
            else:
                out["invalid"] += 1
    out["stopped_because"] = (stats or {}).get("stopped-because")
    return out


def _cut(text: str) -> str:
    return text if len(text) <= _TEXT_LIMIT else text[:_TEXT_LIMIT] + f"... <{len(text) - _TEXT_LIMIT} more>"


def _failures(error: BaseException) -> list[dict]:
    """One entry per distinct failure (hypothesis raises an ExceptionGroup when it found several)."""
    if isinstance(error, BaseExceptionGroup):
        return [f for sub in error.exceptions for f in _failures(sub)]
    kind = type(error)
    notes = [n for n in getattr(error, "__notes__", []) if n.startswith("Falsifying")]
    return [{"type": kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}",
             "message": _cut(str(error)), "example": _cut("\n".join(notes)) if notes else None}]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    if call.when == "call" and hasattr(item, "fuzz_kind"):  # user_properties travel with the report (xdist too)
        failed = call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception)
        record = {"kind": item.fuzz_kind, "tried": getattr(item, "fuzz_tried", {}),
                  **_phases(getattr(item, "fuzz_stats", None)),
                  "failures": _failures(call.excinfo.value) if failed else []}
        item.user_properties.append((_PROPERTY, json.dumps(record)))
    yield


_RECORDS: dict[str, dict] = {}


def pytest_runtest_logreport(report):
    record = _RECORDS.setdefault(report.nodeid, {"seconds": {}, "outcome": "passed"})
    record["seconds"][report.when] = report.duration
    for name, value in report.user_properties:
        if name == _PROPERTY:
            record.update(json.loads(value))
    if report.skipped:
        record["outcome"] = "skipped"
    if report.failed:
        record["outcome"] = "failed"
        if not record.get("failures"):  # a fixture's error, or a worker that died: no structured record
            record.setdefault("errors", []).append(
                {"when": report.when, "message": _cut(report.longreprtext.strip().splitlines()[-1]
                                                      if report.longreprtext.strip() else "")})


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("DUALENC_FUZZ_RECORDS")
    if path and not hasattr(session.config, "workerinput"):  # the controller (or the only process) writes
        with open(path, "w") as f:
            json.dump({"pytest_exit_status": int(exitstatus), "tests": _RECORDS}, f)


# ------------------------------------------------------------------------------------------------ the campaign

def campaign(examples: int, seed: int, kinds=(), workers: int = 1, log=None) -> dict:
    """Runs the fuzzers in a pytest subprocess; returns the summary (what --json writes)."""
    with tempfile.TemporaryDirectory(prefix="dualenc-fuzz-campaign-") as tmp:
        records = os.path.join(tmp, "records.json")
        env = {**os.environ, "DUALENC_FUZZ_EXAMPLES": str(examples), "DUALENC_FUZZ_RANDOM": "1",
               "DUALENC_FUZZ_RECORDS": records, "DUALENC_FUZZ_KINDS": json.dumps(list(kinds)),
               "HYPOTHESIS_STORAGE_DIRECTORY": os.path.join(tmp, "hypothesis"),  # nothing written in the checkout
               "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
        command = [sys.executable, "-m", "pytest", "-q", "--tb=line", "--disable-warnings", "-p", "no:cacheprovider",
                   "-p", "benchmarks.fuzz", f"--hypothesis-seed={seed}", "--basetemp", os.path.join(tmp, "pytest"),
                   *(["-n", str(workers), "--dist", "worksteal"] if workers > 1 else ["-p", "no:xdist"]), *FILES]
        started = time.perf_counter()
        run = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
        try:
            with open(records) as f:
                found = json.load(f)
        except FileNotFoundError:
            found = {"pytest_exit_status": run.returncode, "tests": {}}
    import hypothesis

    out = {"seed": seed, "examples": examples, "workers": workers, "wall_seconds": wall,
           "pytest_exit_status": run.returncode, "command": " ".join(command),
           "machine": {"python": platform.python_version(), "hypothesis": hypothesis.__version__,
                       "cpu_count": os.cpu_count(), "platform": platform.platform()},
           "kinds": {}}
    for nodeid, record in found["tests"].items():
        kind = record.get("kind", nodeid)
        tried = sum(record.get("tried", {}).values())
        call = record["seconds"].get("call", 0.0)
        out["kinds"][kind] = {
            "test": nodeid, "outcome": record["outcome"], "tried": tried,
            **{k: record.get(k) for k in ("generated", "invalid", "shrinking", "stopped_because")},
            "seconds": call, "setup_seconds": record["seconds"].get("setup", 0.0),
            "seconds_per_1000": 1000 * call / tried if tried else None,
            "failures": record.get("failures", []) + record.get("errors", [])}
    out["kinds"] = dict(sorted(out["kinds"].items(), key=lambda item: item[0].lower()))
    out["failed_kinds"] = sorted(k for k, v in out["kinds"].items() if v["outcome"] == "failed")
    return out


def table(summary: dict) -> str:
    lines = [f"fuzz campaign: seed {summary['seed']}, {summary['examples']} inputs per kind asked, "
             f"{summary['workers']} worker(s), hypothesis {summary['machine']['hypothesis']}",
             f"{'kind':34} {'tried':>7} {'generated':>9} {'invalid':>7} {'shrinking':>9} {'seconds':>8} "
             f"{'s/1000':>7}  stopped because"]
    for kind, k in summary["kinds"].items():
        per = f"{k['seconds_per_1000']:.2f}" if k["seconds_per_1000"] is not None else "-"
        lines.append(f"{kind:34} {k['tried']:>7} {k['generated'] or 0:>9} {k['invalid'] or 0:>7} "
                     f"{k['shrinking'] or 0:>9} {k['seconds']:>8.1f} {per:>7}  "
                     f"{k['outcome'].upper() if k['outcome'] != 'passed' else k['stopped_because']}")
    for kind in summary["failed_kinds"]:
        k = summary["kinds"][kind]
        lines.append(f"\nFAILED {kind} ({k['test']}):")
        for failure in k["failures"]:
            head = f"{failure['type']}: " if "type" in failure else f"error in {failure.get('when')}: "
            lines.append("  " + head + failure["message"].replace("\n", "\n    "))
            if failure.get("example"):
                lines.append("    " + failure["example"].replace("\n", "\n    "))
    if summary["pytest_exit_status"] not in (0, 1):
        lines.append(f"\npytest stopped with exit status {summary['pytest_exit_status']}: see its output")
    total = sum(k["tried"] for k in summary["kinds"].values())
    lines.append(f"\n{len(summary['kinds'])} kinds, {total} inputs tried, {len(summary['failed_kinds'])} kind(s) "
                 f"failed; pytest exit status {summary['pytest_exit_status']}; wall {summary['wall_seconds']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="inputs per kind (default 10000)")
    parser.add_argument("--seed", type=int, help="hypothesis' seed (default: a random one, reported)")
    parser.add_argument("--kinds", nargs="+", default=[], metavar="KIND",
                        help="only these kinds (TRIED names such as 'caption files', or test function names)")
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist workers (default 1: no xdist)")
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--log", help="keep pytest's own output here (default: shown on stderr)")
    args = parser.parse_args(argv)
    if args.examples < 1 or args.workers < 1:
        parser.error("--examples and --workers must be at least 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 32)
    log = open(args.log, "w") if args.log else sys.stderr
    try:
        summary = campaign(args.examples, seed, args.kinds, args.workers, log)
    finally:
        if args.log:
            log.close()
    print(table(summary))
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
        print(f"wrote {args.json}")
    ran = summary["kinds"] and all(k["outcome"] == "passed" for k in summary["kinds"].values())
    return 0 if summary["pytest_exit_status"] == 0 and ran else 1


if __name__ == "__main__":
    sys.exit(main())
