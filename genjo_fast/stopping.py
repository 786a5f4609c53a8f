"""Stopping at EOS (``stop_at_eos=True``): which rows are finished, their fill, and dropping
them from the batch so that later forwards run only the rows still generating.

A row is *finished* once some generated position ``p`` holds one of the stop ids and every
generated position before ``p`` is decoded (holds no mask id). LLaDA and Dream never change a
decoded token, so from then on the row's tokens up to and including ``p`` are those of the
same call without the option: the row can leave the batch. Its positions after ``p`` are
filled with the fill id (the first stop id: EOS with the default stop ids, the families'
padding). ``docs/semantics.md`` ("Stopping at EOS") states what is guaranteed.

Dropping rows is *compaction*: the engine (:mod:`genjo_fast.engine`) keeps running a canvas
of the unfinished rows only, and every part of the loop that holds per-row state (a runner's
attention mask and block cache, a rule's count buffer, a sampler's canvas, injected draws)
keeps the same rows, in the same order, through its ``compact(compaction)``
(:class:`Compaction`). The caller's canvas ``x`` keeps the whole batch in its original order:
:class:`RowStopper` writes the running rows back into it after every step.

The caller may also drop rows nobody wants any more (``drop_rows``: a server whose client went
away): they leave the batch the same way after the step at which ``drop_rows()`` first names
them, keeping the canvas they had then (mask ids and all). The other rows are not affected.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Collection, Dict, Iterable, Optional, Sequence, Tuple

import torch


def resolve_stop_ids(stop_at_eos: bool, stop_ids: Optional[Iterable[int]],
                     defaults: Sequence[int], mask_id: int) -> Optional[Tuple[int, ...]]:
    """A call's stop ids (checked: :func:`check_stop_ids`): ``stop_ids``, else the family's
    ``defaults``; ``None`` when the call does not stop at EOS (``stop_ids`` is then refused)."""
    if not isinstance(stop_at_eos, bool):
        raise TypeError(f"stop_at_eos must be a bool, got {type(stop_at_eos).__name__}")
    if not stop_at_eos:
        if stop_ids is not None:
            raise ValueError("stop_ids is used by stop_at_eos=True only; pass both or neither")
        return None
    return check_stop_ids(defaults if stop_ids is None else stop_ids, mask_id)


def check_drop_rows(drop_rows, stop_at_eos: bool) -> None:
    """``drop_rows`` is ``None`` or a callable, and comes with ``stop_at_eos=True`` (the rows
    leave the batch as finished rows do)."""
    if drop_rows is None:
        return
    if not callable(drop_rows):
        raise TypeError(f"drop_rows must be callable, got {type(drop_rows).__name__}")
    if not stop_at_eos:
        raise ValueError("drop_rows drops rows from the batch as stop_at_eos=True drops "
                         "finished ones: pass stop_at_eos=True with it")


def check_stop_ids(stop_ids: Iterable[int], mask_id: int) -> Tuple[int, ...]:
    """The stop ids as a tuple of ints, checked: at least one, each an int ``>= 0`` other than
    ``mask_id`` (their upper bound, the vocabulary, is checked with the other special ids:
    :func:`stop_token_ids`). Errors name ``stop_ids``."""
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, Iterable):
        raise TypeError(f"stop_ids must be a sequence of token ids, got "
                        f"{type(stop_ids).__name__}")
    ids = tuple(stop_ids)
    if not ids:
        raise ValueError("stop_ids must hold at least one token id")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"stop_ids must hold ints, got {type(i).__name__} ({i!r})")
        if i < 0:
            raise ValueError(f"stop_ids holds {i}: token ids are >= 0")
        if i == mask_id:
            raise ValueError(f"stop_ids holds the mask id {mask_id}: a masked position is not "
                             f"decoded, it cannot end an answer")
    return tuple(int(i) for i in ids)


def stop_token_ids(stop_ids: Sequence[int]) -> Dict[str, int]:
    """``{"stop_ids[i]": id}``: the stop ids as named special ids, for the vocabulary checks
    (:func:`genjo_fast.validation.check_vocab_size`), whose errors then name ``stop_ids``."""
    return {f"stop_ids[{i}]": token for i, token in enumerate(stop_ids)}


def first_stops(answer: torch.Tensor, stop_ids: torch.Tensor,
                mask_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which rows are finished, and where they stop.

    Args:
        answer: int64 ``(B, A)``, the generated positions.
        stop_ids: int64 ``(S,)`` on ``answer``'s device.
    Returns:
        ``finished`` bool ``(B,)``: the row holds a stop id at some position ``p`` and no mask
        id before ``p``; ``first`` int64 ``(B,)``: the first such ``p`` (``A`` when none).
    """
    length = answer.shape[1]
    positions = torch.arange(length, device=answer.device)
    first = torch.where(torch.isin(answer, stop_ids), positions, length).amin(1)
    first_mask = torch.where(answer == mask_id, positions, length).amin(1)
    return (first < length) & (first_mask > first), first


