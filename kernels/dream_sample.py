"""Dream's sampling step in Triton: x0 and its confidence (probability, margin, neg. entropy).

``dream_sample`` is the kernel statement of :func:`genjo_fast.sampling.dream_sample` (the torch
op, its oracle) without the top-p / top-k filters (calls with a filter, or with injected
``token_uniform`` draws, are handed to the torch op). A row is one (batch, position) of the
``(B, N, V)`` logits; one program owns ``BLOCK_R`` rows and streams over the vocabulary:

* pass 1 (always): the tempered logits ``l`` (``logits / T`` rounded to the dtype exactly as
  torch does it on the device: a float32 division on CPU, a multiplication by the float32
  reciprocal on CUDA), their max ``m`` and its lowest id, the largest value below ``m``
  (``d2``), whether ``m`` occurs twice, and the online softmax sum ``s`` in float32;
* pass 2 (``T > 0`` or ``neg_entropy``): the probabilities ``q = round(exp(l - m) / s)`` in the
  dtype, and from them the Gumbel-max draw ``argmax log q - log(-log u)`` (Philox uniforms,
  counter ``(column, row, 0, 0)``; so ``x0 ~ q``) and the terms
  ``round(q * round(log(round(q + 1e-10))))`` of the entropy, each rounded as torch rounds it.

Then per row: at ``T == 0`` ``x0`` is the lowest id of ``m``; ``prob`` is ``round(1 / s)``
(``round(q[x0])`` at ``T > 0``), ``margin`` ``round(round(1 / s) - round(exp(k2 - m) / s))``
with ``k2`` the second largest logit (``m`` itself when it occurs twice), ``neg_entropy`` the
rounded float32 sum of the terms.

Exactness (``exact_confidence`` of the LLaDA kernel, extended): the kernel's ``s`` differs
from torch's in its summation order, so a value computed from it can round to the other
neighbour in the dtype when it lies near a rounding boundary. A row is recomputed with torch
(exactly as the torch op does, on a gather of the flagged rows) when

* a probability it uses lies within ``EXACT_WINDOW`` (relative) of a rounding boundary;
* at ``T == 0``, a logit other than the max lies within ``TIE_DELTA[dtype]`` of it: its
  probability may round to the max's, and then the lowest id wins (upstream takes the max of
  the ROUNDED probabilities);
* for ``neg_entropy``, the sum's bound ``B`` straddles a rounding boundary: ``B`` adds, for
  every term whose ``q`` or ``log`` lies near a rounding boundary, what the other rounding can
  change, ``UNIT * (3 |t| + q)`` (q's neighbour moves log q by at most UNIT, the rounded log
  by UNIT (1 + |log|), the rounded product by UNIT |t| more), plus the summation-order bound
  ``ENTROPY_ORDER * |H|``;
* the row is not finite (NaN, all ``-inf`` or ``+inf`` logits).

float32 logits have no rounding slack: every row's confidence is recomputed (at ``T == 0``,
x0 too). At ``T > 0`` the sample is drawn from the kernel's rounded probabilities: the same as
torch's except where one lies within ``EXACT_WINDOW`` of a rounding boundary (there the two
may differ by one unit of the dtype, as torch's CPU and CUDA softmax may among themselves).
"""
from __future__ import annotations

import contextlib
import struct
from typing import Callable, Optional, Tuple

import torch

from genjo_fast import sampling

from ._runtime import is_interpreted, kernel_unavailable_reason, require_device
from .gumbel_argmax_confidence import (_MAX_FALLBACK_ELEMENTS, _ROUND, EXACT_WINDOW,
                                       _launch_config, rows_to_recheck)

try:
    import triton
    import triton.language as tl

    from .gumbel_argmax_confidence import _argmax_nan_first, _round_to
