"""Fused sampling step in Triton: x0 = argmax of the (Gumbel-perturbed) logits and its confidence.

``gumbel_argmax_confidence`` is the kernel statement of
:func:`genjo_fast.sampling.gumbel_argmax_confidence` (the torch op, its oracle). A row is one
(batch, position) of the ``(B, N, V)`` logits; one program owns ``BLOCK_R`` rows and streams
over the vocabulary once, in ``BLOCK_V`` chunks, keeping per row:

* the running argmax of the keys (ties to the LOWEST index, as ``torch.argmax``: a chunk's
  maximum replaces the running one only when it is strictly greater; a NaN key, which
  ``torch.argmax`` counts above every number, wins: the row's first NaN is its x0);
* the running max ``m`` and sum ``s`` of the online softmax (log-sum-exp), in float32.

Nothing proportional to ``V`` is allocated. Per chunk the kernel reproduces the reference's
statements in registers:

* CFG: ``un + (cfg + 1) * (cond - un)`` as torch computes it in the logits' dtype, three ops,
  each in float32 and rounded to the dtype (round-to-nearest-even, done by bit arithmetic so
  the Triton interpreter, whose bf16 cast truncates, rounds as the GPU does). fp32 logits are
  launched with ``enable_fp_fusion=False`` so the multiply-add is not contracted into an FMA.
* ``logits_eos_inf`` (EOS column ``-inf`` before the argmax) and the
  ``confidence_eos_eot_inf`` quirk (EoT, and at temperature 0 also EOS, leave the softmax after
  x0 was chosen) as per-column masks.
* temperature ``T > 0``: Gumbel-max. ``u`` is a 53-bit uniform built from two 32-bit Philox
  outputs (counter ``(column, row, 0, 0)``, key = a 64-bit seed drawn from ``generator`` into a
  1-element int64 device tensor that the kernel loads: no host sync, CUDA-graph friendly), and
  the key is ``float64(l) - T * log(-log(u))``, the log of the reference's float64
  ``exp(l) / (-log u) ** T`` (same argmax, no overflow).
* ``remasking='random'``: the confidence is a 24-bit float32 uniform from Philox counter
  ``(0, row, 1, 0)`` (a stream disjoint from the Gumbel one), as ``torch.rand`` makes them.

On CPU tensors the kernel runs through the Triton interpreter (``TRITON_INTERPRET=1``), which
is slow per program and per loop trip: tests use small shapes.
"""
from __future__ import annotations

import contextlib
import functools
import math
import struct
from typing import Callable, Optional, Tuple

import torch

from genjo_fast import sampling
from genjo_fast.contract import combine_cfg
from genjo_fast.cuda_graph import capturing

from ._runtime import is_interpreted, kernel_unavailable_reason, require_device

try:
    import triton
    import triton.language as tl
except ImportError:  # genjo_fast imports without triton; unavailable_reason() says why
    triton = None
    tl = None

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 goes to the torch op
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernel's ROUND codes
REMASKINGS = ("low_confidence", "random")

# exact_confidence: a row's confidence is recomputed with torch when the kernel's float32
# probability p lies within a relative distance EXACT_WINDOW of a rounding boundary of the
# logits' dtype. Both the kernel and torch compute p = exp(x0 - m) / s in float32, with the same
# exact max m but different summation orders and exp implementations. Worst-case relative error
# bounds, u = 2^-24, V = 126464:
#   kernel: s = tree sums inside chunks (log2(BLOCK_V) <= 12 levels) + one sequential add per
#     chunk (<= 31 chunks of 4096) -> 43u; each term exp(x) = exp2(x * log2 e) has ~3u plus
#     |x| u from rounding the argument, and sum_i p_i |x_i| = H(p) - log s <= log V ~ 12, so
#     <= 15u over the terms; rescales exp(m_old - m_new) add <= sum |dm| u + 3u per change
#     (<= ~60u for logits spanning 50); numerator <= (|x0 - m| + 3) u (exactly 1 at T = 0);
#     division 2u. In all < ~150u ~ 9e-6.
#   torch, CUDA (cunn_SoftMaxForward, float accumulation): ~124 sequential terms per thread,
#     then a 10-level block reduction, exp to 1 ulp, the epilogue's division: < ~140u ~ 8e-6.
# So the two values differ by < 2e-5 relative and 1e-4 leaves a 5x margin. (torch on CPU sums
# ~V/16 terms per SIMD lane sequentially: its worst-case bound is looser, its actual error,
# ~sqrt(n) u, is not.) Flagged rows are ~2 * 1e-4 / 2^-8 ~ 5% of the rows for bf16 (~40% for
# fp16, whose grid is 8x finer); float32 logits have no rounding slack: all rows are recomputed.
EXACT_WINDOW = 1e-4
# Below this p (deep in exp's underflow, where float32 loses relative precision) the row is
# recomputed too, unless p is an exact 0 from a column that left the softmax.
_TINY_P = 2.0 ** -100

