"""genjo_fast's drop-in ``diffusion_generate`` for Dream-7B: upstream's sampler, exact, faster.

A thin front-end over the engine (:mod:`genjo_fast.engine`), like LLaDA's ``generate``: one
window over the whole answer (Dream has no blocks), a runner whose logits are shifted by one
position, Dream's ``sample_tokens`` as the sampling stage (the backend's ``dream_sample`` op)
and one of Dream's position rules. Semantics: ``docs/semantics.md``; plain statement:
:func:`genjo_fast.reference_dream.diffusion_generate`.

What makes it faster than upstream without changing a token at temperature 0:

* the LM head and the sampling run on the answer's rows only (never on the prompt);
* the sampling is one fused pass over the vocabulary per row on GPU, never a ``(B, L, V)``
  softmax in the model's dtype over the whole canvas;
* the per-step count (the batch mean quirk) and the selection are computed on the device for
  the whole batch at once: no host sync per step;
* a :class:`~genjo_fast.models.DreamModel` gets a 2-D key mask, never upstream's
  ``(B, 1, L, L)`` boolean mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .backends import resolve_backend
from .contract import DREAM, model_device, model_vocab_size
from .draws import Draws
from .engine import StepEvent, Window, denoise, progress_bar
from .models import DreamModel, dream_from_reference, is_dream
from .runners import FullForward
from .validation import (_check_float, _check_int, check_generator, check_model_not_meta,
                         check_token_tensor, check_vocab_size)

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
#: The confidence each position rule ranks by (``dream_sample``'s ``confidence``).
CONFIDENCE = {"origin": "prob", "maskgit_plus": "prob", "topk_margin": "margin",
              "entropy": "neg_entropy"}

#: Upstream's generation defaults (DreamGenerationConfig).
DEFAULTS = dict(max_length=20, max_new_tokens=None, steps=512, eps=1e-3, alg="origin",
                alg_temp=None, temperature=0.0, top_p=None, top_k=None, mask_token_id=None,
                output_history=False, return_dict_in_generate=False)


@dataclass
class DreamOutput:
    """What ``diffusion_generate`` returns with ``return_dict_in_generate=True``:
    ``sequences`` int64 ``(B, max_length)``; ``history``, the canvas after every step (a list
    of ``(B, max_length)`` tensors) when ``output_history=True``, else ``None``."""
    sequences: torch.Tensor
    history: Optional[List[torch.Tensor]] = None


class DreamSampler:
    """Dream's sampling stage: upstream's ``sample_tokens`` on the window rows (the backend's
    ``dream_sample``), with injected token draws when ``draws`` is given."""

    def __init__(self, ops, *, alg: str, temperature: float, top_p: Optional[float],
                 top_k: Optional[int], generator: Optional[torch.Generator],
                 draws: Optional[Draws]):
        self.op = ops.dream_sample
        self.options = dict(temperature=temperature, confidence=CONFIDENCE[alg], top_p=top_p,
                            top_k=top_k, generator=generator)
        self.draws = draws

    def __call__(self, logits: torch.Tensor, un_logits: Optional[torch.Tensor], step: int,
                 start: int):
        draws, batch, device = self.draws, logits.shape[0], logits.device
        token_uniform = None
        if draws is not None:
            def token_uniform(a, b):
                return draws.token(step, start + a, start + b, batch, device)
        return self.op(logits, token_uniform=token_uniform, **self.options)


class DreamTimes:
    """Upstream's time grid ``linspace(1, eps, steps + 1)`` (float32, on the device) and the
    fraction ``1 - s / t`` of step ``i`` (1 at the last step), computed as upstream does."""

    def __init__(self, steps: int, eps: float, device: torch.device):
        self.steps = steps
        self.grid = torch.linspace(1, eps, steps + 1, device=device)

    def fraction(self, i: int) -> torch.Tensor:
        """float32 0-dim ``1 - t[i + 1] / t[i]``, or 1 at the last step."""
        if i == self.steps - 1:
            return torch.ones((), device=self.grid.device)
        return 1 - self.grid[i + 1] / self.grid[i]


class MeanCountRule:
    """``maskgit_plus`` / ``topk_margin`` / ``entropy``: every row unmasks
    ``k = int(mean over the batch of the masked counts * (1 - s / t))`` positions (all the
    remaining ones, ``int(mean)``, at the last step), the ``k`` most confident ones (ties to
    the lowest position) or, with ``alg_temp > 0``, ``k`` positions drawn without replacement
    from ``softmax(confidence / alg_temp)`` (Gumbel-top-k on one uniform per position).
    ``k`` is computed on the device in upstream's float32 arithmetic: no host sync."""

    def __init__(self, ops, times: DreamTimes, batch: int, *, alg_temp: Optional[float],
                 generator: Optional[torch.Generator], draws: Optional[Draws], start: int):
        self.ops = ops
        self.times = times
        self.batch = batch
        self.alg_temp = alg_temp or None
        self.generator = generator
        self.draws = draws
        self.start = start

    def prepare(self, i: int) -> bool:
        return True

    def __call__(self, confidence: torch.Tensor, masked: torch.Tensor,
                 step: int) -> torch.Tensor:
        mean = masked.sum() / masked.shape[0]  # float32, as upstream's mask_index.sum() / B
        k = (mean * self.times.fraction(step)).long()  # int() truncates (>= 0)
        num_transfer = k.expand(self.batch)
        if self.alg_temp is not None:
            confidence = position_scores(confidence, self.alg_temp,
                                         self._uniform(step, confidence.shape[1],
                                                       confidence.device))
        return self.ops.select_transfer(confidence, num_transfer)

    def _uniform(self, step: int, n: int, device: torch.device) -> torch.Tensor:
        if self.draws is not None:
            return self.draws.position(step, self.start, self.start + n, self.batch, device)
        return torch.rand((self.batch, n), dtype=torch.float64, device=device,
                          generator=self.generator)


