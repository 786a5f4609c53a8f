"""Monte Carlo log-likelihood of masked-diffusion LMs: the reference estimator, faster.

:func:`get_log_likelihood` has the reference's signature and semantics
(``docs/semantics.md``; the plain statement is
:func:`genjo_fast.reference_likelihood.get_log_likelihood`): same expectation, and with the same
draws (``draws=``) the same value to float tolerance. What makes it faster:

* The LM head runs on the masked rows only. For genjo_fast's LLaDA model the hidden states of
  the masked positions are gathered and only they go through the final norm and the LM head;
  a model whose ``forward`` takes ``logits_slice`` computes logits from the first answer
  position on; any other model's full logits are read at the masked positions, chunk by
  chunk, without a float copy of ``(B, L, V)``.
* :func:`get_log_likelihoods` packs the Monte Carlo rows of many ``(prompt, answer)`` pairs of
  different lengths into shared model calls (longest first, right-padded, padded keys masked;
  LLaDA positions are absolute from 0, so right padding leaves every real token where the
  unpadded sequence has it). Single-token answers (``mc_num=1``) no longer cost a model call
  each.
* :func:`greedy_continuations` runs the harness's one-token-per-step greedy check for many
  pairs at once and stops a pair as soon as one unmasked token differs from the answer (a
  token once unmasked never changes, so the result is already known).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .contract import MASK_ID, accepts_logits_slice, model_device, model_vocab_size
from .models import LLaDAModel, from_reference, is_llada
from .reference_likelihood import (MaskDraws, TensorMaskDraws, TorchMaskDraws,
                                   check_estimator_args, check_pair, mask_counts)
from .validation import _check_float, _check_int, check_vocab_size

#: Logit elements per LM-head chunk: bounds the memory of the selected rows' logits.
_CHUNK_ELEMENTS = 1 << 25
#: Rows per model call when ``forward_batch_size`` is not given (at least ``batch_size``).
DEFAULT_FORWARD_ROWS = 32

Pair = Tuple[torch.Tensor, torch.Tensor]


class SelectedLogits:
    """Runs a mask predictor and hands out the logits of selected positions only.

    With CFG the conditional batch and its unconditional copy (prompt positions masked) run
    as one ``2n`` batch, as in the reference, and ``un + (cfg_scale + 1) * (cond - un)`` is
    formed on the selected rows only.

    Args:
        model: genjo_fast's LLaDA model (or anything with ``forward_hidden`` and
            ``lm_head``), a reference LLaDA model loaded through transformers (run through
            :func:`~genjo_fast.models.from_reference` when ``fast_model``), or any callable
            ``model(x, attention_mask=...)`` returning ``.logits`` ``(n, L, V)`` (or, if its
            forward takes ``logits_slice``, the rows of that slice).
        cfg_scale: classifier-free guidance scale (0 disables it).
        mask_id: id of the mask token.
    """

    def __init__(self, model, cfg_scale: float, mask_id: int, fast_model: bool = True):
        if fast_model and is_llada(model) and not isinstance(model, LLaDAModel):
            model = from_reference(model)
        self.model = model
        self.hidden = callable(getattr(model, "forward_hidden", None)) and callable(
            getattr(model, "lm_head", None))
        self.trims = not self.hidden and accepts_logits_slice(model)
        self.cfg_scale = cfg_scale
        self.mask_id = mask_id

    def reduce(self, x: torch.Tensor, key_mask: Optional[torch.Tensor],
               prompt_mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               fn: Callable[[torch.Tensor, int, int], Tuple[torch.Tensor, ...]]
               ) -> Tuple[torch.Tensor, ...]:
        """Applies ``fn`` to the logits of positions ``(rows[i], cols[i])``, chunk by chunk.

        Args:
            x: int64 ``(n, L)`` model input (positions to predict already hold the mask id).
            key_mask: bool ``(n, L)``, False on padding, or ``None`` (no padding).
            prompt_mask: bool ``(n, L)``, the positions masked in the unconditional copy.
            rows, cols: int64 ``(N,)`` the selected positions.
            fn: ``fn(logits, start, stop)`` gets the model-dtype logits ``(stop - start, V)``
                of selected positions ``start:stop`` and returns a tuple of ``(stop - start,)``
                tensors.
        Returns:
            The tuple of ``fn``'s outputs, each concatenated to ``(N,)``.
        """
        n, length = x.shape
        cfg = self.cfg_scale > 0
        if cfg:
            x = torch.cat([x, x.masked_fill(prompt_mask, self.mask_id)])
            key_mask = None if key_mask is None else torch.cat([key_mask, key_mask])
        if self.hidden:
            hidden = self.model.forward_hidden(x, attention_mask=key_mask)
            cond, un = hidden[rows, cols], (hidden[rows + n, cols] if cfg else None)

            def logits_of(s, e, branch):
                return self.model.lm_head((cond if branch == 0 else un)[s:e])
            vocab = None
        else:
            first = int(cols.min()) if rows.numel() else 0
            kwargs = {"logits_slice": slice(first, length)} if self.trims else {}
            offset = first if self.trims else 0
            out = self.model(x, attention_mask=key_mask, **kwargs)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            expected = (x.shape[0], length - offset)
            if logits.dim() != 3 or tuple(logits.shape[:2]) != expected:
                raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; "
                                 f"expected ({expected[0]}, {expected[1]}, vocab_size)")
            vocab = logits.shape[-1]

            def logits_of(s, e, branch):
                return logits[rows[s:e] + branch * n, cols[s:e] - offset]
        chunk = max(1, _CHUNK_ELEMENTS // (vocab or _head_size(self.model)))
        results = []
        for s in range(0, rows.numel(), chunk):
            e = min(s + chunk, rows.numel())
            selected = logits_of(s, e, 0)
            if cfg:
                un_selected = logits_of(s, e, 1)
                selected = un_selected + (self.cfg_scale + 1) * (selected - un_selected)
            results.append(fn(selected, s, e))
        if not results:
            return ()
        return tuple(torch.cat(parts) for parts in zip(*results))


def _head_size(model) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "embedding_size", None) or model_vocab_size(model) or 1)


class _Batch:
    """Right-padded rows of several pairs, built on the host.

    Attributes:
        x: int64 ``(n, L)``, the pairs' ``prompt + answer`` (padding: the mask id).
        key_mask: bool ``(n, L)``, True on real tokens, or ``None`` when nothing is padded.
        prompt_mask: bool ``(n, L)``, True on prompt positions.
        select: bool ``(n, L)``, True on the answer positions to predict.
        pair_of_row: int64 ``(n,)``.
    """

    def __init__(self, pairs: Sequence[Pair], segments, answer_masks, mask_id: int):
        length = max(len(pairs[p][0]) + len(pairs[p][1]) for p, _, _ in segments)
        n = sum(stop - start for _, start, stop in segments)
        self.x = torch.full((n, length), mask_id, dtype=torch.long)
        self.key_mask = torch.zeros(n, length, dtype=torch.bool)
        self.prompt_mask = torch.zeros(n, length, dtype=torch.bool)
        self.select = torch.zeros(n, length, dtype=torch.bool)
        self.pair_of_row = torch.empty(n, dtype=torch.long)
        row = 0
        for p, start, stop in segments:
            prompt, answer = pairs[p]
            size, lp, end = stop - start, len(prompt), len(prompt) + len(answer)
            self.x[row:row + size, :end] = torch.cat([prompt, answer])
            self.key_mask[row:row + size, :end] = True
            self.prompt_mask[row:row + size, :lp] = True
            self.select[row:row + size, lp:end] = answer_masks[p][start:stop]
            self.pair_of_row[row:row + size] = p
            row += size
        if bool(self.key_mask.all()):
            self.key_mask = None  # no padding: call the model as the reference does

    def to(self, device: torch.device) -> "_Batch":
        for name in ("x", "key_mask", "prompt_mask", "select", "pair_of_row"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else value.to(device))
        return self


def _segments(order: Sequence[int], rows: Sequence[int], batch_rows: int):
    """Splits the rows of the pairs, in ``order``, into model calls of ``batch_rows`` rows.

    Yields lists of ``(pair, start, stop)``: rows ``start:stop`` of ``pair``."""
    current, size = [], 0
    for p in order:
        start = 0
        while start < rows[p]:
            take = min(rows[p] - start, batch_rows - size)
            current.append((p, start, start + take))
            start, size = start + take, size + take
            if size == batch_rows:
                yield current
                current, size = [], 0
    if current:
        yield current


def _check_pairs(pairs, mask_id: int) -> List[Pair]:
    if isinstance(pairs, torch.Tensor) or not isinstance(pairs, Sequence):
        raise TypeError("pairs must be a sequence of (prompt, answer) tensor pairs, got "
                        f"{type(pairs).__name__}")
    checked = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"pairs[{i}] must be a (prompt, answer) pair")
        check_pair(pair[0], pair[1], mask_id, where=f" of pairs[{i}]")
        checked.append((pair[0].detach().to("cpu", torch.long),
                        pair[1].detach().to("cpu", torch.long)))
    return checked


def _progress(progress, total: int, desc: str):
    """``progress``: False, True (a tqdm bar) or an object with ``update(n)`` (e.g. the
    caller's tqdm bar)."""
    if progress is True:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit="pair"), True
    return (None if progress is None or progress is False else progress), False


