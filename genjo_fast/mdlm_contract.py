"""The masked-LM family's contract: what its fast path and its plain statement share.

The family: encoder masked LMs trained with the MDLM objective (a ModernBERT, BERT or RoBERTa
``*ForMaskedLM``) and autoregressive LMs adapted to diffusion (DiffuGPT: GPT-2 weights run with
full attention, the prediction for position ``i`` read at ``i - 1``). The semantics are
stated in ``docs/semantics.md`` ("Masked LMs"); this module is the one home of the pieces that
:mod:`genjo_fast.mdlm` (fast path) and :mod:`genjo_fast.reference_mdlm` (statement) both use,
so that neither imports the other:

* the schedules (:func:`unmask_probability`, :func:`edit_probability`, :func:`num_to_unmask`);
* which positions a step may touch (:func:`open_positions`, :func:`visible_positions`);
* the random numbers (:class:`MDLMDraws`, :class:`TorchMDLMDraws`, :class:`TensorMDLMDraws`),
  indexed by global step, batch row and position so that both sides can be handed the same;
* how the model is called (:func:`model_call_kwargs`).

Nothing here imports transformers.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

#: Seed Diffusion's edit rate at the first step (it decays linearly to 0 over the steps).
EDIT_RATE = 0.1


def unmask_probability(step: int, num_steps: int) -> float:
    """Probability that a position still masked before step ``step`` (0-based) of
    ``num_steps`` is revealed by it: ``(t - s) / t`` with ``t = 1 - step / num_steps`` and
    ``s = 1 - (step + 1) / num_steps``; exactly 1 at the last step. A Python float, compared
    with float32 uniforms."""
    if step >= num_steps - 1:
        return 1.0
    t = 1 - step / num_steps
    s = 1 - (step + 1) / num_steps
    return (t - s) / t


def edit_probability(step: int, num_steps: int) -> float:
    """Probability that a visible generated token is re-sampled at step ``step``:
    ``0.1 * (1 - step / num_steps)`` (Seed Diffusion's edits)."""
    return EDIT_RATE * (1 - step / num_steps)


def num_to_unmask(num_open: torch.Tensor, step: int, num_steps: int) -> torch.Tensor:
    """Confidence variant: positions revealed per row, ``ceil(num_open * p)`` with ``p`` the
    :func:`unmask_probability` (the product in float32), all of them at the last step.

    Args:
        num_open: int64 ``(B,)``, the open positions of each row.
    Returns:
        int64 ``(B,)``.
    """
    if step >= num_steps - 1:
        return num_open
    return (num_open.float() * unmask_probability(step, num_steps)).ceil().long()


def open_positions(x: torch.Tensor, region: torch.Tensor, mask_id: int,
                   pad_id: Optional[int]) -> torch.Tensor:
    """The positions a step may reveal: generated positions (``region``) holding the mask id
    or the pad id (a sampled pad counts as still masked and is sampled again).

    Args: ``x`` int64 ``(B, n)``, ``region`` bool ``(B, n)``. Returns bool ``(B, n)``.
    """
    still = x == mask_id
    if pad_id is not None:
        still |= x == pad_id
    return still & region


def visible_positions(x: torch.Tensor, region: torch.Tensor, mask_id: int, pad_id: Optional[int],
                      eos_id: Optional[int]) -> torch.Tensor:
    """The positions an edit may rewrite: generated positions (``region``) holding a token
    other than the mask, the pad and the EOS ids.

    Args: ``x`` int64 ``(B, n)``, ``region`` bool ``(B, n)``. Returns bool ``(B, n)``.
    """
    visible = region & (x != mask_id)
    for special in (pad_id, eos_id):
        if special is not None:
            visible &= x != special
    return visible


class MDLMDraws(Protocol):
    """The uniform draws of the family's samplers. ``batch_index`` holds the rows' indices in
    the caller's batch (a call on a subset of the rows draws what the full batch would)."""

    def token(self, step: int, batch_index: torch.Tensor, positions: torch.Tensor, vocab: int,
              device: torch.device) -> torch.Tensor:
        """float64 ``U(0, 1)`` ``(R, vocab)`` for the ``R`` (row, position) pairs
        ``(batch_index[r], positions[r])``: one per logit, the Gumbel-max draws of the token
        sample."""
        ...

    def unmask(self, step: int, batch_index: torch.Tensor, start: int, stop: int,
               device: torch.device) -> torch.Tensor:
        """float32 ``U(0, 1)`` ``(len(batch_index), stop - start)``: reveal decisions."""
        ...

    def edit(self, step: int, batch_index: torch.Tensor, start: int, stop: int,
             device: torch.device) -> torch.Tensor:
        """float32 ``U(0, 1)`` ``(len(batch_index), stop - start)``: edit decisions."""
        ...


class TorchMDLMDraws:
    """Fresh draws from ``torch.rand`` with ``generator`` (``None``: the global RNG)."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def token(self, step, batch_index, positions, vocab, device):
        return torch.rand((len(positions), vocab), dtype=torch.float64, device=device,
                          generator=self.generator)

    def unmask(self, step, batch_index, start, stop, device):
        return torch.rand((len(batch_index), stop - start), dtype=torch.float32, device=device,
                          generator=self.generator)

    edit = unmask


class TensorMDLMDraws:
    """Replays precomputed draws, indexed by global step, batch row and position.

    Args:
        token: float64 ``(steps, B, L, V)``.
        unmask: float32 ``(steps, B, L)``.
        edit: float32 ``(steps, B, L)``.
    """

    def __init__(self, token: torch.Tensor, unmask: torch.Tensor, edit: torch.Tensor):
        if token.dtype != torch.float64 or unmask.dtype != torch.float32 or \
                edit.dtype != torch.float32:
            raise TypeError("TensorMDLMDraws takes float64 token draws and float32 unmask and "
                            f"edit draws, got {token.dtype}, {unmask.dtype}, {edit.dtype}")
        self._token, self._unmask, self._edit = token, unmask, edit

    @classmethod
    def random(cls, steps: int, batch: int, length: int, vocab: int,
               generator: Optional[torch.Generator] = None) -> "TensorMDLMDraws":
        """Fresh draws for ``steps`` steps over a ``(batch, length)`` canvas."""
        return cls(torch.rand((steps, batch, length, vocab), dtype=torch.float64,
                              generator=generator),
                   torch.rand((steps, batch, length), generator=generator),
                   torch.rand((steps, batch, length), generator=generator))

    def token(self, step, batch_index, positions, vocab, device):
        return self._token[step, batch_index.cpu(), positions.cpu(), :vocab].to(device)

    def unmask(self, step, batch_index, start, stop, device):
        return self._unmask[step, batch_index.cpu(), start:stop].to(device)

    def edit(self, step, batch_index, start, stop, device):
        return self._edit[step, batch_index.cpu(), start:stop].to(device)


def is_causal_lm(model) -> bool:
    """True for a transformers causal-LM class (``*ForCausalLM``, ``*LMHeadModel``): its
    attention is causal unless the call asks for full attention."""
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def model_call_kwargs(model) -> dict:
    """Keyword arguments of every model call: a causal LM runs with full attention
    (``is_causal=False``, transformers' switch for decoder attention run as an encoder's)."""
    return {"is_causal": False} if is_causal_lm(model) else {}

