"""Dynamic batching for the server (:mod:`genjo_fast.server`): requests queue up, and those
with compatible options run as one batched sampler call, each row computing exactly what it
computes alone.

* :class:`Job`: one answer to produce (a prompt's ids and its :class:`~genjo_fast.chat.Settings`),
  with a callback that receives its events: a :class:`~genjo_fast.streaming.StreamUpdate` after
  every step (streaming jobs), then a :class:`RowResult` or an exception.
* :class:`Batcher`: a queue and one worker thread. The worker takes the oldest job, waits up to
  ``batch_wait`` seconds for more jobs with the same :func:`batch_key`, joins to it the
  waiting ones whose prompts are nearest its own in length (at most ``max_batch_size`` rows:
  the less padding, the less wasted work), left-pads their prompts and runs them as one call.
  A job whose options cannot share a call (a ``seed``: one generator per call; a Dream model)
  runs alone.
* Rows end early: after every step, a row whose answer is settled (a stop id with nothing masked
  before it: its text cannot change any more) gets its result at once and leaves the call's
  computation (the sampler runs with ``stop_at_eos=True`` and the model's stop ids). A
  cancelled job (its client went away) is dropped from the queue, or, when running, gets
  nothing more and leaves the computation after the step under way (the sampler's
  ``drop_rows``); the other rows' tokens are not affected. A call whose rows have all left
  runs no more forwards. A failure while handling one row's events (its stream) fails that
  job alone, whose row then leaves too.
* Tensor parallelism (:mod:`genjo_fast.parallel`): with a
  :class:`~genjo_fast.parallel.Coordinator`, the worker runs each call on every rank
  (:func:`sample` through :meth:`~genjo_fast.parallel.Coordinator.run`); rank 0 decides which
  rows leave and every rank drops the same ones (one broadcast per step), and while idle the
  worker pings the other ranks so that their collectives do not time out. The other ranks
  run :func:`follow`.

**Exactness** (tested in ``tests/test_serve.py``, float32 on the CPU): at temperature 0
(``low_confidence`` remasking) a row's tokens are those of
``genjo_fast.generate(model, its prompt ids, **its options)`` run alone, whatever it shares a
call with. Three things make it so:

* positions: a left-padded row gets the RoPE positions it has alone (``generate``'s
  ``positions``: its first real token at 0), and its padding is masked out. (RoPE is relative,
  so shifted positions give the same function, but not the same rounding.)
* attention depends on the padding in its rounding (a padded row's keys are reduced in other
  blocks), so :class:`RowAttention` runs each row's attention over its own real queries and
  keys, in the very call the row makes alone;
* the rest of the forward is row-wise (norms, activations, matrix products), and on the CPU a
  product's rows do not depend on how many rows are multiplied from :data:`MIN_ROWS` rows up
  (measured; the test checks it). Jobs that alone would multiply fewer rows run alone.

On a GPU the matrix-product kernels may depend on the number of rows (split reductions chosen
by shape): there the guarantee is not claimed (not measured yet).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch

from .chat import ChatModel, Settings
from .dream import diffusion_generate
from .generate import generate
from .parallel import Coordinator, decided_by_leader
from .stopping import first_stops
from .streaming import DiffusionIteratorStreamer, StreamAdapter

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Batch-invariant forward
# ----------------------------------------------------------------------------------------------

class RowAttention:
    """Attention computed row by row over each row's real keys, so that a row's result does not
    depend on the rows beside it or on its padding (the call a row makes is the one it makes
    alone, with no key mask).

    Wraps a model's attention (``(q, k, v, key_mask) -> out``, e.g. an
    :class:`~genjo_fast.attention.AttentionDispatch`). When the queries are the keys' positions
    (``Lq == Lk``, a full forward) the padded queries are skipped too and their outputs are
    zeros (nothing reads them: they are masked keys and no logits are taken there); otherwise
    (a KV cache's rows) every query runs against its row's real keys.

    Args:
        inner: the attention to call per row.
    """

    def __init__(self, inner: Callable):
        self.inner = inner
        self._mask: Optional[torch.Tensor] = None  # the last key mask, and its rows' real keys
        self._real: List[Union[slice, torch.Tensor]] = []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q ``(B, Hq, Lq, D)``, k and v ``(B, Hkv, Lk, D)``, key_mask bool ``(B, Lk)`` or
        ``None`` -> ``(B, Hq, Lq, D)`` in q's dtype."""
        if q.shape[0] == 1 and key_mask is None:
            return self.inner(q, k, v, None)
        if key_mask is None:
            return torch.cat([self.inner(q[b:b + 1], k[b:b + 1], v[b:b + 1], None)
                              for b in range(q.shape[0])])
        out = q.new_zeros(q.shape)
        same = q.shape[2] == k.shape[2]
        for b, real in enumerate(self._real_keys(key_mask)):
            rows = real if same else slice(None)
            out[b:b + 1, :, rows] = self.inner(q[b:b + 1, :, rows], k[b:b + 1, :, real],
                                               v[b:b + 1, :, real], None)
        return out

    def _real_keys(self, key_mask: torch.Tensor) -> List[Union[slice, torch.Tensor]]:
        """Per row, its real keys: a ``slice`` when they are the last ones (left padding: views,
        no copies), else their int64 indices. One host sync per key mask (the model's layers
        share one mask per forward)."""
        if key_mask is not self._mask:
            self._real = []
            for row in key_mask.bool().cpu():
                real = row.nonzero().squeeze(1)
                first = int(real[0]) if len(real) else len(row)
                suffix = len(real) == len(row) - first
                self._real.append(slice(first, None) if suffix else real.to(key_mask.device))
            self._mask = key_mask
        return self._real


def make_batch_invariant(model) -> None:
    """Runs the attention of a LLaDA model's blocks through :class:`RowAttention` (once; the
    model's own backend choice, ``model.set_attention_backend``, still applies inside). A
    batch-1 call without padding is unchanged."""
    for block in model.blocks:
        if not isinstance(block.attention_dispatch, RowAttention):
            block.attention_dispatch = RowAttention(block.attention_dispatch)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, gen_length: int):
    """A batch of prompts of any lengths as ``generate`` takes it, each row computing what it
    computes alone.

    Returns:
        ``(prompt, attention_mask, positions)`` on the CPU: int64 ``(B, Lp)`` left-padded with
        ``pad_id``; and, when the lengths differ, the 0/1 ``(B, Lp)`` mask and the int64
        ``(B, Lp + gen_length)`` positions (each row's first real token at 0), else
        ``None, None`` (no padding: the plain call).
    """
    width = max(len(p) for p in prompts)
    prompt = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        prompt[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids):] = 1
    if all(len(p) == width for p in prompts):
        return prompt, None, None
    canvas = torch.cat([mask, mask.new_ones((len(prompts), gen_length))], dim=1)
    positions = (canvas.cumsum(-1) - 1).clamp(min=0)
    return prompt, mask, positions


