"""Tiny random models for tests, the demo and CPU benchmarks (no downloads)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
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

    config = LLaDAConfig(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         n_layers=n_layers, mlp_hidden_size=mlp_hidden_size or 2 * d_model,
                         vocab_size=vocab_size, max_sequence_length=max_len, **config)
    return _random_weights(LLaDAModel, config, seed, dtype, device)


def _random_weights(model_class, config, seed: int, dtype, device,
                    reset: tuple = (nn.Linear, nn.Embedding)) -> nn.Module:
    """``model_class(config)`` built on the meta device, then materialised in ``dtype`` on
    ``device`` with PyTorch's default initialisation of the ``reset`` modules (norms at 1),
    seeded; frozen, in eval mode."""
    from .models.llada import RMSNorm

    with torch.device("meta"):
        model = model_class(config)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, reset):
                module.reset_parameters()
    return model.requires_grad_(False).eval()


class BiasedHead(nn.Module):
    """An LM head plus a constant per-id bias on its logits (:func:`with_logit_bias`)."""

    def __init__(self, head: nn.Module, bias: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("bias", bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) + self.bias


def with_logit_bias(model: nn.Module, bias: dict) -> nn.Module:
    """Adds ``bias`` (``{token id: value}``) to the logits of a random
    :class:`~genjo_fast.models.LLaDAModel` (untied head) or
    :class:`~genjo_fast.models.DreamModel`, in place, on every path that computes logits (the
    model's forward and its ``lm_head``, which the block cache uses); returns ``model``. E.g.
    an EOS bias that makes answers end early (``stop_at_eos`` tests and benchmarks)."""
    from .models import DreamModel, LLaDAModel

    if isinstance(model, DreamModel):
        parent, name = model, "lm_head"
    elif isinstance(model, LLaDAModel) and not model.config.weight_tying:
        parent, name = model.transformer, "ff_out"
    else:
        raise TypeError(f"with_logit_bias takes a LLaDAModel with an untied head or a "
                        f"DreamModel, got {type(model).__name__}")
    head = getattr(parent, name)
    size = model.config.vocab_size if isinstance(model, DreamModel) else head.out_features
    values = torch.zeros(size, dtype=model.dtype, device=model.device)
    for token, value in bias.items():
        values[token] += value
    setattr(parent, name, BiasedHead(head, values))
    return model


class FullLogitsOnly(nn.Module):
    """Hides ``logits_slice`` from a model: genjo_fast then treats it as a generic model that
    computes logits for every position (as HF models do)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids, attention_mask=attention_mask)


