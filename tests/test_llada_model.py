"""genjo_fast.models.LLaDAModel against an independent statement of the LLaDA architecture.

The statement below (`statement_logits`) is written from the architecture as
``docs/semantics.md`` states it, as plain functional torch over the state dict; it shares no
code with the model (not its modules, norm, RoPE or attention). Everything runs on CPU with
tiny, odd-sized models.
"""
from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genjo_fast
from genjo_fast import reference
from genjo_fast.attention import ATTENTION_BACKENDS
from genjo_fast.models import (LLaDAConfig, LLaDAModel, from_reference, is_llada, load_llada,
                               num_parameters, save_llada)
from genjo_fast.models.llada import RMSNorm, apply_rope, rope_tables
from genjo_fast.testing import random_prompts

P = "model.transformer."
BLOCK_KEYS = ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj",
              "up_proj", "ff_out")


# --------------------------------------------------------------------------------------------
# The independent statement
# --------------------------------------------------------------------------------------------

def stmt_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, back to the input dtype, then times the weight."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt((x32 * x32).mean(dim=-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def stmt_rotate(t: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE of ``t`` ``(B, H, L, D)`` at absolute positions ``0 .. L-1``, in float32: the pair
    ``(i, i + D/2)`` turns by ``pos * theta^(-2i/D)``."""
    length, head_dim = t.shape[-2:]
    half = head_dim // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / head_dim)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * freq[None, :]
    cos, sin = angle.cos().to(torch.float32), angle.sin().to(torch.float32)
    t32 = t.to(torch.float32)
    a, b = t32[..., :half], t32[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(t.dtype)


def statement_logits(sd: dict, cfg: LLaDAConfig, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """LLaDA logits ``(B, L, embedding_size)`` computed in the state dict's dtype."""
    dt = sd[P + "wte.weight"].dtype
    heads, kv_heads = cfg.n_heads, cfg.n_kv_heads
    head_dim = cfg.d_model // heads
    batch, length = input_ids.shape

    def rms_norm(x, weight):
        return stmt_rms_norm(x, weight, cfg.rms_norm_eps)

    def rotate(t):
        return stmt_rotate(t, cfg.rope_theta)

    def heads_first(t, n):
        return t.reshape(batch, length, n, head_dim).permute(0, 2, 1, 3)

    bias = torch.zeros(batch, 1, 1, length, dtype=torch.float32)
    if attention_mask is not None:  # padded keys get a large negative bias, as the reference
        bias = bias.masked_fill(attention_mask[:, None, None, :] == 0,
                                torch.finfo(torch.float32).min)
    bias = bias.to(dt)

    x = sd[P + "wte.weight"][input_ids]
    for i in range(cfg.n_layers):
        w = {k: sd[f"{P}blocks.{i}.{k}.weight"] for k in BLOCK_KEYS}
        h = rms_norm(x, w["attn_norm"])
        q = rotate(heads_first(h @ w["q_proj"].T, heads))
        k = rotate(heads_first(h @ w["k_proj"].T, kv_heads))
        v = heads_first(h @ w["v_proj"].T, kv_heads)
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # query head j uses kv head j // g
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim) + bias  # never causal
        att = scores.softmax(dim=-1) @ v
        x = x + att.permute(0, 2, 1, 3).reshape(batch, length, cfg.d_model) @ w["attn_out"].T
        h = rms_norm(x, w["ff_norm"])
        x = x + (F.silu(h @ w["ff_proj"].T) * (h @ w["up_proj"].T)) @ w["ff_out"].T
    x = rms_norm(x, sd[P + "ln_f.weight"])
    head = sd[P + "wte.weight"] if cfg.weight_tying else sd[P + "ff_out.weight"]
    return x @ head.T