except ImportError:  # genjo_fast imports without triton; unavailable_reason() says why
    triton = None
    tl = None

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 goes to the torch op
_MODES = {"prob": 0, "margin": 1, "neg_entropy": 2}
# The dtype's unit: the spacing of its numbers relative to their value is at most this.
UNIT = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}
# Two reals round to the same number of the dtype only if they differ by at most one spacing
# (relative: UNIT). A logit below the max by more than TIE_DELTA has exp(l - m) < 1 - 1.2 UNIT
# (so far from the float32 errors of exp and the division): its probability rounds strictly
# below the max's, no tie is possible. (float32 rows are all recomputed: its entry is unused.)
TIE_DELTA = {dtype: 1.25 * unit for dtype, unit in UNIT.items()}
# Relative window on log(a) for the entropy terms: the log implementations (CUDA libdevice,
# torch's vectorised CPU log, numpy in the interpreter) are each within ~2 float32 ulps.
LOG_WINDOW = 2e-6
# Bound on the float32 summation-order error of the entropy, relative to sum |t|: torch's
# reductions (~124 sequential terms per CUDA thread and a 10-level tree; a cascade on CPU) and
# the kernel's (12-level chunk trees, one add per chunk) stay below ~200 u.
ENTROPY_ORDER = 400 * 2.0 ** -24
_TEMPER_NONE, _TEMPER_MUL, _TEMPER_DIV = 0, 1, 2


