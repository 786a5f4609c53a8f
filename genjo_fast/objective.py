"""The masked-diffusion (MDLM) training objective, as LLaDA states it.

Plain-torch statement of LLaDA's losses (its guidelines' pre-training and SFT code, written
here in genjo_fast's own words). For a batch of token ids ``x`` ``(B, L)``:

1. Forward process. Per row ``t ~ U(0, 1)`` (``torch.rand(B)``), mask probability
   ``p = (1 - eps) * t + eps`` (``eps = 1e-3``: never exactly 0); then per position
   ``u ~ U(0, 1)`` (``torch.rand(B, L)``, drawn after ``t`` from the same generator) and the
   position is masked when ``u < p`` and it may be masked. The noisy input holds the mask id
   at masked positions and ``x`` elsewhere.
2. Per masked position, the cross-entropy of the model's logits at that position (given the
   noisy input) against the clean token, divided by the row's ``p``.
3. Normalisation:

   * pre-training (:func:`pretraining_loss`): every position may be masked; the sum over
     masked positions divided by ``B * L`` (the number of tokens). With an attention mask,
     padded positions are never masked and the divisor counts real tokens only.
   * SFT (:func:`sft_loss`): the prompt (positions ``< prompt_lengths[b]``, left padding
     included) is never masked; the answer is padded with EOS to a fixed length, padding
     included in the loss; each row's sum is divided by its answer length
     ``L - prompt_lengths[b]``, and the rows' results are averaged (divided by ``B``).

In expectation over the masks, ``B * L`` times the pre-training loss (per row: the answer
length times the SFT loss) is the negative of the ELBO that
:func:`genjo_fast.get_log_likelihood` estimates with its mask counts ``k ~ U{1..l}`` (the two
estimators agree up to ``eps``: ``E_t[1/t * sum_masked CE] = sum_k E_k[sum_masked CE] / k``).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

#: LLaDA's lower bound on the mask probability.
EPS = 1e-3


def forward_process(input_ids: torch.Tensor, maskable: torch.Tensor, mask_id: int,
                    eps: float = EPS, generator: Optional[torch.Generator] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaDA's noising: masks each maskable position with the row's probability ``p``.

    Args:
        input_ids: int64 ``(B, L)`` clean tokens.
        maskable: bool ``(B, L)``, the positions that may be masked.
        mask_id: the mask token's id.
        eps: lower bound of ``p``, in ``[0, 1)``.
        generator: source of ``t`` (``torch.rand(B)``) then ``u`` (``torch.rand(B, L)``), on
            ``input_ids``' device.
    Returns:
        ``(noisy, masked, p_mask)``: int64 ``(B, L)`` input with the mask id where masked,
        bool ``(B, L)`` masked positions, float32 ``(B,)`` mask probability per row.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L); got {tuple(input_ids.shape)}")
    if maskable.shape != input_ids.shape or maskable.dtype != torch.bool:
        raise ValueError(f"maskable must be a bool tensor of input_ids' shape "
                         f"{tuple(input_ids.shape)}; got {maskable.dtype} "
                         f"{tuple(maskable.shape)}")
    if not 0 <= eps < 1:
        raise ValueError(f"eps must lie in [0, 1), got {eps!r}")
    batch, length = input_ids.shape
    device = input_ids.device
    t = torch.rand(batch, generator=generator, device=device)
    p_mask = (1 - eps) * t + eps
    u = torch.rand(batch, length, generator=generator, device=device)
    masked = (u < p_mask[:, None]) & maskable
    return torch.where(masked, mask_id, input_ids), masked, p_mask


def masked_logits(model, noisy: torch.Tensor, masked: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model's logits at the masked positions, in row-major order.

    genjo_fast's LLaDA model (anything with ``forward_hidden`` and ``lm_head``) runs the final
    norm and the LM head on the masked rows only; any other model is called as
    ``model(noisy, attention_mask=...)`` and its ``.logits`` (or the tensor) are indexed.

    Returns:
        ``(N, V)`` in the model's dtype, ``N = masked.sum()``.
    """
    if callable(getattr(model, "forward_hidden", None)) and callable(
            getattr(model, "lm_head", None)):
        return model.lm_head(model.forward_hidden(noisy, attention_mask)[masked])
    out = model(noisy, attention_mask=attention_mask)
    return getattr(out, "logits", out)[masked]


