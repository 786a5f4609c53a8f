"""Masked LMs as diffusion generators: the MDLM / DiffuGPT front-end on the engine.

The family (``docs/semantics.md``, "Masked LMs"): a ``*ForMaskedLM`` from transformers trained
with the MDLM objective (ModernBERT, BERT, RoBERTa), or a GPT-2 adapted to diffusion (DiffuGPT:
full attention, ``shift=1``), sampled as JorgeVanco/diffusionGPT's ``TextDiffusionPipeline``
does: each prompt followed by masks up to ``max_length``; at each of ``num_steps`` steps every
masked position is revealed with probability ``(t - s) / t`` by a token sampled from the full
vocabulary (the mask token excluded), or the ``ceil(n * p)`` most probable ones are
(``use_confidence``), and visible generated tokens are re-sampled with a decaying probability
(Seed Diffusion's edits, ``allow_edits``). The plain statement is
:mod:`genjo_fast.reference_mdlm`; with the same draws the tokens are identical.

What makes it faster than the upstream loop without changing its distribution:

* batches: prompts of different lengths run together (each row is its prompt followed by
  masks up to ``max_length``, exactly the upstream input, so no padding is needed);
* the LM head and the sampler run only on the rows a step can change: the rule plans the step
  before the forward (:meth:`MDLMRule.plan`, the engine's planning hook): in the random
  variant it draws the reveal and edit decisions first and computes just those rows, in the
  confidence variant the masked rows plus the edited ones;
* the head runs a chunk of rows at a time, fused with the sample and its probability
  (:func:`genjo_fast.mdlm_sampling.sample_rows`): no ``(B, L, V)`` logits, probabilities or
  float64 tensors; a step where no row can change runs no forward at all;
* the model's forward runs as many canvas rows at a time as a memory budget holds
  (:func:`forward_rows`): the forward of a whole batch, not the sampler, would otherwise set
  the peak memory;
* ``adaptive_length`` (approximate, opt-in): the answer's length is decided after the first
  step and the positions after its EOS are never computed again.

The transformers pipeline (task ``"text-diffusion"``) is :mod:`genjo_fast.pipeline`.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from .answer_length import check_length_args, cut_at_eos
from .backends import resolve_backend
from .contract import call_model, model_device, model_vocab_size
from .engine import StepEvent, Window, denoise_steps
from .mdlm_contract import (MDLMDraws, TorchMDLMDraws, edit_probability, is_causal_lm,
                            model_call_kwargs, num_to_unmask, open_positions, unmask_probability,
                            visible_positions)
from .mdlm_sampling import sample_rows
from .streaming import StreamAdapter
from .validation import (_check_float, _check_int, check_model_not_meta, check_token_tensor,
                         check_vocab_size)

__all__ = ["mdlm_generate", "mdlm_generate_steps", "mdlm_semi_autoregressive",
           "mdlm_semi_autoregressive_steps", "drain_steps", "MDLMStats", "context_window",
           "head_split", "activation_bytes", "forward_rows", "AnswerStream",
           "FORWARD_MEMORY_MIB"]


# ----------------------------------------------------------------------------------------------
# The model: body and LM head, so that the head runs on chosen rows only.

def _masked_lm_head(model, hidden):
    return model.decoder(model.head(hidden))


#: transformers classes whose forward is ``head(body(x)[0])``: class name -> the head applied to
#: hidden states (the body is ``getattr(model, model.base_model_prefix)``). Checked against the
#: classes' own forward in the tests.
_HEADS = {
    "ModernBertForMaskedLM": _masked_lm_head,
    "BertForMaskedLM": lambda model, hidden: model.cls(hidden),
    "RobertaForMaskedLM": lambda model, hidden: model.lm_head(hidden),
    "GPT2LMHeadModel": lambda model, hidden: model.lm_head(hidden),
}


def head_split(model) -> Optional[Tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
    """``(body, head)`` of a known transformers LM class (its class or a base class in
    ``_HEADS``): ``body(x, attention_mask=...)[0]`` gives hidden states ``(B, L, D)`` and
    ``head(h)`` maps ``(R, D)`` to logits ``(R, V)``. ``None`` for any other model (it then runs
    its full forward and its logits are gathered)."""
    for cls in type(model).__mro__:
        head = _HEADS.get(cls.__name__)
        if head is not None:
            body = getattr(model, getattr(model, "base_model_prefix", ""), None)
            if isinstance(body, torch.nn.Module):
                return body, lambda hidden: head(model, hidden)
    return None


def context_window(model) -> Optional[int]:
    """The longest canvas the model can run on: ``config.seq_length`` when set (what
    diffusionGPT's configs carry), else the position table's size (``max_position_embeddings``
    or ``n_positions``, less RoBERTa's offset of ``padding_idx + 1``); ``None`` when unknown."""
    config = getattr(model, "config", None)
    for name in ("seq_length", "max_position_embeddings", "n_positions"):
        size = getattr(config, name, None)
        if isinstance(size, int) and not isinstance(size, bool):
            break
    else:
        return None
    if name != "seq_length":
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
        embeddings = getattr(body, "embeddings", None)
        if hasattr(embeddings, "create_position_ids_from_input_ids"):  # RoBERTa's positions
            size -= embeddings.padding_idx + 1
    return size


# ----------------------------------------------------------------------------------------------
# The engine's stages.

@dataclass
class MDLMStats:
    """Work of one call. ``steps``: denoising steps; ``forwards``: model (body) forward passes
    (a step where no row can change runs none); ``forward_tokens``: positions those forwards
    ran over (``batch x width`` each; their sum is proportional to the body's FLOPs);
    ``head_rows``: rows the LM head and the sampler ran on."""
    steps: int = 0
    forwards: int = 0
    forward_tokens: int = 0
    head_rows: int = 0


@dataclass
class RowLogits:
    """The logits of the rows a step can change, computed lazily a chunk at a time.

    Attributes:
        batch, positions: int64 ``(R,)``, each row's batch row and canvas position.
        vocab: ``V``. chunk: ``chunk(a, b)`` -> fresh float ``(b - a, V)`` logits of rows
            ``a:b``.
    """
    batch: torch.Tensor
    positions: torch.Tensor
    vocab: int
    chunk: Callable[[int, int], torch.Tensor]


class RowRunner:
    """The runner: the model over the canvas, the LM head on the planned rows only.

    Called as ``runner(x, start, stop, full, rows)`` with ``rows`` bool ``(B, stop - start)``;
    returns ``(RowLogits, None)``. The prediction for position ``i`` is the model's output at
    ``i - shift``. The model runs ``forward_batch_size`` canvas rows at a time (all of them by
    default; the front-ends pass :func:`forward_rows`'s choice), skipping those where no
    position can change; a step where none can change runs no forward.

    Args:
        model: a transformers LM (:func:`head_split` classes run body and head apart) or any
            callable ``model(x, attention_mask=...)`` returning ``.logits`` ``(B, L, V)``.
        attention_mask: ``(B, L)`` 0/1 or ``None``.
        shift: 0, or 1 for a DiffuGPT-style model.
        stats: the :class:`MDLMStats` counted into.
        forward_batch_size: canvas rows per model forward; ``None``: all.
    """

    def __init__(self, model, attention_mask: Optional[torch.Tensor], shift: int,
                 stats: MDLMStats, forward_batch_size: Optional[int] = None):
        self.model = model
        self.split = head_split(model)
        self.attention_mask = attention_mask
        self.shift = shift
        self.kwargs = model_call_kwargs(model)
        self.stats = stats
        self.forward_batch_size = forward_batch_size

    def __call__(self, x: torch.Tensor, start: int, stop: int, full: bool,
                 rows: torch.Tensor) -> Tuple[RowLogits, None]:
        batch, positions = rows.nonzero(as_tuple=True)
        positions = positions + start
        self.stats.head_rows += len(positions)
        x = x.contiguous()
        source = positions - self.shift
        size = self.forward_batch_size or x.shape[0]
        gathered = None
        for a in range(0, x.shape[0], size):
            b = min(a + size, x.shape[0])
            mine = (batch >= a) & (batch < b)
            if not bool(mine.any()):
                continue  # no position of these rows can change
            self.stats.forwards += 1
            self.stats.forward_tokens += (b - a) * x.shape[1]
            mask = None if self.attention_mask is None else self.attention_mask[a:b]
            if self.split is not None:
                out = self.split[0](x[a:b], attention_mask=mask, **self.kwargs)[0]
            else:
                out = call_model(self.model, x[a:b], mask, **self.kwargs)
            # Advanced indexing copies: the rows are private, the sampler may overwrite them.
            picked = out[batch[mine] - a, source[mine]]
            if gathered is None:
                gathered = picked.new_empty((len(positions), picked.shape[-1]))
            gathered[mine] = picked
            del out
        if gathered is None:  # nothing can change: no forward
            return RowLogits(batch, positions, 0, None), None
        if self.split is None:
            return RowLogits(batch, positions, gathered.shape[-1], lambda a, b: gathered[a:b]), \
                None
        head = self.split[1]
        return RowLogits(batch, positions, self.model.get_output_embeddings().out_features,
                         lambda a, b: head(gathered[a:b])), None


#: Default budget of one model forward's activations, in MiB, on devices other than CUDA: about
#: 512 positions of a base-size (hidden 768) model by :func:`activation_bytes`. On a CPU such a
#: forward keeps the matmuls busy (a 2-layer ModernBERT-base-shaped model, 8 rows of 256
#: positions: the same CPU time at 2, 4 or 8 rows per forward, about 7% more at 1), while the
#: forward of a whole batch sets the peak memory (there: about 92 MiB for the forward of the 8
#: rows, against about 8 MiB for the sampler's chunk of rows).
FORWARD_MEMORY_MIB = 48.0
#: On CUDA the default budget is this fraction of the device's free memory at the call: there
#: a forward over few rows leaves the device idle, and memory is plentiful.
CUDA_FORWARD_MEMORY_FRACTION = 0.25


def activation_bytes(model, width: int) -> Optional[int]:
    """An upper estimate of the memory one position of a ``width``-position canvas row adds to
    a forward of ``model`` (no autograd), in bytes; ``None`` when the config does not say.

    ``e * (12 * hidden + 10 * intermediate)``, ``e`` the size of the parameters' dtype,
    ``hidden`` and ``intermediate`` the config's ``hidden_size`` and ``intermediate_size``
    (GPT-2's ``n_embd`` and ``n_inner``; ``4 * hidden`` when unset), plus
    ``e * 4 * heads * width`` when the attention is eager (its scores are materialised), plus
    ``e * vocab`` for a model whose forward returns the logits of every position (no
    :func:`head_split`). Measured CPU peaks of BERT, ModernBERT and GPT-2 forwards (hidden 256
    and 768, 256 and 512 positions, 1 and 4 rows, SDPA and eager attention) were 0.3 to 1.0
    of it.
    """
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int) or isinstance(hidden, bool):
        return None
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or 4 * hidden)
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    size = parameter.element_size() if parameter is not None else 4
    floats = 12 * hidden + 10 * intermediate
    if getattr(config, "_attn_implementation", "eager") in (None, "eager"):
        floats += 4 * (getattr(config, "num_attention_heads", None) or 1) * width
    if head_split(model) is None:
        floats += model_vocab_size(model) or 0
    return size * floats