def fill_after(answer: torch.Tensor, first: torch.Tensor, fill_id: int) -> None:
    """Writes ``fill_id`` at every position of ``answer`` (int64 ``(B, A)``, in place) after
    its row's ``first`` (int64 ``(B,)``) position."""
    positions = torch.arange(answer.shape[1], device=answer.device)
    answer.masked_fill_(positions[None, :] > first[:, None], fill_id)


@dataclass
class Compaction:
    """Rows leaving the batch after a step (handed to each part's ``compact``).

    Attributes:
        keep: int64 ``(k,)``: the indices, in the batch before this compaction, of the rows
            that go on, increasing (their order is kept).
        batch: the number of rows before this compaction.
        canvas: int64 ``(k, L)``: the canvas of the rows that go on (what the next step runs).
        dropped_masked: bool ``(batch - k, L)``: where the leaving rows were masked (before
            their fill), in their order in the batch.
    """
    keep: torch.Tensor
    batch: int
    canvas: torch.Tensor
    dropped_masked: torch.Tensor

    def model_rows(self, doubled: bool) -> torch.Tensor:
        """The rows to keep of a model batch: ``keep``, or with classifier-free guidance
        (``doubled``: conditional rows then unconditional ones, ``2 * batch``) both halves."""
        if not doubled:
            return self.keep
        return torch.cat([self.keep, self.keep + self.batch])