def _weighted_ce(model, input_ids, noisy, masked, attention_mask, weight) -> torch.Tensor:
    """``sum over masked positions of CE * weight[row]`` (float32 scalar)."""
    logits = masked_logits(model, noisy, masked, attention_mask)
    ce = F.cross_entropy(logits.float(), input_ids[masked], reduction="none")
    rows = masked.nonzero()[:, 0]
    return (ce * weight[rows]).sum()


def _key_mask(attention_mask: Optional[torch.Tensor], input_ids: torch.Tensor
              ) -> Optional[torch.Tensor]:
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match "
                         f"input_ids {tuple(input_ids.shape)}")
    return attention_mask.to(device=input_ids.device, dtype=torch.bool)


def pretraining_loss(model, input_ids: torch.Tensor, mask_id: int,
                     attention_mask: Optional[torch.Tensor] = None, eps: float = EPS,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """LLaDA's pre-training loss on one batch (see the module docstring).

    Args:
        model: a mask predictor (genjo_fast's ``LLaDAModel`` or any
            ``model(x, attention_mask=...)`` returning ``.logits`` ``(B, L, V)``).
        input_ids: int64 ``(B, L)`` clean tokens (none equal to ``mask_id``).
        mask_id: the mask token's id.
        attention_mask: ``(B, L)`` 0/1, 0 on padding (never masked, not counted), or ``None``.
        eps, generator: see :func:`forward_process`.
    Returns:
        float32 scalar: ``sum over masked positions of CE / p`` divided by the number of real
        tokens (``B * L`` without padding).
    """
    key_mask = _key_mask(attention_mask, input_ids)
    maskable = torch.ones_like(input_ids, dtype=torch.bool) if key_mask is None else key_mask
    noisy, masked, p_mask = forward_process(input_ids, maskable, mask_id, eps, generator)
    total = _weighted_ce(model, input_ids, noisy, masked, key_mask, 1.0 / p_mask)
    return total / maskable.sum().clamp(min=1)


def sft_loss(model, input_ids: torch.Tensor, prompt_lengths: Union[torch.Tensor, int],
             mask_id: int, attention_mask: Optional[torch.Tensor] = None, eps: float = EPS,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """LLaDA's SFT loss on one batch (see the module docstring).

    Args:
        model: as in :func:`pretraining_loss`.
        input_ids: int64 ``(B, L)``: prompt, then the answer padded with EOS to a fixed
            length (LLaDA-Instruct's layout; prompts may be left-padded).
        prompt_lengths: int ``(B,)`` (or one int for every row): positions before it are the
            prompt, left padding included, and are never masked. Each must be ``< L``.
        mask_id: the mask token's id.
        attention_mask: ``(B, L)`` 0/1, 0 on (left) padding inside the prompt, or ``None``.
        eps, generator: see :func:`forward_process`.
    Returns:
        float32 scalar: the mean over rows of ``sum over masked answer positions of CE / p``
        divided by the row's answer length ``L - prompt_lengths[b]``.
    """
    batch, length = input_ids.shape
    prompt_lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).expand(batch)
    if prompt_lengths.dtype.is_floating_point or bool(((prompt_lengths < 0)
                                                       | (prompt_lengths >= length)).any()):
        raise ValueError(f"prompt_lengths must be ints in [0, {length}) (an answer of at least "
                         f"one token), got {prompt_lengths.tolist()}")
    key_mask = _key_mask(attention_mask, input_ids)
    positions = torch.arange(length, device=input_ids.device)
    maskable = positions[None, :] >= prompt_lengths[:, None]
    noisy, masked, p_mask = forward_process(input_ids, maskable, mask_id, eps, generator)
    answer_lengths = (length - prompt_lengths).float()
    total = _weighted_ce(model, input_ids, noisy, masked, key_mask, 1.0 / (p_mask * answer_lengths))
    return total / batch


__all__ = ["EPS", "forward_process", "masked_logits", "pretraining_loss", "sft_loss"]
