"""End-to-end generate: the reference vs genjo_fast on a small model with LLaDA's vocabulary.

Setting of the foundation issue: vocab 126464, prompt 128, gen 64, block 16, steps 32; batch 1
at temperature 0 and batch 4 at temperature 1. The model is generic (full logits for every
position, as HF models return) unless the case says ``logits_slice``. Run with
``pytest benchmarks/test_bench_generate.py --benchmark-only``; time ratios and peak memory are
printed and stored in each benchmark's ``extra_info``.
"""
import pytest
import torch

import genjo_fast
from genjo_fast import reference
from genjo_fast.testing import FullLogitsOnly, TinyBidirectionalLM, random_prompts

from conftest import peak_memory

VOCAB, MASK_ID = 126464, 126336
SETTING = dict(steps=32, gen_length=64, block_length=16)
CASES = {"B1_T0": (1, 0.0), "B4_T1": (4, 1.0)}
_times = {}


@pytest.fixture(scope="module")
def model(device):
    model = TinyBidirectionalLM(VOCAB, d_model=64, n_heads=4, n_layers=2, max_len=256,
                                seed=0).to(device)
    with torch.no_grad():  # warm up, so that the first case measured does not pay for it
        model(torch.zeros(4, 192, dtype=torch.long, device=device))
    return model


def run_case(benchmark, device, model, case, impl):
    batch, temperature = CASES[case]
    prompt, attention_mask = random_prompts(batch, 128, VOCAB, pad_id=126081,
                                            avoid=(MASK_ID,), seed=0)
    prompt, attention_mask = prompt.to(device), attention_mask.to(device)
    generate = reference.generate if impl == "reference" else genjo_fast.generate
    generic = FullLogitsOnly(model)
    memory = {}

    def call():
        torch.manual_seed(0)
        with peak_memory(device, memory):
            out = generate(model if impl == "fast+logits_slice" else generic, prompt,
                           attention_mask, temperature=temperature, **SETTING)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(call, rounds=1, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.mean
    _times[(case, impl)] = (seconds, memory["peak"])
    benchmark.extra_info.update(case=case, impl=impl, seconds=seconds,
                                peak_mib=memory["peak"] / 2**20, device=str(device))
    ref = _times.get((case, "reference"))
    if ref is not None and impl != "reference":
        benchmark.extra_info.update(speedup=ref[0] / seconds,
                                    memory_ratio=ref[1] / max(memory["peak"], 1))
        print(f"\n{case} {impl}: {ref[0] / seconds:.2f}x faster than the reference "
              f"({ref[0]:.2f} s -> {seconds:.2f} s), peak memory "
              f"{ref[1] / 2**20:.0f} MiB -> {memory['peak'] / 2**20:.0f} MiB")


# The reference runs first in each case so that the ratios come from one run, side by side.
@pytest.mark.parametrize("impl", ["reference", "fast", "fast+logits_slice"])
@pytest.mark.parametrize("case", list(CASES))
def test_bench_generate(benchmark, device, model, case, impl):
    run_case(benchmark, device, model, case, impl)