@torch.no_grad()
def get_log_likelihoods(model, pairs: Sequence[Pair], mc_num: int = 128, batch_size: int = 16,
                        cfg_scale: float = 0., mask_id: int = MASK_ID, *,
                        generator: Optional[torch.Generator] = None,
                        draws: Union[None, MaskDraws, Sequence[MaskDraws]] = None,
                        forward_batch_size: Optional[int] = None, fast_model: bool = True,
                        progress=False) -> List[float]:
    """Monte Carlo estimates of ``log p(answer | prompt)`` for many pairs at once.

    Each pair gets exactly the reference estimator (see :func:`get_log_likelihood`); only the
    execution is shared: the ``mc_num`` masked rows of every pair are packed, longest pairs
    first, into model calls of ``forward_batch_size`` rows.

    Args:
        model: see :class:`SelectedLogits`.
        pairs: ``(prompt, answer)`` pairs of 1-D integer tensors: prompt ``(Lp,)`` (may be
            empty), answer ``(T,)`` with ``T >= 1``; lengths may differ between pairs.
        mc_num, batch_size, cfg_scale, mask_id: as in :func:`get_log_likelihood`.
        generator: CPU generator of the default draws; ignored when ``draws`` is given.
        draws: a :class:`~genjo_fast.reference_likelihood.MaskDraws` source shared by all
            pairs, or one per pair. Draws are taken pair by pair in input order, round by
            round, so a shared :class:`~genjo_fast.reference_likelihood.TorchMaskDraws`
            gives the same values as consecutive :func:`get_log_likelihood` calls with it.
        forward_batch_size: rows per model call (doubled with CFG, as in the reference);
            default ``max(batch_size, 32)``.
        fast_model: run a transformers-loaded reference LLaDA model through genjo_fast's
            implementation on the same weights (see :func:`genjo_fast.generate`).
        progress: ``True`` for a tqdm bar over pairs, or a bar-like object whose
            ``update(n)`` is called as pairs finish.
    Returns:
        One Python float per pair, in input order.
    """
    check_estimator_args(mc_num, batch_size, cfg_scale, mask_id)
    pairs = _check_pairs(pairs, mask_id)
    rows_per_call = _forward_rows(forward_batch_size, batch_size)
    _check_vocab(model, pairs, mask_id)
    sources = _draw_sources(draws, generator, len(pairs))
    rounds = mc_num // batch_size

    # Draws on the host, pair by pair in input order (the RNG order of sequential calls).
    answer_masks, weights = [], []
    for p, (_, answer) in enumerate(pairs):
        length = len(answer)
        masks, weight = [], []
        for r in range(rounds):
            k, perms = sources[p].draw(r, length, batch_size)
            if tuple(perms.shape) != (batch_size, length) or not 1 <= k <= length:
                raise ValueError(f"draws for pairs[{p}] round {r}: expected k in 1..{length} "
                                 f"and permutations ({batch_size}, {length}); got k={k} and "
                                 f"{tuple(perms.shape)}")
            counts = mask_counts(k, length, batch_size)
            masks.append(perms < counts[:, None])
            # Each masked position adds CE / (count / T), summed, / batch_size, averaged.
            weight.append(length / counts.double() / (batch_size * rounds))
        answer_masks.append(torch.cat(masks))
        weights.append(torch.cat(weight))

    scorer = SelectedLogits(model, cfg_scale, mask_id, fast_model)
    device = model_device(scorer.model, torch.device("cpu"))
    # Accumulated on the device: no host sync per model call.
    totals = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    order = sorted(range(len(pairs)), key=lambda p: -(len(pairs[p][0]) + len(pairs[p][1])))
    bar, owned = _progress(progress, len(pairs), "log-likelihood")
    done_rows = [0] * len(pairs)
    for segments in _segments(order, [mc_num] * len(pairs), rows_per_call):
        batch = _Batch(pairs, segments, answer_masks, mask_id)
        targets = batch.x[batch.select]
        row_weight = torch.cat([weights[p][start:stop] for p, start, stop in segments])
        rows, cols = batch.select.nonzero(as_tuple=True)
        position_weight = row_weight[rows].to(device)
        position_pair = batch.pair_of_row[rows].to(device)
        batch.x[batch.select] = mask_id
        batch.to(device)
        targets, rows, cols = targets.to(device), rows.to(device), cols.to(device)
        (ce,) = scorer.reduce(
            batch.x, batch.key_mask, batch.prompt_mask, rows, cols,
            lambda logits, s, e: (F.cross_entropy(logits, targets[s:e], reduction="none"),))
        totals.index_add_(0, position_pair, ce.double() * position_weight)
        if bar is not None:
            finished = 0
            for p, start, stop in segments:
                done_rows[p] += stop - start
                finished += done_rows[p] == mc_num
            bar.update(finished)
    if owned:
        bar.close()
    return (-totals).cpu().tolist()


