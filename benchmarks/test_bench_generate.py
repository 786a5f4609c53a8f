"""End-to-end generate: the reference vs genjo_fast on small models with LLaDA's vocabulary.

Setting of the foundation issue: vocab 126464, prompt 128, gen 64, block 16, steps 32; batch 1
at temperature 0 and batch 4 at temperature 1 (quick mode: gen 32, steps 8, and batch 2 with
steps 4 at temperature 1). Two models:

* ``generic``: a small bidirectional transformer that returns full logits for every position,
  as HF models do (genjo_fast cannot trim its forward);
* ``llada``: genjo_fast's own LLaDA model (random weights), whose LM head genjo_fast runs on
  the block rows only; the reference runs the same model's full forward.

Checks: at temperature 0 the tokens are identical to the reference's. At temperature 1 the
timed calls draw fresh random numbers (the samplers' own paths), so their tokens differ; both
must keep the prompt and unmask every position, and on a one-block schedule handed the same
draws (:class:`harness.PositionDraws`) both must give identical tokens.
Targets (speed-up, peak-memory ratio) as in the foundation issue.
Run with ``pytest benchmarks/test_bench_generate.py --benchmark-only -s``.
"""
import pytest
import torch

import genjo_fast
from genjo_fast import reference
from genjo_fast.testing import FullLogitsOnly, TinyBidirectionalLM, random_llada, random_prompts

from harness import PositionDraws, quick

VOCAB, MASK_ID = 126464, 126336
SETTING = quick(dict(steps=32, gen_length=64, block_length=16),
                dict(steps=8, gen_length=32, block_length=16))
CASES = {"B1_T0": (1, 0.0, SETTING["steps"]),  # id: (batch, temperature, steps)
         "B4_T1": (quick(4, 2), 1.0, quick(32, 4))}
TARGETS = {  # (case, model): {figure: minimum}
    ("B1_T0", "generic"): {"speed-up": 1.4},
    ("B4_T1", "generic"): {"speed-up": 8.0, "memory ratio": 4.0},
    ("B1_T0", "llada"): {"speed-up": 5.0},
}


@pytest.fixture(scope="module")
def models(device):
    return {
        "generic": FullLogitsOnly(TinyBidirectionalLM(VOCAB, d_model=64, n_heads=4, n_layers=2,
                                                      max_len=256, seed=0)).to(device),
        "llada": random_llada(VOCAB, d_model=64, n_heads=4, n_layers=2, max_len=256,
                              seed=0).to(device),
    }


@pytest.mark.parametrize("model_kind", ["generic", "llada"])
@pytest.mark.parametrize("case", list(CASES))
def test_bench_generate(bench, device, models, case, model_kind):
    batch, temperature, steps = CASES[case]
    setting = dict(SETTING, steps=steps, temperature=temperature)
    model = models[model_kind]
    prompt, attention_mask = random_prompts(batch, 128, VOCAB, pad_id=126081,
                                            avoid=(MASK_ID,), seed=0)
    prompt, attention_mask = prompt.to(device), attention_mask.to(device)
    bench.describe(dict(case=f"batch {batch}, temperature {temperature:g}", model=model_kind),
                   batch=batch, prompt_length=128, vocab=VOCAB, **setting)

    def run(generate, **kw):
        return lambda: generate(model, prompt, attention_mask, **{**setting, **kw})

    blocks = setting["gen_length"] // setting["block_length"]
    sides = bench.measure(
        {"reference": run(reference.generate), "genjo_fast": run(genjo_fast.generate)},
        repeats=3, memory=True,  # warm-up: one step per block, the same shapes and code
        warmup_sides={"reference": run(reference.generate, steps=blocks),
                      "genjo_fast": run(genjo_fast.generate, steps=blocks)})
    ref, fast = sides["reference"].out, sides["genjo_fast"].out
    if temperature == 0:
        bench.assert_equal(fast, ref, "tokens identical to the reference")
    else:
        for out in (ref, fast):
            bench.check(torch.equal(out[:, :128], prompt) and not (out == MASK_ID).any(),
                        "prompt kept and every position unmasked (both sides)")
        one_block = dict(setting, gen_length=setting["block_length"], steps=2)
        bench.assert_equal(
            genjo_fast.generate(model, prompt, attention_mask, draws=PositionDraws(0),
                                **one_block),
            reference.generate(model, prompt, attention_mask, draws=PositionDraws(0),
                               **one_block),
            "tokens identical to the reference's with the same draws (one block, 2 steps)")
    targets = TARGETS.get((case, model_kind), {})
    bench.ratio("speed-up", "reference", "genjo_fast", target=targets.get("speed-up"))
    bench.ratio("memory ratio", "reference", "genjo_fast", memory=True,
                target=targets.get("memory ratio"))
