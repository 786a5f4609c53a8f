"""genjo_fast's optional CUDA extension, ``genjo_fast._C`` (built by ``setup.py`` from ``csrc/``).

Importing ``genjo_fast._C`` loads a library whose ``TORCH_LIBRARY`` registrations define
``torch.ops.genjo_fast.select_transfer`` (CUDA and CPU kernels); the fake (meta) implementation
that ``torch.compile`` and ``FakeTensorMode`` need is registered here. Without the extension
(not built, or built against another torch) :func:`unavailable_reason` says why and
genjo_fast runs on its Triton and torch backends.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .kernels.select_transfer import check_select_transfer_args, select_transfer_fake

try:
    _C = importlib.import_module("genjo_fast._C")  # loading the library registers the ops
except (ImportError, OSError) as exc:  # not built, or an ABI mismatch with this torch
    _C = None
    IMPORT_ERROR: Optional[str] = f"{type(exc).__name__}: {exc}"
else:
    IMPORT_ERROR = None


if _C is not None:  # shape/dtype propagation for meta tensors, FakeTensorMode, torch.compile
    torch.library.register_fake("genjo_fast::select_transfer")(select_transfer_fake)


def unavailable_reason(device) -> Optional[str]:
    """Why the extension's ops cannot run on ``device``; ``None`` when they can."""
    device = torch.device(device)
    if _C is None:
        return (f"the CUDA extension was not built ({IMPORT_ERROR}); reinstall with "
                f"GENJO_FAST_BUILD_CUDA=1 pip install --no-build-isolation .")
    if device.type != "cuda":
        return "CUDA tensors only"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def select_transfer(confidence: torch.Tensor, num_transfer: Optional[torch.Tensor] = None, *,
                    threshold: Optional[float] = None,
                    factor: Optional[float] = None) -> torch.Tensor:
    """``torch.ops.genjo_fast.select_transfer``: same arguments, semantics and result as
    :func:`genjo_fast.sampling.select_transfer` (one thread block per row, shared-memory rank
    counting, ties to the lowest position).

    Args:
        confidence: ``(B, N)`` float16, bfloat16, float32 or float64, any strides.
        num_transfer: integer ``(B,)``, or ``threshold`` / ``factor``: exactly one rule.
    Returns:
        bool ``(B, N)`` transfer mask.
    """
    if _C is None:
        raise RuntimeError(f"genjo_fast's CUDA extension is unavailable: "
                           f"{unavailable_reason('cuda')}")
    check_select_transfer_args(confidence, num_transfer, threshold, factor)
    return torch.ops.genjo_fast.select_transfer(
        confidence, num_transfer,
        None if threshold is None else float(threshold),
        None if factor is None else float(factor))
