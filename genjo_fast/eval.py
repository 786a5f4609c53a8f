"""lm-evaluation-harness model ``genjo_fast``: the reference LLaDA harness, faster and working.

Importing this module registers the model with lm-eval (needs the ``eval`` extra:
``pip install "genjo_fast[eval]"``). Run it like lm-eval's own CLI::

    python -m genjo_fast.eval --model_args pretrained=PATH,mc_num=128,cfg=0.5 \\
        --tasks arc_easy --batch_size 32
    accelerate launch -m genjo_fast.eval --model_args pretrained=PATH --tasks gsm8k ...

``--model genjo_fast`` is implied. Model args: the reference harness's (``mask_id``,
``max_length``, ``batch_size``, ``mc_num``, ``is_check_greedy``, ``cfg``, ``steps``,
``gen_length``, ``block_length``, ``remasking``) plus ``pretrained`` (alias ``model_path``),
``tokenizer``, ``dtype``, ``device``, ``backend``, ``forward_batch_size``, ``seed``,
``trust_remote_code`` and any other keyword :func:`genjo_fast.generate` accepts (checked at
run time; unsupported ones are dropped with a warning). As with the reference, lm-eval's
``--batch_size`` is the Monte Carlo batch (rows per round); ``forward_batch_size`` is the
number of rows per model call.

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
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import sys
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

from .generate import generate
from .likelihood import DEFAULT_FORWARD_ROWS, get_log_likelihoods, greedy_continuations
from .contract import MASK_ID
from .reference_likelihood import TorchMaskDraws, check_estimator_args
from .validation import REMASKING_MODES

logger = logging.getLogger("genjo_fast")

# generate() arguments that the harness sets itself from the model args.
_SET_BY_HARNESS = {"model", "prompt", "attention_mask", "steps", "gen_length", "block_length",
                   "temperature", "cfg_scale", "remasking", "mask_id", "backend", "progress",
                   "observer", "generator", "draws", "return_stats"}


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


def _as_int(name: str, value) -> int:
    try:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        return int(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


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


def load_model(pretrained, dtype: Optional[torch.dtype], device: torch.device,
               trust_remote_code: bool = True):
    """The mask predictor at ``pretrained``.

    A local directory whose ``config.json`` says ``model_type: llada`` loads into genjo_fast's
    :class:`~genjo_fast.models.LLaDAModel` (:func:`~genjo_fast.models.load_llada`); anything
    else goes through ``transformers.AutoModel.from_pretrained`` (``trust_remote_code``). An
    ``nn.Module`` is used as it is (moved to ``device``).
    """
    if isinstance(pretrained, torch.nn.Module):
        return pretrained.to(device).eval()
    config = Path(pretrained) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "llada":
        from .models import load_llada
        return load_llada(pretrained, dtype=dtype or torch.bfloat16, device=device)
    import transformers
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = transformers.AutoModel.from_pretrained(
        pretrained, trust_remote_code=trust_remote_code, **{dtype_key: dtype or "auto"})
    return model.to(device).eval()


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


@_register
class GenjoFastLM(LM):
    """lm-eval model for LLaDA-style masked-diffusion LMs, computed by genjo_fast.

    Args:
        pretrained: local checkpoint directory, hub id, or an ``nn.Module``
            (``model_path`` is accepted as an alias, the reference's name).
        tokenizer: tokenizer path or object; default ``pretrained``.
        mask_id: id of the mask token. max_length: longest ``context + continuation`` (longer
            contexts lose their left part).
        batch_size: Monte Carlo rows per round (lm-eval's ``--batch_size``).
        mc_num: Monte Carlo samples per request, a multiple of ``batch_size``.
        is_check_greedy: run the greedy check (else ``is_greedy`` is always False).
        cfg: classifier-free guidance scale, for likelihoods and generation.
        steps, gen_length, block_length, remasking: generation settings (temperature 0).
        device: default ``cuda`` when available, else ``cpu``; under ``accelerate launch``
            each process's own device.
        dtype: parameter dtype (``bfloat16`` as in the reference, ``float32``, ``auto``...).
        backend: genjo_fast's sampling backend (see :func:`genjo_fast.generate`).
        forward_batch_size: rows per model call (Monte Carlo rows, greedy checks, generated
            sequences); default ``max(batch_size, 32)`` for likelihoods and 32 otherwise.
        seed: base of the per-request Monte Carlo seeds.
        trust_remote_code: passed to transformers for non-LLaDA checkpoints and tokenizers.
        **generate_options: further :func:`genjo_fast.generate` keywords (e.g. a cache or
            threshold option when the installed genjo_fast has it).
    """

    def __init__(self, pretrained=None, tokenizer=None, mask_id: int = MASK_ID,
                 max_length: int = 4096, batch_size=32, mc_num: int = 128,
                 is_check_greedy=True, cfg: float = 0., steps: int = 1024,
                 gen_length: int = 1024, block_length: int = 1024,
                 remasking: str = "low_confidence", device: Optional[str] = None,
                 dtype="bfloat16", backend: Optional[str] = None,
                 forward_batch_size: Optional[int] = None, seed: int = 1234,
                 trust_remote_code=True, model_path=None, max_batch_size=None,
                 **generate_options):
        super().__init__()
        pretrained = pretrained if pretrained is not None else model_path
        if pretrained is None:
            raise ValueError("pretrained (or model_path) must name the model to evaluate")
        self.mask_id = _as_int("mask_id", mask_id)
        self.max_length = _as_int("max_length", max_length)
        self.batch_size = _as_int("batch_size", batch_size)
        self.mc_num = _as_int("mc_num", mc_num)
        self.is_check_greedy = _as_bool("is_check_greedy", is_check_greedy)
        self.cfg = float(cfg)
        check_estimator_args(self.mc_num, self.batch_size, self.cfg, self.mask_id)
        self.steps = _as_int("steps", steps)
        self.gen_length = _as_int("gen_length", gen_length)
        self.block_length = _as_int("block_length", block_length)
        if self.gen_length % self.block_length or self.steps % (self.gen_length
                                                                 // self.block_length):
            raise ValueError(f"gen_length ({self.gen_length}) must be a multiple of "
                             f"block_length ({self.block_length}) and steps ({self.steps}) a "
                             "multiple of the number of blocks")
        if self.max_length <= self.gen_length:
            raise ValueError(f"max_length ({self.max_length}) must exceed gen_length "
                             f"({self.gen_length})")
        if remasking not in REMASKING_MODES:
            raise ValueError(f"remasking must be one of {REMASKING_MODES}, got {remasking!r}")
        self.remasking = remasking
        self.backend = backend
        self.forward_batch_size = (None if forward_batch_size is None
                                   else _as_int("forward_batch_size", forward_batch_size))
        self.seed = _as_int("seed", seed)
        self.generate_options = self._supported_generate_options(generate_options)
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
        self.model = load_model(pretrained, _as_dtype(dtype), self._device, trust_remote_code)
        if tokenizer is None:
            if isinstance(pretrained, torch.nn.Module):
                raise ValueError("tokenizer must be given when pretrained is a model object")
            tokenizer = pretrained
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer),
                                                      trust_remote_code=trust_remote_code)
        self.tokenizer = tokenizer

    def _supported_generate_options(self, options: Dict[str, Any]) -> Dict[str, Any]:
        params = inspect.signature(generate).parameters
        supported = {k: v for k, v in options.items()
                     if k in params and k not in _SET_BY_HARNESS}
        dropped = sorted(set(options) - set(supported))
        if dropped:
            logger.warning("genjo_fast.eval: ignoring model args that genjo_fast.generate does "
                           "not accept: %s", ", ".join(dropped))
        return supported

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
        the first stop string of the request's ``until``."""
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
    ``genjo_fast`` model registered and ``--model genjo_fast`` implied."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("--model", "-M") or a.startswith("--model=") for a in args):
        at = 1 if args[:1] == ["run"] else 0
        if not args or args[0] not in ("ls", "validate", "-h", "--help"):
            args[at:at] = ["--model", "genjo_fast"]
    sys.argv = [sys.argv[0]] + args
    cli_evaluate()


__all__ = ["GenjoFastLM", "load_model", "main"]

if __name__ == "__main__":
    from genjo_fast.eval import main as _main  # the registered module, not this __main__ copy

    _main()
