"""genjo_fast's drop-in ``generate``: the reference sampler, exact, without its waste.

The data flow of one call, top to bottom:

    validate -> x = prompt + masks -> for each block: schedule ->
        for each step: model forward (block rows) -> sample -> select -> update -> observer

What makes it faster than :func:`genjo_fast.reference.generate` without changing a token:

* Only the current block is sampled and scored. Everything after it has confidence ``-inf``
  in the reference and everything before it is already decoded, so the reference's topk over
  the whole row can only pick masked positions of the block.
* Sampling touches block rows only, in bounded chunks: no ``(B, L, V)`` float64 tensor. The
  ops come from a backend (:mod:`genjo_fast.backends`): fused Triton/CUDA kernels on GPU,
  plain torch elsewhere, all giving the reference's tokens at temperature 0.
* The transfer is selected for the whole batch with one stable sort (no loop over rows, no
  host-device sync inside the step loop); the schedule is computed once per block on the host.
* Models whose ``forward`` takes ``logits_slice`` (a ``slice`` over positions) compute the LM
  head on the block rows only; any model returning ``.logits`` still works.
* Steps that transfer no token (``steps_per_block > block_length``) are skipped: they cannot
  change ``x``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .backends import resolve_backend
from .cache import CachedBlockLogits
from .contract import (EOS_ID, EOT_ID, MASK_ID, accepts_logits_slice, call_model,
                       init_sequence, model_device, model_vocab_size)
from .draws import Draws
from .models import LLaDAModel, from_reference, is_llada
from .validation import (check_approximate_args, check_cuda_graph_args, check_generate_args,
                         check_generator, check_vocab_size)


@dataclass
class StepEvent:
    """What an ``observer`` sees after each step. Tensors live on the sampling device.

    Attributes:
        block: index of the current block; step: global step index (0 .. steps - 1).
        block_start, block_stop: positions ``[block_start, block_stop)`` of ``x`` sampled at
            this step: the block (in exact mode it reaches further back only if an earlier
            block was left with a mask, because the model chose the mask id itself there).
        x: int64 ``(B, Lp + gen_length)``, the sequence after this step's update (do not
            modify it).
        x0: int64 ``(B, block_stop - block_start)``, the sampled token at each position.
        confidence: ``(B, block_stop - block_start)``, their scores (``-inf`` where already
            decoded).
        transfer: bool ``(B, block_stop - block_start)``, the positions unmasked by this step.
    """
    block: int
    step: int
    block_start: int
    block_stop: int
    x: torch.Tensor
    x0: torch.Tensor
    confidence: torch.Tensor
    transfer: torch.Tensor


@dataclass
class GenerateStats:
    """Counts of one generate call: ``nfe``, model forward passes, one per denoising step (a
    CFG pair runs as one batch); ``full_forwards``, those over the whole sequence (with a
    cache, the others run only the block, or the block and what follows)."""
    nfe: int
    full_forwards: int


def transfer_schedule(num_masked: int, steps: int) -> list:
    """Tokens to unmask at each of ``steps`` steps: ``n // steps``, plus one in the first
    ``n % steps`` steps (the reference's ``get_num_transfer_tokens`` for one row)."""
    base, remainder = divmod(num_masked, steps)
    return [base + (i < remainder) for i in range(steps)]


class BlockLogits:
    """Runs the model and returns the logits of the block rows only.

    With CFG the conditional and the unconditional sequences (prompt masked) run as one
    ``2B`` batch, as in the reference; the halves are returned separately so that the sampler
    can combine them chunk by chunk.
    """

    def __init__(self, model, attention_mask: Optional[torch.Tensor], prompt_index: torch.Tensor,
                 cfg_scale: float, mask_id: int):
        self.model = model
        self.trims = accepts_logits_slice(model)
        self.cfg = cfg_scale > 0
        self.prompt_index = prompt_index
        self.mask_id = mask_id
        self.attention_mask = attention_mask
        if self.cfg and attention_mask is not None:
            self.attention_mask = torch.cat([attention_mask, attention_mask], dim=0)

    def __call__(self, x: torch.Tensor, start: int, stop: int, full: bool = True):
        """Returns ``(logits, un_logits)``, each ``(B, stop - start, V)``; ``un_logits`` is
        ``None`` without CFG. (``full`` is for the cached runner; every call here is full.)"""
        batch = x.shape[0]
        if self.cfg:
            x = torch.cat([x, x.masked_fill(self.prompt_index, self.mask_id)], dim=0)
        kwargs = {"logits_slice": slice(start, stop)} if self.trims else {}
        logits = call_model(self.model, x, self.attention_mask, **kwargs)
        if not self.trims:
            logits = logits[:, start:stop]
        if self.cfg:
            return logits[:batch], logits[batch:]
        return logits, None


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
             cuda_graph: bool = False,
             observer: Optional[Callable[[StepEvent], None]] = None,
             progress: bool = False, return_stats: bool = False):
    """Masked-diffusion sampling, a drop-in replacement for the reference ``generate``.

    Same positional signature, defaults and result as the reference (``shared/LLADA_FACTS.md``).
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
            ``>= threshold``, until the block is decoded (``steps`` is then only validated).
            Rows that finish a block early stop changing.
        factor: APPROXIMATE, opt-in: with the confidences sorted decreasingly, transfer the
            largest prefix of ``n`` positions whose ``n``-th confidence is
            ``>= 1 - factor / (n + 1)``. Exclusive with ``threshold``.
        cuda_graph: capture the cached steps of each block in a CUDA graph and replay it
            (static shapes within a block make it possible; removes the launch overhead).
            Needs CUDA tensors, a LLaDA model and no injected ``draws``.
        observer: called with a :class:`StepEvent` after every step (streaming, visualisation).
            With ``cuda_graph`` its tensors are the graph's outputs, overwritten by the next
            replay.
        progress: show a progress bar over the steps (needs ``tqdm``).
        return_stats: also return a :class:`GenerateStats` (``nfe``, ``full_forwards``).
    Returns:
        int64 ``(B, Lp + gen_length)``: the prompt followed by the generated tokens; with
        ``return_stats``, the pair ``(tokens, GenerateStats)``.
    """
    token_ids = {}
    if logits_eos_inf or confidence_eos_eot_inf:
        token_ids["eos_id"] = eos_id
    if confidence_eos_eot_inf:
        token_ids["eot_id"] = eot_id
    check_generate_args(prompt, attention_mask, steps, gen_length, block_length, temperature,
                        cfg_scale, remasking, mask_id, token_ids)
    check_approximate_args(cache, refresh_every, threshold, factor)
    check_vocab_size(model_vocab_size(model), mask_id, token_ids, "the model's vocab_size",
                     prompt)

    if fast_model and is_llada(model) and not isinstance(model, LLaDAModel):
        model = from_reference(model)
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
    prompt_index = x != mask_id
    if cache is None:
        block_logits = BlockLogits(model, attention_mask, prompt_index, cfg_scale, mask_id)
    else:
        block_logits = CachedBlockLogits(model, cache, x, attention_mask, prompt_index,
                                         cfg_scale, mask_id)

    num_blocks = gen_length // block_length
    adaptive = threshold is not None or factor is not None
    # Every block starts fully masked (the prompt holds no mask and earlier blocks finish), so
    # the reference's per-row schedule is the same for all rows and known on the host.
    steps_per_block = block_length if adaptive else steps // num_blocks
    schedule = transfer_schedule(block_length, steps_per_block)
    num_transfer = torch.empty((batch,), dtype=torch.long, device=device)
    vocab_checked = False

    def denoise_step(start: int, stop: int, step: int, full: bool):
        """forward -> sample -> select -> update x in place; returns (x0, confidence, transfer)
        of the block. Static shapes within a block: this is what a CUDA graph captures."""
        nonlocal vocab_checked
        logits, un_logits = block_logits(x, start, stop, full)
        if not vocab_checked:
            check_vocab_size(logits.shape[-1], mask_id, token_ids, "the logits' last dim")
            vocab_checked = True
        x0, confidence = ops.gumbel_argmax_confidence(
            logits, un_logits=un_logits, cfg_scale=cfg_scale, temperature=temperature,
            remasking=remasking, logits_eos_inf=logits_eos_inf,
            confidence_eos_eot_inf=confidence_eos_eot_inf, eos_id=eos_id, eot_id=eot_id,
            generator=generator, **_injected(draws, step, start, batch, logits.shape[-1], device))
        x_block = x[:, start:stop]
        masked = x_block == mask_id
        confidence = confidence.masked_fill(~masked, -torch.inf)
        if adaptive:
            transfer = ops.select_transfer(confidence, threshold=threshold, factor=factor)
        else:
            transfer = ops.select_transfer(confidence, num_transfer)
        x[:, start:stop] = torch.where(transfer & masked, x0, x_block)
        return x0, confidence, transfer

    bar = _progress_bar(progress, None if adaptive else steps)
    nfe = full_forwards = 0
    for block in range(num_blocks):
        block_start = prompt_len + block * block_length
        stop = block_start + block_length
        start = block_start
        if cache is None and not adaptive and block > 0:
            start = _first_masked(x, prompt_len, block_start, mask_id)
        graphed = None
        if cuda_graph:
            random = temperature > 0 or remasking == "random"
            graphed = GraphedStep(lambda a=start, b=stop: denoise_step(a, b, -1, False),
                                  generator if random else None, device)
        for i, k in enumerate(schedule):
            # Adaptive decoding ends a block when no row has a mask left in it: one host sync
            # per step, in that approximate mode only (a full block needs no check).
            if adaptive and i > 0 and not bool((x[:, start:stop] == mask_id).any()):
                break
            step = block * steps_per_block + i
            if bar is not None:
                bar.update(1)
            if k == 0 and not adaptive:
                continue  # transfers nothing, so cannot change x
            num_transfer.fill_(k)
            full = i == 0 or (refresh_every is not None and i % refresh_every == 0)
            if graphed is not None and not full:
                x0, confidence, transfer = graphed()
            else:
                x0, confidence, transfer = denoise_step(start, stop, step, full)
            nfe += 1
            full_forwards += full or cache is None
            if observer is not None:
                observer(StepEvent(block, step, start, stop, x, x0, confidence, transfer))
    if bar is not None:
        bar.close()
    if return_stats:
        return x, GenerateStats(nfe=nfe, full_forwards=full_forwards)
    return x


