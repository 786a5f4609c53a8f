"""Checks at the public boundary: bad input fails here with an error naming the argument."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

REMASKING_MODES = ("low_confidence", "random")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0 <= value < float("inf"):  # also rejects NaN
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


def check_token_tensor(name: str, value, dims: int, shape: str) -> None:
    """``value`` must be an integer tensor of token ids with ``dims`` dimensions (``shape``
    describes them in messages, e.g. ``"(batch, prompt_length)"``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != dims:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {value.dtype}")
    if value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (it holds no data); pass real token ids")


def check_generate_args(prompt, attention_mask, steps, gen_length, block_length, temperature,
                        cfg_scale, remasking, mask_id, token_ids: dict, *,
                        divisible: bool = True) -> None:
    """Validates the arguments of ``generate`` that do not need the model.

    ``token_ids`` maps argument names (``eos_id``...) to the special ids in use.
    ``divisible``: ``generate.py``'s requirements that ``block_length`` divide ``gen_length``
    and the number of blocks divide ``steps`` (the reference app's sampler has none).
    """
    check_token_tensor("prompt", prompt, 2, "(batch, prompt_length)")
    if prompt.shape[0] == 0:
        raise ValueError("prompt has an empty batch")
    for name, value in (("steps", steps), ("gen_length", gen_length),
                        ("block_length", block_length)):
        _check_int(name, value, 1)
    for name, value in token_ids.items():
        _check_int(name, value, 0)
    _check_int("mask_id", mask_id, 0)
    _check_float("temperature", temperature)
    _check_float("cfg_scale", cfg_scale)
    if remasking not in REMASKING_MODES:
        raise ValueError(f"remasking must be one of {REMASKING_MODES}, got {remasking!r}")
    if divisible and gen_length % block_length != 0:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of "
                         f"block_length ({block_length})")
    num_blocks = gen_length // block_length
    if divisible and steps % num_blocks != 0:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks "
                         f"gen_length // block_length = {num_blocks}")

    real = torch.ones_like(prompt, dtype=torch.bool)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError("attention_mask must be a torch.Tensor or None, got "
                            f"{type(attention_mask).__name__}")
        if attention_mask.shape != prompt.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal the "
                             f"prompt shape {tuple(prompt.shape)}")
        if attention_mask.device != prompt.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but prompt is on "
                             f"{prompt.device}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
        real = attention_mask.bool()
    if bool((prompt == mask_id).any()):
        where = "real tokens" if bool(((prompt == mask_id) & real).any()) else "padding"
        raise ValueError(f"prompt contains mask_id={mask_id} in its {where}: the mask id marks "
                         "positions to generate; pad with another id (e.g. EOS)")


def check_positions(positions, shape) -> None:
    """``generate``'s ``positions``: ``None``, or an integer tensor of ``shape`` (the canvas,
    ``(batch, prompt_length + gen_length)``) holding positions ``>= 0``."""
    if positions is None:
        return
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor or None, got "
                        f"{type(positions).__name__}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex \
            or positions.dtype == torch.bool:
        raise TypeError(f"positions must hold integer positions, got dtype {positions.dtype}")
    if tuple(positions.shape) != tuple(shape):
        raise ValueError(f"positions must have the canvas' shape (batch, prompt_length + "
                         f"gen_length) = {tuple(shape)}, got {tuple(positions.shape)}")
    if positions.numel() and int(positions.min()) < 0:
        raise ValueError(f"positions must be >= 0, got {int(positions.min())}")


def check_vocab_size(vocab_size: Optional[int], mask_id: int, token_ids: dict,
                     source: str, prompt: Optional[torch.Tensor] = None,
                     prompt_name: str = "prompt") -> None:
    """Every special id in use, and every prompt token when ``prompt`` is given, must be a
    valid index into the model's vocabulary (an embedding lookup would fail obscurely, or
    with a device-side assert on CUDA)."""
    if vocab_size is None:
        return
    for name, value in {"mask_id": mask_id, **token_ids}.items():
        if value >= vocab_size:
            raise ValueError(f"{name}={value} is outside the model vocabulary "
                             f"({source} = {vocab_size})")
    if prompt is not None and prompt.numel() and not (
            0 <= int(prompt.min()) and int(prompt.max()) < vocab_size):
        raise ValueError(f"{prompt_name} holds token ids outside the model vocabulary "
                         f"[0, {vocab_size}) "
                         f"({source}): min {int(prompt.min())}, max {int(prompt.max())}")


