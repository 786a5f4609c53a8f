"""genjo_fast's drop-in ``diffusion_generate`` for Dream-7B: upstream's sampler, exact, faster.

A thin front-end over the engine (:mod:`genjo_fast.engine`), like LLaDA's ``generate``: one
window over the whole answer (Dream has no blocks), a runner whose logits are shifted by one
position, Dream's ``sample_tokens`` as the sampling stage (the backend's ``dream_sample`` op)
and one of Dream's position rules. Semantics: ``docs/semantics.md``; plain statement:
:func:`genjo_fast.reference_dream.diffusion_generate`.

What makes it faster than upstream without changing a token at temperature 0:

* the LM head runs on the answer's rows only (never on the prompt), the sampling on the masked
  ones only;
* the sampling is one fused pass over the vocabulary per row on GPU, never a ``(B, L, V)``
  softmax in the model's dtype over the whole canvas;
* the per-step count (the batch mean quirk) and the selection are computed on the device for
  the whole batch at once; the step's one host sync counts the rows to sample;
* a :class:`~genjo_fast.models.DreamModel` gets a 2-D key mask, never upstream's
  ``(B, 1, L, L)`` boolean mask.

Opt-in and approximate: ``adaptive_length`` (:mod:`genjo_fast.answer_length`) cuts the canvas
at the answers' predicted end after the first step.
"""
from __future__ import annotations

from typing import Callable, Collection, Optional, Sequence

import torch

from .answer_length import AdaptiveLength, check_length_args
from .backends import resolve_backend
from .cache import CachedBlockLogits, check_cache_fits
from .contract import DREAM, model_device, model_vocab_size
from .draws import Draws
from .dream_settings import DreamGenerateOutput, resolve_settings
from .engine import StepEvent, Window, denoise, progress_bar
from .models import DreamModel, dream_from_reference, is_dream
from .runners import FullForward
from .stopping import Compaction, RowStopper, check_drop_rows, resolve_stop_ids, \
    stop_token_ids
from .streaming import StreamAdapter
from .transfer import AdaptiveRule
from .validation import (_check_int, check_approximate_args, check_generator,
                         check_model_not_meta, check_token_tensor, check_vocab_size)

#: The confidence each position rule ranks by (``dream_sample``'s ``confidence``).
CONFIDENCE = {"origin": "prob", "maskgit_plus": "prob", "topk_margin": "margin",
              "entropy": "neg_entropy"}


