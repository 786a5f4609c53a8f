"""Transfer rules: which masked positions a step unmasks (the engine's third stage).

Each rule is a :class:`genjo_fast.engine.TransferRule`: ``prepare(i)`` on the host before step
``i`` of a window, then ``rule(confidence, masked, step)`` -> bool ``(B, n)`` on the device,
from confidences that are ``-inf`` off the masked positions. The selection itself is the
backend's ``select_transfer`` op (one batched sort; ties to the lowest position).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def transfer_schedule(num_masked: int, steps: int) -> List[int]:
    """Tokens to unmask at each of ``steps`` steps: ``n // steps``, plus one in the first
    ``n % steps`` steps (the reference's ``get_num_transfer_tokens`` for one row)."""
    base, remainder = divmod(num_masked, steps)
    return [base + (i < remainder) for i in range(steps)]


class FixedSchedule:
    """LLaDA's exact rule: at step ``i`` of a block, the ``schedule[i]`` most confident masked
    positions of every row (the same count for all rows: every block starts fully masked).

    Args:
        ops: the backend namespace (``select_transfer``).
        schedule: tokens per step of a block (:func:`transfer_schedule`).
        batch, device: of the transfer-count buffer (filled on the host before each step, so a
            captured CUDA graph reads the current count).
    """

    def __init__(self, ops, schedule: Sequence[int], batch: int, device: torch.device):
        self.ops = ops
        self.schedule = list(schedule)
        self.num_transfer = torch.empty((batch,), dtype=torch.long, device=device)

    def prepare(self, i: int) -> bool:
        k = self.schedule[i]
        if k == 0:
            return False
        self.num_transfer.fill_(k)
        return True

    def __call__(self, confidence: torch.Tensor, masked: torch.Tensor,
                 step: int) -> torch.Tensor:
        return self.ops.select_transfer(confidence, self.num_transfer)

    def compact(self, compaction) -> None:
        """One count per row that goes on (stopping at EOS: :mod:`genjo_fast.stopping`)."""
        self.num_transfer = self.num_transfer[:compaction.keep.numel()]


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
