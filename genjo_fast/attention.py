"""Non-causal multi-head attention with a key-padding mask, dispatched to the fastest backend.

Backends (env variable ``GENJO_FAST_ATTENTION`` or ``backend=``), most preferred first:
``triton`` (genjo_fast's flash-attention kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``
when asked for by name),
``flash_attn`` (the flash-attn package; CUDA, fp16/bf16) and ``sdpa`` (PyTorch's
scaled_dot_product_attention, always available). ``auto`` (the default) picks the best
available one for the device and logs once when it falls back; asking explicitly for an
unavailable backend is an error.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import Registry
from .kernels import flash_attention as _triton_attention

ENV_VAR = "GENJO_FAST_ATTENTION"


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PyTorch SDPA statement of :func:`attention` (same arguments)."""
    attn_mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-torch statement in float32 (the oracle of the kernels' tests)."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], -torch.inf)
    return (scores.softmax(-1) @ v).to(q.dtype)


def attention_flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The flash-attn package's statement of :func:`attention` (same arguments; CUDA, fp16/bf16).

    flash-attn takes ``(B, L, H, D)`` and has no key mask: a mask drops the padded keys and runs
    the varlen kernel, every batch row being one sequence of ``Lq`` queries and its real keys.
    """
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"attention backend 'flash_attn' needs float16 or bfloat16, got {q.dtype}")
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # (B, L, H, D)
    if key_mask is None:
        return flash_attn_func(q_, k_, v_, causal=False).transpose(1, 2)
    batch, seqlen_q, heads, head_dim = q_.shape
    real = key_mask.bool()
    lengths = real.sum(1, dtype=torch.int32)  # [B] real keys per row
    cu_seqlens_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_seqlen_k = int(lengths.max())
    if max_seqlen_k == 0:  # no real key anywhere
        return torch.zeros_like(q)
    cu_seqlens_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32,
                                device=q.device)
    out = flash_attn_varlen_func(
        q_.reshape(batch * seqlen_q, heads, head_dim), k_[real], v_[real],
        cu_seqlens_q, cu_seqlens_k, seqlen_q, max_seqlen_k, causal=False)
    # A row without real keys comes out zero (flash-attn writes zeros), as from "triton".
    return out.view(batch, seqlen_q, heads, head_dim).transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _flash_attn_import_error() -> Optional[str]:
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # not installed, or built against another torch
        return f"flash_attn is not importable ({type(exc).__name__}: {exc})"
    return None


def _triton_check(device: torch.device, q: Optional[torch.Tensor] = None) -> Optional[str]:
    reason = _triton_attention.is_available(device)
    if reason is None and q is not None and q.shape[-1] not in _triton_attention.HEAD_DIMS:
        reason = f"head_dim {q.shape[-1]} is not one of {_triton_attention.HEAD_DIMS}"
    if reason is None and q is not None and q.requires_grad and torch.is_grad_enabled():
        # Its output would be cut from the graph: training would silently lose the gradients
        # of the attention inputs.
        reason = "the Triton kernel has no backward pass (the inputs require grad)"
    return reason


def _flash_attn_check(device: torch.device, q: Optional[torch.Tensor] = None) -> Optional[str]:
    reason = _flash_attn_import_error()
    if reason is None and device.type != "cuda":
        reason = f"flash_attn runs on CUDA only, not {device.type}"
    return reason


ATTENTION_BACKENDS = Registry("attention backend", ENV_VAR)
ATTENTION_BACKENDS.register("triton", _triton_attention.flash_attention, _triton_check,
                            auto_check=lambda device, *inputs: None if device.type == "cuda"
                            else "'auto' runs the Triton kernel on CUDA tensors only (on CPU it "
                                 "needs the slow interpreter: ask for 'triton' by name)")
ATTENTION_BACKENDS.register("flash_attn", attention_flash_attn, _flash_attn_check)
ATTENTION_BACKENDS.register("sdpa", attention_sdpa)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: Optional[torch.Tensor] = None, *,
              backend: Optional[str] = None) -> torch.Tensor:
    """Non-causal scaled dot-product attention, scale ``1 / sqrt(head_dim)``.

    Args:
        q: ``(B, Hq, Lq, D)``; k, v: ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0`` (GQA).
        key_mask: ``(B, Lk)``, nonzero/True for real keys, 0/False for padding; or ``None``.
        backend: ``auto`` or a backend name; default from ``GENJO_FAST_ATTENTION``.
    Returns:
        ``(B, Hq, Lq, D)`` in ``q``'s dtype.
    """
    return ATTENTION_BACKENDS.resolve(backend, q.device, q)[1](q, k, v, key_mask)
