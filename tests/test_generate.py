"""genjo_fast.generate against the reference oracle: identical tokens, same distribution."""

import pytest
import torch

import genjo_fast
from genjo_fast import TensorDraws, reference
from genjo_fast.testing import FullLogitsOnly, TinyBidirectionalLM, random_prompts

from conftest import EOS_ID, EOT_ID, MASK_ID, PAD_ID, VOCAB

IDS = dict(mask_id=MASK_ID, eos_id=EOS_ID, eot_id=EOT_ID)


def draws_for(temperature, remasking, steps, batch, seq_len, seed):
    """The same uniform draws for the oracle and genjo_fast (indexed by step and position)."""
    g = torch.Generator().manual_seed(seed)
    gumbel = (torch.rand(steps, batch, seq_len, VOCAB, generator=g, dtype=torch.float64)
              if temperature > 0 else None)
    remask = torch.rand(steps, batch, seq_len, generator=g) if remasking == "random" else None
    return TensorDraws(gumbel, remask)


def both(model, prompt, attention_mask, seed=0, fast_model=None, **kw):
    """Runs the oracle and genjo_fast with the same arguments and draws."""
    draws = draws_for(kw.get("temperature", 0.0), kw.get("remasking", "low_confidence"),
                      kw["steps"], prompt.shape[0], prompt.shape[1] + kw["gen_length"], seed)
    ref = reference.generate(model, prompt, attention_mask, draws=draws, **IDS, **kw)
    out = genjo_fast.generate(fast_model or model, prompt, attention_mask, draws=draws, **IDS,
                              **kw)
    return ref, out


