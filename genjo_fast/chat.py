"""Chat sessions over a masked-diffusion model: what ``genjo-fast chat`` and ``genjo-fast web``
share (:mod:`genjo_fast.cli`, :mod:`genjo_fast.web`).

* :func:`load_chat_model`: a model with its tokenizer and special ids: the zoo's
  ``tiny-chat`` (the default; needs ``genjo_fast.zoo``) or a LLaDA / Dream checkpoint
  directory holding its tokenizer files (needs ``transformers``).
* :class:`Settings`: every sampling option the apps expose, turned into the keywords of
  :func:`genjo_fast.generate` (LLaDA) or :func:`genjo_fast.dream.diffusion_generate` (Dream).
* :class:`Conversation`: multi-turn chat as the reference's ``chat.py`` carries it: the token
  ids of the earlier turns, each answer with its EOS ids (the padding after it) removed, then
  the new message through the chat template without its leading BOS. Turns that no longer fit
  in the model's context are dropped, oldest first.
* :meth:`Conversation.reply`: runs the sampler in a thread with a
  :class:`~genjo_fast.streaming.DiffusionIteratorStreamer` and yields a
  :class:`~genjo_fast.streaming.StreamUpdate` after every step, then a :class:`Reply` (the
  answer, forwards, tokens per second).

Bad input (an empty message, a message that cannot fit, an option the model's family lacks, an
option not available in this genjo_fast) raises :class:`ChatError` with a message meant for
the user; the session stays usable.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch

from .contract import DREAM, LLADA
from .streaming import DiffusionIteratorStreamer, StreamUpdate

DEFAULT_MODEL = "tiny-chat"
#: Tokens that end a turn in the chat templates of the supported families, besides EOS.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")
FAMILIES = ("llada", "dream")


class ChatError(ValueError):
    """A problem with the user's input or settings, with a message meant for the user."""


@dataclass
class ChatModel:
    """A model ready to chat.

    Attributes:
        model: the mask predictor (``family`` ``"llada"``: for ``genjo_fast.generate``;
            ``"dream"``: for ``diffusion_generate``).
        tokenizer: its tokenizer (``decode``, ``__call__``, ideally ``apply_chat_template``).
        family: ``"llada"`` or ``"dream"``.
        name: what it was loaded from (a zoo name or a directory).
        mask_id, eos_id: the special ids; ``stop_ids``: the ids that end an answer (EOS and
            the end-of-turn token, when the tokenizer has one).
        context: the model's context length in tokens (prompt and answer), or ``None``.
    """
    model: torch.nn.Module
    tokenizer: object
    family: str
    name: str
    mask_id: int
    eos_id: int
    stop_ids: Tuple[int, ...]
    context: Optional[int]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def chat_model(model, tokenizer, family: str, name: str) -> ChatModel:
    """A :class:`ChatModel` from a loaded ``model`` and ``tokenizer``: the special ids come
    from the model's config, else the tokenizer, else the family's defaults; the context from
    ``config.max_sequence_length`` (LLaDA) or ``config.max_position_embeddings`` (Dream)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    defaults = LLADA if family == "llada" else DREAM
    config = getattr(model, "config", None)
    mask_id = _special_id(config, tokenizer, "mask_token_id", defaults.mask)
    eos_id = _special_id(config, tokenizer, "eos_token_id", defaults.eos)
    stops = [eos_id]
    unk = getattr(tokenizer, "unk_token_id", None)
    vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else {}
    for token in END_OF_TURN_TOKENS:
        if token in vocab and vocab[token] not in (unk, eos_id):
            stops.append(vocab[token])
    context = getattr(config, "max_sequence_length" if family == "llada"
                      else "max_position_embeddings", None)
    return ChatModel(model, tokenizer, family, name, mask_id, eos_id, tuple(stops),
                     context if isinstance(context, int) else None)


def _special_id(config, tokenizer, key: str, default: int) -> int:
    for holder in (config, tokenizer):
        value = getattr(holder, key, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def load_chat_model(spec: Optional[str] = None, *, device: Union[str, torch.device, None] = None,
                    dtype: Optional[torch.dtype] = None) -> ChatModel:
    """The model named by ``spec``: an existing directory (a LLaDA or Dream checkpoint with its
    tokenizer files), else a name of ``genjo_fast.zoo``; ``None``: :data:`DEFAULT_MODEL`.

    Args:
        device: where the model runs (default: CUDA when available, else the CPU).
        dtype: parameter dtype of a checkpoint directory (default: bfloat16 on CUDA, float32
            on the CPU); zoo models keep their own.
    Raises:
        ChatError: ``spec`` is neither a checkpoint directory nor an available zoo model (the
            message says which and why).
    """
    spec = DEFAULT_MODEL if spec is None else str(spec)
    device = torch.device(device if device is not None else
                          "cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(path, device, dtype)
    if path.exists():
        raise ChatError(f"--model {spec}: not a directory (expected a checkpoint directory "
                        "with config.json, the weights and the tokenizer files)")
    try:
        from . import zoo
    except ImportError:
        hint = (f"the model {spec!r} comes from genjo_fast.zoo, which this genjo_fast lacks"
                if spec == DEFAULT_MODEL else f"no directory {spec}")
        raise ChatError(f"--model {spec}: {hint}; pass --model DIR, a LLaDA or Dream "
                        "checkpoint directory with its tokenizer") from None
    try:
        with _quiet_transformers():
            model, tokenizer = zoo.load(spec, device=device)
    except (KeyError, ValueError, FileNotFoundError) as error:
        raise ChatError(f"--model {spec}: no such directory, and not a zoo model ({error})"
                        ) from None
    except ImportError as error:
        raise ChatError(f"--model {spec}: loading it needs {error.name or error}: "
                        "pip install 'genjo_fast[app]'") from None
    family = "dream" if type(model).__name__.lower().startswith("dream") else "llada"
    return chat_model(model.eval(), tokenizer, family, spec)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' logging at errors only (not its warning, when a tokenizer is loaded
    from a checkpoint directory, that the config is no transformers model's), and no
    FutureWarning."""
    try:
        from transformers.utils import logging
    except ImportError:
        yield
        return
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():  # nor its FutureWarnings about config fields
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logging.set_verbosity(verbosity)


