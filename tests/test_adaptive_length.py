"""Variable length (APPROXIMATE, opt-in ``adaptive_length``) for LLaDA's ``generate`` and
Dream's ``diffusion_generate``: token for token against the plain statements
(genjo_fast.reference, genjo_fast.reference_dream), the shared rule against its plain
statement, the work saved, and bad input."""

import pytest
import torch

import genjo_fast
from genjo_fast import TensorDraws, reference, reference_dream
from genjo_fast.answer_length import (cut_at_eos, eos_probability, open_tail, plain_cut_at_eos,
                                      plain_open_tail)
from genjo_fast.testing import (EOSBias, TinyBidirectionalLM, UpstreamShapedDream, random_dream,
                                random_prompts)

from conftest import EOS_ID, EOT_ID, MASK_ID, PAD_ID, VOCAB

LP = 5  # prompt length


def llada(start, bias=20.0, seed=0):
    """A tiny LLaDA-style model whose answer ends at answer position ``start`` (per row)."""
    base = TinyBidirectionalLM(VOCAB, d_model=32, n_heads=2, n_layers=2, seed=seed)
    return EOSBias(base, EOS_ID, LP + torch.as_tensor(start), bias)


def llada_pair(model, batch, *, steps, gen_length, block_length, temperature=0.0,
               remasking="low_confidence", seed=0, **kw):
    prompt, attention_mask = random_prompts(batch, LP, VOCAB, pad_id=PAD_ID,
                                            avoid=(MASK_ID, EOS_ID), seed=seed)
    g = torch.Generator().manual_seed(seed)
    length = LP + gen_length
    draws = TensorDraws(
        torch.rand(steps, batch, length, VOCAB, generator=g, dtype=torch.float64)
        if temperature > 0 else None,
        torch.rand(steps, batch, length, generator=g) if remasking == "random" else None)
    args = dict(steps=steps, gen_length=gen_length, block_length=block_length,
                temperature=temperature, remasking=remasking, mask_id=MASK_ID, eos_id=EOS_ID,
                eot_id=EOT_ID, draws=draws, adaptive_length=True, **kw)
    ref = reference.generate(model, prompt, attention_mask, **args)
    out, stats = genjo_fast.generate(model, prompt, attention_mask, return_stats=True, **args)
    return ref, out, stats, (prompt, attention_mask, args)


