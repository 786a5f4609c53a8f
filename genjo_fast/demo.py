"""Demo: a trained model answering questions, and the reference sampler vs genjo_fast.

``python -m genjo_fast.demo`` (nothing is downloaded) runs two parts:

1. ``tiny-chat``, the small model genjo_fast trains and ships (:mod:`genjo_fast.zoo`; needs the
   ``zoo`` extra for its tokenizer), answers a few questions of its task suite (adding, sorting
   digits, reversing words). It prints the answers, whether the reference sampler and
   genjo_fast give identical tokens, the speed-up, and the answers and the model forwards
   under Fast-dLLM's approximate mode ``cache="dual", threshold=0.9``.
2. A random bidirectional transformer with LLaDA-8B's vocabulary (126464 ids, mask id 126336),
   where sampling over the large vocabulary dominates: both samplers on one prompt, the
   speed-up and whether the tokens match.

Timing (:mod:`genjo_fast.timing`): torch's threads are pinned (``--threads``, default
``GENJO_FAST_BENCH_THREADS`` or 1), every sampler is warmed up, then each is timed as the median
of ``--repeats`` (default 3) rounds in which the samplers run alternately; the machine's load
during the timings is printed, with a warning when other processes were busy. Options:
``--batch``, ``--gen-length``, ``--steps``, ``--threads``, ``--repeats``, ``--skip-trained``,
...
"""
from __future__ import annotations

import argparse

import torch

import genjo_fast
from genjo_fast import reference, timing
from genjo_fast.testing import FullLogitsOnly, TinyBidirectionalLM, random_prompts


#: The questions part 1 asks, with their expected answers.
QUESTIONS = (("What is 47 plus 38?", "85"), ("What is 9 plus 64?", "73"),
             ("Sort: 7 2 9 4 1", "1 2 4 7 9"), ("Sort: 3 8 0 5 5 2", "0 2 3 5 5 8"),
             ("Reverse: planet", "tenalp"), ("Reverse: genjo", "ojneg"))
#: The trained model's setting (its answers fit in 32 tokens).
TRAINED_SETTING = dict(gen_length=32, block_length=8, steps=32)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="part 2's batch")
    parser.add_argument("--prompt-length", type=int, default=64, help="part 2's prompt")
    parser.add_argument("--gen-length", type=int, default=32, help="part 2's answer length")
    parser.add_argument("--block-length", type=int, default=8, help="part 2's block length")
    parser.add_argument("--steps", type=int, default=16, help="part 2's steps")
    parser.add_argument("--skip-trained", action="store_true",
                        help="run part 2 only (no tokenizer needed)")
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
    return args


def compare(samplers, device, repeats: int, exact=None, warmup_sides=None):
    """Times the samplers side by side; returns (sides, load, whether the ``exact`` sides
    (default: all) gave the reference's tokens)."""
    meter = timing.LoadMeter(torch.get_num_threads())
    sides = timing.measure(samplers, device, repeats=repeats, warmup_sides=warmup_sides)
    load = meter.read()
    exact = [name for name in sides if name != "reference"] if exact is None else exact
    same = all(torch.equal(sides["reference"].out, sides[name].out) for name in exact)
    return sides, load, same


def verdict(answer: str, expected: str) -> str:
    return "right" if answer == expected else f"WRONG, expected {expected}"


