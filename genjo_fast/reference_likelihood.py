"""Plain-PyTorch statement of the reference Monte Carlo log-likelihood: the test oracle.

It follows the reference Monte Carlo log-likelihood as ``docs/semantics.md`` states it, step
by step, with no attempt at speed: every round runs the model over ``batch_size`` full copies
of ``prompt + answer``, builds the full ``(B, L, V)`` logits
(twice with classifier-free guidance) and takes the cross-entropy of the masked positions.

The random draws of a round are the reference's: ``k ~ U{1..T}`` (``torch.randint``), then one
``torch.randperm(T)`` per row, in that order. They come from a :class:`MaskDraws` source, so a
test can hand this oracle and :mod:`genjo_fast.likelihood` the same draws.
:class:`TorchMaskDraws` with the global RNG consumes the CPU RNG exactly as the reference
harness does on CPU.

This module also holds the pieces of the statement that the fast estimator shares: the draw
sources, the stratified mask counts and the argument checks.
"""
from __future__ import annotations

from typing import Optional, Protocol, Tuple

import torch
import torch.nn.functional as F

from .contract import MASK_ID, model_device, model_logits
from .validation import _check_float, _check_int, check_token_tensor

# --------------------------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------------------------


class MaskDraws(Protocol):
    """What one Monte Carlo round needs: the offset ``k`` and one permutation per row."""

    def draw(self, round: int, length: int, rows: int) -> Tuple[int, torch.Tensor]:
        """Returns ``k`` (an int in ``1..length``) and int64 CPU ``(rows, length)``: row ``j``
        a permutation of ``0 .. length-1``. Row ``j`` then masks answer position ``i`` iff
        ``perms[j, i] < counts[j]`` (see :func:`mask_counts`), which is how the reference
        shuffles its "first ``count`` positions" mask."""
        ...


class TorchMaskDraws:
    """Fresh draws in the reference's order: ``torch.randint(1, length + 1, ())``, then
    ``rows`` calls of ``torch.randperm(length)``.

    Args:
        generator: a CPU ``torch.Generator``, or ``None`` for the global RNG (what the
            reference uses).
    """

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def draw(self, round: int, length: int, rows: int) -> Tuple[int, torch.Tensor]:
        k = int(torch.randint(1, length + 1, (), generator=self.generator))
        perms = torch.stack([torch.randperm(length, generator=self.generator)
                             for _ in range(rows)])
        return k, perms


class TensorMaskDraws:
    """Replays precomputed draws, indexed by round.

    Args:
        k: int ``(rounds,)``, each in ``1..T``.
        perms: int ``(rounds, batch_size, T)``, each row a permutation of ``0 .. T-1``.
    """

    def __init__(self, k: torch.Tensor, perms: torch.Tensor):
        if k.dim() != 1 or perms.dim() != 3 or perms.shape[0] != k.shape[0]:
            raise ValueError(f"TensorMaskDraws needs k (rounds,) and perms (rounds, batch_size, "
                             f"T); got {tuple(k.shape)} and {tuple(perms.shape)}")
        self.k = k.to("cpu", torch.long)
        self.perms = perms.to("cpu", torch.long)

    @classmethod
    def sample(cls, rounds: int, length: int, rows: int,
               generator: Optional[torch.Generator] = None) -> "TensorMaskDraws":
        """Draws ``rounds`` rounds from :class:`TorchMaskDraws` and keeps them for replay."""
        source = TorchMaskDraws(generator)
        k, perms = zip(*(source.draw(r, length, rows) for r in range(rounds)))
        return cls(torch.tensor(k), torch.stack(perms))

    def draw(self, round: int, length: int, rows: int) -> Tuple[int, torch.Tensor]:
        if round >= self.k.shape[0] or self.perms.shape[1:] != (rows, length):
            raise ValueError(f"TensorMaskDraws holds {self.k.shape[0]} rounds of "
                             f"{tuple(self.perms.shape[1:])} permutations; round {round} of "
                             f"({rows}, {length}) was asked for")
        return int(self.k[round]), self.perms[round]