def _load_directory(path: Path, device: torch.device, dtype: torch.dtype) -> ChatModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ChatError(f"--model {path}: not a checkpoint directory (no config.json)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as error:
        raise ChatError(f"--model {path}: config.json is not a JSON object ({error})") from None
    families = {"llada": "llada", "dream": "dream"}
    family = families.get(str(model_type).lower())
    if family is None:
        raise ChatError(f"--model {path}: config.json's model_type is {model_type!r}; the chat "
                        "apps run LLaDA ('llada') and Dream ('Dream') checkpoints")
    from .models import load_dream, load_llada
    try:
        model = (load_llada if family == "llada" else load_dream)(path, dtype=dtype,
                                                                  device=device)
    except (ValueError, NotImplementedError, FileNotFoundError, OSError) as error:
        raise ChatError(f"--model {path}: cannot load the {family} checkpoint: {error}"
                        ) from None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ChatError("loading a checkpoint's tokenizer needs transformers: "
                        "pip install 'genjo_fast[app]'") from None
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise ChatError(f"--model {path}: cannot load its tokenizer ({error})") from None
    return chat_model(model, tokenizer, family, str(path))


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

@dataclass
class Settings:
    """The sampling options of a reply. ``None`` means the family's default.

    Both families: ``gen_length`` (answer tokens), ``steps``, ``temperature``, ``backend``,
    ``seed`` (a ``torch.Generator`` seed for sampled choices; ``None``: unseeded),
    ``block_length``, ``cache``, ``refresh_every``, ``threshold``, ``factor``.
    Both: ``stop_at_eos`` (end the call once every answer is settled: the same answer, fewer
    forwards; the chat's stop ids end an answer).
    LLaDA (:func:`genjo_fast.generate`): ``block_length`` defaults to 8 when it divides
    ``gen_length``, else ``gen_length``; ``cfg_scale``, ``remasking``, ``constraints``
    (``"pos:word, ..."``, each word's ids with a leading space placed from answer position
    ``pos`` on, a later word overwriting an earlier one where they overlap, as the reference
    app does) and ``sampler`` (``"generate"``: the reference ``generate.py``'s sampler;
    ``"app"``: the reference Gradio app's). Dream (:func:`genjo_fast.diffusion_generate`):
    ``block_length`` defaults to the whole answer (upstream's sampler); ``alg`` (default
    ``"entropy"``), ``alg_temp``, ``top_p``, ``top_k``.
    """
    gen_length: int = 32
    steps: int = 32
    temperature: float = 0.0
    backend: Optional[str] = None
    seed: Optional[int] = None
    block_length: Optional[int] = None
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    cache: Optional[str] = None
    refresh_every: Optional[int] = None
    threshold: Optional[float] = None
    factor: Optional[float] = None
    stop_at_eos: bool = False
    constraints: str = ""
    sampler: str = "generate"
    alg: Optional[str] = None
    alg_temp: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None

    def llada_block_length(self) -> int:
        """``block_length``, or its default: 8 when it divides ``gen_length``, else
        ``gen_length``."""
        if self.block_length is not None:
            return self.block_length
        return 8 if self.gen_length % 8 == 0 else self.gen_length

    def keywords(self, chat: ChatModel) -> Dict[str, object]:
        """The sampler's keywords for ``chat``'s family (special ids included).

        Raises:
            ChatError: an option of the other family is set, or bad constraints.
        """
        generator = None
        if self.seed is not None:
            generator = torch.Generator(chat.device).manual_seed(int(self.seed))
        common = dict(steps=self.steps, temperature=self.temperature, backend=self.backend,
                      generator=generator)
        if chat.family == "llada":
            self._refuse("LLaDA", ("alg", None), ("alg_temp", None), ("top_p", None),
                         ("top_k", None))
            out = dict(common, gen_length=self.gen_length,
                       block_length=self.llada_block_length(),
                       cfg_scale=self.cfg_scale, remasking=self.remasking, cache=self.cache,
                       refresh_every=self.refresh_every, threshold=self.threshold,
                       factor=self.factor, mask_id=chat.mask_id, eos_id=chat.eos_id)
            if len(chat.stop_ids) > 1:
                out["eot_id"] = chat.stop_ids[1]
            if self.stop_at_eos:
                out.update(stop_at_eos=True, stop_ids=chat.stop_ids)
            constraints = parse_constraints(self.constraints, chat.tokenizer)
            if constraints:
                out["constraints"] = constraints
            if self.sampler != "generate":
                out["sampler"] = self.sampler
            return out
        self._refuse("Dream", ("cfg_scale", 0.0), ("remasking", "low_confidence"),
                     ("constraints", ""), ("sampler", "generate"))
        out = dict(common, max_new_tokens=self.gen_length, alg=self.alg or "entropy",
                   mask_token_id=chat.mask_id)
        if self.stop_at_eos:
            out.update(stop_at_eos=True, stop_ids=chat.stop_ids)
        for name in ("alg_temp", "top_p", "top_k", "block_length", "cache", "refresh_every",
                     "threshold", "factor"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def _refuse(self, family: str, *defaults) -> None:
        for name, default in defaults:
            if getattr(self, name) != default:
                raise ChatError(f"{name} is not an option of {family} models "
                                f"(got {getattr(self, name)!r})")


def parse_constraints(text: str, tokenizer) -> Dict[int, int]:
    """``"pos:word, pos:word"`` -> ``{answer position: id}`` as the reference app reads its
    constraints field: the ids of ``" " + word`` from ``pos`` on (positions from 0), a later
    word overwriting an earlier one where they overlap. Empty text: ``{}``.

    Raises:
        ChatError: an entry without ``:``, a position that is not an integer >= 0, an empty
            word, or two constraints starting at one position.
    """
    constraints: Dict[int, int] = {}
    starts = set()
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        position, colon, word = part.partition(":")
        word = word.strip()
        if not colon or not word:
            raise ChatError(f"constraint {part!r}: write position:word, e.g. 0:Once")
        try:
            pos = int(position)
        except ValueError:
            pos = -1
        if pos < 0:
            raise ChatError(f"constraint {part!r}: the position must be an integer >= 0")
        if pos in starts:
            raise ChatError(f"constraint {part!r}: position {pos} is constrained twice")
        starts.add(pos)
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        constraints.update({pos + i: int(token) for i, token in enumerate(ids)})
    return constraints


# ----------------------------------------------------------------------------------------------
# Conversation
# ----------------------------------------------------------------------------------------------

@dataclass
class Reply:
    """A finished answer: ``text`` (up to the first stop id, special tokens skipped),
    ``ids`` (the generated ids), ``forwards`` (model forward passes), ``seconds`` (wall time of
    the sampler call), ``tokens_per_second`` (generated positions per second) and
    ``dropped_turns`` (earlier turns left out to fit the context)."""
    text: str
    ids: List[int]
    forwards: int
    seconds: float
    dropped_turns: int

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        """``"32 forwards, 32 tokens in 0.21 s (152.4 tokens/s)"``."""
        return (f"{self.forwards} forwards, {len(self.ids)} tokens in {self.seconds:.2f} s "
                f"({self.tokens_per_second:.1f} tokens/s)")


class Conversation:
    """The turns of one chat with ``chat`` (see the module docstring)."""

    def __init__(self, chat: ChatModel):
        self.chat = chat
        self.turns: List[List[int]] = []  # per turn: its ids (message, then answer w/o EOS)
        self.head: List[int] = []          # the template's leading BOS, if it has one

    def reset(self) -> None:
        self.turns.clear()

    def encode(self, message: str) -> List[int]:
        """The ids of ``message`` as a user turn (chat template with the generation prompt;
        the raw text when the tokenizer has no template). Sets :attr:`head` to the leading
        BOS the template emits, which is left out of the turn."""
        if not isinstance(message, str) or not message.strip():
            raise ChatError("empty message: type a question")
        tokenizer = self.chat.tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                 tokenize=False, add_generation_prompt=True)
        else:
            text = message
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = getattr(tokenizer, "bos_token_id", None)
        self.head = ids[:1] if bos is not None and ids[:1] == [bos] else []
        return ids[len(self.head):]

    def prompt(self, message: str, gen_length: int) -> Tuple[List[int], List[int], int]:
        """``(prompt ids, turn ids, dropped)``: the prompt for ``message`` after the kept
        turns, the message's own ids (:meth:`encode`), and how many of the oldest turns had to
        be dropped for prompt and answer to fit the model's context.

        Raises:
            ChatError: empty message, or one that does not fit even alone.
        """
        turn = self.encode(message)
        context = self.chat.context
        if any(t == self.chat.mask_id for t in turn):
            raise ChatError("the message holds the mask token; remove it")
        dropped = 0
        if context is not None:
            room = context - gen_length - len(self.head)
            if len(turn) > room:
                raise ChatError(f"message too long: it takes {len(turn)} tokens, and with an "
                                f"answer of {gen_length} tokens the model's context of "
                                f"{context} tokens leaves room for {max(room, 0)}")
            while sum(map(len, self.turns[dropped:])) + len(turn) > room:
                dropped += 1
        history = [t for past in self.turns[dropped:] for t in past]
        return self.head + history + turn, turn, dropped

    def reply(self, message: str, settings: Settings,
              timeout: Optional[float] = None) -> Iterator[Union[StreamUpdate, Reply]]:
        """Answers ``message``: yields a :class:`StreamUpdate` after every step of the
        sampler, then the :class:`Reply`; the turn is then part of the conversation.

        Raises (before anything is yielded, the conversation unchanged):
            ChatError: bad message or settings.
        Raises (while iterating): what the sampler raised (e.g. ``ValueError`` for an invalid
        combination of settings); the conversation is then unchanged.
        """
        chat = self.chat
        keywords = settings.keywords(chat)
        prompt_ids, turn, dropped = self.prompt(message, settings.gen_length)
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=chat.device)
        streamer = DiffusionIteratorStreamer(chat.tokenizer, chat.mask_id,
                                             stop_ids=chat.stop_ids, timeout=timeout)
        result = {}

        def work():
            try:
                start = time.perf_counter()
                result["out"], result["stats"] = run_sampler(chat, prompt, streamer, keywords)
                result["seconds"] = time.perf_counter() - start
            except BaseException as error:  # handed to the iterating thread
                streamer.fail(error)

        thread = threading.Thread(target=work, name="genjo_fast-chat", daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        answer = result["out"][0, prompt.shape[1]:].tolist()
        if dropped:
            del self.turns[:dropped]
        self.turns.append(turn + [t for t in answer if t not in (chat.eos_id, chat.mask_id)])
        yield Reply(answer_text(chat, answer), answer, result["stats"].nfe, result["seconds"],
                    dropped)


def run_sampler(chat: ChatModel, prompt: torch.Tensor, streamer, keywords: Dict[str, object]):
    """``(output ids (1, Lp + gen_length), GenerateStats)`` of the family's sampler."""
    if chat.family == "llada":
        from .generate import generate
        return generate(chat.model, prompt, streamer=streamer, return_stats=True, **keywords)
    from .dream import diffusion_generate
    return diffusion_generate(chat.model, prompt, streamer=streamer, return_stats=True,
                              **keywords)


def answer_text(chat: ChatModel, ids: List[int]) -> str:
    """The text of generated ``ids`` up to the first stop id, special tokens skipped,
    stripped."""
    stop = next((i for i, t in enumerate(ids) if t in chat.stop_ids), len(ids))
    return chat.tokenizer.decode(ids[:stop], skip_special_tokens=True).strip()