def get_log_likelihood(model, prompt: torch.Tensor, answer: torch.Tensor, mc_num: int = 128,
                       batch_size: int = 16, cfg_scale: float = 0., mask_id: int = MASK_ID, *,
                       generator: Optional[torch.Generator] = None,
                       draws: Optional[MaskDraws] = None,
                       forward_batch_size: Optional[int] = None,
                       fast_model: bool = True) -> float:
    """Monte Carlo estimate of ``log p(answer | prompt)``, the reference estimator.

    ``mc_num // batch_size`` rounds; each draws ``k ~ U{1..T}`` (``T = len(answer)``), gives
    its ``batch_size`` rows the stratified mask counts ``round(linspace(k, k + (b-1) T / b,
    b))`` wrapped into ``1..T``, and masks that many random answer positions per row (never
    the prompt). The round's loss is the sum over rows and masked positions of
    ``cross_entropy / (count / T)``, divided by ``batch_size``; the estimate is minus the mean
    over rounds. With CFG the unconditional copy masks the prompt and the logits are
    ``un + (cfg_scale + 1) * (cond - un)``.

    Args:
        model: see :class:`SelectedLogits`.
        prompt: int ``(Lp,)`` token ids (may be empty). answer: int ``(T,)``, ``T >= 1``.
            Neither may contain ``mask_id``.
        mc_num: Monte Carlo samples, a multiple of ``batch_size`` (1 suffices for
            single-token answers, 128 otherwise).
        batch_size: rows per round (they share ``k``).
        cfg_scale: classifier-free guidance scale (0 disables it).
        mask_id: id of the mask token.
        generator: CPU generator of the default draws; ignored when ``draws`` is given.
        draws: a :class:`~genjo_fast.reference_likelihood.MaskDraws` source (e.g. the
            :class:`~genjo_fast.reference_likelihood.TensorMaskDraws` handed to the
            reference statement, to get its value to float tolerance).
        forward_batch_size: rows per model call; default ``max(batch_size, 32)``.
        fast_model: see :func:`get_log_likelihoods`.
    Returns:
        The estimate, a Python float (the logits' dtype is used for the cross-entropy, as in
        the reference; the sums are float64).
    """
    check_estimator_args(mc_num, batch_size, cfg_scale, mask_id)
    check_pair(prompt, answer, mask_id)  # errors name "prompt"/"answer", not "pairs[0]"
    return get_log_likelihoods(model, [(prompt, answer)], mc_num, batch_size, cfg_scale,
                               mask_id, generator=generator,
                               draws=None if draws is None else [draws],
                               forward_batch_size=forward_batch_size, fast_model=fast_model)[0]


