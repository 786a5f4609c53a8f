"""Trained models shipped inside the package: ``genjo_fast.zoo.load("tiny-chat")``.

``tiny-chat`` is a small LLaDA model trained by ``python -m genjo_fast.train`` on the task
suite of :mod:`genjo_fast.tasks` (adding two numbers below 100, sorting digits, reversing
words), with the character-level chat tokenizer of :mod:`genjo_fast.tokenizer`. Its
directory holds the reference checkpoint format (``config.json``, ``model.safetensors``),
the tokenizer files and ``training.json`` (the command that trained it, its wall time and its
held-out accuracy).

Loading the tokenizer needs ``transformers`` (``pip install "genjo_fast[zoo]"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple, Union

import torch

#: Shipped models: name -> directory inside the package.
MODELS = {"tiny-chat": "checkpoints/tiny-chat"}


def names() -> Tuple[str, ...]:
    """The names :func:`load` accepts."""
    return tuple(MODELS)


def path(name: str = "tiny-chat") -> Path:
    """The directory of a shipped model (``load_llada`` and
    ``AutoTokenizer.from_pretrained`` read it; ``python -m genjo_fast.eval`` takes it as
    ``pretrained=``).

    Raises:
        ValueError: ``name`` is not a shipped model.
        FileNotFoundError: its files are missing from this installation.
    """
    if name not in MODELS:
        raise ValueError(f"name={name!r} is not a shipped model; expected one of "
                         f"{', '.join(MODELS)}")
    directory = Path(__file__).resolve().parent / MODELS[name]
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"the files of {name!r} are missing from {directory} (an "
                                "installation without the package data?)")
    return directory


def load(name: str = "tiny-chat", dtype: torch.dtype = torch.float32,
         device: Union[str, torch.device] = "cpu"):
    """A shipped model and its tokenizer.

    Args:
        name: one of :func:`names`.
        dtype: parameter dtype (float32: the weights are stored in float32).
        device: where the parameters go.
    Raises:
        ImportError: transformers is not installed.
    Returns:
        ``(model, tokenizer)``: a :class:`~genjo_fast.models.LLaDAModel` in eval mode with
        ``requires_grad`` off, and a ``transformers.PreTrainedTokenizerFast`` with the chat
        template and the special tokens (see :func:`genjo_fast.tokenizer.special_ids` for the
        ids ``genjo_fast.generate`` needs).

    Example::

        model, tokenizer = genjo_fast.zoo.load("tiny-chat")
        ids = genjo_fast.tokenizer.special_ids(tokenizer)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 12 plus 30?"}], add_generation_prompt=True,
            tokenize=False)
        x = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = genjo_fast.generate(model, x, gen_length=32, block_length=8, steps=32,
                                  mask_id=ids["mask_id"], eos_id=ids["eos_id"],
                                  eot_id=ids["eot_id"])
        genjo_fast.tasks.decode_answer(tokenizer, out[0, x.shape[1]:], ids["eos_id"],
                                       ids["eot_id"])   # '42'
    """
    from .models import load_llada
    from .tokenizer import load_tokenizer

    directory = path(name)
    tokenizer = load_tokenizer(directory)
    return load_llada(directory, dtype=dtype, device=device), tokenizer


__all__ = ["MODELS", "names", "path", "load"]
