"""pytest wiring of the benchmarks' harness (``harness.py``): pinned threads and the machine's
load in the header, the ``device`` and ``bench`` fixtures, result files at the end."""
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels' tiny cases run on CPU tensors through the interpreter. Set
# before any kernel module is imported: @triton.jit reads it when the kernel is defined.
# (auto backends never pick the interpreter, so the other benchmarks are unaffected.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import harness` from any rootdir

import harness  # noqa: E402
from genjo_fast import timing  # noqa: E402

THREADS = timing.pin_threads()
_RECORDS = {}  # result file -> {case id: record}
_BUSY = []


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_report_header(config):
    load = timing.sample_load(THREADS)
    repeats = (f"GENJO_FAST_BENCH_REPEATS={harness._REPEATS} rounds" if harness._REPEATS
               else "rounds per case")
    return [f"genjo_fast benchmarks on {harness.device_name(_device())}: {THREADS} torch "
            f"thread(s) (GENJO_FAST_BENCH_THREADS), {harness.WARMUP} warm-up call(s), "
            f"{repeats}, quick mode {'on' if harness.QUICK else 'off'}, targets "
            f"{harness.TARGETS}",
            "machine load: " + load.describe()]


@pytest.fixture(scope="session")
def device():
    return _device()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.bench_call_passed = report.passed
    return report


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    result = yield
    case = pyfuncitem.funcargs.get("bench")
    if case is not None and case.missed:  # after the body: every figure is recorded first
        pytest.fail(f"target missed: {'; '.join(case.missed)} (GENJO_FAST_BENCH_TARGETS=off "
                    f"records without checking)", pytrace=False)
    return result


@pytest.fixture
def bench(request, benchmark, device):
    """The :class:`harness.Case` of this test (needs ``--benchmark-only`` or a plain run)."""
    module = request.node.path.stem.removeprefix("test_bench_")
    case = harness.Case(request.node.nodeid.split("/")[-1], module, device, THREADS,
                        benchmark.extra_info, benchmark.pedantic)
    yield case
    passed = getattr(request.node, "bench_call_passed", False)
    if not case.sides or not (passed or case.missed):
        return  # not measured, skipped, or a check failed: a wrong result posts no figures
    print("\n" + case.summary())
    _RECORDS.setdefault(harness.results_path(case.device), {})[case.nodeid] = case.record()
    if case.load is not None and case.load.busy:
        _BUSY.append(case.nodeid)


def pytest_sessionfinish(session):
    for path, records in _RECORDS.items():
        harness.save(records, path)


def pytest_terminal_summary(terminalreporter):
    if not _RECORDS:
        return
    tr = terminalreporter
    tr.section("genjo_fast benchmark records")
    for path, records in _RECORDS.items():
        tr.write_line(f"{len(records)} case(s) recorded in {path}")
    if _BUSY:
        tr.write_line(f"WARNING: {len(_BUSY)} case(s) ran on a busy machine (figures unreliable, "
                      f"targets not checked): {', '.join(_BUSY)}")
    tr.write_line("regenerate benchmarks/RESULTS.md: python benchmarks/render_results.py")
