"""lm-evaluation-harness model ``genjo_fast``: the reference LLaDA harness, faster and working.

Importing this module registers the model with lm-eval (needs the ``eval`` extra:
``pip install "genjo_fast[eval]"``). Run it like lm-eval's own CLI::

    python -m genjo_fast.eval --model_args pretrained=PATH,mc_num=128,cfg=0.5 \\
        --tasks arc_easy --batch_size 32
    accelerate launch -m genjo_fast.eval --model_args pretrained=PATH --tasks gsm8k ...

``--model genjo_fast`` is implied; ``python -m genjo_fast.eval --help`` lists the model args
(:data:`MODEL_ARGS`, each with its default and meaning) before lm-eval's own help. They are
the reference harness's (``mask_id``, ``max_length``, ``batch_size``, ``mc_num``,
``is_check_greedy``, ``cfg``, ``steps``, ``gen_length``, ``block_length``, ``remasking``) plus
``pretrained`` (alias ``model_path``), ``tokenizer``, ``dtype``, ``device``, ``backend``,
``forward_batch_size``, ``seed``, ``trust_remote_code`` and the keywords of
:func:`genjo_fast.generate` that the harness does not set itself (:data:`GENERATE_OPTIONS`:
``cache``, ``threshold``, ``eos_id``, ...). Any other name is an error that lists the valid
ones. As with the reference, lm-eval's ``--batch_size`` is the Monte Carlo batch (rows per
round); ``forward_batch_size`` is the number of rows per model call.

Checks, in the order they run (cheap ones first, so a typo fails before the model loads):
model arg names and values (generation options included: ``cache=bogus`` fails here), the
tokenizer (a checkpoint directory without tokenizer files is an error naming ``tokenizer=``),
the model (a ``pretrained`` path that is not a directory is an error saying so), then the
special ids against the model's vocabulary. ``max_length > gen_length`` concerns generation
only and is checked when ``generate_until`` requests arrive, so likelihood-only tasks run
with any ``gen_length``.

Special ids: ``mask_id`` defaults to the checkpoint config's ``mask_token_id``, else the
tokenizer's mask token, else LLaDA's 126336; ``eos_id`` (used by ``logits_eos_inf`` and
``confidence_eos_eot_inf``) to the config's ``eos_token_id`` (the first, if a list), else the
tokenizer's EOS, else LLaDA's 126081. Explicit model args win.

Behaviour, request type by request type:

* ``loglikelihood``: :func:`genjo_fast.likelihood.get_log_likelihoods` over all requests at
  once (rows of different requests share model calls) and, when ``is_check_greedy``, the
  harness's one-token-per-step greedy check. Each request's Monte Carlo draws come from a
  generator seeded by ``seed`` and the request's token ids, so a result does not depend on
  the order, the batching, or how requests are sharded over processes.
* ``loglikelihood_rolling``: the text is cut into disjoint windows as lm-eval's HF model cuts
  it (``lm_eval.utils.get_rolling_token_windows`` with ``context_len=1``, windows of
  ``max_length - 1`` tokens, the first conditioned on the BOS token, else EOS, else nothing);
  each window is scored by the Monte Carlo estimator given its context, and the window
  estimates are summed (the chain rule over windows). A text shorter than ``max_length``
  is one window: the estimator over the whole text after the BOS/EOS prefix.
* ``generate_until``: :func:`genjo_fast.generate` at temperature 0 with the model args'
  ``steps``/``gen_length``/``block_length``/``remasking``/``cfg`` (as in the reference, the
  request's other generation kwargs are ignored), cut at the first stop string, special
  tokens removed. Requests are batched by equal prompt length only: LLaDA's positions are
  absolute, so left padding would change what the model sees; without padding each row
  gets the tokens it gets alone, as in the reference harness.
* Data parallel (``accelerate launch``): lm-eval shards the documents by ``rank`` and gathers
  the results through :meth:`all_gather`/:meth:`gather_object`, as for its HF model.

The semantics followed are stated in ``docs/semantics.md``.
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import logging
import os
import re
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

try:
    import lm_eval.models  # noqa: F401  (keeps lm-eval's lazy built-in models registered)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("genjo_fast.eval needs lm-evaluation-harness: "
                      "pip install 'genjo_fast[eval]' (lm-eval>=0.4, accelerate)") from error
from tqdm.auto import tqdm

from .contract import EOS_ID, EOT_ID, MASK_ID, model_vocab_size
from .generate import generate
from .likelihood import DEFAULT_FORWARD_ROWS, get_log_likelihoods, greedy_continuations
from .reference_likelihood import TorchMaskDraws, check_estimator_args
from .validation import REMASKING_MODES, check_approximate_args

logger = logging.getLogger("genjo_fast")

#: Meaning of each model arg of :class:`GenjoFastLM` (its defaults are the constructor's):
#: what ``--help`` prints and what an unknown name is matched against.
MODEL_ARGS = {
    "pretrained": "the model: a local checkpoint directory (config.json and weights; LLaDA "
                  "checkpoints load into genjo_fast's own model), a hub id, or (from Python) "
                  "an nn.Module",
    "model_path": "alias of pretrained (the reference harness's name)",
    "tokenizer": "tokenizer directory or hub id; None: pretrained's (required when the "
                 "checkpoint directory holds no tokenizer files)",
    "mask_id": "id of the mask token; None: the checkpoint config's mask_token_id, else the "
               "tokenizer's mask token, else LLaDA's 126336",
    "max_length": "longest context + continuation in tokens (longer contexts lose their "
                  "left part); must exceed gen_length when generating",
    "batch_size": "Monte Carlo rows per round (lm-eval's --batch_size)",
    "mc_num": "Monte Carlo samples per likelihood, a multiple of batch_size",
    "is_check_greedy": "run the greedy check of loglikelihood requests (else is_greedy is "
                       "always False)",
    "cfg": "classifier-free guidance scale, for likelihoods and generation (0: off)",
    "steps": "denoising steps per generation, a multiple of gen_length // block_length",
    "gen_length": "tokens generated per generate_until request",
    "block_length": "semi-autoregressive block length; divides gen_length",
    "remasking": f"generation's remasking rule: {' or '.join(REMASKING_MODES)}",
    "device": "torch device; None: cuda when available, else cpu (each process's own under "
              "accelerate launch)",
    "dtype": "parameter dtype: bfloat16 (the reference's), float16, float32 or auto",
    "backend": "genjo_fast's sampling backend (auto, cuda, triton, torch); None: "
               "GENJO_FAST_BACKEND, else auto",
    "forward_batch_size": "rows per model call; None: max(batch_size, 32) for likelihoods, "
                          "32 for generation",
    "seed": "base of the per-request Monte Carlo seeds",
    "trust_remote_code": "passed to transformers for non-LLaDA checkpoints and tokenizers",
    "max_batch_size": "passed by lm-eval's CLI; unused",
}

#: Keywords of :func:`genjo_fast.generate` that the harness sets itself (not model args).
_SET_BY_HARNESS = {"model", "prompt", "attention_mask", "steps", "gen_length", "block_length",
                   "temperature", "cfg_scale", "remasking", "mask_id", "backend", "progress",
                   "observer", "streamer", "generator", "draws", "return_stats",
                   "stop_ids",  # stop_ids: generate's default, (eos_id, eot_id)
                   "drop_rows",  # a server's callback: every lm-eval request is wanted
                   "constraints", "sampler",
                   "positions"}  # positions: per-row tensors, the harness's are the default

#: The other keywords of :func:`genjo_fast.generate`, model args too, with their meaning.
GENERATE_OPTIONS = {
    "logits_eos_inf": "forbid EOS (eos_id) in the generated tokens",
    "confidence_eos_eot_inf": "the reference's option giving EoT (and at temperature 0 EOS) "
                              "confidence 0",
    "eos_id": "id of EOS; None: the checkpoint config's eos_token_id, else the tokenizer's, "
              "else LLaDA's 126081",
    "eot_id": "id of <|eot_id|> (LLaDA's by default)",
    "fast_model": "run a transformers-loaded LLaDA model through genjo_fast's implementation "
                  "of the architecture",
    "cache": "APPROXIMATE block KV cache: prefix or dual (None: exact)",
    "refresh_every": "with a cache, a full forward every this many steps of a block",
    "threshold": "APPROXIMATE parallel decoding: unmask every position with confidence >= "
                 "threshold",
    "factor": "APPROXIMATE parallel decoding by the factor rule (exclusive with threshold)",
    "cuda_graph": "replay each block's cached step as a CUDA graph (CUDA, LLaDA, cache)",
    "stop_at_eos": "end each row once its answer is settled (an EOS/EoT with every position "
                   "before it decoded): the same answers, fewer forwards",
    "adaptive_length": "APPROXIMATE variable length: each answer ends where the first step "
                       "predicts EOS with probability >= length_threshold",
    "length_threshold": "the EOS probability that ends an answer with adaptive_length",
}

#: Files one of which a directory holding a transformers tokenizer has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")

# A hub id: "name" or "namespace/name" (letters, digits, '-', '_', '.'; no leading '.').
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _register(cls):
    # Under ``python -m genjo_fast.eval`` this file also runs as ``__main__``; only the module
    # proper registers, so the name is not claimed twice by two class objects.
    return cls if __name__ == "__main__" else register_model("genjo_fast")(cls)


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def _as_int(name: str, value, minimum: Optional[int] = None) -> int:
    try:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        number = int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def _as_float(name: str, value) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _as_dtype(value) -> Optional[torch.dtype]:
    if isinstance(value, torch.dtype) or value in (None, "auto"):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must name a torch dtype (bfloat16, float16, float32, auto), "
                         f"got {value!r}")
    return dtype


def _pick_device(device) -> torch.device:
    """``device``, or the default one. lm-eval's CLI passes ``cuda:0`` unless told
    otherwise, so a CUDA device on a machine without one falls back to the CPU (logged)."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("genjo_fast.eval: device %s requested but CUDA is unavailable; using "
                       "the CPU", device)
        return torch.device("cpu")
    return device


