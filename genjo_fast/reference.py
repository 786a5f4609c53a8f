"""Plain-PyTorch statement of the reference LLaDA sampler: the test oracle and the fallback.

This module follows the reference semantics of ``docs/semantics.md`` step by step, quirks
included, with no attempt at speed: every step runs the model over the whole sequence, noises
the full ``(B, L, V)`` logits in float64 and picks the transfer with a per-row ``topk``. The
only departures from the reference are the ones that make it a usable oracle:

* classifier-free guidance works without an ``attention_mask`` (the reference crashes there);
* ties in confidence go to the lowest position on every device (what ``torch.topk`` does on
  CUDA; on CPU its tie order is unspecified, so the oracle sorts stably instead);
* the random numbers come from a :class:`~genjo_fast.draws.Draws` source, so tests can hand
  the oracle and genjo_fast the same draws;
* the special token ids are keyword arguments instead of constants;
* ``constraints`` (genjo_fast's, from the reference's Gradio app): tokens placed at answer
  positions before the first step (:mod:`genjo_fast.constraints`); they are not masks, so no
  step writes them, the block's mask count leaves them out and CFG's unconditional copy masks
  them with the prompt;
* ``adaptive_length`` (APPROXIMATE, opt-in, genjo_fast's): the answer's end decided once,
  after the first step that transfers a token (:mod:`genjo_fast.answer_length`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .answer_length import eos_probability, plain_cut_at_eos, plain_open_tail
from .constraints import place_constraints, resolve_constraints
from .contract import EOS_ID, EOT_ID, MASK_ID, combine_cfg, init_sequence, model_logits
from .draws import Draws, TorchDraws


def get_num_transfer_tokens(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to unmask per step: ``n // steps`` each, one more in the first ``n % steps``.

    Args:
        block_mask_index: bool ``(B, block_length)``, True where the block is masked.
    Returns:
        int64 ``(B, steps)``.
    """
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    step_ids = torch.arange(steps, device=block_mask_index.device)
    return base + (step_ids[None, :] < remainder).long()


