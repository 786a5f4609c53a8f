"""Plain-PyTorch statement of Dream's sampler ``diffusion_generate``: the test oracle.

Upstream is Dream-org's ``generation_utils.py`` (copies in ZHZisZZ/dllm
``dllm/pipelines/dream/models/`` and NVlabs/Fast-dLLM ``dream/model/``). This module follows
it step by step, quirks included, with no attempt at speed:

* **Settings.** Without ``generation_config`` the settings start from the MODEL's config:
  every generation field ``model.config`` carries (its ``to_dict()``) overrides the defaults
  (upstream builds its config with ``from_model_config``; under transformers 4.4x every
  ``PretrainedConfig`` carries ``temperature=1.0``, ``top_k=50``, ``top_p=1.0``,
  ``max_length=20``, which therefore apply unless passed). With a ``generation_config`` its
  fields are the base. Keyword arguments the caller passes override either. The defaults are
  upstream's ``DreamGenerationConfig``'s (:data:`GENERATION_DEFAULTS`).
* **Length.** ``max_new_tokens`` (if set) gives ``max_length = prompt + max_new_tokens``;
  otherwise, when ``max_length`` was not passed and the config's is upstream's default 20, it
  becomes ``20 + prompt``, capped by ``model.config.max_position_embeddings``. A prompt at
  least ``max_length`` long is an error.
* **Canvas.** The prompt (repeated ``num_return_sequences`` times per row) followed by mask
  ids up to ``max_length``; the whole canvas is denoised at once (no blocks).
* **Padding.** With a 0 in ``attention_mask``, the mask is extended with 1s over the
  generated part, positions are ``cumsum(mask) - 1`` with padded positions set to 1, and the
  model receives the boolean ``(B, 1, N, N)`` AND of the key and query masks; otherwise it
  receives ``"full"`` and positions ``None``. The model is called ``model(x, mask, tok_idx)``.
* **Each step** ``i`` of ``steps`` (``timesteps = linspace(1, eps, steps + 1)``,
  ``t = timesteps[i]``, ``s = timesteps[i + 1]``): the logits of the whole canvas, SHIFTED
  right by one (row 0 duplicated), then ``generation_logits_hook_func(i, x, logits)``, then
  on the masked positions:

  - ``origin``: each masked position is revealed with probability ``1 - s/t`` (all at the
    last step), by :func:`sample_tokens`;
  - ``maskgit_plus`` / ``topk_margin`` / ``entropy``: :func:`sample_tokens` gives a token and
    a confidence (its probability, top-1 minus top-2 probability, or the negative entropy) for
    every masked position; the SAME number ``int(mean_b(masked_b) * (1 - s/t))`` (``int(mean)``
    at the last step; the batch MEAN, in float32) is revealed in every row, the positions
    being the top of the confidence over the canvas (``-inf`` off the mask), or a sample
    without replacement from ``softmax(confidence / alg_temp)`` when ``alg_temp > 0``.

  then ``x = generation_tokens_hook_func(i, x, logits)`` (it is also called once as
  ``(None, x, None)`` before the first step) and, with ``output_history`` and
  ``return_dict_in_generate``, a copy of ``x`` is kept.
* **The batch-mean quirk.** A row with fewer masked positions than the count ``n`` gets all of
  them plus ``n - masked`` positions of confidence ``-inf``: positions that are NOT masked
  (prompt, padding, tokens revealed earlier). Upstream writes the mask id there (its
  candidate canvas holds the mask id off the mask), so those tokens are re-masked and, at the
  last step, the output keeps mask ids; a row with more masked positions than the mean keeps
  some of them masked at the end. With ``alg_temp > 0`` the positions come from
  ``torch.multinomial`` without replacement, which PyTorch computes as the top ``n`` of
  ``p / Exp(1)``: the zero-probability (off-mask) positions are then picked the same way,
  and a row with no masked position at all makes it raise (its weights are all NaN).
* **Sampling quirk.** At temperature > 0 upstream samples with
  ``torch.distributions.Categorical(probs)`` inside a bare ``try``: when that raises (its
  argument check: every normalised row must sum to 1 within 1e-6 in the probabilities'
  dtype, which bf16 rows often miss), EVERY position of that call falls back to the argmax
  and its probability. :func:`sample_tokens` does the same.

Departures, only to make it a usable oracle:

* Ties go to the lowest position: in the choice of positions (upstream's ``torch.topk``, whose
  tie order is unspecified; this matters for the ``-inf`` positions of the batch-mean quirk,
  which upstream's CPU ``topk`` does not take in increasing order), in ``alg_temp``'s top
  ``n`` and in ``top_p``'s sort. Token ties at temperature 0 follow ``torch.max`` (the first).
* Random numbers come from a :class:`~genjo_fast.draws.Draws` source indexed by step and
  position, so the oracle and the fast path can be handed the same numbers:

  - tokens at temperature > 0: an inverse-CDF sample in float64 over the probabilities as
    upstream computes them (in the logits' dtype): with ``u = draws.token(i, 0, N, B)``
    (float64, one per position), ``x0 = min(searchsorted(cumsum(p), u * sum(p),
    right=True), V - 1)`` (zero-probability ids are never chosen);
  - ``origin``'s reveal: ``draws.remask(i, 0, N, B)`` (float32), revealed if ``u < 1 - s/t``;
  - ``alg_temp``'s positions: Gumbel-top-k, PyTorch's own algorithm for multinomial without
    replacement: the ``n`` largest ``p / -log(u)`` in float64 with
    ``u = draws.position(i, 0, N, B)`` (float64, one per position); the same distribution as
    drawing ``n`` positions one after another without replacement.

  Within a step the draws are requested in the order remask, token (``origin``) or token,
  position (the others), each only when used.
* Arguments are checked (unknown keywords, ``alg``, ``steps``, ``temperature``, ``top_k``,
  the prompt's shape) with ``TypeError``/``ValueError`` naming them, where upstream ignores
  unknown keywords and fails later on bad values; a missing mask id falls back to
  ``model.config.mask_token_id`` and then Dream's 151666.

genjo_fast's approximate ``adaptive_length`` (off by default) is stated in
:func:`diffusion_generate`'s docstring; with it, the batch-mean count follows genjo_fast's rule
(a row unmasks at most its masked positions), not upstream's bug.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .answer_length import eos_probability, plain_cut_at_eos, plain_open_tail
from .contract import DREAM, logits_of
from .reference import PlainKVCache, factor_transfer_row, threshold_transfer_row
from .draws import Draws, TorchDraws
from .dream_settings import UNSET, DreamGenerateOutput, resolve_settings

# --------------------------------------------------------------------------------------------
# Token sampling (upstream's sample_tokens)
# --------------------------------------------------------------------------------------------

def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keeps the most probable tokens until their cumulative probability
    exceeds ``top_p`` (the one crossing it included, the first always kept); the others get
    the dtype's minimum. ``logits``: ``(N, V)``; ties sorted by lowest id."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    beyond = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
    drop = torch.zeros_like(beyond)
    drop[..., 1:] = beyond[..., :-1]  # the token that crosses top_p stays
    drop = torch.zeros_like(drop).scatter_(-1, order, drop)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keeps the tokens whose logit is >= the ``top_k``-th largest (ties with it included);
    the others get the dtype's minimum. ``logits``: ``(N, V)``."""
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def categorical_fails(probs: torch.Tensor) -> bool:
    """True when upstream's ``Categorical(probs=probs).sample()`` raises (so that its bare
    ``except`` falls back to the argmax): the distribution's argument check (PyTorch's own,
    when validation is on) or ``multinomial``'s check of the normalised rows."""
    try:
        normalised = torch.distributions.Categorical(probs=probs).probs
    except ValueError:
        return True
    if normalised.numel() == 0:
        return False
    return not bool(torch.isfinite(normalised).all() and (normalised >= 0).all()
                    and (normalised.sum(-1) > 0).all())


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One id per row drawn from ``probs`` (unnormalised) by inverse CDF in float64.

    Args:
        probs: ``(N, V)`` non-negative, any float dtype.
        uniform: float64 ``(N,)`` in ``[0, 1)``.
    Returns:
        int64 ``(N,)``: ``min(searchsorted(cumsum(p), u * sum(p), right=True), V - 1)``.
    """
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)
    target = (uniform.to(cdf.device, torch.float64) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: Optional[float] = None,
                  top_k: Optional[int] = None, margin_confidence: bool = False,
                  neg_entropy: bool = False, uniform: Optional[torch.Tensor] = None):
    """Upstream's ``sample_tokens``: a token and a confidence per row.

    Args:
        logits: ``(N, V)`` in the model's dtype (the masked rows of the shifted logits).
        temperature: 0 for the argmax; otherwise logits are divided by it and a token is
            sampled with ``uniform`` (see :func:`inverse_cdf` and :func:`categorical_fails`).
        top_p: nucleus filter when ``< 1``. top_k: top-k filter.
        margin_confidence: confidence = top-1 minus top-2 probability.
        neg_entropy: confidence = ``sum(p * log(p + 1e-10))``.
        uniform: float64 ``(N,)`` draws, required when ``temperature > 0``.
    Returns:
        ``(confidence, x0)``: ``(N,)`` in the logits' dtype and int64 ``(N,)``. The default
        confidence is the probability of ``x0`` after filtering.
    """
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0 and not categorical_fails(probs):
        if uniform is None:
            raise ValueError("sample_tokens needs uniform draws at temperature > 0")
        x0 = inverse_cdf(probs, uniform)
        confidence = torch.gather(probs, -1, x0[:, None])[:, 0]
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        top2 = torch.sort(probs, dim=-1, descending=True).values[:, :2]
        confidence = top2[:, 0] - top2[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


# --------------------------------------------------------------------------------------------
# Choice of positions
# --------------------------------------------------------------------------------------------

def top_positions(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Per row, the indices of the ``n`` largest scores, equal scores by lowest position.
    ``scores``: ``(B, N)``. Returns int64 ``(B, n)``."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :n]


def sample_positions(weights: torch.Tensor, n: int, uniform: torch.Tensor) -> torch.Tensor:
    """``torch.multinomial(weights, n)`` (without replacement), stated with given draws.

    PyTorch computes it as the top ``n`` of ``weights / Exp(1)``; here ``Exp(1) = -log(u)``
    in float64 (Gumbel-top-k: the same distribution as ``n`` sequential draws without
    replacement). Zero weights tie at 0 and are taken by lowest position when ``n`` exceeds
    the positive weights, as the batch-mean quirk needs.

    Args:
        weights: ``(B, N)`` (upstream's softmax of the confidence over ``alg_temp``).
        uniform: float64 ``(B, N)`` draws in ``[0, 1)``.
    Returns:
        int64 ``(B, n)``.
    Raises:
        RuntimeError: as ``torch.multinomial``: a weight that is NaN, infinite or negative
            (a row without any masked position has only NaN weights), or a row summing to 0.
    """
    if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
        raise RuntimeError("alg_temp: the position weights hold NaN, inf or a negative value "
                           "(a row has no masked position left while the batch-mean count is "
                           "positive); upstream's torch.multinomial raises here too")
    if bool((weights.sum(-1) == 0).any()):
        raise RuntimeError("alg_temp: a row's position weights sum to 0; upstream's "
                           "torch.multinomial raises here too")
    keys = weights.to(torch.float64) / -torch.log(uniform.to(weights.device, torch.float64))
    return top_positions(keys, n)


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------

def prepare_canvas(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                   max_length: int, mask_token_id: int):
    """Upstream's canvas and model inputs.

    Args:
        input_ids: int ``(B, Lp)``. attention_mask: ``(B, Lp)`` 0/1 or ``None``.
    Returns:
        ``(x, mask, tok_idx)``: ``x`` int64 ``(B, max_length)``, the prompt then mask ids;
        with a 0 in ``attention_mask``, the boolean ``(B, 1, N, N)`` mask and the positions
        ``(B, N)`` (``cumsum - 1``, padded positions at 1); otherwise ``"full"`` and ``None``.
    """
    x = F.pad(input_ids, (0, max_length - input_ids.shape[1]), value=mask_token_id)
    if attention_mask is None or not bool((attention_mask == 0).any()):
        return x, "full", None
    attention_mask = F.pad(attention_mask.long(), (0, max_length - attention_mask.shape[1]),
                           value=1)
    tok_idx = attention_mask.cumsum(-1) - 1
    tok_idx.masked_fill_(attention_mask == 0, 1)
    real = attention_mask.bool()
    return x, real[:, None, None, :] & real[:, None, :, None], tok_idx


def transfer_count(mask_index: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                   last: bool) -> int:
    """Positions revealed per row: ``int(mean_b(masked_b) * (1 - s/t))``, ``int(mean)`` at the
    last step, in upstream's float32 arithmetic. ``mask_index``: bool ``(B, N)``."""
    num_mask_token = mask_index.sum() / mask_index.shape[0]
    return int(num_mask_token) if last else int(num_mask_token * (1 - s / t))


@torch.no_grad()
def diffusion_generate(model, inputs: torch.Tensor, generation_config=None, *,
                       attention_mask: Optional[torch.Tensor] = None,
                       generation_tokens_hook_func: Optional[Callable] = None,
                       generation_logits_hook_func: Optional[Callable] = None,
                       draws: Optional[Draws] = None,
                       max_length: Optional[int] = None, max_new_tokens: Optional[int] = None,
                       steps: int = UNSET, eps: float = UNSET, alg: str = UNSET,
                       alg_temp: Optional[float] = UNSET, temperature: float = UNSET,
                       top_p: Optional[float] = UNSET, top_k: Optional[int] = UNSET,
                       mask_token_id: int = UNSET, num_return_sequences: int = UNSET,
                       output_history: bool = UNSET, return_dict_in_generate: bool = UNSET,
                       adaptive_length: bool = False, length_threshold: float = 0.5,
                       eos_id: int = DREAM.eos):
    """Dream's ``model.diffusion_generate(inputs, generation_config, **kwargs)`` as a function
    of the model (plain PyTorch, slow); the semantics are in the module docstring.

    Args:
        model: called as ``model(x, attention_mask, tok_idx)`` with ``x`` int64 ``(B, N)``,
            ``attention_mask`` ``"full"`` or bool ``(B, 1, N, N)``, ``tok_idx`` ``None`` or
            int64 ``(B, N)``; returns ``.logits`` ``(B, N, V)`` (or the tensor).
        inputs: int64 ``(B, Lp)`` prompt ids, left-padded.
        generation_config: ``None`` (settings from ``model.config`` over the defaults), a
            mapping, or an object with the settings as attributes.
        attention_mask: ``(B, Lp)`` 0/1, or ``None``.
        generation_tokens_hook_func: ``f(step, x, logits) -> x``, called with ``(None, x,
            None)`` first, then after every step. Default: identity.
        generation_logits_hook_func: ``f(step, x, logits) -> logits`` on the shifted logits.
        draws: source of the uniform draws (module docstring); default ``torch.rand``.
        max_length, max_new_tokens, steps (512), eps (1e-3), alg ("origin"), alg_temp (None),
        temperature (0.0), top_p (None), top_k (None), mask_token_id (the model's, else
        151666), num_return_sequences (1), output_history (False), return_dict_in_generate
        (False): upstream's settings; a setting left out takes the generation config's (or
        the model config's) value, else the default in parentheses.
        adaptive_length: genjo_fast's APPROXIMATE variable length (no hooks): after step 0,
            each row's answer ends at the first position whose EOS probability at step 0
            (:func:`~genjo_fast.answer_length.eos_probability` of the shifted logits) is
            ``>= length_threshold`` and from which on the row holds only masks and ``eos_id``
            (:func:`~genjo_fast.answer_length.plain_open_tail`); it and every later position
            become ``eos_id``. Later steps run on the first ``width`` columns (the longest
            answer), the shorter rows' tails padding (a 0 in the mask: upstream's padded
            attention and positions). Rows then differ in masked counts, and the batch-mean
            count follows genjo_fast's rule, not upstream's bug: a row unmasks at most its
            masked positions and its other tokens stay.
    Returns:
        int64 ``(B * num_return_sequences, max_length)``, or with ``return_dict_in_generate``
        a :class:`DreamGenerateOutput`.
    """
    passed = {k: v for k, v in dict(
        max_length=max_length, max_new_tokens=max_new_tokens, steps=steps, eps=eps, alg=alg,
        alg_temp=alg_temp, temperature=temperature, top_p=top_p, top_k=top_k,
        mask_token_id=mask_token_id, num_return_sequences=num_return_sequences,
        output_history=output_history, return_dict_in_generate=return_dict_in_generate,
    ).items() if v is not UNSET}
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.is_floating_point():
        raise ValueError("inputs must be an integer tensor (B, Lp)")
    if attention_mask is not None and attention_mask.shape != inputs.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match inputs "
                         f"{tuple(inputs.shape)}")
    cfg = resolve_settings(model, inputs.shape[1], generation_config, **passed)
    draws = draws if draws is not None else TorchDraws()
    tokens_hook = generation_tokens_hook_func or (lambda step, x, logits: x)
    logits_hook = generation_logits_hook_func or (lambda step, x, logits: logits)

    if cfg.num_return_sequences > 1:
        inputs = inputs.repeat_interleave(cfg.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(cfg.num_return_sequences, dim=0)
    mask_id = cfg.mask_token_id
    x, mask, tok_idx = prepare_canvas(inputs, attention_mask, cfg.max_length, mask_id)
    batch, length = x.shape
    device = x.device
    timesteps = torch.linspace(1, cfg.eps, cfg.steps + 1, device=device)
    history = [] if (cfg.return_dict_in_generate and cfg.output_history) else None
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)

    x = tokens_hook(None, x, None)
    width = length  # adaptive_length cuts the canvas to its first ``width`` columns
    for i in range(cfg.steps):
        xw = x[:, :width]
        mask_index = xw == mask_id
        logits = logits_of(model(xw, mask, tok_idx), batch, width)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits = logits_hook(i, x, logits)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        last = i == cfg.steps - 1

        if cfg.alg == "origin":
            p_transfer = 1 if last else 1 - s / t
            reveal = draws.remask(i, 0, width, batch, device)[mask_index] < p_transfer
            uniform = None
            if cfg.temperature > 0:
                uniform = draws.token(i, 0, width, batch, device)[mask_index][reveal]
            x0 = torch.full_like(xw[mask_index], mask_id)
            x0[reveal] = sample_tokens(mask_logits[reveal], uniform=uniform, **sampling)[1]
            xw[mask_index] = x0
        else:
            uniform = None
            if cfg.temperature > 0:
                uniform = draws.token(i, 0, width, batch, device)[mask_index]
            confidence, x0 = sample_tokens(mask_logits, uniform=uniform,
                                           margin_confidence=cfg.alg == "topk_margin",
                                           neg_entropy=cfg.alg == "entropy", **sampling)
            n = transfer_count(mask_index, t, s, last)
            full_confidence = torch.full_like(xw, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            # With adaptive_length (genjo_fast's rule), rows with no mask left choose nothing.
            live = mask_index.any(1) if adaptive_length else torch.ones_like(mask_index[:, 0])
            if n > 0 and bool(live.any()):
                if cfg.alg_temp is None or cfg.alg_temp == 0:
                    chosen = top_positions(full_confidence[live], n)
                else:
                    weights = F.softmax(full_confidence[live] / cfg.alg_temp, dim=-1)
                    chosen = sample_positions(weights, n,
                                              draws.position(i, 0, width, batch, device)[live])
                # Off the mask: the mask id (upstream's quirk), or with adaptive_length the
                # token there (genjo_fast's rule: nothing decoded is re-masked).
                candidate = xw.clone() if adaptive_length else torch.full_like(xw, mask_id)
                candidate[mask_index] = x0
                xw[live] = xw[live].scatter(1, chosen, candidate[live].gather(1, chosen))

        if adaptive_length and i == 0:  # the cut, from step 0's EOS probabilities
            answer = x[:, inputs.shape[1]:]
            lengths = plain_cut_at_eos(answer, plain_open_tail(answer, mask_id, eos_id),
                                       eos_probability(logits[:, inputs.shape[1]:], eos_id),
                                       length_threshold, eos_id=eos_id, pad_id=None)
            width = inputs.shape[1] + max(lengths)
            key = (torch.ones_like(x) if attention_mask is None
                   else F.pad(attention_mask.long(), (0, length - inputs.shape[1]), value=1))
            key = key[:, :width] * (torch.arange(width, device=device)[None, :]
                                    < inputs.shape[1] + torch.tensor(lengths, device=device)[:, None])
            _, mask, tok_idx = prepare_canvas(x[:, :width], key, width, mask_id)

        x = tokens_hook(i, x, logits)
        if history is not None:
            history.append(x.clone())

    if cfg.return_dict_in_generate:
        return DreamGenerateOutput(sequences=x, history=history)
    return x


__all__ = ["diffusion_generate", "diffusion_generate_blocks", "sample_tokens", "top_p_logits", "top_k_logits",
           "categorical_fails", "inverse_cdf", "top_positions", "sample_positions",
           "prepare_canvas", "transfer_count"]


@torch.no_grad()
def diffusion_generate_blocks(model, inputs: torch.Tensor, *, max_new_tokens: int, steps: int,
                              block_length: int, attention_mask: Optional[torch.Tensor] = None,
                              eps: float = 1e-3, alg: str = "maskgit_plus",
                              alg_temp: Optional[float] = None, temperature: float = 0.0,
                              top_p: Optional[float] = None, top_k: Optional[int] = None,
                              mask_token_id: int = 151666, cache: Optional[str] = None,
                              refresh_every: Optional[int] = None,
                              threshold: Optional[float] = None, factor: Optional[float] = None,
                              draws: Optional[Draws] = None) -> torch.Tensor:
    """Block-wise Dream with Fast-dLLM's accelerations, stated plainly: the oracle of
    genjo_fast's ``diffusion_generate(..., block_length=, cache=, threshold=, factor=)``.

    Semi-autoregressive: the answer is cut into blocks of ``block_length`` decoded left to
    right, each with ``steps // num_blocks`` steps of upstream's step (module docstring) on
    the block's positions only (the batch-mean count, its quirk and the tie rule included)
    with a time grid ``linspace(1, eps, steps_per_block + 1)`` per block (Fast-dLLM's). The
    model is a genjo_fast model (``forward_hidden`` and ``lm_head``: LLaDA's interface), so the
    prediction for position ``i`` is ``lm_head(hidden[i - 1])``. Options, each approximate:

    * ``cache="prefix"`` / ``"dual"``: each block starts with one full forward (its logits
      are the block's first step; the per-layer K/V are kept); later steps run, against the
      kept K/V, the rows from the one before the block to the end (``prefix``) or to the
      block's end (``dual``, whose fresh K/V then replace their slots);
      ``refresh_every=N`` adds a full forward every N steps of a block.
    * ``threshold`` / ``factor``: each step transfers per row the positions chosen by
      :func:`genjo_fast.reference.threshold_transfer_row` /
      :func:`~genjo_fast.reference.factor_transfer_row` over the block's confidences
      (``-inf`` off the mask) until the block has no mask (``alg`` must rank by a
      confidence, not ``origin``; no ``alg_temp``); the step index of the draws then advances
      by ``block_length`` per block.

    Draws as :func:`diffusion_generate`'s (indexed by global step and absolute position).

    Args:
        model: a :class:`~genjo_fast.models.DreamModel` (or any model with its
            ``forward_hidden(ids, key_mask, positions, kv_hook=)`` and ``lm_head``).
        inputs: int64 ``(B, Lp)``, left-padded; attention_mask ``(B, Lp)`` 0/1 or ``None``.
    Returns:
        int64 ``(B, Lp + max_new_tokens)``.
    """
    draws = draws if draws is not None else TorchDraws()
    batch, prompt_len = inputs.shape
    length = prompt_len + max_new_tokens
    x, _, positions = prepare_canvas(inputs, attention_mask, length, mask_token_id)
    key_mask = None
    if positions is not None:
        key_mask = torch.cat([attention_mask.long(), attention_mask.new_ones(
            (batch, max_new_tokens)).long()], dim=1).bool()
    device = x.device
    num_blocks = max_new_tokens // block_length
    adaptive = threshold is not None or factor is not None
    steps_per_block = block_length if adaptive else steps // num_blocks
    timesteps = torch.linspace(1, eps, steps_per_block + 1, device=device)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)

    for num_block in range(num_blocks):
        start = prompt_len + num_block * block_length
        stop = start + block_length
        kv = PlainKVCache(model, cache, positions)
        i = 0
        while (x[:, start:stop] == mask_token_id).any() if adaptive else i < steps_per_block:
            step = num_block * steps_per_block + i
            if cache is None or i == 0 or (refresh_every is not None and i % refresh_every == 0):
                hidden = kv.full(x, key_mask)[:, start - 1:stop - 1]
            else:
                hidden = kv.rows(x, key_mask, start - 1, stop)[:, :stop - start]
            logits = model.lm_head(hidden)  # the predictions for positions [start, stop)
            block = x[:, start:stop]
            mask_index = block == mask_token_id
            mask_logits = logits[mask_index]
            t, s = timesteps[i], timesteps[min(i + 1, steps_per_block)]
            last = i == steps_per_block - 1
            uniform = None
            if alg == "origin":
                reveal = draws.remask(step, start, stop, batch, device)[mask_index] < (
                    1 if last else 1 - s / t)
                if temperature > 0:
                    uniform = draws.token(step, start, stop, batch, device)[mask_index][reveal]
                x0 = torch.full_like(block[mask_index], mask_token_id)
                x0[reveal] = sample_tokens(mask_logits[reveal], uniform=uniform, **sampling)[1]
                block[mask_index] = x0
                i += 1
                continue
            if temperature > 0:
                uniform = draws.token(step, start, stop, batch, device)[mask_index]
            confidence, x0 = sample_tokens(mask_logits, uniform=uniform,
                                           margin_confidence=alg == "topk_margin",
                                           neg_entropy=alg == "entropy", **sampling)
            full_confidence = torch.full_like(block, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            candidate = torch.full_like(block, mask_token_id)  # mask id off the mask: the quirk
            candidate[mask_index] = x0
            if adaptive:
                for j in range(batch):
                    if threshold is not None:
                        chosen = threshold_transfer_row(full_confidence[j], threshold)
                    else:
                        chosen = factor_transfer_row(full_confidence[j], factor)
                    block[j, chosen] = candidate[j, chosen]
            else:
                n = transfer_count(mask_index, t, s, last)
                if n > 0:
                    if alg_temp is None or alg_temp == 0:
                        chosen = top_positions(full_confidence, n)
                    else:
                        weights = F.softmax(full_confidence / alg_temp, dim=-1)
                        chosen = sample_positions(weights, n, draws.position(
                            step, start, stop, batch, device))
                    block.scatter_(1, chosen, candidate.gather(1, chosen))
            i += 1
    return x
