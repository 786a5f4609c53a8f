"""Dream's diffusion_generate: upstream's sampler (its plain statement) vs genjo_fast.

Setting of the engine issue: a Dream-shaped model with random weights (vocab 152064, 2 layers,
hidden 64, GQA 4/2 heads) in the upstream form (:class:`genjo_fast.testing.UpstreamShapedDream`:
upstream's module names, ``config.model_type == "Dream"``, full logits for every position),
prompt 128, 64 new tokens, 64 steps. Cases: batch 1 at temperature 0 with ``alg="entropy"``;
batch 4 (left-padded) at temperature 0.2 with ``top_p=0.95`` (``maskgit_plus``). The statement
(:func:`genjo_fast.reference_dream.diffusion_generate`) runs the upstream model object as
upstream does; genjo_fast gets the same object and runs it through its own DreamModel on the
same weights (LM head and sampling on the answer's rows only).

Checks: at temperature 0 the tokens are identical to the statement's; at temperature 0.2 both
keep the prompt and unmask everything, and with the same draws (4 steps) both give identical
tokens. Targets: 5x at temperature 0; 5x and 4x lower peak memory at temperature 0.2.
Run with ``pytest benchmarks/test_bench_dream.py --benchmark-only -s``.
"""
import pytest
import torch

import genjo_fast
from genjo_fast import reference_dream
from genjo_fast.testing import UpstreamShapedDream, random_dream, random_prompts

from harness import PositionDraws, quick

VOCAB, MASK_ID, PAD_ID = 152064, 151666, 151643
PROMPT, NEW, STEPS = 128, quick(64, 16), quick(64, 8)
CASES = {"B1_T0_entropy": (1, dict(temperature=0.0, alg="entropy")),
         "B4_T0.2_top_p": (quick(4, 2), dict(temperature=0.2, top_p=0.95, alg="maskgit_plus"))}
TARGETS = {"B1_T0_entropy": {"speed-up": 5.0},
           "B4_T0.2_top_p": {"speed-up": 5.0, "memory ratio": 4.0}}


@pytest.fixture(scope="module")
def upstream(device):
    fast = random_dream(VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2, intermediate_size=128, seed=0)
    model = UpstreamShapedDream(fast.config.to_dict())
    model.load_state_dict(fast.state_dict())
    return model.eval().to(device)


@pytest.mark.parametrize("case", list(CASES))
def test_bench_dream(bench, device, upstream, case):
    batch, options = CASES[case]
    inputs, attention_mask = random_prompts(batch, PROMPT, VOCAB, pad_id=PAD_ID,
                                            avoid=(MASK_ID, PAD_ID), seed=0)
    inputs, attention_mask = inputs.to(device), attention_mask.to(device)
    setting = dict(max_new_tokens=NEW, steps=STEPS, mask_token_id=MASK_ID, **options)
    bench.describe(dict(case=f"batch {batch}, " + ", ".join(f"{k} {v}" for k, v in
                                                           options.items())),
                   batch=batch, prompt_length=PROMPT, vocab=VOCAB, hidden=64, layers=2,
                   **setting)

    def run(generate, **kw):
        return lambda: generate(upstream, inputs, attention_mask=attention_mask,
                                **{**setting, **kw})

    sides = bench.measure(
        {"upstream": run(reference_dream.diffusion_generate),
         "genjo_fast": run(genjo_fast.diffusion_generate)},
        repeats=3, memory=True,
        warmup_sides={"upstream": run(reference_dream.diffusion_generate, steps=2),
                      "genjo_fast": run(genjo_fast.diffusion_generate, steps=2)})
    ref, fast = sides["upstream"].out, sides["genjo_fast"].out
    if options["temperature"] == 0:
        bench.assert_equal(fast, ref, "tokens identical to upstream's (statement)")
    else:
        for out in (ref, fast):
            bench.check(torch.equal(out[:, :PROMPT], inputs) and not (out == MASK_ID).any(),
                        "prompt kept and every position unmasked (both sides)")
        few = dict(setting, steps=4)
        bench.assert_equal(
            genjo_fast.diffusion_generate(upstream, inputs, attention_mask=attention_mask,
                                          draws=PositionDraws(0), **few),
            reference_dream.diffusion_generate(upstream, inputs, attention_mask=attention_mask,
                                               draws=PositionDraws(0), **few),
            "tokens identical to the statement's with the same draws (4 steps)")
    targets = TARGETS[case]
    bench.ratio("speed-up", "upstream", "genjo_fast", target=targets.get("speed-up"))
    bench.ratio("memory ratio", "upstream", "genjo_fast", memory=True,
                target=targets.get("memory ratio"))