def topk_lowest_position(confidence: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values of a 1-D tensor, equal values by lowest position."""
    order = torch.sort(confidence, descending=True, stable=True).indices
    return order[:k]


def threshold_transfer_row(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Threshold decoding for one row (Fast-dLLM): the most confident position, plus every
    other one whose confidence is >= threshold. ``-inf`` entries are never chosen.
    Returns the chosen indices."""
    order = topk_lowest_position(confidence, int((confidence > -torch.inf).sum()))
    return torch.stack([i for n, i in enumerate(order) if n == 0 or confidence[i] >= threshold]
                       ) if len(order) else order


def factor_transfer_row(confidence: torch.Tensor, factor: float) -> torch.Tensor:
    """Factor decoding for one row (Fast-dLLM): with the confidences sorted in decreasing
    order, the largest prefix of n >= 1 positions whose n-th confidence is
    >= 1 - factor / (n + 1). ``-inf`` entries are never chosen. Returns the chosen indices."""
    order = topk_lowest_position(confidence, int((confidence > -torch.inf).sum()))
    # The thresholds as a float32 tensor (1-based n: 1 - factor / (n + 1)); a bf16/fp16
    # confidence is compared with them in float32.
    thresholds = 1 - factor / (torch.arange(len(order), device=confidence.device) + 2)
    n = 0
    while n < len(order) and (n == 0 or confidence[order[n]] >= thresholds[n]):
        n += 1
    return order[:n]


def add_gumbel_noise(logits: torch.Tensor, temperature: float, uniform) -> torch.Tensor:
    """The reference's Gumbel-max perturbation, in float64.

    Temperature 0 returns ``logits`` itself (the same tensor object, as the reference does).
    Otherwise ``exp(logits) / (-log(u)) ** temperature`` with ``u = uniform()``, whose argmax is
    that of ``logits / temperature + Gumbel noise``.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    gumbel_noise = (-torch.log(uniform())) ** temperature
    return logits.exp() / gumbel_noise


def sample_step(logits, temperature, remasking, logits_eos_inf, confidence_eos_eot_inf,
                eos_id, eot_id, gumbel, remask):
    """One step's choice and confidence, as the reference computes them.

    Args:
        logits: ``(B, N, V)`` (modified in place by the EOS options, as in the reference).
        gumbel, remask: zero-argument callables returning the uniform draws for these rows:
            float64 ``(B, N, V)`` and float32 ``(B, N)``.
    Returns:
        ``x0`` int64 ``(B, N)`` and its confidence ``(B, N)``.
    """
    if logits_eos_inf:
        logits[:, :, eos_id] = -torch.inf

    logits_with_noise = add_gumbel_noise(logits, temperature, gumbel)
    x0 = torch.argmax(logits_with_noise, dim=-1)

    if confidence_eos_eot_inf:
        # After x0 was chosen. At temperature 0 the two names are one tensor, so both ids
        # leave the softmax; at temperature > 0 only the EoT id does.
        logits_with_noise[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf

    if remasking == 'low_confidence':
        p = F.softmax(logits, dim=-1)  # in the logits' dtype
        x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
    elif remasking == 'random':
        x0_p = remask()
    else:
        raise NotImplementedError(remasking)
    return x0, x0_p


@torch.no_grad()
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128,
             temperature=0., cfg_scale=0., remasking='low_confidence', mask_id=MASK_ID,
             logits_eos_inf=False, confidence_eos_eot_inf=False, *,
             eos_id: int = EOS_ID, eot_id: int = EOT_ID,
             draws: Optional[Draws] = None, constraints=None, adaptive_length: bool = False,
             length_threshold: float = 0.5) -> torch.Tensor:
    """Reference masked-diffusion sampling (plain PyTorch, slow).

    Args:
        model: callable as ``model(x, attention_mask=...)`` returning ``.logits`` (B, L, V).
        prompt: int64 ``(B, Lp)``, left-padded.
        attention_mask: ``(B, Lp)`` of 0/1 or ``None``.
        draws: source of uniform draws; default ``torch.rand`` on the global RNG.
        constraints: ``{answer position: id or list of ids}``, placed before the first step
            (:func:`genjo_fast.constraints.resolve_constraints`).
        adaptive_length: APPROXIMATE. After the first step whose schedule transfers a token,
            each row's answer ends at the first position whose EOS probability at that step
            (:func:`~genjo_fast.answer_length.eos_probability`) is ``>= length_threshold``
            and from which on the row holds only masks and EOS
            (:func:`~genjo_fast.answer_length.plain_open_tail`); it and every later position
            become ``eos_id``. Later steps run the model on the first ``width`` columns (the
            longest row's end), the shorter rows' tails masked out of the attention; the rest
            of the current block shares out the masks it has left over its steps left, and
            later blocks count their masks as always.
    Returns:
        int64 ``(B, Lp + gen_length)``: the prompt followed by the generated tokens.
    """
    draws = draws if draws is not None else TorchDraws()
    device = prompt.device
    batch, prompt_len = prompt.shape
    x, attention_mask = init_sequence(prompt, attention_mask, gen_length, mask_id, device)
    place_constraints(x, prompt_len, resolve_constraints(constraints, gen_length, mask_id))
    prompt_index = x != mask_id  # the prompt and the constraints: CFG's conditioning

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    seq_len = x.shape[1]
    key_mask, decided = attention_mask, not adaptive_length

    for num_block in range(num_blocks):
        block_start = prompt_len + num_block * block_length
        block_end = block_start + block_length
        block_mask_index = x[:, block_start:block_end] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps_per_block)
        for i in range(steps_per_block):
            step = num_block * steps_per_block + i
            xw = x[:, :seq_len]  # the canvas (adaptive_length may have cut it)
            mask_index = xw == mask_id
            if cfg_scale > 0.:
                un_x = xw.clone()
                un_x[prompt_index[:, :seq_len]] = mask_id
                x_ = torch.cat([xw, un_x], dim=0)
                mask_ = None if key_mask is None else torch.cat([key_mask] * 2, dim=0)
                logits = model_logits(model, x_, mask_)
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = combine_cfg(logits, un_logits, cfg_scale)
            else:
                logits = model_logits(model, xw, key_mask)
            probe = not decided and int(num_transfer_tokens[:, i].max()) > 0
            if probe:  # before sample_step, whose EOS options write into the logits
                eos_p = eos_probability(logits[:, prompt_len:], eos_id)

            vocab = logits.shape[-1]
            x0, x0_p = sample_step(
                logits, temperature, remasking, logits_eos_inf, confidence_eos_eot_inf, eos_id,
                eot_id, gumbel=lambda: draws.gumbel(step, 0, seq_len, batch, vocab, device),
                remask=lambda: draws.remask(step, 0, seq_len, batch, device))

            x0_p[:, block_end:] = -torch.inf
            x0 = torch.where(mask_index, x0, xw)
            confidence = torch.where(mask_index, x0_p, -torch.inf)

            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                select_index = topk_lowest_position(confidence[j], int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            xw[transfer_index] = x0[transfer_index]

            if probe:  # adaptive_length's cut
                answer = x[:, prompt_len:]
                lengths = plain_cut_at_eos(answer, plain_open_tail(answer, mask_id, eos_id), eos_p,
                                           length_threshold, eos_id=eos_id, pad_id=None)
                seq_len = prompt_len + max(lengths)
                if min(lengths) < max(lengths):
                    kept = (torch.arange(seq_len, device=device)[None, :]
                            < prompt_len + torch.tensor(lengths, device=device)[:, None]).long()
                    key_mask = kept if key_mask is None else key_mask[:, :seq_len] * kept
                elif key_mask is not None:
                    key_mask = key_mask[:, :seq_len]
                decided = True
                if i + 1 < steps_per_block:
                    num_transfer_tokens[:, i + 1:] = get_num_transfer_tokens(
                        x[:, block_start:block_end] == mask_id, steps_per_block - i - 1)

    return x


@torch.no_grad()
def generate_approximate(model, prompt, attention_mask=None, steps=128, gen_length=128,
                         block_length=128, temperature=0., cfg_scale=0.,
                         remasking='low_confidence', mask_id=MASK_ID, logits_eos_inf=False,
                         confidence_eos_eot_inf=False, *, cache=None, refresh_every=None,
                         threshold=None, factor=None, eos_id: int = EOS_ID, eot_id: int = EOT_ID,
                         draws: Optional[Draws] = None, constraints=None) -> torch.Tensor:
    """Fast-dLLM's approximate modes, stated plainly: the oracle of genjo_fast's cache.

    Works block by block on the rows of the current block (as in the exact sampler, nothing
    outside the block can be chosen):

    * ``cache=None``: every step runs the whole sequence.
    * ``cache="prefix"``: each block starts with one full forward, whose logits are the
      block's first step and whose per-layer K/V are kept. Later steps run the block and all
      later positions, attending to the kept K/V of the positions before the block
      (concatenated) and their own fresh K/V.
    * ``cache="dual"``: later steps run the block only; its fresh K/V replace the block's
      slots in the kept K/V, which serve for every other position.
    * ``refresh_every=N``: a full forward (and a fresh cache) also every N steps of a block.
    * ``threshold``/``factor``: instead of the fixed schedule, each step transfers per row the
      positions chosen by :func:`threshold_transfer_row` / :func:`factor_transfer_row`, until
      the row's block has no mask left (rows that finish stop changing). The step index of
      the draws then advances by ``block_length`` per block.

    Args:
        model: a genjo_fast :class:`~genjo_fast.models.LLaDAModel` (K/V through its
            ``forward_hidden(..., kv_hook=...)``, logits through ``lm_head``).
        The others (``constraints`` included): as :func:`generate`.
    Returns:
        int64 ``(B, Lp + gen_length)``.
    """
    draws = draws if draws is not None else TorchDraws()
    device = prompt.device
    batch, prompt_len = prompt.shape
    x, attention_mask = init_sequence(prompt, attention_mask, gen_length, mask_id, device)
    place_constraints(x, prompt_len, resolve_constraints(constraints, gen_length, mask_id))
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    adaptive = threshold is not None or factor is not None
    steps_per_block = block_length if adaptive else steps // num_blocks

    for num_block in range(num_blocks):
        start = prompt_len + num_block * block_length
        stop = start + block_length
        num_transfer_tokens = get_num_transfer_tokens(x[:, start:stop] == mask_id,
                                                      steps_per_block)
        kv = PlainKVCache(model, cache)
        i = 0
        while (x[:, start:stop] == mask_id).any() if adaptive else i < steps_per_block:
            step = num_block * steps_per_block + i
            x_, mask_ = x, attention_mask
            if cfg_scale > 0.:
                x_ = torch.cat([x, x.masked_fill(prompt_index, mask_id)], dim=0)
                mask_ = None if attention_mask is None else torch.cat([attention_mask] * 2, 0)

            if cache is None or i == 0 or (refresh_every is not None and i % refresh_every == 0):
                hidden = kv.full(x_, mask_)[:, start:stop]
            else:
                hidden = kv.rows(x_, mask_, start, stop)[:, :stop - start]
            logits = model.lm_head(hidden)  # (B or 2B, block_length, V)
            if cfg_scale > 0.:
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = combine_cfg(logits, un_logits, cfg_scale)

            vocab = logits.shape[-1]
            x0, x0_p = sample_step(
                logits, temperature, remasking, logits_eos_inf, confidence_eos_eot_inf, eos_id,
                eot_id, gumbel=lambda: draws.gumbel(step, start, stop, batch, vocab, device),
                remask=lambda: draws.remask(step, start, stop, batch, device))
            block = x[:, start:stop]
            mask_index = block == mask_id
            x0 = torch.where(mask_index, x0, block)
            confidence = torch.where(mask_index, x0_p, -torch.inf)

            for j in range(batch):
                if threshold is not None:
                    select_index = threshold_transfer_row(confidence[j], threshold)
                elif factor is not None:
                    select_index = factor_transfer_row(confidence[j], factor)
                else:
                    select_index = topk_lowest_position(confidence[j],
                                                        int(num_transfer_tokens[j, i]))
                block[j, select_index] = x0[j, select_index]
            i += 1
    return x


class PlainKVCache:
    """The approximate modes' cache, stated plainly: the per-layer K/V kept from the last full
    forward, concatenated around the fresh K/V of the rows that run.

    ``model`` is a genjo_fast model with ``forward_hidden(ids, key_mask, positions,
    kv_hook=...)`` (LLaDA or Dream); ``mode`` is ``"prefix"`` or ``"dual"``; ``positions``,
    when given, are the rows' RoPE positions ``(B, L)`` (Dream's, with padding).
    """

    def __init__(self, model, mode: Optional[str], positions: Optional[torch.Tensor] = None):
        self.model = model
        self.mode = mode
        self.positions = positions
        self.k = self.v = None

    def full(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Hidden states ``(B, L, d)`` of a full forward, whose K/V are kept."""
        kept = []

        def keep(layer, k, v):
            kept.append((k.contiguous(), v.contiguous()))
            return k, v

        hidden = self.model.forward_hidden(x, mask, self.positions, kv_hook=keep)
        self.k = [k for k, _ in kept]
        self.v = [v for _, v in kept]
        return hidden

    def rows(self, x: torch.Tensor, mask: Optional[torch.Tensor], a: int,
             stop: int) -> torch.Tensor:
        """Hidden states of the rows that run, ``[a, L)`` (``prefix``) or ``[a, stop)``
        (``dual``), attending to the kept K/V of the other positions; with ``dual`` the rows'
        fresh K/V replace their slots in the kept ones."""
        end = x.shape[1] if self.mode == "prefix" else stop

        def attend_cached(layer, k, v):
            keys = torch.cat([self.k[layer][:, :, :a], k, self.k[layer][:, :, end:]], dim=2)
            values = torch.cat([self.v[layer][:, :, :a], v, self.v[layer][:, :, end:]], dim=2)
            if self.mode == "dual":
                self.k[layer], self.v[layer] = keys, values
            return keys, values

        positions = (torch.arange(a, end, device=x.device) if self.positions is None
                     else self.positions[:, a:end])
        return self.model.forward_hidden(x[:, a:end], mask, positions, kv_hook=attend_cached)