def position_scores(confidence: torch.Tensor, alg_temp: float,
                    uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel-top-k scores: the top ``k`` of ``log softmax(confidence / alg_temp) + Gumbel(u)``
    are a draw of ``k`` positions without replacement from ``softmax(confidence / alg_temp)``
    (upstream's ``multinomial``). The softmax is computed in the confidence's dtype, as
    upstream; ``-inf`` confidences get probability 0 and score ``-inf``.

    Args:
        confidence: ``(B, n)``; uniform: float64 ``(B, n)``.
    Returns:
        float64 ``(B, n)``.
    """
    probs = torch.softmax(confidence / alg_temp, dim=-1)
    return probs.double().log() - (-uniform.log()).log()


class RevealRule:
    """``origin``: each masked position is revealed with probability ``1 - s / t`` (all at the
    last step), deciding with one float32 uniform per position (``draws.remask``)."""

    def __init__(self, times: DreamTimes, batch: int, *, generator: Optional[torch.Generator],
                 draws: Optional[Draws], start: int):
        self.times = times
        self.batch = batch
        self.generator = generator
        self.draws = draws
        self.start = start

    def prepare(self, i: int) -> bool:
        return True

    def __call__(self, confidence: torch.Tensor, masked: torch.Tensor,
                 step: int) -> torch.Tensor:
        n = masked.shape[1]
        if self.draws is not None:
            u = self.draws.remask(step, self.start, self.start + n, self.batch, masked.device)
        else:
            u = torch.rand((self.batch, n), device=masked.device, generator=self.generator)
        return masked & (u < self.times.fraction(step))


class Hooks:
    """Upstream's two hooks and ``output_history``, as parts of the loop: the logits hook wraps
    the runner (it sees the whole canvas's shifted logits), the tokens hook and the history
    follow each step (as an engine observer)."""

    def __init__(self, runner: FullForward, logits_hook: Optional[Callable],
                 tokens_hook: Optional[Callable], history: Optional[list],
                 observer: Optional[Callable[[StepEvent], None]]):
        self.runner = runner
        self.logits_hook = logits_hook
        self.tokens_hook = tokens_hook
        self.history = history
        self.observer = observer
        self.logits = None  # the last step's whole-canvas logits, for the tokens hook
        self.step = 0

    def run(self, x: torch.Tensor, start: int, stop: int, full: bool = True):
        """The runner's call; with a hook, the logits of every position (the hooks see the
        whole canvas's shifted logits), through the logits hook."""
        if self.logits_hook is None and self.tokens_hook is None:
            return self.runner(x, start, stop, full)
        logits, _ = self.runner(x, 1, x.shape[1], full)  # predictions for positions 1 .. L-1
        logits = torch.cat([logits[:, :1], logits], dim=1)  # position 0: the same first row
        if self.logits_hook is not None:
            logits = self.logits_hook(self.step, x, logits)
        self.logits = logits
        return logits[:, start:stop], None

    def after_step(self, event: StepEvent) -> None:
        if self.tokens_hook is not None:
            out = self.tokens_hook(event.step, event.x, self.logits)
            if out is not event.x:
                event.x.copy_(out)
        if self.history is not None:
            self.history.append(event.x.clone())
        if self.observer is not None:
            self.observer(event)
        self.step += 1


@torch.no_grad()
def diffusion_generate(model, inputs: torch.Tensor, generation_config=None, **kwargs):
    """Masked-diffusion sampling for Dream-7B, a drop-in replacement for upstream's
    ``model.diffusion_generate(inputs, generation_config=None, **kwargs)``.

    At temperature 0 with ``alg`` ``maskgit_plus``, ``topk_margin`` or ``entropy`` and no
    ``alg_temp``, the tokens are identical to upstream's for the same model forward (batched,
    left-padded); otherwise they follow the same distribution, and are identical to the plain
    statement (:func:`genjo_fast.reference_dream.diffusion_generate`) when both are handed the
    same ``draws``. Upstream's quirks are kept (``docs/semantics.md``): the count unmasked per
    step is the batch MEAN of the masked counts; ties go to the lowest position.

    Args:
        model: a Dream mask predictor: genjo_fast's :class:`~genjo_fast.models.DreamModel`, a
            transformers-loaded upstream Dream model (``config.model_type == "Dream"``; run
            through genjo_fast's implementation on the same weights unless
            ``fast_model=False``), or any model called as upstream calls it,
            ``model(x, attention_mask, position_ids)`` returning ``.logits`` ``(B, L, V)``.
        inputs: integer ``(B, Lp)`` prompt ids, left-padded, ``Lp >= 1``; must not contain
            the mask id.
        generation_config: an object with upstream's generation attributes (e.g. the
            model's ``generation_config``), overridden by ``kwargs``; ``None``: upstream's
            defaults.
        **kwargs: upstream's keywords: ``max_length`` (canvas length, prompt included; default
            20 + Lp capped at the model's ``max_position_embeddings``) or ``max_new_tokens``
            (takes precedence), ``steps`` (512), ``eps`` (1e-3, in (0, 1)), ``alg``
            (``"origin"``, ``"maskgit_plus"``, ``"topk_margin"``, ``"entropy"``), ``alg_temp``
            (``None``), ``temperature`` (0), ``top_p`` (``None`` or in (0, 1]), ``top_k``
            (``None`` or >= 1), ``mask_token_id`` (default: the config's, else 151666),
            ``attention_mask`` ``(B, Lp)`` 0/1, ``output_history``,
            ``return_dict_in_generate`` (alias ``return_dict``),
            ``generation_tokens_hook_func(step, x, logits) -> x`` and
            ``generation_logits_hook_func(step, x, logits) -> logits``; and genjo_fast's:
            ``generator``, ``draws``, ``backend``, ``fast_model`` (True), ``observer``,
            ``progress``, ``return_stats``.
    Returns:
        int64 ``(B, max_length)`` (prompt included); with ``return_dict_in_generate``, a
        :class:`DreamOutput` (``.sequences``, ``.history``); with ``return_stats``, the pair
        ``(result, GenerateStats)``.
    """
    options = _options(model, generation_config, kwargs)
    attention_mask = options.pop("attention_mask")
    check_token_tensor("inputs", inputs, 2, "(batch, prompt_length)")
    check_model_not_meta(model)
    batch, prompt_len = inputs.shape
    if batch == 0 or prompt_len == 0:
        raise ValueError(f"inputs must hold at least one row and one token, got shape "
                         f"{tuple(inputs.shape)}")
    max_length = _max_length(model, options, prompt_len)
    mask_id = options["mask_token_id"]
    _check_mask(inputs, attention_mask, mask_id)
    check_vocab_size(model_vocab_size(model), mask_id, {}, "the model's vocab_size", inputs,
                     "inputs")

    if options["fast_model"] and is_dream(model) and not isinstance(model, DreamModel):
        model = dream_from_reference(model)
    device = model_device(model, inputs.device)
    generator, draws = options["generator"], options["draws"]
    check_generator(generator, device)
    ops = resolve_backend(options["backend"], device)

    x = torch.full((batch, max_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = inputs.to(device)
    mask_arg, model_kwargs = _model_call(model, attention_mask, max_length, device)
    runner = FullForward(model, mask_arg, None, 0.0, mask_id, shift=1, model_kwargs=model_kwargs)
    history = [] if options["output_history"] and options["return_dict_in_generate"] else None
    hooks = Hooks(runner, options["generation_logits_hook_func"],
                  options["generation_tokens_hook_func"], history, options["observer"])
    if hooks.tokens_hook is not None:
        out = hooks.tokens_hook(None, x, None)
        if out is not x:
            x.copy_(out)

    steps, alg = options["steps"], options["alg"]
    times = DreamTimes(steps, options["eps"], device)
    sampler = DreamSampler(ops, alg=alg, temperature=options["temperature"],
                           top_p=options["top_p"], top_k=options["top_k"], generator=generator,
                           draws=draws)
    if alg == "origin":
        rule = RevealRule(times, batch, generator=generator, draws=draws, start=prompt_len)
    else:
        rule = MeanCountRule(ops, times, batch, alg_temp=options["alg_temp"],
                             generator=generator, draws=draws, start=prompt_len)
    window = Window(0, prompt_len, max_length, steps, 0)
    bar = progress_bar(options["progress"], steps, "genjo_fast.diffusion_generate")
    stats = denoise(x, [window], hooks.run, sampler, rule, mask_id=mask_id,
                    observer=hooks.after_step, bar=bar)
    if bar is not None:
        bar.close()
    result = DreamOutput(x, history) if options["return_dict_in_generate"] else x
    return (result, stats) if options["return_stats"] else result


_GENJO_OPTIONS = dict(generator=None, draws=None, backend=None, fast_model=True, observer=None,
                      progress=False, return_stats=False, attention_mask=None,
                      generation_tokens_hook_func=None, generation_logits_hook_func=None)


def _options(model, generation_config, kwargs: dict) -> dict:
    """Upstream's option resolution: kwargs > ``generation_config`` > defaults; unknown
    keywords are an error naming them."""
    kwargs = dict(kwargs)
    if "return_dict" in kwargs:  # upstream's config attribute name
        kwargs["return_dict_in_generate"] = kwargs.pop("return_dict")
    unknown = sorted(set(kwargs) - set(DEFAULTS) - set(_GENJO_OPTIONS))
    if unknown:
        raise TypeError(f"diffusion_generate got unknown keyword(s) {unknown}; expected some of "
                        f"{sorted(set(DEFAULTS) | set(_GENJO_OPTIONS))}")
    options = {**_GENJO_OPTIONS, **DEFAULTS}
    options["explicit_max_length"] = "max_length" in kwargs
    if generation_config is not None:
        for name in DEFAULTS:
            value = getattr(generation_config, name, None)
            if name == "return_dict_in_generate" and value is None:
                value = getattr(generation_config, "return_dict", None)
            if value is not None:
                options[name] = value
        options["explicit_max_length"] |= getattr(generation_config, "max_length", 20) != 20
    options.update(kwargs)
    if options["mask_token_id"] is None:
        configured = getattr(getattr(model, "config", None), "mask_token_id", None)
        options["mask_token_id"] = configured if isinstance(configured, int) else DREAM.mask
    _check_options(options)
    return options


def _check_options(o: dict) -> None:
    """Each option's type and range, with an error naming it."""
    if o["alg"] not in ALGS:
        raise ValueError(f"alg must be one of {ALGS}, got {o['alg']!r}")
    _check_int("steps", o["steps"], 1)
    if o["max_new_tokens"] is not None:
        _check_int("max_new_tokens", o["max_new_tokens"], 1)
    _check_int("max_length", o["max_length"], 1)
    _check_int("mask_token_id", o["mask_token_id"], 0)
    _check_float("eps", o["eps"])
    if not 0 < o["eps"] < 1:
        raise ValueError(f"eps must be in (0, 1), got {o['eps']}")
    _check_float("temperature", o["temperature"])
    if o["top_p"] is not None:
        _check_float("top_p", o["top_p"])
        if not 0 < o["top_p"] <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {o['top_p']}")
    if o["top_k"] is not None:
        _check_int("top_k", o["top_k"], 1)
    if o["alg_temp"] is not None:
        _check_float("alg_temp", o["alg_temp"])
    for name in ("generation_tokens_hook_func", "generation_logits_hook_func", "observer"):
        if o[name] is not None and not callable(o[name]):
            raise TypeError(f"{name} must be callable, got {type(o[name]).__name__}")


def _max_length(model, options: dict, prompt_len: int) -> int:
    """The canvas length as upstream resolves it: ``max_new_tokens`` + Lp when given, else an
    explicit ``max_length``, else the default 20 + Lp capped at ``max_position_embeddings``."""
    if options["max_new_tokens"] is not None:
        max_length = options["max_new_tokens"] + prompt_len
    elif options["explicit_max_length"]:
        max_length = options["max_length"]
    else:
        max_length = options["max_length"] + prompt_len
        cap = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(cap, int):
            max_length = min(max_length, cap)
    if max_length <= prompt_len:
        raise ValueError(f"max_length ({max_length}) must exceed the prompt length "
                         f"({prompt_len}): there is nothing to generate (set max_new_tokens)")
    return max_length


def _check_mask(inputs: torch.Tensor, attention_mask, mask_id: int) -> None:
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != inputs.shape:
            raise ValueError(f"attention_mask must be a tensor of the inputs' shape "
                             f"{tuple(inputs.shape)}, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
    if bool((inputs == mask_id).any()):
        raise ValueError(f"inputs contain mask_token_id={mask_id}: the mask id marks positions "
                         f"to generate; pad with another id (e.g. EOS)")


def _model_call(model, attention_mask: Optional[torch.Tensor], length: int,
                device: torch.device):
    """``(attention_mask, model_kwargs)`` of every model call: what upstream passes (a
    ``(B, 1, L, L)`` boolean mask, key AND query, and position ids ``cumsum(mask) - 1`` with
    padded positions set to 1, when the prompt is padded; ``"full"`` and no position ids
    otherwise). genjo_fast's DreamModel gets the 2-D ``(B, L)`` mask instead of the 4-D one
    (the same attention, without an ``L x L`` tensor)."""
    if attention_mask is None or bool((attention_mask != 0).all()):
        return "full", {"position_ids": None}
    mask = attention_mask.to(device=device, dtype=torch.long)
    mask = torch.cat([mask, mask.new_ones((mask.shape[0], length - mask.shape[1]))], dim=1)
    position_ids = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
    if isinstance(model, DreamModel):
        return mask, {"position_ids": position_ids}
    real = mask.bool()
    return real[:, None, None, :] & real[:, None, :, None], {"position_ids": position_ids}
