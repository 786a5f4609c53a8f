"""Block KV cache for genjo_fast's LLaDA model (approximate, opt-in: ``cache="prefix"|"dual"``).

Semantics are Fast-dLLM's (``docs/semantics.md``; plain statement:
:func:`genjo_fast.reference.generate_approximate`): each block starts with a full forward that
fills the cache and gives the block's first logits; later steps run only the block (``dual``)
or the block and everything after it (``prefix``) against the cached K/V.

Both modes reduce to one operation: run some rows ``[row_start, row_start + n)`` through the
blocks, write their fresh K/V into those slots of a preallocated per-layer cache, and attend
over the whole cache. For ``prefix`` the slots after the rows hold nothing useful but there are
none (the rows reach the end); for ``dual`` they hold the K/V of the last full forward.
The cache is allocated once per generate call: no concatenation per step.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from .models import DreamModel, LLaDAModel
from .stopping import Compaction, take_rows

CACHE_MODES = ("prefix", "dual")
CacheableModel = Union[LLaDAModel, DreamModel]


def kv_geometry(model: CacheableModel) -> Tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a LLaDA or Dream model: the key/value heads its
    layers compute (this rank's share under tensor parallelism, :mod:`genjo_fast.parallel`)."""
    layers = _layer_parts(model)[1]
    return len(layers), layers[0].n_kv_heads, layers[0].head_dim


def _layer_parts(model: CacheableModel):
    """The embedding, the layers and the feed-forward branch of a LLaDA or Dream model."""
    if isinstance(model, DreamModel):
        return model.embed_tokens, model.layers, lambda layer, h: layer.feed_forward(h)
    return model.transformer.wte, model.blocks, lambda layer, h: layer.mlp(h)


class BlockCache:
    """Preallocated per-layer K/V ``(B, n_kv_heads, L, head_dim)`` and the runner over it.

    Args:
        model: a :class:`~genjo_fast.models.LLaDAModel` or
            :class:`~genjo_fast.models.DreamModel`.
        batch: rows of the batch the model sees (``2B`` with classifier-free guidance).
        seq_len: ``L``, prompt plus generated length.
        key_mask: ``(batch, L)`` 0/1 key-padding mask, or ``None``.
        positions: RoPE positions ``(batch, L)`` (Dream's with padding), or ``None`` for
            ``0 .. L-1``.
    """

    def __init__(self, model: CacheableModel, batch: int, seq_len: int,
                 key_mask: Optional[torch.Tensor], positions: Optional[torch.Tensor] = None):
        layers, kv_heads, head_dim = kv_geometry(model)
        shape = (batch, kv_heads, seq_len, head_dim)
        self.model = model
        self.embed, self.layers, self.feed_forward = _layer_parts(model)
        self.k: List[torch.Tensor] = [torch.empty(shape, dtype=model.dtype, device=model.device)
                                      for _ in range(layers)]
        self.v: List[torch.Tensor] = [torch.empty_like(k) for k in self.k]
        self.key_mask = None if key_mask is None else key_mask.bool()
        # float32 (L, D), or (batch, 1, L, D) for per-row positions
        self.cos, self.sin = model.rope(positions, seq_len, model.device)

    def hidden(self, rows: torch.Tensor, row_start: int) -> torch.Tensor:
        """Hidden states of ``rows`` after the last layer, writing their K/V into the cache.

        Args:
            rows: int64 ``(batch, n)``, the tokens at positions ``row_start .. row_start + n``.
        Returns:
            ``(batch, n, d_model)`` in the model dtype (before the final norm).
        """
        row_stop = row_start + rows.shape[1]
        cos, sin = self.cos[..., row_start:row_stop, :], self.sin[..., row_start:row_stop, :]
        h = self.embed(rows)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(h, cos, sin)
            self.k[i][:, :, row_start:row_stop] = k
            self.v[i][:, :, row_start:row_stop] = v
            h = h + layer.attend(q, self.k[i], self.v[i], self.key_mask)
            h = h + self.feed_forward(layer, h)
        return h

    def compact(self, rows: torch.Tensor) -> None:
        """Keeps the cache of the model rows ``rows`` (int64, increasing) only: stopping at EOS
        drops finished rows (:mod:`genjo_fast.stopping`). Per-row RoPE tables
        ``(batch, 1, L, D)`` follow; shared ones (``(L, D)``, ``(1, 1, L, D)``) stay."""
        if self.cos.dim() == 4 and self.cos.shape[0] == self.k[0].shape[0] > 1:
            self.cos, self.sin = take_rows(self.cos, rows), take_rows(self.sin, rows)
        self.k = [take_rows(k, rows) for k in self.k]
        self.v = [take_rows(v, rows) for v in self.v]
        self.key_mask = take_rows(self.key_mask, rows)


