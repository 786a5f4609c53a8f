"""Non-causal flash attention (forward) in Triton, with GQA and a key-padding mask.

``flash_attention(q, k, v, key_mask)`` computes ``softmax(q @ k^T / sqrt(D)) @ v`` with the
online softmax of FlashAttention-2: one program owns a ``BLOCK_M`` tile of queries of one
(batch, head) and streams over the keys in ``BLOCK_N`` tiles, keeping a running row max
``m_i``, a running row sum ``l_i`` and an fp32 accumulator. Scores live in the base-2 domain
(``log2(e) / sqrt(D)`` is folded into one scale) so that the kernel uses ``exp2``.

Padded keys (``key_mask == 0``) and the tail of the last key tile get a score of ``-inf``. A
query whose keys are all padded has ``l_i == 0`` at the end and gets a zero output row, not NaN.

The plain-torch oracle is :func:`genjo_fast.attention.attention_naive`. On CPU tensors the
kernel runs through the Triton interpreter (``TRITON_INTERPRET=1``), which is slow: tests use
small shapes.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch

from ._runtime import is_interpreted, kernel_unavailable_reason, require_device

try:
    import triton
    import triton.language as tl
except ImportError:  # genjo_fast imports without triton; unavailable_reason() says why
    triton = None
    tl = None

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (16, 32, 64, 128, 256)
_LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit
    def _flash_attn_fwd_kernel(
        Q, K, V, KeyMask, Out,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mn,
        stride_ob, stride_oh, stride_om, stride_od,
        num_heads, group, seqlen_q, seqlen_k,
        qk_scale,  # log2(e) / sqrt(HEAD_DIM)
        HAS_MASK: tl.constexpr,  # KeyMask is read (else it is a dummy pointer)
        EVEN_N: tl.constexpr,  # seqlen_k % BLOCK_N == 0: no key tail to mask
        DOT_FP32: tl.constexpr,  # dots on fp32 operands in full fp32 (not TF32); see launcher
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // num_heads).to(tl.int64)
        h = (pid_bh % num_heads).to(tl.int64)
        kv_h = h // group  # GQA: `group` query heads share one k/v head

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
        offs_d = tl.arange(0, HEAD_DIM)  # [HEAD_DIM]
        row_ok = offs_m < seqlen_q  # [BLOCK_M]

        q_ptrs = (Q + b * stride_qb + h * stride_qh
                  + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)  # [BLOCK_M, D]
        # K is read transposed so that q @ k is a plain dot.
        k_ptrs = (K + b * stride_kb + kv_h * stride_kh
                  + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd)  # [D, BLOCK_N]
        v_ptrs = (V + b * stride_vb + kv_h * stride_vh
                  + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)  # [BLOCK_N, D]
        mask_ptrs = KeyMask + b * stride_mb + offs_n * stride_mn  # [BLOCK_N]

        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
        if DOT_FP32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # [BLOCK_M] running max
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BLOCK_M] running sum
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # [BLOCK_M, D]

        for start_n in range(0, seqlen_k, BLOCK_N):
            cols = start_n + offs_n  # [BLOCK_N]
            if EVEN_N:
                k = tl.load(k_ptrs)  # [D, BLOCK_N]
                v = tl.load(v_ptrs)  # [BLOCK_N, D]
            else:
                k = tl.load(k_ptrs, mask=cols[None, :] < seqlen_k, other=0.0)
                v = tl.load(v_ptrs, mask=cols[:, None] < seqlen_k, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                qk = tl.dot(q, k, input_precision="ieee")  # [BLOCK_M, BLOCK_N]
            else:
                qk = tl.dot(q, k)  # [BLOCK_M, BLOCK_N]
            qk = qk * qk_scale
            if HAS_MASK:
                key_ok = tl.load(mask_ptrs, mask=cols < seqlen_k, other=0) != 0  # [BLOCK_N]
                qk = tl.where(key_ok[None, :], qk, float("-inf"))
            elif not EVEN_N:
                qk = tl.where(cols[None, :] < seqlen_k, qk, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(qk, 1))  # [BLOCK_M]
            # Rows with no real key so far keep m_new == -inf: shift by 0 there, so that
            # exp2(-inf - -inf) never makes a NaN (p and alpha come out 0 instead).
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # [BLOCK_M]
            p = tl.exp2(qk - m_shift[:, None])  # [BLOCK_M, BLOCK_N]
            alpha = tl.exp2(m_i - m_shift)  # [BLOCK_M] rescales the old sum and accumulator
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            p_v = p.to(V.dtype.element_ty)  # [BLOCK_M, BLOCK_N] p is rounded to v's dtype
            if DOT_FP32:
                acc += tl.dot(p_v.to(tl.float32), v, input_precision="ieee")  # [BLOCK_M, D]
            else:
                acc += tl.dot(p_v, v)  # [BLOCK_M, D]
            m_i = m_new

            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
            mask_ptrs += BLOCK_N * stride_mn

        # A row whose keys are all padded has l_i == 0 and acc == 0: its output is 0.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # [BLOCK_M]
        out = acc / l_safe[:, None]  # [BLOCK_M, D]
        o_ptrs = (Out + b * stride_ob + h * stride_oh
                  + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)  # [BLOCK_M, D]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


_KERNEL = _flash_attn_fwd_kernel if triton is not None else None
_INTERPRETED = _KERNEL is not None and is_interpreted(_KERNEL)


def unavailable_reason(device) -> Optional[str]:
    """Why :func:`flash_attention` cannot run on ``device`` (besides
    :func:`~genjo_fast.kernels._runtime.kernel_unavailable_reason`: compute capability
    >= 8.0); ``None`` when it can."""
    reason = kernel_unavailable_reason(device, _KERNEL)
    device = torch.device(device)
    if reason is None and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"needs a GPU of compute capability >= 8.0, got {major}.{minor}"
    return reason


def _check_inputs(q, k, v, key_mask) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, length, head_dim), "
                             f"got {tuple(x.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q dtype must be float32, bfloat16 or float16, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} dtype {x.dtype} must equal q dtype {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    batch, q_heads, _, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"q head_dim (last dim) must be a power of two in 16..256, "
                         f"got {head_dim}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k shape {tuple(k.shape)} must be (batch={batch}, kv_heads, "
                         f"key_length, head_dim={head_dim}) to match q {tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads})")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor):
            raise TypeError(f"key_mask must be a torch.Tensor or None, "
                            f"got {type(key_mask).__name__}")
        if tuple(key_mask.shape) != (batch, k.shape[2]):
            raise ValueError(f"key_mask shape {tuple(key_mask.shape)} must be "
                             f"(batch, key_length) = {(batch, k.shape[2])}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask is on {key_mask.device} but q is on {q.device}")
        if key_mask.dtype.is_complex:
            raise TypeError(f"key_mask must be bool, integer or float, got {key_mask.dtype}")


def _check_block(name: str, value: Optional[int]) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 16 or value & (value - 1)):
        raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")


def _tile_config(head_dim: int, dtype: torch.dtype, seqlen_q: int, seqlen_k: int,
                 device: torch.device) -> Tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for this problem."""
    fit_m = max(16, triton.next_power_of_2(seqlen_q))  # no tile larger than the problem
    fit_n = max(16, triton.next_power_of_2(seqlen_k))
    if _INTERPRETED:
        # The interpreter pays per program and per loop trip: few, large tiles.
        return min(128, fit_m), min(128, fit_n), 4, 1
    if dtype == torch.float32:  # twice the bytes per tile: halve the tiles
        block_m, block_n, warps, stages = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2),
                                           64: (64, 64, 4, 2), 128: (64, 32, 4, 2),
                                           256: (32, 32, 4, 1)}[head_dim]
    else:
        block_m, block_n, warps, stages = {16: (128, 64, 4, 3), 32: (128, 64, 4, 3),
                                           64: (128, 64, 4, 3), 128: (128, 64, 8, 2),
                                           256: (64, 32, 8, 2)}[head_dim]
        if torch.cuda.get_device_capability(device) not in ((8, 0), (9, 0)):
            stages = min(stages, 2)  # consumer parts have ~100 KB of shared memory
    return min(block_m, fit_m), min(block_n, fit_n), warps, stages


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: Optional[torch.Tensor] = None, *,
                    block_m: Optional[int] = None, block_n: Optional[int] = None
                    ) -> torch.Tensor:
    """Non-causal attention ``softmax(q k^T / sqrt(D)) v`` with a key-padding mask.

    Args:
        q: ``(B, Hq, Lq, D)``; k, v: ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0`` (query head
            ``h`` reads k/v head ``h // (Hq // Hkv)``). float32, bfloat16 or float16, all the
            same; ``D`` a power of two in 16..256. Any strides (e.g. a ``(B, L, H, D)`` tensor
            transposed to ``(B, H, L, D)``).
        key_mask: ``(B, Lk)``, nonzero/True for real keys, 0/False for padding; or ``None``.
            A query whose keys are all padding gets a zero output row.
        block_m, block_n: override the query / key tile sizes (powers of two >= 16); for
            tests and tuning.
    Returns:
        ``(B, Hq, Lq, D)`` contiguous, in ``q``'s dtype (accumulation is in float32).
    """
    _check_inputs(q, k, v, key_mask)
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    return torch.ops.genjo_fast_triton.flash_attention(q, k, v, key_mask, block_m, block_n)


