"""Backends of the per-step sampling ops (``GENJO_FAST_BACKEND``, ``backend=``).

Each backend is a namespace with ``gumbel_argmax_confidence`` and ``select_transfer`` of the
signatures in :mod:`genjo_fast.sampling` (the ``torch`` backend, which runs everywhere).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from . import sampling
from .dispatch import Registry

ENV_VAR = "GENJO_FAST_BACKEND"
SAMPLING_BACKENDS = Registry("backend", ENV_VAR)
SAMPLING_BACKENDS.register("torch", SimpleNamespace(
    gumbel_argmax_confidence=sampling.gumbel_argmax_confidence,
    select_transfer=sampling.select_transfer))


def available_backends():
    """Names accepted by ``backend=`` and ``GENJO_FAST_BACKEND`` (besides ``"auto"``)."""
    return SAMPLING_BACKENDS.names()


def resolve_backend(backend: Optional[str], device: torch.device) -> SimpleNamespace:
    """The ops namespace of ``backend`` (argument, else env variable, else ``"auto"``)."""
    return SAMPLING_BACKENDS.resolve(backend, device)[1]