def forward_rows(model, batch: int, width: int, forward_batch_size: Optional[int] = None,
                 forward_memory_mib: Optional[float] = None,
                 device: Optional[torch.device] = None) -> int:
    """Canvas rows per model forward over a ``(batch, width)`` canvas.

    ``forward_batch_size`` when given (at most ``batch``); otherwise as many rows as fit
    ``forward_memory_mib`` (default :data:`FORWARD_MEMORY_MIB`, on CUDA
    :data:`CUDA_FORWARD_MEMORY_FRACTION` of the free memory) by :func:`activation_bytes`, at
    least one; the whole batch when the estimate is unknown.
    """
    if forward_batch_size is not None:
        return min(forward_batch_size, batch)
    per_position = activation_bytes(model, width)
    if per_position is None:
        return batch
    if forward_memory_mib is not None:
        budget = forward_memory_mib * 2**20
    elif device is not None and device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] * CUDA_FORWARD_MEMORY_FRACTION
    else:
        budget = FORWARD_MEMORY_MIB * 2**20
    return max(1, min(batch, int(budget // (per_position * width))))


class RowSampler:
    """The sampler: :func:`~genjo_fast.mdlm_sampling.sample_rows` on the runner's rows.

    ``__call__(row_logits, None, step, start)`` -> ``(x0, confidence)``, each ``(B, n)``: the
    sampled token and its probability (after ``temperature`` and ``top_p``) on the rows,
    ``mask_id`` and ``-inf`` elsewhere. With
    ``probe_id``, :attr:`probe` holds the rows' probability of that token after each call
    (``(B, n)``, 0 elsewhere).

    Args:
        draws: the uniforms (:class:`~genjo_fast.mdlm_contract.MDLMDraws`).
        batch_index: int64 ``(B,)``, the canvas rows' indices in the caller's batch.
    """

    def __init__(self, draws: MDLMDraws, batch_index: torch.Tensor, shape: Tuple[int, int], *,
                 mask_id: int, temperature: float, top_p: Optional[float] = None,
                 probe_id: Optional[int] = None):
        self.draws = draws
        self.batch_index = batch_index
        self.shape = shape
        self.mask_id = mask_id
        self.temperature = temperature
        self.top_p = top_p
        self.probe_id = probe_id
        self.probe = None

    def __call__(self, logits: RowLogits, un_logits, step: int, start: int):
        device = self.batch_index.device
        x0 = torch.full(self.shape, self.mask_id, dtype=torch.long, device=device)
        rows = (logits.batch, logits.positions - start)
        if len(logits.positions) == 0:
            return x0, torch.full(self.shape, -torch.inf, device=device)
        batch_index = self.batch_index[logits.batch]

        def uniform(a, b):
            return self.draws.token(step, batch_index[a:b], logits.positions[a:b], logits.vocab,
                                    device)

        tokens, p, probe = sample_rows(logits.chunk, len(logits.positions), logits.vocab,
                                       uniform, mask_id=self.mask_id,
                                       temperature=self.temperature, top_p=self.top_p,
                                       probe_id=self.probe_id)
        x0[rows] = tokens
        confidence = torch.full(self.shape, -torch.inf, dtype=p.dtype, device=device)
        confidence[rows] = p
        if probe is not None:
            self.probe = torch.zeros(self.shape, dtype=probe.dtype, device=device)
            self.probe[rows] = probe
        return x0, confidence


class MDLMRule:
    """The transfer rule, with a plan (:mod:`genjo_fast.engine`): which positions a step
    reveals and which it edits, over the window ``[start, stop)`` of a canvas.

    ``plan`` draws the step's decisions before the forward and returns the rows the step needs:
    in the random variant the positions it reveals plus those it edits; in the confidence
    variant every open position plus the edited ones (and every open position at
    ``probe_step``, whose probabilities the caller reads). ``__call__`` returns the positions
    written: the revealed ones (random: drawn; confidence: the ``ceil(n * p)`` most probable
    open positions, :func:`~genjo_fast.mdlm_contract.num_to_unmask`) and the edited ones.

    Args:
        ops: the backend namespace (``select_transfer``).
        region: bool ``(B, stop - start)``, the generated positions of the window.
        batch_index: int64 ``(B,)``, the rows' indices in the caller's batch (for the draws).
        num_steps: the steps of the canvas; ``first_step``: the global index of its step 0
            (semi-autoregressive blocks draw at ``block * num_steps + step``).
    """

    def __init__(self, ops, region: torch.Tensor, batch_index: torch.Tensor, start: int,
                 stop: int, num_steps: int, first_step: int, *, use_confidence: bool,
                 allow_edits: bool, mask_id: int, pad_id: Optional[int],
                 eos_id: Optional[int], draws: MDLMDraws, probe_step: Optional[int] = None):
        self.ops = ops
        self.region = region
        self.batch_index = batch_index
        self.start, self.stop = start, stop
        self.num_steps, self.first_step = num_steps, first_step
        self.use_confidence = use_confidence
        self.allow_edits = allow_edits
        self.mask_id, self.pad_id, self.eos_id = mask_id, pad_id, eos_id
        self.draws = draws
        self.probe_step = probe_step
        self.opened = self.reveal = self.edit = None

    def prepare(self, i: int) -> bool:
        return True

    def plan(self, x_window: torch.Tensor, masked: torch.Tensor, step: int) -> torch.Tensor:
        local = step - self.first_step
        device = x_window.device
        self.opened = open_positions(x_window, self.region, self.mask_id, self.pad_id)
        self.edit = torch.zeros_like(self.opened)
        if self.allow_edits:
            u = self.draws.edit(step, self.batch_index, self.start, self.stop, device)
            self.edit = visible_positions(x_window, self.region, self.mask_id, self.pad_id,
                                          self.eos_id) & (u < edit_probability(local,
                                                                               self.num_steps))
        if self.use_confidence:
            return self.opened | self.edit
        u = self.draws.unmask(step, self.batch_index, self.start, self.stop, device)
        self.reveal = self.opened & (u < unmask_probability(local, self.num_steps))
        if step == self.probe_step:
            return self.opened | self.edit
        return self.reveal | self.edit

    def __call__(self, confidence: torch.Tensor, rows: torch.Tensor,
                 step: int) -> torch.Tensor:
        if not self.use_confidence:
            return self.reveal | self.edit
        counts = num_to_unmask(self.opened.sum(1), step - self.first_step, self.num_steps)
        chosen = self.ops.select_transfer(confidence.masked_fill(~self.opened, -torch.inf),
                                          counts)
        return (chosen & self.opened) | self.edit


# ----------------------------------------------------------------------------------------------
# Validation.

def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def as_prompt_list(prompts) -> List[torch.Tensor]:
    """The prompts as int64 1-D tensors: a list/tuple of 1-D integer tensors or lists of ids,
    or a 2-D integer tensor (one prompt per row)."""
    if isinstance(prompts, torch.Tensor):
        check_token_tensor("prompts", prompts, 2, "(batch, prompt_length)")
        return [row.long() for row in prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of 1-D token tensors (or of lists of ids) or "
                        f"a 2-D tensor, got {type(prompts).__name__}")
    result = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, torch.Tensor):
            if not isinstance(prompt, (list, tuple)) or not all(
                    isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
                raise TypeError(f"prompts[{i}] must be a 1-D token tensor or a list of int ids, "
                                f"got {type(prompt).__name__}")
            prompt = torch.tensor(list(prompt), dtype=torch.long)
        check_token_tensor(f"prompts[{i}]", prompt, 1, "(prompt_length,)")
        result.append(prompt.long())
    return result


def check_mdlm_args(model, prompts: List[torch.Tensor], *, num_steps, allow_edits,
                    use_confidence, mask_id, pad_id, eos_id, shift, temperature,
                    adaptive_length, length_threshold, generator,
                    forward_batch_size=None, forward_memory_mib=None, top_p=None) -> None:
    """Validates the options shared by :func:`mdlm_generate` and
    :func:`mdlm_semi_autoregressive` (``prompts`` already through :func:`as_prompt_list`)."""
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    _check_int("num_steps", num_steps, 1)
    _check_flag("allow_edits", allow_edits)
    _check_flag("use_confidence", use_confidence)
    _check_int("mask_id", mask_id, 0)
    token_ids = {}
    for name, value in (("pad_id", pad_id), ("eos_id", eos_id)):
        if value is not None:
            _check_int(name, value, 0)
            token_ids[name] = value
    if shift not in (0, 1) or isinstance(shift, bool):
        raise ValueError(f"shift must be 0 (a masked LM) or 1 (DiffuGPT: the prediction for "
                         f"position i is read at i - 1), got {shift!r}")
    _check_float("temperature", temperature)
    check_length_args(adaptive_length, length_threshold)
    if forward_batch_size is not None:
        _check_int("forward_batch_size", forward_batch_size, 1)
    if forward_memory_mib is not None and (
            isinstance(forward_memory_mib, bool) or not isinstance(forward_memory_mib, numbers.Real)
            or not 0 < forward_memory_mib < float("inf")):
        raise ValueError(f"forward_memory_mib must be a positive number of MiB (the memory "
                         f"budget of one model forward) or None, got {forward_memory_mib!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (the nucleus filter's mass; 1 or None: no "
                         f"filter), got {top_p!r}")
    if adaptive_length and eos_id is None:
        raise ValueError("adaptive_length=True needs eos_id (the token that ends the answer)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    check_model_not_meta(model)
    check_full_attention(model)
    for i, prompt in enumerate(prompts):
        if bool((prompt == mask_id).any()):
            raise ValueError(f"prompts[{i}] contains mask_id={mask_id}: the mask id marks the "
                             f"positions to generate")
        if shift and len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: a shifted model (shift=1) reads the "
                             f"prediction for a position at the one before, so it needs at "
                             f"least one prompt token")
        check_vocab_size(model_vocab_size(model), mask_id, token_ids, "the model's vocab_size",
                         prompt if len(prompt) else None, f"prompts[{i}]")


@torch.no_grad()
def check_full_attention(model) -> None:
    """A causal LM must really run with full attention under ``is_causal=False`` (transformers
    added that switch in its 5.x series; an older version would silently stay causal): the
    first position's logits must change with the second token."""
    if not is_causal_lm(model):
        return
    device = model_device(model, torch.device("cpu"))
    x = torch.tensor([[0, 1], [0, 2]], device=device)
    logits = call_model(model, x, None, **model_call_kwargs(model))
    if torch.equal(logits[0, 0], logits[1, 0]):
        import transformers
        raise RuntimeError(f"{type(model).__name__} stays causal under is_causal=False with "
                           f"transformers {transformers.__version__}: full attention for "
                           f"decoder models needs a transformers with that switch (5.x)")


def _check_length(name: str, value, model, prompts, hint: str) -> Optional[int]:
    """``value`` must hold the longest prompt plus one token and fit the model's context
    window (when known); returns the window."""
    _check_int(name, value, 1)
    longest = max(len(p) for p in prompts)
    if value <= longest:
        raise ValueError(f"{name}={value} leaves no room to generate after a prompt of "
                         f"{longest} tokens: {name} counts the prompt and the generated tokens")
    window = context_window(model)
    if window is not None and value > window and hint:
        raise ValueError(f"{name}={value} exceeds the model's context window ({window} "
                         f"positions); {hint}")
    return window


# ----------------------------------------------------------------------------------------------
# Streaming.

class AnswerStream:
    """Drives a streamer (transformers' protocol, through
    :class:`~genjo_fast.streaming.StreamAdapter`) from the masked-LM samplers.

    A row's *answer* is what follows its prompt, cut before its first ``stop_id`` when one is
    given. A position is *confirmed* once no later step can change it, and the streamer is
    ``put`` the longest prefix of the answers confirmed in every row. In this family a step may
    write an open position (mask, or pad: a sampled pad is sampled again) and, with
    ``allow_edits``, any visible generated token but EOS (Seed Diffusion's edits, whose
    probability stays above 0 up to the last step): so without edits the confirmed prefix is
    the decoded one (no mask, no pad), and with edits only EOS tokens and the blocks finished
    in semi-autoregressive generation are confirmed before the end. With ``adaptive_length``
    nothing is confirmed before the answer's length is decided (after step 0).

    Rows of a batch are aligned as :func:`genjo_fast.generate` aligns them: prompts
    left-padded, answers right-padded to the longest, with ``pad_id`` (else ``eos_id``); a
    padded position is confirmed once its row can no longer grow.
    """

    def __init__(self, streamer, prompts: List[torch.Tensor], *, mask_id: int,
                 pad_id: Optional[int], eos_id: Optional[int], allow_edits: bool,
                 stop_id: Optional[int] = None):
        self.adapter = StreamAdapter(streamer, mask_id)
        self.prompts = prompts
        self.mask_id, self.pad_id, self.eos_id = mask_id, pad_id, eos_id
        self.allow_edits = allow_edits
        self.stop_id = stop_id
        self.fill = pad_id if pad_id is not None else eos_id
        if len(prompts) > 1 and self.fill is None:
            raise ValueError("streamer= with a batch needs pad_id or eos_id: the rows' prompts "
                             "and answers, of different lengths, are aligned with it")

    def begin(self) -> None:
        """``put`` the prompts, int64 ``(B, max prompt length)``, left-padded."""
        width = max(len(p) for p in self.prompts)
        prompt = self._filled(len(self.prompts), width)
        for b, p in enumerate(self.prompts):
            prompt[b, width - len(p):] = p.cpu()
        self.adapter.begin(prompt)

    def changing(self, x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """bool like ``x`` (int64 ``(B, W)``): the positions of ``region`` a later step may
        still write."""
        can = open_positions(x, region, self.mask_id, self.pad_id)
        if self.allow_edits:
            can |= visible_positions(x, region, self.mask_id, self.pad_id, self.eos_id)
        return can

    def step_canvas(self, x: torch.Tensor, region: torch.Tensor, settled: bool = True) -> None:
        """After a step of :func:`mdlm_generate`: ``x`` the whole canvas, ``region`` its
        generated positions still in play; ``settled=False``: every position of ``region`` may
        still change (before ``adaptive_length``'s cut)."""
        can = (self.changing(x, region) if settled else region).cpu()
        x = x.cpu()
        self._step([x[b, len(p):] for b, p in enumerate(self.prompts)],
                   [can[b, len(p):] for b, p in enumerate(self.prompts)],
                   [False] * len(self.prompts))

    def step_sequences(self, sequences: List[torch.Tensor], changing: dict,
                       active: List[int]) -> None:
        """After a step of semi-autoregressive generation: ``sequences`` every row's sequence
        (prompt included, the block in progress too), ``changing`` row -> bool of its last
        positions that may still change, ``active`` the rows that will grow."""
        answers, flags = [], []
        for b, (sequence, prompt) in enumerate(zip(sequences, self.prompts)):
            answer = sequence[len(prompt):].cpu()
            can = torch.zeros(len(answer), dtype=torch.bool)
            if b in changing:
                can[len(answer) - changing[b].shape[0]:] = changing[b].cpu()
            answers.append(answer)
            flags.append(can)
        self._step(answers, flags, [b in active for b in range(len(sequences))])

    def finish(self, answers: List[torch.Tensor]) -> None:
        """``put`` the rest of the final ``answers`` (int64 1-D, one per row), then ``end()``."""
        answer, _ = self._rows([a.cpu() for a in answers],
                               [torch.zeros(len(a), dtype=torch.bool) for a in answers],
                               [False] * len(answers))
        self.adapter.finish(answer)

    def _step(self, answers, changing, growing) -> None:
        answer, still = self._rows(answers, changing, growing)
        self.adapter.step(answer, still_open=still)

    def _rows(self, answers, changing, growing) -> Tuple[torch.Tensor, torch.Tensor]:
        """The answers cut at the stop id and right-padded, ``(B, A)``, and the bool ``(B, A)``
        of positions that may still change (a row's padding: while it may grow, or while its
        stop token may change)."""
        rows = []
        for answer, can, grows in zip(answers, changing, growing):
            if self.stop_id is not None:
                hits = (answer == self.stop_id).nonzero()
                if len(hits):
                    end = int(hits[0])
                    answer, can, grows = answer[:end], can[:end], bool(can[end])
            rows.append((answer, can, grows))
        width = max(len(answer) for answer, _, _ in rows)
        out = self._filled(len(rows), width)
        still = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (answer, can, grows) in enumerate(rows):
            out[b, :len(answer)] = answer
            still[b, :len(answer)] = can
            still[b, len(answer):] = grows
        return out, still

    def _filled(self, batch: int, width: int) -> torch.Tensor:
        # Batch 1 is never padded: without a pad or EOS id the value is never seen.
        return torch.full((batch, width), self.fill if self.fill is not None else 0,
                          dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Front-ends.

def _canvas_steps(model, x: torch.Tensor, region: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], batch_index: torch.Tensor, *,
                  ops, num_steps: int, first_step: int, steps: range, allow_edits: bool,
                  use_confidence: bool, mask_id: int, pad_id: Optional[int],
                  eos_id: Optional[int], shift: int, temperature: float,
                  top_p: Optional[float], draws: MDLMDraws, stats: MDLMStats,
                  forward_batch_size: Optional[int] = None,
                  forward_memory_mib: Optional[float] = None,
                  probe_id: Optional[int] = None,
                  after_step: Optional[Callable[[], None]] = None) -> Iterator[StepEvent]:
    """Runs steps ``steps`` (of ``num_steps``) on the canvas ``x`` (int64 ``(B, W)``, updated
    in place) through the engine, yielding its events (``after_step()`` is called before each
    is yielded). Only ``region`` (bool ``(B, W)``) is written; the engine's window spans the
    region's columns. Returns (as the generator's value) the sampler's last ``probe_id``
    probabilities (``None`` without a probe)."""
    columns = region.any(0).nonzero()
    if len(columns) == 0:  # nothing left to generate
        return None
    start, stop = int(columns[0]), int(columns[-1]) + 1
    rows = forward_rows(model, x.shape[0], x.shape[1], forward_batch_size, forward_memory_mib,
                        x.device)
    runner = RowRunner(model, attention_mask, shift, stats, rows)
    sampler = RowSampler(draws, batch_index, (x.shape[0], stop - start), mask_id=mask_id,
                         temperature=temperature, top_p=top_p, probe_id=probe_id)
    rule = MDLMRule(ops, region[:, start:stop], batch_index, start, stop, num_steps, first_step,
                    use_confidence=use_confidence, allow_edits=allow_edits, mask_id=mask_id,
                    pad_id=pad_id, eos_id=eos_id, draws=draws,
                    probe_step=first_step if probe_id is not None else None)
    window = Window(0, start, stop, len(steps), first_step + steps.start)
    for event in denoise_steps(x, [window], runner, sampler, rule, mask_id=mask_id):
        stats.steps += 1
        if after_step is not None:
            after_step()
        yield event
    return sampler.probe


def _options(num_steps, allow_edits, use_confidence, mask_id, pad_id, eos_id, shift,
             temperature, top_p, draws, generator, forward_batch_size,
             forward_memory_mib) -> dict:
    return dict(num_steps=num_steps, allow_edits=allow_edits, use_confidence=use_confidence,
                mask_id=mask_id, pad_id=pad_id, eos_id=eos_id, shift=shift,
                temperature=temperature, top_p=top_p, forward_batch_size=forward_batch_size,
                forward_memory_mib=forward_memory_mib,
                draws=draws if draws is not None else TorchMDLMDraws(generator))


def _stream(streamer, prompts, options: dict, stop_id: Optional[int]) -> Optional[AnswerStream]:
    if streamer is None:
        return None
    if stop_id is not None:
        _check_int("stop_id", stop_id, 0)
    return AnswerStream(streamer, prompts, mask_id=options["mask_id"], pad_id=options["pad_id"],
                        eos_id=options["eos_id"], allow_edits=options["allow_edits"],
                        stop_id=stop_id)


def mdlm_generate_steps(model, prompts, *, max_length: int, num_steps: int = 50,
                        allow_edits: bool = True, use_confidence: bool = False, mask_id: int,
                        pad_id: Optional[int] = None, eos_id: Optional[int] = None,
                        shift: int = 0, temperature: float = 1.0,
                        top_p: Optional[float] = None,
                        adaptive_length: bool = False, length_threshold: float = 0.5,
                        draws: Optional[MDLMDraws] = None,
                        generator: Optional[torch.Generator] = None,
                        backend: Optional[str] = None,
                        forward_batch_size: Optional[int] = None,
                        forward_memory_mib: Optional[float] = None,
                        streamer=None, stop_id: Optional[int] = None,
                        stats: Optional[MDLMStats] = None) -> Iterator[StepEvent]:
    """:func:`mdlm_generate` as an iterator: yields a :class:`~genjo_fast.engine.StepEvent`
    after every step (``event.x`` is the canvas, ``(B, W)`` with ``W <= max_length`` once
    ``adaptive_length`` has cut it); the generator's return value is the result. The
    arguments are checked at the call, before the first step."""
    prompts = as_prompt_list(prompts)
    check_mdlm_args(model, prompts, num_steps=num_steps, allow_edits=allow_edits,
                    use_confidence=use_confidence, mask_id=mask_id, pad_id=pad_id,
                    eos_id=eos_id, shift=shift, temperature=temperature,
                    adaptive_length=adaptive_length, length_threshold=length_threshold,
                    generator=generator, forward_batch_size=forward_batch_size,
                    forward_memory_mib=forward_memory_mib, top_p=top_p)
    _check_length("max_length", max_length, model, prompts,
                  "generate beyond it block by block (mdlm_semi_autoregressive, or the "
                  "pipeline's semi_autoregressive_generate)")
    options = _options(num_steps, allow_edits, use_confidence, mask_id, pad_id, eos_id, shift,
                       temperature, top_p, draws, generator, forward_batch_size,
                       forward_memory_mib)
    return _generate_steps(model, prompts, max_length, stats if stats is not None else MDLMStats(),
                           options, adaptive_length, length_threshold, backend,
                           _stream(streamer, prompts, options, stop_id))


@torch.no_grad()
def _generate_steps(model, prompts: List[torch.Tensor], max_length: int, stats: MDLMStats,
                    options: dict, adaptive_length: bool, length_threshold: float,
                    backend: Optional[str], stream: Optional[AnswerStream]
                    ) -> Iterator[StepEvent]:
    mask_id, pad_id, eos_id = options["mask_id"], options["pad_id"], options["eos_id"]
    num_steps = options["num_steps"]
    device = model_device(model, prompts[0].device)
    ops = resolve_backend(backend, device)
    batch = len(prompts)
    x = torch.full((batch, max_length), mask_id, dtype=torch.long, device=device)
    region = torch.ones_like(x, dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        x[b, :len(prompt)] = prompt.to(device)
        region[b, :len(prompt)] = False
    batch_index = torch.arange(batch, device=device)
    common = dict(ops=ops, first_step=0, stats=stats, **options)
    if stream is not None:
        stream.begin()
    told = None if stream is None else lambda: stream.step_canvas(x, region)
    if not adaptive_length:
        yield from _canvas_steps(model, x, region, None, batch_index, steps=range(num_steps),
                                 after_step=told, **common)
    else:
        probe = yield from _canvas_steps(
            model, x, region, None, batch_index, steps=range(1), probe_id=eos_id,
            after_step=None if stream is None else
            lambda: stream.step_canvas(x, region, settled=False), **common)
        width, attention_mask = cut_at_eos(x, region, probe, length_threshold, eos_id=eos_id,
                                           pad_id=pad_id)
        if num_steps > 1:
            yield from _canvas_steps(model, x[:, :width], region[:, :width], attention_mask,
                                     batch_index, steps=range(1, num_steps), after_step=told,
                                     **common)
    if stream is not None:
        stream.finish([x[b, len(p):] for b, p in enumerate(prompts)])
    return x


def drain_steps(steps: Iterator, observer: Optional[Callable] = None):
    """Runs a step iterator (:func:`mdlm_generate_steps`, :func:`mdlm_semi_autoregressive_steps`)
    to the end, calling ``observer`` on each item; returns the iterator's return value (the
    result)."""
    while True:
        try:
            event = next(steps)
        except StopIteration as done:
            return done.value
        if observer is not None:
            observer(event)



def mdlm_generate(model, prompts, *, max_length: int, num_steps: int = 50,
                  allow_edits: bool = True, use_confidence: bool = False, mask_id: int,
                  pad_id: Optional[int] = None, eos_id: Optional[int] = None, shift: int = 0,
                  temperature: float = 1.0, top_p: Optional[float] = None,
                  adaptive_length: bool = False, length_threshold: float = 0.5,
                  draws: Optional[MDLMDraws] = None,
                  generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                  forward_batch_size: Optional[int] = None,
                  forward_memory_mib: Optional[float] = None,
                  observer: Optional[Callable[[StepEvent], None]] = None, streamer=None,
                  stop_id: Optional[int] = None, return_stats: bool = False):
    """Generates with a masked LM (or a DiffuGPT-style LM, ``shift=1``) as diffusionGPT's
    pipeline does, batched (``docs/semantics.md``, "Masked LMs").

    Args:
        model: a transformers masked LM (``ModernBertForMaskedLM``, ``BertForMaskedLM``,
            ``RobertaForMaskedLM``: the LM head then runs on the changing rows only), a
            ``GPT2LMHeadModel`` (run with full attention), or any callable
            ``model(x, attention_mask=...)`` returning ``.logits`` ``(B, L, V)``.
        prompts: a list of int64 1-D token tensors (or lists of ids) of any lengths, or a
            2-D tensor; none may contain ``mask_id``.
        max_length: canvas length: each prompt followed by ``max_length - len(prompt)``
            generated tokens; at most the model's context window (:func:`context_window`).
        num_steps: denoising steps (>= 1).
        allow_edits: Seed Diffusion edits: a visible generated token (not pad, not EOS) is
            re-sampled with probability ``0.1 * (1 - step / num_steps)``.
        use_confidence: reveal the ``ceil(n * p)`` most probable open positions instead of
            each with probability ``p``.
        mask_id, pad_id, eos_id: special ids; a position holding ``pad_id`` counts as masked;
            ``eos_id`` is never edited and ends the answer with ``adaptive_length``.
        shift: 1 reads the prediction for position ``i`` at ``i - 1`` (DiffuGPT).
        temperature: divides the logits (1: as upstream; 0: the most probable token).
        top_p: DiffuLLaMA's nucleus filter: each position samples from the smallest set of
            most probable tokens whose probability exceeds ``top_p`` (after the temperature);
            ``None`` (default) or 1: no filter.
        adaptive_length: APPROXIMATE, opt-in: after step 0, in each row the first generated
            position whose EOS probability is ``>= length_threshold`` becomes EOS, the
            positions after it pad, and they are never computed again.
        draws: the uniforms (:class:`~genjo_fast.mdlm_contract.TensorMDLMDraws` to replay the
            statement's); default fresh ones from ``generator``.
        backend: backend of the transfer selection (``genjo_fast.backends``).
        forward_batch_size: canvas rows per model forward. ``None`` (default): as many as fit
            ``forward_memory_mib`` by :func:`activation_bytes`'s estimate (at least one; the
            whole batch when the model's config does not give the estimate). Rows where no
            position can change at a step are not run. The rows per forward change no token.
        forward_memory_mib: the memory budget of one forward's activations, in MiB; default
            :data:`FORWARD_MEMORY_MIB` (48), on CUDA a quarter of the free device memory.
        observer: called with a :class:`~genjo_fast.engine.StepEvent` after every step.
        streamer: a transformers-style streamer (``put``, ``end``, optionally ``put_draft``;
            :mod:`genjo_fast.streaming`): ``put(prompts)``, then after every step ``put`` of
            what the confirmed part of the answers gained and ``put_draft`` of the rest, then
            ``end()``. Confirmed: tokens no later step can change (:class:`AnswerStream`: with
            ``allow_edits`` nothing but EOS before the end). transformers' streamers take
            batch 1; :class:`~genjo_fast.streaming.DiffusionIteratorStreamer` any batch.
        stop_id: the streamed answers end before their first ``stop_id`` (the result is not
            cut; the pipeline cuts its texts there).
        return_stats: also return the :class:`MDLMStats`.
    Returns:
        int64 ``(B, max_length)``: each prompt followed by its generated tokens; with
        ``return_stats``, the pair ``(tokens, MDLMStats)``.
    """
    stats = MDLMStats()
    out = drain_steps(mdlm_generate_steps(
        model, prompts, max_length=max_length, num_steps=num_steps, allow_edits=allow_edits,
        use_confidence=use_confidence, mask_id=mask_id, pad_id=pad_id, eos_id=eos_id,
        shift=shift, temperature=temperature, top_p=top_p, adaptive_length=adaptive_length,
        length_threshold=length_threshold, draws=draws, generator=generator, backend=backend,
        forward_batch_size=forward_batch_size, forward_memory_mib=forward_memory_mib,
        streamer=streamer, stop_id=stop_id, stats=stats), observer)
    return (out, stats) if return_stats else out


def mdlm_semi_autoregressive_steps(model, prompts, *, block_size: int, max_length: int,
                                   num_steps: int = 50, allow_edits: bool = True,
                                   use_confidence: bool = False, mask_id: int,
                                   pad_id: Optional[int] = None, eos_id: Optional[int] = None,
                                   shift: int = 0, temperature: float = 1.0,
                                   top_p: Optional[float] = None,
                                   stop_id: Optional[int] = None,
                                   window: Optional[int] = None,
                                   draws: Optional[MDLMDraws] = None,
                                   generator: Optional[torch.Generator] = None,
                                   backend: Optional[str] = None,
                                   forward_batch_size: Optional[int] = None,
                                   forward_memory_mib: Optional[float] = None,
                                   streamer=None, stats: Optional[MDLMStats] = None
                                   ) -> Iterator[List[torch.Tensor]]:
    """:func:`mdlm_semi_autoregressive` as an iterator: yields every sequence's current state
    (a list of int64 1-D tensors, the block in progress included) after every step, and once
    more after a block is cut at ``stop_id``; the generator's return value is the result. The
    arguments are checked at the call, before the first step."""
    prompts = as_prompt_list(prompts)
    check_mdlm_args(model, prompts, num_steps=num_steps, allow_edits=allow_edits,
                    use_confidence=use_confidence, mask_id=mask_id, pad_id=pad_id,
                    eos_id=eos_id, shift=shift, temperature=temperature,
                    adaptive_length=False, length_threshold=0.5, generator=generator,
                    forward_batch_size=forward_batch_size,
                    forward_memory_mib=forward_memory_mib, top_p=top_p)
    _check_int("block_size", block_size, 1)
    _check_length("max_length", max_length, model, prompts, "")
    if stop_id is not None:
        _check_int("stop_id", stop_id, 0)
    window = window if window is not None else context_window(model)
    if window is None:
        raise ValueError(f"the context window of {type(model).__name__} is unknown: pass "
                         f"window= (the longest canvas the model runs on)")
    _check_int("window", window, 2)
    if block_size >= window:
        raise ValueError(f"block_size={block_size} must be smaller than the context window "
                         f"({window} positions): each block is generated after the last "
                         f"window - block_size tokens of the sequence")
    options = _options(num_steps, allow_edits, use_confidence, mask_id, pad_id, eos_id, shift,
                       temperature, top_p, draws, generator, forward_batch_size,
                       forward_memory_mib)
    return _semi_autoregressive_steps(
        model, prompts, block_size, max_length, window, stop_id,
        stats if stats is not None else MDLMStats(), options, backend,
        _stream(streamer, prompts, options, stop_id))


@torch.no_grad()
def _semi_autoregressive_steps(model, prompts: List[torch.Tensor], block_size: int,
                               max_length: int, window: int, stop_id: Optional[int],
                               stats: MDLMStats, options: dict, backend: Optional[str],
                               stream: Optional[AnswerStream]) -> Iterator[List[torch.Tensor]]:
    mask_id, num_steps = options["mask_id"], options["num_steps"]
    device = model_device(model, prompts[0].device)
    ops = resolve_backend(backend, device)
    sequences = [p.to(device) for p in prompts]
    blocks = [0] * len(sequences)
    active = [b for b, s in enumerate(sequences) if len(s) < max_length]
    if stream is not None:
        stream.begin()
    while active:
        # Rows of equal length have equal windows and blocks: they run as one batch.
        for length in sorted({len(sequences[b]) for b in active}):
            group = [b for b in active if len(sequences[b]) == length]
            n = min(block_size, max_length - length)
            keep = min(length, window - n)
            x = torch.full((len(group), keep + n), mask_id, dtype=torch.long, device=device)
            for i, b in enumerate(group):
                x[i, :keep] = sequences[b][length - keep:]
            region = torch.zeros_like(x, dtype=torch.bool)
            region[:, keep:] = True
            steps = _canvas_steps(model, x, region, None, torch.tensor(group, device=device),
                                  ops=ops, first_step=blocks[group[0]] * num_steps,
                                  steps=range(num_steps), stats=stats, **options)
            for _ in steps:
                current = list(sequences)
                for i, b in enumerate(group):
                    current[b] = torch.cat([sequences[b], x[i, keep:]])
                if stream is not None:
                    changing = stream.changing(x, region)[:, keep:]
                    stream.step_sequences(current, dict(zip(group, changing)), active)
                yield current
            stopped = False
            for i, b in enumerate(group):
                new = x[i, keep:]
                if stop_id is not None and bool((new == stop_id).any()):
                    new = new[:int((new == stop_id).nonzero()[0])]
                    active.remove(b)
                    stopped = True
                sequences[b] = torch.cat([sequences[b], new])
                blocks[b] += 1
                if len(sequences[b]) >= max_length and b in active:
                    active.remove(b)
            if stopped:
                if stream is not None:
                    stream.step_sequences(sequences, {}, active)
                yield list(sequences)
    if stream is not None:
        stream.finish([s[len(p):] for s, p in zip(sequences, prompts)])
    return sequences


def mdlm_semi_autoregressive(model, prompts, *, block_size: int, max_length: int,
                             num_steps: int = 50, allow_edits: bool = True,
                             use_confidence: bool = False, mask_id: int,
                             pad_id: Optional[int] = None, eos_id: Optional[int] = None,
                             shift: int = 0, temperature: float = 1.0,
                             top_p: Optional[float] = None,
                             stop_id: Optional[int] = None, window: Optional[int] = None,
                             draws: Optional[MDLMDraws] = None,
                             generator: Optional[torch.Generator] = None,
                             backend: Optional[str] = None,
                             forward_batch_size: Optional[int] = None,
                             forward_memory_mib: Optional[float] = None,
                             observer: Optional[Callable[[List[torch.Tensor]], None]] = None,
                             streamer=None, return_stats: bool = False):
    """Semi-autoregressive generation beyond the context window, block by block
    (diffusionGPT's ``semi_autoregressive_generate``, batched).

    While a sequence is shorter than ``max_length``, a block of ``n = min(block_size,
    max_length - len)`` masks is appended to its last ``window - n`` tokens (a sliding
    context) and denoised for ``num_steps`` steps, only the block being written; a block
    holding ``stop_id`` is cut before it and ends that sequence. Sequences of equal length run
    as one batch. Options as :func:`mdlm_generate`.

    Args:
        block_size: tokens per block, smaller than the context window.
        max_length: total length (prompt included) at which a sequence stops; may exceed the
            context window.
        window: the context window; default :func:`context_window` of the model.
        stop_id: the token that ends a sequence (it is not kept).
        observer: called with the list of current sequences after every step.
        streamer: as :func:`mdlm_generate`'s; the answers grow block by block, a finished
            block is confirmed (its tokens never change again).
    Returns:
        a list of int64 1-D tensors, each prompt followed by its generated tokens; with
        ``return_stats``, the pair ``(sequences, MDLMStats)``.
    """
    stats = MDLMStats()
    out = drain_steps(mdlm_semi_autoregressive_steps(
        model, prompts, block_size=block_size, max_length=max_length, num_steps=num_steps,
        allow_edits=allow_edits, use_confidence=use_confidence, mask_id=mask_id, pad_id=pad_id,
        eos_id=eos_id, shift=shift, temperature=temperature, top_p=top_p, stop_id=stop_id,
        window=window, draws=draws, generator=generator, backend=backend,
        forward_batch_size=forward_batch_size, forward_memory_mib=forward_memory_mib,
        streamer=streamer, stats=stats), observer)
    return (out, stats) if return_stats else out
