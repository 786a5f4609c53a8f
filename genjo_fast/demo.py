"""Demo: the reference sampler and genjo_fast on the same prompt, no downloads.

``python -m genjo_fast.demo`` builds a small random bidirectional transformer with LLaDA's
vocabulary (126464 ids, mask id 126336), runs both samplers on one prompt, and prints whether
the tokens match and the speed-up. Options: ``--batch``, ``--gen-length``, ``--steps``, ...
"""
from __future__ import annotations

import argparse
import time

import torch

import genjo_fast
from genjo_fast import reference
from genjo_fast.testing import FullLogitsOnly, TinyBidirectionalLM, random_prompts


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    vocab, mask_id = 126464, 126336
    device = torch.device(args.device)
    model = TinyBidirectionalLM(vocab, d_model=64, n_heads=4, n_layers=2,
                                max_len=args.prompt_length + args.gen_length).to(device)
    prompt, attention_mask = random_prompts(args.batch, args.prompt_length, vocab,
                                            pad_id=126081, avoid=(mask_id,))
    prompt, attention_mask = prompt.to(device), attention_mask.to(device)
    kw = dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length)
    print(f"model: random {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter "
          f"bidirectional transformer, vocab {vocab}, on {device}")
    print(f"setting: batch {args.batch}, prompt {args.prompt_length}, gen {args.gen_length}, "
          f"block {args.block_length}, steps {args.steps}, temperature 0")

    _timed(lambda: reference.generate(model, prompt, attention_mask, steps=1, gen_length=1,
                                      block_length=1))  # warm-up
    ref, t_ref = _timed(lambda: reference.generate(model, prompt, attention_mask, **kw))
    generic, t_generic = _timed(lambda: genjo_fast.generate(FullLogitsOnly(model), prompt,
                                                            attention_mask, **kw))
    sliced, t_sliced = _timed(lambda: genjo_fast.generate(model, prompt, attention_mask, **kw))
    same = torch.equal(ref, generic) and torch.equal(ref, sliced)
    print(f"reference generate:                       {t_ref:7.2f} s")
    print(f"genjo_fast.generate, full-logits model:   {t_generic:7.2f} s  "
          f"({t_ref / t_generic:.1f}x)")
    print(f"genjo_fast.generate, block-rows LM head:  {t_sliced:7.2f} s  "
          f"({t_ref / t_sliced:.1f}x)")
    print(f"tokens identical to the reference: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
