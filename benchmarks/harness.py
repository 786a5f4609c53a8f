"""The one harness of genjo_fast's benchmarks: every ``benchmarks/test_bench_*.py`` measures,
checks and records through the ``bench`` fixture (a :class:`Case`, from ``conftest.py``).

What every case gets:

* torch's threads pinned (``GENJO_FAST_BENCH_THREADS``, default 1) for the whole session;
* every side warmed up (``GENJO_FAST_BENCH_WARMUP`` calls, default 1) before any timing, then
  timed as the median of ``repeats`` alternating rounds, all sides in the same process (the
  order reversed every other round), so a ratio always comes from one run side by side;
* peak memory per side when asked (:func:`genjo_fast.timing.peak_memory`);
* the machine's load while it ran (cores used by other processes, 1-minute load average vs
  cores) and a WARNING when the machine was busy;
* its checks: a case asserts its outputs (identical tokens for exact modes, values within a
  stated tolerance for kernels, the plain statement for approximate modes) through
  :meth:`Case.assert_equal` / :meth:`Case.assert_close` / :meth:`Case.check`, so a wrong
  result fails the benchmark and records nothing;
* its targets (:meth:`Case.target`): asserted only when they are meaningful, i.e. on a quiet
  machine and outside quick mode, unless ``GENJO_FAST_BENCH_TARGETS`` says otherwise;
* a record (figures, setting, checks, targets, device, date, python/torch/triton versions,
  threads, repeats, load) merged into ``benchmarks/results/<device>.json`` (quick mode:
  ``<device>.quick.json``), from which ``python benchmarks/render_results.py`` writes the
  tables of ``benchmarks/RESULTS.md``.

Environment variables (all optional):

=============================  ==========================================================
``GENJO_FAST_BENCH_THREADS``   torch threads (default 1: immune to other processes on a
                               small shared machine; raise it on a quiet machine)
``GENJO_FAST_BENCH_REPEATS``   timed rounds per case (default: the case's, 3 for
                               end-to-end cases, 20 for kernels; 1 in quick mode)
``GENJO_FAST_BENCH_WARMUP``    warm-up calls of every side before timing (default 1)
``GENJO_FAST_BENCH_QUICK``     ``1``: smaller settings and one round, to prove the
                               benchmarks run (minutes); targets are not checked
``GENJO_FAST_BENCH_TARGETS``   ``auto`` (default: checked on a quiet machine outside quick
                               mode), ``on`` (always checked), ``off`` (recorded only)
``GENJO_FAST_BENCH_RESULTS``   folder of the result files (default ``benchmarks/results``)
=============================  ==========================================================

pytest-benchmark's own table times one round (every side once); the figures are the harness's
per-side medians, printed after each case (``-s``) and recorded. ``test_harness.py`` tests the
harness and that ``RESULTS.md`` is what the records give.

A new benchmark file ``benchmarks/test_bench_<name>.py`` takes the ``bench`` fixture, calls
:meth:`Case.describe`, :meth:`Case.measure` once, asserts its outputs through the case, and
derives its figures (:meth:`Case.ratio`, :meth:`Case.figure`); ``{{ <name> }}`` in
``benchmarks/RESULTS.template.md`` places its tables in ``RESULTS.md``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from genjo_fast import timing
from render_results import format_seconds, format_value

HERE = Path(__file__).resolve().parent

QUICK = os.environ.get("GENJO_FAST_BENCH_QUICK", "").strip() not in ("", "0")
TARGETS = os.environ.get("GENJO_FAST_BENCH_TARGETS", "auto").strip() or "auto"
if TARGETS not in ("auto", "on", "off"):
    raise ValueError(f"GENJO_FAST_BENCH_TARGETS must be auto, on or off, got {TARGETS!r}")
WARMUP = timing.env_int("GENJO_FAST_BENCH_WARMUP", 1, minimum=0)
_REPEATS = timing.env_int("GENJO_FAST_BENCH_REPEATS", 0, minimum=0)
RESULTS_DIR = Path(os.environ.get("GENJO_FAST_BENCH_RESULTS", "") or HERE / "results")


def quick(full, small):
    """``small`` in quick mode (``GENJO_FAST_BENCH_QUICK=1``), else ``full``."""
    return small if QUICK else full


def rounds(default: int) -> int:
    """Timed rounds of a case: ``GENJO_FAST_BENCH_REPEATS`` if set, else 1 in quick mode, else
    the case's ``default``."""
    return _REPEATS or (1 if QUICK else default)


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (<model name>, <n> cores)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    name = model.group(1).strip() if model else platform.processor() or "unknown"
    return f"cpu ({name}, {os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """The result file's stem: ``cpu`` or the GPU's name, lower case, dashes."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def environment(device: torch.device) -> Dict[str, Any]:
    """What a record names besides its figures: device and python/torch/triton versions."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(device=device_name(device), python=platform.python_version(),
                torch=torch.__version__, triton=triton_version)


class Case:
    """One benchmark case: measures its sides, asserts its outputs, records its figures.

    Made by the ``bench`` fixture; the record is written when the test ends, unless a check
    failed (a wrong result posts no time). A missed target is recorded, then fails the test.
    """

    def __init__(self, nodeid: str, module: str, device: torch.device, threads: int,
                 extra_info: dict, pedantic: Callable):
        self.nodeid, self.module, self.device = nodeid, module, device
        self.threads = threads
        self._extra_info, self._pedantic = extra_info, pedantic
        self.row: Dict[str, Any] = {}
        self.setting: Dict[str, Any] = {}
        self.sides: Dict[str, timing.Side] = {}
        self.figures: Dict[str, Dict[str, Any]] = {}
        self.checks: List[str] = []
        self.targets: List[Dict[str, Any]] = []
        self.load: Optional[timing.Load] = None
        self.warmup = WARMUP
        self.missed: List[str] = []

    def describe(self, row: Dict[str, Any], **setting) -> None:
        """``row``: the labels of the case's table row (column -> value); ``setting``: every
        parameter of the case (recorded)."""
        self.row, self.setting = dict(row), dict(setting)

    def measure(self, sides: Dict[str, Callable[[], Any]], *, repeats: int,
                memory: bool = False, device: Optional[torch.device] = None,
                warmup: Optional[int] = None,
                warmup_sides: Optional[Dict[str, Callable[[], Any]]] = None
                ) -> Dict[str, timing.Side]:
        """Warms up, then times ``repeats`` alternating rounds of every side (once per case).

        Args:
            sides: name -> zero-argument callable; ``Side.out`` keeps the last output.
            repeats: the case's timed rounds (see :func:`rounds`: ``GENJO_FAST_BENCH_REPEATS``
                overrides it, quick mode runs 1).
            memory: also measure each side's peak memory.
            device: where the sides run (default: the session's device).
            warmup: warm-up calls per side (default ``GENJO_FAST_BENCH_WARMUP``); 0 only for
                cases whose figures are not times (token agreement).
            warmup_sides: stand-ins run by the warm-up instead of the sides (see
                :class:`genjo_fast.timing.Measurement`).
        Returns:
            name -> :class:`genjo_fast.timing.Side` (``.median`` seconds, ``.peak`` bytes).
        """
        if self.sides:
            raise RuntimeError(f"{self.nodeid}: Case.measure runs once per case")
        measurement = timing.Measurement(sides, device or self.device, memory=memory,
                                         warmup_sides=warmup_sides)
        meter = timing.LoadMeter(self.threads)
        self.warmup = WARMUP if warmup is None else warmup
        measurement.warm_up(self.warmup)
        self._pedantic(measurement.round, rounds=rounds(repeats), iterations=1,
                       warmup_rounds=0)
        self.load = meter.read()
        self.sides = measurement.results
        return self.sides

    def figure(self, name: str, value: float, unit: str = "") -> float:
        """Records a derived figure (``unit``: ``x``, ``%``, ``s``, ``MiB``, ``GB/s``, ...)."""
        self.figures[name] = dict(value=float(value), unit=unit)
        self._extra_info[name] = float(value)
        return float(value)

    def ratio(self, name: str, slow: str, fast: str, *, memory: bool = False,
              target: Optional[float] = None) -> float:
        """Records ``slow / fast`` (median times, or peak memory with ``memory=True``, a peak
        under 1 MiB counting as 1 MiB) as the figure ``name`` (unit ``x``); with ``target``,
        also :meth:`target`."""
        if memory:
            value = max(self.sides[slow].peak, 2**20) / max(self.sides[fast].peak, 2**20)
        else:
            value = self.sides[slow].median / self.sides[fast].median
        self.figure(name, value, "x")
        if target is not None:
            self.target(name, value, target)
        return value

    def check(self, ok: bool, what: str) -> None:
        """Asserts ``ok`` and records ``what`` was checked."""
        assert ok, f"{self.nodeid}: check failed: {what}"
        if what not in self.checks:
            self.checks.append(what)

    def assert_equal(self, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        """Asserts equal shapes and values (``torch.equal``); records ``what``."""
        actual, expected = actual.cpu(), expected.cpu()
        if actual.shape != expected.shape:
            raise AssertionError(f"{self.nodeid}: {what}: shapes {tuple(actual.shape)} vs "
                                 f"{tuple(expected.shape)}")
        if not torch.equal(actual, expected):
            differ = (actual != expected).sum().item()
            raise AssertionError(f"{self.nodeid}: {what}: {differ} of {actual.numel()} "
                                 f"elements differ")
        self.checks.append(f"{what} (exact)")

    def assert_close(self, actual: torch.Tensor, expected: torch.Tensor, what: str, *,
                     atol: float, rtol: float) -> None:
        """``torch.testing.assert_close`` with the stated tolerances; records ``what``."""
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{self.nodeid}: {what}: {m}")
        self.checks.append(f"{what} (atol {atol:g}, rtol {rtol:g})")

    def target(self, name: str, value: float, minimum: float) -> None:
        """A target ``value >= minimum``: checked (and failing the case when missed) only when
        meaningful: not in quick mode and not on a busy machine, unless
        ``GENJO_FAST_BENCH_TARGETS`` is ``on`` (always) or ``off`` (never)."""
        if TARGETS == "off":
            status = "not checked (GENJO_FAST_BENCH_TARGETS=off)"
        elif TARGETS == "auto" and QUICK:
            status = "not checked (quick mode)"
        elif TARGETS == "auto" and (self.load is None or self.load.busy):
            status = "not checked (machine busy)"
        else:
            status = "met" if value >= minimum else "MISSED"
        self.targets.append(dict(name=name, minimum=minimum, value=value, status=status))
        if status == "MISSED":
            self.missed.append(f"{name} {value:.3g} < target {minimum:g}")

    def record(self) -> Dict[str, Any]:
        sides = {}
        for name, side in self.sides.items():
            sides[name] = dict(median_s=side.median, times_s=side.seconds)
            if side.peak is not None:
                sides[name]["peak_mib"] = side.peak / 2**20
        return dict(module=self.module, row=self.row, setting=self.setting, sides=sides,
                    figures=self.figures, checks=self.checks, targets=self.targets,
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"),
                    **environment(self.device), threads=self.threads,
                    repeats=max((len(s.seconds) for s in self.sides.values()), default=0),
                    warmup=self.warmup, quick=QUICK,
                    load=self.load.as_dict() if self.load else None)

    def summary(self) -> str:
        lines = [f"[{self.nodeid}] " + ", ".join(f"{k} {v}" for k, v in self.row.items())]
        if self.sides:
            n = max(len(s.seconds) for s in self.sides.values())
            lines.append(f"  median of {n} after {self.warmup} warm-up: " + "; ".join(
                f"{name} {format_seconds(side.median)}"
                + (f" (peak {side.peak / 2**20:.0f} MiB)" if side.peak is not None else "")
                for name, side in self.sides.items()))
        if self.figures:
            lines.append("  " + "; ".join(f"{name} {format_value(f['value'], f['unit'])}"
                                          for name, f in self.figures.items()))
        for check in self.checks:
            lines.append(f"  checked: {check}")
        for t in self.targets:
            lines.append(f"  target {t['name']} >= {t['minimum']:g}: {t['status']}")
        if self.load is not None:
            lines.append("  load: " + self.load.describe().replace("\n", "\n  "))
        return "\n".join(lines)


def results_path(device: torch.device) -> Path:
    """``<results>/<device slug>.json``, or ``.quick.json`` in quick mode."""
    return RESULTS_DIR / f"{device_slug(device)}{'.quick' if QUICK else ''}.json"


def save(records: Dict[str, Dict[str, Any]], path: Path) -> None:
    """Merges ``records`` (case id -> record) into the JSON file ``path`` (a case's earlier
    record is replaced; the others are kept)."""
    data = json.loads(path.read_text()) if path.exists() else {"cases": {}}
    data["cases"].update(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


class PositionDraws:
    """A :class:`genjo_fast.draws.Draws` source whose numbers depend only on (step, position):
    the reference (every position of the row) and genjo_fast (the block's positions) get the
    same numbers without a ``(steps, B, L, V)`` tensor in memory, as
    :class:`~genjo_fast.TensorDraws` would need at LLaDA's vocabulary."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _rand(self, kind: int, step: int, start: int, stop: int, shape, dtype, device):
        rows = []
        for position in range(start, stop):
            g = torch.Generator().manual_seed(
                ((self.seed * 4 + kind) * 100_003 + step) * 1_000_003 + position)
            rows.append(torch.rand(shape, dtype=dtype, generator=g))
        return torch.stack(rows, dim=1).to(device)

    def gumbel(self, step, start, stop, batch, vocab, device):
        return self._rand(0, step, start, stop, (batch, vocab), torch.float64, device)

    def remask(self, step, start, stop, batch, device):
        return self._rand(1, step, start, stop, (batch,), torch.float32, device)

    def token(self, step, start, stop, batch, device):
        return self._rand(2, step, start, stop, (batch,), torch.float64, device)

    def position(self, step, start, stop, batch, device):
        return self._rand(3, step, start, stop, (batch,), torch.float64, device)