def mask_counts(k: int, length: int, rows: int) -> torch.Tensor:
    """The reference's stratified mask counts of one round.

    ``round(linspace(k, k + (rows - 1) * length / rows, rows))`` wrapped into ``1..length`` by
    ``((x - 1) % length) + 1``; the end point is a float32 tensor and the rounding is half to
    even, as in the reference.

    Returns:
        int64 CPU ``(rows,)``, each in ``1..length``.
    """
    end = torch.tensor(k) + (rows - 1) * (length / rows)
    x = torch.round(torch.linspace(float(k), end, steps=rows)).long()
    return ((x - 1) % length) + 1


# --------------------------------------------------------------------------------------------
# Argument checks (shared with genjo_fast.likelihood)
# --------------------------------------------------------------------------------------------


def check_estimator_args(mc_num, batch_size, cfg_scale, mask_id) -> None:
    """``mc_num`` and ``batch_size`` positive ints with ``mc_num % batch_size == 0``,
    ``cfg_scale >= 0``, ``mask_id >= 0``."""
    _check_int("mc_num", mc_num, 1)
    _check_int("batch_size", batch_size, 1)
    if mc_num % batch_size:
        raise ValueError(f"mc_num ({mc_num}) must be a multiple of batch_size ({batch_size})")
    _check_float("cfg_scale", cfg_scale)
    _check_int("mask_id", mask_id, 0)


def check_pair(prompt, answer, mask_id: int, where: str = "") -> None:
    """``prompt`` (possibly empty) and ``answer`` (non-empty): 1-D integer tensors without
    ``mask_id``. ``where`` (e.g. ``" of pair 3"``) is appended to the argument names."""
    for name, value in (("prompt", prompt), ("answer", answer)):
        check_token_tensor(f"{name}{where}", value, 1, "(length,)")
        if bool((value == mask_id).any()):
            raise ValueError(f"{name}{where} contains mask_id={mask_id}: the mask id marks "
                             "positions to predict and cannot be scored or conditioned on")
    if answer.numel() == 0:
        raise ValueError(f"answer{where} is empty: there is nothing to score")


# --------------------------------------------------------------------------------------------
# The statement
# --------------------------------------------------------------------------------------------


