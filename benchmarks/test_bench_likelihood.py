"""Monte Carlo log-likelihood: the reference statement pair by pair vs genjo_fast batched.

Setting of issue 6: genjo_fast's LLaDA model with random weights and LLaDA's vocabulary
(126464; 2 layers, d_model 64), 32 ``(prompt, answer)`` pairs (quick mode: 4) with prompts of
64..128 and answers of 8..32 tokens, ``mc_num`` 32, ``batch_size`` 16. Both are handed the same
mask draws, so the estimates must agree to float32 rounding (checked: atol 1e-3, rtol 1e-5 on
values of a few hundred nats). The reference computes the full ``(16, L, V)`` logits per
round; genjo_fast packs the pairs' rows into shared calls and runs the LM head on the masked
rows only. Target: 3x faster.
Run with ``pytest benchmarks/test_bench_likelihood.py --benchmark-only -s``.
"""
import torch

from genjo_fast import likelihood, reference_likelihood
from genjo_fast.testing import random_llada

from harness import quick

VOCAB, MASK_ID = 126464, 126336
PAIRS, MC_NUM, BATCH_SIZE = quick(32, 4), 32, 16


def make_setting(device):
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
    return model, pairs, draws


def test_bench_likelihood(bench, device):
    model, pairs, draws = make_setting(device)
    bench.describe(dict(case=f"{PAIRS} pairs, mc_num {MC_NUM}"), pairs=PAIRS, mc_num=MC_NUM,
                   batch_size=BATCH_SIZE, vocab=VOCAB, prompt_lengths="64..128",
                   answer_lengths="8..32")

    def reference(n=PAIRS):
        return lambda: [
            reference_likelihood.get_log_likelihood(model, p, a, MC_NUM, BATCH_SIZE, 0.,
                                                    MASK_ID, draws=d)
            for (p, a), d in zip(pairs[:n], draws[:n])]

    def fast(n=PAIRS):
        return lambda: likelihood.get_log_likelihoods(model, pairs[:n], MC_NUM, BATCH_SIZE,
                                                      0., MASK_ID, draws=draws[:n])

    sides = bench.measure({"reference": reference(), "genjo_fast": fast()}, repeats=3,
                          memory=True,  # warm-up: 2 pairs through the same code
                          warmup_sides={"reference": reference(2), "genjo_fast": fast(2)})
    want = torch.tensor(sides["reference"].out, dtype=torch.float64)
    got = torch.tensor(sides["genjo_fast"].out, dtype=torch.float64)
    bench.assert_close(got, want, "log-likelihoods equal to the reference's with the same draws",
                       atol=1e-3, rtol=1e-5)
    bench.figure("max |difference|", (got - want).abs().max().item(), "nats")
    bench.ratio("speed-up", "reference", "genjo_fast", target=3.0)
    bench.ratio("memory ratio", "reference", "genjo_fast", memory=True)
