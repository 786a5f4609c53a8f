"""The transformers pipeline task ``"text-diffusion"``: masked LMs as diffusion generators.

Importing this module registers the task in transformers' pipeline registry
(``PIPELINE_REGISTRY.register_pipeline``); ``import genjo_fast`` arranges that import for when
transformers' pipelines are first imported (:mod:`genjo_fast.registration`), so that::

    import genjo_fast
    from transformers import pipeline

    pipe = pipeline("text-diffusion", model=model, tokenizer=tokenizer)
    out = pipe("<|im_start|>user What is 2+2?<|im_end|>", num_steps=64, max_length=128)
    out["decoded_texts"][0]

works with ``ModernBertForMaskedLM``, ``BertForMaskedLM``, ``RobertaForMaskedLM`` (and any
``*ForMaskedLM``), and with a GPT-2 based DiffuGPT (``GPT2LMHeadModel`` with
``shift_logits=True`` or ``config.shift_logits = True``: full attention, the prediction for a
position read one position earlier). The calls, options and results are those of
JorgeVanco/diffusionGPT's ``TextDiffusionPipeline`` (the semantics: ``docs/semantics.md``,
"Masked LMs"), batched: a list of prompts of any lengths runs as one batch. The sampling itself
is :mod:`genjo_fast.mdlm`.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Union

import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .mdlm import (context_window, drain_steps, mdlm_generate_steps,
                   mdlm_semi_autoregressive_steps)
from .mdlm_contract import is_causal_lm

TASK = "text-diffusion"

#: Call options of ``pipe(...)`` / ``stream_generation``, by stage.
_PREPROCESS = ("max_length", "add_special_tokens")
_FORWARD = ("num_steps", "allow_edits", "use_confidence", "temperature", "top_p",
            "adaptive_length", "length_threshold", "generator", "forward_batch_size",
            "forward_memory_mib", "streamer", "return_history")
_POSTPROCESS = ("stop_token", "skip_special_tokens")
#: Upstream's default canvas length when the config has no ``seq_length``.
DEFAULT_MAX_LENGTH = 512


class TextDiffusionPipeline(Pipeline):
    """Diffusion generation with a masked LM (task ``"text-diffusion"``).

    Construction (``transformers.pipeline("text-diffusion", model=..., tokenizer=...)`` or
    directly): the tokenizer must have a mask token; the model must have an LM head. A causal
    LM class (``GPT2LMHeadModel``, ``*ForCausalLM``) runs as DiffuGPT only when asked:
    ``shift_logits=True`` (or ``model.config.shift_logits = True``); it then runs with full
    attention and reads the prediction for position ``i`` at ``i - 1``.

    Call options (``pipe(text or list of texts, **options)``, :meth:`stream_generation`):

    * ``num_steps`` (50), ``allow_edits`` (True), ``use_confidence`` (False): upstream's;
    * ``max_length``: the canvas (prompt + generated) length; default ``config.seq_length``,
      else 512, capped at the model's context window;
    * ``stop_token``: a token of the vocabulary; the generated text is cut before its first
      occurrence;
    * ``return_history`` (False): also return the canvas after every step;
    * ``temperature`` (1.0), ``top_p`` (None: DiffuLLaMA's nucleus filter when < 1),
      ``generator`` (a ``torch.Generator``), ``adaptive_length`` (False, approximate),
      ``length_threshold`` (0.5), ``forward_batch_size`` (canvas rows per model forward;
      default: as many as ``forward_memory_mib`` holds, 48 MiB by default on a CPU): see
      :func:`genjo_fast.mdlm_generate`;
    * ``streamer``: a transformers streamer (``TextStreamer``, ``TextIteratorStreamer``,
      ``TextDiffusionStreamer``: one prompt) or
      :class:`genjo_fast.streaming.DiffusionIteratorStreamer` (any batch), driven as
      :func:`genjo_fast.mdlm_generate` says: the prompt, then per step the confirmed tokens
      (those no later step can change: with ``allow_edits`` none before the end) and the
      draft, the answer ending before ``stop_token``; the prompts must form one batch;
    * ``add_special_tokens`` (True, as ``tokenizer.encode``), ``skip_special_tokens`` (False:
      upstream decodes every token);
    * ``batch_size``: prompts per batch (default: all at once).

    Unknown options are errors.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, model, tokenizer=None, *, shift_logits: Optional[bool] = None, **kwargs):
        super().__init__(model, tokenizer=tokenizer, **kwargs)
        self.shift = _check_model(self.model, shift_logits)
        _check_tokenizer(self.tokenizer, self.model)
        self.window = context_window(self.model)
        default = getattr(self.model.config, "seq_length", None) or DEFAULT_MAX_LENGTH
        self.default_max_length = min(default, self.window) if self.window else default

    # -- transformers' Pipeline stages ----------------------------------------------------------

    def _sanitize_parameters(self, **options):
        unknown = sorted(set(options) - set(_PREPROCESS + _FORWARD + _POSTPROCESS))
        if unknown:
            raise TypeError(f"{TASK}: unknown option(s) {', '.join(map(repr, unknown))}; the "
                            f"options are {', '.join(_PREPROCESS + _FORWARD + _POSTPROCESS)} "
                            f"(and shift_logits when the pipeline is built)")
        return tuple({k: options[k] for k in stage if k in options}
                     for stage in (_PREPROCESS, _FORWARD, _POSTPROCESS))

    def preprocess(self, inputs: Union[str, List[str]], max_length: Optional[int] = None,
                   add_special_tokens: bool = True) -> Dict[str, Any]:
        """Tokenizes the prompt(s): ``{"prompts": [1-D int64 tensors], "max_length": int}``."""
        texts = _as_texts(inputs)
        prompts = [torch.tensor(self.tokenizer.encode(text, add_special_tokens=add_special_tokens),
                                dtype=torch.long) for text in texts]
        return {"prompts": prompts,
                "max_length": max_length if max_length is not None else self.default_max_length}

    def _forward(self, model_inputs: Dict[str, Any], num_steps: int = 50,
                 allow_edits: bool = True, use_confidence: bool = False,
                 temperature: float = 1.0, top_p: Optional[float] = None,
                 adaptive_length: bool = False, length_threshold: float = 0.5,
                 generator: Optional[torch.Generator] = None,
                 forward_batch_size: Optional[int] = None,
                 forward_memory_mib: Optional[float] = None, streamer=None,
                 return_history: bool = False, stop_id: Optional[int] = None
                 ) -> Dict[str, Any]:
        steps = mdlm_generate_steps(
            self.model, model_inputs["prompts"], max_length=model_inputs["max_length"],
            num_steps=num_steps, allow_edits=allow_edits, use_confidence=use_confidence,
            **self._special_ids(), shift=self.shift, temperature=temperature, top_p=top_p,
            adaptive_length=adaptive_length, length_threshold=length_threshold,
            generator=generator, forward_batch_size=forward_batch_size,
            forward_memory_mib=forward_memory_mib, streamer=streamer, stop_id=stop_id)
        history = None
        if return_history:
            history = [_initial_canvas(model_inputs, self.tokenizer.mask_token_id)]
        final = drain_steps(steps, None if history is None else
                            lambda event: history.append(event.x.clone()))
        return {"final_ids": final, "prompt_lengths": [len(p) for p in model_inputs["prompts"]],
                "history": history}

    def postprocess(self, model_outputs: Dict[str, Any], stop_token: Optional[str] = None,
                    skip_special_tokens: bool = False) -> List[Dict[str, Any]]:
        """One result per prompt: ``{"decoded_texts": [text], "final_ids": (1, L) int64,
        "history": [(1, W) int64 per step] or None}`` (upstream's keys)."""
        stop_id = self._stop_id(stop_token)
        results = []
        for b, ids in enumerate(model_outputs["final_ids"]):
            ids = _cut(ids, model_outputs["prompt_lengths"][b], stop_id)
            history = model_outputs["history"]
            results.append({
                "decoded_texts": [self.tokenizer.decode(ids, skip_special_tokens=
                                                        skip_special_tokens)],
                "final_ids": ids[None],
                "history": None if history is None else [h[b:b + 1] for h in history]})
        return results

    # -- calls ----------------------------------------------------------------------------------

    def __call__(self, inputs: Union[str, List[str]], batch_size: Optional[int] = None,
                 **options):
        """Generates for a text (returns one result dict) or a list of texts (a list of result
        dicts, the prompts batched ``batch_size`` at a time, default all at once). See the
        class docstring for the options and :meth:`postprocess` for the result."""
        texts = _as_texts(inputs)
        preprocess, forward, postprocess = self._merged(options)
        # a bad stop token fails before the work; a streamer's answers end before it
        stop_id = self._stop_id(postprocess.get("stop_token"))
        batch_size = _batch_size(batch_size if batch_size is not None else self._batch_size,
                                 len(texts))
        if forward.get("streamer") is not None and batch_size < len(texts):
            raise ValueError(f"streamer= streams one batch: {len(texts)} prompts do not fit "
                             f"batch_size={batch_size}; pass batch_size=None (all at once) or "
                             f"call once per batch")
        results = []
        for i in range(0, len(texts), batch_size):
            model_inputs = self.preprocess(texts[i:i + batch_size], **preprocess)
            results += self.postprocess(self.forward(model_inputs, stop_id=stop_id, **forward),
                                        **postprocess)
        return results[0] if isinstance(inputs, str) else results

    def stream_generation(self, inputs: Union[str, List[str]], **options
                          ) -> Iterator[Union[str, List[str]]]:
        """Yields the decoded canvas before the first step and after every step (a text, or a
        list of texts for a list of prompts); with ``stop_token``, once more with the texts
        cut before it when that changes any. Options as for a call."""
        texts = _as_texts(inputs)
        preprocess, forward, postprocess = self._merged(options)
        if forward.pop("return_history", False):
            raise TypeError("stream_generation yields every step: return_history is not an "
                            "option here")
        skip = postprocess.get("skip_special_tokens", False)
        stop_id = self._stop_id(postprocess.get("stop_token"))
        model_inputs = self.preprocess(texts, **preprocess)
        lengths = [len(p) for p in model_inputs["prompts"]]
        steps = mdlm_generate_steps(
            self.model, [p.to(self.device) for p in model_inputs["prompts"]],
            max_length=model_inputs["max_length"], **self._special_ids(), shift=self.shift,
            stop_id=stop_id, **forward)

        def decode(canvas, cut=False):
            out = [self.tokenizer.decode(_cut(ids, n, stop_id) if cut else ids,
                                         skip_special_tokens=skip)
                   for ids, n in zip(canvas, lengths)]
            return out[0] if isinstance(inputs, str) else out

        canvas = _initial_canvas(model_inputs, self.tokenizer.mask_token_id)
        yield decode(canvas)
        for event in steps:
            canvas = event.x
            yield decode(canvas)
        if stop_id is not None and any(bool((ids[n:] == stop_id).any())
                                       for ids, n in zip(canvas, lengths)):
            yield decode(canvas, cut=True)

    def semi_autoregressive_generate(self, inputs: Union[str, List[str]], block_size: int = 64,
                                     max_length: int = 256, num_steps: int = 50,
                                     allow_edits: bool = True, use_confidence: bool = False,
                                     stop_token: Optional[str] = None, **options):
        """Generates past the context window, block by block (upstream's
        ``semi_autoregressive_generate``): a block of ``block_size`` masks after the last
        ``window - block_size`` tokens, ``num_steps`` steps per block, until the text reaches
        ``max_length`` tokens (prompt included) or a block holds ``stop_token`` (cut before
        it). Returns a result dict (a list of them for a list of texts) with the keys of
        :meth:`postprocess`; ``history`` holds every step's full sequence when
        ``return_history=True``. Other options: ``temperature``, ``top_p``, ``generator``,
        ``forward_batch_size``, ``forward_memory_mib``, ``add_special_tokens``,
        ``skip_special_tokens``, and ``streamer`` (as for a call: the answers grow block by
        block, and a finished block is confirmed)."""
        keep_history = options.get("return_history", False)
        history, final = [], None
        for state in self._semi_autoregressive(inputs, block_size, max_length, num_steps,
                                               allow_edits, use_confidence, stop_token,
                                               options, keep_final=True):
            if isinstance(state, _Final):
                final = state.sequences
            elif keep_history:
                history.append(state)
        skip = options.get("skip_special_tokens", False)
        results = [{"decoded_texts": [self.tokenizer.decode(ids, skip_special_tokens=skip)],
                    "final_ids": ids[None].cpu(),
                    "history": [h[b][None].cpu() for h in history] if keep_history else None}
                   for b, ids in enumerate(final)]
        return results[0] if isinstance(inputs, str) else results

    def stream_semi_autoregressive_generate(self, inputs: Union[str, List[str]],
                                            block_size: int = 64, max_length: int = 256,
                                            num_steps: int = 50, allow_edits: bool = True,
                                            use_confidence: bool = False,
                                            stop_token: Optional[str] = None,
                                            **options) -> Iterator[Union[str, List[str]]]:
        """Yields the decoded text(s) after every step of every block (and after a block is
        cut at ``stop_token``). Arguments as :meth:`semi_autoregressive_generate`."""
        if options.pop("return_history", False):
            raise TypeError("stream_semi_autoregressive_generate yields every step: "
                            "return_history is not an option here")
        skip = options.get("skip_special_tokens", False)
        for state in self._semi_autoregressive(inputs, block_size, max_length, num_steps,
                                               allow_edits, use_confidence, stop_token,
                                               options, keep_final=False):
            texts = [self.tokenizer.decode(ids, skip_special_tokens=skip) for ids in state]
            yield texts[0] if isinstance(inputs, str) else texts

    # -- helpers ---------------------------------------------------------------------------------

    def _merged(self, options: dict):
        """The call's options over the ones given at construction, by stage."""
        stages = self._sanitize_parameters(**options)
        defaults = (self._preprocess_params, self._forward_params, self._postprocess_params)
        return tuple({**default, **stage} for default, stage in zip(defaults, stages))

    def _special_ids(self) -> dict:
        tokenizer = self.tokenizer
        return dict(mask_id=tokenizer.mask_token_id, pad_id=tokenizer.pad_token_id,
                    eos_id=tokenizer.eos_token_id)

    def _stop_id(self, stop_token: Optional[str]) -> Optional[int]:
        """The id of ``stop_token`` (a single token of the vocabulary), or ``None``."""
        if stop_token is None:
            return None
        if not isinstance(stop_token, str):
            raise TypeError(f"stop_token must be a token string, got {type(stop_token).__name__}")
        token_id = self.tokenizer.convert_tokens_to_ids(stop_token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id
                                and stop_token != self.tokenizer.unk_token):
            raise ValueError(f"stop_token={stop_token!r} is not a token of the tokenizer's "
                             f"vocabulary (give one token, e.g. the EOS token "
                             f"{self.tokenizer.eos_token!r})")
        return token_id

    def _semi_autoregressive(self, inputs, block_size, max_length, num_steps, allow_edits,
                             use_confidence, stop_token, options, keep_final):
        """The states of every step (lists of 1-D tensors), then a :class:`_Final` when
        ``keep_final``."""
        allowed = {"temperature", "top_p", "generator", "add_special_tokens",
                   "skip_special_tokens", "forward_batch_size", "forward_memory_mib",
                   "streamer", "return_history"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"{TASK} semi-autoregressive: unknown option(s) "
                            f"{', '.join(map(repr, unknown))}; the options are block_size, "
                            f"max_length, num_steps, allow_edits, use_confidence, stop_token, "
                            f"{', '.join(sorted(allowed))}")
        model_inputs = self.preprocess(
            inputs, max_length=max_length,
            add_special_tokens=options.get("add_special_tokens", True))
        steps = mdlm_semi_autoregressive_steps(
            self.model, [p.to(self.device) for p in model_inputs["prompts"]],
            block_size=block_size, max_length=max_length, num_steps=num_steps,
            allow_edits=allow_edits, use_confidence=use_confidence, **self._special_ids(),
            shift=self.shift, temperature=options.get("temperature", 1.0),
            top_p=options.get("top_p"), stop_id=self._stop_id(stop_token), window=self.window,
            generator=options.get("generator"),
            forward_batch_size=options.get("forward_batch_size"),
            forward_memory_mib=options.get("forward_memory_mib"),
            streamer=options.get("streamer"))
        while True:
            try:
                yield next(steps)
            except StopIteration as done:
                if keep_final:
                    yield _Final(done.value)
                return