def sample(model, family: str, prompt: torch.Tensor, attention_mask: Optional[torch.Tensor],
           positions: Optional[torch.Tensor], keywords: Dict[str, object],
           seed: Optional[int] = None, *, observer: Optional[Callable] = None,
           drop_rows: Optional[Callable[[], Sequence[int]]] = None):
    """One call of the family's sampler on a batch of rows (:func:`left_pad`'s tensors, on
    any device): what the batcher runs, in this process or on every rank of a
    tensor-parallel model (:meth:`~genjo_fast.parallel.Coordinator.run`: the arguments but
    ``observer`` and ``drop_rows`` are sent to every rank; the other ranks take rank 0's
    ``drop_rows()`` through :func:`~genjo_fast.parallel.decided_by_leader`).

    Args:
        family: ``"llada"`` (:func:`~genjo_fast.generate`) or ``"dream"``
            (:func:`~genjo_fast.diffusion_generate`).
        keywords: the sampler's keywords (:meth:`Settings.keywords`) without ``generator``.
        seed: the seed of the call's generator (built here, on the model's device).
        observer, drop_rows: the sampler's (rank 0's).
    Returns:
        ``(ids, stats)``: int64 ``(B, Lp + gen_length)`` on the model's device and the
        call's :class:`~genjo_fast.engine.GenerateStats`.
    """
    device = next(model.parameters()).device
    if seed is not None:
        keywords = dict(keywords, generator=torch.Generator(device).manual_seed(int(seed)))
    if getattr(model, "tensor_parallel", None) is not None:
        drop_rows = decided_by_leader(model, drop_rows)
    prompt, attention_mask = prompt.to(device), _to(attention_mask, device)
    if family == "llada":
        return generate(model, prompt, attention_mask, positions=_to(positions, device),
                        observer=observer, drop_rows=drop_rows, return_stats=True, **keywords)
    return diffusion_generate(model, prompt, attention_mask=attention_mask, observer=observer,
                              drop_rows=drop_rows, return_stats=True, **keywords)


