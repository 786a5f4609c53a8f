"""Tiny random models for tests, the demo and CPU benchmarks (no downloads)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn


class TinyBidirectionalLM(nn.Module):
    """A small bidirectional (non-causal) transformer mask predictor with random weights.

    ``forward(input_ids, attention_mask=None, logits_slice=None)`` returns an object with
    ``.logits`` ``(B, L, V)``, or ``(B, len(logits_slice), V)`` when a ``slice`` of positions is
    given: the LM head then runs on those rows only, as genjo_fast's own models do.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                 max_len: int = 1024, seed: Optional[int] = 0, dtype=torch.float32):
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        # A larger spread than the default init gives peaked, tie-free distributions.
        nn.init.normal_(self.lm_head.weight, std=1.0 / d_model ** 0.5)
        self.to(dtype).eval()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                logits_slice: Optional[slice] = None):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embed(input_ids) + self.pos(positions)
        padding = None if attention_mask is None else attention_mask == 0
        h = self.norm(self.encoder(h, src_key_padding_mask=padding))
        if logits_slice is not None:
            h = h[:, logits_slice]
        return SimpleNamespace(logits=self.lm_head(h))


def random_llada(vocab_size: int = 126464, d_model: int = 64, n_heads: int = 4,
                 n_kv_heads: Optional[int] = None, n_layers: int = 2,
                 mlp_hidden_size: Optional[int] = None, max_len: int = 1024, seed: int = 0,
                 dtype=torch.float32, device="cpu", **config):
    """A :class:`~genjo_fast.models.LLaDAModel` with random weights (PyTorch's default init).

    The weights are created directly in ``dtype`` on ``device`` (built on the meta device
    first), so an LLaDA-8B-shaped model (``LLaDAConfig()``'s defaults: pass
    ``d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=12288``) needs only its bf16
    weights' memory.
    """
    from .models import LLaDAConfig, LLaDAModel
    from .models.llada import RMSNorm

    config = LLaDAConfig(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         n_layers=n_layers, mlp_hidden_size=mlp_hidden_size or 2 * d_model,
                         vocab_size=vocab_size, max_sequence_length=max_len, **config)
    with torch.device("meta"):
        model = LLaDAModel(config)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                module.reset_parameters()
    return model.requires_grad_(False).eval()


class FullLogitsOnly(nn.Module):
    """Hides ``logits_slice`` from a model: genjo_fast then treats it as a generic model that
    computes logits for every position (as HF models do)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids, attention_mask=attention_mask)


def random_prompts(batch: int, prompt_len: int, vocab_size: int, *, pad_id: int,
                   avoid: tuple = (), seed: int = 0, padded: bool = True):
    """Left-padded random prompts ``(B, Lp)`` int64 and their attention mask ``(B, Lp)``.

    Row ``j`` of a padded batch has ``j`` padding positions (capped at ``Lp - 1``). Ids in
    ``avoid`` (the mask id, say) never appear among the real tokens.
    """
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch, prompt_len), generator=g)
    for token in avoid:
        prompt[prompt == token] = (token + 1) % vocab_size
    attention_mask = torch.ones(batch, prompt_len, dtype=torch.long)
    if padded:
        for j in range(batch):
            pad = min(j, prompt_len - 1)
            prompt[j, :pad] = pad_id
            attention_mask[j, :pad] = 0
    return prompt, attention_mask
