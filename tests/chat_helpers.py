"""Helpers of the streaming and app tests: a character-level chat tokenizer built in-process
(the ``tokenizers`` library, wrapped as a transformers fast tokenizer with a chat template) and
a tiny random LLaDA model for it, saved as a checkpoint directory the apps can load."""
import string
from pathlib import Path

import torch

SPECIALS = ("<|mask|>", "<|endoftext|>", "<|eot_id|>", "<|startoftext|>", "<|unk|>",
            "<|start_header_id|>", "<|end_header_id|>")
MASK_ID, EOS_ID, EOT_ID = 0, 1, 2
# LLaDA's template, in miniature: BOS, then per message a header and the content ended by EoT.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
            "<|end_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
            "{% endif %}")


def char_tokenizer():
    """One token per printable ASCII character (and newline), the special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {token: i for i, token in enumerate(SPECIALS + tuple(chars))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, mask_token="<|mask|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", bos_token="<|startoftext|>", unk_token="<|unk|>",
        additional_special_tokens=["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        chat_template=TEMPLATE, padding_side="left")


def tiny_llada(tokenizer, context=256, seed=0):
    """A random LLaDA model for ``tokenizer``'s vocabulary (its special ids in the config),
    with peaked outputs (a scaled LM head) so that answers vary across positions."""
    from genjo_fast.testing import random_llada

    model = random_llada(len(tokenizer), d_model=32, n_heads=2, n_layers=2, mlp_hidden_size=64,
                         max_len=context, seed=seed, mask_token_id=MASK_ID, eos_token_id=EOS_ID,
                         pad_token_id=EOS_ID)
    with torch.no_grad():
        model.transformer.ff_out.weight.mul_(4)
    return model


def save_dream_checkpoint(directory: Path, context=256, seed=0) -> Path:
    """A Dream checkpoint directory of a tiny random Dream model for the same tokenizer."""
    from genjo_fast.models import save_dream
    from genjo_fast.testing import random_dream

    tokenizer = char_tokenizer()
    model = random_dream(len(tokenizer), hidden_size=32, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, intermediate_size=48,
                         seed=seed, mask_token_id=MASK_ID, pad_token_id=EOS_ID,
                         eos_token_id=EOS_ID, max_position_embeddings=context)
    save_dream(model, directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def save_checkpoint(directory: Path, context=256, seed=0) -> Path:
    """A LLaDA checkpoint directory (config, weights, tokenizer files) of a tiny random
    model."""
    from genjo_fast.models import save_llada

    tokenizer = char_tokenizer()
    save_llada(tiny_llada(tokenizer, context, seed), directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
