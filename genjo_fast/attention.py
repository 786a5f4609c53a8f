"""Non-causal multi-head attention with a key-padding mask, dispatched to the fastest backend.

Backends (env variable ``GENJO_FAST_ATTENTION`` or ``backend=``), most preferred first:
``triton`` (genjo_fast's flash-attention kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``
when asked for by name),
``flash_attn`` (the flash-attn package; CUDA, fp16/bf16) and ``sdpa`` (PyTorch's
scaled_dot_product_attention, always available). ``auto`` (the default) picks the best
available one for the device and logs once when it falls back; asking explicitly for an
unavailable backend is an error.

:func:`attention` resolves the backend on each call; a model holds an
:class:`AttentionDispatch`, which resolves it once per (device, dtype, head_dim).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional, Tuple

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

    flash-attn takes ``(B, L, H, D)`` and has no key mask: with a mask, every batch row is one
    sequence of ``Lq`` queries and its real keys for the varlen kernel. The real keys are
    packed to the front of a buffer of all ``B * Lk`` keys (the padded ones behind them, never
    read), ``max_seqlen_k`` is the bound ``Lk``: no host sync, so a CUDA graph can capture it.
    """
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"attention backend 'flash_attn' needs float16 or bfloat16, got {q.dtype}")
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # (B, L, H, D)
    if key_mask is None:
        return flash_attn_func(q_, k_, v_, causal=False).transpose(1, 2)
    batch, seqlen_q, heads, head_dim = q_.shape
    seqlen_k = k_.shape[1]
    if seqlen_k == 0:  # no key at all (a shape, not a value: no sync)
        return torch.zeros_like(q)
    real = key_mask.bool().reshape(-1)  # [B * Lk] row-major: row j's keys, then row j + 1's
    real_before = real.cumsum(0, dtype=torch.int32) - real.int()  # real keys before each key
    lengths = key_mask.bool().sum(1, dtype=torch.int32)  # [B] real keys per row
    cu_seqlens_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # [B + 1]
    index = torch.arange(real.numel(), dtype=torch.int32, device=q.device)
    # Packed slot of each key: real keys in order from 0 (row j's from cu_seqlens_k[j]), the
    # padded ones after the last real key.
    slot = torch.where(real, real_before, cu_seqlens_k[-1] + index - real_before).long()
    k_packed, v_packed = (
        torch.empty_like(x).index_copy_(0, slot, x)
        for x in (k_.reshape(batch * seqlen_k, -1, head_dim),
                  v_.reshape(batch * seqlen_k, -1, head_dim)))
    cu_seqlens_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32,
                                device=q.device)
    out = flash_attn_varlen_func(
        q_.reshape(batch * seqlen_q, heads, head_dim), k_packed, v_packed,
        cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, causal=False)
    # A row without real keys comes out zero (flash-attn writes zeros), as from "triton".
    return out.view(batch, seqlen_q, heads, head_dim).transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _flash_attn_import_error() -> Optional[str]:
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # not installed, or built against another torch
        return f"flash_attn is not importable ({type(exc).__name__}: {exc})"
    return None


def _triton_reason(device: torch.device, q: Optional[torch.Tensor] = None) -> Optional[str]:
    reason = _triton_attention.unavailable_reason(device)
    if reason is None and q is not None and q.shape[-1] not in _triton_attention.HEAD_DIMS:
        reason = f"head_dim {q.shape[-1]} is not one of {_triton_attention.HEAD_DIMS}"
    if reason is None and q is not None and q.requires_grad and torch.is_grad_enabled():
        # Its output would be cut from the graph: training would silently lose the gradients
        # of the attention inputs.
        reason = "the Triton kernel has no backward pass (the inputs require grad)"
    return reason


def _triton_auto_reason(device: torch.device, q: Optional[torch.Tensor] = None) -> Optional[str]:
    if device.type != "cuda":
        return ("'auto' runs the Triton kernel on CUDA tensors only (on CPU it needs the slow "
                "interpreter: ask for 'triton' by name)")
    return None


