"""Tensor-parallel generation under torchrun (:mod:`genjo_fast.parallel`).

``torchrun --nproc_per_node N -m genjo_fast.parallel_demo`` builds a small random model
(``--family llada`` or ``dream``, 8 heads: N in 1, 2, 4, 8), generates with it split over the
N ranks and, on rank 0, with the unsplit model in one process, and prints whether the tokens
are identical (exit status 1 if not) and both times.

``torchrun --nproc_per_node N -m genjo_fast.parallel_demo --model DIR --prompt "..."`` loads a
LLaDA or Dream checkpoint directory with its tokenizer files (transformers) on every rank with
``load_parallel`` (each GPU holds its shards only) and prints on rank 0 the answer, the model
forwards and the time. The sampling flags are those of ``genjo-fast chat`` (``--gen-length``,
``--steps``, ``--block-length``, ``--temperature``, ``--seed``, ``--cache``, ...). On GPUs the
backend is NCCL, one GPU per rank (``cuda:LOCAL_RANK``); on CPU, gloo.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .chat import Conversation, _quiet_transformers, answer_text, chat_model, run_sampler
from .cli import DTYPES, add_settings_arguments, settings_from
from .parallel import init_distributed, load_parallel, parallelize
from .testing import random_dream, random_llada, random_prompts

#: The random model's vocabulary (a multiple of 8, so the LM head splits over up to 8 ranks).
RANDOM_VOCAB = 1024


def _random_model(family: str) -> torch.nn.Module:
    """A 2-layer model with 8 query and 8 key/value heads, float32, on the CPU (seeded)."""
    special = RANDOM_VOCAB - 1
    if family == "llada":
        return random_llada(RANDOM_VOCAB, d_model=128, n_heads=8, n_layers=2, seed=0,
                            mask_token_id=special, eos_token_id=special - 1)
    return random_dream(RANDOM_VOCAB, hidden_size=128, num_attention_heads=8,
                        num_key_value_heads=8, num_hidden_layers=2, seed=0,
                        mask_token_id=special, eos_token_id=special - 1)


def _timed(chat, prompt: torch.Tensor, settings):
    """``(ids, stats, seconds)`` of one call of the family's sampler (fresh keywords: a fresh
    generator)."""
    if prompt.device.type == "cuda":
        torch.cuda.synchronize(prompt.device)
    start = time.perf_counter()
    out, stats = run_sampler(chat, prompt, None, settings.keywords(chat))
    if prompt.device.type == "cuda":
        torch.cuda.synchronize(prompt.device)
    return out, stats, time.perf_counter() - start


def check_random(family: str, settings, device: torch.device) -> int:
    """The random model split over the ranks against the unsplit one on rank 0."""
    model = _random_model(family)
    single = copy.deepcopy(model).to(device) if dist.get_rank() == 0 else None
    parallelize(model, device=device)
    mask_id = model.config.mask_token_id
    prompt = random_prompts(1, 16, RANDOM_VOCAB, pad_id=0, avoid=(mask_id,), seed=0,
                            padded=False)[0].to(device)
    out, stats, seconds = _timed(chat_model(model, None, family, "random"), prompt, settings)
    if single is None:
        return 0
    want, _, single_seconds = _timed(chat_model(single, None, family, "random"), prompt,
                                     settings)
    same = torch.equal(out, want)
    print(f"random {family} model, {dist.get_world_size()} ranks ({device.type}): "
          f"{stats.nfe} forwards in {seconds:.3f} s (one process: {single_seconds:.3f} s)")
    print(f"tokens identical to one process: {same}", flush=True)
    return 0 if same else 1


def answer(path: str, prompt_text: str, dtype: Optional[torch.dtype], settings,
           device: torch.device) -> Tuple[str, object, float]:
    """Loads the checkpoint split over the ranks and answers ``prompt_text`` on every rank
    (collective). Returns ``(answer text, GenerateStats, seconds)``."""
    from transformers import AutoTokenizer

    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_parallel(path, dtype=dtype, device=device)
    family = "llada" if model.config.model_type == "llada" else "dream"
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
    chat = chat_model(model, tokenizer, family, path)
    ids, _, _ = Conversation(chat).prompt(prompt_text, settings.gen_length)
    out, stats, seconds = _timed(chat, torch.tensor([ids], device=device), settings)
    return answer_text(chat, out[0, len(ids):].tolist()), stats, seconds


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N -m genjo_fast.parallel_demo",
        description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a LLaDA or Dream checkpoint directory with its tokenizer files "
                             "(default: a random model, checked against one process)")
    parser.add_argument("--family", choices=["llada", "dream"], default="llada",
                        help="the random model's family (without --model)")
    parser.add_argument("--prompt", default="Write a haiku about parallel computing.",
                        help="the user message (with --model)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter dtype with --model (default: bfloat16 on CUDA, "
                             "float32 on CPU)")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    settings = settings_from(args)
    device = init_distributed()
    try:
        if args.model is None:
            return check_random(args.family, settings, device)
        text, stats, seconds = answer(args.model, args.prompt, DTYPES.get(args.dtype),
                                      settings, device)
        if dist.get_rank() == 0:
            print(text)
            print(f"({dist.get_world_size()} ranks, {stats.nfe} forwards, {seconds:.2f} s, "
                  f"{settings.gen_length / seconds:.1f} tokens/s)", flush=True)
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