def _to(tensor: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.to(device)


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------

@dataclass
class RowResult:
    """A finished answer.

    Attributes:
        ids: the generated ids up to and including the first stop id (all of them when there
            is none).
        text: the text of the ids before the stop id, special tokens skipped.
        finish_reason: ``"stop"`` (a stop id ended it) or ``"length"``.
        batch_size: the rows of the call it ran in.
    """
    ids: List[int]
    text: str
    finish_reason: str
    batch_size: int

    @property
    def completion_tokens(self) -> int:
        """Tokens of the answer before its stop id."""
        return len(self.ids) - (self.finish_reason == "stop")


@dataclass(eq=False)
class Job:
    """One answer to produce.

    Attributes:
        ids: the prompt's token ids.
        settings: its sampling options (``gen_length``, ``steps``, ... ``seed``).
        on_event: called from the worker thread with each event: a
            :class:`~genjo_fast.streaming.StreamUpdate` after every step (when ``stream``), then
            a :class:`RowResult`, or an exception (a bad option the sampler refused, a failure).
        stream: send the per-step updates.
    """
    ids: List[int]
    settings: Settings
    on_event: Callable[[object], None]
    stream: bool = False
    arrived: float = field(default_factory=time.monotonic)
    key: Optional[Hashable] = None  # its batch_key, set by Batcher.submit
    cancelled: bool = False
    done: bool = False

    def deliver(self, event) -> None:
        """Hands ``event`` to ``on_event``; a failing callback (e.g. its client's event loop
        is gone) is logged, and never stops the batcher."""
        try:
            self.on_event(event)
        except Exception:
            logger.exception("delivering an event of a job failed")


#: The fewest rows a matrix product of a call alone may have for its rows to be those of a
#: batched call: on the CPU, products of 1 to 3 rows take another kernel whose rounding differs
#: (``tests/test_serve.py`` checks that rows agree from this many up).
MIN_ROWS = 4


def batch_key(chat: ChatModel, settings: Settings, prompt_length: int) -> Optional[Hashable]:
    """What jobs must share to run in one call: every option of the sampler call (the prompt
    aside), or ``None`` when the job runs alone: with a ``seed`` (the call's one generator
    draws for all its rows), on a Dream model (its batches are not made exact here), and
    when alone it would multiply fewer than :data:`MIN_ROWS` rows (a block, or prompt and
    answer, shorter than that)."""
    block_length = settings.llada_block_length()
    if chat.family != "llada" or settings.seed is not None \
            or min(block_length, prompt_length + settings.gen_length) < MIN_ROWS:
        return None
    values = {name: getattr(settings, name) for name in Settings.__dataclass_fields__}
    values["block_length"] = block_length
    return tuple(sorted(values.items()))


# ----------------------------------------------------------------------------------------------
# The batcher
# ----------------------------------------------------------------------------------------------

class QueueFull(Exception):
    """The batcher holds ``max_queue`` jobs already."""


@dataclass
class BatcherStats:
    """Counters of a :class:`Batcher` (a consistent copy: :meth:`Batcher.stats`).

    Attributes:
        submitted, completed, failed: jobs received, answered, failed with an error.
        cancelled_queued: jobs cancelled before they ran (never computed).
        cancelled_running: jobs cancelled while their call ran (their row left the call's
            computation after the step under way).
        queued: jobs waiting; running: rows of the running call still wanted.
        batches: sampler calls started; calls_ended: those that returned (or failed);
            rows: their rows summed; largest_batch: the most rows in one.
        steps: model steps run, summed over the calls; row_forwards: the rows those steps
            ran (rows that left a call early are not run again); row_forwards_saved: the row
            forwards the same calls would have run without rows leaving early (summed over
            the calls where that is known: not with ``threshold``/``factor``).
        pings: idle messages to the other ranks of a tensor-parallel model.
    """
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled_queued: int = 0
    cancelled_running: int = 0
    queued: int = 0
    running: int = 0
    batches: int = 0
    calls_ended: int = 0
    rows: int = 0
    largest_batch: int = 0
    steps: int = 0
    row_forwards: int = 0
    row_forwards_saved: int = 0
    pings: int = 0


class Batcher:
    """The request queue and its worker thread (see the module docstring).

    Args:
        chat: the model, its tokenizer and special ids; a LLaDA model is made batch-invariant
            (:func:`make_batch_invariant`).
        max_batch_size: the most rows of one call.
        batch_wait: seconds the oldest job waits for compatible ones before its call starts
            (0: start at once with what is queued).
        max_queue: the most jobs waiting; :meth:`submit` raises :class:`QueueFull` beyond.
        coordinator: with a tensor-parallel model (rank 0's
            :class:`~genjo_fast.parallel.Coordinator`), every call runs on every rank; the
            worker thread is then the only one to use the process group, it pings the other
            ranks every ``ping_every`` seconds while idle, and :meth:`close` releases them.
        ping_every: seconds between two idle pings (well below the process group's timeout).
    """

    def __init__(self, chat: ChatModel, *, max_batch_size: int = 16, batch_wait: float = 0.01,
                 max_queue: int = 1024, coordinator: Optional[Coordinator] = None,
                 ping_every: float = 60.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait < 0:
            raise ValueError(f"batch_wait must be >= 0 seconds, got {batch_wait}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if not ping_every > 0:
            raise ValueError(f"ping_every must be > 0 seconds, got {ping_every}")
        if coordinator is not None and not coordinator.is_leader:
            raise ValueError("the batcher runs on rank 0; the other ranks call "
                             "genjo_fast.batching.follow(chat, coordinator)")
        self.chat = chat
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait
        self.max_queue = max_queue
        self.coordinator = coordinator
        self._idle_wait = ping_every if coordinator is not None else None
        if chat.family == "llada":
            make_batch_invariant(chat.model)
        self._stop_ids = torch.tensor(chat.stop_ids, dtype=torch.long)
        self._pending: Deque[Job] = deque()
        self._running: List[Job] = []
        self._stats = BatcherStats()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="genjo_fast-batcher",
                                        daemon=True)
        self._thread.start()

    # -- the callers' side ----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queues ``job``. Raises :class:`QueueFull` when ``max_queue`` jobs wait, and
        ``RuntimeError`` after :meth:`close`."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already "
                                f"(max_queue={self.max_queue})")
            job.arrived = time.monotonic()
            job.key = batch_key(self.chat, job.settings, len(job.ids))
            self._pending.append(job)
            self._stats.submitted += 1
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The job's client went away: a queued job is dropped, a running one gets no more
        events and leaves its call's computation. Nothing happens to a finished job."""
        with self._cond:
            if job.done or job.cancelled:
                return
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                self._stats.cancelled_queued += 1
            else:
                self._stats.cancelled_running += 1
            self._cond.notify_all()

    def stats(self) -> BatcherStats:
        """A copy of the counters, with the current queue and running rows."""
        with self._cond:
            stats = BatcherStats(**vars(self._stats))
            stats.queued = len(self._pending)
            stats.running = sum(not (j.done or j.cancelled) for j in self._running)
            return stats

    def close(self, timeout: Optional[float] = None) -> None:
        """Stops the worker after its running call (with a coordinator, the worker then
        releases the other ranks); queued jobs get a ``RuntimeError``."""
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for job in pending:
            job.deliver(RuntimeError("the server is shutting down"))
        self._thread.join(timeout)

    # -- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                jobs = self._next_batch()
                if jobs is None:
                    return
                if jobs:
                    self._run(jobs)
                else:  # idle for ping_every seconds
                    self.coordinator.ping()
                    with self._cond:
                        self._stats.pings += 1
        finally:
            if self.coordinator is not None:
                self.coordinator.close()

    def _next_batch(self) -> Optional[List[Job]]:
        """The next call's jobs (oldest first), after the wait for compatible ones; ``[]``
        after ``ping_every`` idle seconds (with a coordinator); ``None`` once closed."""
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    if not self._cond.wait(self._idle_wait):
                        return []
                if self._closed:
                    return None
                first = self._pending[0]
                key = first.key
                deadline = first.arrived + self.batch_wait
                while key is not None and not self._closed and self._pending \
                        and self._pending[0] is first:
                    compatible = sum(j.key == key for j in self._pending)
                    left = deadline - time.monotonic()
                    if compatible >= self.max_batch_size or left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return None
                if not self._pending or self._pending[0] is not first:
                    continue  # the first job was cancelled while waiting
                jobs = [first]
                if key is not None:  # the compatible jobs nearest in length: less padding
                    others = [j for j in itertools.islice(self._pending, 1, None)
                              if j.key == key]
                    others.sort(key=lambda j: abs(len(j.ids) - len(first.ids)))
                    jobs += others[:self.max_batch_size - 1]
                for job in jobs:
                    self._pending.remove(job)
                self._running = jobs
                self._stats.batches += 1
                self._stats.rows += len(jobs)
                self._stats.largest_batch = max(self._stats.largest_batch, len(jobs))
                return jobs

    def _run(self, jobs: List[Job]) -> None:
        """One sampler call for ``jobs`` (compatible), their events delivered as it goes."""
        chat = self.chat
        call = _Call(self, jobs)
        stats = None
        try:
            keywords = jobs[0].settings.keywords(chat)
            keywords.pop("generator")  # sample() builds it from the seed, on each rank
            # settled rows leave the call (the stop ids: those the observer reads)
            keywords.update(stop_at_eos=True, stop_ids=list(chat.stop_ids))
            prompt, mask, positions = left_pad([j.ids for j in jobs], chat.eos_id,
                                               jobs[0].settings.gen_length)
            call.begin(prompt)
            args = (chat.family, prompt, mask, positions, keywords, jobs[0].settings.seed)
            leader = dict(observer=call.observe, drop_rows=call.unwanted)
            if self.coordinator is None:
                out, stats = sample(chat.model, *args, **leader)
            else:
                out, stats = self.coordinator.run(sample, *args, leader_only=leader)
            call.finish(out[:, prompt.shape[1]:])
        except Exception as error:  # a bad option the sampler refused, or a failure
            call.fail(error)
        finally:
            with self._cond:
                self._stats.calls_ended += 1
                self._stats.steps += call.steps
                if stats is not None:
                    self._stats.row_forwards += stats.row_forwards
                    self._stats.row_forwards_saved += stats.row_forwards_saved or 0
                self._running = []


def follow(chat: ChatModel, coordinator: Coordinator) -> int:
    """What the ranks other than 0 of a tensor-parallel server run: the batch-invariant
    attention rank 0's :class:`Batcher` sets up, then the leader's calls until its batcher
    closes (:meth:`~genjo_fast.parallel.Coordinator.follow`). Returns the calls run."""
    if chat.family == "llada":
        make_batch_invariant(chat.model)
    return coordinator.follow()


class _Call:
    """The events of one sampler call's jobs: per-step stream updates, settled rows answered
    early, the rows nobody wants any more (``drop_rows``)."""

    def __init__(self, batcher: Batcher, jobs: List[Job]):
        self.batcher = batcher
        self.jobs = jobs
        self.steps = 0
        chat = batcher.chat
        self.streams: Dict[int, Tuple[StreamAdapter, DiffusionIteratorStreamer]] = {}
        for row, job in enumerate(jobs):
            if job.stream:
                streamer = DiffusionIteratorStreamer(chat.tokenizer, chat.mask_id,
                                                     stop_ids=chat.stop_ids)
                self.streams[row] = (StreamAdapter(streamer, chat.mask_id), streamer)

    def begin(self, prompt: torch.Tensor) -> None:
        for row, (adapter, _) in self.streams.items():
            adapter.begin(prompt[row:row + 1])

    def unwanted(self) -> List[int]:
        """The sampler's ``drop_rows``: the rows whose jobs were cancelled or failed (rows
        already answered have left the call: naming them again changes nothing)."""
        return [row for row, job in enumerate(self.jobs) if job.cancelled or job.done]

    def observe(self, event) -> None:
        """The engine observer: after every step. It never raises: a failure while handling
        a row's events fails that job only (its row then leaves the call), since an exception
        here would end rank 0's call alone and leave the other ranks of a tensor-parallel
        model waiting."""
        self.steps += 1
        answer = event.x[:, event.x.shape[1] - self.jobs[0].settings.gen_length:].cpu()
        done, stop = first_stops(answer, self.batcher._stop_ids, self.batcher.chat.mask_id)
        for row, job in enumerate(self.jobs):
            if job.done or job.cancelled:
                continue
            try:
                if bool(done[row]):
                    self._answer(row, job, answer[row], int(stop[row]))
                elif row in self.streams:
                    adapter, streamer = self.streams[row]
                    adapter.step(answer[row:row + 1])
                    self._send(job, next(streamer))
            except Exception as error:
                logger.exception("a job's events failed; its row leaves the call")
                self._fail([job], error)

    def finish(self, answer: torch.Tensor) -> None:
        """After the call: every row still wanted gets its result."""
        answer = answer.cpu()
        _, stop = first_stops(answer, self.batcher._stop_ids, self.batcher.chat.mask_id)
        for row, job in enumerate(self.jobs):
            if not (job.done or job.cancelled):
                self._answer(row, job, answer[row], int(stop[row]))

    def fail(self, error: Exception) -> None:
        """The call failed: every job still waiting gets ``error``."""
        self._fail(self.jobs, error)

    def _fail(self, jobs: List[Job], error: Exception) -> None:
        with self.batcher._cond:
            jobs = [j for j in jobs if not (j.done or j.cancelled)]
            for job in jobs:
                job.done = True
            self.batcher._stats.failed += len(jobs)
        for job in jobs:
            job.deliver(error)

    def _answer(self, row: int, job: Job, answer: torch.Tensor, stop: int) -> None:
        """Sends row ``row``'s last stream update and its :class:`RowResult`."""
        chat = self.batcher.chat
        ids = answer.tolist()
        found = stop < len(ids)
        if row in self.streams:
            adapter, streamer = self.streams[row]
            adapter.finish(answer[None])
            self._send(job, next(streamer))
        result = RowResult(ids[:stop + 1] if found else ids,
                           chat.tokenizer.decode(ids[:stop], skip_special_tokens=True),
                           "stop" if found else "length", len(self.jobs))
        with self.batcher._cond:
            if job.cancelled:
                return
            job.done = True
            self.batcher._stats.completed += 1
        job.deliver(result)

    def _send(self, job: Job, event) -> None:
        if not job.cancelled:
            job.deliver(event)


__all__ = ["Batcher", "BatcherStats", "Job", "RowResult", "RowAttention", "QueueFull",
           "batch_key", "MIN_ROWS", "left_pad", "make_batch_invariant", "sample", "follow"]
