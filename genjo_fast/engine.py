"""The denoising engine: one loop for every masked-diffusion family.

A call is a sequence of *windows* (runs of steps over positions ``[start, stop)`` of the
canvas ``x``: LLaDA's blocks, Dream's whole answer), and every step is the same four stages:

    logits = runner(x, start, stop, full)          # genjo_fast.runners / genjo_fast.cache
    x0, confidence = sampler(logits, step, start)  # the family's sampling/confidence rule
    transfer = rule(confidence, masked, step)      # which masked positions to unmask
    x[start:stop] = where(transfer, x0, x)         # update, then the observer

A rule may also *plan* a step: ``rows = rule.plan(x[start:stop], masked, step)`` before the
forward declares the positions the step may write (by default the masked ones). The runner
is then called with them (``runner(x, start, stop, full, rows)``, so it may compute those
rows only), the rule chooses among them, and the update writes ``transfer & rows``. This is
how a rule rewrites already-decoded positions (the masked-LM family's edits,
:mod:`genjo_fast.mdlm`) or, knowing before the forward which positions it will unmask, lets
the model skip the others.

A family configures the parts; :func:`denoise` runs them top to bottom. Nothing here knows a
family: LLaDA's ``generate`` (:mod:`genjo_fast.generate`) and Dream's ``diffusion_generate``
(:mod:`genjo_fast.dream`) are thin front-ends that validate, build the parts and call
:func:`denoise`.

The parts' contracts:

* runner ``(x, start, stop, full) -> (logits, un_logits)``, each ``(B, stop - start, V)``;
  with a planning rule, ``(x, start, stop, full, rows)`` and whatever logits the family's
  sampler takes (e.g. the planned rows only);
* sampler ``(logits, un_logits, step, start) -> (x0, confidence)``: int64 ``(B, n)`` and
  float ``(B, n)``;
* rule: a :class:`TransferRule`. ``prepare(i)`` runs on the host before step ``i`` of a window
  (outside any CUDA graph) and says whether the step can transfer anything; ``__call__``
  returns the bool ``(B, n)`` transfer mask from the confidences (``-inf`` where not masked).
  Optionally ``plan(x_window, masked, step)`` -> bool ``(B, n)``, the positions the step may
  write (see above); ``plan`` and ``__call__`` of one step are paired (a rule may keep what its
  plan drew for its call). Rules without ``plan`` write masked positions only. Optionally
  ``begin(window)``, called on the host when a window starts (a rule whose draws or time
  grid depend on the window's positions).

Stopping at EOS (``stopper``, a :class:`genjo_fast.stopping.RowStopper`): after every step the
rows that finished leave the batch, and the following steps run a canvas of the remaining rows
only (the call ends when none is left). Parts that hold per-row state have an optional
``compact(compaction)`` (:class:`genjo_fast.stopping.Compaction`), which the engine calls on
the runner, the sampler and the rule; the observer still sees the whole batch in its original
order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Protocol, Tuple

import torch

from .stopping import RowStopper


@dataclass
class Window:
    """A run of up to ``steps`` steps sampling positions ``[start, stop)`` of ``x``.

    ``block`` numbers the window; ``first_step`` is the global index of its first step.
    ``until_decoded``: stop early once no position of the window is masked (adaptive rules).
    """
    block: int
    start: int
    stop: int
    steps: int
    first_step: int
    until_decoded: bool = False


@dataclass
class StepEvent:
    """What an ``observer`` sees after each step that ran the model. Tensors live on the
    sampling device.

    Attributes:
        block: index of the current window (LLaDA's block); step: global step index.
        block_start, block_stop: positions ``[block_start, block_stop)`` of ``x`` sampled at
            this step.
        x: int64 ``(B, L)``, the sequence after this step's update (do not modify it).
        x0: int64 ``(B, block_stop - block_start)``, the sampled token at each position.
        confidence: ``(B, block_stop - block_start)``, their scores (``-inf`` where already
            decoded).
        transfer: bool ``(B, block_stop - block_start)``, the positions unmasked by this step.
    """
    block: int
    step: int
    block_start: int
    block_stop: int
    x: torch.Tensor
    x0: torch.Tensor
    confidence: torch.Tensor
    transfer: torch.Tensor


@dataclass
class GenerateStats:
    """Counts of one call.

    Attributes:
        nfe: model forward passes, one per denoising step that ran (a CFG pair runs as one
            batch).
        full_forwards: those over the whole sequence (with a cache, the others run only the
            block, or the block and what follows).
        row_forwards: the batch rows those forwards ran, summed over the forwards (a CFG pair
            counts once): ``nfe * B`` unless rows stopped at EOS.
        forwards_saved, row_forwards_saved: with ``stop_at_eos``, the forwards (and row
            forwards) the same call without the option (and without ``drop_rows``) would have
            run on top of ``nfe`` (``row_forwards``); 0 without it. ``None`` when that is not known: windows that
            run until decoded (``threshold``/``factor``) are as long as their rows' tokens
            make them, so once a row stopped, the length the call without the option would
            have had is unknown.
    """
    nfe: int = 0
    full_forwards: int = 0
    row_forwards: int = 0
    forwards_saved: Optional[int] = 0
    row_forwards_saved: Optional[int] = 0

    def save(self, forwards: int, rows: int, known: bool) -> None:
        """Counts ``forwards`` (``rows``) the call without ``stop_at_eos`` would have run on
        top of these; ``known=False`` makes the savings unknown (``None``)."""
        if not known or self.forwards_saved is None:
            self.forwards_saved = self.row_forwards_saved = None
        else:
            self.forwards_saved += forwards
            self.row_forwards_saved += rows


class TransferRule(Protocol):
    """Chooses the positions to unmask at a step (see the module docstring)."""

    def prepare(self, i: int) -> bool:
        """Host-side set-up of step ``i`` of the current window; ``False``: the step transfers
        nothing and is skipped (no forward, no observer call)."""
        ...

    def __call__(self, confidence: torch.Tensor, masked: torch.Tensor,
                 step: int) -> torch.Tensor:
        """The bool ``(B, n)`` positions to write, from the confidences (``-inf`` off the
        writable positions) and the writable positions (``masked``, or the rule's plan)."""
        ...


Sampler = Callable[[torch.Tensor, Optional[torch.Tensor], int, int],
                   Tuple[torch.Tensor, torch.Tensor]]
Runner = Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor]]]


