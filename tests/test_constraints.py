"""Positional constraints and the reference app's sampler (``sampler="app"``): genjo_fast's
fast path against the plain statements (genjo_fast.reference, genjo_fast.reference_app),
the constraints' semantics, and bad input."""

import pytest
import torch

import genjo_fast
from genjo_fast import TensorDraws, reference, reference_app
from genjo_fast.constraints import resolve_constraints
from genjo_fast.testing import FullLogitsOnly, TinyBidirectionalLM, random_llada, random_prompts
from genjo_fast.transfer import transfer_schedule

from conftest import EOS_ID, EOT_ID, MASK_ID, PAD_ID, VOCAB


def make_draws(temperature, remasking, steps, batch, seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    gumbel = (torch.rand(steps, batch, seq_len, VOCAB, generator=g, dtype=torch.float64)
              if temperature > 0 else None)
    remask = torch.rand(steps, batch, seq_len, generator=g) if remasking == "random" else None
    return TensorDraws(gumbel, remask)


def run_pair(model, prompt, attention_mask, *, sampler="generate", draw_steps=None, **kw):
    """The statement of ``sampler`` and genjo_fast, with the same arguments and draws."""
    draws = make_draws(kw.get("temperature", 0.0), kw.get("remasking", "low_confidence"),
                       draw_steps or kw["steps"], prompt.shape[0],
                       prompt.shape[1] + kw["gen_length"])
    if sampler == "app":
        ref = reference_app.generate(model, prompt, attention_mask, mask_id=MASK_ID,
                                     draws=draws, **kw)
    else:
        ref = reference.generate(model, prompt, attention_mask, mask_id=MASK_ID, eos_id=EOS_ID,
                                 eot_id=EOT_ID, draws=draws, **kw)
    out = genjo_fast.generate(model, prompt, attention_mask, mask_id=MASK_ID, eos_id=EOS_ID,
                              eot_id=EOT_ID, draws=draws, sampler=sampler, **kw)
    return ref, out


CONSTRAINTS = [None, {0: 5}, {3: [7, 8, 9], 10: 2}, {1: torch.tensor([11, 12]), 6: 40}]
OPTIONS = [  # (temperature, remasking, cfg_scale)
    (0.0, "low_confidence", 0.0), (0.0, "low_confidence", 1.5), (0.0, "random", 0.0),
    (0.9, "low_confidence", 0.0), (0.6, "random", 0.7)]


@pytest.mark.parametrize("constraints", CONSTRAINTS, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_generate_sampler_matches_statement(tiny_model, constraints, options):
    temperature, remasking, cfg_scale = options
    prompt, attention_mask = random_prompts(3, 6, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,),
                                            seed=3)
    ref, out = run_pair(tiny_model, prompt, attention_mask, steps=9, gen_length=12,
                        block_length=4, temperature=temperature, remasking=remasking,
                        cfg_scale=cfg_scale, constraints=constraints)
    assert torch.equal(out, ref)
    assert not (out == MASK_ID).any()
    for position, ids in (constraints or {}).items():
        ids = torch.as_tensor(ids).reshape(-1)
        assert (out[:, 6 + position:6 + position + len(ids)] == ids).all()


# (gen_length, block_length, steps): divisible, a shorter last block, fewer steps than blocks
# (one step per block), a block longer than the answer, more steps than positions.
APP_SHAPES = [(12, 4, 6), (10, 4, 7), (10, 3, 2), (6, 16, 4), (5, 5, 9)]


@pytest.mark.parametrize("shape", APP_SHAPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_app_sampler_matches_statement(tiny_model, shape, options):
    gen_length, block_length, steps = shape
    temperature, remasking, cfg_scale = options
    prompt, attention_mask = random_prompts(2, 5, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,),
                                            seed=gen_length)
    ref, out = run_pair(tiny_model, prompt, attention_mask, sampler="app", steps=steps,
                        gen_length=gen_length, block_length=block_length,
                        temperature=temperature, remasking=remasking, cfg_scale=cfg_scale,
                        constraints={1: [3, 4]}, draw_steps=max(steps, 5) * 4)
    assert torch.equal(out, ref)
    assert not (out == MASK_ID).any()
    assert (out[:, 6:8] == torch.tensor([3, 4])).all()


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_app_sampler_bf16_model(cfg_scale):
    """bf16 logits (the app's float64 confidence of them), CFG: identical to the statement."""
    model = FullLogitsOnly(TinyBidirectionalLM(VOCAB, d_model=32, n_heads=2, n_layers=2, seed=1,
                                               dtype=torch.bfloat16))
    prompt, attention_mask = random_prompts(4, 6, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    kw = dict(steps=8, gen_length=16, block_length=8, cfg_scale=cfg_scale, mask_id=MASK_ID)
    app = genjo_fast.generate(model, prompt, attention_mask, sampler="app", **kw)
    assert torch.equal(app, reference_app.generate(model, prompt, attention_mask, **kw))


def test_app_confidence_is_float64():
    """Two positions whose bf16 softmax probabilities tie (0.9375) but whose float64 ones do
    not: generate.py's tie goes to the lower position, the app takes the more probable one."""
    vocab, mask_id = 11, 10

    def model(x, attention_mask=None):
        logits = torch.zeros(*x.shape, vocab, dtype=torch.bfloat16)
        logits[:, 1, 3] = 5.0
        logits[:, 2, 3] = 5.03125  # one bf16 step above
        return logits

    prompt = torch.tensor([[1]])
    kw = dict(steps=2, gen_length=2, block_length=2, mask_id=mask_id)
    for sampler, statement, first in (("generate", reference.generate, 0),
                                      ("app", reference_app.generate, 1)):
        events = []
        out = genjo_fast.generate(model, prompt, sampler=sampler, observer=events.append, **kw)
        assert events[0].transfer[0].nonzero().flatten().tolist() == [first]
        assert torch.equal(out, statement(model, prompt, **kw))


def test_app_sampler_reveals_the_rest_at_a_block_last_step():
    """A position whose choice is the mask id itself stays masked: generate.py lets it compete
    in later blocks (where this model never picks it: it stays masked), the app reveals it at
    the block's last step with that step's choice."""
    vocab, mask_id = 11, 10

    def make_model():
        calls = []

        def model(x, attention_mask=None):
            logits = torch.zeros(*x.shape, vocab)
            logits[..., 3] = 1.0
            # Row 0, first generated position: the mask id, confidently, at the first call;
            # then id 3 with the lowest confidence of all.
            logits[0, 3, mask_id] = 5.0 if not calls else 0.5
            calls.append(1)
            return logits
        return model

    prompt = torch.tensor([[1, 2, 4], [5, 6, 7]])
    kw = dict(steps=6, gen_length=6, block_length=3, mask_id=mask_id)
    app = genjo_fast.generate(make_model(), prompt, sampler="app", **kw)
    assert torch.equal(app, reference_app.generate(make_model(), prompt, **kw))
    assert not (app == mask_id).any()
    exact = genjo_fast.generate(make_model(), prompt, **kw)
    assert torch.equal(exact, reference.generate(make_model(), prompt, **kw))
    assert exact[0, 3] == mask_id and (exact[:, 4:] != mask_id).all()


def test_app_sampler_takes_any_lengths(tiny_model):
    """Lengths generate.py refuses: the app's sampler runs them."""
    prompt, _ = random_prompts(1, 4, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,), padded=False)
    with pytest.raises(ValueError, match="must be a multiple of block_length"):
        genjo_fast.generate(tiny_model, prompt, steps=4, gen_length=10, block_length=4,
                            mask_id=MASK_ID)
    events = []
    out = genjo_fast.generate(tiny_model, prompt, steps=4, gen_length=10, block_length=4,
                              mask_id=MASK_ID, sampler="app", observer=events.append)
    # 3 blocks (4, 4, 2 positions), max(1, 4 // 3) = 1 step each: everything at once.
    assert [(e.block, e.block_start, e.block_stop, int(e.transfer.sum())) for e in events] == [
        (0, 4, 8, 4), (1, 8, 12, 4), (2, 12, 14, 2)]
    assert out.shape == (1, 14) and not (out == MASK_ID).any()


@pytest.mark.parametrize("sampler", ["generate", "app"])
def test_constraints_kept_and_excluded_from_counts(tiny_model, sampler):
    """Constraints hold from the first step to the last, no step transfers them, and each
    block's schedule shares out its other positions only."""
    prompt, attention_mask = random_prompts(2, 5, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    constraints = {0: 3, 2: [7, 8], 9: 4}  # block 0: 3 of 8 positions; block 1: 1
    positions = torch.tensor([0, 2, 3, 9]) + 5
    ids = torch.tensor([3, 7, 8, 4])
    events = []
    genjo_fast.generate(tiny_model, prompt, attention_mask, steps=8, gen_length=16,
                        block_length=8, mask_id=MASK_ID, constraints=constraints,
                        sampler=sampler,
                        observer=lambda e: events.append((e.block, e.block_start, e.x.clone(),
                                                          e.transfer.clone())))
    counts = {0: [], 1: []}
    for block, start, x, transfer in events:
        assert (x[:, positions] == ids).all()
        assert not transfer[:, positions[(positions >= start) & (positions < start + 8)]
                            - start].any()
        counts[block].append(transfer.sum(1).tolist())
    assert counts[0] == [[k, k] for k in transfer_schedule(5, 4)]
    assert counts[1] == [[k, k] for k in transfer_schedule(7, 4)]


@pytest.mark.parametrize("sampler", ["generate", "app"])
def test_constraints_are_cfg_conditioning(tiny_model, sampler):
    """With CFG the unconditional copy masks the prompt and the constraints (the app's
    prompt_index is taken after placing them)."""
    seen = []

    def model(x, attention_mask=None):
        seen.append(x.clone())
        return tiny_model(x, attention_mask)

    prompt = torch.tensor([[1, 2, 3]])
    genjo_fast.generate(model, prompt, steps=2, gen_length=4, block_length=4, cfg_scale=1.0,
                        mask_id=MASK_ID, constraints={1: 9}, sampler=sampler)
    assert len(seen) == 2
    cond, uncond = seen[0]
    assert cond.tolist() == [1, 2, 3, MASK_ID, 9, MASK_ID, MASK_ID]
    assert uncond.tolist() == [MASK_ID] * 7
    cond, uncond = seen[1]
    assert cond[4] == 9 and uncond[4] == MASK_ID and (uncond[:3] == MASK_ID).all()
    assert torch.equal(uncond[[3, 5, 6]], cond[[3, 5, 6]])  # decoded tokens stay in both


def test_fully_constrained_block_runs_no_step(tiny_model):
    prompt, attention_mask = random_prompts(2, 4, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    constraints = {0: [5, 6, 7, 8]}  # all of block 0
    kw = dict(steps=4, gen_length=8, block_length=4, mask_id=MASK_ID, constraints=constraints)
    out, stats = genjo_fast.generate(tiny_model, prompt, attention_mask, return_stats=True, **kw)
    assert stats.nfe == 2  # block 1 only: 4 positions over 2 steps
    assert torch.equal(out, reference.generate(tiny_model, prompt, attention_mask, **kw))
    app, stats = genjo_fast.generate(tiny_model, prompt, attention_mask, sampler="app",
                                     return_stats=True, **kw)
    assert stats.nfe == 2
    assert torch.equal(app, reference_app.generate(tiny_model, prompt, attention_mask, **kw))


@pytest.mark.parametrize("mode", [dict(threshold=0.3), dict(cache="dual"),
                                  dict(cache="prefix", factor=1.0, cfg_scale=1.0)], ids=str)
def test_constraints_with_approximate_modes(mode):
    """Placement, counting and CFG hold in the approximate modes."""
    model = random_llada(vocab_size=VOCAB, d_model=32, n_heads=2, n_layers=2, seed=0)
    prompt, attention_mask = random_prompts(2, 5, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    kw = dict(steps=8, gen_length=8, block_length=4, mask_id=MASK_ID, constraints={1: [7, 8]},
              **mode)
    out = genjo_fast.generate(model, prompt, attention_mask, **kw)
    assert torch.equal(out, reference.generate_approximate(model, prompt, attention_mask, **kw))
    assert (out[:, 6:8] == torch.tensor([7, 8])).all()


def test_resolve_constraints():
    positions, ids = resolve_constraints({4: [9, 8], 0: 3, 7: torch.tensor([1])}, 8, MASK_ID,
                                         VOCAB)
    assert positions.tolist() == [0, 4, 5, 7] and ids.tolist() == [3, 9, 8, 1]
    assert resolve_constraints({}, 8, MASK_ID) is None
    assert resolve_constraints(None, 8, MASK_ID) is None


BAD = [
    ({-1: 5}, ValueError, r"constraints\[-1\] covers position -1, outside the answer"),
    ({8: 5}, ValueError, r"constraints\[8\] covers position 8, outside the answer \[0, "
                         r"gen_length=8\)"),
    ({6: [1, 2, 3]}, ValueError, r"constraints\[6\] covers positions 6..8, outside"),
    ({2: MASK_ID}, ValueError, rf"constraints\[2\] holds mask_id={MASK_ID}"),
    ({2: [4, MASK_ID]}, ValueError, rf"constraints\[2\] holds mask_id={MASK_ID}"),
    ({2: VOCAB}, ValueError, rf"constraints\[2\] holds id {VOCAB}, outside the model "
                             rf"vocabulary \[0, {VOCAB}\)"),
    ({2: -3}, ValueError, r"constraints\[2\] holds id -3"),
    ({2: []}, ValueError, r"constraints\[2\] is an empty list"),
    ({1: [4, 5], 2: 6}, ValueError, "constraints overlap at answer position 2"),
    ([(1, 5)], TypeError, "constraints must be a dict"),
    ("0:Once", TypeError, "constraints must be a dict"),
    ({"0": 5}, TypeError, "constraints keys must be int answer positions"),
    ({True: 5}, TypeError, "constraints keys must be int"),
    ({0: 5.0}, TypeError, r"constraints\[0\] must be an int id or a list of ids"),
    ({0: "Once"}, TypeError, r"constraints\[0\] must be an int id or a list of ids"),
    ({0: [5, 2.5]}, TypeError, r"constraints\[0\] must hold int ids"),
    ({0: torch.tensor([[1, 2]])}, TypeError, r"constraints\[0\] must be .* 1-D integer tensor"),
    ({0: torch.tensor([1.0])}, TypeError, r"constraints\[0\] must be .* 1-D integer tensor"),
]


@pytest.mark.parametrize("sampler", ["generate", "app"])
@pytest.mark.parametrize("constraints,error,match", BAD, ids=lambda v: repr(v)[:30])
def test_bad_constraints(tiny_model, sampler, constraints, error, match):
    with pytest.raises(error, match=match):
        genjo_fast.generate(tiny_model, torch.tensor([[1, 2, 3]]), steps=4, gen_length=8,
                            block_length=4, mask_id=MASK_ID, constraints=constraints,
                            sampler=sampler)


@pytest.mark.parametrize("kw,match", [
    (dict(sampler="gradio"), r"sampler must be one of \('generate', 'app'\)"),
    (dict(sampler="app", logits_eos_inf=True), "sampler='app' .* does not take logits_eos_inf"),
    (dict(sampler="app", confidence_eos_eot_inf=True), "does not take confidence_eos_eot_inf"),
    (dict(sampler="app", threshold=0.9), "does not take threshold"),
    (dict(sampler="app", cache="dual"), "does not take cache"),
    (dict(sampler="app", adaptive_length=True), "does not take adaptive_length"),
])
def test_bad_sampler_options(tiny_model, kw, match):
    with pytest.raises(ValueError, match=match):
        genjo_fast.generate(tiny_model, torch.tensor([[1, 2, 3]]), steps=4, gen_length=8,
                            block_length=4, mask_id=MASK_ID, **kw)
