"""Token agreement of genjo_fast's LLaDA model with the reference forward, in bf16.

In bf16 the fast forward cannot be bitwise equal to the reference forward (other attention
kernel, LM head on block rows only, other rounding), so generate's tokens can differ where two
candidates are near-tied. This measures the fraction of generated tokens that agree:

* ``fast_vs_reference``: genjo_fast.generate (fast model: auto attention, block-row LM head)
  against reference.generate on the same bf16 weights run through the reference path
  (SDPA attention, full logits);
* ``bf16_vs_fp32``: the reference path in bf16 against the same weights in fp32, the noise
  floor that bf16 itself sets.

On CPU both paths use SDPA (the Triton interpreter is for correctness, not speed), so only the
LM-head trimming differs; on a GPU the fast path runs the Triton attention kernel.
Run with ``pytest benchmarks/test_bench_agreement.py --benchmark-only -s``.
"""
import copy

import torch

import genjo_fast
from genjo_fast import reference
from genjo_fast.testing import random_llada, random_prompts

VOCAB, MASK_ID = 126464, 126336


def agreement(a, b, prompt_len):
    return (a[:, prompt_len:] == b[:, prompt_len:]).float().mean().item()


def test_bench_agreement_bf16(benchmark, device, monkeypatch):
    batch, prompt_len = 8, 64
    kw = dict(steps=32, gen_length=32, block_length=8)
    model32 = random_llada(VOCAB, d_model=128, n_heads=4, n_layers=2, mlp_hidden_size=256,
                           max_len=256, seed=0).to(device)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    prompt, attention_mask = random_prompts(batch, prompt_len, VOCAB, pad_id=126081,
                                            avoid=(MASK_ID,), seed=0)
    prompt, attention_mask = prompt.to(device), attention_mask.to(device)
    monkeypatch.setenv("GENJO_FAST_ATTENTION", "sdpa")  # the reference path
    ref16 = reference.generate(model16, prompt, attention_mask, **kw)
    ref32 = reference.generate(model32, prompt, attention_mask, **kw)
    monkeypatch.delenv("GENJO_FAST_ATTENTION")  # auto: Triton on CUDA, SDPA on CPU
    fast16 = benchmark.pedantic(
        lambda: genjo_fast.generate(model16, prompt, attention_mask, **kw), rounds=1,
        iterations=1)
    result = dict(fast_vs_reference=agreement(fast16, ref16, prompt_len),
                  bf16_vs_fp32=agreement(ref16, ref32, prompt_len),
                  fast_bf16_vs_fp32=agreement(fast16, ref32, prompt_len),
                  tokens=batch * kw["gen_length"], device=str(device))
    benchmark.extra_info.update(result)
    print(f"\nbf16 token agreement on {device}: genjo_fast vs reference "
          f"{result['fast_vs_reference']:.1%}; reference bf16 vs fp32 {result['bf16_vs_fp32']:.1%};"
          f" genjo_fast bf16 vs fp32 {result['fast_bf16_vs_fp32']:.1%} "
          f"({result['tokens']} tokens)")
