"""Plain-PyTorch statement of the masked-LM family's samplers: the test oracle.

It follows ``docs/semantics.md`` ("Masked LMs") step by step with no attempt at speed: every
step runs the model over the whole canvas, builds the full ``(B, L, V)`` probabilities, draws a
token for every position of every row and decides each row's positions in a Python loop. The
upstream loop (JorgeVanco/diffusionGPT's ``TextDiffusionPipeline``) is batch 1; a row here is
one upstream call. Its departures from upstream, each stated in the document:

* the token sample is a Gumbel-max over the logits in float64 with one uniform per logit from a
  :class:`~genjo_fast.mdlm_contract.MDLMDraws` source (the same distribution as upstream's
  ``Categorical(softmax(logits))``, without its float32 rounding of the probabilities), so that
  a test can hand the statement and the fast path the same draws;
* ties in confidence go to the lowest position;
* prompt positions are never written, whatever they hold; in semi-autoregressive generation
  the context tokens before the block are never written either;
* an optional temperature (upstream has none; DiffuLLaMA's ``logits_temp``) and top-p filter
  (DiffuLLaMA's ``topp_temp``), and the opt-in approximate ``adaptive_length`` mode.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .answer_length import plain_cut_at_eos
from .contract import call_model
from .mdlm_contract import (MDLMDraws, TorchMDLMDraws, edit_probability, model_call_kwargs,
                            num_to_unmask, open_positions, unmask_probability, visible_positions)
from .reference import topk_lowest_position
from .reference_dream import top_p_logits


def model_logits(model, x: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 shift: int) -> torch.Tensor:
    """The predictions for every position of ``x`` (int64 ``(B, L)``): the model's logits
    ``(B, L, V)``, read one position earlier when ``shift`` is 1 (the first position keeps its
    own row). A causal LM runs with full attention."""
    logits = call_model(model, x.contiguous(), attention_mask, **model_call_kwargs(model))
    if shift:
        logits = torch.cat([logits[:, :shift], logits[:, :-shift]], dim=1)
    return logits


def sample_tokens(logits: torch.Tensor, uniform: Optional[torch.Tensor], mask_id: int,
                  temperature: float, top_p: Optional[float] = None):
    """A token per position and its probability.

    The mask token's logit is set to the dtype's minimum, the logits divided by the
    temperature (when it is neither 0 nor 1), then, when ``top_p < 1``, DiffuLLaMA's nucleus
    filter (:func:`genjo_fast.reference_dream.top_p_logits`: the ids beyond the smallest
    most-probable set whose mass exceeds ``top_p`` get the dtype's minimum); ``probs =
    softmax`` in the logits' dtype; the token is the argmax of ``logits - log(-log(u))`` in
    float64 (a sample of ``probs``), or of the logits at temperature 0; its probability is
    read from ``probs``.

    Args:
        logits: ``(..., V)``; uniform: float64 ``(..., V)`` draws (unused at temperature 0).
        top_p: the filter's mass; ``None`` or ``>= 1``: off.
    Returns:
        ``x0`` int64 ``(...)``, ``p`` ``(...)`` in the logits' dtype, ``probs`` ``(..., V)``.
    """
    logits = logits.clone()
    logits[..., mask_id] = torch.finfo(logits.dtype).min
    if temperature not in (0, 1):
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    if temperature == 0:
        x0 = torch.argmax(logits, dim=-1)
    else:
        x0 = torch.argmax(logits.double() - torch.log(-torch.log(uniform)), dim=-1)
    return x0, torch.gather(probs, -1, x0[..., None]).squeeze(-1), probs


def denoise_step(model, x: torch.Tensor, region: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], step: int, num_steps: int, *,
                 global_step: int, batch_index: torch.Tensor, allow_edits: bool,
                 use_confidence: bool, mask_id: int, pad_id: Optional[int],
                 eos_id: Optional[int], shift: int, temperature: float,
                 draws: MDLMDraws, top_p: Optional[float] = None) -> torch.Tensor:
    """One step of the upstream loop on the canvas ``x`` (int64 ``(B, L)``, updated in place).

    Args:
        region: bool ``(B, L)``, the generated positions (the only ones ever written).
        step: the step within the ``num_steps`` of this canvas (it sets the schedules);
            ``global_step`` indexes the draws. ``batch_index``: int64 ``(B,)``, the rows'
            indices in the caller's batch (indexes the draws).
    Returns:
        the step's probabilities ``(B, L, V)``.
    """
    batch, length = x.shape
    logits = model_logits(model, x, attention_mask, shift)
    vocab = logits.shape[-1]
    rows = batch_index.repeat_interleave(length)
    positions = torch.arange(length, device=x.device).repeat(batch)
    uniform = draws.token(global_step, rows, positions, vocab, x.device).view(batch, length,
                                                                              vocab)
    sampled, confidence, probs = sample_tokens(logits, uniform, mask_id, temperature, top_p)

    opened = open_positions(x, region, mask_id, pad_id)
    p_unmask = unmask_probability(step, num_steps)
    if use_confidence:
        unmask = torch.zeros_like(opened)
        counts = num_to_unmask(opened.sum(1), step, num_steps)
        for b in range(batch):
            scores = confidence[b].masked_fill(~opened[b], -torch.inf)
            unmask[b, topk_lowest_position(scores, int(counts[b]))] = True
    else:
        unmask = opened & (draws.unmask(global_step, batch_index, 0, length, x.device) < p_unmask)
    update = unmask
    if allow_edits:
        edit = draws.edit(global_step, batch_index, 0, length, x.device) < edit_probability(
            step, num_steps)
        update = update | (edit & visible_positions(x, region, mask_id, pad_id, eos_id))
    x[update] = sampled[update]
    return probs


def canvas(prompts: Sequence[torch.Tensor], length: int, mask_id: int):
    """Each prompt followed by masks up to ``length``: int64 ``(B, length)`` and the bool
    ``(B, length)`` generated region."""
    x = torch.full((len(prompts), length), mask_id, dtype=torch.long,
                   device=prompts[0].device)
    region = torch.ones_like(x, dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        x[b, :len(prompt)] = prompt
        region[b, :len(prompt)] = False
    return x, region


@torch.no_grad()
def generate(model, prompts: Sequence[torch.Tensor], *, max_length: int, num_steps: int = 50,
             allow_edits: bool = True, use_confidence: bool = False, mask_id: int,
             pad_id: Optional[int] = None, eos_id: Optional[int] = None, shift: int = 0,
             temperature: float = 1.0, top_p: Optional[float] = None,
             adaptive_length: bool = False, length_threshold: float = 0.5,
             draws: Optional[MDLMDraws] = None) -> torch.Tensor:
    """The upstream pipeline call for each prompt: prompt + masks up to ``max_length``,
    ``num_steps`` steps (:func:`denoise_step`).

    ``adaptive_length`` (APPROXIMATE): after step 0, in each row the first generated position
    whose EOS probability at step 0 is ``>= length_threshold`` becomes EOS, every position
    after it pad (EOS when there is no pad id), and those positions leave the canvas: later
    steps run the model on the first ``max(lengths)`` columns, the shorter rows' tails masked
    out of the attention.

    Args:
        prompts: int64 1-D tensors (any lengths, none containing ``mask_id``).
    Returns:
        int64 ``(B, max_length)``.
    """
    draws = draws if draws is not None else TorchMDLMDraws()
    x, region = canvas(prompts, max_length, mask_id)
    batch_index = torch.arange(len(prompts), device=x.device)
    width, attention_mask = max_length, None
    for step in range(num_steps):
        probs = denoise_step(model, x[:, :width], region[:, :width], attention_mask, step,
                             num_steps, global_step=step, batch_index=batch_index,
                             allow_edits=allow_edits, use_confidence=use_confidence,
                             mask_id=mask_id, pad_id=pad_id, eos_id=eos_id, shift=shift,
                             temperature=temperature, top_p=top_p, draws=draws)
        if adaptive_length and step == 0:
            lengths = plain_cut_at_eos(x, region, probs[:, :, eos_id], length_threshold,
                                       eos_id=eos_id, pad_id=pad_id)
            width = max(lengths)
            if min(lengths) < width:
                attention_mask = (torch.arange(width, device=x.device)[None, :]
                                  < torch.tensor(lengths, device=x.device)[:, None]).long()
    return x


@torch.no_grad()
def semi_autoregressive_generate(model, prompts: Sequence[torch.Tensor], *, block_size: int,
                                 max_length: int, context_window: int, num_steps: int = 50,
                                 allow_edits: bool = True, use_confidence: bool = False,
                                 mask_id: int, pad_id: Optional[int] = None,
                                 eos_id: Optional[int] = None, shift: int = 0,
                                 temperature: float = 1.0, top_p: Optional[float] = None,
                                 stop_id: Optional[int] = None,
                                 draws: Optional[MDLMDraws] = None) -> List[torch.Tensor]:
    """Upstream's block-by-block generation beyond the context window, one prompt at a time.

    While a sequence is shorter than ``max_length``: a block of ``n = min(block_size,
    max_length - len)`` masks is appended to the last ``context_window - n`` tokens, the
    window is denoised for ``num_steps`` steps (only the block is written) and the block is
    appended to the sequence; a block holding ``stop_id`` is cut before its first occurrence
    and ends the sequence. Block ``j`` draws at global steps ``j * num_steps + step``, at
    positions within its window.

    Returns:
        one int64 1-D tensor per prompt: the prompt followed by the generated tokens.
    """
    draws = draws if draws is not None else TorchMDLMDraws()
    results = []
    for b, prompt in enumerate(prompts):
        sequence = prompt.clone()
        block = 0
        while len(sequence) < max_length:
            n = min(block_size, max_length - len(sequence))
            context = sequence[max(0, len(sequence) - (context_window - n)):]
            x, region = canvas([context], len(context) + n, mask_id)
            for step in range(num_steps):
                denoise_step(model, x, region, None, step, num_steps,
                             global_step=block * num_steps + step,
                             batch_index=torch.tensor([b], device=x.device),
                             allow_edits=allow_edits, use_confidence=use_confidence,
                             mask_id=mask_id, pad_id=pad_id, eos_id=eos_id, shift=shift,
                             temperature=temperature, top_p=top_p, draws=draws)
            new = x[0, len(context):]
            if stop_id is not None and bool((new == stop_id).any()):
                sequence = torch.cat([sequence, new[:int((new == stop_id).nonzero()[0])]])
                break
            sequence = torch.cat([sequence, new])
            block += 1
        results.append(sequence)
    return results