def _flash_attn_reason(device: torch.device, q: Optional[torch.Tensor] = None) -> Optional[str]:
    reason = _flash_attn_import_error()
    if reason is None and device.type != "cuda":
        reason = f"flash_attn runs on CUDA only, not {device.type}"
    return reason


ATTENTION_BACKENDS = Registry("attention backend", ENV_VAR)
ATTENTION_BACKENDS.register("triton", _triton_attention.flash_attention, _triton_reason,
                            auto_reason=_triton_auto_reason)
ATTENTION_BACKENDS.register("flash_attn", attention_flash_attn, _flash_attn_reason)
ATTENTION_BACKENDS.register("sdpa", attention_sdpa)

#: ``attention(q, k, v, key_mask) -> out``: the signature of every backend.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
                       torch.Tensor]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: Optional[torch.Tensor] = None, *,
              backend: Optional[str] = None) -> torch.Tensor:
    """Non-causal scaled dot-product attention, scale ``1 / sqrt(head_dim)``, its backend
    resolved on this call (models resolve theirs once: :class:`AttentionDispatch`).

    Args:
        q: ``(B, Hq, Lq, D)``; k, v: ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0`` (GQA).
        key_mask: ``(B, Lk)``, nonzero/True for real keys, 0/False for padding; or ``None``.
        backend: ``auto`` or a backend name; default from ``GENJO_FAST_ATTENTION``.
    Returns:
        ``(B, Hq, Lq, D)`` in ``q``'s dtype.
    """
    return ATTENTION_BACKENDS.resolve(backend, q.device, q)[1](q, k, v, key_mask)


class AttentionDispatch:
    """A model's attention: the backend is resolved once per (device, dtype, head_dim) and kept,
    not looked up again at every layer of every step.

    ``GENJO_FAST_ATTENTION`` is read when a (device, dtype, head_dim) is first seen;
    :meth:`set_backend` changes the choice afterwards (and forgets the resolved ones). Models
    hold one instance, shared by their layers::

        self.attention = AttentionDispatch()          # in the model
        out = self.attention(q, k, v, key_mask)       # in a layer

    Args:
        backend: ``None`` (``GENJO_FAST_ATTENTION``, else ``"auto"``), ``"auto"`` or a name of
            :data:`ATTENTION_BACKENDS`.
    """

    def __init__(self, backend: Optional[str] = None):
        self._chosen: Dict[Tuple[torch.device, torch.dtype, int], Tuple[str, AttentionFn]] = {}
        self.set_backend(backend)

    @property
    def backend(self) -> Optional[str]:
        """The requested backend (``None``: the env variable's, else ``"auto"``)."""
        return self._backend

    def set_backend(self, backend: Optional[str]) -> None:
        """Requests ``backend`` (as the constructor's argument) from the next call on."""
        if backend is not None and backend != "auto" and backend not in ATTENTION_BACKENDS.names():
            raise ValueError(f"attention backend={backend!r} is not known; expected None, "
                             f"'auto' or one of {ATTENTION_BACKENDS.names()}")
        self._backend = backend
        self._chosen.clear()

    def resolve(self, q: torch.Tensor) -> Tuple[str, AttentionFn]:
        """``(name, function)`` of the backend for queries like ``q`` ``(B, Hq, Lq, D)``:
        resolved on the first call for its (device, dtype, D, training), then kept."""
        # Training (inputs that require grad) may exclude a forward-only backend: its own key.
        key = (q.device, q.dtype, q.shape[-1], q.requires_grad and torch.is_grad_enabled())
        chosen = self._chosen.get(key)
        if chosen is None:
            chosen = self._chosen[key] = ATTENTION_BACKENDS.resolve(self._backend, q.device, q)
        return chosen

    def chosen(self) -> Dict[Tuple[torch.device, torch.dtype, int, bool], str]:
        """The backends resolved so far, by (device, dtype, head_dim, training)."""
        return {key: name for key, (name, _) in self._chosen.items()}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:func:`attention` (same arguments and result) through the resolved backend."""
        return self.resolve(q)[1](q, k, v, key_mask)

    def __repr__(self) -> str:
        return f"AttentionDispatch(backend={self._backend!r}, chosen={self.chosen()})"
