"""Variable length (APPROXIMATE, opt-in ``adaptive_length``): where the answer ends.

Models trained to end their answer with EOS and fill the rest with EOS/pad (LLaDA's SFT,
DiffuGPT's variable-length training) predict that tail from the first step. Once, after the
first step that runs the model, each row's answer is cut at the first position whose EOS
probability is at least ``length_threshold``: that position becomes EOS, every later one
EOS (or pad), and the canvas shrinks to the longest row's answer, the shorter rows' tails
masked out of the attention. Work after the cut is never computed again.

One home for the rule, shared by the samplers that offer it (``docs/semantics.md``,
"Variable length"):

* :func:`eos_probability`: the probability the rule reads (LLaDA, Dream);
* :func:`open_tail`: where LLaDA's and Dream's answers may end (a position that, with every
  later one, holds a mask or EOS: a decoded token is never overwritten);
* :func:`cut_at_eos`: the cut itself (also the masked-LM pipeline's, :mod:`genjo_fast.mdlm`,
  whose region is its generated positions);
* :class:`AdaptiveLength`: the cut on the engine (:mod:`genjo_fast.engine`) for LLaDA's
  ``generate`` and Dream's ``diffusion_generate``;
* :func:`plain_open_tail`, :func:`plain_cut_at_eos`: the plain statements (row loops) of the
  two rules, used by the statements :mod:`genjo_fast.reference`,
  :mod:`genjo_fast.reference_dream` and :mod:`genjo_fast.reference_mdlm`.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import torch

from .engine import Window
from .sampling import guided_chunks

__all__ = ["check_length_args", "eos_probability", "open_tail", "cut_at_eos", "plain_open_tail", "plain_cut_at_eos",
           "AdaptiveLength"]

def check_length_args(adaptive_length, length_threshold) -> None:
    """``adaptive_length`` must be a bool and ``length_threshold`` a probability in
    ``[0, 1]``."""
    if not isinstance(adaptive_length, bool):
        raise TypeError(f"adaptive_length must be True or False, got {adaptive_length!r}")
    if isinstance(length_threshold, bool) or not isinstance(length_threshold, numbers.Real) \
            or not 0 <= length_threshold <= 1:
        raise ValueError(f"length_threshold must be a probability in [0, 1], got "
                         f"{length_threshold!r}")


def eos_probability(logits: torch.Tensor, eos_id: int, un_logits: Optional[torch.Tensor] = None,
                    cfg_scale: float = 0.0) -> torch.Tensor:
    """The model's probability of EOS at each position: ``softmax(logits)[eos_id]`` in float32
    (at temperature 1, whatever the sampling temperature), with CFG on the guided logits
    (:func:`~genjo_fast.sampling.guided_chunks`, in the logits' dtype), a chunk at a time.

    Args:
        logits: ``(B, N, V)``; un_logits: the unconditional half with CFG, else ``None``.
    Returns:
        float32 ``(B, N)``.
    """
    out = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
    for a, b, chunk in guided_chunks(logits, un_logits, cfg_scale):
        out[:, a:b] = torch.softmax(chunk.float(), dim=-1)[..., eos_id]
    return out


def open_tail(answer: torch.Tensor, mask_id: int, eos_id: int) -> torch.Tensor:
    """Where an answer may end: bool ``(B, A)``, True at a position that holds a mask or EOS
    and whose every later position does too (so a cut there overwrites no decoded token and no
    constraint). answer: int64 ``(B, A)``."""
    free = (answer == mask_id) | (answer == eos_id)
    return free.flip(1).long().cumprod(1).flip(1).bool()


def cut_at_eos(x: torch.Tensor, region: torch.Tensor, eos_probability: torch.Tensor,
               threshold: float, *, eos_id: int, pad_id: Optional[int]):
    """The cut, in place on ``x`` and ``region``.

    In each row the first position of ``region`` whose EOS probability (``eos_probability``,
    right-aligned with ``x``: its columns are the last ones of ``x``) is ``>= threshold``
    becomes EOS and every position after it pad (EOS without a pad id); they leave the region.

    Args:
        x: int64 ``(B, W)`` (a view is written through).
        region: bool ``(B, W)``, where the answer may end (and, for the caller, what it may
            still write).
        eos_probability: float ``(B, N)``, ``N <= W``.
    Returns:
        ``width``, the columns still needed (the longest row's answer end + 1, or ``W`` for a
        row not cut), and the ``(B, width)`` 0/1 int64 mask of the rows' kept columns (the
        shorter rows' tails 0), or ``None`` when every row keeps ``width`` columns.
    """
    batch, length = x.shape
    probability = torch.zeros(x.shape, dtype=eos_probability.dtype, device=x.device)
    probability[:, length - eos_probability.shape[1]:] = eos_probability
    hits = region & (probability >= threshold)
    found = hits.any(1)
    end = torch.where(found, hits.int().argmax(1), length)  # the EOS position, or the end
    columns = torch.arange(length, device=x.device)[None, :]
    x.masked_fill_(columns == end[:, None], eos_id)
    x.masked_fill_(columns > end[:, None], pad_id if pad_id is not None else eos_id)
    region &= columns < end[:, None]
    lengths = torch.where(found, end + 1, length)
    width = int(lengths.max())
    if int(lengths.min()) == width:
        return width, None
    return width, (columns[:, :width] < lengths[:, None]).long()


def plain_open_tail(answer: torch.Tensor, mask_id: int, eos_id: int) -> torch.Tensor:
    """:func:`open_tail`, stated plainly: position by position, whether it and every later one
    hold a mask or EOS."""
    out = torch.zeros_like(answer, dtype=torch.bool)
    for b in range(answer.shape[0]):
        for q in range(answer.shape[1]):
            out[b, q] = all(int(t) in (mask_id, eos_id) for t in answer[b, q:])
    return out


def plain_cut_at_eos(x: torch.Tensor, region: torch.Tensor, eos_probability: torch.Tensor,
                     threshold: float, *, eos_id: int, pad_id: Optional[int]) -> List[int]:
    """:func:`cut_at_eos`, stated plainly, row by row (in place on ``x`` and ``region``;
    ``eos_probability`` covers ``x``'s columns). Returns each row's kept length."""
    lengths = []
    for b in range(x.shape[0]):
        hits = (region[b] & (eos_probability[b] >= threshold)).nonzero()
        if len(hits):
            end = int(hits[0])
            x[b, end] = eos_id
            x[b, end + 1:] = pad_id if pad_id is not None else eos_id
            region[b, end:] = False
            lengths.append(end + 1)
        else:
            lengths.append(x.shape[1])
    return lengths


class AdaptiveLength:
    """``adaptive_length`` on the engine: wraps a front-end's runner and windows.

    :meth:`windows` runs the first window's first step alone; the runner's call in that step
    (:meth:`run`) computes the logits of the whole answer and keeps their EOS probabilities
    (its window gets its own rows back). After that step the answers are cut
    (:func:`open_tail`, :func:`cut_at_eos`, EOS filling the tails) and the rest runs on the
    canvas's first ``width`` columns: the runner is rebuilt for them by ``make_runner`` with
    the rows' kept columns, the windows are clipped to them and windows beyond them dropped.
    If that first step transferred nothing (it was skipped: a block with no mask), the cut
    waits for the next window's first step.

    Args:
        x: int64 ``(B, L)``, the canvas (written in place by the cut).
        answer_start: the first generated column.
        runner: the engine runner over the whole canvas.
        make_runner: ``f(width, kept)`` -> the runner over ``x[:, :width]`` (it is called
            with that view), ``kept`` the int64 ``(B, width)`` 0/1 mask of the rows' kept
            columns or ``None``; the front-end combines it with its own attention mask.
        threshold: ``length_threshold``. eos_id, mask_id: the family's ids.
        cfg_scale: the guidance scale of the runner's halves (0: none).
    """

    def __init__(self, x: torch.Tensor, answer_start: int, runner: Callable,
                 make_runner: Callable[[int, Optional[torch.Tensor]], Callable], *,
                 threshold: float, eos_id: int, mask_id: int, cfg_scale: float = 0.0):
        self.x = x
        self.answer_start = answer_start
        self.runner = runner
        self.make_runner = make_runner
        self.threshold = threshold
        self.eos_id = eos_id
        self.mask_id = mask_id
        self.cfg_scale = cfg_scale
        self.width = x.shape[1]
        self.armed = False  # the next runner call probes
        self.probe: Optional[torch.Tensor] = None
        self.decided = False

    def run(self, x: torch.Tensor, start: int, stop: int, full: bool = True):
        """The engine's runner."""
        if self.decided:
            return self.runner(x[:, :self.width].contiguous(), start, stop, full)
        if not self.armed:
            return self.runner(x, start, stop, full)
        self.armed = False
        a = self.answer_start
        logits, un_logits = self.runner(x, a, x.shape[1], full)
        self.probe = eos_probability(logits, self.eos_id, un_logits, self.cfg_scale)
        rows = slice(start - a, stop - a)
        return logits[:, rows], None if un_logits is None else un_logits[:, rows]

    def windows(self, windows: Iterable[Window]) -> Iterator[Window]:
        """The front-end's windows, the first split after its first step, then clipped to
        the cut canvas."""
        for window in windows:
            if self.decided:
                if window.start < self.width:
                    yield dataclasses.replace(window, stop=min(window.stop, self.width))
                continue
            self.armed = True
            yield dataclasses.replace(window, steps=1)
            self.armed = False
            if self.probe is not None:
                self._cut()
                window = dataclasses.replace(window, stop=min(window.stop, self.width))
            if window.steps > 1 and window.start < window.stop:
                yield dataclasses.replace(window, steps=window.steps - 1,
                                          first_step=window.first_step + 1)

    def _cut(self) -> None:
        answer = self.x[:, self.answer_start:]
        region = open_tail(answer, self.mask_id, self.eos_id)
        width, kept = cut_at_eos(answer, region, self.probe, self.threshold,
                                 eos_id=self.eos_id, pad_id=None)
        self.width = self.answer_start + width
        if kept is not None:
            kept = torch.cat([kept.new_ones((kept.shape[0], self.answer_start)), kept], dim=1)
        self.runner = self.make_runner(self.width, kept)
        self.decided = True
