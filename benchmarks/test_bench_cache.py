"""Block cache (approximate, opt-in) against the exact reference and against the plain
statement of the same cache (the peers' way: torch ops, SDPA, K/V concatenated per step).

CPU: the foundation setting (vocab 126464, prompt 128, gen 64, block 16, steps 32, batch 1,
temperature 0) on a small random LLaDA model. CUDA (skipped elsewhere): an LLaDA-8B-shaped
model with random bf16 weights, prompt 512, gen 256, block 32, steps 256, batch 1 and 8:
per-step time of the dual cache against the reference's, and the whole generate against
:func:`genjo_fast.reference.generate_approximate` with the same cache and schedule.
Run with ``pytest benchmarks/test_bench_cache.py --benchmark-only -s``.
"""
import time

import pytest
import torch

import genjo_fast
from genjo_fast import reference
from genjo_fast.testing import random_llada, random_prompts

MASK_ID = 126336
_results = {}


def timed(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


@pytest.fixture(scope="module")
def cpu_model():
    return random_llada(d_model=64, n_heads=4, n_layers=2, max_len=256, seed=0)


CPU_SETTING = dict(steps=32, gen_length=64, block_length=16)
CPU_IMPLS = {
    "reference": lambda m, p, a: reference.generate(m, p, a, **CPU_SETTING),
    "statement_dual": lambda m, p, a: reference.generate_approximate(m, p, a, cache="dual",
                                                                     **CPU_SETTING),
    "genjo_fast_exact": lambda m, p, a: genjo_fast.generate(m, p, a, **CPU_SETTING),
    "genjo_fast_prefix": lambda m, p, a: genjo_fast.generate(m, p, a, cache="prefix",
                                                             **CPU_SETTING),
    "genjo_fast_dual": lambda m, p, a: genjo_fast.generate(m, p, a, cache="dual",
                                                           **CPU_SETTING),
}


@pytest.mark.parametrize("impl", list(CPU_IMPLS))
def test_bench_cache_cpu(benchmark, cpu_model, impl):
    prompt, attention_mask = random_prompts(1, 128, 126464, pad_id=126081, avoid=(MASK_ID,))
    with torch.no_grad():
        cpu_model(prompt)  # warm-up
    benchmark.pedantic(lambda: CPU_IMPLS[impl](cpu_model, prompt, attention_mask), rounds=1,
                       iterations=1)
    seconds = benchmark.stats.stats.mean
    _results[impl] = seconds
    benchmark.extra_info.update(impl=impl, seconds=seconds)
    if impl != "reference":
        print(f"\n{impl}: {_results['reference'] / seconds:.1f}x faster than the reference "
              f"({_results['reference']:.2f} s -> {seconds:.2f} s)")
    if impl == "genjo_fast_dual":
        print(f"genjo_fast_dual: {_results['statement_dual'] / seconds:.1f}x faster than the "
              f"plain statement of the same dual cache")


@pytest.fixture(scope="module")
def llada_8b(device):
    if device.type != "cuda":
        pytest.skip("LLaDA-8B-shaped benchmark: needs CUDA")
    return random_llada(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=12288,
                        max_len=4096, dtype=torch.bfloat16, device=device)


@pytest.mark.parametrize("batch", [1, 8])
def test_bench_cache_gpu(benchmark, device, llada_8b, batch):
    setting = dict(gen_length=256, block_length=32)
    prompt, attention_mask = random_prompts(batch, 512, 126464, pad_id=126081, avoid=(MASK_ID,))
    prompt, attention_mask = prompt.to(device), attention_mask.to(device)
    # The reference is timed over one step per block (steps=8) to keep the run short.
    _, ref_seconds = timed(device, lambda: reference.generate(llada_8b, prompt, attention_mask,
                                                              steps=8, **setting))
    ref_step = ref_seconds / 8
    _, statement = timed(device, lambda: reference.generate_approximate(
        llada_8b, prompt, attention_mask, steps=256, cache="dual", **setting))
    results = {}
    for graph in (False, True):
        _, results[graph] = timed(device, lambda: genjo_fast.generate(
            llada_8b, prompt, attention_mask, steps=256, cache="dual", cuda_graph=graph,
            **setting))
    benchmark.pedantic(lambda: genjo_fast.generate(llada_8b, prompt, attention_mask, steps=256,
                                                   cache="dual", cuda_graph=True, **setting),
                       rounds=1, iterations=1)
    info = dict(batch=batch, reference_ms_per_step=1e3 * ref_step,
                dual_ms_per_step=1e3 * results[False] / 256,
                dual_graph_ms_per_step=1e3 * results[True] / 256,
                step_speedup=ref_step / (results[True] / 256),
                statement_seconds=statement, dual_seconds=results[False],
                dual_graph_seconds=results[True], vs_statement=statement / results[True],
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v:.3g}" for k, v in info.items()))
