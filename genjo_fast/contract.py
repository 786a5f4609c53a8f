"""The model contract: what every sampler (fast path and plain statements) assumes of a model.

One home for the facts both sides share, so that neither imports the other:

* the families' special token ids (:data:`LLADA`, :data:`DREAM`);
* the canvas: prompt followed by masks (:func:`init_sequence`);
* calling the model and checking what it returns (:func:`model_logits`, :func:`call_model`);
* classifier-free guidance (:func:`combine_cfg`), the one statement of its formula;
* what can be read off a model object (:func:`accepts_logits_slice`, :func:`model_device`,
  :func:`model_vocab_size`).

The semantics the samplers honour are stated in ``docs/semantics.md``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class SpecialIds:
    """A family's special token ids (defaults of its samplers; checkpoints may differ)."""
    mask: int
    eos: int
    eot: Optional[int] = None


#: LLaDA-8B: mask 126336, ``<|endoftext|>`` 126081 (also the padding), ``<|eot_id|>`` 126348.
LLADA = SpecialIds(mask=126336, eos=126081, eot=126348)
#: Dream-7B: mask 151666, ``<|endoftext|>`` 151643 (also the padding), ``<|im_end|>`` 151645
#: (the end of a turn in its chat template, Qwen2.5's tokenizer).
DREAM = SpecialIds(mask=151666, eos=151643, eot=151645)

MASK_ID, EOS_ID, EOT_ID = LLADA.mask, LLADA.eos, LLADA.eot


def init_sequence(prompt: torch.Tensor, attention_mask: Optional[torch.Tensor], gen_length: int,
                  mask_id: int, device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The canvas: ``x`` = the prompt followed by ``gen_length`` masks.

    Args:
        prompt: integer ``(B, Lp)``, left-padded.
        attention_mask: ``(B, Lp)`` of 0/1, or ``None``.
    Returns:
        ``x``: int64 ``(B, Lp + gen_length)`` on ``device``; the attention mask, if any,
        extended with ones over the generated positions, ``(B, Lp + gen_length)``.
    """
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        attention_mask = torch.cat(
            [attention_mask, attention_mask.new_ones((batch, gen_length))], dim=-1)
    return x, attention_mask


def logits_of(out, batch: int, rows: int) -> torch.Tensor:
    """The logits in a model's output, checked: ``out.logits`` or the tensor itself, of shape
    ``(batch, rows, V)``; anything else is a ``TypeError``/``ValueError`` that says what was
    expected (a tuple, a 2-D tensor, the wrong number of rows)."""
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}; expected an object with a "
                        f".logits tensor (batch, length, vocab_size) or that tensor itself "
                        f"(a transformers model called with return_dict=True does this)")
    if logits.dim() != 3 or logits.shape[:2] != (batch, rows):
        raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; expected "
                         f"({batch}, {rows}, vocab_size)")
    return logits


def call_model(model, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               **kwargs) -> torch.Tensor:
    """Runs ``model(x, attention_mask=..., **kwargs)`` and returns its checked logits
    ``(B, L, V)`` (``(B, len(logits_slice), V)`` when a ``logits_slice`` is passed)."""
    out = model(x, attention_mask=attention_mask, **kwargs)
    rows = x.shape[1]
    if "logits_slice" in kwargs:
        rows = len(range(*kwargs["logits_slice"].indices(x.shape[1])))
    return logits_of(out, x.shape[0], rows)


def model_logits(model, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The logits ``(B, L, V)`` of every position of ``x`` (what the plain statements use)."""
    return call_model(model, x, attention_mask)


def combine_cfg(logits: torch.Tensor, un_logits: Optional[torch.Tensor],
                cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance as the reference computes it, in the logits' dtype:
    ``un + (cfg_scale + 1) * (cond - un)``. ``un_logits=None`` returns ``logits``."""
    if un_logits is None:
        return logits
    return un_logits + (cfg_scale + 1) * (logits - un_logits)


def accepts_logits_slice(model) -> bool:
    """True when ``model``'s forward takes ``logits_slice=`` (logits for chosen rows only)."""
    forward = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        return "logits_slice" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def model_device(model, fallback: torch.device) -> torch.device:
    """The device the model computes on: ``model.device``, else its first parameter's, else
    ``fallback``."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            return param.device
    return fallback


def model_vocab_size(model) -> Optional[int]:
    """``model.config.vocab_size``, else the input embedding's size, else ``None``."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    return getattr(embeddings, "num_embeddings", None)
