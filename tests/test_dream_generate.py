"""genjo_fast.diffusion_generate against the plain statement of Dream's sampler.

Identical tokens at temperature 0 (maskgit_plus / topk_margin / entropy, batched and
left-padded); identical tokens for every option when both are handed the same draws; the
hooks, the history and the return forms as upstream; bad input named.
"""
import pytest
import torch

import genjo_fast
from genjo_fast import TensorDraws, reference_dream
from genjo_fast.testing import UpstreamShapedDream, random_dream, random_prompts

VOCAB, MASK_ID, PAD_ID = 97, 96, 95


@pytest.fixture(autouse=True)
def _sdpa(monkeypatch):
    monkeypatch.setenv("GENJO_FAST_ATTENTION", "sdpa")  # the interpreter is tested elsewhere


@pytest.fixture(scope="module")
def fast():
    model = random_dream(VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, intermediate_size=48, seed=0,
                         mask_token_id=MASK_ID, pad_token_id=PAD_ID)
    with torch.no_grad():  # peaked distributions: fewer near-ties, more varied choices
        model.lm_head.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def upstream(fast):
    """The same weights in an independent statement of the architecture, called as upstream
    calls its model (4-D boolean mask, position ids)."""
    model = UpstreamShapedDream(fast.config.to_dict())
    model.load_state_dict(fast.state_dict())
    return model.eval()


def prompts(batch, padded=True, seed=0):
    return random_prompts(batch, 6, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID, PAD_ID), seed=seed,
                          padded=padded)


def draws_for(steps, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDraws(remask=torch.rand(steps, batch, length, generator=g),
                       token=torch.rand(steps, batch, length, generator=g, dtype=torch.float64),
                       position=torch.rand(steps, batch, length, generator=g,
                                           dtype=torch.float64))


def both(model, inputs, attention_mask, seed=0, **kw):
    length = inputs.shape[1] + kw["max_new_tokens"]
    draws = draws_for(kw["steps"], inputs.shape[0], length, seed)
    want = reference_dream.diffusion_generate(model, inputs, attention_mask=attention_mask,
                                              mask_token_id=MASK_ID, draws=draws, **kw)
    got = genjo_fast.diffusion_generate(model, inputs, attention_mask=attention_mask,
                                        mask_token_id=MASK_ID, draws=draws, **kw)
    return got, want


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("batch,padded", [(1, False), (3, True)])
@pytest.mark.parametrize("steps", [4, 10])
def test_temperature_zero_identical(fast, upstream, alg, batch, padded, steps):
    inputs, attention_mask = prompts(batch, padded)
    kw = dict(max_new_tokens=10, steps=steps, alg=alg)
    want = reference_dream.diffusion_generate(upstream, inputs, attention_mask=attention_mask,
                                              mask_token_id=MASK_ID, **kw)
    got = genjo_fast.diffusion_generate(upstream, inputs, attention_mask=attention_mask,
                                        mask_token_id=MASK_ID, fast_model=False, **kw)
    assert torch.equal(got, want)
    assert not (got == MASK_ID).any()
    # genjo_fast's own model with the same weights: the same function (fp32 to 1e-5)
    assert torch.equal(genjo_fast.diffusion_generate(fast, inputs, attention_mask=attention_mask,
                                                     mask_token_id=MASK_ID, **kw), want)


@pytest.mark.parametrize("options", [
    dict(alg="origin", temperature=0.0),
    dict(alg="origin", temperature=0.8, top_p=0.9),
    dict(alg="maskgit_plus", temperature=1.0),
    dict(alg="maskgit_plus", temperature=0.5, top_k=5),
    dict(alg="topk_margin", temperature=0.7, top_p=0.8, top_k=20),
    dict(alg="entropy", temperature=1.2, alg_temp=0.5),
    dict(alg="maskgit_plus", temperature=0.0, alg_temp=0.1),
], ids=lambda o: "_".join(f"{k}{v}" for k, v in o.items()))
def test_same_draws_identical(fast, options):
    inputs, attention_mask = prompts(3)
    got, want = both(fast, inputs, attention_mask, max_new_tokens=9, steps=6, **options)
    assert torch.equal(got, want)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alg,top_k,flat", [("maskgit_plus", None, False),
                                            ("topk_margin", 4, False),
                                            ("entropy", None, True),
                                            ("origin", 30, True)])
def test_top_p_same_draws_identical(fast, top_p, dtype, alg, top_k, flat):
    """top_p / top_k at temperature > 0 (the filtered sampling path): identical tokens to the
    statement's for the same draws, in float32 and bf16 (where the Categorical fallback also
    fires), on peaked distributions and on flat ones (logits divided by 8 in the logits hook:
    large nucleus sets and many ties at the cut in bf16)."""
    import copy
    model = fast if dtype == torch.float32 else copy.deepcopy(fast).to(dtype)
    inputs, attention_mask = prompts(3)
    hook = (lambda step, x, logits: logits / 8) if flat else None
    got, want = both(model, inputs, attention_mask, max_new_tokens=9, steps=5, alg=alg,
                     temperature=0.7, top_p=top_p, top_k=top_k,
                     generation_logits_hook_func=hook)
    assert torch.equal(got, want)


