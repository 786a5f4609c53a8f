"""genjo_fast's own Dream mask predictor (Dream-7B family), numerically upstream's architecture.

Dream is a Qwen2-style decoder run bidirectionally (``shared/FAMILY_FACTS.md``):

* RMSNorm in float32, cast back to the input dtype, THEN times the weight (eps 1e-6);
* RoPE, rotate-half convention, on q and k at the positions upstream passes (``0 .. L-1``, or
  with left padding ``cumsum(mask) - 1`` with padded positions at 1);
* non-causal attention (scale ``1/sqrt(head_dim)``), grouped-query when
  ``num_key_value_heads < num_attention_heads``; biases on the q/k/v projections only;
* SwiGLU MLP ``down_proj(silu(gate_proj(x)) * up_proj(x))``;
* LM head ``lm_head`` (or the embedding matrix when ``tie_word_embeddings``), logits in the
  model dtype with ``vocab_size`` columns.

One numerical choice differs from upstream in low precision: upstream rounds the RoPE
cos/sin tables to the model dtype and rotates in the model dtype; here the rotation is done in
float32 and rounded once (the same in float32, more accurate in bf16).

Masks, as upstream's forward reads them: ``None``/``"full"`` (or a mask without a 0) is full
attention; a 2-D ``(B, L)`` 0/1 mask and upstream's 4-D boolean ``(B, 1, L, L)`` mask (the AND
of a key and a query mask) exclude padded keys for every query and give padded QUERIES a zero
attention output, which is what PyTorch's SDPA (>= 2.5) gives a row with no allowed key.

Parameter names are the upstream checkpoint's keys (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.{weight,bias}``, ..., ``model.norm.weight``,
``lm_head.weight``), so ``state_dict()`` loads and saves upstream checkpoints without renaming.

Like :class:`~genjo_fast.models.LLaDAModel`, each layer exposes its attention as separate
steps (:meth:`DreamLayer.qkv`, :meth:`DreamLayer.attend`, :meth:`DreamLayer.feed_forward`),
:meth:`DreamModel.forward_hidden` takes ``positions`` and a ``kv_hook``, and
``DreamModel.lm_head(hidden)`` is the final norm and the LM head together, so a KV cache can
be built on top without rewriting the model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionDispatch
from .llada import KVHook, RMSNorm, RopeCache, apply_rope

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _unsupported(values: Mapping[str, Any]) -> Optional[str]:
    """The first upstream config flag whose value changes the architecture beyond what
    :class:`DreamModel` implements, as ``"name=value"``; ``None`` when all are supported."""
    act = values.get("hidden_act", "silu")
    if act != "silu":
        return f"hidden_act={act!r}"
    scaling = values.get("rope_scaling")
    if scaling is not None and (not isinstance(scaling, Mapping) or scaling.get(
            "rope_type", scaling.get("type")) != "default"):
        return f"rope_scaling={scaling!r}"
    # Upstream warns that its SDPA attention ignores the window; which was meant is unclear.
    if values.get("use_sliding_window"):
        return f"use_sliding_window={values['use_sliding_window']!r}"
    return None


# Upstream's DreamConfig defaults, for keys a config.json leaves out (they are not Dream-7B's).
_UPSTREAM_DEFAULTS: Dict[str, Any] = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
    max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_theta=10000.0, rope_scaling=None, use_sliding_window=False, mask_token_id=151666,
    pad_token_id=151643, bos_token_id=None, eos_token_id=None)


@dataclass
class DreamConfig:
    """Architecture of a Dream model, with upstream's ``config.json`` field names.

    The defaults are Dream-7B's (``num_key_value_heads=None`` means ``num_attention_heads``).

    Attributes:
        hidden_size: model width. num_attention_heads: query heads
            (``head_dim = hidden_size // num_attention_heads``, even).
        num_key_value_heads: key/value heads (GQA when fewer than the query heads).
        num_hidden_layers: decoder layers. intermediate_size: SwiGLU inner width.
        vocab_size: rows of the embedding and of the LM head; columns of the logits.
        rms_norm_eps: RMSNorm epsilon. rope_theta: RoPE base.
        max_position_embeddings: upstream's position limit (upstream's sampler caps its
            default ``max_length`` by it; longer inputs still work here).
        tie_word_embeddings: the LM head is the embedding matrix.
        hidden_act: must be ``"silu"``. rope_scaling: must be ``None`` (or ``"default"``).
        use_sliding_window: must be false.
        mask_token_id, pad_token_id, bos_token_id, eos_token_id: carried from/to
            ``config.json`` (the sampler's defaults read ``mask_token_id``).
    """

    model_type: ClassVar[str] = "Dream"

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: Optional[int] = 4
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    rope_scaling: Optional[Dict[str, Any]] = None
    use_sliding_window: bool = False
    mask_token_id: Optional[int] = 151666
    pad_token_id: Optional[int] = 151643
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = 151643

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        flag = _unsupported(dataclasses.asdict(self))
        if flag is not None:
            raise NotImplementedError(f"Dream config flag {flag} is not implemented by "
                                      "genjo_fast's DreamModel")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DreamConfig":
        """Builds the config from an upstream ``config.json`` dict (or an HF config's
        ``to_dict()``). Keys it leaves out take upstream's ``DreamConfig`` defaults (not
        Dream-7B's). Keys that do not change inference (dropouts, init settings,
        ``sliding_window`` when the window is off, ``auto_map``, HF bookkeeping, ...) are
        ignored, as upstream ignores a ``head_dim`` key (it uses ``hidden_size // heads``).

        Raises:
            ValueError: ``model_type`` is present and is not ``"Dream"``, or the sizes are
                inconsistent.
            NotImplementedError: ``hidden_act`` other than ``"silu"``, a ``rope_scaling``,
                ``use_sliding_window``; the message names the flag.
        """
        model_type = values.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"model_type={model_type!r} is not {cls.model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**_UPSTREAM_DEFAULTS, **{k: v for k, v in values.items() if k in names}})

    def to_dict(self) -> Dict[str, Any]:
        """An upstream-style ``config.json`` dict (``model_type`` ``"Dream"``)."""
        out: Dict[str, Any] = {"architectures": ["DreamModel"], "model_type": self.model_type,
                               "attention_dropout": 0.0, "use_cache": False}
        out.update(dataclasses.asdict(self))
        return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

@dataclass
class DreamOutput:
    """Model output. ``logits``: ``(B, L, vocab_size)`` (or the ``logits_slice`` rows) in the
    model dtype."""
    logits: torch.Tensor


class DreamAttention(nn.Module):
    """The attention projections, named as upstream's (``q_proj``, ``k_proj``, ``v_proj`` with
    biases, ``o_proj`` without)."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        d, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, kv, bias=True)
        self.v_proj = nn.Linear(d, kv, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)


