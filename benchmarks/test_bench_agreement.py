"""Token agreement of genjo_fast's LLaDA model with the reference forward, in bf16 and fp32.

In bf16 the fast forward cannot be bitwise equal to the reference forward (other attention
kernel, LM head on block rows only, other rounding), so generate's tokens can differ where two
candidates are near-tied. This measures the fraction of generated tokens that agree:

* ``fast vs reference (bf16)``: genjo_fast.generate (fast model: auto attention, block-row LM
  head) against reference.generate on the same bf16 weights run through the reference path
  (SDPA attention, full logits);
* ``reference bf16 vs fp32``: the reference path in bf16 against the same weights in fp32, the
  noise floor that bf16 itself sets;
* ``fast bf16 vs fp32`` and ``fast vs reference (fp32)``.

Checks (stated tolerances, a wrong forward agrees on ~0% of the tokens): in fp32 genjo_fast
agrees with the reference on at least 99% of the tokens (the same function to 1e-5; a
different attention kernel may flip a near-tie); in bf16 genjo_fast's agreement with the fp32
tokens is at most 2 points below the reference's own bf16 agreement, and genjo_fast agrees with
the bf16 reference path on at least 90% of the tokens. Setting: batch 8, prompt 64, gen 32,
block 8, steps 32 (quick mode: batch 2, gen 16, steps 16); the sides run once, unwarmed (their
times are recorded but are not the point: bf16 matmuls are slow on most CPUs).
On CPU both paths use SDPA (the Triton interpreter is for correctness, not speed), so only the
LM-head trimming differs; on a GPU the fast path runs the Triton attention kernel.
Run with ``pytest benchmarks/test_bench_agreement.py --benchmark-only -s``.
"""
import copy

import torch

import genjo_fast
from genjo_fast import reference
from genjo_fast.testing import random_llada, random_prompts

from harness import quick

VOCAB, MASK_ID = 126464, 126336
BATCH, PROMPT_LEN = quick(8, 2), 64
SETTING = quick(dict(steps=32, gen_length=32, block_length=8),
                dict(steps=16, gen_length=16, block_length=8))


def test_bench_agreement(bench, device):
    model32 = random_llada(VOCAB, d_model=128, n_heads=4, n_layers=2, mlp_hidden_size=256,
                           max_len=256, seed=0).to(device)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    prompt, attention_mask = random_prompts(BATCH, PROMPT_LEN, VOCAB, pad_id=126081,
                                            avoid=(MASK_ID,), seed=0)
    prompt, attention_mask = prompt.to(device), attention_mask.to(device)
    bench.describe(dict(case=f"batch {BATCH}, {BATCH * SETTING['gen_length']} tokens"),
                   batch=BATCH, prompt_length=PROMPT_LEN, vocab=VOCAB, d_model=128, n_layers=2,
                   temperature=0.0, **SETTING)

    def run(generate, model, attention):
        """``generate`` with the model's attention backend set to ``attention`` (``None``:
        auto)."""
        def call():
            model.set_attention_backend(attention)
            return generate(model, prompt, attention_mask, **SETTING)
        return call

    sides = bench.measure({
        "reference bf16": run(reference.generate, model16, "sdpa"),
        "genjo_fast bf16": run(genjo_fast.generate, model16, None),
        "reference fp32": run(reference.generate, model32, "sdpa"),
        "genjo_fast fp32": run(genjo_fast.generate, model32, None),
    }, repeats=1, warmup=0)  # the figures are agreements, not times
    out = {name: side.out[:, PROMPT_LEN:] for name, side in sides.items()}

    def agreement(name, a, b):
        return bench.figure(name, 100 * (out[a] == out[b]).float().mean().item(), "%")

    fast_ref16 = agreement("fast vs reference (bf16)", "genjo_fast bf16", "reference bf16")
    ref_floor = agreement("reference bf16 vs fp32", "reference bf16", "reference fp32")
    fast_floor = agreement("fast bf16 vs fp32", "genjo_fast bf16", "reference fp32")
    fast_ref32 = agreement("fast vs reference (fp32)", "genjo_fast fp32", "reference fp32")
    bench.check(fast_ref32 >= 99.0, "fp32: genjo_fast agrees with the reference on >= 99% of "
                                    "the tokens")
    bench.check(fast_floor >= ref_floor - 2.0,
                "bf16: genjo_fast's agreement with fp32 at most 2 points below the reference's")
    bench.check(fast_ref16 >= 90.0, "bf16: genjo_fast agrees with the reference path on >= 90%"
                                    " of the tokens")
