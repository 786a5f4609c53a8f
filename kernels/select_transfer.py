"""Transfer selection in Triton: which positions of each row to unmask, for the whole batch.

``select_transfer`` is the kernel statement of :func:`genjo_fast.sampling.select_transfer` (the
torch op, its oracle): one launch, one program per row, no sort. Position ``i``'s place in the
row's decreasing order (equal confidences by position, lowest first, as a stable descending
sort puts them) is counted directly:

    rank_i = #{j : c_j > c_i  or  (c_j == c_i and j < i)}

where NaN counts above every number and equal to NaN, as torch's sort orders it (a stable
descending sort puts the NaNs first, by position).

over tiles of ``BLOCK_J`` positions (an ``O(N^2)`` comparison in registers: N is a block
length, typically 8..256; rows longer than ``BLOCK_I`` are processed in tiles of positions too).
The three rules then read:

* top-k: ``rank_i < k_row``;
* threshold: ``c_i > -inf and (rank_i == 0 or c_i >= threshold)``;
* factor: with ``thr[r] = 1 - factor / (r + 2)``, rank ``r`` passes when ``r == 0`` or its
  confidence is ``>= thr[r]``; ``n`` = the first rank that fails (``N`` if none), i.e. the
  length of the passing prefix of the sorted row (no monotonicity assumed);
  select ``c_i > -inf and rank_i < n``.

Comparisons are made in the dtypes the torch op uses: the threshold rounded to the
confidence's dtype (torch compares a tensor with a Python scalar in the tensor's dtype), and the
factor thresholds computed by torch with the op's own expression, compared in
``promote(confidence dtype, float32)``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ._runtime import is_interpreted, kernel_unavailable_reason, require_device

try:
    import triton
    import triton.language as tl
except ImportError:  # genjo_fast imports without triton; unavailable_reason() says why
    triton = None
    tl = None

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_TOPK, _THRESHOLD, _FACTOR = 0, 1, 2


if triton is not None:

    @triton.jit
    def _upcast(x, WIDE: tl.constexpr):
        """Exact upcast for comparisons: float64 stays float64, the rest become float32."""
        if WIDE:
            return x.to(tl.float64)
        else:
            return x.to(tl.float32)

    @triton.jit
    def _ranks(Conf, row_off, stride_cn, num_pos, offs_i, c_i, WIDE: tl.constexpr,
               BLOCK_J: tl.constexpr):
        """rank of each position ``offs_i`` (values ``c_i``) in its row's decreasing order."""
        rank = tl.zeros_like(offs_i)  # [BLOCK_I] int32
        for start in range(0, num_pos, BLOCK_J):
            offs_j = start + tl.arange(0, BLOCK_J)  # [BLOCK_J]
            ok_j = offs_j < num_pos
            c_j = tl.load(Conf + row_off + offs_j * stride_cn, mask=ok_j, other=float("-inf"))
            c_j = _upcast(c_j, WIDE)  # [BLOCK_J]
            nan_i = (c_i != c_i)[:, None]  # [BLOCK_I, 1]
            nan_j = (c_j != c_j)[None, :]  # [1, BLOCK_J]
            # torch's sort order: NaN above every number, NaNs equal to each other
            above = (c_j[None, :] > c_i[:, None]) | (nan_j & ~nan_i)
            equal = (c_j[None, :] == c_i[:, None]) | (nan_j & nan_i)
            before = above | (equal & (offs_j[None, :] < offs_i[:, None]))
            before = before & ok_j[None, :]  # [BLOCK_I, BLOCK_J]
            rank += tl.sum(before.to(tl.int32), 1)
        return rank

    @triton.jit
    def _select_transfer_kernel(
        Conf, NumTransfer, Threshold, FactorThr, Out,
        num_pos, stride_cb, stride_cn, stride_k, stride_ob,
        RULE: tl.constexpr,  # 0 top-k, 1 threshold, 2 factor
        WIDE: tl.constexpr,  # float64 confidences: compare in float64
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_off = row * stride_cb
        if RULE == 0:
            k = tl.load(NumTransfer + row * stride_k)  # this row's number of transfers
        if RULE == 1:
            thr = tl.load(Threshold)  # the threshold in the confidences' dtype
            thr = _upcast(thr, WIDE)
        if RULE == 2:
            # First pass: n = the first rank whose confidence fails its factor threshold.
            fail = tl.full([BLOCK_I], num_pos, dtype=tl.int32)  # [BLOCK_I] running minimum
            for start_i in range(0, num_pos, BLOCK_I):
                offs_i = start_i + tl.arange(0, BLOCK_I)  # [BLOCK_I]
                ok_i = offs_i < num_pos
                c_i = tl.load(Conf + row_off + offs_i * stride_cn, mask=ok_i,
                              other=float("-inf"))
                c_i = _upcast(c_i, WIDE)  # [BLOCK_I]
                rank = _ranks(Conf, row_off, stride_cn, num_pos, offs_i, c_i, WIDE, BLOCK_J)
                thr_r = tl.load(FactorThr + rank, mask=ok_i, other=0.0)  # [BLOCK_I] float32
                thr_r = _upcast(thr_r, WIDE)
                passes = (rank == 0) | (c_i >= thr_r)
                fail = tl.minimum(fail, tl.where(ok_i & ~passes, rank, num_pos))
            first_fail = tl.min(fail, 0)

        for start_i in range(0, num_pos, BLOCK_I):
            offs_i = start_i + tl.arange(0, BLOCK_I)  # [BLOCK_I]
            ok_i = offs_i < num_pos
            c_i = tl.load(Conf + row_off + offs_i * stride_cn, mask=ok_i, other=float("-inf"))
            c_i = _upcast(c_i, WIDE)  # [BLOCK_I]
            rank = _ranks(Conf, row_off, stride_cn, num_pos, offs_i, c_i, WIDE, BLOCK_J)
            if RULE == 0:
                selected = rank < k  # as the torch op: -inf only when k exceeds the finite ones
            elif RULE == 1:
                selected = (c_i > float("-inf")) & ((rank == 0) | (c_i >= thr))
            else:
                selected = (c_i > float("-inf")) & (rank < first_fail)
            tl.store(Out + row * stride_ob + offs_i, selected.to(tl.int8), mask=ok_i)


_KERNEL = _select_transfer_kernel if triton is not None else None
_INTERPRETED = _KERNEL is not None and is_interpreted(_KERNEL)


def unavailable_reason(device) -> Optional[str]:
    """Why :func:`select_transfer` cannot run on ``device``; ``None`` when it can."""
    return kernel_unavailable_reason(device, _KERNEL)


def check_select_transfer_args(confidence, num_transfer, threshold, factor) -> None:
    """Validates :func:`select_transfer`'s arguments (shared with the CUDA extension's op)."""
    if sum(rule is not None for rule in (num_transfer, threshold, factor)) != 1:
        raise ValueError("select_transfer takes exactly one of num_transfer, threshold, factor")
    if not isinstance(confidence, torch.Tensor):
        raise TypeError(f"confidence must be a torch.Tensor, got {type(confidence).__name__}")
    if confidence.dim() != 2:
        raise ValueError(f"confidence must have shape (batch, positions), "
                         f"got {tuple(confidence.shape)}")
    if confidence.dtype not in _DTYPES:
        raise TypeError(f"confidence dtype must be float16, bfloat16, float32 or float64, "
                        f"got {confidence.dtype}")
    if num_transfer is not None:
        if not isinstance(num_transfer, torch.Tensor):
            raise TypeError(f"num_transfer must be a torch.Tensor, "
                            f"got {type(num_transfer).__name__}")
        if num_transfer.dtype not in _INT_DTYPES:
            raise TypeError(f"num_transfer must be an integer tensor, got {num_transfer.dtype}")
        if tuple(num_transfer.shape) != (confidence.shape[0],):
            raise ValueError(f"num_transfer shape {tuple(num_transfer.shape)} must be "
                             f"(batch,) = ({confidence.shape[0]},)")
        if num_transfer.device != confidence.device:
            raise ValueError(f"num_transfer is on {num_transfer.device} but confidence is on "
                             f"{confidence.device}")
    for name, value in (("threshold", threshold), ("factor", factor)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, float))):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")


