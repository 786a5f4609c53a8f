"""genjo_fast.models.DreamModel against genjo_fast.testing.UpstreamShapedDream, an independent
statement of the Dream architecture with upstream's module names and numerics. Everything runs
on CPU with tiny, odd-sized models (head_dim 12, vocabulary 101)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from genjo_fast.attention import ATTENTION_BACKENDS
from genjo_fast.models import (DreamConfig, DreamModel, dream_from_reference, is_dream,
                               is_llada, load_dream, save_dream)
from genjo_fast.testing import UpstreamShapedDream, random_dream, random_prompts

LAYER_KEYS = [f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")] + [
    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]


def upstream_keys(cfg: DreamConfig) -> set:
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    keys |= {f"model.layers.{i}.{k}" for i in range(cfg.num_hidden_layers) for k in LAYER_KEYS}
    return keys if cfg.tie_word_embeddings else keys | {"lm_head.weight"}


def tiny_config(**overrides) -> DreamConfig:
    values = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, intermediate_size=72, vocab_size=101, rope_theta=10000.0,
                  max_position_embeddings=64, mask_token_id=100, pad_token_id=0)
    values.update(overrides)
    return DreamConfig(**values)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere, norms and biases included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return model


def tiny_model(seed: int = 0, **overrides) -> DreamModel:
    return randomize_(DreamModel(tiny_config(**overrides)), seed)


def upstream_of(model: DreamModel) -> UpstreamShapedDream:
    up = UpstreamShapedDream(model.config.to_dict()).to(model.dtype)
    up.load_state_dict(model.state_dict(), strict=not model.config.tie_word_embeddings)
    return up


def padded_inputs(batch=3, length=13, seed=0):
    """Left-padded ids with upstream's model inputs: the (B, 1, L, L) AND mask and tok_idx."""
    ids, mask = random_prompts(batch, length, 101, pad_id=0, seed=seed)
    tok_idx = mask.cumsum(-1) - 1
    tok_idx.masked_fill_(mask == 0, 1)
    real = mask.bool()
    return ids, mask, real[:, None, None, :] & real[:, None, :, None], tok_idx


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_state_dict_keys_are_upstream_keys(tied):
    cfg = tiny_config(tie_word_embeddings=tied)
    model = DreamModel(cfg)
    assert set(model.state_dict()) == upstream_keys(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (24, 48)
    assert shapes["model.layers.1.self_attn.k_proj.bias"] == (24,)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (48, 72)
    assert set(model.state_dict()) == set(UpstreamShapedDream(cfg.to_dict()).state_dict()) - (
        {"lm_head.weight"} if tied else set())
    assert is_dream(model) and not is_llada(model) and model.config.model_type == "Dream"
    assert is_dream(UpstreamShapedDream(cfg.to_dict()))


@pytest.mark.parametrize("kv_heads, tied, padded", [
    (2, False, True),   # GQA, left padding with upstream's 4-D mask and positions
    (4, False, True),   # multi-head
    (1, True, True),    # multi-query, tied embeddings
    (2, False, False),  # "full" attention, positions 0..L-1
])
def test_fp32_logits_match_the_statement(kv_heads, tied, padded):
    model = tiny_model(num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    ids, mask2, mask4, tok_idx = padded_inputs()
    mask, pos = (mask4, tok_idx) if padded else ("full", None)
    with torch.no_grad():
        got = model(ids, mask, pos).logits
        want = upstream_of(model)(ids, mask, pos).logits
    assert got.shape == (3, 13, 101) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5  # every row, padded queries included


def test_mask_forms_agree_and_padding_is_ignored():
    """The (B, L) and (B, 1, L, L) masks mean the same; padded tokens never reach real rows;
    padded queries get a zero attention output (their rows are the statement's too)."""
    model = tiny_model()
    ids, mask2, mask4, tok_idx = padded_inputs()
    other = ids.masked_fill(mask2 == 0, 57)  # different tokens under the padding only
    with torch.no_grad():
        a = model(ids, mask4, tok_idx).logits
        b = model(ids, mask2, tok_idx).logits
        c = model(other, mask4, tok_idx).logits
        full = model(ids, torch.ones_like(mask2), None).logits  # no 0: full attention
        assert torch.equal(full, model(ids, "full").logits)
        assert torch.equal(full, model(ids).logits)
    assert torch.equal(a, b)
    real = mask2.bool()
    assert torch.equal(a[real], c[real])
    assert not torch.equal(a[real], full[real])  # the mask does change real rows


def test_bad_masks_are_rejected():
    model = tiny_model()
    ids, mask2, mask4, _ = padded_inputs()
    general = mask4.clone()
    general[0, 0, 5, 6] = False  # not an outer product any more
    with pytest.raises(ValueError, match="outer product"):
        model(ids, general)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(ids, mask2[:, :5])
    with pytest.raises(ValueError, match="'full'"):
        model(ids, "causal")


def test_positions_are_applied():
    """Upstream's tok_idx shifts the rotary positions of a left-padded row."""
    model = tiny_model()
    ids, _, mask4, tok_idx = padded_inputs()
    with torch.no_grad():
        shifted = model(ids, mask4, tok_idx).logits
        plain = model(ids, mask4, None).logits
    assert torch.equal(shifted[0], plain[0])  # row 0 has no padding: tok_idx is 0..L-1
    assert not torch.allclose(shifted[2], plain[2])


def test_logits_slice_equals_slicing_the_full_logits():
    model = tiny_model()
    ids, _, mask4, tok_idx = padded_inputs()
    with torch.no_grad():
        full = model(ids, mask4, tok_idx).logits
        part = model(ids, mask4, tok_idx, logits_slice=slice(5, 11)).logits
    assert part.shape == (3, 6, 101)
    torch.testing.assert_close(part, full[:, 5:11], rtol=0, atol=1e-6)


def test_lm_head_is_final_norm_and_head():
    """``lm_head(hidden)`` takes the hidden states before the final norm (LLaDAModel's
    contract), so forward_hidden + lm_head is forward."""
    model = tiny_model()
    ids, mask2, mask4, tok_idx = padded_inputs()
    with torch.no_grad():
        hidden = model.forward_hidden(ids, mask2, tok_idx, query_mask=mask2.bool())
        assert torch.equal(model.lm_head(hidden), model(ids, mask4, tok_idx).logits)
        plain = torch.nn.functional.linear(hidden, model.lm_head.weight)
        assert not torch.allclose(model.lm_head(hidden), plain)


def test_kv_hook_and_positions_support_a_prefix_cache():
    model = tiny_model()
    ids, mask, _, _ = padded_inputs()
    start, cache = 6, {}

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
    assert cache[0][0].shape == (3, 2, 13, 12)
    torch.testing.assert_close(suffix, full[:, start:], rtol=0, atol=1e-5)


def test_bf16_error_is_within_the_statement_error():
    """The fast bf16 forward may be at most ~1.5x as far from the float32 result as the
    upstream-shaped statement run in bf16 (same bf16 weights)."""
    model = tiny_model(seed=1).to(torch.bfloat16)
    ids, _, mask4, tok_idx = padded_inputs(batch=8, length=31, seed=1)
    up16 = upstream_of(model)
    truth_model = UpstreamShapedDream(model.config.to_dict())
    truth_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        truth = truth_model(ids, mask4, tok_idx).logits
        fast = model(ids, mask4, tok_idx).logits
        plain = up16(ids, mask4, tok_idx).logits
    assert fast.dtype == torch.bfloat16 and plain.dtype == torch.bfloat16
    fast_err, plain_err = (fast.float() - truth).abs(), (plain.float() - truth).abs()
    eps = 1e-6 * truth.abs().max().item()
    assert fast_err.max() <= 1.5 * plain_err.max() + eps, (fast_err.max(), plain_err.max())
    assert fast_err.mean() <= 1.5 * plain_err.mean() + eps, (fast_err.mean(), plain_err.mean())


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS.names())
def test_attention_backends(backend, monkeypatch):
    """Every attention backend available here (head_dim 16, a power of two for Triton)."""
    try:
        ATTENTION_BACKENDS.resolve(backend, torch.device("cpu"))
    except RuntimeError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("GENJO_FAST_ATTENTION", backend)
    model = tiny_model(hidden_size=64, num_hidden_layers=1)
    ids, _, mask4, tok_idx = padded_inputs(length=9)
    with torch.no_grad():
        got = model(ids, mask4, tok_idx).logits
        want = upstream_of(model)(ids, mask4, tok_idx).logits
    assert rel_err(got, want) < 1e-5


def test_random_dream():
    model = random_dream(vocab_size=101, hidden_size=48, num_key_value_heads=2,
                         dtype=torch.bfloat16, mask_token_id=100)
    assert model.dtype == torch.bfloat16 and model.config.mask_token_id == 100
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in model.parameters())
    attn = model.layers[0].self_attn
    assert attn.q_proj.bias.abs().sum() > 0 and model.lm_head.weight.abs().sum() > 0
    assert torch.equal(model.model.norm.weight, torch.ones(48, dtype=torch.bfloat16))
    again = random_dream(vocab_size=101, hidden_size=48, num_key_value_heads=2,
                         dtype=torch.bfloat16, mask_token_id=100)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def test_save_load_round_trip_fp32_and_bf16(tmp_path):
    model = tiny_model()
    save_dream(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "Dream" and written["architectures"] == ["DreamModel"]
    assert written["hidden_size"] == 48 and written["num_key_value_heads"] == 2
    assert written["torch_dtype"] == "float32"
    ids, _, mask4, tok_idx = padded_inputs()
    loaded = load_dream(tmp_path, dtype=torch.float32)
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask4, tok_idx).logits, model(ids, mask4, tok_idx).logits)
    loaded16 = load_dream(tmp_path)  # bfloat16 by default
    assert {p.dtype for p in loaded16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert loaded16(ids, mask4, tok_idx).logits.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        load_dream(tmp_path, dtype="bfloat16")


def test_sharded_checkpoint_with_index(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    save_dream(model, tmp_path, max_shard_bytes=30_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == upstream_keys(model.config)
    loaded = load_dream(tmp_path, dtype=torch.float32)
    ids, _, mask4, tok_idx = padded_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask4, tok_idx).logits, model(ids, mask4, tok_idx).logits)
    with pytest.raises(FileExistsError):
        save_dream(model, tmp_path)


def _resave(path, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    (path / "model.safetensors").unlink()
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_unexpected_and_misshapen_weights_are_named(tmp_path):
    model = tiny_model()
    save_dream(model, tmp_path)
    key = "model.layers.1.self_attn.k_proj.bias"

    _resave(tmp_path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"lacks 1 weight.*layers\.1\.self_attn\.k_proj\.bias"):
        load_dream(tmp_path)

    _resave(tmp_path, lambda t: t.update({key: torch.zeros(48)}))
    with pytest.raises(ValueError) as info:
        load_dream(tmp_path)
    assert key in str(info.value) and "(24,)" in str(info.value) and "(48,)" in str(info.value)

    def add_extra(t):
        t[key] = torch.zeros(24)
        t["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(48)
    _resave(tmp_path, add_extra)
    with pytest.raises(ValueError, match=r"unexpected.*o_proj\.bias"):
        load_dream(tmp_path)

    def harmless(t):  # recomputed RoPE frequencies some exports carry
        t.pop("model.layers.0.self_attn.o_proj.bias")
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)
    _resave(tmp_path, harmless)
    load_dream(tmp_path)


def test_tied_checkpoint_may_carry_lm_head_and_bin_is_refused(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    save_dream(model, tmp_path)
    _resave(tmp_path, lambda t: t.update({"lm_head.weight": torch.zeros(101, 48)}))
    loaded = load_dream(tmp_path, dtype=torch.float32)  # the head is the embedding
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_dream(bin_dir)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

# Dream-7B's architecture fields (Dream-v0-Instruct-7B), with upstream's key names.
DREAM_7B_CONFIG = {
    "architectures": ["DreamModel"], "model_type": "Dream", "hidden_act": "silu",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": None,
    "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28,
    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": False,
    "mask_token_id": 151666, "pad_token_id": 151643, "bos_token_id": 151643,
    "eos_token_id": 151643, "torch_dtype": "bfloat16",
}


def test_dream_7b_config():
    cfg = DreamConfig.from_dict(DREAM_7B_CONFIG)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (
        3584, 28, 28, 4, 18944, 152064, 128)
    assert cfg == DreamConfig(bos_token_id=151643)  # the dataclass defaults are Dream-7B's
    with torch.device("meta"):
        params = sum(p.numel() for p in DreamModel(cfg).parameters())
    assert round(params / 1e9, 2) == 7.62  # Qwen2.5-7B's count: 7.62B with untied head
    assert DreamConfig.from_dict(cfg.to_dict()) == cfg
    # Keys a config.json leaves out take upstream's DreamConfig defaults.
    bare = DreamConfig.from_dict({"model_type": "Dream"})
    assert (bare.hidden_size, bare.num_key_value_heads, bare.vocab_size, bare.rope_theta) == (
        4096, 32, 151936, 10000.0)
    assert DreamConfig.from_dict({**DREAM_7B_CONFIG,
                                  "rope_scaling": {"rope_type": "default"}}).head_dim == 128


@pytest.mark.parametrize("flag, value", [
    ("hidden_act", "gelu"), ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}), ("use_sliding_window", True),
])
def test_unsupported_flags_raise_not_implemented(flag, value):
    with pytest.raises(NotImplementedError, match=flag):
        DreamConfig.from_dict({**DREAM_7B_CONFIG, flag: value})


def test_config_consistency_checks():
    with pytest.raises(ValueError, match="model_type"):
        DreamConfig.from_dict({**DREAM_7B_CONFIG, "model_type": "qwen2"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_size"):
        tiny_config(hidden_size=50)
    assert tiny_config(num_key_value_heads=None).num_key_value_heads == 4


# --------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_dream_from_reference_shares_the_weights(tied):
    ref = randomize_(UpstreamShapedDream(tiny_config(tie_word_embeddings=tied).to_dict()), 3)
    fast = dream_from_reference(ref)
    ref_params = dict(ref.named_parameters())
    assert set(fast.state_dict()) == upstream_keys(fast.config)
    for name, p in fast.named_parameters():
        assert p is ref_params[name] and p.data_ptr() == ref_params[name].data_ptr()
    ids, _, mask4, tok_idx = padded_inputs()
    with torch.no_grad():
        assert rel_err(fast(ids, mask4, tok_idx).logits, ref(ids, mask4, tok_idx).logits) < 1e-5
        ref.model.norm.weight.mul_(2)  # one model's weights changed in place: both change
        assert rel_err(fast(ids, mask4, tok_idx).logits, ref(ids, mask4, tok_idx).logits) < 1e-5


def test_dream_from_reference_rejects_bad_models():
    ref = UpstreamShapedDream(tiny_config().to_dict())
    ref.model.layers[0].self_attn.v_proj = nn.Linear(48, 40)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.v_proj\.weight.*\(24, 48\)"):
        dream_from_reference(ref)
    tied = UpstreamShapedDream(tiny_config(tie_word_embeddings=True).to_dict())
    tied.lm_head.weight = nn.Parameter(torch.zeros(101, 48))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        dream_from_reference(tied)
    with pytest.raises(ValueError, match="not a Dream model"):
        dream_from_reference(nn.Linear(2, 2))