@torch.no_grad()
def greedy_continuations(model, pairs: Sequence[Pair], cfg_scale: float = 0.,
                         mask_id: int = MASK_ID, *, forward_batch_size: int = DEFAULT_FORWARD_ROWS,
                         fast_model: bool = True, progress=False) -> List[bool]:
    """The harness's "is greedy" check for many pairs (see :func:`is_greedy_continuation`).

    Pairs run ``forward_batch_size`` at a time (longest first, right-padded); a pair leaves
    the batch as soon as its answer is complete or one of its unmasked tokens differs from
    the answer.

    Returns:
        One bool per pair, in input order.
    """
    _check_float("cfg_scale", cfg_scale)
    _check_int("mask_id", mask_id, 0)
    _check_int("forward_batch_size", forward_batch_size, 1)
    pairs = _check_pairs(pairs, mask_id)
    _check_vocab(model, pairs, mask_id)
    scorer = SelectedLogits(model, cfg_scale, mask_id, fast_model)
    device = model_device(scorer.model, torch.device("cpu"))
    order = sorted(range(len(pairs)), key=lambda p: -(len(pairs[p][0]) + len(pairs[p][1])))
    result = [False] * len(pairs)
    answer_masks = [torch.ones(1, len(a), dtype=torch.bool) for _, a in pairs]
    bar, owned = _progress(progress, len(pairs), "greedy check")
    for segments in _segments(order, [1] * len(pairs), forward_batch_size):
        batch = _Batch(pairs, segments, answer_masks, mask_id).to(device)
        target = batch.x.clone()
        pending = batch.select  # answer positions still masked
        batch.x[pending] = mask_id
        alive = torch.arange(len(segments), device=device)
        ok = torch.zeros(len(segments), dtype=torch.bool, device=device)
        while alive.numel():
            key_mask = None if batch.key_mask is None else batch.key_mask[alive]
            rows, cols = pending[alive].nonzero(as_tuple=True)

            def pick(logits, s, e):
                x0 = logits.argmax(-1)
                p = torch.softmax(logits.float(), dim=-1)
                return x0, p.gather(-1, x0[:, None]).squeeze(-1)
            x0, confidence = scorer.reduce(batch.x[alive], key_mask, batch.prompt_mask[alive],
                                           rows, cols, pick)
            scores = torch.full(pending[alive].shape, -torch.inf, device=device)
            scores[rows, cols] = confidence
            best = scores.argmax(-1)  # the first maximum: ties go to the lowest position
            tokens = torch.zeros_like(batch.x[alive])
            tokens[rows, cols] = x0
            token = tokens.gather(1, best[:, None]).squeeze(1)
            batch.x[alive, best] = token
            pending[alive, best] = False
            wrong = token != target[alive, best]
            finished = ~pending[alive].any(-1)
            ok[alive[finished & ~wrong]] = True
            alive = alive[~(finished | wrong)]
        for (p, _, _), value in zip(segments, ok.tolist()):
            result[p] = value
        if bar is not None:
            bar.update(len(segments))
    if owned:
        bar.close()
    return result


