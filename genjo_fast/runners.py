"""Model runners: the engine's first stage, "logits of the rows sampled at this step".

A runner is called as ``runner(x, start, stop, full)`` and returns ``(logits, un_logits)``,
each ``(B, stop - start, V)``: the predictions for positions ``[start, stop)`` of ``x``
(``un_logits`` is the unconditional half with classifier-free guidance, else ``None``).
``full`` asks a cached runner for a full forward that refreshes its cache
(:class:`genjo_fast.cache.CachedBlockLogits`); :class:`FullForward` always runs the whole
sequence.

Families differ here in two ways only: whether the prediction for position ``i`` is the
model's output at ``i`` (LLaDA) or at ``i - 1`` (Dream: ``shift=1``), and how the model is
called (the keyword arguments built once per call, e.g. Dream's position ids).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .contract import accepts_logits_slice, call_model
from .stopping import Compaction, take_rows
from .validation import check_vocab_size


class FullForward:
    """Runs the model over the whole sequence and returns the logits of the sampled rows.

    With CFG the conditional and the unconditional sequences (prompt positions masked) run as
    one ``2B`` batch, as in the reference; the halves are returned separately so that the
    sampler can combine them chunk by chunk.

    Args:
        model: called as ``model(x, attention_mask=attention_mask, **model_kwargs)``; when its
            forward takes ``logits_slice``, only the needed rows are asked for.
        attention_mask: ``(B, L)`` 0/1 (or whatever the family passes), or ``None``.
        prompt_index: bool ``(B, L)``, the positions masked in the unconditional copy.
        cfg_scale: 0 disables guidance.
        mask_id: the mask token id.
        shift: the prediction for position ``i`` is the model's output at ``i - shift``.
        model_kwargs: extra keyword arguments of every model call (e.g. ``position_ids``),
            already doubled for CFG by the caller when they have a batch dimension.
        token_ids: ``{name: id}`` of the special ids in use besides ``mask_id``; all are checked
            against the logits' vocabulary at the first call.
    """

    def __init__(self, model, attention_mask: Optional[torch.Tensor],
                 prompt_index: torch.Tensor, cfg_scale: float, mask_id: int, *, shift: int = 0,
                 model_kwargs: Optional[dict] = None, token_ids: Optional[dict] = None):
        self.model = model
        self.trims = accepts_logits_slice(model)
        self.cfg = cfg_scale > 0
        self.prompt_index = prompt_index
        self.mask_id = mask_id
        self.shift = shift
        self.model_kwargs = dict(model_kwargs or {})
        self.attention_mask = attention_mask
        if self.cfg and attention_mask is not None:
            self.attention_mask = torch.cat([attention_mask, attention_mask], dim=0)
        self.token_ids = dict(token_ids or {})
        self.vocab_checked = False

    def __call__(self, x: torch.Tensor, start: int, stop: int,
                 full: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch = x.shape[0]
        if self.cfg:
            x = torch.cat([x, x.masked_fill(self.prompt_index, self.mask_id)], dim=0)
        # Model rows [a, b) give the predictions for positions [start, stop).
        a, b = start - self.shift, stop - self.shift
        kwargs = dict(self.model_kwargs)
        if self.trims:
            kwargs["logits_slice"] = slice(a, b)
        logits = call_model(self.model, x, self.attention_mask, **kwargs)
        if not self.trims:
            logits = logits[:, a:b]
        self.check_vocab(logits)
        if self.cfg:
            return logits[:batch], logits[batch:]
        return logits, None

    def compact(self, compaction: Compaction) -> None:
        """Keeps the per-row inputs of the rows that go on (stopping at EOS)."""
        model_rows = compaction.model_rows(self.cfg)  # the model's batch: doubled with CFG
        self.prompt_index = take_rows(self.prompt_index, compaction.keep)
        self.attention_mask = take_rows(self.attention_mask, model_rows)
        self.model_kwargs = {name: take_rows(value, model_rows)
                             for name, value in self.model_kwargs.items()}

    def check_vocab(self, logits: torch.Tensor) -> None:
        """At the first call: the special ids must index the logits' vocabulary."""
        if not self.vocab_checked:
            check_vocab_size(logits.shape[-1], self.mask_id, self.token_ids,
                             "the logits' last dim")
            self.vocab_checked = True