@torch.library.custom_op("genjo_fast_triton::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_mask: Optional[torch.Tensor], block_m: Optional[int],
                        block_n: Optional[int]) -> torch.Tensor:
    """``torch.ops.genjo_fast_triton.flash_attention``: the kernel launch of
    :func:`flash_attention` on checked arguments."""
    require_device("flash_attention", q.device, unavailable_reason(q.device))

    batch, q_heads, seqlen_q, head_dim = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    out = torch.empty((batch, q_heads, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if seqlen_k == 0:  # no key at all: every row is "all padded"
        return out.zero_()

    bm, bn, num_warps, num_stages = _tile_config(head_dim, q.dtype, seqlen_q, seqlen_k,
                                                  q.device)
    bm, bn = block_m or bm, block_n or bn
    if key_mask is None:
        mask_arg, mask_strides = q, (0, 0)  # never read (HAS_MASK=False)
    else:
        # Triton has no bool pointers; a bool tensor is reinterpreted (no copy) as uint8.
        mask_arg = key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else key_mask
        mask_strides = (mask_arg.stride(0), mask_arg.stride(1))

    if batch * q_heads > 65535:  # CUDA's limit on the grid's second axis
        raise ValueError(f"q batch * heads = {batch * q_heads} exceeds 65535; split the batch")
    grid = (triton.cdiv(seqlen_q, bm), batch * q_heads)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _flash_attn_fwd_kernel[grid](
            q, k, v, mask_arg, out,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
            q_heads, q_heads // kv_heads, seqlen_q, seqlen_k,
            _LOG2E / math.sqrt(head_dim),
            HAS_MASK=key_mask is not None, EVEN_N=seqlen_k % bn == 0,
            # fp32 inputs get exact fp32 dots, not TF32. So do bf16 ones under the interpreter,
            # whose tl.dot multiplies the raw bits of bf16 operands (triton 3.9): upcasting is
            # exact, and p is still rounded to bf16 as on the GPU.
            DOT_FP32=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and _INTERPRETED),
            BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=head_dim,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out


@_flash_attention_op.register_fake
def _flash_attention_fake(q, k, v, key_mask, block_m, block_n) -> torch.Tensor:
    """Checks the arguments; an empty contiguous ``(B, Hq, Lq, D)`` in ``q``'s dtype."""
    _check_inputs(q, k, v, key_mask)
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    return q.new_empty(q.shape)