# (ends per row, gen_length, block_length, steps)
SHAPES = [
    ([5], 24, 24, 12),           # one block: the canvas shrinks within it
    ([5, 5, 5], 24, 8, 12),      # the end in block 0: blocks 1 and 2 never run
    ([3, 13, 21], 24, 8, 12),    # rows end in different blocks: tails masked, per-row counts
    ([10, 30], 32, 8, 16),       # one row never ends (30 > gen): the canvas stays whole
]
OPTIONS = [  # (temperature, remasking, cfg_scale, confidence_eos_eot_inf)
    (0.0, "low_confidence", 0.0, False), (0.0, "low_confidence", 1.5, False),
    (0.0, "random", 0.0, False), (0.8, "low_confidence", 0.0, True), (0.5, "random", 0.5, False)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_llada_matches_statement(shape, options):
    ends, gen_length, block_length, steps = shape
    temperature, remasking, cfg_scale, eot_inf = options
    model = llada(ends)
    ref, out, stats, _ = llada_pair(model, len(ends), steps=steps, gen_length=gen_length,
                                    block_length=block_length, temperature=temperature,
                                    remasking=remasking, cfg_scale=cfg_scale,
                                    confidence_eos_eot_inf=eot_inf)
    assert torch.equal(out, ref)
    assert not (out == MASK_ID).any()
    for row, end in enumerate(ends):  # from its end on, a row is EOS
        if end < gen_length:
            assert (out[row, LP + end:] == EOS_ID).all()


def test_llada_work_saved():
    """Blocks after the end never run; the steps after the cut run on the shorter canvas."""
    model = llada([5, 5])
    widths = []

    def recording(x, attention_mask=None, logits_slice=None):
        widths.append(x.shape[1])
        return model(x, attention_mask, logits_slice=logits_slice)

    recording.config = model.config
    ref, out, stats, (prompt, attention_mask, args) = llada_pair(
        recording, 2, steps=16, gen_length=32, block_length=8)
    assert torch.equal(out, ref)
    fixed, fixed_stats = genjo_fast.generate(model, prompt, attention_mask, return_stats=True,
                                             **{**args, "adaptive_length": False})
    assert fixed_stats.nfe == 16
    assert stats.nfe == 4  # block 0 only (4 steps over its masks)
    assert widths[-4:] == [LP + 32] + [LP + 6] * 3  # the probe step, then answer + its EOS
    # The exact sampler spends 12 more forwards to reach the same tail.
    assert (fixed[:, LP + 5:] == EOS_ID).all() and (out[:, LP + 5:] == EOS_ID).all()


def test_llada_without_a_confident_end_is_the_exact_sampler():
    """No position reaches the threshold: nothing is cut, the tokens are generate.py's."""
    model = llada([4], bias=1.0)
    ref, out, stats, (prompt, attention_mask, args) = llada_pair(
        model, 2, steps=8, gen_length=16, block_length=8, length_threshold=0.999)
    exact = reference.generate(model, prompt, attention_mask,
                               **{**args, "adaptive_length": False})
    assert torch.equal(out, ref) and torch.equal(out, exact) and stats.nfe == 8


def test_llada_cut_never_overwrites_decoded_tokens_or_constraints():
    """The answer ends where only masks and EOS follow: after a constraint placed beyond the
    predicted end, and after every token the first step decoded."""
    model = llada([4])
    ref, out, stats, (prompt, attention_mask, args) = llada_pair(
        model, 1, steps=12, gen_length=24, block_length=24, constraints={9: [7, 8]})
    assert torch.equal(out, ref)
    seen = []
    genjo_fast.generate(model, prompt, attention_mask, observer=lambda e: seen.append(
        e.x.clone()), **args)
    assert out[0, LP + 9:LP + 11].tolist() == [7, 8]
    assert (out[0, LP + 11:] == EOS_ID).all()
    first = seen[0][0]
    decoded = (first != MASK_ID)
    assert torch.equal(out[0][decoded], first[decoded])  # every later step only added tokens


def test_llada_cut_waits_for_a_step_that_runs():
    """A first block filled by constraints runs no step: the cut follows the first step of
    the next block."""
    model = llada([10, 12])
    ref, out, stats, _ = llada_pair(model, 2, steps=12, gen_length=24, block_length=8,
                                    constraints={0: [3, 4, 5, 6, 7, 8, 9, 11]})
    assert torch.equal(out, ref)
    assert (out[:, LP:LP + 8] == torch.tensor([3, 4, 5, 6, 7, 8, 9, 11])).all()
    assert (out[0, LP + 10:] == EOS_ID).all() and (out[1, LP + 12:] == EOS_ID).all()
    assert stats.nfe == 4  # block 1 only: 8 masks over its 4 steps; block 2 never runs


def test_llada_streamer_sees_the_whole_answer():
    from genjo_fast.streaming import DiffusionIteratorStreamer

    class Tok:
        def decode(self, ids, **kw):
            return " ".join(map(str, ids))

    model = llada([3])
    prompt = torch.tensor([[1, 2, 3, 4, 6]])
    streamer = DiffusionIteratorStreamer(Tok(), MASK_ID)
    out = genjo_fast.generate(model, prompt, steps=8, gen_length=16, block_length=16,
                              mask_id=MASK_ID, eos_id=EOS_ID, adaptive_length=True,
                              streamer=streamer)
    updates = list(streamer)
    assert updates and all(u.ids.shape == (1, 16) for u in updates)
    assert torch.equal(updates[-1].ids, out[:, LP:])


# ---------------------------------------------------------------------------------------------
# Dream
# ---------------------------------------------------------------------------------------------

D_VOCAB, D_MASK, D_PAD, D_EOS = 97, 96, 95, 94


@pytest.fixture(scope="module")
def upstream_dream():
    fast = random_dream(D_VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2, intermediate_size=48, seed=0,
                        mask_token_id=D_MASK, pad_token_id=D_PAD)
    with torch.no_grad():
        fast.lm_head.weight.mul_(8)
    model = UpstreamShapedDream(fast.config.to_dict())
    model.load_state_dict(fast.state_dict())
    return model.eval()


@pytest.mark.parametrize("ends", [[4, 4], [2, 9, 20]], ids=str)
@pytest.mark.parametrize("settings", [
    dict(alg="maskgit_plus"), dict(alg="entropy", temperature=0.7),
    dict(alg="topk_margin", alg_temp=0.5), dict(alg="origin", temperature=1.0)], ids=str)
def test_dream_matches_statement(upstream_dream, ends, settings):
    batch, gen, steps = len(ends), 16, 8
    # The output at column i predicts position i + 1: the bias starts one column earlier.
    model = EOSBias(upstream_dream, D_EOS, 6 - 1 + torch.tensor(ends))
    inputs, attention_mask = random_prompts(batch, 6, D_VOCAB, pad_id=D_PAD,
                                            avoid=(D_MASK, D_PAD, D_EOS), seed=batch)
    g = torch.Generator().manual_seed(1)
    length = 6 + gen
    draws = TensorDraws(remask=torch.rand(steps, batch, length, generator=g),
                        token=torch.rand(steps, batch, length, generator=g, dtype=torch.float64),
                        position=torch.rand(steps, batch, length, generator=g,
                                            dtype=torch.float64))
    kw = dict(attention_mask=attention_mask, max_new_tokens=gen, steps=steps,
              mask_token_id=D_MASK, draws=draws, adaptive_length=True, eos_id=D_EOS, **settings)
    want = reference_dream.diffusion_generate(model, inputs, **kw)
    got = genjo_fast.diffusion_generate(model, inputs, fast_model=False, **kw)
    assert torch.equal(got, want)
    for row, end in enumerate(ends):
        if end < gen:
            assert (got[row, 6 + end:] == D_EOS).all()


def test_dream_work_saved(upstream_dream):
    model = EOSBias(upstream_dream, D_EOS, 6 - 1 + 3)
    widths = []

    def recording(x, attention_mask=None, position_ids=None):
        widths.append(x.shape[1])
        return model(x, attention_mask, position_ids)

    inputs = torch.tensor([[1, 2, 3, 4, 5, 6]])
    out = genjo_fast.diffusion_generate(recording, inputs, max_new_tokens=32, steps=8,
                                        alg="maskgit_plus", mask_token_id=D_MASK,
                                        adaptive_length=True, eos_id=D_EOS, fast_model=False)
    assert widths == [6 + 32] + [6 + 4] * 7
    assert (out[0, 6 + 3:] == D_EOS).all() and not (out == D_MASK).any()


# ---------------------------------------------------------------------------------------------
# The shared rule against its plain statement
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_open_tail_and_cut_match_their_statements(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([MASK_ID, EOS_ID, 3, 4])
    answer = ids[torch.multinomial(torch.tensor([0.5, 0.3, 0.1, 0.1]), 5 * 13, replacement=True,
                                   generator=g)].view(5, 13)
    region = open_tail(answer, MASK_ID, EOS_ID)
    assert torch.equal(region, plain_open_tail(answer, MASK_ID, EOS_ID))
    probability = torch.rand(5, 13, generator=g)
    x, plain_x = answer.clone(), answer.clone()
    plain_region = region.clone()
    width, kept = cut_at_eos(x, region, probability, 0.7, eos_id=EOS_ID, pad_id=None)
    lengths = plain_cut_at_eos(plain_x, plain_region, probability, 0.7, eos_id=EOS_ID,
                               pad_id=None)
    assert torch.equal(x, plain_x) and torch.equal(region, plain_region)
    assert width == max(lengths)
    if kept is None:
        assert min(lengths) == width
    else:
        assert kept.sum(1).tolist() == lengths


def test_eos_probability():
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    un = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    guided = un + 2.5 * (logits - un)
    assert torch.equal(eos_probability(logits, 4, un, 1.5),
                       torch.softmax(guided.float(), -1)[..., 4])
    assert eos_probability(logits, 4).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,error,match", [
    (dict(adaptive_length="yes"), TypeError, "adaptive_length must be True or False"),
    (dict(adaptive_length=True, length_threshold=1.5), ValueError,
     r"length_threshold must be a probability in \[0, 1\]"),
    (dict(adaptive_length=True, length_threshold=True), ValueError, "length_threshold"),
    (dict(adaptive_length=True, logits_eos_inf=True), ValueError,
     "adaptive_length=True does not combine with logits_eos_inf"),
    (dict(adaptive_length=True, threshold=0.9), ValueError, "does not combine with threshold"),
    (dict(adaptive_length=True, factor=1.0), ValueError, "does not combine with factor"),
    (dict(adaptive_length=True, eos_id=VOCAB), ValueError, f"eos_id={VOCAB} is outside"),
])
def test_bad_llada_input(tiny_model, kw, error, match):
    with pytest.raises(error, match=match):
        genjo_fast.generate(tiny_model, torch.tensor([[1, 2, 3]]), steps=4, gen_length=8,
                            block_length=4, mask_id=MASK_ID, **kw)


@pytest.mark.parametrize("kw,error,match", [
    (dict(adaptive_length=1), TypeError, "adaptive_length must be True or False"),
    (dict(adaptive_length=True, length_threshold=-0.1), ValueError, "length_threshold"),
    (dict(adaptive_length=True, block_length=4), ValueError,
     "adaptive_length=True runs on the whole-canvas sampler"),
    (dict(adaptive_length=True, generation_logits_hook_func=lambda s, x, l: l), ValueError,
     "not with block_length or the generation hooks"),
    (dict(adaptive_length=True, eos_id=D_VOCAB), ValueError, f"eos_id={D_VOCAB} is outside"),
])
def test_bad_dream_input(upstream_dream, kw, error, match):
    model = random_dream(D_VOCAB, hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                         mask_token_id=D_MASK)
    with pytest.raises(error, match=match):
        genjo_fast.diffusion_generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=8,
                                      steps=4, alg="maskgit_plus", **kw)