class DreamSampler:
    """Dream's sampling stage: upstream's ``sample_tokens`` on the rows of upstream's call (the
    masked positions; for ``origin`` the revealed ones), through the backend's
    ``dream_sample``, with injected token draws when ``draws`` is given.

    The rows are gathered into one ``(1, K, V)`` call, as upstream's ``logits[mask_index]``:
    decoded positions cost no sampling work, and the op's ``check_rows`` (upstream's
    ``Categorical`` check over exactly those rows, which decides whether the whole call falls
    back to the argmax) covers all of them. Counting the rows is one host sync per step. For
    ``origin`` the reveal is decided here too (one float32 uniform per position,
    ``u < 1 - s / t``) and returned as the confidence: 1 where revealed, ``-inf`` elsewhere,
    which :class:`FiniteRule` then transfers. Other positions get ``x0 = mask_id`` and
    confidence ``-inf``.

    Args:
        canvas: the call's ``x`` (read for the masked positions; never written).
        times: the time grid.
    """

    def __init__(self, ops, canvas: torch.Tensor, mask_id: int, times: "DreamTimes", *,
                 alg: str, temperature: float, top_p: Optional[float], top_k: Optional[int],
                 generator: Optional[torch.Generator], draws: Optional[Draws]):
        self.op = ops.dream_sample
        self.canvas = canvas
        self.mask_id = mask_id
        self.times = times
        self.origin = alg == "origin"
        self.options = dict(temperature=temperature, confidence=CONFIDENCE[alg], top_p=top_p,
                            top_k=top_k, generator=generator)
        self.generator = generator
        self.draws = draws

    def __call__(self, logits: torch.Tensor, un_logits: Optional[torch.Tensor], step: int,
                 start: int):
        batch, n, vocab = logits.shape
        device = logits.device
        rows = self.canvas[:, start:start + n] == self.mask_id  # the call's rows
        if self.origin:
            rows = rows & (self._uniform(step, start, n, device) < self.times.fraction(step))
        index = rows.view(-1).nonzero().squeeze(1)  # (K,): the one host sync of the step
        token_uniform = None
        if self.draws is not None:
            u = self.draws.token(step, start, start + n, batch, device).reshape(-1)[index]
            token_uniform = lambda a, b: u[None, a:b]  # noqa: E731
        sub_x0, sub_confidence = self.op(logits.reshape(batch * n, vocab)[index][None],
                                         token_uniform=token_uniform,
                                         check_rows=torch.ones_like(index, dtype=torch.bool)[None],
                                         **self.options)
        x0 = torch.full((batch * n,), self.mask_id, dtype=torch.long, device=device)
        x0[index] = sub_x0[0]
        if self.origin:
            confidence = torch.where(rows, 1.0, -torch.inf)
        else:
            confidence = torch.full((batch * n,), -torch.inf, dtype=logits.dtype, device=device)
            confidence[index] = sub_confidence[0]
            confidence = confidence.view(batch, n)
        return x0.view(batch, n), confidence

    def compact(self, compaction: Compaction) -> None:
        """Reads the canvas of the rows that go on (stopping at EOS)."""
        self.canvas = compaction.canvas

    def _uniform(self, step: int, start: int, n: int, device: torch.device) -> torch.Tensor:
        """``draws.remask`` (float32) for the window's positions, or fresh from the
        generator."""
        batch = self.canvas.shape[0]
        if self.draws is not None:
            return self.draws.remask(step, start, start + n, batch, device)
        return torch.rand((batch, n), device=device, generator=self.generator)


class DreamTimes:
    """Upstream's time grid ``linspace(1, eps, steps + 1)`` (float32, on the device) and the
    fraction ``1 - s / t`` of step ``i`` (1 at the last step), computed as upstream does."""

    def __init__(self, steps: int, eps: float, device: torch.device):
        self.steps = steps
        self.grid = torch.linspace(1, eps, steps + 1, device=device)

    def fraction(self, step: int) -> torch.Tensor:
        """float32 0-dim ``1 - t[i + 1] / t[i]`` for step ``i = step % steps`` of a window (each
        window of ``steps`` steps starts at a multiple of ``steps``), or 1 at its last step."""
        i = step % self.steps
        if i == self.steps - 1:
            return torch.ones((), device=self.grid.device)
        return 1 - self.grid[i + 1] / self.grid[i]