def trained_model_part(args, device) -> bool:
    """Part 1; returns whether the reference and genjo_fast gave identical tokens."""
    from genjo_fast import tasks, zoo
    from genjo_fast.tokenizer import special_ids

    model, tokenizer = zoo.load("tiny-chat", device=device)
    ids = special_ids(tokenizer)
    prompt, attention_mask = tasks.encode_prompts(tokenizer, [q for q, _ in QUESTIONS])
    prompt, attention_mask = prompt.to(device), attention_mask.to(device)
    kw = dict(TRAINED_SETTING, mask_id=ids["mask_id"])
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"== part 1: tiny-chat, genjo_fast's trained {params:.1f}M-parameter LLaDA model "
          f"(genjo_fast.zoo), on {device}")
    print(f"setting: batch {len(QUESTIONS)} (left-padded), gen {kw['gen_length']}, block "
          f"{kw['block_length']}, steps {kw['steps']}, temperature 0")

    def answers(out):
        return [tasks.decode_answer(tokenizer, row, ids["eos_id"], ids["eot_id"])
                for row in out[:, prompt.shape[1]:].tolist()]

    approximate = dict(cache="dual", threshold=0.9)
    samplers = {"reference": lambda: reference.generate(model, prompt, attention_mask, **kw),
                "genjo_fast": lambda: genjo_fast.generate(model, prompt, attention_mask, **kw),
                "approximate": lambda: genjo_fast.generate(model, prompt, attention_mask, **kw,
                                                           **approximate, return_stats=True)}
    sides, load, same = compare(samplers, device, args.repeats, exact=["genjo_fast"])
    for (question, expected), answer in zip(QUESTIONS, answers(sides["genjo_fast"].out)):
        print(f"  {question:<24} -> {answer:<14} ({verdict(answer, expected)})")
    ref, fast = sides["reference"].median, sides["genjo_fast"].median
    print(f"reference generate: {ref:7.3f} s; genjo_fast.generate: {fast:7.3f} s "
          f"({ref / fast:.1f}x; this model is so small that its forwards are all the time)")
    print(f"tokens identical to the reference: {'yes' if same else 'NO'}")
    _, exact = genjo_fast.generate(model, prompt, attention_mask, **kw, return_stats=True)
    out, stats = sides["approximate"].out
    print(f'approximate mode cache="dual", threshold=0.9: {sides["approximate"].median:7.3f} s '
          f"({ref / sides['approximate'].median:.1f}x), {stats.nfe} forwards for the batch "
          f"({stats.full_forwards} over the whole sequence) instead of {exact.nfe}; answers:")
    for (question, expected), answer in zip(QUESTIONS, answers(out)):
        print(f"  {question:<24} -> {answer:<14} ({verdict(answer, expected)})")
    print("load: " + load.describe())
    return same


def random_model_part(args, device) -> bool:
    """Part 2; returns whether every genjo_fast variant gave the reference's tokens."""
    vocab, mask_id = 126464, 126336
    model = TinyBidirectionalLM(vocab, d_model=64, n_heads=4, n_layers=2,
                                max_len=args.prompt_length + args.gen_length).to(device)
    prompt, attention_mask = random_prompts(args.batch, args.prompt_length, vocab,
                                            pad_id=126081, avoid=(mask_id,))
    prompt, attention_mask = prompt.to(device), attention_mask.to(device)
    kw = dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length)
    print(f"== part 2: a random {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter "
          f"bidirectional transformer with LLaDA's vocabulary ({vocab}), on {device}")
    print(f"setting: batch {args.batch}, prompt {args.prompt_length}, gen {args.gen_length}, "
          f"block {args.block_length}, steps {args.steps}, temperature 0")

    samplers = {"reference": (reference.generate, model),
                "generic": (genjo_fast.generate, FullLogitsOnly(model)),
                "sliced": (genjo_fast.generate, model)}

    def call(name, **overrides):
        generate, m = samplers[name]
        return lambda: generate(m, prompt, attention_mask, **{**kw, **overrides})

    one_step_per_block = args.gen_length // args.block_length  # warm-up: same shapes, code
    sides, load, same = compare({name: call(name) for name in samplers}, device, args.repeats,
                                warmup_sides={name: call(name, steps=one_step_per_block)
                                              for name in samplers})
    ref = sides["reference"]
    print(f"reference generate:                       {ref.median:7.3f} s")
    for name, label in (("generic", "full-logits model:  "), ("sliced", "block-rows LM head:")):
        side = sides[name]
        print(f"genjo_fast.generate, {label}  {side.median:7.3f} s  "
              f"({ref.median / side.median:.1f}x)")
    print(f"tokens identical to the reference: {'yes' if same else 'NO'}")
    print("load: " + load.describe())
    return same


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = timing.pin_threads(args.threads)
    device = torch.device(args.device)
    print(f"timing: {threads} torch thread(s), median of {args.repeats} alternating rounds "
          f"after a warm-up call of each sampler")
    same = True
    if not args.skip_trained:
        try:
            import transformers  # noqa: F401  (the zoo's tokenizer)
        except ImportError:
            print("part 1 (the trained model) needs its tokenizer: pip install "
                  "\"genjo_fast[zoo]\" (skipped)")
        else:
            same = trained_model_part(args, device) and same
            print()
    same = random_model_part(args, device) and same
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
