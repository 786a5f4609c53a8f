"""Streaming the denoising: transformers' streamer protocol, and genjo_fast's own streamer.

``generate(..., streamer=s)``, ``diffusion_generate(..., streamer=s)`` and the masked-LM
family's ``mdlm_generate`` / ``mdlm_semi_autoregressive`` (the ``text-diffusion`` pipeline's
``streamer=``) drive any object
with transformers' streamer methods (``transformers.TextStreamer``,
``TextIteratorStreamer``, ``TextDiffusionStreamer``, or :class:`DiffusionIteratorStreamer`
below), in this order:

1. ``s.put(prompt)``: the prompt ids, int64 ``(B, Lp)``, once, before the first step;
2. after every step that ran the model:

   * ``s.put(ids)`` when the *confirmed* part of the answer grew: ``ids`` int64 ``(B, k)``,
     the ids it gained. The confirmed part is the longest prefix of the answer that is
     decoded (no mask id) in every row: LLaDA and Dream never change a decoded token, so it
     can only grow. With a sampler that rewrites decoded tokens (``edits=True``, e.g. Seed
     Diffusion's edits) nothing is confirmed before the end. A sampler that knows which
     positions may still change passes them (``step(answer, still_open)``): the confirmed
     part is then the longest prefix where none may (the masked-LM family: a token that can
     still be edited, or a pad that is sampled again, is not confirmed);
   * ``s.put_draft(draft)`` if the streamer has ``put_draft``: ``draft`` int64 ``(B, n)``,
     the answer after the confirmed part, mask ids included (``n`` is 0 once all is
     confirmed). The next draft replaces it (``TextDiffusionStreamer`` redraws it in place);

3. ``s.put(rest)`` with the ids not yet confirmed, if any, then ``s.end()``.

transformers' streamers handle batch 1 only (they raise a ``ValueError`` at the prompt);
:class:`DiffusionIteratorStreamer` handles any batch. The tensors handed to a streamer are
copies on the host that genjo_fast never writes again.

Cost: one device-to-host copy of the answer per step, and only when a streamer is given;
without one the front-ends build no :class:`StreamAdapter` and add no host sync.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from .engine import StepEvent

__all__ = ["StreamAdapter", "DiffusionIteratorStreamer", "StreamUpdate", "decoded_prefix",
           "settled_prefix", "check_streamer"]


def check_streamer(streamer) -> None:
    """``streamer`` must have callable ``put`` and ``end`` (``put_draft`` is optional); a
    streamer asking for logits (transformers' ``_takes_logits``) is refused: genjo_fast streams
    token ids."""
    for method in ("put", "end"):
        if not callable(getattr(streamer, method, None)):
            raise TypeError(f"streamer must have a callable {method}() (transformers' streamer "
                            f"protocol), got {type(streamer).__name__}")
    if getattr(streamer, "_takes_logits", False):
        raise ValueError(f"streamer {type(streamer).__name__} asks for draft logits "
                         "(_takes_logits=True); genjo_fast's streamers receive token ids only")


def decoded_prefix(answer: torch.Tensor, mask_id: int) -> int:
    """The length of the longest prefix of ``answer`` (int ``(B, A)``) that holds no
    ``mask_id`` in any row."""
    return settled_prefix(answer == mask_id)


def settled_prefix(still_open: torch.Tensor) -> int:
    """The length of the longest prefix of columns of ``still_open`` (bool ``(B, A)``) with no
    ``True`` in any row."""
    still_open = still_open.any(0).cpu()
    return int(still_open.int().argmax()) if bool(still_open.any()) else still_open.shape[0]


class StreamAdapter:
    """Drives a streamer through one generation call (the protocol in the module docstring).

    A front-end calls :meth:`begin` with the prompt, :meth:`step` with the answer after every
    step (or uses :meth:`observer`, an engine observer), and :meth:`finish` with the final
    answer.

    Args:
        streamer: an object with ``put``, ``end`` and optionally ``put_draft``.
        mask_id: the mask id (what is not decoded).
        edits: the sampler may change decoded tokens: confirm nothing before :meth:`finish`.
    """

    def __init__(self, streamer, mask_id: int, *, edits: bool = False):
        check_streamer(streamer)
        self.streamer = streamer
        self.mask_id = mask_id
        self.edits = edits
        self.put_draft = getattr(streamer, "put_draft", None)
        if not callable(self.put_draft):
            self.put_draft = None
        self.confirmed = 0

    def begin(self, prompt: torch.Tensor) -> None:
        """``put`` the prompt ids (int ``(B, Lp)``)."""
        self.confirmed = 0
        self.streamer.put(_host_copy(prompt))

    def step(self, answer: torch.Tensor, still_open: Optional[torch.Tensor] = None) -> None:
        """After a step: ``answer`` int64 ``(B, A)``, the generated positions as they stand
        (any device; copied to the host once). ``A`` may grow between steps (answers generated
        block after block beyond a window); what was confirmed must not change.

        ``still_open``: bool ``(B, A)``, the positions a later step may still change, for
        samplers that know (the masked-LM family, :class:`genjo_fast.mdlm.AnswerStream`): the
        confirmed part is then the longest prefix with no such position in any row. Default:
        the positions holding the mask id (nothing before the end with ``edits``)."""
        answer = _host_copy(answer)
        if still_open is not None:
            self._confirm(answer, settled_prefix(still_open))
        elif not self.edits:
            self._confirm(answer, decoded_prefix(answer, self.mask_id))
        if self.put_draft is not None:
            self.put_draft(answer[:, self.confirmed:])

    def finish(self, answer: torch.Tensor) -> None:
        """At the end: ``put`` what was not confirmed of the final ``answer`` (int64
        ``(B, A)``), then ``end()``."""
        answer = _host_copy(answer)
        self._confirm(answer, answer.shape[1])
        self.streamer.end()

    def observer(self, answer_start: int,
                 then: Optional[Callable[[StepEvent], None]] = None
                 ) -> Callable[[StepEvent], None]:
        """An engine observer calling ``then(event)`` (the caller's own observer, if any),
        then :meth:`step` with ``event.x[:, answer_start:]``."""
        def observe(event: StepEvent) -> None:
            if then is not None:
                then(event)
            self.step(event.x[:, answer_start:])
        return observe

    def _confirm(self, answer: torch.Tensor, upto: int) -> None:
        if upto > self.confirmed:
            self.streamer.put(answer[:, self.confirmed:upto])
            self.confirmed = upto


def _host_copy(ids: torch.Tensor) -> torch.Tensor:
    """A detached int64 host copy of ``ids`` (never a view of the caller's tensor)."""
    return ids.detach().to("cpu", torch.long, copy=True)


# ----------------------------------------------------------------------------------------------
# genjo_fast's own streamer
# ----------------------------------------------------------------------------------------------

#: Kinds of the positions of a :class:`StreamUpdate`.
MASK, NEW, KEPT = "mask", "new", "kept"


@dataclass
class StreamUpdate:
    """The answer after one step (or at the end), as :class:`DiffusionIteratorStreamer` sees it.

    Attributes:
        index: 0 for the first update of a call, then 1, 2, ...
        ids: int64 ``(B, A)``: the answer (confirmed part then draft), mask ids included.
        kinds: per row, per position: ``"mask"`` (still masked), ``"new"`` (decoded since the
            previous update) or ``"kept"`` (decoded earlier).
        confirmed_length: number of leading positions confirmed (the same for every row).
        confirmed: per row, the text of the confirmed part.
        draft: per row, the text of the rest, each mask shown as the streamer's ``mask_text``.
            Both texts end at the row's first stop id (``stop_ids``), when there is one.
        done: ``True`` for the last update of the call (``end()``); its draft is empty.
        ends: per row, the position of its first stop id (the answer's length), or ``A``.
        pieces: per row, per position, the text of that one token (masks as ``mask_text``,
            stop ids as ``stop_text``): for visualisations.
    """
    index: int
    ids: torch.Tensor
    kinds: List[List[str]]
    confirmed_length: int
    confirmed: List[str]
    draft: List[str]
    done: bool
    ends: List[int] = field(default_factory=list)
    pieces: List[List[str]] = field(repr=False, default_factory=list)

    def text(self, row: int = 0) -> str:
        """The row's whole answer text so far: confirmed then draft."""
        return self.confirmed[row] + self.draft[row]


class DiffusionIteratorStreamer:
    """A streamer for any batch that queues a :class:`StreamUpdate` after every step (on
    ``put_draft``) and at the end, for another thread to iterate (like transformers'
    ``TextIteratorStreamer``, which queues confirmed text only, batch 1).

    Run the generation in a thread and iterate the streamer in the caller::

        streamer = DiffusionIteratorStreamer(tokenizer, mask_id=126336)
        thread = threading.Thread(target=generate, args=(model, prompt),
                                  kwargs=dict(streamer=streamer, gen_length=64))
        thread.start()
        for update in streamer:
            print(update.text(0))

    If the generating thread fails, it should call :meth:`fail` with the exception: the
    iteration then raises it (instead of waiting for an ``end()`` that never comes).

    Args:
        tokenizer: has ``decode(ids, **decode_kwargs)``.
        mask_id: the mask id.
        stop_ids: ids that end a row's answer text (e.g. EOS and EoT).
        mask_text: what a mask shows as in drafts and pieces.
        stop_text: what a stop id shows as in pieces.
        timeout: seconds the iteration waits for the next update (``None``: no limit); on
            expiry it raises ``queue.Empty``.
        decode_kwargs: passed to ``decode`` (default ``skip_special_tokens=True``).
    """

    def __init__(self, tokenizer, mask_id: int, *, stop_ids: Iterable[int] = (),
                 mask_text: str = "\u2591", stop_text: str = "\u220e",
                 timeout: Optional[float] = None, **decode_kwargs):
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"tokenizer must have a decode() method, got "
                            f"{type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.mask_id = int(mask_id)
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.mask_text = mask_text
        self.stop_text = stop_text
        self.timeout = timeout
        self.decode_kwargs = {"skip_special_tokens": True, **decode_kwargs}
        self._queue: "queue.Queue" = queue.Queue()
        self._lock = threading.Lock()
        self._pieces = {self.mask_id: mask_text}  # token id -> its piece, decoded once
        self._reset()

    # -- the streamer protocol (called by the generating thread) -----------------------------

    def put(self, value: torch.Tensor) -> None:
        """The prompt (first call of a generation), then newly confirmed ids ``(B, k)``."""
        value = _as_rows(value)
        with self._lock:
            if self.prompt is None:
                self.prompt = value
            else:
                self._confirmed = torch.cat(
                    [self._confirmed.expand(value.shape[0], -1), value], dim=1)

    def put_draft(self, value: torch.Tensor) -> None:
        """The answer after the confirmed part, ``(B, n)``; queues an update."""
        value = _as_rows(value)
        with self._lock:
            self._queue.put(self._update(value, done=False))

    def end(self) -> None:
        """The end of the generation: queues the final update, then the end of iteration."""
        with self._lock:
            empty = self._confirmed.new_zeros((self._confirmed.shape[0], 0))
            self._queue.put(self._update(empty, done=True))
            self._queue.put(_END)
            self._reset()

    def fail(self, error: BaseException) -> None:
        """Ends the iteration with ``error`` (raised in the iterating thread)."""
        with self._lock:
            self._queue.put(_Failure(error))
            self._reset()

    # -- iteration (the consuming thread) ------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> StreamUpdate:
        item = self._queue.get(timeout=self.timeout)
        if item is _END:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    # -- internals -------------------------------------------------------------------------------

    def _reset(self) -> None:
        self.prompt: Optional[torch.Tensor] = None
        self._confirmed = torch.zeros((1, 0), dtype=torch.long)
        self._previous: Optional[torch.Tensor] = None
        self._index = 0

    def _update(self, draft: torch.Tensor, done: bool) -> StreamUpdate:
        confirmed = self._confirmed.expand(draft.shape[0], -1)
        ids = torch.cat([confirmed, draft], dim=1)
        masked = ids == self.mask_id
        before = self._previous_masked(ids.shape)
        new = ~masked & before
        kinds = [[MASK if m else NEW if n else KEPT for m, n in zip(mrow, nrow)]
                 for mrow, nrow in zip(masked.tolist(), new.tolist())]
        c = confirmed.shape[1]
        rows = ids.tolist()
        confirmed_texts, drafts, ends, pieces = [], [], [], []
        for row in rows:
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))
            ends.append(stop)
            confirmed_texts.append(self._decode(row[:min(c, stop)]))
            drafts.append(self._render(row[c:stop]) if stop > c else "")
            pieces.append([self._piece(t) for t in row])
        update = StreamUpdate(self._index, ids, kinds, c, confirmed_texts, drafts, done, ends,
                              pieces)
        self._previous = masked
        self._index += 1
        return update

    def _previous_masked(self, shape: Sequence[int]) -> torch.Tensor:
        """The previous update's mask, padded with ``True`` where the answer grew (a position
        that appears decoded counts as new)."""
        before = torch.ones(shape, dtype=torch.bool)
        if self._previous is not None and self._previous.shape[0] == shape[0]:
            width = min(self._previous.shape[1], shape[1])
            before[:, :width] = self._previous[:, :width]
        return before

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, **self.decode_kwargs) if ids else ""

    def _render(self, ids: List[int]) -> str:
        """Text of ``ids`` with each mask as ``mask_text``; runs between masks are decoded
        whole (so multi-token characters stay intact)."""
        out, run = [], []
        for token in ids:
            if token == self.mask_id:
                out.append(self._decode(run))
                out.append(self.mask_text)
                run = []
            else:
                run.append(token)
        out.append(self._decode(run))
        return "".join(out)

    def _piece(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = (self.stop_text if token in self.stop_ids
                     else self.tokenizer.decode([token], skip_special_tokens=False))
            self._pieces[token] = piece
        return piece


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def _as_rows(value) -> torch.Tensor:
    """An int64 host tensor ``(B, n)`` (a 1-D ``(n,)`` is one row)."""
    value = torch.as_tensor(value).detach().to("cpu", torch.long)
    return value.unsqueeze(0) if value.dim() == 1 else value
