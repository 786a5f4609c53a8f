"""Tiny masked-LM family members for tests and CPU benchmarks, built in-process (no downloads).

:func:`tiny_tokenizer` is a word-level ``PreTrainedTokenizerFast`` with mask, pad, EOS and
chat-marker tokens; :func:`tiny_model` is a real transformers model class (ModernBERT, BERT,
RoBERTa masked LMs; GPT-2 for DiffuGPT) with a small random config. Both need ``transformers``
and ``tokenizers``, imported when called.
"""
from __future__ import annotations

from typing import Optional

import torch

#: The tokenizer's special tokens, in id order (ids 0..5).
SPECIALS = ("<pad>", "<mask>", "<eos>", "<|im_start|>", "<|im_end|>", "<unk>")
PAD_ID, MASK_ID, EOS_ID, IM_START_ID, IM_END_ID, UNK_ID = range(len(SPECIALS))
WORDS = ("the cat dog sat on a mat and ran to big small red blue green house tree car "
         "is was it he she we they yes no what why how when where who one two three four "
         "five six seven eight nine ten good bad hot cold up down left right user assistant "
         "question answer").split()
KINDS = ("modernbert", "bert", "roberta", "gpt2")


def tiny_tokenizer(words=WORDS):
    """A word-level fast tokenizer over ``SPECIALS + words`` (whitespace-split, unknown words
    to ``<unk>``), with ``mask_token``, ``pad_token``, ``eos_token`` and the chat markers as
    special tokens. ``len(tokenizer) == len(SPECIALS) + len(words)``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + tuple(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", mask_token="<mask>", eos_token="<eos>",
        unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def tiny_model(kind: str, vocab_size: int = len(SPECIALS) + len(WORDS), *, hidden: int = 32,
               layers: int = 2, heads: int = 2, intermediate: Optional[int] = None,
               positions: int = 64, seed: int = 0, **config):
    """A transformers model with random weights, in eval mode.

    Args:
        kind: ``"modernbert"`` (``ModernBertForMaskedLM``), ``"bert"`` (``BertForMaskedLM``),
            ``"roberta"`` (``RobertaForMaskedLM``, ``positions`` usable positions after its
            offset) or ``"gpt2"`` (``GPT2LMHeadModel``, for DiffuGPT).
        positions: the context window. config: more config fields.
    """
    import transformers as tf

    intermediate = intermediate or 2 * hidden
    specials = dict(pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=EOS_ID)
    if kind == "modernbert":
        cfg = tf.ModernBertConfig(vocab_size=vocab_size, hidden_size=hidden,
                                  intermediate_size=intermediate, num_hidden_layers=layers,
                                  num_attention_heads=heads, max_position_embeddings=positions,
                                  cls_token_id=EOS_ID, sep_token_id=EOS_ID,
                                  local_attention=min(128, positions), **specials, **config)
        cls = tf.ModernBertForMaskedLM
    elif kind == "bert":
        cfg = tf.BertConfig(vocab_size=vocab_size, hidden_size=hidden,
                            intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=positions,
                            **specials, **config)
        cls = tf.BertForMaskedLM
    elif kind == "roberta":
        cfg = tf.RobertaConfig(vocab_size=vocab_size, hidden_size=hidden,
                               intermediate_size=intermediate, num_hidden_layers=layers,
                               num_attention_heads=heads,
                               max_position_embeddings=positions + PAD_ID + 1, **specials,
                               **config)
        cls = tf.RobertaForMaskedLM
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_inner=intermediate,
                            n_layer=layers, n_head=heads, n_positions=positions, **specials,
                            **config)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # Spread the logits (tied embeddings at the default init give nearly flat predictions).
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model
