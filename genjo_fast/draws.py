"""Sources of the uniform random numbers consumed by the samplers.

A sampler asks for draws by step and by sequence positions, so that the reference (which
draws for every position of the row) and genjo_fast (which draws only for the current block)
can be handed *the same* numbers for the positions they share.

LLaDA's sampler uses :meth:`Draws.gumbel` and :meth:`Draws.remask`; Dream's
(:mod:`genjo_fast.reference_dream`) uses :meth:`Draws.token` (one uniform per position for an
inverse-CDF token sample), :meth:`Draws.remask` (``alg="origin"``'s reveal) and
:meth:`Draws.position` (``alg_temp``'s choice of positions). The default source,
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
        ``remasking='random'`` (LLaDA), the reveal draws of ``alg="origin"`` (Dream)."""
        ...

    def token(self, step: int, start: int, stop: int, batch: int,
              device: torch.device) -> torch.Tensor:
        """float64 ``U(0, 1)`` of shape ``(batch, stop - start)``: one per position, for an
        inverse-CDF token sample at temperature > 0 (Dream)."""
        ...

    def position(self, step: int, start: int, stop: int, batch: int,
                 device: torch.device) -> torch.Tensor:
        """float64 ``U(0, 1)`` of shape ``(batch, stop - start)``: one per position, for the
        Gumbel-top-k choice of positions when ``alg_temp > 0`` (Dream)."""
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

    def token(self, step, start, stop, batch, device):
        return torch.rand((batch, stop - start), dtype=torch.float64, device=device,
                          generator=self.generator)

    position = token  # the same kind of draw, for another use


class TensorDraws:
    """Replays precomputed draws, indexed by global step and absolute position.

    Args:
        gumbel: float64 ``(steps, B, L, V)`` or ``None`` (temperature 0).
        remask: float32 ``(steps, B, L)`` or ``None`` (``low_confidence`` remasking).
        token: float64 ``(steps, B, L)`` or ``None``: Dream's token draws (temperature > 0).
        position: float64 ``(steps, B, L)`` or ``None``: Dream's position draws
            (``alg_temp > 0``).
    """

    def __init__(self, gumbel: Optional[torch.Tensor] = None,
                 remask: Optional[torch.Tensor] = None, *,
                 token: Optional[torch.Tensor] = None,
                 position: Optional[torch.Tensor] = None):
        self._gumbel = gumbel
        self._remask = remask
        self._token = token
        self._position = position

    def gumbel(self, step, start, stop, batch, vocab, device):
        if self._gumbel is None:
            raise ValueError("TensorDraws was built without gumbel draws")
        return self._gumbel[step, :batch, start:stop, :vocab].to(device)

    def remask(self, step, start, stop, batch, device):
        if self._remask is None:
            raise ValueError("TensorDraws was built without remask draws")
        return self._remask[step, :batch, start:stop].to(device)

    def token(self, step, start, stop, batch, device):
        return _replay(self._token, "token", step, start, stop, batch, device)

    def position(self, step, start, stop, batch, device):
        return _replay(self._position, "position", step, start, stop, batch, device)


def _replay(draws: Optional[torch.Tensor], name: str, step: int, start: int, stop: int,
            batch: int, device: torch.device) -> torch.Tensor:
    """``draws[step, :batch, start:stop]`` on ``device``, or an error naming the missing kind."""
    if draws is None:
        raise ValueError(f"TensorDraws was built without {name} draws")
    return draws[step, :batch, start:stop].to(device)