def denoise_step(x: torch.Tensor, start: int, stop: int, step: int, full: bool, runner: Runner,
                 sampler: Sampler, rule: TransferRule,
                 mask_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step: [plan ->] forward -> sample -> select -> update ``x[:, start:stop]`` in place.

    Static shapes and (with the torch backend) no host sync: this is what a CUDA graph
    captures (rules with a ``plan`` are not captured). Returns ``(x0, confidence, transfer)``
    of the window, each ``(B, stop - start)``.
    """
    x_window = x[:, start:stop]
    masked = x_window == mask_id
    plan = getattr(rule, "plan", None)
    if plan is None:
        rows = masked
        logits, un_logits = runner(x, start, stop, full)
    else:
        rows = plan(x_window, masked, step)
        logits, un_logits = runner(x, start, stop, full, rows)
    x0, confidence = sampler(logits, un_logits, step, start)
    confidence = confidence.masked_fill(~rows, -torch.inf)
    transfer = rule(confidence, rows, step)
    x[:, start:stop] = torch.where(transfer & rows, x0, x_window)
    return x0, confidence, transfer


def denoise_steps(x: torch.Tensor, windows: Iterable[Window], runner: Runner, sampler: Sampler,
                  rule: TransferRule, *, mask_id: int, refresh_every: Optional[int] = None,
                  cached: bool = False, graph_step: Optional[Callable[..., Callable]] = None,
                  bar=None, stats: Optional[GenerateStats] = None,
                  stopper: Optional[RowStopper] = None) -> Iterator[StepEvent]:
    """Runs the windows' steps on ``x`` (int64 ``(B, L)``, updated in place), yielding a
    :class:`StepEvent` after every step that ran the model (streaming front-ends iterate it;
    :func:`denoise` runs it to the end).

    Args: those of :func:`denoise`, and ``stats``, a :class:`GenerateStats` counted into.
    """
    if stopper is not None and graph_step is not None:
        raise ValueError("stopping at EOS compacts the batch: a captured CUDA graph's shapes "
                         "are fixed (use one or the other)")
    stats = stats if stats is not None else GenerateStats()
    batch = x.shape[0]
    begin = getattr(rule, "begin", None)
    canvas = x  # the rows still running: x itself until a row stops at EOS
    for window in windows:
        if stopper is not None and stopper.done:
            if begin is not None:
                begin(window)
            _skip_window(window, rule, batch, stats, bar)
            continue
        start, stop = window.start, window.stop
        if begin is not None:
            begin(window)
        replay = None
        if graph_step is not None:
            replay = graph_step(lambda: denoise_step(x, start, stop, -1, False, runner, sampler,
                                                     rule, mask_id))
        for i in range(window.steps):
            # Adaptive rules end a window when no row has a mask left in it: one host sync per
            # step, in those approximate modes only.
            if window.until_decoded and i > 0 and not bool(
                    (canvas[:, start:stop] == mask_id).any()):
                if canvas.shape[0] < batch:  # stopped rows may have masks left here
                    stats.save(0, 0, known=False)
                break
            step = window.first_step + i
            if bar is not None:
                bar.update(1)
            if not rule.prepare(i):
                continue  # transfers nothing, so cannot change x
            running = canvas.shape[0]
            if running < batch:  # rows stopped at EOS: the call without the option runs them
                stats.save(int(running == 0), batch - running, not window.until_decoded)
            if running == 0:
                continue
            full = not cached or i == 0 or (refresh_every is not None and i % refresh_every == 0)
            if replay is not None and not full:
                x0, confidence, transfer = replay()
            else:
                x0, confidence, transfer = denoise_step(canvas, start, stop, step, full, runner,
                                                        sampler, rule, mask_id)
            stats.nfe += 1
            stats.full_forwards += full
            stats.row_forwards += running
            if stopper is not None:
                x0, confidence, transfer = stopper.full_batch(x0, confidence, transfer, start,
                                                              stop)
                canvas = stopper.after_step(canvas, (runner, sampler, rule))
            yield StepEvent(window.block, step, start, stop, x, x0, confidence, transfer)


def _skip_window(window: Window, rule: TransferRule, batch: int, stats: GenerateStats,
                 bar) -> None:
    """A window after every row stopped at EOS: runs nothing, counts the steps the call
    without the option would have run (unknown for windows that run until decoded)."""
    if window.until_decoded:
        stats.save(0, 0, known=False)
        return
    for i in range(window.steps):
        if bar is not None:
            bar.update(1)
        if rule.prepare(i):
            stats.save(1, batch, known=True)


def denoise(x: torch.Tensor, windows: Iterable[Window], runner: Runner, sampler: Sampler,
            rule: TransferRule, *, mask_id: int, refresh_every: Optional[int] = None,
            cached: bool = False, graph_step: Optional[Callable[..., Callable]] = None,
            observer: Optional[Callable[[StepEvent], None]] = None,
            bar=None, stopper: Optional[RowStopper] = None) -> GenerateStats:
    """Runs the windows' steps on ``x`` (int64 ``(B, L)``, updated in place).

    Args:
        windows: the :class:`Window` sequence; it may be a generator that reads ``x`` as it
            stands when the previous window is done.
        runner, sampler, rule: the stages (module docstring).
        refresh_every: with a cached runner, a full forward also every this many steps.
        cached: the runner keeps a cache: only a window's first step (and refreshes) are full.
        graph_step: ``graph_step(fn) -> callable`` wraps a window's non-full step
            (``fn() -> (x0, confidence, transfer)``) for replay, e.g. in a CUDA graph.
        observer: called with a :class:`StepEvent` after every step that ran the model.
        bar: a progress bar with ``update(n)``, advanced once per step (run or skipped).
        stopper: stop at EOS (:class:`genjo_fast.stopping.RowStopper`): rows that finish
            leave the batch after the step that finished them; ``x`` still receives the whole
            batch, the stopped rows filled after their stop. Not with ``graph_step``.
    Returns:
        :class:`GenerateStats` of the call.
    """
    stats = GenerateStats()
    for event in denoise_steps(x, windows, runner, sampler, rule, mask_id=mask_id,
                               refresh_every=refresh_every, cached=cached,
                               graph_step=graph_step, bar=bar, stats=stats,
                               stopper=stopper):
        if observer is not None:
            observer(event)
    return stats


def progress_bar(enabled: bool, total: Optional[int], desc: str):
    """A tqdm bar over the steps, or ``None`` when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step")