class CachedBlockLogits:
    """The cached model runner (like :class:`genjo_fast.runners.FullForward`), through a
    :class:`BlockCache`: ``__call__(x, start, stop, full)`` returns the logits of positions
    ``[start, stop)`` (and the unconditional half with CFG); ``full`` forces a full forward
    that refills the cache.

    Rows that run: all (``full``); else from ``start - shift`` to the end (``prefix``) or to
    ``stop`` (``dual``). With ``shift=1`` (Dream: the prediction for position ``i`` is the
    output at ``i - 1``) the row before the window runs too, and the window's last row, whose
    output no prediction needs, still runs so that its fresh K/V replace its slot.
    """

    def __init__(self, model: CacheableModel, mode: str, x: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], prompt_index: Optional[torch.Tensor],
                 cfg_scale: float, mask_id: int, *, shift: int = 0,
                 positions: Optional[torch.Tensor] = None):
        self.model = model
        self.mode = mode
        self.cfg = cfg_scale > 0
        self.prompt_index = prompt_index
        self.mask_id = mask_id
        self.shift = shift
        if self.cfg and attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask], dim=0)
        batch = x.shape[0] * (2 if self.cfg else 1)
        self.cache = BlockCache(model, batch, x.shape[1], attention_mask, positions)

    def __call__(self, x: torch.Tensor, start: int, stop: int,
                 full: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch = x.shape[0]
        row_start = 0 if full else start - self.shift
        row_stop = x.shape[1] if (full or self.mode == "prefix") else stop
        rows = x[:, row_start:row_stop]
        if self.cfg:  # the unconditional copy masks the prompt (only the rows that run)
            prompt = self.prompt_index[:, row_start:row_stop]
            rows = torch.cat([rows, rows.masked_fill(prompt, self.mask_id)], dim=0)
        hidden = self.cache.hidden(rows, row_start)
        a = start - self.shift - row_start
        logits = self.model.lm_head(hidden[:, a:a + stop - start])
        if self.cfg:
            return logits[:batch], logits[batch:]
        return logits, None

    def compact(self, compaction: Compaction) -> None:
        """Keeps the cache and the per-row inputs of the rows that go on (stopping at EOS);
        with CFG both halves of the model batch."""
        self.prompt_index = take_rows(self.prompt_index, compaction.keep)
        self.cache.compact(compaction.model_rows(self.cfg))


def cache_bytes(model: CacheableModel, batch: int, seq_len: int) -> int:
    """Bytes of the K and V caches of ``batch`` rows of ``seq_len`` positions."""
    layers, kv_heads, head_dim = kv_geometry(model)
    per_position = 2 * layers * kv_heads * head_dim
    return per_position * batch * seq_len * model.dtype.itemsize


def free_device_memory(device: torch.device) -> Optional[int]:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``); ``None`` elsewhere (host
    memory is not checked)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def check_cache_fits(model: CacheableModel, batch: int, seq_len: int,
                     free_bytes: Optional[int] = None) -> None:
    """Refuses a block cache that cannot fit in the device's free memory, before allocating.

    Args:
        batch: rows the model sees (``2B`` with classifier-free guidance).
        seq_len: prompt plus generated length.
        free_bytes: free memory to check against; default: the model device's
            (:func:`free_device_memory`; nothing is checked off CUDA).
    Raises:
        MemoryError naming the need, the free memory and the largest batch (at this length)
        and length (at this batch) that fit.
    """
    if free_bytes is None:
        free_bytes = free_device_memory(model.device)
    if free_bytes is None:
        return
    need = cache_bytes(model, batch, seq_len)
    if need <= free_bytes:
        return
    per_row = cache_bytes(model, 1, seq_len)
    per_position = cache_bytes(model, batch, 1)
    gib = 2.0 ** 30
    raise MemoryError(
        f"the block cache needs {need / gib:.1f} GiB for {batch} rows x {seq_len} positions "
        f"({kv_geometry(model)[0]} layers of K and V), but {free_bytes / gib:.1f} GiB are free "
        f"on {model.device}: at most {free_bytes // per_row} rows at this length, or "
        f"{free_bytes // per_position} positions at this batch, fit (classifier-free guidance "
        f"doubles the rows)")
