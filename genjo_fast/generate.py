"""genjo_fast's drop-in ``generate`` for LLaDA: the reference sampler, exact, without its waste.

A thin front-end over the engine (:mod:`genjo_fast.engine`): it validates, then configures
the four stages for LLaDA (blocks as windows, the model runner, the Gumbel-argmax sampler and
the transfer rule) and runs :func:`genjo_fast.engine.denoise`. The semantics it honours are
stated in ``docs/semantics.md``.

What makes it faster than :func:`genjo_fast.reference.generate` without changing a token:

* Only the current block is sampled and scored. Everything after it has confidence ``-inf``
  in the reference and everything before it is already decoded, so the reference's topk over
  the whole row can only pick masked positions of the block.
* Sampling touches block rows only, in bounded chunks: no ``(B, L, V)`` float64 tensor. The
  ops come from a backend (:mod:`genjo_fast.backends`), chosen once per call: fused
  Triton/CUDA kernels on GPU, plain torch elsewhere, all giving the reference's tokens at
  temperature 0.
* The transfer is selected for the whole batch with one stable sort (no loop over rows, no
  host-device sync inside the step loop); the schedule is computed once per block on the host.
* Models whose ``forward`` takes ``logits_slice`` (a ``slice`` over positions) compute the LM
  head on the block rows only; any model returning ``.logits`` still works.
* Steps that transfer no token (``steps_per_block > block_length``) are skipped: they cannot
  change ``x``.

Besides ``generate.py``'s sampler it offers the reference Gradio app's (``sampler="app"``,
stated in :mod:`genjo_fast.reference_app`), positional ``constraints``
(:mod:`genjo_fast.constraints`) and the approximate ``adaptive_length``
(:mod:`genjo_fast.answer_length`).
"""
from __future__ import annotations

from typing import Callable, Collection, Iterator, Optional, Sequence

import torch

from .answer_length import AdaptiveLength, check_length_args
from .backends import resolve_backend
from .cache import CachedBlockLogits, check_cache_fits
from .constraints import place_constraints, resolve_constraints
from .contract import EOS_ID, EOT_ID, MASK_ID, init_sequence, model_device, model_vocab_size
from .cuda_graph import graph_steps
from .draws import Draws
from .engine import GenerateStats, StepEvent, Window, denoise, progress_bar
from .models import LLaDAModel, from_reference, is_llada
from .runners import FullForward
from .stopping import RowStopper, check_drop_rows, resolve_stop_ids, stop_token_ids
from .streaming import StreamAdapter
from .sampling import float64_confidence
from .transfer import AdaptiveRule, AppSchedule, FixedSchedule, app_blocks, transfer_schedule
from .validation import (check_approximate_args, check_cuda_graph_args, check_generate_args,
                         check_generator, check_model_not_meta, check_positions,
                         check_variant_args, check_vocab_size)

__all__ = ["generate", "GenerateStats", "StepEvent", "transfer_schedule", "SAMPLERS"]

#: ``sampler=``: which of the reference's two samplers ``generate`` reproduces.
SAMPLERS = ("generate", "app")


