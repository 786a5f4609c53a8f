"""genjo_fast's own LLaDA mask predictor, numerically the reference architecture.

The contract is the architecture as ``docs/semantics.md`` states it:

* RMSNorm in float32, cast back to the input dtype, THEN times the weight;
* RoPE in float32, rotate-half convention, absolute positions ``0 .. L-1`` (left padding does
  not shift them), on q and k;
* non-causal attention (scale ``1/sqrt(head_dim)``), padded keys excluded for every query,
  grouped-query attention when ``n_kv_heads < n_heads``;
* SwiGLU MLP ``ff_out(silu(ff_proj(x)) * up_proj(x))``; no biases;
* untied LM head ``ff_out`` (or the embedding matrix when ``weight_tying``); logits in the
  model dtype, with ``embedding_size`` columns.

Parameter names reproduce the reference checkpoint's keys exactly
(``model.transformer.wte.weight``, ``model.transformer.blocks.{i}.q_proj.weight``, ...), so
``state_dict()`` loads and saves reference checkpoints without renaming.

Each block exposes its attention as separate steps (:meth:`LLaDABlock.qkv`,
:meth:`LLaDABlock.attend`, :meth:`LLaDABlock.mlp`) and :meth:`LLaDAModel.forward_hidden` takes
absolute ``positions`` and a ``kv_hook``, so a KV cache can be built on top without rewriting
the model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionDispatch

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

# Reference config flags and the values this implementation supports. Anything else changes
# the architecture or its numerics and raises NotImplementedError naming the flag. ``None``
# is accepted only where the reference reads it as the supported setting (a falsy "off", or
# "inherit" for bias_for_layer_norm).
_SUPPORTED_FLAGS: Dict[str, tuple] = {
    "alibi": (False, None),
    "rope": (True,),
    "rope_full_precision": (True,),
    "include_bias": (False, None),
    "include_qkv_bias": (False, None),
    "bias_for_layer_norm": (False, None),
    "block_type": ("llama",),
    # The reference LLaMA block multiplies act(ff_proj(x)) by up_proj(x); with "swiglu" the
    # activation halves the width and that product cannot be formed, so only "silu" exists.
    "activation_type": ("silu",),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "attention_layer_norm": (False, None),
    "clip_qkv": (None,),
    "input_emb_norm": (False, None),
    "scale_logits": (False, None),
    # Block groups only rename the checkpoint keys (``block_groups.{g}.{j}``).
    "block_group_size": (1,),
}


def _accepts(value: Any, allowed: Any) -> bool:
    if allowed is None or isinstance(allowed, bool):
        return value is allowed  # booleans must be booleans: 0/1 do not pass for False/True
    if isinstance(allowed, str):  # the reference's enums are str subclasses
        return isinstance(value, str) and str(value) == allowed
    return type(value) is int and value == allowed


def _check_supported(values: Mapping[str, Any]) -> None:
    """Raises NotImplementedError for the first reference flag set to an unsupported value."""
    for name, allowed in _SUPPORTED_FLAGS.items():
        if name in values and not any(_accepts(values[name], a) for a in allowed):
            raise NotImplementedError(
                f"LLaDA config flag {name}={values[name]!r} is not implemented by genjo_fast's "
                f"LLaDAModel (supported: {', '.join(repr(a) for a in allowed)})")


@dataclass
class LLaDAConfig:
    """Architecture of a LLaDA model, with the reference ``config.json`` field names.

    The defaults are LLaDA-8B's, except that ``n_kv_heads`` defaults to ``n_heads``,
    ``embedding_size`` to ``vocab_size`` and ``mlp_hidden_size`` (when set to ``None``) to
    ``mlp_ratio * d_model``, as in the reference.

    Attributes:
        d_model: hidden size. n_heads: query heads (``head_dim = d_model // n_heads``, even).
        n_kv_heads: key/value heads (GQA when fewer than ``n_heads``).
        n_layers: transformer blocks. mlp_hidden_size: SwiGLU inner width.
        vocab_size: tokenizer vocabulary (what ``genjo_fast.generate`` checks ids against).
        embedding_size: rows of the embedding and of the LM head (>= ``vocab_size``); the
            logits have this many columns.
        rope, rope_theta: rotary embeddings (must be on) and their base.
        max_sequence_length: length the RoPE tables are first built for (longer inputs work).
        rms_norm_eps: RMSNorm epsilon. activation_type: "silu". block_type: "llama".
        include_bias: must be False. weight_tying: LM head shares the embedding matrix.
        mask_token_id, eos_token_id, pad_token_id: metadata carried from/to ``config.json``.
    """

    model_type: ClassVar[str] = "llada"

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    n_layers: int = 32
    mlp_hidden_size: Optional[int] = 12288
    mlp_ratio: int = 4
    vocab_size: int = 126464
    embedding_size: Optional[int] = None
    rope: bool = True
    rope_theta: float = 500000.0
    max_sequence_length: int = 4096
    rms_norm_eps: float = 1e-5
    activation_type: str = "silu"
    block_type: str = "llama"
    include_bias: bool = False
    weight_tying: bool = False
    mask_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        # Enum-valued fields may arrive as str subclasses (the reference's StrEnum).
        self.activation_type = str(self.activation_type)
        self.block_type = str(self.block_type)
        _check_supported({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"embedding_size={self.embedding_size} is smaller than "
                             f"vocab_size={self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LLaDAConfig":
        """Builds the config from a reference ``config.json`` dict (or an HF config's
        ``to_dict()``).

        Keys that do not change inference (dropouts, init settings, ``auto_map``,
        ``transformers_version``, HF bookkeeping, ...) are ignored.

        Raises:
            ValueError: ``model_type`` is present and is not ``"llada"``, or the sizes are
                inconsistent.
            NotImplementedError: a flag this implementation does not support is set
                (``alibi``, biases, ``rope`` false, a block type other than ``"llama"``, an
                activation other than ``"silu"``, QK layer norm, ``clip_qkv``, ...); the
                message names the flag.
        """
        model_type = values.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"model_type={model_type!r} is not {cls.model_type!r}")
        _check_supported(values)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names}
        kwargs["n_kv_heads"] = _effective_n_kv_heads(values)
        return cls(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        """A reference-style ``config.json`` dict (``model_type`` ``"llada"``).

        Every architecture flag is written explicitly, because the reference's defaults differ
        from LLaDA's (its ``ModelConfig`` defaults to no RoPE, tied weights, dropout 0.1, ...).
        """
        out: Dict[str, Any] = {"architectures": ["LLaDAModelLM"], "model_type": self.model_type}
        out.update(dataclasses.asdict(self))
        out.update({
            "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0,
            "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
            "bias_for_layer_norm": False, "block_group_size": 1, "clip_qkv": None,
            "embedding_dropout": 0.0, "flash_attention": False, "include_qkv_bias": False,
            "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
            "multi_query_attention": None, "residual_dropout": 0.0, "rope_full_precision": True,
            "scale_logits": False, "use_cache": False,
        })
        return dict(sorted(out.items()))


def _effective_n_kv_heads(values: Mapping[str, Any]) -> Optional[int]:
    """The reference's rule combining ``n_kv_heads`` and ``multi_query_attention``."""
    n_kv, mqa = values.get("n_kv_heads"), values.get("multi_query_attention")
    if mqa is None:
        return n_kv
    implied = 1 if mqa else values.get("n_heads", LLaDAConfig.n_heads)
    if n_kv is not None and n_kv != implied:
        raise ValueError(f"n_kv_heads={n_kv} contradicts multi_query_attention={mqa}")
    return implied


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

@dataclass
class LLaDAOutput:
    """Model output. ``logits``: ``(B, L, embedding_size)`` (or the ``logits_slice`` rows) in
    the model dtype."""
    logits: torch.Tensor


class RMSNorm(nn.Module):
    """RMSNorm as the reference computes it: normalise in float32, cast back to the input
    dtype, then multiply by the weight (in the weight's dtype)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(..., size)`` any float dtype -> same shape, ``x.dtype`` (with the weight's)."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float,
                device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for positions ``0 .. length-1``.

    Returns:
        ``(cos, sin)``, float32 ``(length, head_dim)``; both halves of the last dim repeat
        the ``head_dim // 2`` frequencies ``theta ** (-2i / head_dim)`` (rotate-half layout).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                                / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` in float32, rotate-half convention, and casts back.

    Args:
        x: ``(B, H, L, D)`` any float dtype.
        cos, sin: float32, ``(L, D)`` (same positions for every row) or ``(B, 1, L, D)``.
    Returns:
        ``(B, H, L, D)`` in ``x.dtype``.
    """
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class RopeCache:
    """float32 RoPE tables per device, built once and grown (doubling) on demand: a plain
    object rather than a buffer, so not in the state dict, never built on the meta device and
    never downcast by ``.to(bf16)``.

    Args:
        head_dim, theta: of :func:`rope_tables`.
        min_positions: the smallest table built.
    """

    def __init__(self, head_dim: int, theta: float, min_positions: int):
        self.head_dim, self.theta, self.min_positions = head_dim, theta, min_positions
        self.tables: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, positions: Optional[torch.Tensor], length: int,
                 device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` for ``positions``: int ``(L,)`` or ``(B, L)`` (``(1, L)``
        too), or ``None`` for ``0 .. length-1``. Returns ``(L, D)`` each, or ``(B, 1, L, D)``
        for 2-D positions."""
        needed = length if positions is None else int(positions.max()) + 1
        cos, sin = self.tables.get(device, (None, None))
        if cos is None or cos.shape[0] < needed:
            size = max(self.min_positions, needed, 0 if cos is None else 2 * cos.shape[0])
            cos, sin = rope_tables(self.head_dim, size, self.theta, device)
            self.tables[device] = (cos, sin)
        if positions is None:
            return cos[:length], sin[:length]
        positions = positions.to(device=device, dtype=torch.long)
        if positions.dim() == 2:
            return cos[positions][:, None], sin[positions][:, None]
        return cos[positions], sin[positions]


class LLaDABlock(nn.Module):
    """One LLaMA-style block: ``x + attn(attn_norm(x))``, then ``+ mlp(ff_norm(.))``.

    The attention branch is split into :meth:`qkv` and :meth:`attend` so that callers (a KV
    cache) can replace or extend the keys and values in between.
    """

    def __init__(self, config: LLaDAConfig, layer_id: int,
                 attention: Optional[AttentionDispatch] = None):
        super().__init__()
        self.layer_id = layer_id
        # The model's attention backend, shared by its blocks (resolved once, not per call).
        self.attention_dispatch = attention if attention is not None else AttentionDispatch()
        self.n_heads, self.n_kv_heads, self.head_dim = (config.n_heads, config.n_kv_heads,
                                                        config.head_dim)
        d, kv, hidden = config.d_model, config.n_kv_heads * config.head_dim, config.mlp_hidden_size
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, hidden, bias=False)  # gate, through SiLU
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.ff_out = nn.Linear(hidden, d, bias=False)   # down projection

    def qkv(self, x: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention inputs of the rows of ``x``.

        Args:
            x: ``(B, L, d_model)`` block input (the residual stream), model dtype.
            cos, sin: float32 rotary tables of the rows' positions, ``(L, D)`` or
                ``(B, 1, L, D)`` (see :func:`apply_rope`).
        Returns:
            ``q`` ``(B, n_heads, L, D)``, ``k`` and ``v`` ``(B, n_kv_heads, L, D)``, model
            dtype; q and k are rotated.
        """
        batch, length, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Non-causal attention and output projection (the branch, without the residual).

        Args:
            q: ``(B, n_heads, Lq, D)``; k, v: ``(B, n_kv_heads, Lk, D)``.
            key_mask: bool ``(B, Lk)``, True for real keys, or ``None`` (all real).
        Returns:
            ``(B, Lq, d_model)`` in the model dtype.
        """
        out = self.attention_dispatch(q, k, v, key_mask)
        batch, _, length, _ = out.shape
        return self.attn_out(out.transpose(1, 2).reshape(batch, length, -1))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU branch ``ff_out(silu(ff_proj(h)) * up_proj(h))``, ``h = ff_norm(x)``.

        x: ``(B, L, d_model)`` -> ``(B, L, d_model)``, model dtype (without the residual).
        """
        h = self.ff_norm(x)
        return self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: Optional[torch.Tensor], kv_hook: Optional[KVHook] = None
                ) -> torch.Tensor:
        """x: ``(B, L, d_model)`` -> ``(B, L, d_model)``. ``kv_hook(layer_id, k, v)`` may
        return other keys/values ``(B, n_kv_heads, Lk, D)``; ``key_mask`` is then ``(B, Lk)``."""
        q, k, v = self.qkv(x, cos, sin)
        if kv_hook is not None:
            k, v = kv_hook(self.layer_id, k, v)
        x = x + self.attend(q, k, v, key_mask)
        return x + self.mlp(x)


#: ``kv_hook(layer_id, k, v) -> (k, v)``: sees each layer's fresh, rotated keys and values
#: ``(B, n_kv_heads, L, D)`` and returns the ones the queries attend to ``(B, n_kv_heads, Lk,
#: D)`` (e.g. cached ones concatenated with or overwritten by the fresh ones).
KVHook = Callable[[int, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class LLaDAModel(nn.Module):
    """LLaDA mask predictor with the reference checkpoint's parameter names.

    ``state_dict()`` keys: ``model.transformer.wte.weight``,
    ``model.transformer.blocks.{i}.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,
    up_proj,ff_out}.weight``, ``model.transformer.ln_f.weight`` and (untied)
    ``model.transformer.ff_out.weight``.

    Build one with :func:`genjo_fast.models.load_llada` (checkpoint directory) or
    :func:`genjo_fast.models.from_reference` (weights shared with a transformers-loaded
    reference model); constructing it directly gives random weights.
    """

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        # The attention backend of every block: see set_attention_backend.
        self.attention_dispatch = AttentionDispatch()
        layers = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList(LLaDABlock(config, i, self.attention_dispatch)
                                 for i in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
        ))
        if not config.weight_tying:
            layers["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)
        # The reference nests the layers as LLaDAModelLM.model.transformer; so do we, for keys.
        self.model = nn.Module()
        self.model.transformer = layers
        self._rope = RopeCache(config.head_dim, config.rope_theta, config.max_sequence_length)
        self.eval()

    # -- accessors ------------------------------------------------------------------------

    @property
    def transformer(self) -> nn.ModuleDict:
        """The reference's ``transformer`` dict (wte, blocks, ln_f, ff_out)."""
        return self.model.transformer

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def set_attention_backend(self, backend: Optional[str]) -> None:
        """Chooses the attention backend of every block: ``None`` (``GENJO_FAST_ATTENTION``,
        else ``"auto"``; the default), ``"auto"``, ``"triton"``, ``"flash_attn"`` or ``"sdpa"``.
        The backend is resolved on the first forward for each (device, dtype, head_dim) and
        kept; the env variable is read then, not at every call."""
        self.attention_dispatch.set_backend(backend)

    # -- pieces -----------------------------------------------------------------------------

    def rope(self, positions: Optional[torch.Tensor], length: int,
             device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` for absolute ``positions``.

        Args:
            positions: int ``(L,)`` or ``(B, L)``, or ``None`` for ``0 .. length-1``.
        Returns:
            ``(L, D)`` each, or ``(B, 1, L, D)`` for per-row positions.
        """
        return self._rope(positions, length, device)

    def forward_hidden(self, input_ids: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None,
                       positions: Optional[torch.Tensor] = None,
                       kv_hook: Optional[KVHook] = None) -> torch.Tensor:
        """Hidden states after the last block, before the final norm.

        Args:
            input_ids: int ``(B, L)``.
            attention_mask: ``(B, Lk)`` of 0/1 or bool, 0 on padded keys, or ``None``.
                ``Lk = L`` unless ``kv_hook`` changes the keys' length.
            positions: absolute positions of the input rows, int ``(L,)`` or ``(B, L)``;
                default ``0 .. L-1`` (left padding does not shift positions).
            kv_hook: see :data:`KVHook`; called once per layer, in order, with ``layer_id``.
        Returns:
            ``(B, L, d_model)`` in the model dtype.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L); got {tuple(input_ids.shape)}")
        key_mask = None
        if attention_mask is not None:
            if kv_hook is None and attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match "
                                 f"input_ids {tuple(input_ids.shape)}")
            key_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        x = self.transformer.wte(input_ids)
        cos, sin = self.rope(positions, input_ids.shape[1], x.device)
        for block in self.blocks:
            x = block(x, cos, sin, key_mask, kv_hook)
        return x

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``(B, L, d_model)`` -> ``(B, L, embedding_size)``, model
        dtype."""
        h = self.transformer.ln_f(hidden)
        if self.config.weight_tying:
            return F.linear(h, self.transformer.wte.weight)
        return self.transformer.ff_out(h)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                logits_slice: Optional[slice] = None,
                positions: Optional[torch.Tensor] = None) -> LLaDAOutput:
        """Mask-predictor logits.

        Args:
            input_ids: int ``(B, L)``.
            attention_mask: ``(B, L)`` of 0/1, 0 on (left) padding, or ``None``.
            logits_slice: a ``slice`` of positions; the final norm and the LM head then run on
                those rows only.
            positions: absolute RoPE positions, int ``(L,)`` or ``(B, L)``; default
                ``0 .. L-1`` (see :meth:`forward_hidden`).
        Returns:
            :class:`LLaDAOutput` with ``logits`` ``(B, L or len(slice), embedding_size)`` in
            the model dtype.
        """
        hidden = self.forward_hidden(input_ids, attention_mask, positions)
        if logits_slice is not None:
            hidden = hidden[:, logits_slice]
        return LLaDAOutput(logits=self.lm_head(hidden))

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_model={c.d_model}, n_heads={c.n_heads}, n_kv_heads={c.n_kv_heads}, "
                f"n_layers={c.n_layers}, vocab_size={c.vocab_size}, "
                f"weight_tying={c.weight_tying}")


def num_parameters(config: LLaDAConfig) -> int:
    """Parameter count of the architecture, computed on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in LLaDAModel(config).parameters())


__all__ = ["LLaDAConfig", "LLaDAModel", "LLaDABlock", "LLaDAOutput", "RMSNorm", "KVHook",
           "rope_tables", "apply_rope", "num_parameters"]
