"""Dream's generation settings, resolved as upstream's ``diffusion_generate`` resolves them.

Shared by the plain statement (:mod:`genjo_fast.reference_dream`) and the fast path
(:mod:`genjo_fast.dream`), so that both read a call's options the same way: defaults, then the
model's config (or the given ``generation_config``), then the caller's keywords; the canvas
length from ``max_new_tokens`` or ``max_length``; every value checked with an error naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

import torch

from .contract import DREAM
from .validation import _check_float, _check_int

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")

#: Upstream's ``DreamGenerationConfig`` defaults of the fields :func:`diffusion_generate` reads.
GENERATION_DEFAULTS: Mapping[str, Any] = dict(
    temperature=0.0, top_p=None, top_k=None, max_length=20, max_new_tokens=None, eps=1e-3,
    steps=512, alg="origin", alg_temp=None, num_return_sequences=1,
    return_dict_in_generate=False, output_history=False, mask_token_id=None)


class _Unset:
    """The default of :func:`diffusion_generate`'s setting arguments: "not passed"."""

    def __repr__(self) -> str:
        return "UNSET"


#: Marks a setting the caller did not pass (the config's or the default value applies).
UNSET: Any = _Unset()


@dataclass(frozen=True)
class DreamSettings:
    """The resolved settings of one :func:`diffusion_generate` call (see
    :func:`resolve_settings`)."""
    max_length: int
    steps: int
    eps: float
    alg: str
    alg_temp: Optional[float]
    temperature: float
    top_p: Optional[float]
    top_k: Optional[int]
    mask_token_id: int
    num_return_sequences: int
    output_history: bool
    return_dict_in_generate: bool


@dataclass
class DreamGenerateOutput:
    """Upstream's ``DreamModelOutput``: ``sequences`` int64 ``(B, max_length)``; ``history``
    the canvas after every step (``steps`` tensors like ``sequences``), or ``None`` without
    ``output_history``."""
    sequences: torch.Tensor
    history: Optional[List[torch.Tensor]] = None


def _fields(source, names) -> dict:
    """The entries of ``source`` (a mapping, an object with ``to_dict()``, or with attributes)
    whose names are in ``names``."""
    if source is None:
        return {}
    if not isinstance(source, Mapping):
        to_dict = getattr(source, "to_dict", None)
        source = to_dict() if callable(to_dict) else vars(source)
    return {k: v for k, v in source.items() if k in names}


def resolve_settings(model, input_length: int, generation_config=None,
                     **passed) -> DreamSettings:
    """Combines defaults, the model's or the given generation config, and the caller's
    keyword arguments as upstream's ``diffusion_generate`` does (module docstring).

    Args:
        model: the model (its ``config`` and ``generation_config`` are read, if present).
        input_length: the prompt length ``Lp``.
        generation_config: ``None``, a mapping, or an object with the fields as attributes
            (e.g. upstream's ``DreamGenerationConfig``); missing fields take the defaults.
        passed: the settings the caller passed (names of :data:`GENERATION_DEFAULTS`);
            ``max_length=None`` and ``max_new_tokens=None`` count as not passed.
    Raises:
        TypeError: an unknown setting. ValueError: a bad value, or ``Lp >= max_length``.
    """
    unknown = sorted(set(passed) - set(GENERATION_DEFAULTS))
    if unknown:
        raise TypeError(f"diffusion_generate got unknown setting(s): {', '.join(unknown)}; "
                        f"the settings are {', '.join(sorted(GENERATION_DEFAULTS))}")
    model_config = getattr(model, "config", None)
    values = dict(GENERATION_DEFAULTS)
    if generation_config is None:
        values.update(_fields(model_config, GENERATION_DEFAULTS))
    else:
        values.update(_fields(generation_config, GENERATION_DEFAULTS))
    explicit_max_length = passed.get("max_length") is not None
    values.update({k: v for k, v in passed.items()
                   if not (k in ("max_length", "max_new_tokens") and v is None)})

    if values["mask_token_id"] is None:  # upstream: the model's generation config's
        values["mask_token_id"] = next(
            (m for m in (getattr(getattr(model, "generation_config", None), "mask_token_id",
                                 None), getattr(model_config, "mask_token_id", None))
             if m is not None), DREAM.mask)
    _check_values(values)
    max_length = values["max_length"]
    if values["max_new_tokens"] is not None:
        max_length = values["max_new_tokens"] + input_length
    elif not explicit_max_length and max_length == GENERATION_DEFAULTS["max_length"]:
        max_length = max_length + input_length
        limit = getattr(model_config, "max_position_embeddings", None)
        if limit is not None:
            max_length = min(max_length, limit)
    if not isinstance(max_length, int) or input_length >= max_length:
        raise ValueError(f"the prompt length {input_length} must be smaller than max_length="
                         f"{max_length} (set max_new_tokens, or a larger max_length)")
    return DreamSettings(max_length=max_length, **{
        k: values[k] for k in ("steps", "eps", "alg", "alg_temp", "temperature", "top_p",
                               "top_k", "mask_token_id", "num_return_sequences",
                               "output_history", "return_dict_in_generate")})


def _check_values(values: dict) -> None:
    """Each setting's type and range, with an error naming it (upstream ignores bad values
    until they fail somewhere inside the loop)."""
    if values["alg"] not in ALGS:
        raise ValueError(f"alg must be one of {ALGS}, got {values['alg']!r}")
    for name in ("steps", "num_return_sequences", "mask_token_id"):
        _check_int(name, values[name], 0 if name == "mask_token_id" else 1)
    if values["max_new_tokens"] is not None:
        _check_int("max_new_tokens", values["max_new_tokens"], 1)
    for name in ("temperature", "eps"):
        _check_float(name, values[name])
    if not 0 < values["eps"] < 1:
        raise ValueError(f"eps must be in (0, 1), got {values['eps']}")
    if values["top_p"] is not None:
        _check_float("top_p", values["top_p"])
        if not 0 < values["top_p"] <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {values['top_p']}")
    if values["top_k"] is not None:
        _check_int("top_k", values["top_k"], 1)
    if values["alg_temp"] is not None:
        _check_float("alg_temp", values["alg_temp"])
