"""Backends of the per-step sampling ops (``GENJO_FAST_BACKEND``, ``backend=``).

Each backend is a namespace with ``gumbel_argmax_confidence`` and ``select_transfer`` of the
signatures in :mod:`genjo_fast.sampling`. In ``"auto"``'s order of preference:

* ``cuda``: ``select_transfer`` from genjo_fast's CUDA extension (``genjo_fast._C``),
  ``gumbel_argmax_confidence`` from the Triton kernel; CUDA tensors only.
* ``triton``: both ops as Triton kernels (``genjo_fast.kernels``). CUDA tensors; CPU tensors
  too under ``TRITON_INTERPRET=1``, but only when asked for by name: ``"auto"`` does not pick
  the (slow) interpreter.
* ``torch``: plain torch ops (:mod:`genjo_fast.sampling`), everywhere; the kernels' oracle.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from . import cuda_ext, sampling
from .dispatch import Registry
from .kernels import gumbel_argmax_confidence as _triton_sample
from .kernels import select_transfer as _triton_select

ENV_VAR = "GENJO_FAST_BACKEND"


def _triton_check(device: torch.device, *inputs) -> Optional[str]:
    return _triton_sample.is_available(device) or _triton_select.is_available(device)


def _triton_auto_check(device: torch.device, *inputs) -> Optional[str]:
    if device.type != "cuda":
        return ("'auto' runs the Triton kernels on CUDA tensors only (on CPU they need the slow "
                "interpreter: ask for backend='triton' explicitly)")
    return None


def _cuda_check(device: torch.device, *inputs) -> Optional[str]:
    return cuda_ext.is_available(device) or _triton_sample.is_available(device)


SAMPLING_BACKENDS = Registry("backend", ENV_VAR)
SAMPLING_BACKENDS.register("cuda", SimpleNamespace(
    gumbel_argmax_confidence=_triton_sample.gumbel_argmax_confidence,
    select_transfer=cuda_ext.select_transfer), _cuda_check)
SAMPLING_BACKENDS.register("triton", SimpleNamespace(
    gumbel_argmax_confidence=_triton_sample.gumbel_argmax_confidence,
    select_transfer=_triton_select.select_transfer), _triton_check,
    auto_check=_triton_auto_check)
SAMPLING_BACKENDS.register("torch", SimpleNamespace(
    gumbel_argmax_confidence=sampling.gumbel_argmax_confidence,
    select_transfer=sampling.select_transfer))


def available_backends():
    """Names accepted by ``backend=`` and ``GENJO_FAST_BACKEND`` (besides ``"auto"``)."""
    return SAMPLING_BACKENDS.names()


def resolve_backend(backend: Optional[str], device: torch.device) -> SimpleNamespace:
    """The ops namespace of ``backend`` (argument, else env variable, else ``"auto"``)."""
    return SAMPLING_BACKENDS.resolve(backend, device)[1]
