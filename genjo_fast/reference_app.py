"""Plain-PyTorch statement of the reference Gradio app's sampler: the oracle of
``generate(..., sampler="app")``.

The reference repository (ML-GSAI/LLaDA) samples in two places: ``generate.py``'s ``generate``
(stated in :mod:`genjo_fast.reference`, genjo_fast's default) and the web demo ``app.py``,
whose ``generate_response_with_visualization`` runs its own loop. This module states the
latter in genjo_fast's words, one function, step by step. The loop is ``generate.py``'s except
for these points (each marked ``[app]`` below, listed in ``docs/semantics.md``):

* **Constraints.** Before the first step, words pinned by the user are placed at answer
  positions (a word's token ids at ``pos, pos + 1, ...``); the positions that are not masks
  at that moment (prompt and constraints) are CFG's conditioning, masked in the unconditional
  copy. After every step the constraints are written again (a no-op here: no step writes a
  position that is not masked).
* **Any lengths.** ``block_length`` is cut to ``gen_length``; the number of blocks is
  ``ceil(gen_length / block_length)`` (the last block may be shorter) and every block gets
  ``max(1, steps // num_blocks)`` steps: nothing needs to divide anything.
* **Blocks with no mask** (in any row) are skipped, and a block's loop stops early when the
  whole canvas holds no mask.
* **Confidence** (``low_confidence``): ``softmax`` of the logits converted to FLOAT64 (not in
  the logits' dtype as ``generate.py`` does), read at ``x0``.
* **Selection inside the block.** Each row's top-k runs over the current block's positions
  only (``generate.py``'s runs over the whole row), and at a block's LAST step every position
  of the block that is still masked is revealed, whatever the schedule says.

The last two differ from ``generate.py``'s outcome only when the model's choice for a
position is the mask id itself (the position then stays masked: ``generate.py`` lets it
compete in later blocks, the app reveals it at the block's last step with that step's
choice) or, for the float64 confidence, when two confidences tie in the logits' dtype but not
in float64 (common in bf16).

Departures, to make it a usable oracle, as in :mod:`genjo_fast.reference`: a batch with left
padding and an ``attention_mask`` (the app runs one unpadded prompt and calls the model
without a mask); ties in confidence go to the lowest position on every device; the uniform
draws come from a :class:`~genjo_fast.draws.Draws` source; constraints are given as token ids
(``{position: id or list of ids}``, :mod:`genjo_fast.constraints`) rather than words, and
positions outside the answer or overlapping are errors (the app drops the first and lets a
later word overwrite an earlier one's tokens).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .constraints import place_constraints, resolve_constraints
from .contract import MASK_ID, combine_cfg, init_sequence, model_logits
from .draws import Draws, TorchDraws
from .reference import add_gumbel_noise, get_num_transfer_tokens, topk_lowest_position

__all__ = ["generate", "app_blocks"]


def app_blocks(gen_length: int, block_length: int, steps: int):
    """The app's blocks: ``(num_blocks, block_length, steps_per_block)`` after its
    adjustments (``block_length`` at most ``gen_length``, ``ceil`` blocks, at least one step
    per block)."""
    block_length = min(block_length, gen_length)
    num_blocks = -(-gen_length // block_length)
    return num_blocks, block_length, max(1, steps // num_blocks)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             steps: int = 32, gen_length: int = 64, block_length: int = 32,
             temperature: float = 0., cfg_scale: float = 0.,
             remasking: str = 'low_confidence', mask_id: int = MASK_ID, *,
             constraints=None, draws: Optional[Draws] = None) -> torch.Tensor:
    """The app's ``generate_response_with_visualization`` as a function of the model (plain
    PyTorch, slow; the visualisation left out). Defaults are the app's.

    Args:
        model: called as ``model(x, attention_mask=...)``, returning ``.logits`` ``(B, L, V)``.
        prompt: int64 ``(B, Lp)``, left-padded (the app: the chat-templated conversation).
        attention_mask: ``(B, Lp)`` 0/1 or ``None``.
        steps, gen_length, block_length: any positive ints (see the module docstring).
        temperature, cfg_scale, remasking, mask_id: as ``generate.py``'s.
        constraints: ``{answer position: id or list of ids}`` or ``None``.
        draws: the uniform draws (Gumbel noise over the whole row per step, ``random``
            remasking's float32 confidences), indexed by global step
            ``block * steps_per_block + i`` and absolute position; default ``torch.rand``.
    Returns:
        int64 ``(B, Lp + gen_length)``.
    """
    draws = draws if draws is not None else TorchDraws()
    device = prompt.device
    batch, prompt_len = prompt.shape
    x, attention_mask = init_sequence(prompt, attention_mask, gen_length, mask_id, device)
    resolved = resolve_constraints(constraints, gen_length, mask_id)
    place_constraints(x, prompt_len, resolved)  # [app] before the first step
    prompt_index = x != mask_id  # [app] computed after the constraints: they condition CFG
    seq_len = x.shape[1]
    num_blocks, block_length, steps_per_block = app_blocks(gen_length, block_length, steps)

    for num_block in range(num_blocks):
        block_start = prompt_len + num_block * block_length
        block_end = min(block_start + block_length, seq_len)  # [app] the last may be shorter
        block_mask_index = x[:, block_start:block_end] == mask_id
        if not block_mask_index.any():
            continue  # [app] nothing to reveal in this block
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps_per_block)
        for i in range(steps_per_block):
            step = num_block * steps_per_block + i
            mask_index = x == mask_id
            if not mask_index.any():
                break  # [app] the canvas is done
            if cfg_scale > 0.:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                mask_ = None if attention_mask is None else torch.cat([attention_mask] * 2, 0)
                logits, un_logits = torch.chunk(model_logits(model, x_, mask_), 2, dim=0)
                logits = combine_cfg(logits, un_logits, cfg_scale)
            else:
                logits = model_logits(model, x, attention_mask)

            vocab = logits.shape[-1]
            noised = add_gumbel_noise(
                logits, temperature,
                lambda: draws.gumbel(step, 0, seq_len, batch, vocab, device))
            x0 = torch.argmax(noised, dim=-1)
            if remasking == 'low_confidence':
                p = F.softmax(logits.to(torch.float64), dim=-1)  # [app] in float64
                x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
            elif remasking == 'random':
                x0_p = draws.remask(step, 0, seq_len, batch, device)
            else:
                raise NotImplementedError(remasking)

            x0_p[:, block_end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)

            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(batch):
                if i < steps_per_block - 1:
                    # [app] the top-k over the block's positions only
                    block_confidence = confidence[j, block_start:block_end]
                    k = min(int(num_transfer_tokens[j, i]), block_confidence.numel())
                    select_index = topk_lowest_position(block_confidence, k) + block_start
                    transfer_index[j, select_index] = True
                else:
                    # [app] the block's last step reveals every position still masked
                    transfer_index[j, block_start:block_end] = mask_index[j, block_start:block_end]
            x = torch.where(transfer_index, x0, x)
            place_constraints(x, prompt_len, resolved)  # [app] kept at every step (a no-op)
    return x