def select_transfer_fake(confidence: torch.Tensor, num_transfer: Optional[torch.Tensor] = None,
                         threshold: Optional[float] = None,
                         factor: Optional[float] = None) -> torch.Tensor:
    """The fake (meta) implementation of the ``select_transfer`` ops (this Triton one and the
    CUDA extension's): checks the arguments, returns an empty bool ``(B, N)``."""
    check_select_transfer_args(confidence, num_transfer, threshold, factor)
    return confidence.new_empty(confidence.shape, dtype=torch.bool)


def factor_thresholds(factor: float, num_pos: int, device) -> torch.Tensor:
    """float32 ``(N,)``: ``thr[r] = 1 - factor / (r + 2)``, the torch op's own expression (so
    that the kernel compares against bit-identical thresholds)."""
    return 1 - factor / (torch.arange(num_pos, device=device) + 2)


def _tile_config(num_pos: int):
    """``(BLOCK_I, BLOCK_J, num_warps)``."""
    fit = max(16, triton.next_power_of_2(num_pos))
    if _INTERPRETED:  # the interpreter pays per loop trip: one [N, N] tile
        return min(fit, 1024), min(fit, 1024), 4
    block_i = min(fit, 256)
    return block_i, max(16, min(fit, 4096 // block_i)), 4


def select_transfer(confidence: torch.Tensor, num_transfer: Optional[torch.Tensor] = None, *,
                    threshold: Optional[float] = None,
                    factor: Optional[float] = None) -> torch.Tensor:
    """Marks the positions to unmask, per row, for the whole batch in one launch.

    Same semantics as :func:`genjo_fast.sampling.select_transfer`; exactly one rule:
    ``num_transfer`` (integer ``(B,)``: the ``num_transfer[j]`` highest confidences of row
    ``j``), ``threshold`` (the most confident position plus every other one ``>= threshold``) or
    ``factor`` (the longest sorted prefix whose ``n``-th confidence is
    ``>= 1 - factor / (n + 1)``). Equal confidences are ordered by position, lowest first;
    NaN ranks above every number (torch's sort order); ``-inf`` and NaN entries are never
    selected by the threshold and factor rules, ``-inf`` ones not by top-k while ``k`` is at
    most the number of entries above ``-inf``.

    Args:
        confidence: ``(B, N)`` float16, bfloat16, float32 or float64, any strides.
    Returns:
        bool ``(B, N)`` transfer mask. No host sync.
    """
    check_select_transfer_args(confidence, num_transfer, threshold, factor)
    return torch.ops.genjo_fast_triton.select_transfer(
        confidence, num_transfer, None if threshold is None else float(threshold),
        None if factor is None else float(factor))


@torch.library.custom_op("genjo_fast_triton::select_transfer", mutates_args=())
def _select_transfer_op(confidence: torch.Tensor, num_transfer: Optional[torch.Tensor],
                        threshold: Optional[float], factor: Optional[float]) -> torch.Tensor:
    """``torch.ops.genjo_fast_triton.select_transfer``: the kernel launch of
    :func:`select_transfer` on checked arguments (the CUDA extension's op schema)."""
    device = confidence.device
    require_device("select_transfer (triton)", device, unavailable_reason(device))
    batch, num_pos = confidence.shape
    out = torch.empty((batch, num_pos), dtype=torch.bool, device=device)
    if out.numel() == 0:
        return out
    if num_transfer is not None:
        rule, k_arg, k_stride = _TOPK, num_transfer, num_transfer.stride(0)
    else:
        rule, k_arg, k_stride = (_THRESHOLD if threshold is not None else _FACTOR), out, 0
    # torch compares a tensor with a Python scalar in the tensor's dtype: round it the same way.
    thr_arg = (torch.full((1,), threshold, dtype=confidence.dtype, device=device)
               if threshold is not None else out)
    table = factor_thresholds(factor, num_pos, device) if factor is not None else out
    block_i, block_j, num_warps = _tile_config(num_pos)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _select_transfer_kernel[(batch,)](
            confidence, k_arg, thr_arg, table, out.view(torch.uint8),
            num_pos, *confidence.stride(), k_stride, out.stride(0),
            RULE=rule, WIDE=confidence.dtype == torch.float64,
            BLOCK_I=block_i, BLOCK_J=block_j, num_warps=num_warps,
        )
    return out


_select_transfer_op.register_fake(select_transfer_fake)
