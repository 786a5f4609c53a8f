"""End-to-end generate: the reference vs genjo_fast on small models with LLaDA's vocabulary.

Setting of the foundation issue: vocab 126464, prompt 128, gen 64, block 16, steps 32; batch 1
at temperature 0 and batch 4 at temperature 1. Two models:

* ``generic``: a small bidirectional transformer that returns full logits for every position,
  as HF models do (genjo_fast cannot trim its forward);
* ``llada``: genjo_fast's own LLaDA model (random weights), whose LM head genjo_fast runs on
  the block rows only; the reference runs the same model's full forward.

Run with ``pytest benchmarks/test_bench_generate.py --benchmark-only -s``; time ratios and peak
memory are printed and stored in each benchmark's ``extra_info``.
"""
import pytest
import torch

import genjo_fast
from genjo_fast import reference
from genjo_fast.testing import FullLogitsOnly, TinyBidirectionalLM, random_llada, random_prompts

from conftest import peak_memory

VOCAB, MASK_ID = 126464, 126336
SETTING = dict(steps=32, gen_length=64, block_length=16)
CASES = {"B1_T0": (1, 0.0), "B4_T1": (4, 1.0)}
_times = {}


@pytest.fixture(scope="module")
def models(device):
    built = {
        "generic": FullLogitsOnly(TinyBidirectionalLM(VOCAB, d_model=64, n_heads=4, n_layers=2,
                                                      max_len=256, seed=0)),
        "llada": random_llada(VOCAB, d_model=64, n_heads=4, n_layers=2, max_len=256, seed=0),
    }
    with torch.no_grad():  # warm up, so that the first case measured does not pay for it
        for model in built.values():
            model.to(device)(torch.zeros(4, 192, dtype=torch.long, device=device))
    return built


# The reference runs first in each case so that the ratios come from one run, side by side.
@pytest.mark.parametrize("impl", ["reference", "genjo_fast"])
@pytest.mark.parametrize("model_kind", ["generic", "llada"])
@pytest.mark.parametrize("case", list(CASES))
def test_bench_generate(benchmark, device, models, case, model_kind, impl):
    batch, temperature = CASES[case]
    prompt, attention_mask = random_prompts(batch, 128, VOCAB, pad_id=126081,
                                            avoid=(MASK_ID,), seed=0)
    prompt, attention_mask = prompt.to(device), attention_mask.to(device)
    generate = reference.generate if impl == "reference" else genjo_fast.generate
    memory = {}

    def call():
        torch.manual_seed(0)
        with peak_memory(device, memory):
            out = generate(models[model_kind], prompt, attention_mask, temperature=temperature,
                           **SETTING)
        return out

    benchmark.pedantic(call, rounds=1, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.mean
    key = (case, model_kind)
    benchmark.extra_info.update(case=case, model=model_kind, impl=impl, seconds=seconds,
                                peak_mib=memory["peak"] / 2**20, device=str(device))
    if impl == "reference":
        _times[key] = (seconds, memory["peak"])
        return
    ref_seconds, ref_peak = _times[key]
    benchmark.extra_info.update(speedup=ref_seconds / seconds,
                                memory_ratio=ref_peak / max(memory["peak"], 1))
    print(f"\n{case} {model_kind}: genjo_fast {ref_seconds / seconds:.2f}x faster than the "
          f"reference ({ref_seconds:.2f} s -> {seconds:.2f} s), peak memory "
          f"{ref_peak / 2**20:.0f} MiB -> {memory['peak'] / 2**20:.0f} MiB")