def check_generator(generator, device: torch.device) -> None:
    """A ``torch.Generator`` on the device the sampler draws on (the model's), or ``None``."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model runs on {device}: "
                         f"create it with torch.Generator(device={str(device)!r})")


def check_approximate_args(cache, refresh_every, threshold, factor) -> None:
    """Validates the opt-in approximate modes of ``generate``."""
    if cache not in (None, "prefix", "dual"):
        raise ValueError(f"cache must be None, 'prefix' or 'dual', got {cache!r}")
    if refresh_every is not None:
        _check_int("refresh_every", refresh_every, 1)
        if cache is None:
            raise ValueError("refresh_every needs a cache ('prefix' or 'dual')")
    if threshold is not None and factor is not None:
        raise ValueError("threshold and factor are exclusive: give one of them")
    for name, value in (("threshold", threshold), ("factor", factor)):
        if value is not None:
            _check_float(name, value)
    # Values at which no position but the most confident one could ever pass would run one
    # token per step while ignoring ``steps``: refuse them.
    if threshold is not None and threshold > 1:
        raise ValueError(f"threshold must be in [0, 1] (a probability; above 1 only the most "
                         f"confident position passes), got {threshold}")
    if factor is not None and factor == 0:
        raise ValueError("factor must be > 0 (at 0 no position but the most confident one "
                         "passes), got 0")


def check_model_not_meta(model) -> None:
    """The model's parameters may not live on the meta device (they hold no data: every step
    would fail deep inside with an obscure error)."""
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            if param.device.type == "meta":
                raise ValueError("the model's parameters are on the meta device (no weights "
                                 "loaded): load them first, e.g. model.to_empty(device=...) "
                                 "and load_state_dict, or genjo_fast.models.load_llada")
            break


def check_cuda_graph_args(model, device: torch.device, draws) -> None:
    """``cuda_graph=True`` captures genjo_fast's own model on CUDA with in-graph randomness."""
    from .models import LLaDAModel

    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {device}")
    if not isinstance(model, LLaDAModel):
        raise ValueError("cuda_graph=True needs a LLaDA model (genjo_fast.models.LLaDAModel or a "
                         f"reference model with model_type 'llada'), got {type(model).__name__}")
    if draws is not None:
        raise ValueError("cuda_graph=True cannot replay injected draws; pass draws=None")


def check_variant_args(sampler: str, samplers: tuple, *, adaptive_length: bool,
                       stop_at_eos: bool, cache, threshold, factor, cuda_graph: bool,
                       logits_eos_inf: bool, confidence_eos_eot_inf: bool) -> None:
    """``generate``'s ``sampler`` and what combines with it and with ``adaptive_length``: the
    reference app's sampler has none of ``generate.py``'s EOS options and no approximate mode;
    ``adaptive_length`` runs on the exact schedule (no cache, parallel decoding or CUDA graph)
    and reads the EOS probability, which ``logits_eos_inf`` removes; ``stop_at_eos`` (which
    drops finished rows from the batch) runs with neither."""
    if sampler not in samplers:
        raise ValueError(f"sampler must be one of {samplers}, got {sampler!r}")
    approximate = {"cache": cache is not None, "threshold": threshold is not None,
                   "factor": factor is not None, "cuda_graph": bool(cuda_graph)}
    if sampler == "app":
        for name, used in (("logits_eos_inf", logits_eos_inf),
                           ("confidence_eos_eot_inf", confidence_eos_eot_inf),
                           ("adaptive_length", adaptive_length),
                           ("stop_at_eos", stop_at_eos), *approximate.items()):
            if used:
                raise ValueError(f"sampler='app' (the reference app's sampler) does not take "
                                 f"{name}; use the default sampler='generate'")
    if adaptive_length:
        for name, used in (("logits_eos_inf", logits_eos_inf), ("stop_at_eos", stop_at_eos),
                           *approximate.items()):
            if used:
                raise ValueError(f"adaptive_length=True does not combine with {name}"
                                 + (" (it forbids the EOS that ends the answer)"
                                    if name == "logits_eos_inf" else ""))