class MeanCountRule:
    """``maskgit_plus`` / ``topk_margin`` / ``entropy``: every row unmasks
    ``k = int(mean over the batch of the masked counts * (1 - s / t))`` positions (``int(mean)``
    at the last step), the ``k`` most confident ones (ties to the lowest position) or, with
    ``alg_temp > 0``, ``k`` positions drawn without replacement from
    ``softmax(confidence / alg_temp)``: the ``k`` largest ``p / -log(u)`` in float64, one
    uniform per position (``draws.position``), PyTorch's own algorithm for ``multinomial``.
    ``k`` is computed on the device in upstream's float32 arithmetic (no host sync). A row
    with fewer masked positions than ``k`` unmasks all of them (see ``docs/semantics.md``).

    Rows that stopped at EOS (:meth:`compact`) still count in the mean: the masked count each
    would have in the call without ``stop_at_eos`` is kept without running it (it unmasks
    ``min(k, count)`` per step; each window starts fully masked)."""

    def __init__(self, ops, times: DreamTimes, batch: int, *, alg_temp: Optional[float],
                 generator: Optional[torch.Generator], draws: Optional[Draws]):
        self.ops = ops
        self.times = times
        self.batch = batch  # rows running
        self.call_rows = batch  # the call's rows: the mean's denominator
        self.alg_temp = alg_temp or None
        self.generator = generator
        self.draws = draws
        self.start = self.stop = 0
        self.stopped: Optional[torch.Tensor] = None  # int64 (d,): counts of stopped rows

    def begin(self, window: Window) -> None:
        self.start, self.stop = window.start, window.stop  # the position draws' indices
        if self.stopped is not None:
            self.stopped.fill_(window.stop - window.start)

    def prepare(self, i: int) -> bool:
        return True

    def compact(self, compaction: Compaction) -> None:
        """Rows stopped at EOS: their masked counts in the window join :attr:`stopped`."""
        counts = compaction.dropped_masked[:, self.start:self.stop].sum(1)
        self.stopped = counts if self.stopped is None else torch.cat([self.stopped, counts])
        self.batch = compaction.keep.numel()

    def __call__(self, confidence: torch.Tensor, masked: torch.Tensor,
                 step: int) -> torch.Tensor:
        total = masked.sum()
        if self.stopped is not None:
            total = total + self.stopped.sum()
        mean = total / self.call_rows  # float32, as upstream's mask_index.sum() / B
        k = (mean * self.times.fraction(step)).long()  # int() truncates (>= 0)
        if self.stopped is not None:
            self.stopped -= torch.minimum(self.stopped, k)
        num_transfer = k.expand(self.batch)
        if self.alg_temp is not None:
            weights = torch.softmax(confidence / self.alg_temp, dim=-1)  # confidence's dtype
            confidence = weights.double() / -self._position_uniform(step, masked).log()
        return self.ops.select_transfer(confidence, num_transfer)

    def _position_uniform(self, step: int, masked: torch.Tensor) -> torch.Tensor:
        n, device = masked.shape[1], masked.device
        if self.draws is not None:
            return self.draws.position(step, self.start, self.start + n, self.batch, device)
        return torch.rand((self.batch, n), dtype=torch.float64, device=device,
                          generator=self.generator)


class FiniteRule:
    """``origin``: transfers every position with a finite confidence (the sampler marked the
    revealed ones)."""

    def prepare(self, i: int) -> bool:
        return True

    def __call__(self, confidence: torch.Tensor, masked: torch.Tensor,
                 step: int) -> torch.Tensor:
        return confidence > -torch.inf


