"""Block-wise Dream with Fast-dLLM's accelerations (opt-in; cache/threshold/factor are
approximate) against their plain statement, reference_dream.diffusion_generate_blocks."""
import pytest
import torch

import genjo_fast
from genjo_fast import TensorDraws, reference_dream
from genjo_fast.testing import random_dream, random_prompts

VOCAB, MASK_ID, PAD_ID = 97, 96, 95
NEW, BLOCK = 12, 4


@pytest.fixture(autouse=True)
def _sdpa(monkeypatch):
    monkeypatch.setenv("GENJO_FAST_ATTENTION", "sdpa")


@pytest.fixture(scope="module")
def model():
    m = random_dream(VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=3, intermediate_size=48, seed=0, mask_token_id=MASK_ID)
    with torch.no_grad():
        m.lm_head.weight.mul_(8)  # peaked distributions: thresholds matter
        for layer in m.layers:  # strong attention mixing: stale cached K/V change outcomes
            layer.self_attn.o_proj.weight.mul_(3)
            layer.self_attn.v_proj.weight.mul_(2)
    return m


def run_both(model, batch, seed=0, **kw):
    inputs, attention_mask = random_prompts(batch, 6, VOCAB, pad_id=PAD_ID,
                                            avoid=(MASK_ID, PAD_ID), seed=batch)
    steps = kw.pop("steps", 6)
    g = torch.Generator().manual_seed(seed)
    size = (NEW, batch, 6 + NEW)
    draws = TensorDraws(remask=torch.rand(*size, generator=g),
                        token=torch.rand(*size, generator=g, dtype=torch.float64),
                        position=torch.rand(*size, generator=g, dtype=torch.float64))
    args = dict(max_new_tokens=NEW, steps=steps, block_length=BLOCK, mask_token_id=MASK_ID,
                alg=kw.pop("alg", "maskgit_plus"), **kw)
    want = reference_dream.diffusion_generate_blocks(model, inputs, attention_mask=attention_mask,
                                                     draws=draws, **args)
    got, stats = genjo_fast.diffusion_generate(model, inputs, attention_mask=attention_mask,
                                               draws=draws, return_stats=True, **args)
    return got, want, stats, (inputs, attention_mask, args)


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("rule", [{}, {"threshold": 0.6}, {"factor": 1.0}],
                         ids=["fixed", "threshold", "factor"])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_statement(model, cache, rule, batch):
    got, want, _, _ = run_both(model, batch, cache=cache, **rule)
    assert torch.equal(got, want)
    assert not (got == MASK_ID).any()


@pytest.mark.parametrize("options", [
    dict(alg="entropy"), dict(alg="topk_margin", cache="dual"),
    dict(alg="origin", cache="prefix"), dict(alg="maskgit_plus", alg_temp=0.3, cache="dual"),
    dict(temperature=0.8, top_p=0.9, cache="dual"), dict(temperature=1.0, threshold=0.5),
    dict(cache="dual", refresh_every=2),
], ids=lambda o: "_".join(f"{k}{v}" for k, v in o.items()))
def test_options_match_statement(model, options):
    got, want, _, _ = run_both(model, 3, **options)
    assert torch.equal(got, want)


def test_one_block_without_cache_is_upstream(model):
    """One block over the whole answer, no cache: upstream's sampler itself."""
    inputs, attention_mask = random_prompts(3, 6, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID, PAD_ID))
    kw = dict(max_new_tokens=NEW, steps=6, mask_token_id=MASK_ID, alg="entropy")
    want = reference_dream.diffusion_generate(model, inputs, attention_mask=attention_mask, **kw)
    got = genjo_fast.diffusion_generate(model, inputs, attention_mask=attention_mask,
                                        block_length=NEW, **kw)
    assert torch.equal(got, want)


def test_approximations_are_exercised(model):
    """The cache and the threshold do change tokens on this model (else the tests above could
    not tell a cache from a full forward); refresh_every=1 is exact again."""
    exact, *_ = run_both(model, 3)
    changed = [not torch.equal(run_both(model, 3, **kw)[0], exact)
               for kw in (dict(cache="prefix"), dict(cache="dual"), dict(threshold=0.5))]
    assert all(changed)
    refreshed, _, stats, _ = run_both(model, 3, cache="dual", refresh_every=1)
    assert torch.equal(refreshed, exact) and stats.full_forwards == stats.nfe


def test_nfe_counts(model):
    _, _, stats, _ = run_both(model, 1, cache="dual", steps=6)
    assert (stats.nfe, stats.full_forwards) == (6, 3)  # one full forward per block
    _, _, stats, _ = run_both(model, 3, cache="prefix", threshold=0.5)
    assert stats.nfe <= NEW and stats.full_forwards == 3


@pytest.mark.parametrize("kw,match", [
    (dict(cache="dual"), "cache, threshold and factor need block_length"),
    (dict(block_length=5), "must be a multiple of block_length"),
    (dict(block_length=4, steps=4), r"steps \(4\) must be a multiple of the number of blocks 3"),
    (dict(block_length=4, threshold=0.9, alg="origin"), "threshold and factor rank positions"),
    (dict(block_length=4, cache="full"), "cache must be None, 'prefix' or 'dual'"),
    (dict(block_length=4, threshold=1.5), r"threshold must be in \[0, 1\]"),
    (dict(block_length=4, generation_logits_hook_func=lambda s, x, l: l),
     "not with block_length"),
])
def test_bad_block_arguments(model, kw, match):
    args = dict(max_new_tokens=NEW, steps=6, mask_token_id=MASK_ID, alg="maskgit_plus")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        genjo_fast.diffusion_generate(model, torch.tensor([[1, 2, 3]]), **args)