class GraphedStep:
    """A step captured in a CUDA graph on its first call and replayed afterwards.

    The first call runs the step for real on a side stream (the warm-up CUDA graphs need),
    then captures it; each later call replays the graph, which reads and writes the same
    buffers (``x``, the cache, the transfer counts). ``fn`` must have static shapes and no
    host synchronisation.
    """

    def __init__(self, fn: Callable[[], tuple], generator: Optional[torch.Generator],
                 device: torch.device):
        self.fn = fn
        self.generator = generator
        self.device = device
        self.graph = None
        self.outputs = None

    def __call__(self) -> tuple:
        with torch.cuda.device(self.device):  # streams and graphs of the model's GPU
            return self._replay_or_capture()

    def _replay_or_capture(self) -> tuple:
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outputs = self.fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        if self.generator is not None:  # replays must advance the user's generator too
            register = getattr(self.graph, "register_generator_state", None)
            if register is None:
                raise RuntimeError("this torch cannot replay a user generator in a CUDA graph; "
                                   "pass generator=None (the default CUDA generator is "
                                   "graph-safe)")
            register(self.generator)
        with torch.cuda.graph(self.graph):
            self.outputs = self.fn()
        return outputs


def _first_masked(x: torch.Tensor, prompt_len: int, block_start: int, mask_id: int) -> int:
    """Where the exact sampler's window starts: the block, unless an earlier block left a
    position masked, which happens only when the model's choice for it was the mask id itself.
    The reference's row-wide topk still competes such positions, so the window reaches back to
    the first of them. One host sync per block (not per step)."""
    left = (x[:, prompt_len:block_start] == mask_id).any(0)
    return prompt_len + int(left.int().argmax()) if bool(left.any()) else block_start


def _injected(draws: Optional[Draws], step: int, start: int, batch: int, vocab: int,
              device: torch.device) -> dict:
    """The sampler's draw callbacks for block positions ``start + a : start + b``; none
    without ``draws`` (the sampler then draws from ``generator``)."""
    if draws is None:
        return {}
    return dict(
        gumbel_uniform=lambda a, b: draws.gumbel(step, start + a, start + b, batch, vocab,
                                                 device),
        remask_uniform=lambda a, b: draws.remask(step, start + a, start + b, batch, device))


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="genjo_fast.generate", unit="step")