class Hooks:
    """Upstream's two hooks and ``output_history``, as parts of the loop: with a hook,
    :meth:`run` wraps the runner (the hooks see the whole canvas's shifted logits); the tokens
    hook and the history follow each step (as an engine observer)."""

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
        """The runner's call when a hook is given (without one, the runner runs itself): the
        logits of every position (the hooks see the whole canvas's shifted logits), through
        the logits hook."""
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
def diffusion_generate(model, inputs: torch.Tensor, generation_config=None, *,
                       attention_mask: Optional[torch.Tensor] = None,
                       generation_tokens_hook_func: Optional[Callable] = None,
                       generation_logits_hook_func: Optional[Callable] = None,
                       generator: Optional[torch.Generator] = None,
                       draws: Optional[Draws] = None, backend: Optional[str] = None,
                       fast_model: bool = True,
                       observer: Optional[Callable[[StepEvent], None]] = None,
                       streamer=None, progress: bool = False, return_stats: bool = False,
                       block_length: Optional[int] = None, cache: Optional[str] = None,
                       refresh_every: Optional[int] = None, threshold: Optional[float] = None,
                       factor: Optional[float] = None, stop_at_eos: bool = False,
                       stop_ids: Optional[Sequence[int]] = None,
                       drop_rows: Optional[Callable[[], Collection[int]]] = None,
                       adaptive_length: bool = False,
                       length_threshold: float = 0.5, eos_id: int = DREAM.eos, **settings):
    """Masked-diffusion sampling for Dream-7B, a drop-in replacement for upstream's
    ``model.diffusion_generate(inputs, generation_config=None, **kwargs)``.

    At temperature 0 with ``alg`` ``maskgit_plus``, ``topk_margin`` or ``entropy`` and no
    ``alg_temp``, the tokens are identical to upstream's for the same model forward (batched,
    left-padded); otherwise they follow the same distribution, and are identical to the plain
    statement (:func:`genjo_fast.reference_dream.diffusion_generate`) when both are handed the
    same ``draws``. Upstream's quirks are kept (``docs/semantics.md``): the count unmasked per
    step is the batch MEAN of the masked counts; at temperature > 0 a step whose
    probabilities fail ``Categorical``'s check takes the argmax everywhere; ties go to the
    lowest position.

    Args:
        model: a Dream mask predictor: genjo_fast's :class:`~genjo_fast.models.DreamModel`, a
            transformers-loaded upstream Dream model (``config.model_type == "Dream"``; run
            through genjo_fast's implementation on the same weights unless
            ``fast_model=False``), or any model called as upstream calls it,
            ``model(x, attention_mask=..., position_ids=...)`` returning ``.logits``
            ``(B, L, V)``.
        inputs: integer ``(B, Lp)`` prompt ids, left-padded, ``Lp >= 1``; must not contain
            the mask id.
        generation_config: upstream's generation settings as an object or a mapping (e.g.
            the model's ``generation_config``), overridden by the keywords; ``None``: the
            model config's generation fields over upstream's defaults.
        attention_mask: ``(B, Lp)`` 0/1, or ``None``.
        generation_tokens_hook_func: ``f(step, x, logits) -> x``, called with
            ``(None, x, None)`` first, then after every step with the canvas's logits.
        generation_logits_hook_func: ``f(step, x, logits) -> logits`` on the shifted logits
            of the whole canvas ``(B, L, V)`` (with a hook, every position's logits are
            computed, as upstream does).
        generator: ``torch.Generator`` for reproducible sampling (ignored with ``draws``).
        draws: a :class:`~genjo_fast.draws.Draws` source (``token``, ``remask``, ``position``);
            hand the same :class:`~genjo_fast.draws.TensorDraws` to the statement for
            identical tokens.
        backend: the sampling ops' backend (``'auto'``, ``'cuda'``, ``'triton'``,
            ``'torch'``); default from ``GENJO_FAST_BACKEND``.
        fast_model: run a transformers-loaded Dream model through genjo_fast's
            implementation (the same function; in bf16 near-ties can differ).
        observer: called with a :class:`~genjo_fast.engine.StepEvent` after every step.
        streamer: a transformers-style streamer (``put``, ``end``, optionally
            ``put_draft``), driven as :mod:`genjo_fast.streaming` states: ``put(inputs)``
            (repeated per ``num_return_sequences``), after every step ``put(ids)`` when the
            decoded prefix of the answer grew and ``put_draft(rest of the answer, masks
            included)``, then ``end()``. With ``generation_tokens_hook_func`` (which may
            rewrite decoded tokens) nothing is confirmed before the end. One host copy of the
            answer per step; none without a streamer.
        progress: a tqdm progress bar over the steps.
        return_stats: also return a :class:`~genjo_fast.engine.GenerateStats`.
        block_length: opt-in, semi-autoregressive (Fast-dLLM's block-wise Dream): decode the
            answer in blocks of this many positions, left to right, each with
            ``steps // num_blocks`` of upstream's steps on its own time grid; the answer length
            must be a multiple of it. ``None`` (default): upstream's whole-canvas sampler.
            Statement: :func:`genjo_fast.reference_dream.diffusion_generate_blocks`.
        cache: APPROXIMATE, opt-in (needs ``block_length``): ``"prefix"`` or ``"dual"`` block
            KV cache with LLaDA's semantics (``docs/semantics.md``); needs a Dream model
            genjo_fast can run (DreamModel or a transformers Dream model with
            ``fast_model=True``).
        refresh_every: with a cache, a full forward also every this many steps of a block.
        threshold, factor: APPROXIMATE, opt-in parallel decoding (needs ``block_length``; not
            with ``alg="origin"`` or ``alg_temp``): as LLaDA's ``generate``; ``steps`` is then
            only validated.
        stop_at_eos: end each row once its answer is settled: once some generated position
            ``p`` holds one of ``stop_ids`` and every generated position before ``p`` is
            decoded, the row's tokens up to and including ``p`` can no longer change; its
            positions after ``p`` are filled with ``stop_ids[0]`` (EOS by default, Dream's
            padding) and later forwards run only the rows still generating (the call ends
            when none is left). The stopped rows keep counting in the batch-mean count. The
            tokens up to and including each row's first stop id are those of the same call
            without the option, with the exceptions ``docs/semantics.md`` ("Stopping at
            EOS") states (temperature > 0: upstream's whole-call fallback to the argmax).
            Not with the hooks (they see the whole batch's logits) nor ``adaptive_length``.
        stop_ids: the ids that end an answer, with ``stop_at_eos`` only; default Dream's
            ``<|endoftext|>`` and ``<|im_end|>`` (151643, 151645).
        drop_rows: with ``stop_at_eos`` only: called on the host after every step, returns
            the rows (indices in the batch) nobody wants any more; they leave the batch as
            finished rows do, keeping the canvas they had (mask ids included), and still
            count in the batch-mean schedule as finished rows do, so the other rows' tokens
            are not affected.
        adaptive_length: APPROXIMATE, opt-in variable length (the whole-canvas sampler only,
            no hooks): after the first step, each row's answer ends at the first position
            whose EOS probability (``softmax`` of that step's shifted logits, float32) is
            ``>= length_threshold`` and after which only masks and EOS stand; it and every
            later position become ``eos_id`` and are never computed again (the canvas shrinks
            to the longest answer, the shorter rows' tails masked out of the attention, their
            positions unchanged). With rows of different lengths the batch-mean count then
            differs between rows: each row unmasks at most what it has (genjo_fast's rule,
            ``docs/semantics.md``, "Variable length").
        length_threshold: the EOS probability that ends an answer, in ``[0, 1]``.
        eos_id: the id that ends an answer and fills its tail (Dream's ``<|endoftext|>``).
        **settings: upstream's: ``max_length`` (canvas length, prompt included) or
            ``max_new_tokens`` (takes precedence), ``steps`` (512), ``eps`` (1e-3, in (0, 1)),
            ``alg`` (``"origin"``, ``"maskgit_plus"``, ``"topk_margin"``, ``"entropy"``),
            ``alg_temp``, ``temperature`` (0), ``top_p`` (in (0, 1]), ``top_k`` (>= 1),
            ``mask_token_id`` (the model's, else 151666), ``num_return_sequences``,
            ``output_history``, ``return_dict_in_generate`` (alias ``return_dict``).
    Returns:
        int64 ``(B * num_return_sequences, max_length)`` (prompt included); with
        ``return_dict_in_generate``, a :class:`~genjo_fast.dream_settings.DreamGenerateOutput`
        (``.sequences``, ``.history``); with ``return_stats``, the pair
        ``(result, GenerateStats)``. With ``stop_at_eos``, the positions after each stopped
        row's first stop id hold ``stop_ids[0]``.
    """
    if "return_dict" in settings:  # the name some copies of upstream use
        settings["return_dict_in_generate"] = settings.pop("return_dict")
    check_token_tensor("inputs", inputs, 2, "(batch, prompt_length)")
    batch, prompt_len = inputs.shape
    if batch == 0 or prompt_len == 0:
        raise ValueError(f"inputs must hold at least one row and one token, got shape "
                         f"{tuple(inputs.shape)}")
    cfg = resolve_settings(model, prompt_len, generation_config, **settings)
    mask_id = cfg.mask_token_id
    _check_inputs(inputs, attention_mask, mask_id)
    check_model_not_meta(model)
    stop_ids = resolve_stop_ids(stop_at_eos, stop_ids, (DREAM.eos, DREAM.eot), mask_id)
    check_drop_rows(drop_rows, stop_at_eos)
    token_ids = stop_token_ids(stop_ids) if stop_ids is not None else {}
    check_vocab_size(model_vocab_size(model), mask_id, token_ids, "the model's vocab_size",
                     inputs, "inputs")
    if stop_ids is not None and (generation_tokens_hook_func is not None
                                 or generation_logits_hook_func is not None):
        raise ValueError("stop_at_eos=True drops finished rows from the batch, which the "
                         "generation hooks (they see the whole batch's canvas and logits) "
                         "cannot follow: pass no hook, or stop_at_eos=False")
    for name, hook in (("generation_tokens_hook_func", generation_tokens_hook_func),
                       ("generation_logits_hook_func", generation_logits_hook_func),
                       ("observer", observer)):
        if hook is not None and not callable(hook):
            raise TypeError(f"{name} must be callable, got {type(hook).__name__}")
    stream = None
    if streamer is not None:
        stream = StreamAdapter(streamer, mask_id, edits=generation_tokens_hook_func is not None)
    if cfg.num_return_sequences > 1:
        inputs = inputs.repeat_interleave(cfg.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(cfg.num_return_sequences, dim=0)
        batch = inputs.shape[0]

    blocks = _check_blocks(cfg, prompt_len, block_length, cache, refresh_every, threshold,
                           factor, generation_tokens_hook_func, generation_logits_hook_func)
    check_length_args(adaptive_length, length_threshold)
    if adaptive_length:
        if block_length is not None or generation_tokens_hook_func is not None \
                or generation_logits_hook_func is not None:
            raise ValueError("adaptive_length=True runs on the whole-canvas sampler: not with "
                             "block_length or the generation hooks")
        if stop_at_eos:
            raise ValueError("adaptive_length=True does not combine with stop_at_eos")
        _check_int("eos_id", eos_id, 0)
        check_vocab_size(model_vocab_size(model), mask_id, {"eos_id": eos_id},
                         "the model's vocab_size")
    if fast_model and is_dream(model) and not isinstance(model, DreamModel):
        model = dream_from_reference(model)
    if cache is not None and not isinstance(model, DreamModel):
        raise ValueError(f"cache={cache!r} needs a Dream model genjo_fast can run "
                         f"(genjo_fast.models.DreamModel, or a transformers Dream model with "
                         f"fast_model=True), got {type(model).__name__}")
    device = model_device(model, inputs.device)
    check_generator(generator, device)
    ops = resolve_backend(backend, device)

    x = torch.full((batch, cfg.max_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = inputs.to(device)
    mask_arg, model_kwargs = _model_call(model, attention_mask, cfg.max_length, device)
    stopper = None
    if stop_ids is not None:
        stopper = RowStopper(x, prompt_len, stop_ids, mask_id, drop_rows)
        draws = stopper.follow(draws)
    if cache is None:
        runner = FullForward(model, mask_arg, None, 0.0, mask_id, shift=1,
                             model_kwargs=model_kwargs, token_ids=token_ids)
    else:
        check_cache_fits(model, batch, cfg.max_length)
        runner = CachedBlockLogits(model, cache, x, None if mask_arg == "full" else mask_arg,
                                   None, 0.0, mask_id, shift=1,
                                   positions=model_kwargs["position_ids"])
    if adaptive_length:
        full_mask = attention_mask

        def short_runner(width: int, kept: Optional[torch.Tensor]) -> FullForward:
            mask = None
            if full_mask is not None:
                mask = full_mask.to(device=device, dtype=torch.long)
                mask = torch.cat([mask, mask.new_ones((batch, width - prompt_len))], dim=1)
            if kept is not None:
                mask = kept if mask is None else mask * kept
            short_arg, short_kwargs = _model_call(model, mask, width, device)
            return FullForward(model, short_arg, None, 0.0, mask_id, shift=1,
                               model_kwargs=short_kwargs)

        length = AdaptiveLength(x, prompt_len, runner, short_runner, threshold=length_threshold,
                                eos_id=eos_id, mask_id=mask_id)
        runner = length.run
    history = [] if cfg.output_history and cfg.return_dict_in_generate else None
    if stream is not None:
        stream.begin(inputs)
        observer = stream.observer(prompt_len, observer)
    hooks = Hooks(runner, generation_logits_hook_func, generation_tokens_hook_func, history,
                  observer)
    if hooks.tokens_hook is not None:
        out = hooks.tokens_hook(None, x, None)
        if out is not x:
            x.copy_(out)

    adaptive = threshold is not None or factor is not None
    steps_per_window = blocks[1] if adaptive else cfg.steps // len(blocks[0])
    times = DreamTimes(steps_per_window, cfg.eps, device)
    sampler = DreamSampler(ops, x, mask_id, times, alg=cfg.alg, temperature=cfg.temperature,
                           top_p=cfg.top_p, top_k=cfg.top_k, generator=generator, draws=draws)
    if adaptive:
        rule = AdaptiveRule(ops, threshold=threshold, factor=factor)
    elif cfg.alg == "origin":
        rule = FiniteRule()
    else:
        rule = MeanCountRule(ops, times, batch, alg_temp=cfg.alg_temp, generator=generator,
                             draws=draws)
    windows = [Window(b, start, start + blocks[1], steps_per_window, b * steps_per_window,
                      adaptive) for b, start in enumerate(blocks[0])]
    if adaptive_length:
        windows = length.windows(windows)
    bar = progress_bar(progress, None if adaptive else cfg.steps,
                       "genjo_fast.diffusion_generate")
    # Without hooks the runner itself runs (so that stopping at EOS can compact it).
    run = runner if hooks.logits_hook is None and hooks.tokens_hook is None else hooks.run
    stats = denoise(x, windows, run, sampler, rule, mask_id=mask_id,
                    refresh_every=refresh_every, cached=cache is not None,
                    observer=hooks.after_step, bar=bar, stopper=stopper)
    if bar is not None:
        bar.close()
    if stream is not None:
        stream.finish(x[:, prompt_len:])
    result = DreamGenerateOutput(x, history) if cfg.return_dict_in_generate else x
    return (result, stats) if return_stats else result


def _check_blocks(cfg, prompt_len: int, block_length: Optional[int], cache: Optional[str],
                  refresh_every: Optional[int], threshold: Optional[float],
                  factor: Optional[float], tokens_hook, logits_hook):
    """Validates the opt-in block-wise and approximate options; returns the windows' starts
    and their length (one window over the whole answer without ``block_length``)."""
    check_approximate_args(cache, refresh_every, threshold, factor)
    gen_length = cfg.max_length - prompt_len
    approximate = cache is not None or threshold is not None or factor is not None
    if block_length is None:
        if approximate:
            raise ValueError("cache, threshold and factor need block_length (Fast-dLLM's "
                             "block-wise Dream)")
        return [prompt_len], gen_length
    _check_int("block_length", block_length, 1)
    if gen_length % block_length != 0:
        raise ValueError(f"the answer length {gen_length} must be a multiple of block_length "
                         f"({block_length})")
    num_blocks = gen_length // block_length
    if threshold is None and factor is None and cfg.steps % num_blocks != 0:
        raise ValueError(f"steps ({cfg.steps}) must be a multiple of the number of blocks "
                         f"{num_blocks}")
    if (threshold is not None or factor is not None) and (
            cfg.alg == "origin" or cfg.alg_temp):
        raise ValueError("threshold and factor rank positions by a confidence: use alg "
                         "'maskgit_plus', 'topk_margin' or 'entropy', without alg_temp")
    if tokens_hook is not None or logits_hook is not None:
        raise ValueError("generation_tokens_hook_func and generation_logits_hook_func see the "
                         "whole canvas's logits: not with block_length")
    return list(range(prompt_len, cfg.max_length, block_length)), block_length


def _check_inputs(inputs: torch.Tensor, attention_mask, mask_id: int) -> None:
    """The attention mask's shape and values; no mask id in the prompt."""
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