if triton is not None:

    @triton.jit
    def _tempered(Logits, row_off, cols, stride_lv, ok, temp, inv_temp,
                  TEMPER: tl.constexpr, ROUND: tl.constexpr):
        """``logits / T`` at ``cols`` in float32, rounded to the dtype as torch rounds it;
        ``-inf`` where not ``ok``."""
        l = tl.load(Logits + row_off + cols * stride_lv, mask=ok, other=0.0).to(tl.float32)
        if TEMPER == 1:  # CUDA: torch multiplies by the float32 reciprocal of a scalar divisor
            l = _round_to(l * inv_temp, ROUND)
        elif TEMPER == 2:  # CPU: torch divides in float32
            l = _round_to(tl.div_rn(l, temp), ROUND)
        return tl.where(ok, l, float("-inf"))

    @triton.jit
    def _near(p, window, ROUND: tl.constexpr):
        """p lies within a relative ``window`` of a rounding boundary of the dtype."""
        return _round_to(p * (1.0 - window), ROUND) != _round_to(p * (1.0 + window), ROUND)

    @triton.jit
    def _dream_sample_kernel(
        Logits, Seed, X0, Conf, Flag,
        n_rows, num_pos, vocab,
        stride_lb, stride_ln, stride_lv,
        temp, inv_temp,  # float32 temperature and its float32 reciprocal
        unit, delta, window, log_window, order,  # UNIT, TIE_DELTA of the dtype, windows
        TEMPER: tl.constexpr,  # 0 T == 0, 1 multiply by inv_temp, 2 divide by temp
        SAMPLE: tl.constexpr,  # T > 0: Gumbel-max over log q
        MODE: tl.constexpr,  # 0 prob, 1 margin, 2 neg_entropy
        ROUND: tl.constexpr,  # 0 float32, 1 bfloat16, 2 float16
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        row_off = (rows64 // num_pos) * stride_lb + (rows64 % num_pos) * stride_ln  # [BLOCK_R]
        offs_v = tl.arange(0, BLOCK_V)  # [BLOCK_V]
        neg_inf = float("-inf")

        # Pass 1: max and its lowest id, distinct second max, duplicate max, softmax sum.
        m = tl.full([BLOCK_R], neg_inf, dtype=tl.float32)
        d2 = tl.full([BLOCK_R], neg_inf, dtype=tl.float32)  # largest value below m
        dup = tl.zeros([BLOCK_R], dtype=tl.int1)  # m occurs at least twice
        i1 = tl.zeros([BLOCK_R], dtype=tl.int32)
        first_nan = tl.full([BLOCK_R], 2147483647, dtype=tl.int32)
        s = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offs_v  # [BLOCK_V]
            ok = row_ok[:, None] & (cols < vocab)[None, :]  # [BLOCK_R, BLOCK_V]
            l = _tempered(Logits, row_off[:, None], cols[None, :], stride_lv, ok, temp,
                          inv_temp, TEMPER, ROUND)  # [BLOCK_R, BLOCK_V]
            c1, ci, cnan = _argmax_nan_first(l, cols[None, :])  # [BLOCK_R] each
            first_nan = tl.minimum(first_nan, cnan)
            l = tl.where(l != l, neg_inf, l)  # NaN rows are recomputed: keep the rest finite
            is_c1 = l == c1[:, None]
            cd2 = tl.max(tl.where(is_c1, neg_inf, l), 1)  # chunk's largest value below c1
            cdup = tl.sum(is_c1.to(tl.int32), 1) > 1
            m_new = tl.maximum(m, c1)
            d2 = tl.maximum(tl.maximum(d2, cd2),
                            tl.maximum(tl.where(m < m_new, m, neg_inf),
                                       tl.where(c1 < m_new, c1, neg_inf)))
            dup = (((m == c1) & (c1 > neg_inf)) | (dup & (m == m_new))
                   | (cdup & (c1 == m_new)))
            i1 = tl.where(c1 > m, ci, i1)  # strictly: an earlier chunk keeps its ties
            m_shift = tl.where(m_new == neg_inf, 0.0, m_new)
            s = s * tl.exp(m - m_shift) + tl.sum(tl.exp(l - m_shift[:, None]), 1)
            m = m_new

        weird = (first_nan != 2147483647) | (m == neg_inf) | (m == float("inf")) | (s != s)
        m = tl.where(weird, 0.0, m)  # weird rows are recomputed; keep their values finite
        s = tl.where(weird | ~row_ok, 1.0, s)
        k2 = tl.where(dup, m, d2)  # second largest logit, duplicates counted

        # Pass 2: the rounded probabilities q, the draw and the entropy terms.
        if SAMPLE:
            seed = tl.load(Seed)
            zero_ctr = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.uint32)
            row_ctr = rows.to(tl.uint32)[:, None] + zero_ctr
            best = tl.full([BLOCK_R], neg_inf, dtype=tl.float64)
            x0 = tl.zeros([BLOCK_R], dtype=tl.int32)
        else:
            x0 = i1
        if MODE == 2:
            h = tl.zeros([BLOCK_R], dtype=tl.float32)  # sum of the terms
            err = tl.zeros([BLOCK_R], dtype=tl.float32)  # what near-boundary terms may change
        if SAMPLE or MODE == 2:
            for start in range(0, vocab, BLOCK_V):
                cols = start + offs_v
                ok = row_ok[:, None] & (cols < vocab)[None, :]
                l = _tempered(Logits, row_off[:, None], cols[None, :], stride_lv, ok, temp,
                              inv_temp, TEMPER, ROUND)
                p = tl.exp(l - m[:, None]) / s[:, None]  # [BLOCK_R, BLOCK_V] float32
                q = _round_to(p, ROUND)  # the dtype's probability, as a float32
                if SAMPLE:
                    r0, r1, _, _ = tl.philox(seed, cols[None, :].to(tl.uint32) + zero_ctr,
                                             row_ctr, zero_ctr, zero_ctr)
                    k = (r0 >> 5).to(tl.float64) * 67108864.0 + (r1 >> 6).to(tl.float64)
                    u = tl.maximum(k, 0.5) * (1.0 / 9007199254740992.0)  # (0, 1) float64
                    key = tl.log(q.to(tl.float64)) - tl.log(-tl.log(u))  # q = 0: -inf
                    ck, cidx, _ = _argmax_nan_first(key, cols[None, :])
                    better = ck > best
                    best = tl.where(better, ck, best)
                    x0 = tl.where(better, cidx, x0)
                if MODE == 2:
                    a = _round_to(q + 1e-10, ROUND)
                    log_a = tl.log(a)
                    t = _round_to(q * _round_to(log_a, ROUND), ROUND)
                    h += tl.sum(tl.where(ok, t, 0.0), 1)
                    near = _near(p, window, ROUND) | _near(log_a, log_window, ROUND)
                    err += tl.sum(tl.where(ok & near, unit * (3.0 * tl.abs(t) + q), 0.0), 1)

        # The confidence and whether torch must recompute the row.
        p1 = 1.0 / s  # exp(m - m) / s
        if MODE == 0:
            if SAMPLE:
                lx = _tempered(Logits, row_off, x0, stride_lv, row_ok, temp, inv_temp,
                               TEMPER, ROUND)  # [BLOCK_R] the drawn id's logit, reloaded
                px = tl.exp(lx - m) / s
            else:
                px = p1
            conf = _round_to(px, ROUND)
            flag = _near(px, window, ROUND) | ((px < 7.888609052210118e-31) & (px > 0))
        elif MODE == 1:
            p2 = tl.exp(k2 - m) / s
            conf = _round_to(_round_to(p1, ROUND) - _round_to(p2, ROUND), ROUND)
            flag = (_near(p1, window, ROUND) | _near(p2, window, ROUND)
                    | ((p2 < 7.888609052210118e-31) & (p2 > 0)))
        else:
            bound = err + order * tl.abs(h) + 1e-30
            conf = _round_to(h, ROUND)
            flag = _round_to(h - bound, ROUND) != _round_to(h + bound, ROUND)
        flag = flag | weird
        if not SAMPLE:
            flag = flag | (d2 >= m - delta)  # a probability may round to the max's
        tl.store(X0 + rows64, x0.to(tl.int64), mask=row_ok)
        tl.store(Conf + rows64, conf.to(Conf.dtype.element_ty), mask=row_ok)
        tl.store(Flag + rows64, flag.to(tl.int8), mask=row_ok)


_KERNEL = _dream_sample_kernel if triton is not None else None
_INTERPRETED = _KERNEL is not None and is_interpreted(_KERNEL)


def unavailable_reason(device) -> Optional[str]:
    """Why :func:`dream_sample` cannot run on ``device``; ``None`` when it can."""
    return kernel_unavailable_reason(device, _KERNEL)


def dream_sample(
    logits: torch.Tensor,
    *,
    temperature: float,
    confidence: str,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    token_uniform: Optional[Callable[[int, int], torch.Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    check_rows: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dream's sampling step in one fused kernel: same arguments and results as
    :func:`genjo_fast.sampling.dream_sample`.

    Args:
        logits: ``(B, N, V)`` float32, bfloat16 or float16, any strides (float64 logits go to
            the torch op).
        temperature: 0 (x0 = the id of the largest probability in the dtype, lowest on ties)
            or > 0 (x0 drawn from the probabilities with in-kernel Philox noise seeded from
            ``generator``: the same distribution as the torch op's inverse CDF, other draws).
        confidence: ``"prob"``, ``"margin"`` or ``"neg_entropy"``.
        top_p, top_k: upstream's filters; when one is active the call is handed to the torch
            op (exact: its filtered path, :func:`genjo_fast.sampling.filtered_rows`).
        token_uniform: injected draws; at ``temperature > 0`` the call is handed to the torch
            op, which draws by inverse CDF with them (so the result equals the plain
            statement's for the same draws).
        generator: ``torch.Generator`` on the logits' device (or ``None``: its default one);
            one 64-bit seed is drawn from it per call into a device tensor (no host sync).
        check_rows: upstream's Categorical fallback (see the torch op); at ``temperature > 0``
            it needs the rows' normalised probabilities summed in the dtype, so the call is
            handed to the torch op (exact, unfused).
    Returns:
        ``x0``: int64 ``(B, N)``; ``confidence``: ``(B, N)`` in the logits' dtype, equal to the
        torch op's (see the module docstring: rows near a rounding boundary are recomputed
        with torch; one host sync per call counts them, and under CUDA graph capture every
        row is recomputed instead).
    """
    sampling.check_dream_sample_args(logits, temperature, confidence, top_p, top_k)
    sample = temperature > 0
    filtered = (top_p is not None and top_p < 1) or top_k is not None
    if (filtered or (sample and (token_uniform is not None or check_rows is not None))
            or logits.dtype not in _DTYPES):
        return sampling.dream_sample(logits, temperature=temperature, confidence=confidence,
                                     top_p=top_p, top_k=top_k, token_uniform=token_uniform,
                                     generator=generator, check_rows=check_rows)
    batch, num_pos, vocab = logits.shape
    device = logits.device
    x0 = torch.empty((batch, num_pos), dtype=torch.long, device=device)
    conf = torch.empty((batch, num_pos), dtype=logits.dtype, device=device)
    if batch * num_pos == 0:
        return x0, conf
    if vocab == 0:
        raise ValueError("logits must have a non-empty vocabulary (last) dimension")
    seed = (torch.randint(0, 2**62, (1,), dtype=torch.long, device=device, generator=generator)
            if sample else None)
    torch.ops.genjo_fast_triton.dream_sample(logits, seed, x0, conf, float(temperature),
                                             confidence)
    return x0, conf


@torch.library.custom_op("genjo_fast_triton::dream_sample", mutates_args=("x0", "confidence"))
def _dream_sample_op(logits: torch.Tensor, seed: Optional[torch.Tensor], x0: torch.Tensor,
                     confidence: torch.Tensor, temperature: float, kind: str) -> None:
    """``torch.ops.genjo_fast_triton.dream_sample``: the kernel launch and the recheck of
    :func:`dream_sample` on checked arguments, writing ``x0`` (int64 ``(B, N)``) and
    ``confidence`` (``(B, N)``, the logits' dtype). ``seed``: int64 ``(1,)`` when
    ``temperature > 0``, else ``None``; ``kind``: the confidence's name."""
    device = logits.device
    require_device("dream_sample (triton)", device, unavailable_reason(device))
    batch, num_pos, vocab = logits.shape
    n_rows = batch * num_pos
    sample = temperature > 0
    flag = torch.empty(n_rows, dtype=torch.int8, device=device)
    temp32 = struct.unpack("f", struct.pack("f", temperature))[0]
    inv32 = struct.unpack("f", struct.pack("f", 1.0 / temp32))[0] if sample else 0.0
    temper = (_TEMPER_NONE if not sample else
              _TEMPER_MUL if device.type == "cuda" else _TEMPER_DIV)
    block_r, block_v, num_warps = _launch_config(n_rows, vocab, sample)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _dream_sample_kernel[(triton.cdiv(n_rows, block_r),)](
            logits, seed if seed is not None else x0, x0, confidence, flag,
            n_rows, num_pos, vocab, *logits.stride(),
            temp32, inv32, UNIT[logits.dtype], TIE_DELTA[logits.dtype], EXACT_WINDOW,
            LOG_WINDOW, ENTROPY_ORDER,
            TEMPER=temper, SAMPLE=sample, MODE=_MODES[kind], ROUND=_ROUND[logits.dtype],
            BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps, enable_fp_fusion=False)
    rows = rows_to_recheck(flag, logits.dtype, device)
    if rows is not None and rows.numel() == 0:
        return
    _recompute_rows(logits, x0, confidence, rows, temperature, kind)


def _recompute_rows(logits, x0, confidence, rows, temperature, kind) -> None:
    """Rows ``rows`` (int64 flat indices into ``B * N``, or ``None`` for all) as the torch op
    computes them: at ``temperature == 0`` x0 and the confidence, at ``temperature > 0`` the
    confidence of the kernel's x0. In chunks of at most ``_MAX_FALLBACK_ELEMENTS`` logits."""
    batch, num_pos, vocab = logits.shape
    if rows is None:
        rows = torch.arange(batch * num_pos, device=logits.device)
    flat_x0, flat_conf = x0.view(-1), confidence.view(-1)
    step = max(1, _MAX_FALLBACK_ELEMENTS // vocab)
    for a in range(0, rows.numel(), step):
        r = rows[a:a + step]
        probs = sampling.dream_probs(logits[r // num_pos, r % num_pos], temperature)  # [K, V]
        if temperature == 0:
            flat_x0[r] = sampling.dream_greedy(probs)
        flat_conf[r] = sampling.dream_confidence(probs, flat_x0[r], kind)


@_dream_sample_op.register_fake
def _dream_sample_fake(logits, seed, x0, confidence, temperature, kind) -> None:
    """Writes into ``x0`` and ``confidence`` only: their shapes and dtypes are checked."""
    shape = tuple(logits.shape[:2])
    for name, t, dtype in (("x0", x0, torch.long), ("confidence", confidence, logits.dtype)):
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name} must be a {dtype} tensor of shape {shape}, "
                             f"got {t.dtype} {tuple(t.shape)}")