def _constructor_args() -> Dict[str, inspect.Parameter]:
    """The named model args of :class:`GenjoFastLM` (its constructor's parameters)."""
    params = inspect.signature(GenjoFastLM.__init__).parameters
    return {name: p for name, p in params.items()
            if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


def _generate_parameters() -> Dict[str, inspect.Parameter]:
    """The keywords of :func:`genjo_fast.generate` that are model args."""
    return {name: p for name, p in inspect.signature(generate).parameters.items()
            if name not in _SET_BY_HARNESS}


def check_generate_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The generation options among the model args, checked and converted.

    Args:
        options: the model args that are not named parameters of :class:`GenjoFastLM`.
    Returns:
        ``options`` with booleans and integers converted (lm-eval passes ``cuda_graph=1``
        or ``"True"`` as given).
    Raises:
        ValueError: a name that is neither a model arg nor a keyword of
            :func:`genjo_fast.generate` the harness leaves free (the message lists the valid
            names and the closest match); a bad value (``cache=bogus``, ``threshold=-1``,
            ``eos_id=x``...), as :func:`genjo_fast.generate` would reject it.
        TypeError: a value of the wrong type where generate says so (``threshold=abc``).
    """
    params = _generate_parameters()
    unknown = sorted(set(options) - set(params))
    if unknown:
        valid = list(_constructor_args()) + list(params)
        hints = [f"{name!r}" + "".join(f" (did you mean {m!r}?)" for m in
                                        difflib.get_close_matches(name, valid, n=1))
                 for name in unknown]
        raise ValueError(f"unknown genjo_fast model arg{'s' * (len(unknown) > 1)} "
                         f"{', '.join(hints)}; the model args are: {', '.join(valid)} "
                         "(see python -m genjo_fast.eval --help)")
    checked = {}
    for name, value in options.items():
        default = params[name].default
        if isinstance(default, bool):
            value = _as_bool(name, value)
        elif isinstance(default, int):
            if value is None:  # an id given as None: the default (eos_id: the checkpoint's)
                continue
            value = _as_int(name, value, 0)
        checked[name] = value
    approximate = {name: checked.get(name, params[name].default)
                   for name in ("cache", "refresh_every", "threshold", "factor")}
    check_approximate_args(**approximate)
    return checked


def model_args_help() -> str:
    """What ``python -m genjo_fast.eval --help`` prints before lm-eval's help: an example and
    every model arg with its default and meaning."""
    lines = [
        "genjo_fast: lm-evaluation-harness CLI with the model genjo_fast (--model genjo_fast "
        "is implied).",
        "",
        "example:",
        "  python -m genjo_fast.eval --model_args pretrained=PATH,mc_num=128,cfg=0.5 "
        "--tasks arc_easy --batch_size 32",
        "  python -m genjo_fast.eval --model_args pretrained=PATH,gen_length=256,steps=256,"
        "block_length=32,max_length=4096 --tasks gsm8k",
        "",
        "model args (--model_args name=value,name=value; unknown names are errors), with "
        "their defaults:",
    ]
    defaults = {name: p.default for name, p in {**_constructor_args(),
                                                 **_generate_parameters()}.items()}
    defaults["eos_id"] = None  # the harness resolves it from the checkpoint
    meanings = {**MODEL_ARGS, **GENERATE_OPTIONS}
    column = max(len(f"{name}={default}") for name, default in defaults.items()) + 2
    for name, default in defaults.items():
        lines += textwrap.wrap(meanings.get(name, "see genjo_fast.generate"), width=100,
                               initial_indent=f"  {f'{name}={default}':<{column}}",
                               subsequent_indent=" " * (column + 2))
    lines += ["", "lm-eval's --batch_size is the Monte Carlo batch; the args from "
              f"{next(iter(GENERATE_OPTIONS))} on are genjo_fast.generate's keywords.",
              "Other commands: python -m genjo_fast.eval ls tasks, ... validate --tasks T.",
              "", "lm-eval's help follows.", ""]
    return "\n".join(lines)


def _local_dir(name: str, value) -> Optional[Path]:
    """``value`` as an existing local directory, or ``None`` when it can only be a hub id.

    Raises:
        FileNotFoundError: ``value`` is a path (absolute, ``./``, ``~``, or not hub-id
            shaped) that does not exist.
        NotADirectoryError: it exists but is a file.
    """
    path = Path(str(value)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{name}={value}: not a directory (expected a checkpoint "
                                 "directory or a hub id)")
    if _HUB_ID.fullmatch(str(value)):
        return None
    raise FileNotFoundError(f"{name}={value}: the directory does not exist")


def load_tokenizer(tokenizer, pretrained, trust_remote_code: bool = True):
    """The tokenizer given by the model args: ``tokenizer`` (an object, a directory or a hub
    id), else ``pretrained``'s directory or hub id.

    Raises:
        FileNotFoundError: the directory does not exist, or holds none of
            :data:`TOKENIZER_FILES` (the message names the ``tokenizer=`` model arg).
        ValueError: ``pretrained`` is a model object and no ``tokenizer`` is given.
    """
    name = "tokenizer"
    if tokenizer is None:
        if isinstance(pretrained, torch.nn.Module):
            raise ValueError("tokenizer must be given when pretrained is a model object")
        name, tokenizer = "pretrained", pretrained
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    directory = _local_dir(name, tokenizer)
    if directory is not None and not any((directory / f).is_file() for f in TOKENIZER_FILES):
        where = ("the checkpoint directory" if name == "pretrained"
                 else "the tokenizer directory")
        raise FileNotFoundError(
            f"{where} {directory} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)})"
            "; name the tokenizer with the model arg tokenizer=DIRECTORY_OR_HUB_ID")
    from transformers import AutoTokenizer
    return _from_pretrained(name, tokenizer, directory, AutoTokenizer,
                            trust_remote_code=trust_remote_code)


def load_model(pretrained, dtype: Optional[torch.dtype], device: torch.device,
               trust_remote_code: bool = True):
    """The mask predictor at ``pretrained``.

    A local directory whose ``config.json`` says ``model_type: llada`` loads into genjo_fast's
    :class:`~genjo_fast.models.LLaDAModel` (:func:`~genjo_fast.models.load_llada`); any other
    directory, or a hub id, goes through ``transformers.AutoModel.from_pretrained``
    (``trust_remote_code``). An ``nn.Module`` is used as it is (moved to ``device``).

    Raises:
        FileNotFoundError: ``pretrained`` is a path that does not exist, or a directory
            without ``config.json``.
        NotADirectoryError: ``pretrained`` is a file.
        OSError: a hub id that transformers cannot load (e.g. offline and not cached).
    """
    if isinstance(pretrained, torch.nn.Module):
        return pretrained.to(device).eval()
    directory = _local_dir("pretrained", pretrained)
    if directory is not None:
        config = directory / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"pretrained={pretrained}: the directory has no "
                                    "config.json (a checkpoint directory holds config.json "
                                    "and the weights)")
        if json.loads(config.read_text()).get("model_type") == "llada":
            from .models import load_llada
            return load_llada(directory, dtype=dtype or torch.bfloat16, device=device)
    import transformers
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = _from_pretrained("pretrained", pretrained, directory, transformers.AutoModel,
                             trust_remote_code=trust_remote_code, **{dtype_key: dtype or "auto"})
    return model.to(device).eval()


def _from_pretrained(name: str, value, directory: Optional[Path], auto_class, **kwargs):
    """``auto_class.from_pretrained(value, **kwargs)``; when ``value`` is not a local
    ``directory``, a failure says that it was tried as a hub id."""
    try:
        return auto_class.from_pretrained(str(value), **kwargs)
    except OSError as error:
        if directory is not None:
            raise
        raise OSError(f"{name}={value} is not a local directory, and loading it as a hub id "
                      f"failed: {error}") from error


def _default_id(model, tokenizer, key: str) -> Tuple[Optional[int], str]:
    """The special id ``key`` (``mask_token_id``, ``eos_token_id``) of the checkpoint's
    config, else of the tokenizer, with where it came from; ``(None, "")`` if neither has
    it. A list (some configs list several EOS ids) gives its first element."""
    sources = (("the checkpoint's config", getattr(model, "config", None)),
               ("the tokenizer", tokenizer))
    for source, holder in sources:
        value = getattr(holder, key, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value, source
    return None, ""


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


@_register
class GenjoFastLM(LM):
    """lm-eval model for LLaDA-style masked-diffusion LMs, computed by genjo_fast.

    The model args (:data:`MODEL_ARGS` gives each one's meaning) are the constructor's
    parameters and the keywords of :func:`genjo_fast.generate` listed in
    :data:`GENERATE_OPTIONS`; ``python -m genjo_fast.eval --help`` prints them with their
    defaults. See the module docstring for the checks and the special-id defaults.

    Raises:
        ValueError: an unknown model arg (the message lists the valid ones), a bad value,
            ``mc_num`` not a multiple of ``batch_size``, ``steps``/``gen_length``/
            ``block_length`` that do not divide, a special id outside the model's vocabulary.
        FileNotFoundError, NotADirectoryError, OSError: see :func:`load_model` and
            :func:`load_tokenizer`.
    """

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
        """The model from ``--model_args`` (``arg_dict``) plus lm-eval's own options
        (``--batch_size``, ``--device``, ...). A setting given both ways takes the
        ``--model_args`` value: lm-eval always passes its ``--batch_size`` (1 unless given),
        which would otherwise collide with ``model_args``' ``batch_size``."""
        extra = {key: value for key, value in (additional_config or {}).items()
                 if value is not None and key not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """:meth:`create_from_arg_obj` of the parsed ``key=value,...`` string."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def __init__(self, pretrained=None, tokenizer=None, mask_id: Optional[int] = None,
                 max_length: int = 4096, batch_size=32, mc_num: int = 128,
                 is_check_greedy=True, cfg: float = 0., steps: int = 1024,
                 gen_length: int = 1024, block_length: int = 1024,
                 remasking: str = "low_confidence", device: Optional[str] = None,
                 dtype="bfloat16", backend: Optional[str] = None,
                 forward_batch_size: Optional[int] = None, seed: int = 1234,
                 trust_remote_code=True, model_path=None, max_batch_size=None,
                 **generate_options):
        super().__init__()
        # Everything that needs no model first: a typo fails before minutes of loading.
        self.generate_options = check_generate_options(generate_options)
        pretrained = pretrained if pretrained is not None else model_path
        if pretrained is None:
            raise ValueError("pretrained (or model_path) must name the model to evaluate")
        self.max_length = _as_int("max_length", max_length, 2)
        self.batch_size = _as_int("batch_size", batch_size)
        self.mc_num = _as_int("mc_num", mc_num)
        self.is_check_greedy = _as_bool("is_check_greedy", is_check_greedy)
        self.cfg = _as_float("cfg", cfg)
        explicit_mask_id = None if mask_id is None else _as_int("mask_id", mask_id, 0)
        # (a mask id from the checkpoint is checked against the vocabulary below)
        check_estimator_args(self.mc_num, self.batch_size, self.cfg, explicit_mask_id or 0)
        self.steps = _as_int("steps", steps, 1)
        self.gen_length = _as_int("gen_length", gen_length, 1)
        self.block_length = _as_int("block_length", block_length, 1)
        if self.gen_length % self.block_length or self.steps % (self.gen_length
                                                                 // self.block_length):
            raise ValueError(f"gen_length ({self.gen_length}) must be a multiple of "
                             f"block_length ({self.block_length}) and steps ({self.steps}) a "
                             "multiple of the number of blocks")
        if remasking not in REMASKING_MODES:
            raise ValueError(f"remasking must be one of {REMASKING_MODES}, got {remasking!r}")
        self.remasking = remasking
        self.backend = backend
        self.forward_batch_size = (None if forward_batch_size is None
                                   else _as_int("forward_batch_size", forward_batch_size, 1))
        self.seed = _as_int("seed", seed)
        dtype = _as_dtype(dtype)
        trust_remote_code = _as_bool("trust_remote_code", trust_remote_code)

        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched for data parallelism
            from accelerate import Accelerator, InitProcessGroupKwargs
            # Ranks wait for each other at the barriers; a long eval must not time them out.
            # Without CUDA, the processes run on the CPU (gloo): accelerate's own choice
            # would be a lone process per launch.
            self.accelerator = Accelerator(
                cpu=not torch.cuda.is_available(),
                kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
            self._device = self.accelerator.device
        else:
            self._device = _pick_device(device)
        if self.generate_options.get("cuda_graph") and self._device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device; the model runs on "
                             f"{self._device}")
        self.tokenizer = load_tokenizer(tokenizer, pretrained, trust_remote_code)
        self.model = load_model(pretrained, dtype, self._device, trust_remote_code)
        self._resolve_special_ids(explicit_mask_id)

    def _resolve_special_ids(self, explicit_mask_id: Optional[int]) -> None:
        """Sets ``mask_id`` and the ``eos_id`` option: the model arg, else the checkpoint's
        (see the module docstring), else LLaDA's; then checks the ids that will be used
        against the model's vocabulary."""
        options = self.generate_options
        ids, origins = {}, {}
        for name, key, llada_id, given in (
                ("mask_id", "mask_token_id", MASK_ID, explicit_mask_id),
                ("eos_id", "eos_token_id", EOS_ID, options.get("eos_id"))):
            ids[name], origins[name] = given, "the model args"
            if given is None:
                ids[name], origins[name] = _default_id(self.model, self.tokenizer, key)
            if ids[name] is None:
                ids[name], origins[name] = llada_id, (f"LLaDA's default (no {key} in the "
                                                      "checkpoint's config or the tokenizer)")
            logger.info("genjo_fast.eval: %s=%d from %s", name, ids[name], origins[name])
        self.mask_id = ids["mask_id"]
        options["eos_id"] = ids["eos_id"]
        # The ids generate uses with these options (as it checks them): mask_id always.
        if not (options.get("logits_eos_inf") or options.get("confidence_eos_eot_inf")):
            del ids["eos_id"]
        if options.get("confidence_eos_eot_inf"):
            ids["eot_id"] = options.get("eot_id", EOT_ID)
            origins["eot_id"] = "the model args" if "eot_id" in options else "LLaDA's default"
        vocab_size = model_vocab_size(self.model)
        for name, value in ids.items():
            if vocab_size is not None and value >= vocab_size:
                raise ValueError(f"{name}={value} (from {origins[name]}) is outside the model's "
                                 f"vocabulary (vocab_size {vocab_size}): set {name}= in the "
                                 "model args")

    # -- distributed hooks (lm-eval's evaluator calls them when world_size > 1) -------------

    def all_gather(self, tensor):
        return tensor if self.world_size <= 1 else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    # -- tokenization -------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "genjo_fast")).replace("/", "__")

    def chat_template(self, chat_template=False) -> Optional[str]:
        if not chat_template:
            return None
        return chat_template if isinstance(chat_template, str) else getattr(
            self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _encode(self, text: str, **kwargs) -> List[int]:
        return list(self.tokenizer(text, **kwargs)["input_ids"])

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """Token ids of ``context`` and ``continuation`` as the reference harness splits them:
        trailing spaces of the context move to the continuation, the whole text is encoded,
        and the continuation is what follows the context's tokens. Contexts that do not fit
        ``max_length`` with the continuation lose their left part."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        context_ids = self._encode(context)
        answer = whole[len(context_ids):]
        if len(answer) > self.max_length:
            raise ValueError(f"a continuation of {len(answer)} tokens exceeds max_length="
                             f"{self.max_length}")
        return context_ids[max(0, len(context_ids) + len(answer) - self.max_length):], answer

    def _draws(self, pair: Tuple[Sequence[int], Sequence[int]]) -> TorchMaskDraws:
        """Draws seeded by ``seed`` and the pair's tokens: independent of order and sharding."""
        digest = hashlib.sha256(json.dumps([self.seed, list(pair[0]), list(pair[1])]).encode())
        seed = int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)
        return TorchMaskDraws(torch.Generator().manual_seed(seed))

    def _score(self, pairs: List[Tuple[Tuple[int, ...], Tuple[int, ...]]], greedy: bool,
               bar) -> Dict[tuple, Tuple[float, bool]]:
        """``(log-likelihood, is_greedy)`` of each distinct pair (the continuation may not be
        empty)."""
        unique = list(dict.fromkeys(pairs))
        tensors = [(torch.tensor(c, dtype=torch.long), torch.tensor(a, dtype=torch.long))
                   for c, a in unique]
        logps = get_log_likelihoods(self.model, tensors, self.mc_num, self.batch_size,
                                    self.cfg, self.mask_id, draws=[self._draws(p) for p in unique],
                                    forward_batch_size=self.forward_batch_size, progress=bar)
        flags = [False] * len(unique)
        if greedy:
            flags = greedy_continuations(self.model, tensors, self.cfg, self.mask_id,
                                         forward_batch_size=self.forward_batch_size
                                         or DEFAULT_FORWARD_ROWS, progress=bar)
        return dict(zip(unique, zip(logps, flags)))

    def _bar(self, total: int, desc: str, disable: bool):
        return tqdm(total=total, desc=desc, disable=disable or self.rank != 0)

    # -- requests -------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per request. An empty continuation
        scores ``(0.0, True)``."""
        encoded = [tuple(map(tuple, self._encode_pair(*req.args))) for req in requests]
        scored = [p for p in encoded if p[1]]
        distinct = len(set(scored))
        bar = self._bar(distinct * (2 if self.is_check_greedy else 1), "loglikelihood",
                        disable_tqdm)
        results = self._score(scored, self.is_check_greedy, bar) if scored else {}
        bar.close()
        out = []
        for req, pair in zip(requests, encoded):
            logp, greedy = results.get(pair, (0.0, True))
            out.append((float(logp), bool(greedy)))
            self.cache_hook.add_partial("loglikelihood", req.args, out[-1])
        return out

    @property
    def prefix_token_id(self) -> Optional[int]:
        """The token the first rolling window is conditioned on: BOS, else EOS, else none."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else getattr(self.tokenizer, "eos_token_id", None)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Log-likelihood of each whole text: the sum of the Monte Carlo estimates of its
        disjoint windows (see the module docstring)."""
        prefix = self.prefix_token_id
        windows: List[List[Tuple[tuple, tuple]]] = []
        for req in requests:
            tokens = self._encode(req.args[0], add_special_tokens=False)
            per_text = []
            for context, answer in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, -1 if prefix is None else prefix, self.max_length - 1, 1)):
                if prefix is None and context[:1] == [-1]:
                    context = context[1:]
                per_text.append((tuple(context), tuple(answer)))
            windows.append(per_text)
        flat = [w for per_text in windows for w in per_text]
        bar = self._bar(len(set(flat)), "loglikelihood_rolling", disable_tqdm)
        results = self._score(flat, False, bar) if flat else {}
        bar.close()
        out = []
        for req, per_text in zip(requests, windows):
            out.append(float(sum(results[w][0] for w in per_text)))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy (temperature 0) masked-diffusion generation of ``gen_length`` tokens, cut at
        the first stop string of the request's ``until``.

        Raises:
            ValueError: ``max_length <= gen_length`` (no room for the prompt).
        """
        if self.max_length <= self.gen_length:
            raise ValueError(f"max_length ({self.max_length}) must exceed gen_length "
                             f"({self.gen_length}) for generate_until requests (prompts keep "
                             "their last max_length - gen_length tokens): raise max_length= "
                             "or lower gen_length= in the model args")
        prompts, stops = [], []
        for req in requests:
            context, gen_kwargs = req.args
            until = (gen_kwargs or {}).get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            ids = self._encode(context)
            prompts.append(ids[max(0, len(ids) - (self.max_length - self.gen_length)):])
        by_length: Dict[int, List[int]] = {}
        for i, ids in enumerate(prompts):
            by_length.setdefault(len(ids), []).append(i)
        rows = self.forward_batch_size or DEFAULT_FORWARD_ROWS
        out: List[Optional[str]] = [None] * len(requests)
        bar = self._bar(len(requests), "generate_until", disable_tqdm)
        for length in sorted(by_length, reverse=True):
            group = by_length[length]
            for start in range(0, len(group), rows):
                chunk = group[start:start + rows]
                prompt = torch.tensor([prompts[i] for i in chunk], dtype=torch.long,
                                      device=self.device).reshape(len(chunk), length)
                tokens = generate(self.model, prompt, None, self.steps, self.gen_length,
                                  self.block_length, 0., self.cfg, self.remasking,
                                  self.mask_id, backend=self.backend, **self.generate_options)
                for i, row in zip(chunk, tokens[:, length:].tolist()):
                    text = _cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=False),
                                        stops[i])
                    # As the reference: re-encode and decode to drop special tokens.
                    out[i] = self.tokenizer.decode(self._encode(text), skip_special_tokens=True)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m genjo_fast.eval [lm-eval CLI arguments]``: lm-eval's CLI with the
    ``genjo_fast`` model registered and ``--model genjo_fast`` implied. ``-h``/``--help``
    prints :func:`model_args_help` first, then lm-eval's help (of ``run`` unless another
    command is named)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args[:1] in (["ls"], ["validate"]) else "run"
    if command == "run" and not any(a in ("--model", "-M") or a.startswith("--model=")
                                    for a in args):
        at = 1 if args[:1] == ["run"] else 0
        args[at:at] = ["--model", "genjo_fast"]
    if command == "run" and any(a in ("-h", "--help") for a in args):
        print(model_args_help(), flush=True)
    sys.argv = [sys.argv[0]] + args
    cli_evaluate()


__all__ = ["GenjoFastLM", "MODEL_ARGS", "GENERATE_OPTIONS", "check_generate_options",
           "load_model", "load_tokenizer", "model_args_help", "main"]

if __name__ == "__main__":
    from genjo_fast.eval import main as _main  # the registered module, not this __main__ copy

    _main()
