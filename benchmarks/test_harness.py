"""The harness itself (not a benchmark: ``--benchmark-only`` skips it). Run with
``python -m pytest benchmarks/test_harness.py -q``."""
import copy

import pytest
import torch

import render_results
from genjo_fast import timing


def test_measure_warms_up_then_alternates():
    calls = []

    def side(name):
        def call():
            calls.append(name)
            return len(calls)
        return call

    sides = timing.measure({"a": side("a"), "b": side("b")}, torch.device("cpu"), repeats=3,
                           warmup=1, warmup_sides={"a": side("a-warm")})
    assert calls == ["a-warm", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(s.seconds) for s in sides.values()] == [3, 3]
    assert sides["a"].out == 7 and sides["b"].out == 8  # the last timed call's output
    assert sides["a"].median == sorted(sides["a"].seconds)[1]
    assert sides["a"].peak is None


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        timing.measure({"a": lambda: 0}, torch.device("cpu"), repeats=0)
    with pytest.raises(ValueError, match="warmup_sides names unknown sides"):
        timing.measure({"a": lambda: 0}, torch.device("cpu"), repeats=1,
                       warmup_sides={"b": lambda: 0})


def test_env_int_names_the_variable(monkeypatch):
    monkeypatch.setenv("GENJO_FAST_BENCH_THREADS", "two")
    with pytest.raises(ValueError, match="GENJO_FAST_BENCH_THREADS must be an integer"):
        timing.pin_threads()
    monkeypatch.setenv("GENJO_FAST_BENCH_THREADS", "0")
    with pytest.raises(ValueError, match="GENJO_FAST_BENCH_THREADS must be >= 1"):
        timing.pin_threads()


def test_pin_threads_sets_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("GENJO_FAST_BENCH_THREADS", "2")
        assert timing.pin_threads() == 2 and torch.get_num_threads() == 2
        assert timing.pin_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cores, threads, others, busy", [
    (2, 1, 0.4, False), (2, 1, 0.6, True), (2, 2, 0.2, False), (2, 2, 0.3, True),
    (16, 1, 14.0, False), (16, 1, 14.6, True)])
def test_load_busy_rule(cores, threads, others, busy):
    load = timing.Load(cores=cores, threads=threads, loadavg=0.0, others=others)
    assert load.busy is busy
    assert ("WARNING" in load.describe()) is busy


def test_load_meter_counts_other_processes_only(monkeypatch):
    clock = {"wall": 10.0, "busy": 100.0, "own": 5.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(timing, "_system_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(timing, "_own_seconds", lambda: clock["own"])
    meter = timing.LoadMeter(threads=1)
    # 2 s of wall time: all processes used 3 CPU seconds, this one 1 of them
    clock.update(wall=12.0, busy=103.0, own=6.0)
    assert meter.read().others == pytest.approx(1.0)


def test_peak_memory_sees_an_allocation():
    result = {}
    with timing.peak_memory(torch.device("cpu"), result):
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        del x
    assert 60 * 2**20 <= result["peak"] < 200 * 2**20


RECORD = dict(module="demo", row={"case": "one"}, setting={}, checks=["equal (exact)"],
              sides={"reference": dict(median_s=2.0, times_s=[2.0], peak_mib=100.0),
                     "genjo_fast": dict(median_s=0.5, times_s=[0.5], peak_mib=10.0)},
              figures={"speed-up": dict(value=4.0, unit="x")},
              targets=[dict(name="speed-up", minimum=3.0, value=4.0, status="met")],
              date="2026-11-22T00:00:00+00:00", device="cpu (test, 2 cores)", python="3",
              torch="2", triton="3", threads=1, repeats=1, warmup=1, quick=True,
              load=dict(cores=2, threads=1, loadavg_1min=2.0, other_cores=1.2, busy=True))


def test_render_a_record():
    second = copy.deepcopy(RECORD)
    second["row"] = {"case": "two"}
    text = render_results.render("# t\n\n{{ demo }}\n\n{{ absent }}\n",
                                 {"demo": {"cpu": (True, [RECORD, second])}})
    assert "QUICK MODE" in text and "2 of 2 case(s) measured on a BUSY machine" in text
    assert "| one | 2.00 s | 500 ms | 100 MiB | 10 MiB | 4x | speed-up >= 3: met | " \
           "1.2/2 **busy** |" in text
    assert "Checked (a failed check fails the benchmark and records nothing): equal (exact)." \
        in text
    assert "_No recorded run of `benchmarks/test_bench_absent.py` yet._" in text


def test_results_md_is_rendered_from_the_records():
    assert render_results.main(["--check"]) == 0, \
        "benchmarks/RESULTS.md is stale: run python benchmarks/render_results.py"
