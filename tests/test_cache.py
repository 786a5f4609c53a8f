"""Block cache and parallel decoding (approximate, opt-in) against their plain statement."""
import pytest
import torch

import genjo_fast
from genjo_fast import TensorDraws, reference
from genjo_fast.testing import TinyBidirectionalLM, random_llada, random_prompts

VOCAB, MASK_ID, PAD_ID = 101, 100, 0


@pytest.fixture(autouse=True)
def _sdpa(monkeypatch):
    monkeypatch.setenv("GENJO_FAST_ATTENTION", "sdpa")  # the interpreter is tested elsewhere


@pytest.fixture(scope="module")
def model():
    m = random_llada(VOCAB, d_model=32, n_heads=2, n_kv_heads=1, n_layers=3,
                     mlp_hidden_size=48, max_len=64, seed=0)
    with torch.no_grad():
        m.transformer.ff_out.weight.mul_(12)  # peaked distributions: thresholds matter
        for block in m.blocks:  # strong attention mixing: stale cached K/V change outcomes
            block.attn_out.weight.mul_(3)
            block.v_proj.weight.mul_(2)
    return m


def run_both(model, batch, seed=0, temperature=0.0, remasking="low_confidence", padded=True,
             **kw):
    prompt, attention_mask = random_prompts(batch, 6, VOCAB, pad_id=PAD_ID,
                                            avoid=(MASK_ID, PAD_ID), seed=batch, padded=padded)
    gen_length = kw.get("gen_length", 12)
    g = torch.Generator().manual_seed(seed)
    draws = TensorDraws(
        torch.rand(gen_length, batch, 6 + gen_length, VOCAB, generator=g, dtype=torch.float64)
        if temperature > 0 else None,
        torch.rand(gen_length, batch, 6 + gen_length, generator=g)
        if remasking == "random" else None)
    args = dict(steps=12, gen_length=12, block_length=4, mask_id=MASK_ID,
                temperature=temperature, remasking=remasking)
    args.update(kw)
    want = reference.generate_approximate(model, prompt, attention_mask, draws=draws, **args)
    got, stats = genjo_fast.generate(model, prompt, attention_mask, draws=draws,
                                     return_stats=True, **args)
    return got, want, stats, (prompt, attention_mask, args, draws)


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("rule", [{}, {"threshold": 0.6}, {"factor": 1.0}],
                         ids=["fixed", "threshold", "factor"])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_statement(model, cache, rule, batch):
    kw = dict(cache=cache, **rule)
    if cache is None and not rule:
        kw["steps"] = 6  # two tokens per step
    got, want, stats, _ = run_both(model, batch, **kw)
    assert torch.equal(got, want)
    assert not (got == MASK_ID).any()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("options", [
    dict(refresh_every=2),
    dict(cfg_scale=1.5),
    dict(temperature=1.0),
    dict(temperature=0.8, remasking="random", threshold=0.5),
    dict(logits_eos_inf=True, confidence_eos_eot_inf=True, eos_id=7, eot_id=9, threshold=0.3),
    dict(cfg_scale=0.5, threshold=0.7, refresh_every=3),
], ids=str)
def test_options_match_statement(model, cache, options):
    got, want, _, _ = run_both(model, 3, cache=cache, **options)
    assert torch.equal(got, want)


def test_approximations_are_exercised(model):
    """On this model the caches and threshold decoding do change the tokens, so the tests
    above compare real approximations, not the exact path under another name."""
    exact, *_ = run_both(model, 3)
    outputs = {}
    for mode in ("prefix", "dual"):
        outputs[mode], *_ = run_both(model, 3, cache=mode)
        assert not torch.equal(outputs[mode], exact)
    assert not torch.equal(outputs["prefix"], outputs["dual"])
    _, _, stats, _ = run_both(model, 3, threshold=0.5)
    assert stats.nfe < 12  # several tokens per step