class GumbelSampler:
    """LLaDA's sampling stage: the backend's ``gumbel_argmax_confidence`` with the call's
    options; with injected ``draws``, the draws of the sampled positions.

    ``__call__(logits, un_logits, step, start)`` -> ``(x0, confidence)``, each ``(B, n)``.
    ``float64``: the reference app's ``low_confidence`` confidence, the softmax in float64
    (:func:`~genjo_fast.sampling.float64_confidence`) instead of the logits' dtype.
    """

    def __init__(self, ops, *, temperature: float, remasking: str, cfg_scale: float,
                 logits_eos_inf: bool, confidence_eos_eot_inf: bool, eos_id: int, eot_id: int,
                 generator: Optional[torch.Generator], draws: Optional[Draws],
                 float64: bool = False):
        self.op = ops.gumbel_argmax_confidence
        self.options = dict(temperature=temperature, remasking=remasking, cfg_scale=cfg_scale,
                            logits_eos_inf=logits_eos_inf,
                            confidence_eos_eot_inf=confidence_eos_eot_inf, eos_id=eos_id,
                            eot_id=eot_id, generator=generator)
        self.draws = draws
        self.float64 = float64 and remasking == "low_confidence"

    def __call__(self, logits: torch.Tensor, un_logits: Optional[torch.Tensor], step: int,
                 start: int):
        x0, confidence = self.op(logits, un_logits=un_logits, **self.options,
                                 **self._injected(step, start, logits.shape[0],
                                                  logits.shape[-1], logits.device))
        if self.float64:
            confidence = float64_confidence(logits, x0, un_logits=un_logits,
                                            cfg_scale=self.options["cfg_scale"])
        return x0, confidence

    def _injected(self, step: int, start: int, batch: int, vocab: int,
                  device: torch.device) -> dict:
        """The op's draw callbacks for positions ``start + a : start + b``; none without
        ``draws`` (the op then draws from ``generator``)."""
        draws = self.draws
        if draws is None:
            return {}
        return dict(
            gumbel_uniform=lambda a, b: draws.gumbel(step, start + a, start + b, batch, vocab,
                                                     device),
            remask_uniform=lambda a, b: draws.remask(step, start + a, start + b, batch, device))


