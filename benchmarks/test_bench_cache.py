"""Block cache (approximate, opt-in) against the exact reference and against the plain
statement of the same cache (:func:`genjo_fast.reference.generate_approximate`: torch ops, the
model's attention, K/V concatenated per step).

CPU (machines without a GPU): the foundation setting (vocab 126464, prompt 128, gen 64, block
16, steps 32, batch 1, temperature 0) on a small random LLaDA model, every implementation in one
case. CUDA (skipped elsewhere): an LLaDA-8B-shaped model with random bf16 weights, prompt 512,
gen 256, block 32, steps 256, batch 1 and 8: per-step time of the dual cache (with and without a
CUDA graph) against the reference's, and the whole generate against the plain statement of the
same cache.

Checks: genjo_fast's exact path gives the reference's tokens; each cache gives the tokens of
its plain statement; the CUDA graph gives the tokens of the same cache without it.
Target: the dual cache 8x faster than the reference on CPU.
Run with ``pytest benchmarks/test_bench_cache.py --benchmark-only -s``.
"""
import pytest
import torch

import genjo_fast
from genjo_fast import reference
from genjo_fast.testing import random_llada, random_prompts

MASK_ID = 126336
CPU_SETTING = dict(steps=32, gen_length=64, block_length=16)


def test_bench_cache_cpu(bench, device):
    if device.type != "cpu":
        pytest.skip("the CPU setting; test_bench_cache_gpu runs on CUDA")
    model = random_llada(d_model=64, n_heads=4, n_layers=2, max_len=256, seed=0)
    prompt, attention_mask = random_prompts(1, 128, 126464, pad_id=126081, avoid=(MASK_ID,))
    bench.describe(dict(case="batch 1, temperature 0"), batch=1, prompt_length=128,
                   vocab=126464, temperature=0.0, **CPU_SETTING)

    def run(generate, **kw):
        return lambda: generate(model, prompt, attention_mask, **CPU_SETTING, **kw)

    sides = bench.measure({
        "reference": run(reference.generate),
        "genjo_fast exact": run(genjo_fast.generate),
        "statement prefix": run(reference.generate_approximate, cache="prefix"),
        "genjo_fast prefix": run(genjo_fast.generate, cache="prefix"),
        "statement dual": run(reference.generate_approximate, cache="dual"),
        "genjo_fast dual": run(genjo_fast.generate, cache="dual"),
    }, repeats=3)
    out = {name: side.out for name, side in sides.items()}
    bench.assert_equal(out["genjo_fast exact"], out["reference"],
                       "genjo_fast exact: tokens identical to the reference")
    for cache in ("prefix", "dual"):
        bench.assert_equal(out[f"genjo_fast {cache}"], out[f"statement {cache}"],
                           f"cache={cache}: tokens identical to its plain statement")
    for name in ("genjo_fast exact", "genjo_fast prefix", "genjo_fast dual"):
        bench.ratio(f"{name} vs reference", "reference", name,
                    target=8.0 if name == "genjo_fast dual" else None)
    bench.ratio("genjo_fast dual vs its statement", "statement dual", "genjo_fast dual")


@pytest.fixture(scope="module")
def llada_8b(device):
    if device.type != "cuda":
        pytest.skip("LLaDA-8B-shaped benchmark: needs CUDA")
    return random_llada(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=12288,
                        max_len=4096, dtype=torch.bfloat16, device=device)


@pytest.mark.parametrize("batch", [1, 8])
def test_bench_cache_gpu(bench, device, llada_8b, batch):
    setting = dict(gen_length=256, block_length=32)
    prompt, attention_mask = random_prompts(batch, 512, 126464, pad_id=126081, avoid=(MASK_ID,))
    prompt, attention_mask = prompt.to(device), attention_mask.to(device)
    steps, ref_steps = 256, 8  # the reference is timed over one step per block
    bench.describe(dict(batch=batch), batch=batch, prompt_length=512, steps=steps,
                   reference_steps=ref_steps, dtype="bfloat16", model="LLaDA-8B shape",
                   **setting)

    def run(generate, steps, **kw):
        return lambda: generate(llada_8b, prompt, attention_mask, steps=steps, **setting, **kw)

    sides = {"reference": run(reference.generate, ref_steps),
             "statement dual": run(reference.generate_approximate, steps, cache="dual"),
             "genjo_fast dual": run(genjo_fast.generate, steps, cache="dual"),
             "genjo_fast dual graph": run(genjo_fast.generate, steps, cache="dual",
                                          cuda_graph=True)}
    warmup = {  # two steps per block: the same shapes and code, a cached step included
        "statement dual": run(reference.generate_approximate, 16, cache="dual"),
        "genjo_fast dual": run(genjo_fast.generate, 16, cache="dual"),
        "genjo_fast dual graph": run(genjo_fast.generate, 16, cache="dual", cuda_graph=True)}
    sides = bench.measure(sides, repeats=3, memory=True, warmup_sides=warmup)
    bench.assert_equal(sides["genjo_fast dual"].out, sides["statement dual"].out,
                       "cache=dual: tokens identical to its plain statement")
    bench.assert_equal(sides["genjo_fast dual graph"].out, sides["genjo_fast dual"].out,
                       "cuda_graph=True: tokens identical to the same cache without it")
    per_step = {name: side.median / (ref_steps if name == "reference" else steps)
                for name, side in sides.items()}
    for name, seconds in per_step.items():
        bench.figure(f"{name} per step", seconds, "s")
    bench.figure("step speed-up (graph vs reference)",
                 per_step["reference"] / per_step["genjo_fast dual graph"], "x")
    bench.ratio("graph vs statement", "statement dual", "genjo_fast dual graph")
