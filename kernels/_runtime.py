"""Where genjo_fast's Triton kernels can run: shared by every kernel module."""
from __future__ import annotations

import os
from typing import Optional

import torch


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) runs in the Triton interpreter.

    That is so when ``TRITON_INTERPRET=1`` was set before triton and the kernel's module were
    imported: ``triton.jit`` reads it when it decorates, so the mode is fixed for the process.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def kernel_unavailable_reason(device, kernel) -> Optional[str]:
    """Why ``kernel`` (``None`` if triton is missing) cannot run on ``device``, or ``None`` when
    it can: CUDA tensors when compiled, CPU tensors when interpreted."""
    device = torch.device(device)
    if kernel is None:
        return "triton is not installed"
    interpreted = is_interpreted(kernel)
    if device.type == "cuda":
        if interpreted:
            return "TRITON_INTERPRET=1: the kernel runs in the interpreter, on CPU tensors"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if device.type == "cpu":
        if not (interpreted and os.environ.get("TRITON_INTERPRET") == "1"):
            return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
                    "triton is imported")
        return None
    return f"device type {device.type!r} is not supported"


def require_device(what: str, device, reason: Optional[str]) -> None:
    """Raises ``RuntimeError`` naming ``what`` (the op) and ``device`` when ``reason`` (from an
    ``unavailable_reason``) says the op cannot run there."""
    if reason is not None:
        raise RuntimeError(f"{what} cannot run on {device}: {reason}")