def test_cfg_with_cache_without_attention_mask(model):
    got, want, _, _ = run_both(model, 2, cache="dual", cfg_scale=1.0, padded=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_refresh_every_step_is_exact(model, cache):
    """refresh_every=1 recomputes every step: exactly the default (exact) generate."""
    got, _, stats, (prompt, attention_mask, args, _) = run_both(model, 3, cache=cache,
                                                                 refresh_every=1, steps=6)
    assert torch.equal(got, genjo_fast.generate(model, prompt, attention_mask, **args))
    assert (stats.nfe, stats.full_forwards) == (6, 6)


def test_threshold_one_is_one_token_per_step(model):
    """A threshold no confidence reaches (1: no probability here is exactly 1) transfers only
    the most confident position per step: the fixed schedule with steps = gen_length."""
    got, _, stats, (prompt, attention_mask, args, _) = run_both(model, 3, threshold=1.0)
    events = []
    args.update(steps=12)
    want = genjo_fast.generate(model, prompt, attention_mask,
                               observer=lambda e: events.append(e.confidence.max()), **args)
    assert torch.equal(got, want)
    assert stats.nfe == 12
    assert max(events) < 1  # the premise: no confidence reached the threshold


def test_threshold_zero_is_one_step_per_block(model):
    got, _, stats, _ = run_both(model, 3, threshold=0.0, cache="dual")
    assert (stats.nfe, stats.full_forwards) == (3, 3)  # all pass at each block's first step


def test_nfe_counts(model):
    _, _, stats, _ = run_both(model, 1, cache="dual", steps=12)
    assert (stats.nfe, stats.full_forwards) == (12, 3)  # one full forward per block
    _, _, stats, _ = run_both(model, 1, cache="dual", steps=12, refresh_every=2)
    assert (stats.nfe, stats.full_forwards) == (12, 6)
    _, _, stats, _ = run_both(model, 3, cache="prefix", threshold=0.6)
    assert stats.nfe <= 12 and stats.full_forwards == 3


def test_rows_finish_blocks_independently(model):
    """With threshold decoding, a row whose block is done stops changing while others go on."""
    prompt, attention_mask = random_prompts(4, 6, VOCAB, pad_id=PAD_ID,
                                            avoid=(MASK_ID, PAD_ID), seed=7)
    events = []
    genjo_fast.generate(model, prompt, attention_mask, steps=12, gen_length=12, block_length=4,
                        mask_id=MASK_ID, threshold=0.6, cache="dual",
                        observer=lambda e: events.append((e.block, e.transfer.sum(1),
                                                          e.confidence)))
    for block, counts, confidence in events:
        finished = torch.isinf(confidence).all(1)
        assert (counts[finished] == 0).all()
        assert (counts[~finished] >= 1).all()


def test_cache_needs_llada_model():
    generic = TinyBidirectionalLM(VOCAB, d_model=16, n_heads=2, n_layers=1)
    with pytest.raises(ValueError, match="cache='dual' needs a LLaDA model"):
        genjo_fast.generate(generic, torch.tensor([[1, 2]]), steps=4,
                            gen_length=4, block_length=4, mask_id=MASK_ID, cache="dual")


@pytest.mark.parametrize("kw,match", [
    (dict(cache="full"), "cache must be None, 'prefix' or 'dual'"),
    (dict(refresh_every=2), "refresh_every needs a cache"),
    (dict(cache="dual", refresh_every=0), "refresh_every must be >= 1"),
    (dict(threshold=0.5, factor=1.0), "threshold and factor are exclusive"),
    (dict(threshold=-0.1), "threshold must be finite and >= 0"),
    (dict(threshold=1.01), r"threshold must be in \[0, 1\]"),
    (dict(factor=float("inf")), "factor must be finite and >= 0"),
    (dict(factor=0.0), "factor must be > 0"),
    (dict(cache="dual", cuda_graph=True), "cuda_graph=True needs the model on a CUDA device"),
])
def test_bad_approximate_arguments(model, kw, match):
    with pytest.raises(ValueError, match=match):
        genjo_fast.generate(model, torch.tensor([[1, 2]]), steps=4, gen_length=4,
                            block_length=4, mask_id=MASK_ID, **kw)


def test_cache_memory_check_names_what_fits():
    """LLaDA-8B's shape at batch 64 x 4096 needs 128 GiB of K/V in bf16: refused before any
    allocation, naming the largest batch and length that fit."""
    from genjo_fast.cache import cache_bytes, check_cache_fits
    from genjo_fast.models import LLaDAConfig, LLaDAModel

    with torch.device("meta"):
        big = LLaDAModel(LLaDAConfig(d_model=4096, n_heads=32, n_layers=32,
                                     mlp_hidden_size=12288)).to(torch.bfloat16)
    assert cache_bytes(big, 64, 4096) == 2 * 32 * 4096 * 64 * 4096 * 2  # 128 GiB
    free = 80 * 2**30
    with pytest.raises(MemoryError, match=r"needs 128\.0 GiB for 64 rows x 4096 positions .* "
                                          r"80\.0 GiB are free .* at most 40 rows at this "
                                          r"length, or 2560 positions at this batch"):
        check_cache_fits(big, 64, 4096, free_bytes=free)
    check_cache_fits(big, 40, 4096, free_bytes=free)  # fits: no error