def llada_windows(x: torch.Tensor, prompt_len: int, num_blocks: int, block_length: int,
                  steps_per_block: int, mask_id: int, *, reach_back: bool,
                  until_decoded: bool) -> Iterator[Window]:
    """LLaDA's blocks as engine windows, generated as the call goes (each reads ``x`` as the
    previous block left it).

    ``reach_back`` (exact mode): a block's window starts at the first position an earlier
    block left masked, which happens only when the model's choice there was the mask id
    itself: the reference's row-wide topk still competes such positions. One host sync per
    block (not per step). The last block ends with ``x`` (the reference app's is shorter when
    ``block_length`` does not divide ``gen_length``).
    """
    for block in range(num_blocks):
        block_start = prompt_len + block * block_length
        start = block_start
        if reach_back and block > 0:
            left = (x[:, prompt_len:block_start] == mask_id).any(0)
            if bool(left.any()):
                start = prompt_len + int(left.int().argmax())
        yield Window(block, start, min(block_start + block_length, x.shape[1]), steps_per_block,
                     block * steps_per_block, until_decoded)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             steps: int = 128, gen_length: int = 128, block_length: int = 128,
             temperature: float = 0., cfg_scale: float = 0., remasking: str = 'low_confidence',
             mask_id: int = MASK_ID, logits_eos_inf: bool = False,
             confidence_eos_eot_inf: bool = False, *,
             eos_id: int = EOS_ID, eot_id: int = EOT_ID,
             generator: Optional[torch.Generator] = None, draws: Optional[Draws] = None,
             backend: Optional[str] = None, fast_model: bool = True,
             cache: Optional[str] = None, refresh_every: Optional[int] = None,
             threshold: Optional[float] = None, factor: Optional[float] = None,
             cuda_graph: bool = False, stop_at_eos: bool = False,
             stop_ids: Optional[Sequence[int]] = None,
             drop_rows: Optional[Callable[[], Collection[int]]] = None,
             constraints: Optional[dict] = None, sampler: str = "generate", adaptive_length: bool = False,
             length_threshold: float = 0.5, positions: Optional[torch.Tensor] = None,
             observer: Optional[Callable[[StepEvent], None]] = None, streamer=None,
             progress: bool = False, return_stats: bool = False):
    """Masked-diffusion sampling, a drop-in replacement for the reference ``generate``.

    Same positional signature, defaults and result as the reference (``docs/semantics.md``).
    At temperature 0 with ``low_confidence`` remasking the tokens are identical to the
    reference's for the same model forward; with temperature > 0 or ``random`` remasking they
    follow the same distribution, and are identical when both are handed the same ``draws``.
    (A transformers-loaded LLaDA model runs through genjo_fast's own implementation of the same
    function unless ``fast_model=False``: in bf16 its rounding differs, see ``fast_model``.)

    Tie rule: when several masked positions have the same confidence and not all of them can
    be transferred at a step, the lowest positions are transferred first (what the reference
    does on CUDA, where ``torch.topk`` breaks ties that way).

    Args:
        model: a mask predictor called as ``model(x, attention_mask=...)`` that returns an
            object with ``.logits`` (B, L, V) (or the tensor itself). If its ``forward`` takes
            ``logits_slice`` (a ``slice`` of positions), it is asked for the block rows only and
            must return ``(B, slice length, V)``.
        prompt: integer ``(B, Lp)`` token ids, left-padded; must not contain ``mask_id``.
        attention_mask: ``(B, Lp)`` of 0/1 (0 on padding) or ``None``.
        steps: total denoising steps, a multiple of ``gen_length // block_length``.
        gen_length: number of tokens to generate, a multiple of ``block_length``.
        block_length: length of the semi-autoregressive blocks.
        temperature: Gumbel-max sampling temperature; 0 is greedy.
        cfg_scale: classifier-free guidance scale (0 disables it).
        remasking: ``'low_confidence'`` (unmask the most probable tokens first) or ``'random'``.
        mask_id: id of the mask token.
        logits_eos_inf: forbid EOS (``eos_id``) in the samples.
        confidence_eos_eot_inf: the reference's option that gives EoT (and at temperature 0
            also EOS) probability 0 in the confidence.
        eos_id, eot_id: ids of ``<|endoftext|>`` and ``<|eot_id|>`` (LLaDA's by default).
        generator: ``torch.Generator`` for reproducible sampling (temperature > 0 or random
            remasking); ignored when ``draws`` is given.
        draws: a :class:`~genjo_fast.draws.Draws` source of the uniform draws (e.g. the same
            :class:`~genjo_fast.draws.TensorDraws` handed to the reference).
        backend: ``'auto'``, ``'cuda'``, ``'triton'`` or ``'torch'`` (see
            :mod:`genjo_fast.backends`); default from ``GENJO_FAST_BACKEND``, else ``'auto'``.
        fast_model: when ``model`` is a reference LLaDA model loaded through transformers
            (``config.model_type == "llada"``), run genjo_fast's own implementation on the
            same parameter tensors (no copy). ``False`` keeps the model's own forward (bitwise
            parity with the reference at bf16, at the reference's speed).
        cache: APPROXIMATE, opt-in. ``"prefix"`` or ``"dual"`` block KV cache (Fast-dLLM's
            semantics, see :mod:`genjo_fast.cache`); needs a LLaDA model. ``None``: exact.
        refresh_every: with a cache, also run a full forward (refreshing the cache) every
            this many steps of a block; ``1`` recomputes every step (exact again).
        threshold: APPROXIMATE, opt-in parallel decoding: each step transfers, per row, the
            most confident masked position plus every other one with confidence
            ``>= threshold``, until the block is decoded. A number in ``[0, 1]`` (a probability:
            above 1 nothing but the top position could pass). ``steps`` is then only validated:
            each block runs until it is decoded, at most ``block_length`` steps. Rows that
            finish a block early stop changing.
        factor: APPROXIMATE, opt-in: with the confidences sorted decreasingly, transfer the
            largest prefix of ``n`` positions whose ``n``-th confidence is
            ``>= 1 - factor / (n + 1)``. ``factor > 0`` (at ``factor <= 0`` no second position
            could pass). Exclusive with ``threshold``; ``steps`` is only validated, as there.
        cuda_graph: capture the cached steps of each block in a CUDA graph and replay it
            (static shapes within a block make it possible; removes the launch overhead).
            Needs CUDA tensors, a LLaDA model and no injected ``draws``.
        stop_at_eos: end each row once its answer is settled: once some generated position
            ``p`` holds one of ``stop_ids`` and every generated position before ``p`` is
            decoded, the row's tokens up to and including ``p`` can no longer change; its
            positions after ``p`` are filled with ``stop_ids[0]`` (EOS by default, LLaDA's
            padding) and later forwards run only the rows still generating (the call ends
            when none is left). The tokens up to and including each row's first stop id are
            those of the same call without the option (``docs/semantics.md``, "Stopping at
            EOS"; with fresh random draws, in distribution). Not with ``cuda_graph``,
            ``sampler="app"`` nor ``adaptive_length``.
        stop_ids: the ids that end an answer, with ``stop_at_eos`` only; default
            ``(eos_id, eot_id)``.
        drop_rows: with ``stop_at_eos`` only: called on the host after every step that runs
            the model, returns the rows (indices in the batch) nobody wants any more (a
            server's cancelled requests); they leave the batch as finished rows do and keep
            the canvas they had (mask ids included). Rows already gone may be named again.
            The other rows' tokens are not affected.
        constraints: ``{answer position: token id or list of ids}``: tokens fixed in the
            answer (the reference app's "``pos:word``" constraints, as ids). A list of ids
            occupies ``position, position + 1, ...`` (a word's tokens, as the app places
            them). Positions count from the first generated token and must lie in
            ``[0, gen_length)`` without overlapping; no id may be ``mask_id``. The tokens are
            placed before the first step and kept at every step; they are not masks, so each
            block's transfer schedule shares out only its other positions, and with CFG they
            are masked in the unconditional copy with the prompt (``docs/semantics.md``).
        sampler: ``"generate"`` (default): the reference ``generate.py``'s sampler, exactly.
            ``"app"``: the reference Gradio app's sampler, exactly (statement:
            :mod:`genjo_fast.reference_app`): any ``gen_length``/``block_length``/``steps``
            (the last block shorter, ``max(1, steps // num_blocks)`` steps per block), the
            confidence's softmax in float64, the choice within the block, every masked
            position of a block revealed at its last step. Not with the EOS options nor the
            approximate modes.
        adaptive_length: APPROXIMATE, opt-in variable length: after the first step of the
            first block, each row's answer ends at the first position whose EOS probability
            (``softmax`` of the step's logits, float32) is ``>= length_threshold`` and after
            which nothing but masks and EOS stands; that position and all later ones become
            ``eos_id`` and are never computed again: the canvas shrinks to the longest
            row's answer (the shorter rows' tails masked out of the attention), later blocks
            share out only the masks left. Exact schedule only (no ``cache``, ``threshold``,
            ``factor``, ``cuda_graph``, nor ``logits_eos_inf``). ``docs/semantics.md``,
            "Variable length".
        length_threshold: the EOS probability that ends an answer (in ``[0, 1]``).
        positions: int ``(B, Lp + gen_length)``, the RoPE position of every position of each
            row's canvas, or ``None``: ``0 .. L-1`` in every row, as the reference (left
            padding does not shift positions). With a left-padded batch,
            ``(mask.cumsum(-1) - 1).clamp(min=0)`` of the attention mask extended over the
            answer gives each row the positions it has alone (the server's batcher does this:
            :mod:`genjo_fast.batching`). Needs a LLaDA model.
        observer: called with a :class:`StepEvent` after every step that runs the model
            (streaming, visualisation). Steps that transfer no token are skipped without a
            forward and without an observer call: with ``steps_per_block > block_length`` the
            schedule has such steps (e.g. 32 steps over 16 tokens: 16 calls). With
            ``cuda_graph`` its tensors are the graph's outputs, overwritten by the next
            replay.
        streamer: a transformers-style streamer (``put``, ``end``, optionally ``put_draft``:
            ``transformers.TextStreamer``, ``TextIteratorStreamer``, ``TextDiffusionStreamer``
            (batch 1), :class:`genjo_fast.streaming.DiffusionIteratorStreamer` (any batch)):
            ``put(prompt)``, then after every step ``put(ids)`` when the decoded prefix of the
            answer grew and ``put_draft(rest of the answer, masks included)``, then ``end()``
            (:mod:`genjo_fast.streaming`). One host copy of the answer per step; none without
            a streamer.
        progress: show a progress bar over the steps, skipped ones included (needs ``tqdm``).
        return_stats: also return a :class:`GenerateStats` (``nfe``, ``full_forwards``, the
            row forwards run and, with ``stop_at_eos``, the forwards saved, dropped rows'
            included).
    Returns:
        int64 ``(B, Lp + gen_length)``: the prompt followed by the generated tokens (with
        ``stop_at_eos``, ``stop_ids[0]`` after each stopped row's first stop id); with
        ``return_stats``, the pair ``(tokens, GenerateStats)``.
    """
    token_ids = {}
    if logits_eos_inf or confidence_eos_eot_inf or adaptive_length:
        token_ids["eos_id"] = eos_id
    if confidence_eos_eot_inf:
        token_ids["eot_id"] = eot_id
    stop_ids = resolve_stop_ids(stop_at_eos, stop_ids, (eos_id, eot_id), mask_id)
    check_drop_rows(drop_rows, stop_at_eos)
    if stop_ids is not None:
        token_ids.update(stop_token_ids(stop_ids))
        if cuda_graph:
            raise ValueError("stop_at_eos=True drops finished rows from the batch, which a "
                             "CUDA graph's fixed shapes cannot follow: pass cuda_graph=False")
    check_generate_args(prompt, attention_mask, steps, gen_length, block_length, temperature,
                        cfg_scale, remasking, mask_id, token_ids, divisible=sampler != "app")
    check_approximate_args(cache, refresh_every, threshold, factor)
    check_length_args(adaptive_length, length_threshold)
    check_variant_args(sampler, SAMPLERS, adaptive_length=adaptive_length,
                       stop_at_eos=stop_at_eos, cache=cache,
                       threshold=threshold, factor=factor, cuda_graph=cuda_graph,
                       logits_eos_inf=logits_eos_inf,
                       confidence_eos_eot_inf=confidence_eos_eot_inf)
    resolved = resolve_constraints(constraints, gen_length, mask_id, model_vocab_size(model))
    stream = StreamAdapter(streamer, mask_id) if streamer is not None else None
    check_model_not_meta(model)
    check_vocab_size(model_vocab_size(model), mask_id, token_ids, "the model's vocab_size",
                     prompt)

    if fast_model and is_llada(model) and not isinstance(model, LLaDAModel):
        model = from_reference(model)
    if positions is not None and not isinstance(model, LLaDAModel):
        raise ValueError(f"positions needs a LLaDA model (genjo_fast.models.LLaDAModel or a "
                         f"reference model with config.model_type 'llada' and "
                         f"fast_model=True), got {type(model).__name__}")
    if cache is not None and not isinstance(model, LLaDAModel):
        raise ValueError(f"cache={cache!r} needs a LLaDA model (genjo_fast.models.LLaDAModel or "
                         f"a reference model with config.model_type 'llada' and "
                         f"fast_model=True), got {type(model).__name__}")
    device = model_device(model, prompt.device)
    check_generator(generator, device)
    if cuda_graph:
        check_cuda_graph_args(model, device, draws)
    ops = resolve_backend(backend, device)
    batch, prompt_len = prompt.shape
    x, attention_mask = init_sequence(prompt, attention_mask, gen_length, mask_id, device)
    place_constraints(x, prompt_len, resolved)
    prompt_index = x != mask_id  # the prompt and the constraints: CFG's conditioning
    stopper = None
    if stop_ids is not None:
        stopper = RowStopper(x, prompt_len, stop_ids, mask_id, drop_rows)
        draws = stopper.follow(draws)
    check_positions(positions, x.shape)
    if positions is not None:  # the model batch's: doubled with CFG
        positions = positions.to(device).repeat(2 if cfg_scale > 0 else 1, 1)

    def position_kwargs(width: int) -> Optional[dict]:
        """The model's keyword arguments for the canvas' first ``width`` positions."""
        return None if positions is None else {"positions": positions[:, :width]}

    if cache is None:
        runner = FullForward(model, attention_mask, prompt_index, cfg_scale, mask_id,
                             token_ids=token_ids, model_kwargs=position_kwargs(x.shape[1]))
    else:
        check_cache_fits(model, batch * (2 if cfg_scale > 0 else 1), x.shape[1])
        runner = CachedBlockLogits(model, cache, x, attention_mask, prompt_index, cfg_scale,
                                   mask_id, positions=positions)

    app = sampler == "app"
    adaptive = threshold is not None or factor is not None
    if app:
        num_blocks, block_length, steps_per_block = app_blocks(gen_length, block_length, steps)
    else:
        num_blocks = gen_length // block_length
        steps_per_block = block_length if adaptive else steps // num_blocks

    # Rows stopped at EOS are filled: their counts are read where the call without the
    # option has them (before the first step, the block's positions not constrained).
    counted = x.clone() if stopper is not None else x

    def masked_counts(window: Window):
        """The rows' masked positions in the window's block (generate.py's schedule count)."""
        block_start = prompt_len + window.block * block_length
        return (counted[:, block_start:block_start + block_length] == mask_id).sum(1).tolist()

    if adaptive:
        rule = AdaptiveRule(ops, threshold=threshold, factor=factor)
    else:
        rule = (AppSchedule if app else FixedSchedule)(ops, steps_per_block, masked_counts,
                                                       batch, device)
    sampling = GumbelSampler(ops, temperature=temperature, remasking=remasking,
                             cfg_scale=cfg_scale, logits_eos_inf=logits_eos_inf,
                             confidence_eos_eot_inf=confidence_eos_eot_inf, eos_id=eos_id,
                             eot_id=eot_id, generator=generator, draws=draws, float64=app)
    windows = llada_windows(x, prompt_len, num_blocks, block_length, steps_per_block, mask_id,
                            reach_back=cache is None and not adaptive and not app,
                            until_decoded=adaptive)
    if adaptive_length:
        def short_runner(width: int, kept: Optional[torch.Tensor]) -> FullForward:
            mask = attention_mask[:, :width] if attention_mask is not None else None
            if kept is not None:
                mask = kept if mask is None else mask * kept
            return FullForward(model, mask, prompt_index[:, :width], cfg_scale, mask_id,
                               token_ids=token_ids, model_kwargs=position_kwargs(width))

        length = AdaptiveLength(x, prompt_len, runner, short_runner, threshold=length_threshold,
                                eos_id=eos_id, mask_id=mask_id, cfg_scale=cfg_scale)
        runner, windows = length.run, length.windows(windows)
    random = temperature > 0 or remasking == "random"
    graph_step = graph_steps(generator if random else None, device) if cuda_graph else None
    bar = progress_bar(progress, None if adaptive or adaptive_length
                       else num_blocks * steps_per_block,
                       "genjo_fast.generate")
    if stream is not None:
        stream.begin(prompt)
        observer = stream.observer(prompt_len, observer)
    stats = denoise(x, windows, runner, sampling, rule, mask_id=mask_id,
                    refresh_every=refresh_every, cached=cache is not None,
                    graph_step=graph_step, observer=observer, bar=bar, stopper=stopper)
    if bar is not None:
        bar.close()
    if stream is not None:
        stream.finish(x[:, prompt_len:])
    if return_stats:
        return x, stats
    return x
