"""Monte Carlo log-likelihood: the reference statement pair by pair vs genjo_fast batched.

Setting of issue 6: genjo_fast's LLaDA model with random weights and LLaDA's vocabulary
(126464; 2 layers, d_model 64), 32 ``(prompt, answer)`` pairs with prompts of 64..128 and
answers of 8..32 tokens, ``mc_num`` 32, ``batch_size`` 16. Both are handed the same draws, so
the estimates agree to float tolerance (checked). The reference computes the full
``(16, L, V)`` logits per round; genjo_fast packs the pairs' rows into shared calls and runs
the LM head on the masked rows only.

Run with ``pytest benchmarks/test_bench_likelihood.py --benchmark-only -s``; the speed-up and
peak memory are printed and stored in the benchmarks' ``extra_info``.
"""
import pytest
import torch

from genjo_fast import likelihood, reference_likelihood
from genjo_fast.testing import random_llada

from conftest import peak_memory

VOCAB, MASK_ID = 126464, 126336
PAIRS, MC_NUM, BATCH_SIZE = 32, 32, 16
_results = {}


@pytest.fixture(scope="module")
def setting(device):
    model = random_llada(VOCAB, d_model=64, n_heads=4, n_layers=2, max_len=256, seed=0)
    model.to(device)
    g = torch.Generator().manual_seed(0)
    pairs, draws = [], []
    for _ in range(PAIRS):
        prompt_len = int(torch.randint(64, 129, (), generator=g))
        answer_len = int(torch.randint(8, 33, (), generator=g))
        prompt = torch.randint(0, MASK_ID, (prompt_len,), generator=g)
        answer = torch.randint(0, MASK_ID, (answer_len,), generator=g)
        pairs.append((prompt.to(device), answer.to(device)))
        draws.append(reference_likelihood.TensorMaskDraws.sample(
            MC_NUM // BATCH_SIZE, answer_len, BATCH_SIZE, g))
    with torch.no_grad():  # warm up, so that the first case measured does not pay for it
        model(torch.zeros(BATCH_SIZE, 160, dtype=torch.long, device=device))
    return model, pairs, draws


def _reference(model, pairs, draws):
    return [reference_likelihood.get_log_likelihood(model, p, a, MC_NUM, BATCH_SIZE, 0.,
                                                    MASK_ID, draws=d)
            for (p, a), d in zip(pairs, draws)]


def _genjo_fast(model, pairs, draws):
    return likelihood.get_log_likelihoods(model, pairs, MC_NUM, BATCH_SIZE, 0., MASK_ID,
                                          draws=draws)


# The reference runs first so that the ratio comes from one run, side by side.
@pytest.mark.parametrize("impl", ["reference", "genjo_fast"])
def test_bench_likelihood(benchmark, device, setting, impl):
    model, pairs, draws = setting
    run = _reference if impl == "reference" else _genjo_fast
    memory, values = {}, {}

    def call():
        with peak_memory(device, memory):
            values["out"] = run(model, pairs, draws)

    benchmark.pedantic(call, rounds=1, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(impl=impl, seconds=seconds, peak_mib=memory["peak"] / 2**20,
                                device=str(device))
    if impl == "reference":
        _results["reference"] = (seconds, memory["peak"], values["out"])
        return
    ref_seconds, ref_peak, ref_values = _results["reference"]
    error = max(abs(a - b) for a, b in zip(ref_values, values["out"]))
    assert error < 1e-3 * max(abs(v) for v in ref_values)
    benchmark.extra_info.update(speedup=ref_seconds / seconds,
                                memory_ratio=ref_peak / max(memory["peak"], 1),
                                max_abs_difference=error)
    print(f"\nlog-likelihood, {PAIRS} pairs, mc_num {MC_NUM}: genjo_fast "
          f"{ref_seconds / seconds:.2f}x faster than the reference ({ref_seconds:.2f} s -> "
          f"{seconds:.2f} s), peak memory {ref_peak / 2**20:.0f} MiB -> "
          f"{memory['peak'] / 2**20:.0f} MiB; max |difference| {error:.2e}")
