"""Timing on a shared machine: pinned torch threads, warm-up, median of interleaved repeats,
peak memory, and how busy the machine was while the timings ran.

The demo (``python -m genjo_fast.demo``) and the benchmarks' harness (``benchmarks/harness.py``)
measure through this module. On a small shared machine an unpinned torch runs one OpenMP
thread per core and spins against the other processes (a matmul loop took 23 ms per iteration
with 2 threads and 0.6 ms with 1 while the other core was busy), and a first call pays for
lazy initialisation, so both sides are timed with pinned threads, after a warm-up, as the
median of several repeats run alternately (the ratio of two sides then comes from the same
moments of the same process).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

THREADS_ENV = "GENJO_FAST_BENCH_THREADS"
DEFAULT_THREADS = 1


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """The integer environment variable ``name`` (``default`` when unset or empty).

    Raises:
        ValueError: naming the variable when its value is not an integer ``>= minimum``.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def pin_threads(threads: Optional[int] = None) -> int:
    """Sets torch's intra-op thread count and returns it.

    Args:
        threads: the count; ``None`` reads ``GENJO_FAST_BENCH_THREADS`` (default 1).
    """
    if threads is None:
        threads = env_int(THREADS_ENV, DEFAULT_THREADS)
    elif threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def _system_busy_seconds() -> Optional[float]:
    """CPU seconds all processes have used since boot (``/proc/stat``); ``None`` off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    times = os.times()
    return times.user + times.system


@dataclass
class Load:
    """How busy the machine was while a measurement ran.

    ``others`` is the average number of cores that other processes used meanwhile (from
    ``/proc/stat`` minus this process's own CPU time); off Linux it is estimated from the
    1-minute load average. The machine counts as busy when the other processes used more than
    ``cores - threads - 0.5`` cores (less than half a core left free beyond this process's
    ``threads``), or more than a quarter of a core when ``threads`` takes every core.
    """
    cores: int
    threads: int
    loadavg: float
    others: float

    @property
    def busy(self) -> bool:
        return self.others > max(self.cores - self.threads - 0.5, 0.25)

    def describe(self) -> str:
        text = (f"other processes used {self.others:.1f} of {self.cores} cores (1-min load "
                f"average {self.loadavg:.2f}); {self.threads} torch thread"
                f"{'s' if self.threads > 1 else ''}")
        if self.busy:
            text += ("\nWARNING: the machine is busy: times are inflated and ratios can swing "
                     "several-fold; rerun on a quiet machine before trusting them")
        return text

    def as_dict(self) -> Dict[str, Any]:
        return dict(cores=self.cores, threads=self.threads, loadavg_1min=round(self.loadavg, 2),
                    other_cores=round(self.others, 2), busy=self.busy)


class LoadMeter:
    """Measures :class:`Load` from its creation to each :meth:`read`."""

    def __init__(self, threads: int):
        self.threads = threads
        self._start = (time.perf_counter(), _system_busy_seconds(), _own_seconds())

    def read(self) -> Load:
        wall0, busy0, own0 = self._start
        wall, busy, own = time.perf_counter(), _system_busy_seconds(), _own_seconds()
        loadavg = os.getloadavg()[0]
        cores = os.cpu_count() or 1
        if busy is None or busy0 is None or wall - wall0 < 0.05:
            others = max(0.0, loadavg - self.threads)
        else:
            others = max(0.0, ((busy - busy0) - (own - own0)) / (wall - wall0))
        return Load(cores=cores, threads=self.threads, loadavg=loadavg, others=others)


def sample_load(threads: int, seconds: float = 0.5) -> Load:
    """The machine's load over the next ``seconds`` (this process idle meanwhile)."""
    meter = LoadMeter(threads)
    time.sleep(seconds)
    return meter.read()


def _read_status(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _trim_heap() -> None:
    """Returns the C heap's free memory to the system (glibc ``malloc_trim``), so that memory
    freed by an earlier call does not hide the next call's peak resident set."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def peak_memory(device: torch.device, result: dict):
    """Measures the peak memory added while the block runs, in bytes, into ``result["peak"]``.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set
    (VmHWM), reset before the block through ``/proc/self/clear_refs`` (Linux), after the heap's
    free memory is handed back (glibc ``malloc_trim``).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device) - base
        return
    _trim_heap()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base = _read_status("VmRSS")
    yield
    result["peak"] = _read_status("VmHWM") - base


def time_call(fn: Callable[[], Any], device: torch.device):
    """Runs ``fn()`` once; returns ``(its result, seconds)``. CUDA: CUDA events on the
    current stream, after a synchronize; CPU: ``time.perf_counter``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        stop.record()
        torch.cuda.synchronize(device)
        return out, start.elapsed_time(stop) / 1e3
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@dataclass
class Side:
    """The timings of one side: ``seconds`` of every timed repeat, the peak memory added (the
    largest over the repeats, bytes; ``None`` when not measured) and the last output."""
    seconds: List[float] = field(default_factory=list)
    peak: Optional[int] = None
    out: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class Measurement:
    """Times several sides (callables doing the same work) alternately in one process.

    :meth:`warm_up` runs every side (or its stand-in from ``warmup_sides``) once; each
    :meth:`round` then times every side once, in the given order on even rounds and in the
    reverse order on odd ones, so that slow drifts of the machine hit all sides alike.

    Args:
        sides: name -> zero-argument callable; the result of the last timed call is kept.
        device: where the work runs (CUDA is synchronized and timed with events).
        memory: also measure each side's peak memory (:func:`peak_memory`, outside the timed
            region).
        warmup_sides: name -> callable run by :meth:`warm_up` instead of the side itself (a
            shorter call through the same code, for sides that take minutes).
    """

    def __init__(self, sides: Dict[str, Callable[[], Any]], device: torch.device, *,
                 memory: bool = False,
                 warmup_sides: Optional[Dict[str, Callable[[], Any]]] = None):
        if not sides:
            raise ValueError("sides must name at least one callable")
        unknown = set(warmup_sides or ()) - set(sides)
        if unknown:
            raise ValueError(f"warmup_sides names unknown sides {sorted(unknown)}")
        self.sides = dict(sides)
        self.device = torch.device(device)
        self.memory = memory
        self.warmup_sides = {**self.sides, **(warmup_sides or {})}
        self.results = {name: Side() for name in self.sides}
        self._rounds = 0

    def warm_up(self, rounds: int = 1) -> None:
        for _ in range(rounds):
            for fn in self.warmup_sides.values():
                fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def round(self) -> None:
        names = list(self.sides)
        if self._rounds % 2:
            names.reverse()
        self._rounds += 1
        for name in names:
            side, peak = self.results[name], {}
            with peak_memory(self.device, peak) if self.memory else contextlib.nullcontext():
                side.out, seconds = time_call(self.sides[name], self.device)
            side.seconds.append(seconds)
            if self.memory:
                side.peak = max(side.peak or 0, peak["peak"])


def measure(sides: Dict[str, Callable[[], Any]], device: torch.device, *, repeats: int,
            warmup: int = 1, memory: bool = False,
            warmup_sides: Optional[Dict[str, Callable[[], Any]]] = None) -> Dict[str, Side]:
    """Warms every side up ``warmup`` times, then times ``repeats`` alternating rounds (see
    :class:`Measurement`); returns name -> :class:`Side` (``.median`` seconds)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    measurement = Measurement(sides, device, memory=memory, warmup_sides=warmup_sides)
    measurement.warm_up(warmup)
    for _ in range(repeats):
        measurement.round()
    return measurement.results