_MAX_FALLBACK_ELEMENTS = 8 * 2**20  # rows per torch softmax of the fallback: <= 8M elements


if triton is not None:

    @triton.jit
    def _round_to(x, ROUND: tl.constexpr):
        """float32 ``x`` rounded to nearest-even in bf16 (ROUND=1) / fp16 (2), kept as float32.

        NaN stays NaN: the bit arithmetic alone would carry a NaN's low mantissa bits into the
        exponent (the GPU's NaN 0x7FFFFFFF would become -0.0, 0x7F800001 +inf)."""
        if ROUND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        elif ROUND == 2:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _load_logits(Logits, UnLogits, row_off, un_row_off, cols, stride_lv, stride_uv,
                     cfg_mult, mask, HAS_CFG: tl.constexpr, ROUND: tl.constexpr):
        """The (CFG-combined) logits at ``cols`` in float32, rounded as torch rounds them."""
        l = tl.load(Logits + row_off + cols * stride_lv, mask=mask, other=0.0).to(tl.float32)
        if HAS_CFG:
            un = tl.load(UnLogits + un_row_off + cols * stride_uv, mask=mask,
                         other=0.0).to(tl.float32)
            # torch: un + (cfg + 1) * (cond - un), three ops each rounded to the dtype.
            diff = _round_to(l - un, ROUND)
            diff = _round_to(cfg_mult * diff, ROUND)
            l = _round_to(un + diff, ROUND)
        return l

    @triton.jit
    def _argmax_nan_first(key, idx):
        """Row-wise ``(max, its lowest index, the lowest index holding NaN)`` of ``key``
        ``[R, C]`` with indices ``idx`` (broadcastable to it). The max skips NaN; torch.argmax
        counts NaN above every number, so a row's first NaN, when it has one
        (``< 2147483647``), is its argmax. Explicit rather than left to ``tl.max``, whose NaN
        handling differs between the GPU and the interpreter."""
        nan = key != key
        first_nan = tl.min(tl.where(nan, idx, 2147483647), 1)  # [R]
        key = tl.where(nan, float("-inf"), key)
        key_max = tl.max(key, 1)  # [R]
        # lowest index holding the maximum (tl.argmax's tie rule, made explicit)
        max_idx = tl.min(tl.where(key == key_max[:, None], idx, 2147483647), 1)  # [R]
        return key_max, max_idx, first_nan

    @triton.jit
    def _finish_rows(
        Logits, UnLogits, Seed, X0, Conf, Flag,
        rows, row_ok, best_idx, m_i, s_i, row_off, un_row_off,
        stride_lv, stride_uv, cfg_mult, eos_id, eot_id, window,
        HAS_CFG: tl.constexpr, ARGMAX_NO_EOS: tl.constexpr, SOFTMAX_NO_EOS: tl.constexpr,
        SOFTMAX_NO_EOT: tl.constexpr, LOW_CONF: tl.constexpr, WRITE_FLAG: tl.constexpr,
        ROUND_OUT: tl.constexpr, ROUND: tl.constexpr,
    ):
        """Writes x0, the confidence and the exact_confidence flags of ``rows`` [BLOCK_R] from
        their argmax ``best_idx`` and softmax max ``m_i`` / sum ``s_i``."""
        rows64 = rows.to(tl.int64)
        tl.store(X0 + rows64, best_idx.to(tl.int64), mask=row_ok)
        if LOW_CONF:
            # The softmax logit of x0, reloaded (one element per row).
            l_x = _load_logits(Logits, UnLogits, row_off, un_row_off, best_idx, stride_lv,
                               stride_uv, cfg_mult, row_ok, HAS_CFG, ROUND)  # [BLOCK_R]
            left = best_idx < 0  # [BLOCK_R] columns that left the softmax: probability 0
            if ARGMAX_NO_EOS:
                left = left | (best_idx == eos_id)
            if SOFTMAX_NO_EOS:
                left = left | (best_idx == eos_id)
            if SOFTMAX_NO_EOT:
                left = left | (best_idx == eot_id)
            m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
            # s_i == 0 (no finite logit) gives 0 / 0 = NaN, as torch's softmax does.
            s_i = tl.where(row_ok, s_i, 1.0)  # rows past the end: no division by zero
            p = tl.where(left, 0.0, tl.exp(l_x - m_shift)) / s_i  # [BLOCK_R] float32
            if ROUND_OUT:  # (always so when WRITE_FLAG)
                conf = _round_to(p, ROUND)  # exact in the output dtype: the store is exact
            else:
                conf = p
            tl.store(Conf + rows64, conf.to(Conf.dtype.element_ty), mask=row_ok)
            if WRITE_FLAG:
                # p near a rounding boundary of the dtype (its window straddles one), or tiny.
                near = (_round_to(p * (1.0 - window), ROUND)
                        != _round_to(p * (1.0 + window), ROUND))
                tiny = (p < 7.888609052210118e-31) & ~left  # 2^-100 (see _TINY_P)
                tl.store(Flag + rows64, (near | tiny | (p != p)).to(tl.int8), mask=row_ok)
        else:
            # torch.rand's float32: 24 random bits on the lattice k * 2^-24, from Philox
            # counter (0, row, 1, 0): a stream disjoint from the Gumbel noise's (col, row, 0, 0).
            seed = tl.load(Seed)
            zero_r = tl.zeros_like(rows).to(tl.uint32)
            w0, _, _, _ = tl.philox(seed, zero_r, rows.to(tl.uint32), zero_r + 1, zero_r)
            conf = (w0 >> 8).to(tl.float32) * (1.0 / 16777216.0)  # [BLOCK_R] in [0, 1)
            tl.store(Conf + rows64, conf, mask=row_ok)

    @triton.jit
    def _gumbel_argmax_confidence_kernel(
        Logits, UnLogits, Seed, X0, Conf, Flag,
        PartKey, PartIdx, PartMax, PartSum,  # [n_rows, SPLITS] partials (SPLITS > 1 only)
        n_rows, num_pos, vocab, split_len,
        stride_lb, stride_ln, stride_lv,
        stride_ub, stride_un, stride_uv,
        cfg_mult,  # float32(cfg_scale + 1), as torch's opmath holds the scalar
        temp_hi, temp_lo,  # temperature = float64(temp_hi) + float64(temp_lo)
        eos_id, eot_id,
        window,  # EXACT_WINDOW
        HAS_CFG: tl.constexpr,
        ARGMAX_NO_EOS: tl.constexpr,  # logits_eos_inf: EOS is -inf for the argmax and softmax
        SOFTMAX_NO_EOS: tl.constexpr,  # the quirk at T == 0: EOS leaves the softmax
        SOFTMAX_NO_EOT: tl.constexpr,  # the quirk: EoT leaves the softmax
        SAMPLE: tl.constexpr,  # temperature > 0: Gumbel keys
        OWN_MAX: tl.constexpr,  # the softmax's max differs from the keys' (SAMPLE or quirk)
        LOW_CONF: tl.constexpr,  # confidence = softmax prob of x0 (else a uniform draw)
        WRITE_FLAG: tl.constexpr,  # write the exact_confidence flags
        ROUND_OUT: tl.constexpr,  # the confidence is stored in the logits' dtype
        ROUND: tl.constexpr,  # rounding of the logits' dtype: 0 fp32, 1 bf16, 2 fp16
        SPLITS: tl.constexpr,  # programs per row, each over split_len ids; > 1: partials only
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        b = rows64 // num_pos
        n = rows64 % num_pos
        row_off = b * stride_lb + n * stride_ln  # [BLOCK_R] int64: no overflow on (B, L, V)
        un_row_off = b * stride_ub + n * stride_un  # [BLOCK_R]
        offs_v = tl.arange(0, BLOCK_V)  # [BLOCK_V]
        v_lo = split * split_len
        v_hi = tl.minimum(v_lo + split_len, vocab)

        if SAMPLE:
            seed = tl.load(Seed)  # int64 scalar drawn from the caller's generator
            temperature = tl.cast(temp_hi, tl.float64) + tl.cast(temp_lo, tl.float64)
            zero_ctr = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.uint32)  # [BLOCK_R, BLOCK_V]
            row_ctr = rows.to(tl.uint32)[:, None] + zero_ctr  # [BLOCK_R, BLOCK_V]
            best = tl.full([BLOCK_R], float("-inf"), dtype=tl.float64)  # [BLOCK_R] best key
        else:
            best = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)  # [BLOCK_R]
        best_idx = tl.zeros([BLOCK_R], dtype=tl.int32)  # [BLOCK_R] argmax so far
        first_nan = tl.full([BLOCK_R], 2147483647, dtype=tl.int32)  # [BLOCK_R] first NaN key
        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)  # [BLOCK_R] softmax max
        s_i = tl.zeros([BLOCK_R], dtype=tl.float32)  # [BLOCK_R] softmax sum

        for start in range(v_lo, v_hi, BLOCK_V):
            cols = start + offs_v  # [BLOCK_V]
            ok = row_ok[:, None] & (cols < v_hi)[None, :]  # [BLOCK_R, BLOCK_V]
            l = _load_logits(Logits, UnLogits, row_off[:, None], un_row_off[:, None],
                             cols[None, :], stride_lv, stride_uv, cfg_mult, ok,
                             HAS_CFG, ROUND)  # [BLOCK_R, BLOCK_V] float32
            l = tl.where(ok, l, float("-inf"))
            if ARGMAX_NO_EOS:
                l = tl.where(cols[None, :] == eos_id, float("-inf"), l)

            if SAMPLE:
                # Two 32-bit Philox words -> a 53-bit uniform on torch.rand's float64 lattice
                # k * 2^-53, with k = 0 moved to 2^-54 so that log never sees 0. The counter
                # (col, row, 0, 0) makes the noise independent of the launch configuration.
                r0, r1, _, _ = tl.philox(seed, cols[None, :].to(tl.uint32) + zero_ctr,
                                         row_ctr, zero_ctr, zero_ctr)
                k = (r0 >> 5).to(tl.float64) * 67108864.0 + (r1 >> 6).to(tl.float64)
                u = tl.maximum(k, 0.5) * (1.0 / 9007199254740992.0)  # (0, 1), float64
                key = l.to(tl.float64) - temperature * tl.log(-tl.log(u))  # [BLOCK_R, BLOCK_V]
            else:
                key = l
            chunk_max, chunk_idx, chunk_nan = _argmax_nan_first(key, cols[None, :])
            first_nan = tl.minimum(first_nan, chunk_nan)
            better = chunk_max > best  # strictly: an earlier chunk keeps its ties
            best = tl.where(better, chunk_max, best)
            best_idx = tl.where(better, chunk_idx, best_idx)

            if LOW_CONF:
                if SOFTMAX_NO_EOS:
                    l = tl.where(cols[None, :] == eos_id, float("-inf"), l)
                if SOFTMAX_NO_EOT:
                    l = tl.where(cols[None, :] == eot_id, float("-inf"), l)
                if OWN_MAX:
                    chunk_m = tl.max(l, 1)  # [BLOCK_R]
                else:
                    chunk_m = chunk_max  # the keys are these logits
                m_new = tl.maximum(m_i, chunk_m)  # [BLOCK_R]
                # A row with no finite logit so far keeps m_new == -inf: shift by 0 there so
                # that exp(-inf - -inf) never makes a NaN.
                m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                s_i = s_i * tl.exp(m_i - m_shift) + tl.sum(tl.exp(l - m_shift[:, None]), 1)
                m_i = m_new

        has_nan = first_nan != 2147483647  # [BLOCK_R] a NaN key is the argmax, as in torch
        best_idx = tl.where(has_nan, first_nan, best_idx)
        if SPLITS == 1:
            _finish_rows(Logits, UnLogits, Seed, X0, Conf, Flag, rows, row_ok, best_idx, m_i,
                         s_i, row_off, un_row_off, stride_lv, stride_uv, cfg_mult, eos_id,
                         eot_id, window, HAS_CFG, ARGMAX_NO_EOS, SOFTMAX_NO_EOS,
                         SOFTMAX_NO_EOT, LOW_CONF, WRITE_FLAG, ROUND_OUT, ROUND)
        else:
            part = rows64 * SPLITS + split  # [BLOCK_R]
            tl.store(PartKey + part, tl.where(has_nan, float("nan"), best.to(tl.float64)),
                     mask=row_ok)
            tl.store(PartIdx + part, best_idx, mask=row_ok)
            tl.store(PartMax + part, m_i, mask=row_ok)
            tl.store(PartSum + part, s_i, mask=row_ok)

    @triton.jit
    def _combine_splits_kernel(
        Logits, UnLogits, Seed, X0, Conf, Flag,
        PartKey, PartIdx, PartMax, PartSum,
        n_rows, num_pos,
        stride_lb, stride_ln, stride_lv,
        stride_ub, stride_un, stride_uv,
        cfg_mult, eos_id, eot_id, window,
        HAS_CFG: tl.constexpr, ARGMAX_NO_EOS: tl.constexpr, SOFTMAX_NO_EOS: tl.constexpr,
        SOFTMAX_NO_EOT: tl.constexpr, LOW_CONF: tl.constexpr, WRITE_FLAG: tl.constexpr,
        ROUND_OUT: tl.constexpr, ROUND: tl.constexpr,
        SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """Merges the SPLITS partial results of each row (splits are in vocabulary order, so
        the lowest split holding the best key also holds the lowest id) and finishes."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        splits = tl.arange(0, BLOCK_S)  # [BLOCK_S]
        ok = row_ok[:, None] & (splits < SPLITS)[None, :]  # [BLOCK_R, BLOCK_S]
        part = rows64[:, None] * SPLITS + splits[None, :]  # [BLOCK_R, BLOCK_S]
        key = tl.load(PartKey + part, mask=ok, other=float("-inf"))  # [BLOCK_R, BLOCK_S]
        idx = tl.load(PartIdx + part, mask=ok, other=2147483647)
        _, best_idx, first_nan = _argmax_nan_first(key, idx)  # [BLOCK_R]
        best_idx = tl.where(first_nan != 2147483647, first_nan, best_idx)
        m_j = tl.load(PartMax + part, mask=ok, other=float("-inf"))  # [BLOCK_R, BLOCK_S]
        s_j = tl.load(PartSum + part, mask=ok, other=0.0)
        m_i = tl.max(m_j, 1)  # [BLOCK_R]
        m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
        s_i = tl.sum(s_j * tl.exp(m_j - m_shift[:, None]), 1)  # [BLOCK_R]
        b = rows64 // num_pos
        n = rows64 % num_pos
        _finish_rows(Logits, UnLogits, Seed, X0, Conf, Flag, rows, row_ok, best_idx, m_i, s_i,
                     b * stride_lb + n * stride_ln, b * stride_ub + n * stride_un,
                     stride_lv, stride_uv, cfg_mult, eos_id, eot_id, window, HAS_CFG,
                     ARGMAX_NO_EOS, SOFTMAX_NO_EOS, SOFTMAX_NO_EOT, LOW_CONF, WRITE_FLAG,
                     ROUND_OUT, ROUND)


_KERNEL = _gumbel_argmax_confidence_kernel if triton is not None else None
_INTERPRETED = _KERNEL is not None and is_interpreted(_KERNEL)


def unavailable_reason(device) -> Optional[str]:
    """Why :func:`gumbel_argmax_confidence` cannot run on ``device``; ``None`` when it can."""
    return kernel_unavailable_reason(device, _KERNEL)


def _check_inputs(logits, un_logits, temperature, remasking, logits_eos_inf,
                  confidence_eos_eot_inf, eos_id, eot_id) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (batch, positions, vocab), "
                         f"got {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES + (torch.float64,):
        raise TypeError(f"logits dtype must be float32, bfloat16, float16 or float64, got "
                        f"{logits.dtype}")
    if un_logits is not None:
        if not isinstance(un_logits, torch.Tensor):
            raise TypeError(f"un_logits must be a torch.Tensor or None, "
                            f"got {type(un_logits).__name__}")
        if un_logits.shape != logits.shape:
            raise ValueError(f"un_logits shape {tuple(un_logits.shape)} must equal logits shape "
                             f"{tuple(logits.shape)}")
        if un_logits.dtype != logits.dtype:
            raise TypeError(f"un_logits dtype {un_logits.dtype} must equal logits dtype "
                            f"{logits.dtype}")
        if un_logits.device != logits.device:
            raise ValueError(f"un_logits is on {un_logits.device} but logits is on "
                             f"{logits.device}")
    if remasking not in REMASKINGS:
        raise ValueError(f"remasking must be one of {REMASKINGS}, got {remasking!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    vocab = logits.shape[-1]
    ids = []
    if logits_eos_inf or confidence_eos_eot_inf:
        ids.append(("eos_id", eos_id))
    if confidence_eos_eot_inf:
        ids.append(("eot_id", eot_id))
    for name, value in ids:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise ValueError(f"{name} must be an int in [0, vocab={vocab}), got {value!r}")


def _check_out(out, shape, conf_dtype, device):
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("out must be a pair (x0, confidence) of tensors")
    for name, t, dtype in (("out[0] (x0)", out[0], torch.long),
                           ("out[1] (confidence)", out[1], conf_dtype)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
            raise ValueError(f"{name} must be a {dtype} tensor of shape {shape} on {device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _launch_config(n_rows: int, vocab: int, sample: bool) -> Tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_V, num_warps)``."""
    fit_v = triton.next_power_of_2(vocab)
    if _INTERPRETED:
        # The interpreter pays per program and per loop trip: few programs, large tiles.
        block_v = min(fit_v, 32768)
        block_r = max(1, min(triton.next_power_of_2(n_rows), 65536 // block_v))
        return block_r, block_v, 4
    # One row per program streams 126464 logits; small vocabularies pack rows per program.
    block_v = min(fit_v, 2048 if sample else 4096)  # sampling holds float64 keys: half tiles
    block_r = max(1, min(triton.next_power_of_2(n_rows), 2048 // block_v))
    return block_r, block_v, 8 if block_v * block_r >= 2048 else 4


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(n_rows: int, vocab: int, block_r: int, block_v: int,
                device: torch.device) -> int:
    """Programs per row. A program streams its row with a few loads in flight, so a launch
    needs several programs per SM to reach the memory bandwidth: with few rows (batch 1, a
    32-token block: 32 rows) each row's vocabulary is split over several programs, whose
    partial (argmax, max, sum) are merged by a second, tiny kernel."""
    if _INTERPRETED or device.type != "cuda":
        return 1
    programs = triton.cdiv(n_rows, block_r)
    target = 4 * _sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(vocab, 2 * block_v), target // programs, 64))


def gumbel_argmax_confidence(
    logits: torch.Tensor,
    *,
    temperature: float,
    remasking: str,
    un_logits: Optional[torch.Tensor] = None,
    cfg_scale: float = 0.0,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    eos_id: int = 126081,
    eot_id: int = 126348,
    gumbel_uniform: Optional[Callable[[int, int], torch.Tensor]] = None,
    remask_uniform: Optional[Callable[[int, int], torch.Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    exact_confidence: bool = True,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chooses a token per position and scores it, in one pass over the vocabulary per row.

    Same arguments and results as :func:`genjo_fast.sampling.gumbel_argmax_confidence`:

    Args:
        logits: ``(B, N, V)`` float32, bfloat16 or float16, any strides (a block slice
            ``logits[:, a:b]`` of a ``(B, L, V)`` tensor is read in place); with CFG, the
            conditional half.
        un_logits: ``(B, N, V)`` unconditional logits for CFG (same dtype), or ``None``;
            combined in the kernel as ``un + (cfg_scale + 1) * (logits - un)`` with torch's
            rounding.
        temperature: 0 (x0 = argmax, ties to the lowest id) or > 0 (Gumbel-max with in-kernel
            Philox noise seeded from ``generator``).
        remasking: ``'low_confidence'`` (confidence = softmax probability of x0) or
            ``'random'`` (confidence = a float32 ``U(0, 1)`` from Philox).
        logits_eos_inf, confidence_eos_eot_inf, eos_id, eot_id: the reference's EOS options.
        gumbel_uniform, remask_uniform: injected draws. When one is given and would be used
            (``temperature > 0`` / ``remasking='random'``), the call is delegated to the torch
            op, which applies the reference's own formula to those draws.
        generator: ``torch.Generator`` on the logits' device (or ``None``: its default one);
            each call draws one 64-bit seed from it into a device tensor (no host sync), so the
            same generator state gives the same result.
        exact_confidence: ``True`` (default): the ``low_confidence`` confidence equals torch's
            ``softmax(logits)[x0]`` in the logits' dtype bit for bit, so that ``generate`` is
            token-identical to the reference. The kernel computes p in float32 from its online
            max and sum and rounds it to the dtype; a row whose p lies within ``EXACT_WINDOW``
            (1e-4, relative) of a rounding boundary of the dtype, where the two summation
            orders could round differently, is recomputed with torch exactly as the torch op
            does (a gather of just those rows; ~5% of the rows for bf16). float32 logits have
            no rounding slack: all their rows are recomputed. Costs one small host sync per
            call (the count of flagged rows) for bf16/fp16; under CUDA graph capture, where
            a sync is not allowed, every row is recomputed instead. ``False``: the kernel's
            float32 probability is returned (dtype float32), with no fallback and no sync.
        out: optional preallocated ``(x0, confidence)`` to write into: contiguous ``(B, N)``,
            int64 and the confidence dtype below.
    Returns:
        ``x0``: int64 ``(B, N)``; ``confidence``: ``(B, N)``, in the logits' dtype
        (``low_confidence``, ``exact_confidence=True``), float32 otherwise.
    """
    _check_inputs(logits, un_logits, temperature, remasking, logits_eos_inf,
                  confidence_eos_eot_inf, eos_id, eot_id)
    sample = temperature > 0
    low_conf = remasking == "low_confidence"
    batch, num_pos, vocab = logits.shape
    device = logits.device
    conf_dtype = logits.dtype if (low_conf and exact_confidence) else torch.float32
    if out is not None:
        _check_out(out, (batch, num_pos), conf_dtype, device)

    injected = (sample and gumbel_uniform is not None) or (not low_conf and remask_uniform
                                                            is not None)
    if injected or logits.dtype == torch.float64:  # the torch op: reference formula / float64
        x0, confidence = sampling.gumbel_argmax_confidence(
            logits, temperature=temperature, remasking=remasking, un_logits=un_logits,
            cfg_scale=cfg_scale, logits_eos_inf=logits_eos_inf,
            confidence_eos_eot_inf=confidence_eos_eot_inf, eos_id=eos_id, eot_id=eot_id,
            gumbel_uniform=gumbel_uniform, remask_uniform=remask_uniform, generator=generator)
        if out is None:
            return x0, confidence.to(conf_dtype)
        out[0].copy_(x0)
        out[1].copy_(confidence)
        return out[0], out[1]

    if out is None:
        x0 = torch.empty((batch, num_pos), dtype=torch.long, device=device)
        confidence = torch.empty((batch, num_pos), dtype=conf_dtype, device=device)
    else:
        x0, confidence = out
    if batch * num_pos == 0:
        return x0, confidence
    if vocab == 0:
        raise ValueError("logits must have a non-empty vocabulary (last) dimension")
    # One 64-bit seed from the caller's generator, drawn into a device tensor (no host sync).
    seed = (torch.randint(0, 2**62, (1,), dtype=torch.long, device=device, generator=generator)
            if sample or not low_conf else None)
    eos_used, eot_used = logits_eos_inf or confidence_eos_eot_inf, confidence_eos_eot_inf
    torch.ops.genjo_fast_triton.gumbel_argmax_confidence(
        logits, un_logits, seed, x0, confidence, float(cfg_scale), float(temperature), low_conf,
        bool(logits_eos_inf), bool(confidence_eos_eot_inf), eos_id if eos_used else -1,
        eot_id if eot_used else -1, bool(exact_confidence))
    return x0, confidence


@torch.library.custom_op("genjo_fast_triton::gumbel_argmax_confidence",
                         mutates_args=("x0", "confidence"))
def _gumbel_argmax_confidence_op(
        logits: torch.Tensor, un_logits: Optional[torch.Tensor], seed: Optional[torch.Tensor],
        x0: torch.Tensor, confidence: torch.Tensor, cfg_scale: float, temperature: float,
        low_confidence: bool, logits_eos_inf: bool, confidence_eos_eot_inf: bool, eos_id: int,
        eot_id: int, exact_confidence: bool) -> None:
    """``torch.ops.genjo_fast_triton.gumbel_argmax_confidence``: the kernel launch (and the
    exact_confidence recheck) of :func:`gumbel_argmax_confidence` on validated arguments,
    writing ``x0`` (int64 ``(B, N)``) and ``confidence`` (``(B, N)``, the logits' dtype when
    ``low_confidence and exact_confidence``, else float32). ``seed``: int64 ``(1,)`` when the
    kernel draws noise (``temperature > 0`` or not ``low_confidence``), else ``None``."""
    device = logits.device
    require_device("gumbel_argmax_confidence (triton)", device, unavailable_reason(device))
    batch, num_pos, vocab = logits.shape
    n_rows = batch * num_pos
    sample = temperature > 0
    write_flag = low_confidence and exact_confidence and logits.dtype != torch.float32
    flag = torch.empty(n_rows if write_flag else 0, dtype=torch.int8, device=device)
    un = un_logits if un_logits is not None else logits  # never read without CFG
    temp_hi = struct.unpack("f", struct.pack("f", temperature))[0]  # float32 part
    temp_lo = temperature - temp_hi

    block_r, block_v, num_warps = _launch_config(n_rows, vocab, sample)
    splits = _num_splits(n_rows, vocab, block_r, block_v, device)
    # Each split covers a whole number of chunks (the last one may be shorter), none is empty.
    split_len = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, split_len)
    if splits > 1:
        part_key = torch.empty((n_rows, splits), dtype=torch.float64, device=device)
        part_idx = torch.empty((n_rows, splits), dtype=torch.int32, device=device)
        part_max = torch.empty((n_rows, splits), dtype=torch.float32, device=device)
        part_sum = torch.empty((n_rows, splits), dtype=torch.float32, device=device)
    else:
        part_key = part_idx = part_max = part_sum = x0  # never touched
    flags = dict(
        HAS_CFG=un_logits is not None,
        ARGMAX_NO_EOS=logits_eos_inf,
        SOFTMAX_NO_EOS=confidence_eos_eot_inf and not sample and not logits_eos_inf,
        SOFTMAX_NO_EOT=confidence_eos_eot_inf,
        LOW_CONF=low_confidence, WRITE_FLAG=write_flag,
        ROUND_OUT=confidence.dtype != torch.float32, ROUND=_ROUND[logits.dtype])
    outputs = (logits, un, seed if seed is not None else x0,  # the seed is never read without
               x0, confidence, flag if write_flag else x0,  # noise or random draws
               part_key, part_idx, part_max, part_sum)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _gumbel_argmax_confidence_kernel[(triton.cdiv(n_rows, block_r), splits)](
            *outputs, n_rows, num_pos, vocab, split_len, *logits.stride(), *un.stride(),
            float(cfg_scale + 1), temp_hi, temp_lo, eos_id, eot_id, EXACT_WINDOW,
            SAMPLE=sample, OWN_MAX=sample or confidence_eos_eot_inf, SPLITS=splits,
            BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps,
            # fp32 CFG: un + c * d must be a multiply then an add, each rounded, as in torch.
            enable_fp_fusion=False, **flags)
        if splits > 1:
            block_rc = 64
            _combine_splits_kernel[(triton.cdiv(n_rows, block_rc),)](
                *outputs, n_rows, num_pos, *logits.stride(), *un.stride(),
                float(cfg_scale + 1), eos_id, eot_id, EXACT_WINDOW,
                SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_R=block_rc,
                num_warps=4, enable_fp_fusion=False, **flags)

    if low_confidence and exact_confidence:
        rows = rows_to_recheck(flag, logits.dtype, device)
        if rows is not None and rows.numel() == 0:
            return
        _recompute_confidence(logits, un_logits, cfg_scale, x0, confidence, rows, temperature,
                              logits_eos_inf, confidence_eos_eot_inf, eos_id, eot_id)


@_gumbel_argmax_confidence_op.register_fake
def _gumbel_argmax_confidence_fake(logits, un_logits, seed, x0, confidence, cfg_scale,
                                   temperature, low_confidence, logits_eos_inf,
                                   confidence_eos_eot_inf, eos_id, eot_id,
                                   exact_confidence) -> None:
    """Writes into ``x0`` and ``confidence`` only: their shapes and dtypes are checked."""
    conf_dtype = logits.dtype if (low_confidence and exact_confidence) else torch.float32
    _check_out((x0, confidence), tuple(logits.shape[:2]), conf_dtype, logits.device)


def rows_to_recheck(flag: torch.Tensor, dtype: torch.dtype,
                    device: torch.device) -> Optional[torch.Tensor]:
    """The rows a sampling kernel's torch recheck recomputes: int64 flat indices of the
    nonzero ``flag`` entries (one host sync), or ``None`` for every row: float32 logits have no
    rounding slack to absorb the sum's order, and a CUDA graph capture cannot count the
    flagged rows (nor can the warm-up run of one, which must take the same branch)."""
    if dtype == torch.float32 or capturing(device):
        return None
    return flag.nonzero().squeeze(1)  # the one host sync of the call


def _recompute_confidence(logits, un_logits, cfg_scale, x0, confidence, rows, temperature,
                          logits_eos_inf, confidence_eos_eot_inf, eos_id, eot_id) -> None:
    """``confidence[rows] = softmax(row logits)[x0]`` with torch, exactly as the torch op.

    ``rows``: int64 ``(K,)`` flat row indices into ``(B * N)``, or ``None`` for all rows.
    Processes rows in chunks of at most ``_MAX_FALLBACK_ELEMENTS`` logits.
    """
    batch, num_pos, vocab = logits.shape
    if rows is None:
        rows = torch.arange(batch * num_pos, device=logits.device)
    flat_conf = confidence.view(-1)
    flat_x0 = x0.view(-1)
    step = max(1, _MAX_FALLBACK_ELEMENTS // vocab)
    for a in range(0, rows.numel(), step):
        r = rows[a:a + step]
        b, n = r // num_pos, r % num_pos
        chunk = logits[b, n]  # [K, V] a gathered copy: the EOS options may write into it
        if un_logits is not None:
            chunk = combine_cfg(chunk, un_logits[b, n], cfg_scale)
        if logits_eos_inf:
            chunk[:, eos_id] = -torch.inf
        flat_conf[r] = sampling.softmax_confidence(chunk, flat_x0[r], temperature,
                                                   confidence_eos_eot_inf, eos_id,
                                                   eot_id).to(flat_conf.dtype)