def take_rows(value, rows: torch.Tensor):
    """``value.index_select(0, rows)`` for a tensor; anything else (``None``, ``"full"``) as
    it is."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows.to(value.device))
    return value


class RowDraws:
    """Injected draws (:class:`~genjo_fast.draws.Draws`) that follow compaction: each request
    is answered for the whole original batch and the rows still running are taken, so every
    row gets its own draws whatever rows remain. Wraps the call's draws when it stops at EOS.

    Args:
        draws: the caller's source.
        batch: the call's batch (the original rows).
    """

    def __init__(self, draws, batch: int):
        self.draws = draws
        self.batch = batch
        self.rows: Optional[torch.Tensor] = None  # None: every row

    def compact(self, compaction: Compaction) -> None:
        keep = compaction.keep
        self.rows = keep if self.rows is None else self.rows.index_select(0, keep)

    def _take(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.rows is None else take_rows(out, self.rows)

    def gumbel(self, step, start, stop, batch, vocab, device):
        return self._take(self.draws.gumbel(step, start, stop, self.batch, vocab, device))

    def remask(self, step, start, stop, batch, device):
        return self._take(self.draws.remask(step, start, stop, self.batch, device))

    def token(self, step, start, stop, batch, device):
        return self._take(self.draws.token(step, start, stop, self.batch, device))

    def position(self, step, start, stop, batch, device):
        return self._take(self.draws.position(step, start, stop, self.batch, device))


class RowStopper:
    """The finished-row bookkeeping of one call: which original rows still run, the check after
    every step, the fill, and the compaction of the parts.

    Args:
        x: int64 ``(B, L)``: the call's canvas (the result); rows that finish get their fill
            here, and the running rows are written back after every step.
        answer_start: the first generated position.
        stop_ids: the stop ids (checked: :func:`check_stop_ids`).
        mask_id: the mask id.
        drop_rows: ``None``, or called on the host after every step that ran the model:
            returns the rows (indices in ``x``) to drop from the batch whatever their tokens
            (rows already gone are ignored, so it may name them again).
    The positions after a row's stop become ``stop_ids[0]`` (the fill); a dropped row that
    has not finished keeps its canvas as it stands.
    """

    def __init__(self, x: torch.Tensor, answer_start: int, stop_ids: Sequence[int],
                 mask_id: int, drop_rows: Optional[Callable[[], Collection[int]]] = None):
        self.x = x
        self.answer_start = answer_start
        self.stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=x.device)
        self.mask_id = mask_id
        self.fill_id = stop_ids[0]
        self.drop_rows = drop_rows
        self.rows: Optional[torch.Tensor] = None  # original indices of the running rows
        self.running = x.shape[0]
        self.followers = []  # parts the front-end handed over (injected draws)

    @property
    def done(self) -> bool:
        """No row is left running."""
        return self.running == 0

    def follow(self, draws):
        """The call's injected draws made to follow compaction (:class:`RowDraws`); ``None``
        (the samplers draw from their generator) stays ``None``."""
        if draws is None:
            return None
        draws = RowDraws(draws, self.x.shape[0])
        self.followers.append(draws)
        return draws

    def full_batch(self, x0: torch.Tensor, confidence: torch.Tensor, transfer: torch.Tensor,
                   start: int, stop: int):
        """A step's outputs for the running rows, ``(b, n)`` each, as the whole batch's in the
        original order: rows not running show their tokens, confidence ``-inf`` and no
        transfer."""
        if self.rows is None:
            return x0, confidence, transfer
        full_x0 = self.x[:, start:stop].clone().index_copy_(0, self.rows, x0)
        full_confidence = confidence.new_full((self.x.shape[0], stop - start), -torch.inf)
        full_transfer = transfer.new_zeros((self.x.shape[0], stop - start))
        return (full_x0, full_confidence.index_copy_(0, self.rows, confidence),
                full_transfer.index_copy_(0, self.rows, transfer))

    def after_step(self, canvas: torch.Tensor, parts: Iterable) -> torch.Tensor:
        """After a step on ``canvas`` (int64 ``(b, L)``, the running rows): writes it back into
        ``x``, fills the rows that finished there, drops them and the rows ``drop_rows``
        names (the ``parts``' and followers' ``compact``, where they have one). Returns the
        canvas of the rows that go on. One host sync (whether any row leaves)."""
        if self.rows is not None:
            self.x.index_copy_(0, self.rows, canvas)
        finished, first = first_stops(canvas[:, self.answer_start:], self.stop_ids,
                                      self.mask_id)
        leaving = finished
        unwanted = self._unwanted() if self.drop_rows is not None else None
        if unwanted is not None:
            leaving = finished | unwanted
        if not bool(leaving.any()):
            return canvas
        drop = leaving.nonzero().squeeze(1)
        keep = (~leaving).nonzero().squeeze(1)
        compaction = Compaction(keep, canvas.shape[0], canvas.index_select(0, keep),
                                canvas.index_select(0, drop) == self.mask_id)
        original = drop if self.rows is None else self.rows.index_select(0, drop)
        answers = self.x[original, self.answer_start:]
        no_fill = torch.full_like(first, answers.shape[1])  # rows dropped unfinished
        fill_after(answers, torch.where(finished, first, no_fill).index_select(0, drop),
                   self.fill_id)
        self.x[original, self.answer_start:] = answers
        for part in list(parts) + self.followers:
            compact = getattr(part, "compact", None)
            if compact is not None:
                compact(compaction)
        self.rows = keep if self.rows is None else self.rows.index_select(0, keep)
        self.running = keep.numel()
        return compaction.canvas

    def _unwanted(self) -> Optional[torch.Tensor]:
        """bool ``(b,)`` over the running rows: those ``drop_rows()`` names; ``None`` when it
        names none (the usual step: no tensor built, nothing copied). Errors name
        ``drop_rows``."""
        named = list(self.drop_rows())
        if not named:
            return None
        batch = self.x.shape[0]
        unwanted = torch.zeros(batch, dtype=torch.bool)
        for row in named:
            if isinstance(row, bool) or not isinstance(row, numbers.Integral):
                raise TypeError(f"drop_rows() must return row indices (ints), got "
                                f"{type(row).__name__} ({row!r})")
            if not 0 <= row < batch:
                raise ValueError(f"drop_rows() returned row {row}, outside the batch "
                                 f"[0, {batch})")
            unwanted[row] = True
        unwanted = unwanted.to(self.x.device)
        return unwanted if self.rows is None else unwanted.index_select(0, self.rows)