def reference_keys(cfg: LLaDAConfig) -> list:
    keys = [P + "wte.weight"]
    keys += [f"{P}blocks.{i}.{k}.weight" for i in range(cfg.n_layers) for k in BLOCK_KEYS]
    keys += [P + "ln_f.weight"] + ([] if cfg.weight_tying else [P + "ff_out.weight"])
    return keys


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def tiny_config(**overrides) -> LLaDAConfig:
    values = dict(d_model=48, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=72,
                  vocab_size=101, embedding_size=104, rope_theta=10000.0,
                  max_sequence_length=32)
    values.update(overrides)
    return LLaDAConfig(**values)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere, norms included (ones would hide where the weight goes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("wte.weight"):
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return model


def tiny_model(seed: int = 0, **overrides) -> LLaDAModel:
    return randomize_(LLaDAModel(tiny_config(**overrides)), seed)


def inputs(batch=3, length=13, vocab=101, seed=0, padded=True):
    ids, mask = random_prompts(batch, length, vocab, pad_id=0, seed=seed, padded=padded)
    return ids, (mask if padded else None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_state_dict_keys_are_the_reference_keys(tied):
    cfg = tiny_config(weight_tying=tied)
    model = LLaDAModel(cfg)
    assert list(model.state_dict()) == reference_keys(cfg)
    assert model.state_dict()[P + "wte.weight"].shape == (104, 48)
    if not tied:
        assert model.state_dict()[P + "ff_out.weight"].shape == (104, 48)
    assert model.config.model_type == "llada" and model.config.vocab_size == 101
    assert is_llada(model)


@pytest.mark.parametrize("n_kv_heads, tied, embedding_size, padded", [
    (4, False, 104, True),   # multi-head, LM head wider than the vocabulary
    (2, False, 101, True),   # GQA
    (1, True, 104, True),    # multi-query, tied embeddings
    (4, False, 101, False),  # no attention mask
])
def test_fp32_logits_match_the_statement(n_kv_heads, tied, embedding_size, padded):
    model = tiny_model(n_kv_heads=n_kv_heads, weight_tying=tied, embedding_size=embedding_size)
    ids, mask = inputs(padded=padded)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    want = statement_logits(state(model), model.config, ids, mask)
    assert got.shape == (3, 13, embedding_size) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


def test_padded_keys_are_ignored_by_every_real_query():
    model = tiny_model(n_kv_heads=2)
    ids, mask = inputs()
    other = ids.masked_fill(mask == 0, 57)  # different tokens under the padding only
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(other, attention_mask=mask).logits
    real = mask.bool()
    assert torch.equal(a[real], b[real])


def test_logits_slice_equals_slicing_the_full_logits():
    model = tiny_model(n_kv_heads=2)
    ids, mask = inputs()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        part = model(ids, attention_mask=mask, logits_slice=slice(5, 11)).logits
    assert part.shape == (3, 6, 104)
    torch.testing.assert_close(part, full[:, 5:11], rtol=0, atol=1e-6)


def test_kv_hook_and_positions_support_a_prefix_cache():
    """Keys/values recorded in a full pass, reused for a prefix, give the same suffix rows."""
    model = tiny_model(n_kv_heads=2)
    ids, mask = inputs()
    start = 6
    cache = {}

    def record(layer, k, v):
        cache[layer] = (k, v)
        return k, v

    def reuse_prefix(layer, k, v):
        pk, pv = cache[layer]
        return torch.cat([pk[:, :, :start], k], dim=2), torch.cat([pv[:, :, :start], v], dim=2)

    with torch.no_grad():
        full = model.forward_hidden(ids, mask, kv_hook=record)
        suffix = model.forward_hidden(ids[:, start:], mask, positions=torch.arange(start, 13),
                                      kv_hook=reuse_prefix)
        per_row = model.forward_hidden(ids[:, start:], mask,
                                       positions=torch.arange(start, 13).expand(3, -1),
                                       kv_hook=reuse_prefix)
    assert cache[0][0].shape == (3, 2, 13, 12)
    torch.testing.assert_close(suffix, full[:, start:], rtol=0, atol=1e-5)
    torch.testing.assert_close(per_row, suffix, rtol=0, atol=1e-6)


def test_bf16_error_is_within_the_plain_statement_error():
    """flash-attention's rule: the fast bf16 forward may be at most ~1.5x as far from the
    float32 result as the plain statement run in bf16 is (same bf16 weights for both).
    A batch of 8 x 31 keeps the maxima stable (the ratio stays below 1.25 over 20 seeds)."""
    model = tiny_model(n_kv_heads=2).to(torch.bfloat16)
    ids, mask = inputs(batch=8, length=31)
    sd16 = state(model)
    truth = statement_logits({k: v.float() for k, v in sd16.items()}, model.config, ids, mask)
    with torch.no_grad():
        fast = model(ids, attention_mask=mask).logits
    plain = statement_logits(sd16, model.config, ids, mask)
    assert fast.dtype == torch.bfloat16 and plain.dtype == torch.bfloat16
    fast_err, plain_err = (fast.float() - truth).abs(), (plain.float() - truth).abs()
    eps = 1e-6 * truth.abs().max().item()
    assert fast_err.max() <= 1.5 * plain_err.max() + eps, (fast_err.max(), plain_err.max())
    assert fast_err.mean() <= 1.5 * plain_err.mean() + eps, (fast_err.mean(), plain_err.mean())


def test_rmsnorm_and_rope_rounding_in_bf16():
    """The two places where the reference fixes the order of float32 work and rounding."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(3, 13, 48, generator=g)).to(torch.bfloat16)
    norm = RMSNorm(48, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(48, generator=g))
        got = norm(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, stmt_rms_norm(x, norm.weight, 1e-5))
    # Applying the weight before rounding (in float32) gives other values: the check bites.
    x32 = x.float()
    early = (norm.weight.float() * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert not torch.equal(got, early.to(torch.bfloat16))

    q = torch.randn(3, 4, 13, 12, generator=g).to(torch.bfloat16)
    cos, sin = rope_tables(12, 13, 10000.0, torch.device("cpu"))
    assert cos.dtype == torch.float32
    # Rotated in float32 and rounded once.
    assert torch.equal(apply_rope(q, cos, sin), apply_rope(q.float(), cos, sin).to(q.dtype))
    torch.testing.assert_close(apply_rope(q.float(), cos, sin), stmt_rotate(q.float(), 10000.0),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS.names())
def test_attention_backends(backend, monkeypatch):
    """The model through every attention backend available here (a power-of-two head_dim,
    which the Triton kernel needs; on CPU it runs in the Triton interpreter)."""
    try:
        ATTENTION_BACKENDS.resolve(backend, torch.device("cpu"))
    except RuntimeError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("GENJO_FAST_ATTENTION", backend)
    model = tiny_model(d_model=64, n_kv_heads=2, n_layers=1)
    ids, mask = inputs(length=9)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    assert rel_err(got, statement_logits(state(model), model.config, ids, mask)) < 1e-5


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def test_save_load_round_trip_fp32_and_bf16(tmp_path):
    model = tiny_model(n_kv_heads=2)
    save_llada(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "llada" and written["architectures"] == ["LLaDAModelLM"]
    assert written["d_model"] == 48 and written["n_kv_heads"] == 2 and written["rope"] is True
    assert (tmp_path / "model.safetensors").is_file()

    ids, mask = inputs()
    loaded = load_llada(tmp_path, dtype=torch.float32)
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits,
                           model(ids, attention_mask=mask).logits)

    loaded16 = load_llada(tmp_path)  # bfloat16 by default
    assert {p.dtype for p in loaded16.parameters()} == {torch.bfloat16}
    assert loaded16.dtype == torch.bfloat16 and loaded16.device == torch.device("cpu")
    with torch.no_grad():
        assert loaded16(ids, attention_mask=mask).logits.dtype == torch.bfloat16


def test_sharded_checkpoint_with_index(tmp_path):
    model = tiny_model(weight_tying=True)
    save_llada(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(reference_keys(model.config))
    loaded = load_llada(tmp_path, dtype=torch.float32)
    ids, mask = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits,
                           model(ids, attention_mask=mask).logits)
    with pytest.raises(FileExistsError):
        save_llada(model, tmp_path)


def _write_config(path, cfg):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))


def test_bin_checkpoints_single_and_indexed(tmp_path):
    model = tiny_model(n_kv_heads=1)
    sd = state(model)
    ids, mask = inputs()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits

    single = tmp_path / "single"
    _write_config(single, model.config)
    torch.save(sd, single / "pytorch_model.bin")
    with torch.no_grad():
        assert torch.equal(load_llada(single, dtype=torch.float32)(ids, mask).logits, want)

    indexed = tmp_path / "indexed"
    _write_config(indexed, model.config)
    keys = list(sd)
    parts = {"pytorch_model-00001-of-00002.bin": keys[:7],
             "pytorch_model-00002-of-00002.bin": keys[7:]}
    for name, part in parts.items():
        torch.save({k: sd[k] for k in part}, indexed / name)
    weight_map = {k: name for name, part in parts.items() for k in part}
    (indexed / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with torch.no_grad():
        assert torch.equal(load_llada(indexed, dtype=torch.float32)(ids, mask).logits, want)


class _NotATensor:
    """Any pickled object other than tensors/containers must be refused."""


def test_bin_is_read_with_weights_only(tmp_path):
    model = tiny_model()
    _write_config(tmp_path, model.config)
    sd = state(model)
    sd["payload"] = _NotATensor()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        load_llada(tmp_path)


def _resave(path, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    (path / "model.safetensors").unlink()
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_unexpected_and_misshapen_weights_are_named(tmp_path):
    model = tiny_model(n_kv_heads=2)
    save_llada(model, tmp_path)
    key = P + "blocks.1.k_proj.weight"

    _resave(tmp_path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"lacks 1 weight.*blocks\.1\.k_proj\.weight"):
        load_llada(tmp_path)

    _resave(tmp_path, lambda t: t.update({key: torch.zeros(48, 48)}))
    with pytest.raises(ValueError) as info:
        load_llada(tmp_path)
    assert key in str(info.value) and "(24, 48)" in str(info.value)
    assert "(48, 48)" in str(info.value)

    def add_extra(t):
        t[key] = torch.zeros(24, 48)
        t[P + "blocks.0.q_proj.bias"] = torch.zeros(48)
    _resave(tmp_path, add_extra)
    with pytest.raises(ValueError, match=r"unexpected.*blocks\.0\.q_proj\.bias"):
        load_llada(tmp_path)

    def harmless(t):  # recomputed RoPE frequencies some exports carry
        t.pop(P + "blocks.0.q_proj.bias")
        t[P + "blocks.0.rotary_emb.inv_freq"] = torch.ones(6)
    _resave(tmp_path, harmless)
    load_llada(tmp_path)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

# The public LLaDA-8B-Instruct config.json (auto_map omitted).
LLADA_8B_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
    "block_group_size": 1, "block_type": "llama", "d_model": 4096, "embedding_dropout": 0.0,
    "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
    "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
    "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": 126336,
    "max_sequence_length": 4096, "mlp_hidden_size": 12288, "mlp_ratio": 4,
    "model_type": "llada", "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
    "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
    "vocab_size": 126464, "weight_tying": False,
}


def test_llada_8b_config():
    cfg = LLaDAConfig.from_dict(LLADA_8B_CONFIG)
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.mlp_hidden_size,
            cfg.vocab_size, cfg.embedding_size, cfg.rope_theta) == (
        4096, 32, 32, 32, 12288, 126464, 126464, 500000.0)
    assert cfg.mask_token_id == 126336 and cfg == LLaDAConfig(
        mask_token_id=126336, eos_token_id=126081, pad_token_id=126081)
    assert round(num_parameters(cfg) / 1e9, 2) == 8.02  # built on the meta device
    assert LLaDAConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("flag, value", [
    ("alibi", True), ("include_bias", True), ("bias_for_layer_norm", True),
    ("include_qkv_bias", True), ("rope", False), ("block_type", "sequential"),
    ("activation_type", "gelu"), ("activation_type", "swiglu"), ("layer_norm_type", "default"),
    ("attention_layer_norm", True), ("clip_qkv", 8.0), ("scale_logits", True),
    ("input_emb_norm", True), ("rope_full_precision", False), ("rope_full_precision", None),
    ("layer_norm_with_affine", False), ("block_group_size", 2),
])
def test_unsupported_flags_raise_not_implemented(flag, value):
    with pytest.raises(NotImplementedError, match=flag):
        LLaDAConfig.from_dict({**LLADA_8B_CONFIG, flag: value})


def test_config_consistency_checks():
    assert LLaDAConfig.from_dict({**LLADA_8B_CONFIG, "n_kv_heads": None,
                                  "multi_query_attention": True}).n_kv_heads == 1
    with pytest.raises(ValueError, match="multi_query_attention"):
        LLaDAConfig.from_dict({**LLADA_8B_CONFIG, "n_kv_heads": 8, "multi_query_attention": True})
    with pytest.raises(ValueError, match="model_type"):
        LLaDAConfig.from_dict({**LLADA_8B_CONFIG, "model_type": "llama"})
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny_config(n_kv_heads=3)
    with pytest.raises(NotImplementedError, match="include_bias"):
        tiny_config(include_bias=True)


# --------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------

def reference_standin(cfg: LLaDAConfig, seed: int) -> nn.Module:
    """A stand-in for the reference ``LLaDAModelLM`` as transformers loads it.

    The real class is remote code on the model hub and cannot be downloaded here, so this
    reproduces what the adapter relies on: a ``transformers.PretrainedConfig`` with
    ``model_type == "llada"`` and the reference's module tree, whose parameter names are the
    checkpoint keys (``model.transformer.wte.weight``, ...).
    """
    from transformers import PretrainedConfig

    class LLaDAHFConfig(PretrainedConfig):
        model_type = "llada"

    values = {k: v for k, v in cfg.to_dict().items() if k != "model_type"}
    root = nn.Module()
    root.config = LLaDAHFConfig(**values)

    def norm():
        m = nn.Module()
        m.weight = nn.Parameter(torch.ones(cfg.d_model))
        return m

    def linear(i, o):
        return nn.Linear(i, o, bias=False)

    kv = cfg.n_kv_heads * cfg.head_dim
    blocks = nn.ModuleList()
    for _ in range(cfg.n_layers):
        b = nn.Module()
        b.attn_norm, b.ff_norm = norm(), norm()
        b.q_proj, b.k_proj = linear(cfg.d_model, cfg.d_model), linear(cfg.d_model, kv)
        b.v_proj, b.attn_out = linear(cfg.d_model, kv), linear(cfg.d_model, cfg.d_model)
        b.ff_proj = linear(cfg.d_model, cfg.mlp_hidden_size)
        b.up_proj = linear(cfg.d_model, cfg.mlp_hidden_size)
        b.ff_out = linear(cfg.mlp_hidden_size, cfg.d_model)
        blocks.append(b)
    transformer = nn.ModuleDict(dict(wte=nn.Embedding(cfg.embedding_size, cfg.d_model),
                                     emb_drop=nn.Dropout(0.0), ln_f=norm(), blocks=blocks))
    if not cfg.weight_tying:
        transformer["ff_out"] = linear(cfg.d_model, cfg.embedding_size)
    root.model = nn.Module()
    root.model.transformer = transformer
    return randomize_(root, seed)


@pytest.mark.parametrize("tied, n_kv_heads", [(False, 2), (True, 4)])
def test_from_reference_shares_the_weights(tied, n_kv_heads):
    cfg = tiny_config(weight_tying=tied, n_kv_heads=n_kv_heads)
    ref = reference_standin(cfg, seed=3)
    assert is_llada(ref)
    fast = from_reference(ref)
    ref_params = dict(ref.named_parameters())
    assert list(fast.state_dict()) == reference_keys(cfg)
    for name, p in fast.named_parameters():
        assert p is ref_params[name] and p.data_ptr() == ref_params[name].data_ptr()
    ids, mask = inputs()
    with torch.no_grad():
        got = fast(ids, attention_mask=mask).logits
    want = statement_logits(state(ref), cfg, ids, mask)
    assert rel_err(got, want) < 1e-5
    # The inner model (parameter names without the "model." prefix) adapts too.
    inner = ref.model
    inner.config = ref.config
    assert from_reference(inner).transformer.wte.weight is ref_params[P + "wte.weight"]


def test_from_reference_rejects_wrong_shapes_and_non_llada():
    cfg = tiny_config(n_kv_heads=2)
    ref = reference_standin(cfg, seed=0)
    ref.model.transformer.blocks[0].v_proj = nn.Linear(48, 40, bias=False)
    with pytest.raises(ValueError, match=r"blocks\.0\.v_proj\.weight.*\(24, 48\).*\(40, 48\)"):
        from_reference(ref)
    with pytest.raises(ValueError, match="not a LLaDA model"):
        from_reference(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

def test_generate_matches_the_reference_sampler_on_the_statement():
    model = tiny_model(seed=5, n_kv_heads=2, embedding_size=101)
    sd = state(model)
    prompt, mask = random_prompts(2, 7, 101, pad_id=0, avoid=(100,), seed=1)
    args = dict(steps=8, gen_length=8, block_length=4, mask_id=100)

    def statement_model(x, attention_mask=None):
        return statement_logits(sd, model.config, x, attention_mask)

    got = genjo_fast.generate(model, prompt, mask, **args)
    want = reference.generate(statement_model, prompt, mask, **args)
    assert got.shape == (2, 15)
    assert torch.equal(got, want)
    assert not (got == 100).any()


def test_generate_runs_the_fast_model_on_a_reference_llada_model():
    """generate recognises model_type "llada" and runs genjo_fast's model on the reference's
    own tensors: same tokens, the reference forward never called; fast_model=False keeps it."""
    cfg = tiny_config(n_kv_heads=2, embedding_size=101)
    ref = reference_standin(cfg, seed=4)
    calls = []

    def reference_forward(x, attention_mask=None):
        calls.append(x.shape)
        return type("Out", (), {"logits": statement_logits(state(ref), cfg, x, attention_mask)})

    ref.forward = reference_forward
    prompt, mask = random_prompts(2, 5, 101, pad_id=0, avoid=(100,), seed=2)
    args = dict(steps=8, gen_length=8, block_length=4, mask_id=100)
    want = reference.generate(ref, prompt, mask, **args)
    calls.clear()
    assert torch.equal(genjo_fast.generate(ref, prompt, mask, **args), want)
    assert calls == []
    assert torch.equal(genjo_fast.generate(ref, prompt, mask, fast_model=False, **args), want)
    assert len(calls) == 8


def test_load_rejects_a_dtype_that_is_not_a_float_dtype(tmp_path):
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        load_llada(tmp_path, dtype="bfloat16")
