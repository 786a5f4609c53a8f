"""Torch backend of the per-step ops: sample (x0 and its confidence; LLaDA's and Dream's
samplers) and select transfer.

The ops reproduce the reference's arithmetic exactly (same torch ops in the same dtypes), but
only on the rows of the current block and in chunks of rows, so no ``(B, L, V)`` float64
tensor is ever built. They run on any device and are the oracle of the Triton/CUDA kernels.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .contract import combine_cfg

# Upper bound on the elements of one float64 temporary at temperature > 0 (64 MiB).
_MAX_CHUNK_ELEMENTS = 8 * 2**20
# Rows per chunk of Dream's filtered path (filtered_rows: up to four row-sized temporaries).
_MAX_FILTERED_CHUNK_ELEMENTS = 2 * 2**20


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


def top_p_removed(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The ids the nucleus (top-p) filter removes: with the logits sorted in decreasing order
    (ties by lowest id), those whose cumulative softmax probability (computed in the logits'
    dtype) exceeds ``top_p``, except the first of them and the most probable id.

    Args:
        logits: ``(..., V)`` float (not modified).
    Returns:
        bool ``(..., V)``: True where removed.
    """
    ordered, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    drop = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1) > top_p
    drop = torch.cat([torch.zeros_like(drop[..., :1]), drop[..., :-1]], dim=-1)
    return torch.zeros_like(drop).scatter_(-1, order, drop)


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
        logits = logits.masked_fill(top_p_removed(logits, top_p), lowest)
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

    With ``top_p < 1`` or ``top_k`` the rows go through :func:`filtered_rows` (the same
    results without sorting the vocabulary's ids; one host sync per chunk of rows), otherwise
    through the plain formulas (:func:`plain_rows`).

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
    Memory: rows are processed in chunks of at most ``_MAX_CHUNK_ELEMENTS`` logits
    (``_MAX_FILTERED_CHUNK_ELEMENTS`` with a filter).
    """
    check_dream_sample_args(logits, temperature, confidence, top_p, top_k)
    batch, num_pos, vocab = logits.shape
    filtered = (top_p is not None and top_p < 1) or top_k is not None
    rows_of = filtered_rows if filtered else plain_rows
    chunk = _MAX_FILTERED_CHUNK_ELEMENTS if filtered else _MAX_CHUNK_ELEMENTS
    rows_per_chunk = max(1, chunk // max(1, batch * vocab))
    x0 = torch.empty((batch, num_pos), dtype=torch.long, device=logits.device)
    conf = torch.empty((batch, num_pos), dtype=logits.dtype, device=logits.device)
    fallback = check_rows is not None and temperature > 0
    if fallback:
        greedy_x0, greedy_conf = torch.empty_like(x0), torch.empty_like(conf)
        rejected = torch.zeros((), dtype=torch.bool, device=logits.device)
    for a in range(0, num_pos, rows_per_chunk):
        b = min(a + rows_per_chunk, num_pos)
        u = None
        if temperature > 0:
            u = (token_uniform(a, b) if token_uniform is not None else
                 torch.rand((batch, b - a), dtype=torch.float64, device=logits.device,
                            generator=generator)).reshape(-1)
        out = rows_of(logits[:, a:b].reshape(-1, vocab), temperature, confidence, top_p,
                      top_k, u, fallback)
        x0[:, a:b] = out.x0.view(batch, b - a)
        conf[:, a:b] = out.confidence.view(batch, b - a)
        if fallback:
            greedy_x0[:, a:b] = out.greedy_x0.view(batch, b - a)
            greedy_conf[:, a:b] = out.greedy_confidence.view(batch, b - a)
            rejected |= (out.rejects.view(batch, b - a) & check_rows[:, a:b]).any()
    if fallback:  # upstream's bare except: the whole call takes the argmax
        x0 = torch.where(rejected, greedy_x0, x0)
        conf = torch.where(rejected, greedy_conf, conf)
    return x0, conf


class DreamRows(NamedTuple):
    """:func:`dream_sample`'s results for a set of rows, each ``(R,)``: the token and its
    confidence; with the fallback, also the argmax, its confidence and whether Categorical
    rejects the row (``None`` otherwise)."""
    x0: torch.Tensor
    confidence: torch.Tensor
    greedy_x0: Optional[torch.Tensor] = None
    greedy_confidence: Optional[torch.Tensor] = None
    rejects: Optional[torch.Tensor] = None


def plain_rows(logits: torch.Tensor, temperature: float, confidence: str,
               top_p: Optional[float], top_k: Optional[int], u: Optional[torch.Tensor],
               fallback: bool) -> DreamRows:
    """:func:`dream_sample` on ``(R, V)`` rows by the plain formulas: :func:`dream_probs` on
    the whole vocabulary, the inverse CDF over its float64 running sum.

    Args:
        logits: ``(R, V)``. u: float64 ``(R,)`` when ``temperature > 0``, else ``None``.
        fallback: also compute the argmax, its confidence and :func:`categorical_rejects`.
    """
    probs = dream_probs(logits, temperature, top_p, top_k)
    x0 = (dream_greedy(probs) if u is None else
          inverse_cdf(torch.cumsum(probs, -1, dtype=torch.float64), u))
    conf = dream_confidence(probs, x0, confidence)
    if not fallback:
        return DreamRows(x0, conf)
    greedy = dream_greedy(probs)
    return DreamRows(x0, conf, greedy, dream_confidence(probs, greedy, confidence),
                     categorical_rejects(probs))


def sorted_values(rows: torch.Tensor, use_numpy: Optional[bool] = None) -> torch.Tensor:
    """Each row's values in increasing order (NaN last): the numbers ``torch.sort`` gives,
    without its permutation. With ``use_numpy`` (default: on CPU), numpy's vectorised sort
    (about ten times faster than ``torch.sort`` on a 152k vocabulary); otherwise
    ``torch.sort``. Equal values (and ``-0.0`` / ``+0.0``, which compare equal) may come in
    either order.

    Args:
        rows: ``(R, V)`` float. Returns: ``(R, V)``, float32 for bfloat16 / float16 rows with
        numpy (every such value is a float32), else the rows' dtype.
    """
    if not (rows.device.type == "cpu" if use_numpy is None else use_numpy):
        return torch.sort(rows, dim=-1).values
    work = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    return torch.from_numpy(np.sort(work.detach().contiguous().numpy(), axis=-1))


def nonzero_ids(keep: torch.Tensor,
                use_numpy: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``True`` columns in increasing order, padded: int64 ``ids`` ``(R, W)`` (the
    ``counts[r]`` ids of row ``r`` first, then zeros; ``W = 1 + max(1, max(counts))``, so every
    row ends with padding) and int64 ``counts`` ``(R,)``. With ``use_numpy`` (default: on
    CPU), numpy's ``flatnonzero`` per row (results on CPU); otherwise one ``nonzero`` (results
    on keep's device). keep: bool ``(R, V)``. One host sync."""
    num_rows = keep.shape[0]
    if keep.device.type == "cpu" if use_numpy is None else use_numpy:
        found = [np.flatnonzero(row) for row in keep.cpu().numpy()]
        counts = torch.tensor([len(f) for f in found], dtype=torch.long)
        ids = np.zeros((num_rows, 1 + max([1] + [len(f) for f in found])), dtype=np.int64)
        for r, f in enumerate(found):
            ids[r, :len(f)] = f
        return torch.from_numpy(ids), counts
    rows, cols = keep.nonzero(as_tuple=True)  # by row, then by column
    counts = torch.bincount(rows, minlength=num_rows)
    width = 1 + max(1, int(counts.max()) if num_rows else 0)
    slot = torch.arange(rows.numel(), device=keep.device) - (counts.cumsum(0) - counts)[rows]
    ids = torch.zeros((num_rows, width), dtype=torch.long, device=keep.device)
    ids[rows, slot] = cols
    return ids, counts


def nucleus_keep(logits: torch.Tensor, top_p: Optional[float],
                 top_k: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ids that :func:`dream_probs`'s filters keep, found without sorting the ids.

    Top-p: the statement sorts the row (ties by lowest id), takes ``cumsum(softmax(sorted))``
    in the dtype and keeps the first ``n = 1 + #{j < V - 1: not cumsum[j] > top_p}`` of that
    order. Here the same ``cumsum(softmax(.))`` runs on the row's values sorted by
    :func:`sorted_values` (the same numbers in the same places, so the same float results
    whatever the summation order of softmax and cumsum), which gives ``n`` and the ``n``-th
    value ``v``; the kept ids are those above ``v`` and the lowest ids equal to it, as many as
    the sorted prefix holds (counted with ``searchsorted``). Top-k after top-p: its threshold
    is the ``k``-th sorted value when ``k <= n`` (the removed logits, set to the dtype's
    minimum, come after every kept one), which then keeps all ids at or above it. Top-k
    alone: ``torch.topk``'s ``k``-th value, as the statement.

    A row is *regular* when it holds no NaN, its maximum ``m`` is finite and more than 128
    above the dtype's minimum (so a removed logit's probability is exactly 0), the entries
    not beyond ``top_p`` form a prefix (they do whenever the running sum never decreases) and,
    with both filters, ``v`` is above the dtype's minimum. Only regular rows' masks are
    exact: callers compute the others with the plain formulas.

    Args:
        logits: ``(R, V)`` float, tempered as the statement tempers them.
        top_p: the nucleus mass (active when ``< 1``); top_k: ``int >= 1`` or ``None``.
    Returns:
        ``(keep, regular)``: bool ``(R, V)`` (all ``False`` on irregular rows) and bool
        ``(R,)``.
    """
    vocab = logits.shape[-1]
    lowest = torch.finfo(logits.dtype).min
    if top_p is None or top_p >= 1:  # top-k alone
        top = torch.topk(logits, min(top_k, vocab), dim=-1).values
        value, peak = top[:, -1:], top[:, 0]  # a NaN sorts first: then the peak is NaN
        regular = torch.ones_like(peak, dtype=torch.bool)
        limit = None  # every id at or above the k-th value stays
    else:
        ascending = sorted_values(logits)
        sorted_probs = F.softmax(ascending.flip(-1).to(logits.dtype), dim=-1)  # NaN aside
        beyond = torch.cumsum(sorted_probs, dim=-1)[:, :-1] > top_p
        del sorted_probs  # memory: at most four row-sized tensors at once

        def sorted_at(j):  # (R, 1) entries of the statement's (decreasing) sorted row
            return ascending.gather(1, vocab - 1 - j).to(logits.dtype)

        n = vocab - beyond.view(torch.uint8).sum(-1, dtype=torch.int32).long()  # 1 + not beyond
        first = beyond.max(-1).indices if vocab > 1 else n - 1  # the first beyond (0 if none)
        prefix = (n == vocab) | (n - 1 == first)
        value = sorted_at((n - 1)[:, None])  # the last kept value
        peak = sorted_at(torch.zeros_like(n)[:, None])[:, 0]
        regular = prefix & ~torch.isnan(ascending[:, -1])  # NaN sorts last
        limit = n  # how many ids the sorted order keeps
        if top_k is not None:
            k = min(top_k, vocab)
            kth = sorted_at(torch.full_like(n, k - 1)[:, None])
            tighter = (n >= k) & (kth[:, 0] > value[:, 0])  # then every id >= kth stays
            value = torch.where(tighter[:, None], kth, value)
            limit = torch.where(tighter, vocab, n)
            regular &= value[:, 0] > lowest
    regular &= torch.isfinite(peak) & (peak.double() - lowest > 128)
    keep = logits >= value
    if limit is not None:
        key = value.to(ascending.dtype)
        above = vocab - torch.searchsorted(ascending, key, right=True)[:, 0]  # ids > value
        ties = vocab - torch.searchsorted(ascending, key)[:, 0] - above  # ids == value
        split = (regular & (limit - above < ties)).nonzero()[:, 0]  # the cut splits a tie
        if split.numel():  # keep the first ``limit - above`` (>= 1) tied ids, drop the rest
            tied, _ = nonzero_ids(logits[split] == value[split])
            tied = tied.to(logits.device)
            slots = torch.arange(tied.shape[1], device=logits.device)
            stays = slots < (limit - above)[split, None]
            tied = torch.where(slots < ties[split, None], tied, tied[:, :1])  # padding: 1st
            keep[split] = keep[split].scatter_(1, tied, stays | (slots >= ties[split, None]))
    irregular = (~regular).nonzero()[:, 0]
    if irregular.numel():
        keep[irregular] = False
    return keep, regular


def filtered_rows(logits: torch.Tensor, temperature: float, confidence: str,
                  top_p: Optional[float], top_k: Optional[int], u: Optional[torch.Tensor],
                  fallback: bool) -> DreamRows:
    """:func:`plain_rows` with a filter, the same results faster.

    * The kept ids come from :func:`nucleus_keep` (no sort of the ids); the probabilities are
      the statement's own ``softmax`` of the row with the removed logits set to the dtype's
      minimum (the same tensor, so the same numbers), and so is the rejection check.
    * The draw, the argmax and the margin only read the kept ids (every other probability is
      exactly 0): the kept probabilities in increasing id order (:func:`nonzero_ids`), their
      float64 running sum, ``searchsorted``. That sum equals the statement's over the whole
      vocabulary, zeros included, in ANY summation order, when every kept probability is 0
      or a multiple of 2^-52 (float32 at least 2^-29, bfloat16 2^-45, float16 always) and the
      total is below 2: then every partial sum is exact in float64. Rows that miss it take the
      full sum.
    * Irregular rows (:func:`nucleus_keep`) go to :func:`plain_rows`.

    Args and returns: as :func:`plain_rows`.
    """
    tempered = logits / temperature if temperature > 0 else logits
    keep, regular = nucleus_keep(tempered, top_p, top_k)
    probs = F.softmax(torch.where(keep, tempered, torch.finfo(logits.dtype).min), dim=-1)
    vocab = probs.shape[-1]
    ids, counts = nonzero_ids(keep)
    ids, counts = ids.to(probs.device), counts.to(probs.device)
    kept = probs.gather(1, ids)
    kept.masked_fill_(torch.arange(ids.shape[1], device=probs.device) >= counts[:, None], 0)
    top, at = kept.max(-1)  # the first of equal maxima: the lowest id
    greedy = ids.gather(1, at[:, None])[:, 0]
    if u is None:
        x0 = greedy
    else:
        cdf = torch.cumsum(kept, -1, dtype=torch.float64)
        tiny = 2.0 ** -52 / torch.finfo(probs.dtype).eps
        exact = ((kept == 0) | (kept >= tiny)).all(-1) & (cdf[:, -1] < 2)
        at = inverse_cdf(cdf, u)  # past the kept ids (u * total == total): the last id
        x0 = torch.where(at < counts, ids.gather(1, at[:, None])[:, 0], vocab - 1)
        redo = (~exact & regular).nonzero()[:, 0]
        if redo.numel():
            x0[redo] = inverse_cdf(torch.cumsum(probs[redo], -1, dtype=torch.float64), u[redo])
    if confidence == "margin":
        pair = torch.topk(kept, 2, dim=-1).values
        conf = greedy_conf = pair[:, 0] - pair[:, 1]
    else:
        conf = dream_confidence(probs, x0, confidence)
        greedy_conf = top if confidence == "prob" else conf
    out = DreamRows(x0, conf)
    if fallback:
        misses = ~sums_to_one(probs / probs.sum(-1, keepdim=True))  # finite, >= 0 if regular
        out = DreamRows(x0, conf, greedy, greedy_conf, misses)
    irregular = (~regular).nonzero()[:, 0]
    if irregular.numel():
        plain = plain_rows(logits[irregular], temperature, confidence, top_p, top_k,
                           None if u is None else u[irregular], fallback)
        for mine, theirs in zip(out, plain):
            if mine is not None:
                mine[irregular] = theirs
    return out


def sums_to_one(normalised: torch.Tensor) -> torch.Tensor:
    """Categorical's ``simplex`` sum check: the row's sum, in its dtype, within 1e-6 of 1.
    normalised ``(..., V)`` -> bool ``(...)``."""
    return (normalised.sum(-1) - 1).abs() < 1e-6


def categorical_rejects(probs: torch.Tensor) -> torch.Tensor:
    """Per row, whether ``torch.distributions.Categorical(probs=row)`` rejects it (and
    ``sample()`` would raise): the normalised row ``p / sum(p)`` (in the dtype) must be finite,
    non-negative and sum to 1 within 1e-6 in the dtype (the ``simplex`` constraint,
    :func:`sums_to_one`), and ``multinomial`` needs a positive sum. probs ``(..., V)`` -> bool
    ``(...)``."""
    normalised = probs / probs.sum(-1, keepdim=True)
    simplex = (normalised >= 0).all(-1) & sums_to_one(normalised)
    return ~(simplex & torch.isfinite(normalised).all(-1))


def dream_greedy(probs: torch.Tensor) -> torch.Tensor:
    """Upstream's choice at temperature 0: the id of the largest probability, the lowest on
    ties (``probs.max(-1)``; NaN counts as the largest). probs ``(..., V)`` -> int64 ``(...)``."""
    return probs.max(dim=-1).indices
