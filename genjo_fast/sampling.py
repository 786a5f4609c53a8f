"""Torch backend of the per-step ops: sample (x0 and its confidence; LLaDA's and Dream's
samplers) and select transfer.

The ops reproduce the reference's arithmetic exactly (same torch ops in the same dtypes), but
only on the rows of the current block and in chunks of rows, so no ``(B, L, V)`` float64
tensor is ever built. They run on any device and are the oracle of the Triton/CUDA kernels.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from .contract import combine_cfg

# Upper bound on the elements of one float64 temporary at temperature > 0 (64 MiB).
_MAX_CHUNK_ELEMENTS = 8 * 2**20


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chooses a token per position and scores it, exactly as the reference does.

    Args:
        logits: ``(B, N, V)`` float logits of the N positions to sample (any row strides);
            with CFG, the conditional half.
        un_logits: ``(B, N, V)`` unconditional logits for CFG, or ``None``.
        gumbel_uniform: ``f(a, b)`` -> float64 ``U(0,1)`` of shape ``(B, b - a, V)`` for
            positions ``a:b`` of the N. When given (temperature > 0), x0 is computed with the
            reference's own formula on these draws, so it equals the reference's choice for the
            same draws. When ``None``, x0 is drawn from the same distribution,
            ``softmax(logits / T)``, by inverse-CDF sampling in float64 with one uniform per
            position from ``generator`` (much cheaper than a float64 uniform per logit).
        remask_uniform: ``f(a, b)`` -> float32 ``U(0,1)`` ``(B, b - a)`` for
            ``remasking='random'``; when ``None``, drawn from ``generator``.
        generator: ``torch.Generator`` of the draws made here, or ``None`` (global RNG).
    Returns:
        ``x0``: int64 ``(B, N)``, the argmax of the (Gumbel-perturbed) logits;
        ``confidence``: ``(B, N)``, the softmax probability of ``x0`` in the logits' dtype
        (``low_confidence``) or a float32 uniform draw (``random``).
    """
    batch, num_pos, vocab = logits.shape
    rows_per_chunk = max(1, _MAX_CHUNK_ELEMENTS // (batch * vocab))
    x0 = torch.empty((batch, num_pos), dtype=torch.long, device=logits.device)
    confidence = torch.empty((batch, num_pos),
                             dtype=logits.dtype if remasking == "low_confidence" else torch.float32,
                             device=logits.device)
    for a in range(0, num_pos, rows_per_chunk):
        b = min(a + rows_per_chunk, num_pos)
        chunk = logits[:, a:b]
        if un_logits is not None:
            chunk = combine_cfg(chunk, un_logits[:, a:b], cfg_scale)
        elif logits_eos_inf or confidence_eos_eot_inf:
            chunk = chunk.clone()  # the EOS options write -inf: never into the caller's logits
        if logits_eos_inf:
            chunk[:, :, eos_id] = -torch.inf

        if temperature == 0:
            x0[:, a:b] = torch.argmax(chunk, dim=-1)
        elif gumbel_uniform is None:
            x0[:, a:b] = sample_categorical(chunk, temperature, generator)
        else:
            # The reference's float64 formula exp(l) / (-log u) ** T, done in place.
            gumbel = torch.log(gumbel_uniform(a, b)).neg_()
            if temperature != 1:  # x ** 1 == x exactly: skip the pow
                gumbel.pow_(temperature)
            noised = chunk.to(torch.float64, copy=True)  # never exp_() the caller's float64
            x0[:, a:b] = torch.argmax(noised.exp_().div_(gumbel), dim=-1)
            del gumbel

        if remasking == "low_confidence":
            confidence[:, a:b] = softmax_confidence(chunk, x0[:, a:b], temperature,
                                                    confidence_eos_eot_inf, eos_id, eot_id)
        elif remask_uniform is None:
            confidence[:, a:b] = torch.rand((batch, b - a), device=logits.device,
                                            generator=generator)
        else:
            confidence[:, a:b] = remask_uniform(a, b)
    return x0, confidence


def sample_categorical(logits: torch.Tensor, temperature: float,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One sample per row from ``softmax(logits / temperature)``, by inverse CDF in float64.

    The distribution of the reference's float64 Gumbel-max, from one uniform per row instead of
    one per logit. Args: logits ``(..., V)``. Returns int64 ``(...)``.
    """
    weights = logits.to(torch.float64, copy=True)  # a private copy, even of float64 logits
    weights = weights.sub_(weights.amax(-1, keepdim=True))
    if temperature != 1:
        weights.div_(temperature)
    cdf = torch.cumsum(weights.exp_(), -1, out=weights)  # (..., V), unnormalised
    u = torch.rand(cdf.shape[:-1], dtype=torch.float64, device=logits.device,
                   generator=generator)
    return inverse_cdf(cdf, u)


def inverse_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The draw convention of genjo_fast's samplers: the first id whose cumulative weight
    exceeds ``u`` times the total.

    Args:
        cdf: float64 ``(..., V)``, the running sum of non-negative (unnormalised) weights.
        u: float64 ``(...)`` uniforms in ``[0, 1)``, one per row.
    Returns:
        int64 ``(...)``: ``searchsorted(cdf, u * cdf[-1], right=True)`` (ids of weight 0, equal
        consecutive cdf values, are never drawn), clamped to ``V - 1``.
    """
    index = torch.searchsorted(cdf, (u[..., None] * cdf[..., -1:]), right=True).squeeze(-1)
    return index.clamp_(max=cdf.shape[-1] - 1)


def softmax_confidence(logits: torch.Tensor, x0: torch.Tensor, temperature: float,
                       confidence_eos_eot_inf: bool, eos_id: int, eot_id: int) -> torch.Tensor:
    """``softmax(logits)[x0]`` in the logits' dtype, after the reference's EOS quirk.

    Args:
        logits: ``(..., V)``, a private copy (the quirk writes ``-inf`` into it).
        x0: int64 ``(...)``, the chosen ids.
    Returns:
        ``(...)`` in the logits' dtype.
    """
    if confidence_eos_eot_inf:
        # The reference's quirk: after x0 is chosen, EoT leaves the softmax, and so does EOS
        # at temperature 0 (where the noised logits are the logits themselves).
        logits[..., eot_id] = -torch.inf
        if temperature == 0:
            logits[..., eos_id] = -torch.inf
    p = F.softmax(logits, dim=-1)
    return torch.gather(p, -1, x0[..., None]).squeeze(-1)


def guided_chunks(logits: torch.Tensor, un_logits: Optional[torch.Tensor] = None,
                  cfg_scale: float = 0.0) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """The logits of positions ``a:b`` a chunk at a time, guided with CFG
    (:func:`combine_cfg`, in the logits' dtype; the logits themselves without ``un_logits``),
    so that no temporary larger than a chunk is built. logits, un_logits: ``(B, N, V)``.
    Yields ``(a, b, chunk)``, chunk ``(B, b - a, V)``."""
    batch, num_pos, vocab = logits.shape
    rows_per_chunk = max(1, _MAX_CHUNK_ELEMENTS // (batch * vocab))
    for a in range(0, num_pos, rows_per_chunk):
        b = min(a + rows_per_chunk, num_pos)
        yield a, b, combine_cfg(logits[:, a:b],
                                None if un_logits is None else un_logits[:, a:b], cfg_scale)


def float64_confidence(logits: torch.Tensor, x0: torch.Tensor, *,
                       un_logits: Optional[torch.Tensor] = None,
                       cfg_scale: float = 0.0) -> torch.Tensor:
    """The reference app's confidence: ``softmax(logits.to(float64))[x0]`` (``generate.py``
    computes it in the logits' dtype, :func:`softmax_confidence`), a chunk of rows at a time.

    Args:
        logits: ``(B, N, V)`` float; with CFG the conditional half and ``un_logits`` the
            unconditional one, combined in the logits' dtype first (:func:`combine_cfg`).
        x0: int64 ``(B, N)``, the chosen ids.
    Returns:
        float64 ``(B, N)``.
    """
    out = torch.empty(x0.shape, dtype=torch.float64, device=logits.device)
    for a, b, chunk in guided_chunks(logits, un_logits, cfg_scale):
        p = F.softmax(chunk.to(torch.float64), dim=-1)
        out[:, a:b] = torch.gather(p, -1, x0[:, a:b, None]).squeeze(-1)
    return out


def select_transfer(confidence: torch.Tensor, num_transfer: Optional[torch.Tensor] = None, *,
                    threshold: Optional[float] = None,
                    factor: Optional[float] = None) -> torch.Tensor:
    """Marks the positions to unmask, per row, for the whole batch at once.

    Exactly one rule is given:

    * ``num_transfer`` (int64 ``(B,)``): the ``num_transfer[j]`` highest confidences of row
      ``j`` (the reference's schedule; at most the number of finite entries);
    * ``threshold``: the most confident position, plus every other one whose confidence is
      ``>= threshold`` (Fast-dLLM's threshold decoding);
    * ``factor``: with the row's confidences sorted in decreasing order ``c_1 >= c_2 >= ...``,
      the largest prefix of ``n >= 1`` positions whose ``n``-th confidence satisfies
      ``c_n >= 1 - factor / (n + 1)`` (Fast-dLLM's factor decoding).

    Equal confidences are ordered by position, lowest first; NaN counts above every number
    (torch's sort order: top-k takes NaN entries first, the threshold and factor rules never
    select them). Positions holding ``-inf`` (not masked, or outside the block) are never
    selected while ``num_transfer`` is at most the number of entries above ``-inf``; a row
    without any such entry selects nothing.

    Args:
        confidence: ``(B, N)`` float.
    Returns:
        bool ``(B, N)`` transfer mask. One batched sort, no loop over rows, no host sync.
    """
    if sum(rule is not None for rule in (num_transfer, threshold, factor)) != 1:
        raise ValueError("select_transfer takes exactly one of num_transfer, threshold, factor")
    batch, num_pos = confidence.shape
    order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(num_pos, device=confidence.device).expand(batch, num_pos)
    rank = torch.empty_like(order).scatter_(1, order, ranks)  # rank of each position
    candidate = confidence > -torch.inf
    if num_transfer is not None:
        return rank < num_transfer[:, None]
    if threshold is not None:
        return candidate & ((rank == 0) | (confidence >= threshold))
    sorted_conf = torch.gather(confidence, 1, order)
    passes = sorted_conf >= 1 - factor / (ranks + 2)  # rank r holds c_{r+1}
    passes[:, 0] = True  # at least one position
    prefix = passes.long().cumprod(1).sum(1, keepdim=True)  # n
    return candidate & (rank < prefix)


# ---------------------------------------------------------------------------------------------
# Dream (Dream-7B family): upstream's ``sample_tokens`` with its three confidences.
# ---------------------------------------------------------------------------------------------

DREAM_CONFIDENCES = ("prob", "margin", "neg_entropy")
#: upstream's epsilon in the negative entropy ``sum p * log(p + eps)``
DREAM_ENTROPY_EPS = 1e-10


def check_dream_sample_args(logits, temperature, confidence, top_p, top_k) -> None:
    """Validates :func:`dream_sample`'s arguments (shared with the Triton kernel's launcher)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (batch, positions, vocab), "
                         f"got {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if confidence not in DREAM_CONFIDENCES:
        raise ValueError(f"confidence must be one of {DREAM_CONFIDENCES}, got {confidence!r}")
    if confidence == "margin" and logits.shape[-1] < 2:
        raise ValueError(f"confidence='margin' needs a vocabulary of at least 2 ids, "
                         f"got {logits.shape[-1]}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not math.isfinite(top_p)):
        raise ValueError(f"top_p must be None or a finite number, got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")


def dream_probs(logits: torch.Tensor, temperature: float, top_p: Optional[float] = None,
                top_k: Optional[int] = None) -> torch.Tensor:
    """Upstream's distribution of a row, in the logits' dtype: ``logits / temperature`` (only
    when ``temperature > 0``), the top-p filter (only when ``top_p < 1``), the top-k filter,
    each setting the removed logits to the dtype's minimum, then ``softmax``.

    Top-p: with the logits sorted in decreasing order, those whose cumulative softmax
    probability (computed in the dtype) exceeds ``top_p`` are removed, except the first of them
    and the most probable id. Top-k: logits below the ``min(top_k, V)``-th largest are removed
    (ties at that value kept).

    Args:
        logits: ``(..., V)`` float (not modified).
    Returns:
        ``(..., V)`` probabilities in the logits' dtype.
    """
    if temperature > 0:
        logits = logits / temperature
    lowest = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        drop = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1) > top_p
        drop = torch.cat([torch.zeros_like(drop[..., :1]), drop[..., :-1]], dim=-1)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), lowest)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, lowest)
    return F.softmax(logits, dim=-1)


def dream_confidence(probs: torch.Tensor, x0: torch.Tensor, confidence: str) -> torch.Tensor:
    """A row's confidence, in the probabilities' dtype: ``"prob"`` the probability of ``x0``,
    ``"margin"`` the largest minus the second largest probability, ``"neg_entropy"``
    ``sum(p * log(p + 1e-10))``.

    Args:
        probs: ``(..., V)`` from :func:`dream_probs`; x0: int64 ``(...)``.
    Returns:
        ``(...)`` in ``probs.dtype``.
    """
    if confidence == "prob":
        return torch.gather(probs, -1, x0[..., None]).squeeze(-1)
    if confidence == "margin":
        top = torch.topk(probs, 2, dim=-1).values
        return top[..., 0] - top[..., 1]
    return torch.sum(probs * torch.log(probs + DREAM_ENTROPY_EPS), dim=-1)


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
    """Dream's ``sample_tokens``: a token per position and its confidence, in upstream's
    arithmetic (the logits' dtype throughout; see :func:`dream_probs`).

    * ``temperature == 0``: ``x0`` is the id of the largest probability (in the dtype: two
      logits that differ slightly can round to the same probability, and the lowest id wins).
    * ``temperature > 0``: ``x0`` is drawn from the probabilities by inverse CDF (the project's
      draw convention, :func:`inverse_cdf`): the probabilities are summed in float64 along the
      vocabulary and ``x0`` is the first id whose running sum exceeds ``u`` times the total,
      with ONE float64 uniform ``u`` per position, from ``token_uniform`` or ``generator``.

    Upstream draws with ``torch.distributions.Categorical`` instead (the same distribution from
    other random numbers), and falls back to the argmax for the whole call when any row's
    probabilities fail Categorical's argument check (:func:`categorical_rejects`: a normalised
    row whose sum, in the dtype, is not within 1e-6 of 1, frequent in bf16). ``check_rows``
    reproduces that: at ``temperature > 0``, when any of the marked rows is rejected, every
    row takes the argmax (decided on the device, no host sync).

    Args:
        logits: ``(B, N, V)`` float logits of the N positions to sample, any strides.
        temperature: ``>= 0``.
        confidence: ``"prob"`` (upstream ``maskgit_plus``: the probability of x0),
            ``"margin"`` (``topk_margin``: top-1 minus top-2 probability) or
            ``"neg_entropy"`` (``entropy``: ``sum p * log(p + 1e-10)``).
        top_p, top_k: upstream's filters (``None``: off; ``top_p >= 1`` is off too).
        token_uniform: ``f(a, b)`` -> float64 ``U(0, 1)`` of shape ``(B, b - a)`` for positions
            ``a:b``; when ``None``, drawn with ``torch.rand(..., dtype=float64,
            generator=generator)``.
        generator: ``torch.Generator`` of those draws, or ``None`` (the global RNG).
        check_rows: bool ``(B, N)``, the rows of upstream's call (its masked positions), whose
            Categorical check decides the argmax fallback; ``None``: no fallback.
    Returns:
        ``x0``: int64 ``(B, N)``; ``confidence``: ``(B, N)`` in the logits' dtype. Rows of
        NaN probabilities (NaN or all ``-inf`` logits) have a NaN confidence; their ``x0`` at
        ``temperature > 0`` is unspecified.
    Memory: rows are processed in chunks of at most ``_MAX_CHUNK_ELEMENTS`` logits.
    """
    check_dream_sample_args(logits, temperature, confidence, top_p, top_k)
    batch, num_pos, vocab = logits.shape
    rows_per_chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, batch * vocab))
    x0 = torch.empty((batch, num_pos), dtype=torch.long, device=logits.device)
    conf = torch.empty((batch, num_pos), dtype=logits.dtype, device=logits.device)
    fallback = check_rows is not None and temperature > 0
    if fallback:
        greedy_x0, greedy_conf = torch.empty_like(x0), torch.empty_like(conf)
        rejected = torch.zeros((), dtype=torch.bool, device=logits.device)
    for a in range(0, num_pos, rows_per_chunk):
        b = min(a + rows_per_chunk, num_pos)
        probs = dream_probs(logits[:, a:b], temperature, top_p, top_k)  # (B, b - a, V)
        if temperature == 0:
            chosen = dream_greedy(probs)
        else:
            u = (token_uniform(a, b) if token_uniform is not None else
                 torch.rand((batch, b - a), dtype=torch.float64, device=logits.device,
                            generator=generator))
            chosen = inverse_cdf(torch.cumsum(probs, -1, dtype=torch.float64), u)
        x0[:, a:b] = chosen
        conf[:, a:b] = dream_confidence(probs, chosen, confidence)
        if fallback:
            greedy = dream_greedy(probs)
            greedy_x0[:, a:b] = greedy
            greedy_conf[:, a:b] = dream_confidence(probs, greedy, confidence)
            rejected |= (categorical_rejects(probs) & check_rows[:, a:b]).any()
    if fallback:  # upstream's bare except: the whole call takes the argmax
        x0 = torch.where(rejected, greedy_x0, x0)
        conf = torch.where(rejected, greedy_conf, conf)
    return x0, conf


def categorical_rejects(probs: torch.Tensor) -> torch.Tensor:
    """Per row, whether ``torch.distributions.Categorical(probs=row)`` rejects it (and
    ``sample()`` would raise): the normalised row ``p / sum(p)`` (in the dtype) must be finite,
    non-negative and sum to 1 within 1e-6 in the dtype (the ``simplex`` constraint), and
    ``multinomial`` needs a positive sum. probs ``(..., V)`` -> bool ``(...)``."""
    normalised = probs / probs.sum(-1, keepdim=True)
    simplex = (normalised >= 0).all(-1) & ((normalised.sum(-1) - 1).abs() < 1e-6)
    return ~(simplex & torch.isfinite(normalised).all(-1))


def dream_greedy(probs: torch.Tensor) -> torch.Tensor:
    """Upstream's choice at temperature 0: the id of the largest probability, the lowest on
    ties (``probs.max(-1)``; NaN counts as the largest). probs ``(..., V)`` -> int64 ``(...)``."""
    return probs.max(dim=-1).indices