def test_hooks_and_history(fast):
    inputs, attention_mask = prompts(2)
    seen = {"ref": [], "fast": []}

    def run(fn, key):
        def logits_hook(step, x, logits):
            seen[key].append(("logits", step, logits.shape))
            logits = logits.clone()
            logits[..., 7] += 3.0  # make id 7 likelier: the hook's effect must show
            return logits

        def tokens_hook(step, x, logits):
            seen[key].append(("tokens", step, None if logits is None else logits.shape))
            x = x.clone()
            x[:, -1] = 11  # pin the last position
            return x

        return fn(fast, inputs, attention_mask=attention_mask, mask_token_id=MASK_ID,
                  max_new_tokens=8, steps=5, alg="entropy", output_history=True,
                  return_dict_in_generate=True, generation_logits_hook_func=logits_hook,
                  generation_tokens_hook_func=tokens_hook)

    want = run(reference_dream.diffusion_generate, "ref")
    got = run(genjo_fast.diffusion_generate, "fast")
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.history) == len(want.history) == 5
    assert all(torch.equal(a, b) for a, b in zip(got.history, want.history))
    assert seen["fast"] == seen["ref"]
    assert (got.sequences[:, -1] == 11).all()


def test_return_forms(fast):
    inputs, _ = prompts(1, padded=False)
    out = genjo_fast.diffusion_generate(fast, inputs, max_new_tokens=4, steps=4,
                                        mask_token_id=MASK_ID)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 10)
    out, stats = genjo_fast.diffusion_generate(fast, inputs, max_new_tokens=4, steps=4,
                                               mask_token_id=MASK_ID, return_stats=True,
                                               return_dict_in_generate=True)
    assert out.sequences.shape == (1, 10) and out.history is None
    assert stats.nfe == 4


@pytest.mark.parametrize("kw,error,match", [
    (dict(alg="greedy"), ValueError, "alg must be one of"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(eps=1.0), ValueError, r"eps must be in \(0, 1\)"),
    (dict(eps=0.0), ValueError, r"eps must be in \(0, 1\)"),
    (dict(steps=0), ValueError, "steps must be >= 1"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(top_k=0), ValueError, "top_k must be >= 1"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite and >= 0"),
    (dict(stepz=3), TypeError, r"unknown setting\(s\): stepz; the settings are .*steps"),
    (dict(inputs=torch.tensor([[1, MASK_ID]])), ValueError, "inputs contain mask_token_id=96"),
    (dict(inputs=torch.tensor([[1, 2]]), max_new_tokens=None, max_length=2), ValueError,
     "the prompt length 2 must be smaller than max_length=2"),
])
def test_bad_arguments(fast, kw, error, match):
    args = dict(inputs=torch.tensor([[1, 2, 3]]), max_new_tokens=4, steps=4,
                mask_token_id=MASK_ID)
    args.update(kw)
    inputs = args.pop("inputs")
    with pytest.raises(error, match=match):
        genjo_fast.diffusion_generate(fast, inputs, **args)


def test_batch_mean_overflow_departure(fast):
    """When a row keeps its masks (here: a logits hook makes the mask id every choice of row
    0), the batch-mean count exceeds the other row's masked count at the last step. Upstream
    (the statement) then writes the mask id over a prompt token of that row; genjo_fast
    leaves it alone (docs/semantics.md, "Departure")."""
    inputs, _ = prompts(2, padded=False)

    def prefer_mask(step, x, logits):
        logits = logits.clone()
        logits[0, :, MASK_ID] = 1e4  # row 0: the mask id wins everywhere
        return logits

    kw = dict(mask_token_id=MASK_ID, max_new_tokens=6, steps=3, alg="maskgit_plus",
              generation_logits_hook_func=prefer_mask)
    want = reference_dream.diffusion_generate(fast, inputs, **kw)
    got = genjo_fast.diffusion_generate(fast, inputs, **kw)
    assert (want[1, :6] == MASK_ID).any()  # upstream's bug: row 1's prompt re-masked
    assert torch.equal(got[:, :6], inputs)  # genjo_fast: prompts intact
    assert not (got[1] == MASK_ID).any()


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus"])
def test_bf16_sampling_with_upstream_fallback(fast, alg):
    """bf16 at temperature > 0: upstream's Categorical check rejects some steps' rows and the
    whole step takes the argmax; with the same draws genjo_fast makes the same choices."""
    import copy
    model = copy.deepcopy(fast).to(torch.bfloat16)
    inputs, attention_mask = prompts(3)
    got, want = both(model, inputs, attention_mask, max_new_tokens=12, steps=6, alg=alg,
                     temperature=1.0)
    assert torch.equal(got, want)
