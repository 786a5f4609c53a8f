"""Sources of the uniform random numbers consumed by the samplers.

A sampler asks for draws by step and by sequence positions, so that the reference (which
draws for every position of the row) and genjo_fast (which draws only for the current block)
can be handed *the same* numbers for the positions they share. The default source,
:class:`TorchDraws`, simply calls ``torch.rand``; :class:`TensorDraws` replays precomputed
draws and is what the parity tests inject.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch


class Draws(Protocol):
    """What a sampler needs: ``U(0, 1)`` numbers for Gumbel noise and random remasking."""

    def gumbel(self, step: int, start: int, stop: int, batch: int, vocab: int,
               device: torch.device) -> torch.Tensor:
        """float64 ``U(0, 1)`` of shape ``(batch, stop - start, vocab)`` for positions
        ``[start, stop)`` at global step ``step``."""
        ...

    def remask(self, step: int, start: int, stop: int, batch: int,
               device: torch.device) -> torch.Tensor:
        """float32 ``U(0, 1)`` of shape ``(batch, stop - start)``: the confidences of
        ``remasking='random'``."""
        ...


class TorchDraws:
    """Fresh draws from ``torch.rand`` (the reference's own source).

    Args:
        generator: a ``torch.Generator`` on the sampling device, or ``None`` for the global
            RNG (what the reference uses).
    """

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def gumbel(self, step, start, stop, batch, vocab, device):
        return torch.rand((batch, stop - start, vocab), dtype=torch.float64, device=device,
                          generator=self.generator)

    def remask(self, step, start, stop, batch, device):
        return torch.rand((batch, stop - start), dtype=torch.float32, device=device,
                          generator=self.generator)


class TensorDraws:
    """Replays precomputed draws, indexed by global step and absolute position.

    Args:
        gumbel: float64 ``(steps, B, L, V)`` or ``None`` (temperature 0).
        remask: float32 ``(steps, B, L)`` or ``None`` (``low_confidence`` remasking).
    """

    def __init__(self, gumbel: Optional[torch.Tensor] = None,
                 remask: Optional[torch.Tensor] = None):
        self._gumbel = gumbel
        self._remask = remask

    def gumbel(self, step, start, stop, batch, vocab, device):
        if self._gumbel is None:
            raise ValueError("TensorDraws was built without gumbel draws")
        return self._gumbel[step, :batch, start:stop, :vocab].to(device)

    def remask(self, step, start, stop, batch, device):
        if self._remask is None:
            raise ValueError("TensorDraws was built without remask draws")
        return self._remask[step, :batch, start:stop].to(device)
