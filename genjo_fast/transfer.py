"""Transfer rules: which masked positions a step unmasks (the engine's third stage).

Each rule is a :class:`genjo_fast.engine.TransferRule`: ``prepare(i)`` on the host before step
``i`` of a window, then ``rule(confidence, masked, step)`` -> bool ``(B, n)`` on the device,
from confidences that are ``-inf`` off the masked positions. The selection itself is the
backend's ``select_transfer`` op (one batched sort; ties to the lowest position).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from .engine import Window


def transfer_schedule(num_masked: int, steps: int) -> List[int]:
    """Tokens to unmask at each of ``steps`` steps: ``n // steps``, plus one in the first
    ``n % steps`` steps (the reference's ``get_num_transfer_tokens`` for one row)."""
    base, remainder = divmod(num_masked, steps)
    return [base + (i < remainder) for i in range(steps)]


def app_blocks(gen_length: int, block_length: int, steps: int) -> Tuple[int, int, int]:
    """The reference app's blocks: ``(num_blocks, block_length, steps_per_block)`` with
    ``block_length`` cut to ``gen_length``, ``ceil(gen_length / block_length)`` blocks (the
    last one shorter when it does not divide) and ``max(1, steps // num_blocks)`` steps per
    block."""
    block_length = min(block_length, gen_length)
    num_blocks = -(-gen_length // block_length)
    return num_blocks, block_length, max(1, steps // num_blocks)


class FixedSchedule:
    """LLaDA's exact rule (``generate.py``'s ``get_num_transfer_tokens``): the steps of a
    block share out, row by row, the positions the block holds masked when it starts, by
    :func:`transfer_schedule`; each step transfers that many of the row's most confident
    masked positions.

    Positions that are not masks when a block starts (constraints, the tail an
    ``adaptive_length`` cut filled) are not in the count. A window may be the tail of a block
    (``adaptive_length`` splits the block its decision follows): its rows' masked counts at
    its start are then shared out over the block's steps left. Counting is one host sync per
    window; steps where no row transfers are skipped.

    Args:
        ops: the backend namespace (``select_transfer``).
        steps_per_block: the steps of a block.
        masked_counts: ``f(window)`` -> the rows' numbers of masked positions of the
            window's block, a list of ``B`` ints (read when the window starts).
        batch, device: of the transfer-count buffer (filled before each step, so a captured
            CUDA graph reads the current count).
    """

    def __init__(self, ops, steps_per_block: int, masked_counts: Callable[[Window], List[int]],
                 batch: int, device: torch.device):
        self.ops = ops
        self.steps_per_block = steps_per_block
        self.masked_counts = masked_counts
        self.num_transfer = torch.empty((batch,), dtype=torch.long, device=device)
        self.window = None
        self.offset = 0
        self.columns: List[List[int]] = []
        self.table: Optional[torch.Tensor] = None
        self.running: Optional[List[int]] = None  # rows going on (None: all), by stopping
        self.would_run: List[bool] = []

    def begin(self, window: Window) -> None:
        self.window = window
        self.offset = window.first_step - window.block * self.steps_per_block
        left = self.steps_per_block - self.offset
        rows = [transfer_schedule(n, left) for n in self.masked_counts(window)]
        self.would_run = [max(column) > 0 for column in zip(*rows)]  # every row of the call
        if self.running is not None:  # rows stopped at EOS: the schedule of those going on
            rows = [rows[r] for r in self.running]
        self.columns = [list(column) for column in zip(*rows)] if rows else \
            [[] for _ in range(left)]  # [step][row]
        self.table = None
        if any(len(set(column)) > 1 for column in self.columns):  # rows differ: per-row counts
            self.table = torch.tensor(self.columns, dtype=torch.long,
                                      device=self.num_transfer.device)

    def prepare(self, i: int) -> bool:
        column = self.columns[i]
        if not column:  # every row stopped at EOS: would the call without the option run it?
            return self.would_run[i]
        if max(column) == 0:
            return False
        if self.table is None:
            self.num_transfer.fill_(column[0])
        else:
            self.num_transfer.copy_(self.table[i])
        return True

    def __call__(self, confidence: torch.Tensor, masked: torch.Tensor,
                 step: int) -> torch.Tensor:
        return self.ops.select_transfer(confidence, self.num_transfer)

    def compact(self, compaction) -> None:
        """The counts of the rows that go on (stopping at EOS: :mod:`genjo_fast.stopping`);
        ``masked_counts`` keeps counting every row of the call."""
        keep = compaction.keep.tolist()
        self.running = keep if self.running is None else [self.running[r] for r in keep]
        self.num_transfer = self.num_transfer[:len(keep)]
        self.columns = [[column[r] for r in keep] for column in self.columns]
        if self.table is not None:
            self.table = self.table[:, compaction.keep.to(self.table.device)]


class AppSchedule(FixedSchedule):
    """The reference app's rule (``generate(..., sampler="app")``, stated in
    :mod:`genjo_fast.reference_app`): :class:`FixedSchedule`'s counts, except that a block's
    LAST step transfers every position of the block still masked. That step runs whenever
    its count is positive or, checked on the host then, a masked position is left (only when
    an earlier choice was the mask id itself)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last = False

    def prepare(self, i: int) -> bool:
        self.last = self.offset + i == self.steps_per_block - 1
        if self.last:
            return max(self.columns[i]) > 0 or sum(self.masked_counts(self.window)) > 0
        return super().prepare(i)

    def __call__(self, confidence: torch.Tensor, masked: torch.Tensor,
                 step: int) -> torch.Tensor:
        if self.last:
            return masked
        return super().__call__(confidence, masked, step)


class AdaptiveRule:
    """APPROXIMATE (Fast-dLLM's parallel decoding), per row: ``threshold``, the most confident
    masked position plus every other one with confidence ``>= threshold``; or ``factor``, the
    largest prefix of ``n`` sorted confidences whose ``n``-th is ``>= 1 - factor / (n + 1)``.
    Rows with no mask left select nothing (they stop changing)."""

    def __init__(self, ops, threshold: Optional[float] = None, factor: Optional[float] = None):
        self.ops = ops
        self.threshold = threshold
        self.factor = factor

    def prepare(self, i: int) -> bool:
        return True

    def __call__(self, confidence: torch.Tensor, masked: torch.Tensor,
                 step: int) -> torch.Tensor:
        return self.ops.select_transfer(confidence, threshold=self.threshold, factor=self.factor)