class _Final:
    """The final sequences of a semi-autoregressive run (told apart from step states)."""

    def __init__(self, sequences: List[torch.Tensor]):
        self.sequences = sequences


def _as_texts(inputs) -> List[str]:
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
        return list(inputs)
    raise TypeError(f"{TASK} takes a prompt string or a non-empty list of them, got "
                    f"{type(inputs).__name__}")


def _batch_size(value, total: int) -> int:
    if value is None:
        return max(total, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"batch_size must be a positive int, got {value!r}")
    return value


def _initial_canvas(model_inputs: Dict[str, Any], mask_id: int) -> torch.Tensor:
    """Each prompt followed by masks: int64 ``(B, max_length)``."""
    prompts = model_inputs["prompts"]
    canvas = torch.full((len(prompts), model_inputs["max_length"]), mask_id, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        canvas[b, :len(prompt)] = prompt.cpu()
    return canvas


def _cut(ids: torch.Tensor, prompt_length: int, stop_id: Optional[int]) -> torch.Tensor:
    """``ids`` cut before the first ``stop_id`` after the prompt."""
    if stop_id is None:
        return ids
    hits = (ids[prompt_length:] == stop_id).nonzero()
    return ids[:prompt_length + int(hits[0])] if len(hits) else ids


def _check_model(model, shift_logits: Optional[bool]) -> int:
    """The model must have an LM head; returns the shift (1 for a DiffuGPT-style model)."""
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no language-model head "
                         f"(get_output_embeddings() is None): load the checkpoint with "
                         f"AutoModelForMaskedLM (or AutoModelForCausalLM for DiffuGPT)")
    if shift_logits is None:
        shift_logits = getattr(model.config, "shift_logits", None)
    if shift_logits is not None and not isinstance(shift_logits, bool):
        raise TypeError(f"shift_logits must be True or False, got {shift_logits!r}")
    if is_causal_lm(model) and not shift_logits:
        raise ValueError(f"{type(model).__name__} is a causal LM: to run it as a diffusion "
                         f"model (DiffuGPT: full attention, the prediction for a position read "
                         f"one position earlier) pass shift_logits=True when building the "
                         f"pipeline, or set model.config.shift_logits = True")
    return int(bool(shift_logits))


def _check_tokenizer(tokenizer, model) -> None:
    if tokenizer is None:
        raise ValueError(f"{TASK} needs a tokenizer: pass tokenizer= to pipeline()")
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token, which marks the positions to "
                         "generate: set one, e.g. tokenizer.add_special_tokens({'mask_token': "
                         "'<mask>'}) (then model.resize_token_embeddings(len(tokenizer))), or "
                         "tokenizer.mask_token = an existing token the model was trained with "
                         "as its mask")
    vocab = model.get_output_embeddings().weight.shape[0]
    for name in ("mask_token_id", "pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name)
        if value is not None and value >= vocab:
            raise ValueError(f"tokenizer.{name}={value} is outside the model's vocabulary "
                             f"({vocab} logits): resize the model's embeddings to "
                             f"len(tokenizer)")


def register() -> None:
    """Registers the task ``"text-diffusion"`` in transformers' pipeline registry (models
    loaded by name through ``AutoModelForMaskedLM``, else ``AutoModelForCausalLM``)."""
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=TextDiffusionPipeline,
                                        pt_model=(AutoModelForMaskedLM, AutoModelForCausalLM),
                                        type="text")


register()