class DreamMLP(nn.Module):
    """SwiGLU ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (no biases)."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        d, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamLayer(nn.Module):
    """One decoder layer: ``x + attn(input_layernorm(x))``, then
    ``+ mlp(post_attention_layernorm(.))``, with the attention split into :meth:`qkv` and
    :meth:`attend` so that a KV cache can replace or extend the keys and values in between."""

    def __init__(self, config: DreamConfig, layer_id: int,
                 attention: Optional[AttentionDispatch] = None):
        super().__init__()
        self.layer_id = layer_id
        # The model's attention backend, shared by its layers (resolved once, not per call).
        self.attention_dispatch = attention if attention is not None else AttentionDispatch()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DreamAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DreamMLP(config)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention inputs of the rows of ``x``.

        Args:
            x: ``(B, L, hidden_size)`` layer input (the residual stream), model dtype.
            cos, sin: float32 rotary tables of the rows' positions, ``(L, D)`` or
                ``(B, 1, L, D)``.
        Returns:
            ``q`` ``(B, n_heads, L, D)``, ``k`` and ``v`` ``(B, n_kv_heads, L, D)``, model
            dtype; q and k are rotated.
        """
        batch, length, _ = x.shape
        h = self.input_layernorm(x)
        attn = self.self_attn
        q = attn.q_proj(h).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: Optional[torch.Tensor],
               query_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Non-causal attention and output projection (the branch, without the residual).

        Args:
            q: ``(B, n_heads, Lq, D)``; k, v: ``(B, n_kv_heads, Lk, D)``.
            key_mask: bool ``(B, Lk)``, True for real keys, or ``None`` (all real).
            query_mask: bool ``(B, Lq)`` or ``None``; rows with False get a zero attention
                output (upstream's SDPA result for a query that may attend to no key).
        Returns:
            ``(B, Lq, hidden_size)`` in the model dtype.
        """
        out = self.attention_dispatch(q, k, v, key_mask)
        if query_mask is not None:
            out = out.masked_fill(~query_mask[:, None, :, None], 0)
        batch, _, length, _ = out.shape
        return self.self_attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch ``mlp(post_attention_layernorm(x))``: ``(B, L, hidden_size)`` ->
        same shape, model dtype (without the residual)."""
        return self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: Optional[torch.Tensor], kv_hook: Optional[KVHook] = None,
                query_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: ``(B, L, hidden_size)`` -> same shape. ``kv_hook(layer_id, k, v)`` may return
        other keys/values ``(B, n_kv_heads, Lk, D)``; ``key_mask`` is then ``(B, Lk)``."""
        q, k, v = self.qkv(x, cos, sin)
        if kv_hook is not None:
            k, v = kv_hook(self.layer_id, k, v)
        x = x + self.attend(q, k, v, key_mask, query_mask)
        return x + self.feed_forward(x)


class DreamLMHead(nn.Module):
    """The final norm and the LM head as one callable: ``lm_head(hidden)`` -> logits, as
    :meth:`LLaDAModel.lm_head <genjo_fast.models.LLaDAModel.lm_head>` does.

    Holds upstream's ``lm_head.weight`` ``(vocab_size, hidden_size)`` (none when the head is
    tied to the embedding). The final norm stays registered at ``model.norm`` (its key); this
    module only refers to it.
    """

    def __init__(self, config: DreamConfig, norm: RMSNorm, embedding: nn.Embedding):
        super().__init__()
        # Plain references, not submodules: their parameters keep their upstream keys.
        self.__dict__["_norm"] = norm
        self.__dict__["_embedding"] = embedding if config.tie_word_embeddings else None
        if not config.tie_word_embeddings:
            self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default initialisation of the untied weight."""
        if self._embedding is None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, L, hidden_size)`` before the final norm -> ``(B, L, vocab_size)``, model dtype."""
        weight = self.weight if self._embedding is None else self._embedding.weight
        return F.linear(self._norm(hidden), weight)


# Smallest RoPE table built (positions); tables grow by doubling beyond it.
_MIN_ROPE_POSITIONS = 2048

AttentionMask = Union[None, str, torch.Tensor]


def split_attention_mask(attention_mask: AttentionMask, batch: int, length: int,
                         device: torch.device
                         ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Upstream's attention-mask forms as ``(key_mask, query_mask)``, bool ``(B, L)`` each,
    or ``(None, None)`` for full attention.

    Args:
        attention_mask: ``None`` or ``"full"``; a ``(B, L)`` 0/1 or bool mask (keys AND
            queries, as upstream's forward expands it); upstream's ``(B, 1, L, L)`` mask (bool,
            or nonzero = allowed) that must be the outer product of a query and a key mask. A
            mask without any 0 is full attention.
    Raises:
        ValueError: another shape, another string, or a 4-D mask that is not an outer
            product.
    """
    if attention_mask is None or (isinstance(attention_mask, str) and attention_mask == "full"):
        return None, None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be None, 'full' or a tensor; got "
                         f"{attention_mask!r}")
    allowed = attention_mask.to(device) != 0
    if allowed.shape == (batch, length):
        return (None, None) if bool(allowed.all()) else (allowed, allowed)
    if allowed.shape != (batch, 1, length, length):
        raise ValueError(f"attention_mask must be (B, L) = {(batch, length)} or (B, 1, L, L) = "
                         f"{(batch, 1, length, length)}; got {tuple(attention_mask.shape)}")
    if bool(allowed.all()):
        return None, None
    allowed = allowed[:, 0]
    queries, keys = allowed.any(dim=2), allowed.any(dim=1)
    if not torch.equal(allowed, queries[:, :, None] & keys[:, None, :]):
        raise ValueError("a (B, 1, L, L) attention_mask must be the outer product of a query "
                         "mask and a key mask (upstream's padding mask); general masks are not "
                         "supported")
    return keys, queries


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class DreamModel(nn.Module):
    """Dream mask predictor with upstream's parameter names.

    ``state_dict()`` keys: ``model.embed_tokens.weight``,
    ``model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}``,
    ``model.layers.{i}.self_attn.o_proj.weight``,
    ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``,
    ``model.layers.{i}.{input,post_attention}_layernorm.weight``, ``model.norm.weight`` and
    (untied) ``lm_head.weight``.

    Build one with :func:`genjo_fast.models.load_dream` (checkpoint directory),
    :func:`genjo_fast.models.dream_from_reference` (weights shared with a transformers-loaded
    upstream model) or :func:`genjo_fast.testing.random_dream`; constructing it directly gives
    PyTorch's default initialisation (norms at 1).
    """

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        # The attention backend of every layer: see set_attention_backend.
        self.attention_dispatch = AttentionDispatch()
        self.model = nn.Module()  # upstream nests the decoder as DreamModel.model
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DreamLayer(config, i, self.attention_dispatch)
                                          for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = DreamLMHead(config, self.model.norm, self.model.embed_tokens)
        self._rope = RopeCache(config.head_dim, config.rope_theta, _MIN_ROPE_POSITIONS)
        self.eval()

    # -- accessors ------------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def set_attention_backend(self, backend: Optional[str]) -> None:
        """Chooses the attention backend of every layer, as
        :meth:`genjo_fast.models.LLaDAModel.set_attention_backend` does."""
        self.attention_dispatch.set_backend(backend)

    # -- pieces -----------------------------------------------------------------------------

    def rope(self, positions: Optional[torch.Tensor], length: int,
             device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` for ``positions``.

        Args:
            positions: int ``(L,)``, ``(1, L)`` or ``(B, L)``, or ``None`` for ``0 .. length-1``.
        Returns:
            ``(L, D)`` each, or ``(B, 1, L, D)`` for 2-D positions.
        """
        return self._rope(positions, length, device)

    def forward_hidden(self, input_ids: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None,
                       positions: Optional[torch.Tensor] = None,
                       kv_hook: Optional[KVHook] = None,
                       query_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states after the last layer, before the final norm.

        Args:
            input_ids: int ``(B, L)``.
            attention_mask: KEY mask ``(B, Lk)`` of 0/1 or bool, 0 on padded keys, or
                ``None``. ``Lk = L`` unless ``kv_hook`` changes the keys' length.
            positions: RoPE positions of the input rows, int ``(L,)`` or ``(B, L)``; default
                ``0 .. L-1``.
            kv_hook: see :data:`~genjo_fast.models.llada.KVHook`; called once per layer.
            query_mask: bool ``(B, L)`` or ``None``: rows with False get a zero attention
                output in every layer (upstream's padded queries).
        Returns:
            ``(B, L, hidden_size)`` in the model dtype.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L); got {tuple(input_ids.shape)}")
        key_mask = None
        if attention_mask is not None:
            if kv_hook is None and attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match "
                                 f"input_ids {tuple(input_ids.shape)}")
            key_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        if query_mask is not None:
            if query_mask.shape != input_ids.shape:
                raise ValueError(f"query_mask {tuple(query_mask.shape)} does not match "
                                 f"input_ids {tuple(input_ids.shape)}")
            query_mask = query_mask.to(device=input_ids.device, dtype=torch.bool)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, input_ids.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, key_mask, kv_hook, query_mask)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: AttentionMask = None,
                position_ids: Optional[torch.Tensor] = None,
                logits_slice: Optional[slice] = None) -> DreamOutput:
        """Mask-predictor logits, called as upstream's sampler calls its model
        (``model(x, attention_mask, tok_idx)``).

        Args:
            input_ids: int ``(B, L)``.
            attention_mask: ``None``/``"full"``, a ``(B, L)`` 0/1 mask or upstream's boolean
                ``(B, 1, L, L)`` mask (see :func:`split_attention_mask`).
            position_ids: int ``(B, L)`` (upstream's ``tok_idx``), ``(1, L)`` or ``(L,)``, or
                ``None`` for ``0 .. L-1``.
            logits_slice: a ``slice`` of positions; the final norm and the LM head then run on
                those rows only.
        Returns:
            :class:`DreamOutput` with ``logits`` ``(B, L or len(slice), vocab_size)`` in the
            model dtype.
        """
        key_mask, query_mask = split_attention_mask(attention_mask, *input_ids.shape,
                                                    input_ids.device)
        hidden = self.forward_hidden(input_ids, key_mask, position_ids, query_mask=query_mask)
        if logits_slice is not None:
            hidden = hidden[:, logits_slice]
        return DreamOutput(logits=self.lm_head(hidden))

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden_size={c.hidden_size}, heads={c.num_attention_heads}, "
                f"kv_heads={c.num_key_value_heads}, layers={c.num_hidden_layers}, "
                f"vocab_size={c.vocab_size}, tie_word_embeddings={c.tie_word_embeddings}")


__all__ = ["DreamConfig", "DreamModel", "DreamLayer", "DreamAttention", "DreamMLP",
           "DreamLMHead", "DreamOutput", "split_attention_mask"]
