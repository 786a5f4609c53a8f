"""Demo: the reference sampler and genjo_fast on the same prompt, no downloads.

``python -m genjo_fast.demo`` builds a small random bidirectional transformer with LLaDA's
vocabulary (126464 ids, mask id 126336), runs both samplers on one prompt, and prints whether
the tokens match and the speed-up. Timing (:mod:`genjo_fast.timing`): torch's threads are
pinned (``--threads``, default ``GENJO_FAST_BENCH_THREADS`` or 1), every sampler is warmed up
(one call with one step per block: the same shapes and code), then each is timed as the median
of ``--repeats`` (default 3) rounds in which the samplers run alternately; the machine's load
during the timings is printed, with a warning when other processes were busy. Options:
``--batch``, ``--gen-length``, ``--steps``, ``--threads``, ``--repeats``, ...
"""
from __future__ import annotations

import argparse

import torch

import genjo_fast
from genjo_fast import reference, timing
from genjo_fast.testing import FullLogitsOnly, TinyBidirectionalLM, random_prompts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch threads (default: ${timing.THREADS_ENV}, else "
                             f"{timing.DEFAULT_THREADS})")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds; each sampler's time is their median")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")

    threads = timing.pin_threads(args.threads)
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
    print(f"timing: {threads} torch thread(s), median of {args.repeats} alternating rounds "
          f"after a warm-up call of each sampler (one step per block)")

    samplers = {"reference": (reference.generate, model),
                "generic": (genjo_fast.generate, FullLogitsOnly(model)),
                "sliced": (genjo_fast.generate, model)}

    def call(name, **overrides):
        generate, m = samplers[name]
        return lambda: generate(m, prompt, attention_mask, **{**kw, **overrides})

    one_step_per_block = args.gen_length // args.block_length  # warm-up: same shapes, code
    meter = timing.LoadMeter(threads)
    sides = timing.measure({name: call(name) for name in samplers}, device,
                           repeats=args.repeats,
                           warmup_sides={name: call(name, steps=one_step_per_block)
                                         for name in samplers})
    load = meter.read()
    ref = sides["reference"]
    same = all(torch.equal(ref.out, sides[name].out) for name in ("generic", "sliced"))
    print(f"reference generate:                       {ref.median:7.3f} s")
    for name, label in (("generic", "full-logits model:  "), ("sliced", "block-rows LM head:")):
        side = sides[name]
        print(f"genjo_fast.generate, {label}  {side.median:7.3f} s  "
              f"({ref.median / side.median:.1f}x)")
    print(f"tokens identical to the reference: {'yes' if same else 'NO'}")
    print("load: " + load.describe())
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
