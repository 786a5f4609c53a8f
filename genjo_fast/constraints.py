"""Positional constraints: tokens fixed at chosen positions of the answer (``constraints=``).

The reference's Gradio app lets users pin words at answer positions ("``pos:word, ...``");
``generate(..., constraints={position: token_id or list of ids})`` is that feature for the
sampler (``docs/semantics.md``, "Constraints"). This module is its one home:

* :func:`resolve_constraints` validates the argument and flattens it to one id per position
  (a list of ids occupies consecutive positions, as the app places a word's tokens);
* :func:`place_constraints` writes them into the canvas before the first step.

Placed tokens are not masks, so everything else follows from the samplers' own rules: no step
ever writes them (each step writes masked positions only), they are not in a block's mask count
(the transfer schedule shares out the block's remaining masks), and with classifier-free
guidance they belong to the conditioning (the unconditional copy masks every position that was
not a mask before the first step: the prompt and the constraints), as in the app.
"""
from __future__ import annotations

import numbers
from typing import Mapping, Optional, Tuple

import torch

__all__ = ["resolve_constraints", "place_constraints"]


def _ids_of(position: int, value) -> list:
    """The ids of one entry: an int, a non-empty list/tuple of ints or a 1-D integer tensor."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or value.dtype.is_floating_point or value.dtype.is_complex \
                or value.dtype == torch.bool:
            raise TypeError(f"constraints[{position}] must be an int id, a list of ids or a 1-D "
                            f"integer tensor, got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        value = value.reshape(-1).tolist()
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    elif not isinstance(value, (list, tuple)):
        raise TypeError(f"constraints[{position}] must be an int id or a list of ids, got "
                        f"{type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"constraints[{position}] is an empty list of ids")
    for token in value:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise TypeError(f"constraints[{position}] must hold int ids, got "
                            f"{type(token).__name__} {token!r}")
    return [int(token) for token in value]


def resolve_constraints(constraints: Optional[Mapping], gen_length: int, mask_id: int,
                        vocab_size: Optional[int] = None
                        ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Validates ``constraints`` and flattens it to one id per answer position.

    Args:
        constraints: ``None``, or a mapping ``{position: ids}``: ``position`` an int in
            ``[0, gen_length)``, counted from the first generated position; ``ids`` an int
            token id, or a non-empty list/tuple (or 1-D integer tensor) of ids placed at
            ``position, position + 1, ...`` (a word's tokens, as the reference app places
            them). Positions may not overlap, nor run past the answer.
        gen_length: the number of generated positions.
        mask_id: the mask id, which no constraint may hold (it would be a position to
            generate, not a fixed token).
        vocab_size: when known, every id must lie in ``[0, vocab_size)``.
    Returns:
        ``None`` for ``None`` or an empty mapping; otherwise ``(positions, ids)``, two int64
        CPU tensors ``(n,)``, positions increasing.
    Raises:
        TypeError: not a mapping, a position that is not an int, ids that are not ints.
        ValueError: a position outside the answer, an overlap, an empty list, the mask id,
            an id outside the vocabulary. Every message names ``constraints``.
    """
    if constraints is None:
        return None
    if not isinstance(constraints, Mapping):
        raise TypeError(f"constraints must be a dict {{position: token id or list of ids}}, got "
                        f"{type(constraints).__name__}")
    placed = {}
    for position, value in constraints.items():
        if isinstance(position, bool) or not isinstance(position, numbers.Integral):
            raise TypeError(f"constraints keys must be int answer positions, got "
                            f"{type(position).__name__} {position!r}")
        ids = _ids_of(position, value)
        if position < 0 or position + len(ids) > gen_length:
            span = (f"position {position}" if len(ids) == 1
                    else f"positions {position}..{position + len(ids) - 1}")
            raise ValueError(f"constraints[{position}] covers {span}, outside the answer "
                             f"[0, gen_length={gen_length})")
        for offset, token in enumerate(ids):
            where = position + offset
            if where in placed:
                raise ValueError(f"constraints overlap at answer position {where}: "
                                 f"{placed[where][1]} and {token}")
            if token == mask_id:
                raise ValueError(f"constraints[{position}] holds mask_id={mask_id}: a "
                                 f"constraint must be a real token")
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                raise ValueError(f"constraints[{position}] holds id {token}, outside the model "
                                 f"vocabulary [0, {vocab_size})")
            placed[where] = (position, token)
    if not placed:
        return None
    positions = sorted(placed)
    return (torch.tensor(positions, dtype=torch.long),
            torch.tensor([placed[p][1] for p in positions], dtype=torch.long))


def place_constraints(x: torch.Tensor, answer_start: int,
                      resolved: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Writes the constrained ids into every row of the canvas, in place.

    Args:
        x: int64 ``(B, L)``, the canvas (prompt then masks).
        answer_start: the canvas position of answer position 0 (the prompt length).
        resolved: :func:`resolve_constraints`'s result (``None``: nothing to place).
    """
    if resolved is None:
        return
    positions, ids = resolved
    x[:, answer_start + positions.to(x.device)] = ids.to(x.device)