def forward_process(seq: torch.Tensor, prompt_len: int, mask_id: int, k: int,
                    perms: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masks the answer part of ``seq`` for one round.

    Args:
        seq: int64 ``(b, L)``, identical rows ``prompt + answer``.
        prompt_len: ``Lp``; the answer is ``seq[:, Lp:]`` of length ``T = L - Lp``.
        k, perms: the round's draws (see :class:`MaskDraws`).
    Returns:
        ``noisy`` int64 ``(b, L)`` (masked answer positions set to ``mask_id``) and ``p_mask``
        float32 ``(b, L)``: each row's mask ratio ``count / T``, repeated over positions.
    """
    b, length = seq.shape
    target_len = length - prompt_len
    counts = mask_counts(k, target_len, b).to(seq.device)
    is_mask = perms.to(seq.device) < counts[:, None]
    is_mask = torch.cat([torch.zeros(b, prompt_len, dtype=torch.bool, device=seq.device),
                         is_mask], dim=1)
    noisy = torch.where(is_mask, mask_id, seq)
    return noisy, (counts / target_len).unsqueeze(1).repeat(1, length)


def get_logits(model, batch: torch.Tensor, prompt_index: torch.Tensor, cfg_scale: float,
               mask_id: int) -> torch.Tensor:
    """Full logits ``(b, L, V)``; with CFG ``un + (cfg_scale + 1) * (cond - un)`` where the
    unconditional copy has every prompt position (``prompt_index``, bool ``(L,)``) masked."""
    if cfg_scale > 0.:
        un_batch = batch.clone()
        un_batch[:, prompt_index] = mask_id
        logits = model_logits(model, torch.cat([batch, un_batch]), None)
        logits, un_logits = torch.chunk(logits, 2, dim=0)
        return un_logits + (cfg_scale + 1) * (logits - un_logits)
    return model_logits(model, batch, None)


@torch.no_grad()
def get_log_likelihood(model, prompt: torch.Tensor, answer: torch.Tensor, mc_num: int = 128,
                       batch_size: int = 16, cfg_scale: float = 0., mask_id: int = MASK_ID, *,
                       generator: Optional[torch.Generator] = None,
                       draws: Optional[MaskDraws] = None) -> float:
    """Reference Monte Carlo estimate of ``log p(answer | prompt)`` (plain PyTorch, slow).

    Args:
        model: called as ``model(x)`` (no attention mask, as in the reference), returning
            ``.logits`` ``(B, L, V)`` or the tensor itself.
        prompt: int ``(Lp,)`` (may be empty); answer: int ``(T,)``, ``T >= 1``.
        mc_num: Monte Carlo samples, a multiple of ``batch_size``.
        batch_size: rows per round (they share ``k``: stratified mask counts).
        cfg_scale: classifier-free guidance scale (0 disables it).
        mask_id: id of the mask token.
        generator: CPU generator of the default draws; ignored when ``draws`` is given.
        draws: a :class:`MaskDraws` source; default :class:`TorchMaskDraws` (``generator``).
    Returns:
        ``-mean`` over the ``mc_num // batch_size`` rounds of the round's loss: the sum over
        rows and masked positions of ``cross_entropy / (count / T)``, divided by
        ``batch_size``. A Python float.
    """
    check_estimator_args(mc_num, batch_size, cfg_scale, mask_id)
    check_pair(prompt, answer, mask_id)
    draws = draws if draws is not None else TorchMaskDraws(generator)
    device = model_device(model, prompt.device)
    seq = torch.cat([prompt, answer]).long()[None, :].repeat(batch_size, 1).to(device)
    prompt_index = torch.arange(seq.shape[1], device=device) < len(prompt)

    losses = []
    for r in range(mc_num // batch_size):
        k, perms = draws.draw(r, len(answer), batch_size)
        noisy, p_mask = forward_process(seq, len(prompt), mask_id, k, perms)
        mask_index = noisy == mask_id
        logits = get_logits(model, noisy, prompt_index, cfg_scale, mask_id)
        loss = F.cross_entropy(logits[mask_index], seq[mask_index], reduction='none')
        loss = loss / p_mask[mask_index]
        losses.append((loss.sum() / batch_size).item())
    return -sum(losses) / len(losses)


@torch.no_grad()
def is_greedy_continuation(model, prompt: torch.Tensor, answer: torch.Tensor,
                           cfg_scale: float = 0., mask_id: int = MASK_ID) -> bool:
    """The reference harness's "is greedy" check (its ``suffix_greedy_prediction``).

    Start from ``prompt`` followed by ``T`` masks; at each of ``T`` steps take the logits of
    the masked positions, ``x0 = argmax`` over the vocabulary, ``confidence = softmax(logits
    in float32)[x0]``, and unmask only the most confident position (ties: the lowest
    position; the reference's unstable sort leaves this unspecified). True iff the final
    answer tokens equal ``answer``.
    """
    check_pair(prompt, answer, mask_id)
    _check_float("cfg_scale", cfg_scale)
    device = model_device(model, prompt.device)
    prompt, answer = prompt.long().to(device), answer.long().to(device)
    seq = torch.full((1, len(prompt) + len(answer)), mask_id, dtype=torch.long, device=device)
    seq[0, :len(prompt)] = prompt
    prompt_index = torch.arange(seq.shape[1], device=device) < len(prompt)
    for _ in range(len(answer)):
        mask_index = seq == mask_id
        logits = get_logits(model, seq, prompt_index, cfg_scale, mask_id)[mask_index]
        x0 = torch.argmax(logits, dim=-1)
        p = torch.softmax(logits.to(torch.float32), dim=-1)
        confidence = torch.gather(p, -1, x0[:, None]).squeeze(-1)
        best = torch.sort(confidence, descending=True, stable=True).indices[0]
        keep = torch.full_like(x0, mask_id)
        keep[best] = x0[best]
        seq[mask_index] = keep
    return bool((seq[0, len(prompt):] == answer).all())


__all__ = ["MaskDraws", "TorchMaskDraws", "TensorMaskDraws", "mask_counts", "forward_process",
           "get_logits", "get_log_likelihood", "is_greedy_continuation",
           "check_estimator_args", "check_pair"]
