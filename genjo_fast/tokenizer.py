"""The character-level chat tokenizer of genjo_fast's trained models.

Built with the ``tokenizers`` library and wrapped as a transformers
``PreTrainedTokenizerFast`` that carries the special tokens and a chat template, so that it
saves and loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any hub
tokenizer. One token per character of printable ASCII plus tab and newline, with one
refinement: a digit's token carries its place in its number, counted from the right (units,
tens, hundreds and above; :data:`PLACE_MARKS`), so "47" is the tokens ``4′ 7`` and "132" is
``1″ 3′ 2``. Numbers then line up by place without positional arithmetic (the idea of
place-value or "abacus" embeddings for arithmetic in transformers); decoding drops the marks,
so the text round-trips. Digits separated by spaces (``Sort: 3 1 2``) are units each.

Special tokens, LLaDA's roles under short names: ``<|mask|>`` (the mask the diffusion model
predicts), ``<|endoftext|>`` (EOS, also the pad token, as LLaDA pads answers with EOS),
``<|eot_id|>`` (end of turn), ``<|bos|>``, ``<|unk|>`` and one token per chat role. A turn is
``<|role|>content<|eot_id|>``; the prompt of a conversation is ``<|bos|>`` then its turns,
then ``<|assistant|>`` when ``add_generation_prompt=True``.
"""
from __future__ import annotations

import string

MASK, EOS, EOT, BOS, UNK = "<|mask|>", "<|endoftext|>", "<|eot_id|>", "<|bos|>", "<|unk|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
SPECIAL_TOKENS = (MASK, EOS, EOT, BOS, UNK) + ROLE_TOKENS
#: The characters with a token of their own; any other character becomes ``<|unk|>``.
CHARACTERS = tuple(c for c in string.printable if c not in "\r\x0b\x0c")
#: Marks of the tens digit and of the hundreds-and-above digits, added to digit tokens by the
#: normalizer and removed by the decoder (characters outside :data:`CHARACTERS`).
PLACE_MARKS = ("\u2032", "\u2033")
#: Digit tokens of the tens and hundreds-and-above places (the units are plain digits).
PLACE_DIGITS = tuple(d + mark for mark in PLACE_MARKS for d in string.digits)

#: Jinja chat template: ``<|bos|>`` then ``<|role|>content<|eot_id|>`` per message, then
#: ``<|assistant|>`` with ``add_generation_prompt``. Unknown roles are an error.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['" + "', '".join(ROLES) + "'] %}"
    "{{ raise_exception('unknown chat role ' + message['role'] + '; expected one of "
    + ", ".join(ROLES) + "') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + EOT + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("genjo_fast's chat tokenizer is a transformers tokenizer: "
                          'pip install "genjo_fast[zoo]" (or transformers)') from exc
    return transformers


def load_tokenizer(directory):
    """The tokenizer saved in ``directory`` by ``save_pretrained`` (e.g. a shipped model's),
    as a ``transformers.PreTrainedTokenizerFast``.

    Raises:
        ImportError: transformers is not installed (the message names the ``zoo`` extra).
    """
    return _transformers().PreTrainedTokenizerFast.from_pretrained(str(directory))


def build_tokenizer():
    """The character-level chat tokenizer.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``mask_token`` ``<|mask|>`` (id 0),
        ``eos_token`` = ``pad_token`` ``<|endoftext|>`` (id 1), the EoT token ``<|eot_id|>``
        (id 2, also in ``additional_special_tokens``), ``bos_token``, ``unk_token``, the role
        tokens, one token per character of :data:`CHARACTERS` and per digit of
        :data:`PLACE_DIGITS` (digits followed by digits), left padding (prompts are
        left-padded, as ``genjo_fast.generate`` expects) and :data:`CHAT_TEMPLATE`.
        ``decode(..., skip_special_tokens=True)`` drops every special token.
    """
    PreTrainedTokenizerFast = _transformers().PreTrainedTokenizerFast
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tens, hundreds = PLACE_MARKS
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS + PLACE_DIGITS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Sequence([
        # Marks of a text's own are unknown characters, not place marks.
        normalizers.Replace(Regex(f"[{tens}{hundreds}]"), "\ufffd"),
        # A digit followed by two or more digits: hundreds or above; then by one: tens.
        normalizers.Replace(Regex(r"(?<=\d)(?=\d\d)"), hundreds),
        normalizers.Replace(Regex(r"(?<=\d)(?=\d)"), tens),
    ])
    # One piece per character, a digit together with its mark.
    core.pre_tokenizer = pre_tokenizers.Split(
        Regex(f"\\d[{tens}{hundreds}]?|[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Sequence([decoders.Replace(tens, ""), decoders.Replace(hundreds, ""),
                                      decoders.Fuse()])  # no separators between characters
    return PreTrainedTokenizerFast(
        tokenizer_object=core, mask_token=MASK, eos_token=EOS, pad_token=EOS, bos_token=BOS,
        unk_token=UNK, additional_special_tokens=[EOT, *ROLE_TOKENS],
        chat_template=CHAT_TEMPLATE, padding_side="left", model_max_length=4096,
        clean_up_tokenization_spaces=False)


def special_ids(tokenizer) -> dict:
    """``{"mask_id", "eos_id", "eot_id", "pad_id"}`` of a tokenizer built by
    :func:`build_tokenizer` (or loaded from its files): the keywords ``genjo_fast.generate``
    and the training loss take."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    if eot is None or eot == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {EOT} token")
    return {"mask_id": tokenizer.mask_token_id, "eos_id": tokenizer.eos_token_id,
            "eot_id": eot, "pad_id": tokenizer.pad_token_id}


__all__ = ["build_tokenizer", "load_tokenizer", "special_ids", "CHAT_TEMPLATE", "SPECIAL_TOKENS", "CHARACTERS",
           "PLACE_MARKS", "PLACE_DIGITS",
           "MASK", "EOS", "EOT", "BOS", "UNK", "ROLES"]