class EOSBias(nn.Module):
    """A model that knows where its answer ends: ``model``'s logits with ``bias`` added to the
    ``eos_id`` logit at every output column ``>= start`` (per row), as a model trained to pad
    its answer with EOS predicts from the first step (``adaptive_length``'s tests and
    benchmark). A Dream-style model's output at column ``i`` predicts position ``i + 1``: give
    ``start`` one column earlier.

    ``forward(input_ids, attention_mask=None, position_ids=None, logits_slice=None)``: the
    position ids go to ``model`` when given (Dream's call); ``logits_slice`` too when
    ``model`` takes it, else the full logits are sliced here.

    Args:
        model: a mask predictor returning ``.logits`` ``(B, L, V)``.
        eos_id: the id favoured. start: an int or a ``(B,)`` int tensor of columns (repeated
            over a ``2B`` CFG batch).
        bias: added to the EOS logit (20 makes EOS all but certain there).
    """

    def __init__(self, model: nn.Module, eos_id: int, start, bias: float = 20.0):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)
        self.eos_id = eos_id
        self.register_buffer("start", torch.as_tensor(start).reshape(-1), persistent=False)
        self.bias = bias
        from .contract import accepts_logits_slice
        self.slices = accepts_logits_slice(model)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_slice=None):
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        if logits_slice is not None and self.slices:
            kwargs["logits_slice"] = logits_slice
        out = self.model(input_ids, attention_mask, **kwargs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        if logits_slice is not None:
            columns = columns[logits_slice]
            if not self.slices:
                logits = logits[:, logits_slice]
        start = self.start.to(columns.device)
        if len(start) > 1:  # per row; a CFG batch (2B rows) repeats the rows
            start = start.repeat(input_ids.shape[0] // len(start))
        after = columns[None, :] >= start[:, None]
        logits = logits.clone()
        logits[..., self.eos_id] += self.bias * after
        return SimpleNamespace(logits=logits)


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


class UpstreamShapedDream(nn.Module):
    """A stand-in for upstream's Dream model as transformers loads it, for tests and benchmarks.

    Its module tree and parameter names are upstream's (``model.embed_tokens.weight``,
    ``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``model.layers.{i}.mlp.{gate,up,down}_proj``,
    ``model.layers.{i}.{input,post_attention}_layernorm.weight``, ``model.norm.weight``,
    ``lm_head.weight``, the last being the embedding itself under ``tie_word_embeddings``), its
    ``config.model_type`` is ``"Dream"``, and :meth:`forward` is a plain, independent
    statement of the architecture with upstream's numerics: float32 RMSNorm cast back before
    the weight, RoPE tables computed in float32 and rounded to the model dtype, the rotation in
    the model dtype, PyTorch's SDPA over repeated K/V heads with upstream's boolean mask.
    It shares no code with :class:`genjo_fast.models.DreamModel`.

    Args:
        config: an upstream ``config.json``-style mapping (e.g. ``DreamConfig(...).to_dict()``)
            with ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
            ``num_hidden_layers``, ``intermediate_size``, ``vocab_size``, ``rms_norm_eps``,
            ``rope_theta``, ``tie_word_embeddings``.
    Weights get PyTorch's default initialisation (norms at 1); load others with
    ``load_state_dict``.
    """

    def __init__(self, config):
        super().__init__()
        values = dict(config)
        values["model_type"] = "Dream"
        self.config = SimpleNamespace(**values)
        d, heads = values["hidden_size"], values["num_attention_heads"]
        kv = values["num_key_value_heads"] * (d // heads)
        inner = values["intermediate_size"]

        def norm():
            module = nn.Module()
            module.weight = nn.Parameter(torch.ones(d))
            return module

        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(values["vocab_size"], d)
        self.model.layers = nn.ModuleList()
        for _ in range(values["num_hidden_layers"]):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            layer.self_attn.q_proj = nn.Linear(d, d)
            layer.self_attn.k_proj = nn.Linear(d, kv)
            layer.self_attn.v_proj = nn.Linear(d, kv)
            layer.self_attn.o_proj = nn.Linear(d, d, bias=False)
            layer.mlp = nn.Module()
            layer.mlp.gate_proj = nn.Linear(d, inner, bias=False)
            layer.mlp.up_proj = nn.Linear(d, inner, bias=False)
            layer.mlp.down_proj = nn.Linear(inner, d, bias=False)
            layer.input_layernorm, layer.post_attention_layernorm = norm(), norm()
            self.model.layers.append(layer)
        self.model.norm = norm()
        self.lm_head = nn.Linear(d, values["vocab_size"], bias=False)
        if values.get("tie_word_embeddings"):
            self.lm_head.weight = self.model.embed_tokens.weight  # transformers' tying
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None):
        """Logits of every position, as upstream computes them.

        Args:
            input_ids: int64 ``(B, L)``.
            attention_mask: ``None``/``"full"``, a ``(B, L)`` 0/1 mask (expanded to the AND
                of the key and query masks, as upstream's forward does), or upstream's
                boolean ``(B, 1, L, L)`` mask.
            position_ids: ``(B, L)`` (upstream's ``tok_idx``) or ``None`` for ``0 .. L-1``.
        Returns:
            an object with ``.logits`` ``(B, L, vocab_size)`` in the weights' dtype.
        """
        c = self.config
        batch, length = input_ids.shape
        heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
        head_dim = c.hidden_size // heads
        mask = attention_mask
        if isinstance(mask, str) or mask is None or not bool((mask == 0).any()):
            mask = None
        elif mask.dim() == 2:
            mask = mask.bool()[:, None, None, :] & mask.bool()[:, None, :, None]
        else:
            mask = mask.bool()
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)[None]

        def rms_norm(x, weight):
            x32 = x.to(torch.float32)
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)
            return weight * x32.to(x.dtype)

        x = self.model.embed_tokens.weight[input_ids]
        dtype = x.dtype
        # RoPE tables in float32, then rounded to the model dtype (upstream's order).
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                                        device=x.device).float() / head_dim))
        angles = position_ids.float()[:, :, None] * inv_freq[None, None, :]
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B or 1, 1, L, D)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

        def rotate(t):
            half = t.shape[-1] // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

        def split_heads(t, n):
            return t.view(batch, length, n, head_dim).transpose(1, 2)

        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            h = rms_norm(x, layer.input_layernorm.weight)
            q = rotate(split_heads(F.linear(h, attn.q_proj.weight, attn.q_proj.bias), heads))
            k = rotate(split_heads(F.linear(h, attn.k_proj.weight, attn.k_proj.bias), kv_heads))
            v = split_heads(F.linear(h, attn.v_proj.weight, attn.v_proj.bias), kv_heads)
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
            x = x + F.linear(out.transpose(1, 2).reshape(batch, length, -1), attn.o_proj.weight)
            h = rms_norm(x, layer.post_attention_layernorm.weight)
            x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight))
                             * F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight)
        x = rms_norm(x, self.model.norm.weight)
        return SimpleNamespace(logits=F.linear(x, self.lm_head.weight))


def random_dream(vocab_size: int = 152064, hidden_size: int = 64, num_attention_heads: int = 4,
                 num_key_value_heads: Optional[int] = None, num_hidden_layers: int = 2,
                 intermediate_size: Optional[int] = None, seed: int = 0, dtype=torch.float32,
                 device="cpu", **config):
    """A :class:`~genjo_fast.models.DreamModel` with random weights (PyTorch's default init:
    nonzero q/k/v biases; norms at 1), created directly in ``dtype`` on ``device`` (built on
    the meta device first), so a Dream-7B-shaped model needs only its weights' memory.
    ``config``: further :class:`~genjo_fast.models.DreamConfig` fields."""
    from .models import DreamConfig, DreamModel
    from .models.dream import DreamLMHead

    config = DreamConfig(hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads,
                         num_hidden_layers=num_hidden_layers,
                         intermediate_size=intermediate_size or 2 * hidden_size,
                         vocab_size=vocab_size, **config)
    return _random_weights(DreamModel, config, seed, dtype, device,
                           reset=(nn.Linear, nn.Embedding, DreamLMHead))
