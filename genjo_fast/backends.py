"""Backends of the per-step sampling ops (``GENJO_FAST_BACKEND``, ``backend=``).

Each backend is a namespace with ``gumbel_argmax_confidence`` (LLaDA's sampler),
``dream_sample`` (Dream's) and ``select_transfer``, of the signatures in
:mod:`genjo_fast.sampling`. In ``"auto"``'s order of preference:

* ``cuda``: ``select_transfer`` from genjo_fast's CUDA extension (``genjo_fast._C``), the
  samplers from the Triton kernels; CUDA tensors only.
* ``triton``: every op as a Triton kernel (``genjo_fast.kernels``). CUDA tensors; CPU tensors
  too under ``TRITON_INTERPRET=1``, but only when asked for by name: ``"auto"`` does not pick
  the (slow) interpreter.
* ``torch``: plain torch ops (:mod:`genjo_fast.sampling`), everywhere; the kernels' oracle.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, Optional, Tuple

import torch

from . import cuda_ext, sampling
from .attention import ATTENTION_BACKENDS
from .dispatch import BackendStatus, Registry
from .kernels import dream_sample as _triton_dream
from .kernels import gumbel_argmax_confidence as _triton_sample
from .kernels import select_transfer as _triton_select

ENV_VAR = "GENJO_FAST_BACKEND"


def _triton_reason(device: torch.device, *inputs) -> Optional[str]:
    return (_triton_sample.unavailable_reason(device)
            or _triton_select.unavailable_reason(device)
            or _triton_dream.unavailable_reason(device))


def _triton_auto_reason(device: torch.device, *inputs) -> Optional[str]:
    if device.type != "cuda":
        return ("'auto' runs the Triton kernels on CUDA tensors only (on CPU they need the slow "
                "interpreter: ask for backend='triton' explicitly)")
    return None


def _cuda_reason(device: torch.device, *inputs) -> Optional[str]:
    return (cuda_ext.unavailable_reason(device) or _triton_sample.unavailable_reason(device)
            or _triton_dream.unavailable_reason(device))


SAMPLING_BACKENDS = Registry("backend", ENV_VAR)
SAMPLING_BACKENDS.register("cuda", SimpleNamespace(
    gumbel_argmax_confidence=_triton_sample.gumbel_argmax_confidence,
    dream_sample=_triton_dream.dream_sample,
    select_transfer=cuda_ext.select_transfer), _cuda_reason)
SAMPLING_BACKENDS.register("triton", SimpleNamespace(
    gumbel_argmax_confidence=_triton_sample.gumbel_argmax_confidence,
    dream_sample=_triton_dream.dream_sample,
    select_transfer=_triton_select.select_transfer), _triton_reason,
    auto_reason=_triton_auto_reason)
SAMPLING_BACKENDS.register("torch", SimpleNamespace(
    gumbel_argmax_confidence=sampling.gumbel_argmax_confidence,
    dream_sample=sampling.dream_sample,
    select_transfer=sampling.select_transfer))


def accepted_backends() -> Dict[str, Tuple[str, ...]]:
    """The names accepted besides ``"auto"``, whether or not they can run here:
    ``{"sampling": ...}`` for ``backend=`` and ``GENJO_FAST_BACKEND``, ``{"attention": ...}``
    for ``GENJO_FAST_ATTENTION`` and the models' ``set_attention_backend``; most preferred
    first. :func:`backend_status` tells which can run on a device."""
    return {"sampling": SAMPLING_BACKENDS.names(), "attention": ATTENTION_BACKENDS.names()}


def backend_status(device=None) -> Tuple[BackendStatus, ...]:
    """Whether every sampling and attention backend can run on ``device``, and why not.

    Args:
        device: a ``torch.device`` or its name; default ``"cuda"`` when CUDA is available,
            else ``"cpu"``.
    Returns:
        :class:`~genjo_fast.dispatch.BackendStatus` ``(op, name, usable, reason, auto)`` of
        every backend, the sampling ones first, each family most preferred first; ``auto`` marks
        the one ``"auto"`` picks. Conditions on the inputs (the attention head size, dtype)
        are not considered.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return (SAMPLING_BACKENDS.status("sampling", device)
            + ATTENTION_BACKENDS.status("attention", device))


def resolve_backend(backend: Optional[str], device: torch.device) -> SimpleNamespace:
    """The ops namespace of ``backend`` (argument, else env variable, else ``"auto"``)."""
    return SAMPLING_BACKENDS.resolve(backend, device)[1]