def is_greedy_continuation(model, prompt: torch.Tensor, answer: torch.Tensor,
                           cfg_scale: float = 0., mask_id: int = MASK_ID, *,
                           fast_model: bool = True) -> bool:
    """The reference harness's "is greedy" check of ``answer`` after ``prompt``.

    Start from ``prompt`` followed by ``T`` masks. At each step, over the masked positions:
    ``x0 = argmax`` of the logits, ``confidence = softmax(logits in float32)[x0]``; only the
    most confident position is unmasked (ties: the lowest position). True iff the ``T``
    unmasked tokens equal ``answer``. CFG as in the estimator.

    Args:
        prompt: int ``(Lp,)`` (may be empty); answer: int ``(T,)``, ``T >= 1``.
    Returns:
        A Python bool.
    """
    check_pair(prompt, answer, mask_id)
    return greedy_continuations(model, [(prompt, answer)], cfg_scale, mask_id,
                                fast_model=fast_model)[0]



def _check_vocab(model, pairs: Sequence[Pair], mask_id: int) -> None:
    """The mask id and every prompt/answer token must index the model's vocabulary."""
    tokens = torch.cat([t.reshape(-1).cpu() for pair in pairs for t in pair])
    check_vocab_size(model_vocab_size(model), mask_id, {}, "the model's vocab_size",
                     tokens[None], "a prompt or answer")

def _forward_rows(forward_batch_size: Optional[int], batch_size: int) -> int:
    if forward_batch_size is None:
        return max(batch_size, DEFAULT_FORWARD_ROWS)
    _check_int("forward_batch_size", forward_batch_size, 1)
    return forward_batch_size


def _draw_sources(draws, generator, count: int) -> List[MaskDraws]:
    if draws is None:
        return [TorchMaskDraws(generator)] * count
    sources = list(draws) if isinstance(draws, Sequence) else [draws] * count
    if len(sources) != count:
        raise ValueError(f"draws holds {len(sources)} sources for {count} pairs")
    for source in sources:
        if not callable(getattr(source, "draw", None)):
            raise TypeError("draws must have a draw(round, length, rows) method (a MaskDraws), "
                            f"or be a sequence of them; got {type(source).__name__}")
    return sources


__all__ = ["get_log_likelihood", "get_log_likelihoods", "is_greedy_continuation",
           "greedy_continuations", "SelectedLogits", "MaskDraws", "TorchMaskDraws",
           "TensorMaskDraws", "DEFAULT_FORWARD_ROWS"]