# (batch, prompt_len, gen_length, block_length, steps)
SHAPES = [(1, 7, 16, 16, 16), (3, 9, 16, 4, 8), (8, 5, 12, 6, 6), (3, 6, 12, 3, 8)]
OPTIONS = [  # (temperature, remasking, cfg_scale, logits_eos_inf, confidence_eos_eot_inf)
    (0.0, "low_confidence", 0.0, False, False),
    (0.0, "low_confidence", 1.5, False, False),
    (0.0, "low_confidence", 0.0, True, True),
    (0.0, "low_confidence", 0.0, False, True),
    (0.0, "random", 0.0, False, False),
    (1.0, "low_confidence", 0.0, False, False),
    (0.7, "low_confidence", 0.5, True, True),
    (1.3, "random", 0.0, False, True),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Lp{}_gen{}_blk{}_st{}".format(*s))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "T{}_{}_cfg{}_eos{}_eot{}".format(*o))
def test_identical_to_reference(tiny_model, shape, options):
    batch, prompt_len, gen_length, block_length, steps = shape
    temperature, remasking, cfg_scale, eos_inf, eos_eot_inf = options
    prompt, attention_mask = random_prompts(batch, prompt_len, VOCAB, pad_id=PAD_ID,
                                            avoid=(MASK_ID,), seed=batch)
    ref, out = both(tiny_model, prompt, attention_mask, steps=steps, gen_length=gen_length,
                    block_length=block_length, temperature=temperature, remasking=remasking,
                    cfg_scale=cfg_scale, logits_eos_inf=eos_inf,
                    confidence_eos_eot_inf=eos_eot_inf)
    assert out.dtype == torch.long and out.shape == (batch, prompt_len + gen_length)
    assert torch.equal(out[:, :prompt_len], prompt)
    assert not (out == MASK_ID).any()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("options", OPTIONS[:3] + OPTIONS[5:6], ids=str)
def test_generic_model_without_logits_slice(tiny_model, options):
    """A model that only returns full logits (as HF models do) gives the same tokens."""
    temperature, remasking, cfg_scale, eos_inf, eos_eot_inf = options
    prompt, attention_mask = random_prompts(3, 6, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    kw = dict(steps=8, gen_length=8, block_length=4, temperature=temperature,
              remasking=remasking, cfg_scale=cfg_scale, logits_eos_inf=eos_inf,
              confidence_eos_eot_inf=eos_eot_inf)
    ref, out = both(tiny_model, prompt, attention_mask, fast_model=FullLogitsOnly(tiny_model),
                    **kw)
    assert torch.equal(out, ref)


def test_cfg_without_attention_mask(tiny_model):
    """The reference crashes here; the oracle and genjo_fast simply work."""
    prompt, _ = random_prompts(2, 6, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,), padded=False)
    ref, out = both(tiny_model, prompt, None, steps=4, gen_length=8, block_length=4,
                    cfg_scale=2.0)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("gen_length,block_length,steps", [
    (8, 8, 8),    # gen_length == block_length, one step per token
    (8, 8, 1),    # a single step transfers the whole block
    (6, 3, 10),   # 5 steps per block of 3: steps that transfer k = 0 tokens
    (4, 1, 4),    # one-token blocks
])
def test_edge_schedules(tiny_model, gen_length, block_length, steps):
    prompt, attention_mask = random_prompts(3, 5, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    ref, out = both(tiny_model, prompt, attention_mask, steps=steps, gen_length=gen_length,
                    block_length=block_length)
    assert torch.equal(out, ref)


def test_ties_go_to_the_lowest_position():
    """A model with the same logits everywhere: every confidence ties, so each step must
    unmask the lowest masked positions of the block first."""
    vocab, mask_id = 11, 10

    def flat_model(x, attention_mask=None):
        logits = torch.zeros(*x.shape, vocab)
        logits[..., 7] = 1.0
        return logits

    prompt = torch.tensor([[1, 2, 3]])
    seen = []
    out = genjo_fast.generate(flat_model, prompt, steps=4, gen_length=8, block_length=8,
                              mask_id=mask_id, observer=lambda e: seen.append(e.transfer[0]))
    assert [t.nonzero().flatten().tolist() for t in seen] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert torch.equal(out, reference.generate(flat_model, prompt, steps=4, gen_length=8,
                                               block_length=8, mask_id=mask_id))


@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_model_choosing_the_mask_id(temperature):
    """When the model's choice for a position is the mask id itself, the reference writes it
    back, the position stays masked and keeps competing in later blocks' row-wide topk."""
    vocab, mask_id = 11, 10

    def model(x, attention_mask=None):
        logits = torch.zeros(*x.shape, vocab)
        logits[..., 3] = 1.0
        logits[0, 3, mask_id] = 5.0  # row 0: its first generated position prefers the mask
        logits[:, 6, 4] = 2.0
        return logits

    prompt = torch.tensor([[1, 2, 4], [5, 6, 7]])
    kw = dict(steps=6, gen_length=6, block_length=2, mask_id=mask_id, temperature=temperature)
    g = torch.Generator().manual_seed(0)
    draws = TensorDraws(torch.rand(6, 2, 9, vocab, generator=g, dtype=torch.float64))
    ref = reference.generate(model, prompt, draws=draws, **kw)
    out = genjo_fast.generate(model, prompt, draws=draws, **kw)
    assert torch.equal(out, ref)
    if temperature == 0:
        assert (ref[0, 3:] == mask_id).any() and not (ref[1] == mask_id).any()


def test_bf16_model_ties(tiny_model):
    """bf16 logits round the softmax to bf16, so confidences tie often: still identical."""
    model = FullLogitsOnly(type(tiny_model)(VOCAB, d_model=32, n_heads=2, n_layers=2, seed=1,
                                            dtype=torch.bfloat16))
    prompt, attention_mask = random_prompts(4, 6, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    ref, out = both(model, prompt, attention_mask, steps=16, gen_length=16, block_length=8)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_bf16_block_rows_lm_head_matches_reference(cfg_scale):
    """bf16, with CFG, the LM head on block rows only (logits_slice) against the reference's
    full-logits forward of the same model: identical tokens (CPU GEMM rows do not depend on
    how many rows are computed; checked on GPU by benchmarks/test_bench_agreement.py)."""
    model = TinyBidirectionalLM(VOCAB, d_model=32, n_heads=2, n_layers=2, seed=2,
                                dtype=torch.bfloat16)
    prompt, attention_mask = random_prompts(3, 6, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    ref, out = both(model, prompt, attention_mask, steps=8, gen_length=16, block_length=8,
                    cfg_scale=cfg_scale, logits_eos_inf=True, confidence_eos_eot_inf=True)
    assert torch.equal(out, ref)


def test_observer_sees_every_step(tiny_model):
    prompt, attention_mask = random_prompts(2, 5, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    events = []
    out = genjo_fast.generate(tiny_model, prompt, attention_mask, steps=6, gen_length=9,
                              block_length=3, mask_id=MASK_ID,
                              observer=lambda e: events.append(
                                  (e.block, e.step, e.block_start, e.transfer.sum(1).tolist(),
                                   e.x.clone())))
    assert [(b, s, start) for b, s, start, _, _ in events] == [
        (0, 0, 5), (0, 1, 5), (1, 2, 8), (1, 3, 8), (2, 4, 11), (2, 5, 11)]
    assert [counts for *_, counts, _ in events] == [[2, 2], [1, 1]] * 3
    assert torch.equal(events[-1][-1], out)


def test_progress_bar(tiny_model, capsys):
    prompt, _ = random_prompts(1, 4, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,), padded=False)
    genjo_fast.generate(tiny_model, prompt, steps=4, gen_length=4, block_length=4,
                        mask_id=MASK_ID, progress=True)
    assert "genjo_fast.generate" in capsys.readouterr().err


def test_generator_reproducible(tiny_model):
    prompt, attention_mask = random_prompts(3, 5, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    kw = dict(steps=4, gen_length=8, block_length=4, temperature=1.0, remasking="random",
              mask_id=MASK_ID)

    def run(seed):
        return genjo_fast.generate(tiny_model, prompt, attention_mask,
                                   generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_does_not_modify_inputs(tiny_model):
    prompt, attention_mask = random_prompts(2, 5, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    prompt_copy, mask_copy = prompt.clone(), attention_mask.clone()
    genjo_fast.generate(tiny_model, prompt, attention_mask, steps=4, gen_length=4,
                        block_length=4, mask_id=MASK_ID, cfg_scale=1.0, logits_eos_inf=True,
                        eos_id=EOS_ID)
    assert torch.equal(prompt, prompt_copy) and torch.equal(attention_mask, mask_copy)


def test_int32_prompt(tiny_model):
    prompt, _ = random_prompts(2, 5, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,), padded=False)
    out32 = genjo_fast.generate(tiny_model, prompt.int(), steps=4, gen_length=4,
                                block_length=4, mask_id=MASK_ID)
    assert out32.dtype == torch.long
    assert torch.equal(out32, reference.generate(tiny_model, prompt, steps=4, gen_length=4,
                                                 block_length=4, mask_id=MASK_ID))


# --- same distribution with the default random source ------------------------------------

def test_temperature_sampling_frequencies():
    """One masked position, sampled 4000 times at once: token frequencies follow
    softmax(logits / T), and a fixed generator reproduces them."""
    vocab, mask_id, temperature, n = 6, 5, 0.8, 4000
    base = torch.tensor([1.0, 0.2, -0.5, 0.9, -2.0, -1.0])

    def model(x, attention_mask=None):
        return base.expand(*x.shape, vocab).clone()

    prompt = torch.zeros(n, 1, dtype=torch.long)
    out = genjo_fast.generate(model, prompt, steps=1, gen_length=1, block_length=1,
                              temperature=temperature, mask_id=mask_id,
                              generator=torch.Generator().manual_seed(0))[:, 1]
    freq = torch.bincount(out, minlength=vocab).double() / n
    expected = torch.softmax(base.double() / temperature, 0)
    # 4 standard errors of a binomial proportion
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-3)


def test_random_remasking_order_is_uniform():
    """random remasking: at the first of 3 steps, each of the 3 positions is equally likely."""
    vocab, mask_id, n = 5, 4, 3000

    def model(x, attention_mask=None):
        return torch.zeros(*x.shape, vocab)

    first = []
    genjo_fast.generate(model, torch.zeros(n, 1, dtype=torch.long), steps=3, gen_length=3,
                        block_length=3, mask_id=mask_id, remasking="random",
                        generator=torch.Generator().manual_seed(0),
                        observer=lambda e: first.append(e.transfer.float().argmax(1))
                        if e.step == 0 else None)
    freq = torch.bincount(first[0], minlength=3).double() / n
    assert torch.all((freq - 1 / 3).abs() < 4 * (2 / 9 / n) ** 0.5)
