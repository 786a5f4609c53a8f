"""Checkpoints for genjo_fast's models and the adapters for upstream models.

* :func:`load_llada` reads a local reference-format directory (``config.json`` plus
  ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
  ``pytorch_model.bin`` with or without an index). Pickled ``.bin`` files are only ever read
  with ``torch.load(weights_only=True)``.
* :func:`save_llada` writes the same format (safetensors, optionally sharded).
* :func:`from_reference` wraps the weights of a reference ``LLaDAModelLM`` that was loaded
  through transformers, sharing its parameter tensors (no copy).
* :func:`load_dream`, :func:`save_dream` and :func:`dream_from_reference` do the same for
  :class:`~genjo_fast.models.dream.DreamModel` (safetensors only: nothing is unpickled).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from .dream import DreamConfig, DreamModel
from .llada import LLaDAConfig, LLaDAModel

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"

# Keys some checkpoints carry that are not weights of the architecture (recomputed RoPE
# frequencies / tables); they are skipped instead of reported as unexpected.
_HARMLESS_KEY = re.compile(r"(^|\.)(rotary_emb\.)?(inv_freq|rope_pos_(sin|cos)|"
                           r"cos_cached|sin_cached)$")


def _model_type(module) -> Optional[str]:
    return getattr(getattr(module, "config", None), "model_type", None)


def is_llada(module) -> bool:
    """True when ``module.config.model_type == "llada"`` (a reference or genjo_fast model)."""
    return _model_type(module) == "llada"


def is_dream(module) -> bool:
    """True when ``module.config.model_type == "Dream"`` (an upstream or genjo_fast model)."""
    return _model_type(module) == "Dream"


# --------------------------------------------------------------------------------------------
# Shape and key checks shared by loading and adapting
# --------------------------------------------------------------------------------------------

def _expected_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_tensor(key: str, found: Tuple[int, ...], expected: Dict[str, Tuple[int, ...]]) -> None:
    if tuple(found) != expected[key]:
        raise ValueError(f"{key}: expected shape {expected[key]}, found {tuple(found)}")


def _check_complete(found: List[str], expected: Dict[str, Tuple[int, ...]], source: str) -> None:
    found = set(found)
    missing = [k for k in expected if k not in found]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} weight(s): {', '.join(missing)}")


def _unexpected_error(keys: List[str], source: str) -> ValueError:
    return ValueError(f"{source} has unexpected weight(s) for this config: {', '.join(keys)}")


def _build_meta(model_class, config):
    """``model_class(config)``'s module tree without allocating weights (they are assigned
    afterwards)."""
    with torch.device("meta"):
        return model_class(config)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _shard_files(directory: Path, index_name: str) -> List[Path]:
    """The distinct files an index's ``weight_map`` names, checked to lie in ``directory``."""
    with open(directory / index_name) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{directory / index_name} has no weight_map")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if Path(name).name != name:  # no sub-paths: an index must not point elsewhere
            raise ValueError(f"{index_name} names a file outside the checkpoint: {name!r}")
        files.append(directory / name)
    return files


def _weight_files(directory: Path, allow_bin: bool = True) -> Tuple[str, List[Path]]:
    """``("safetensors" | "bin", files)``; safetensors are preferred, as in transformers."""
    if (directory / SAFE_WEIGHTS_NAME).is_file():
        return "safetensors", [directory / SAFE_WEIGHTS_NAME]
    if (directory / SAFE_INDEX_NAME).is_file():
        return "safetensors", _shard_files(directory, SAFE_INDEX_NAME)
    if not allow_bin:
        raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME} in {directory} "
                                "(only safetensors checkpoints are read for this model)")
    if (directory / BIN_WEIGHTS_NAME).is_file():
        return "bin", [directory / BIN_WEIGHTS_NAME]
    if (directory / BIN_INDEX_NAME).is_file():
        return "bin", _shard_files(directory, BIN_INDEX_NAME)
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME}, {SAFE_INDEX_NAME}, {BIN_WEIGHTS_NAME} or "
                            f"{BIN_INDEX_NAME} in {directory}")


def _read_safetensors(file: Path, expected) -> Iterator[Tuple[str, Optional[torch.Tensor]]]:
    """Yields ``(key, tensor)``; shapes are checked from the header before reading data.
    Unknown keys are yielded with ``None`` (their data is never read)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        for key in f.keys():
            if key not in expected:
                yield key, None
                continue
            _check_tensor(key, f.get_slice(key).get_shape(), expected)
            yield key, f.get_tensor(key)


def _read_bin(file: Path, expected) -> Iterator[Tuple[str, Optional[torch.Tensor]]]:
    """Yields ``(key, tensor)`` of a pickled state dict, read with ``weights_only=True`` only
    (plain tensors and containers; arbitrary objects are refused by torch.load)."""
    try:  # memory-mapped: tensors are paged in as they are cast and moved
        state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{file} does not hold a state dict (found {type(state).__name__})")
    for key, tensor in state.items():
        if key not in expected:
            yield key, None
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{file}: {key} is a {type(tensor).__name__}, not a tensor")
        _check_tensor(key, tensor.shape, expected)
        yield key, tensor


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16), "
                        f"got {dtype!r}")


def _load(directory: Path, model, dtype: torch.dtype, device, allow_bin: bool,
          ignored: Tuple[str, ...] = ()):
    """Reads every tensor of the checkpoint in ``directory`` into the meta-built ``model``
    (cast to ``dtype``, moved to ``device``, one at a time), checking names and shapes.
    Keys in ``ignored`` are skipped, as are recomputed RoPE tables."""
    expected = _expected_shapes(model)
    kind, files = _weight_files(directory, allow_bin)
    read = _read_safetensors if kind == "safetensors" else _read_bin

    tensors: Dict[str, torch.Tensor] = {}
    unexpected: List[str] = []
    for file in files:
        for key, tensor in read(file, expected):
            if tensor is None:
                if not _HARMLESS_KEY.search(key) and key not in ignored:
                    unexpected.append(key)
                continue
            tensors[key] = tensor.to(device=device, dtype=dtype)
    if unexpected:
        raise _unexpected_error(unexpected, str(directory))
    _check_complete(list(tensors), expected, str(directory))
    model.load_state_dict(tensors, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def _read_config(directory: Path) -> dict:
    with open(directory / CONFIG_NAME) as f:
        return json.load(f)


def load_llada(path: PathLike, dtype: torch.dtype = torch.bfloat16,
               device: Union[str, torch.device] = "cpu") -> LLaDAModel:
    """Loads a reference-format LLaDA checkpoint directory into a :class:`LLaDAModel`.

    The model is built on the meta device and every tensor is read once, cast to ``dtype``
    and moved to ``device`` one at a time (peak extra memory: one tensor).

    Args:
        path: local directory with ``config.json`` and the weights.
        dtype: parameter dtype (bfloat16 like the reference's inference setup).
        device: where the parameters go.
    Returns:
        The model in eval mode with ``requires_grad`` off.
    Raises:
        ValueError: a weight is missing, unexpected, or misshapen (the message names the key,
            and for shapes the expected and the found shape).
        NotImplementedError: the config uses a flag this implementation does not support.
        FileNotFoundError: no config or weights in ``path``.
    """
    _check_dtype(dtype)
    directory = Path(path)
    config = LLaDAConfig.from_dict(_read_config(directory))
    return _load(directory, _build_meta(LLaDAModel, config), dtype, device, allow_bin=True)


def load_dream(path: PathLike, dtype: torch.dtype = torch.bfloat16,
               device: Union[str, torch.device] = "cpu") -> DreamModel:
    """Loads an upstream-format Dream checkpoint directory into a :class:`DreamModel`.

    Reads ``config.json`` and ``model.safetensors`` or sharded safetensors with a
    ``model.safetensors.index.json`` (no pickled files: nothing is unpickled). The model is
    built on the meta device and every tensor is read once, cast to ``dtype`` and moved to
    ``device`` one at a time (peak extra memory: one tensor). With ``tie_word_embeddings``, an
    ``lm_head.weight`` in the files is ignored (the head is the embedding, as upstream ties it).

    Args:
        path: local directory with ``config.json`` and the weights.
        dtype: parameter dtype (upstream runs Dream in bfloat16).
        device: where the parameters go.
    Returns:
        The model in eval mode with ``requires_grad`` off.
    Raises:
        ValueError: a weight is missing, unexpected, or misshapen (the message names the key,
            and for shapes the expected and the found shape).
        NotImplementedError: the config uses a flag this implementation does not support.
        FileNotFoundError: no config or no safetensors weights in ``path``.
    """
    _check_dtype(dtype)
    directory = Path(path)
    config = DreamConfig.from_dict(_read_config(directory))
    ignored = ("lm_head.weight",) if config.tie_word_embeddings else ()
    return _load(directory, _build_meta(DreamModel, config), dtype, device, allow_bin=False,
                 ignored=ignored)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def _shards(state: Dict[str, torch.Tensor], max_bytes: Optional[int]) -> List[List[str]]:
    """Keys grouped in order into shards of at most ``max_bytes`` (a larger tensor alone)."""
    if max_bytes is None:
        return [list(state)]
    shards: List[List[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _save(model: nn.Module, path: PathLike, max_shard_bytes: Optional[int]) -> None:
    """Writes ``config.json`` (``model.config.to_dict()`` plus ``torch_dtype``) and the state
    dict as safetensors (sharded with an index when ``max_shard_bytes`` is given)."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in directory.iterdir()
             if p.name in (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, BIN_WEIGHTS_NAME, BIN_INDEX_NAME)
             or re.fullmatch(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)", p.name)]
    if stale:
        raise FileExistsError(f"{directory} already holds weights: {', '.join(sorted(stale))}")

    config = model.config.to_dict()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    with open(directory / CONFIG_NAME, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    state = model.state_dict()
    shards = _shards(state, max_shard_bytes)
    names = ([SAFE_WEIGHTS_NAME] if max_shard_bytes is None else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, keys in zip(names, shards):
        # One shard at a time on the host, so a GPU model never needs a full host copy.
        save_file({k: state[k].detach().to("cpu").contiguous() for k in keys},
                  str(directory / name), metadata={"format": "pt"})
    if max_shard_bytes is not None:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: name for name, keys in zip(names, shards) for k in keys},
        }
        with open(directory / SAFE_INDEX_NAME, "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")


def save_llada(model: LLaDAModel, path: PathLike, max_shard_bytes: Optional[int] = None) -> None:
    """Writes ``model`` as a reference-format checkpoint directory.

    Files: ``config.json`` (reference field names, ``model_type`` ``"llada"``, architectures
    ``["LLaDAModelLM"]``, ``torch_dtype``) and ``model.safetensors``, or, when
    ``max_shard_bytes`` is given, ``model-0000i-of-0000n.safetensors`` shards with a
    ``model.safetensors.index.json``. The directory must not already hold weights (a stale
    file could be picked up instead of the new ones).

    The config has no ``auto_map``: loading it with transformers' ``trust_remote_code`` needs
    the reference's code files copied next to it.
    """
    _save(model, path, max_shard_bytes)


def save_dream(model: DreamModel, path: PathLike, max_shard_bytes: Optional[int] = None) -> None:
    """Writes ``model`` as an upstream-format Dream checkpoint directory.

    Files: ``config.json`` (upstream field names, ``model_type`` ``"Dream"``, architectures
    ``["DreamModel"]``, ``torch_dtype``) and ``model.safetensors``, or, when
    ``max_shard_bytes`` is given, ``model-0000i-of-0000n.safetensors`` shards with a
    ``model.safetensors.index.json``. A tied model writes no ``lm_head.weight``. The directory
    must not already hold weights. The config has no ``auto_map``: loading it with
    transformers' ``trust_remote_code`` needs upstream's code files copied next to it.
    """
    _save(model, path, max_shard_bytes)


# --------------------------------------------------------------------------------------------
# Adapter for a transformers-loaded reference model
# --------------------------------------------------------------------------------------------

def _config_dict(config) -> dict:
    to_dict = getattr(config, "to_dict", None)
    values = dict(to_dict() if callable(to_dict) else vars(config))
    values.setdefault("model_type", getattr(config, "model_type", None))
    return values


def from_reference(module: nn.Module) -> LLaDAModel:
    """A :class:`LLaDAModel` whose parameters ARE ``module``'s (same ``nn.Parameter`` objects,
    same storage: no extra weight memory).

    Args:
        module: the reference ``LLaDAModelLM`` as loaded through transformers
            (``config.model_type == "llada"``, parameters named ``model.transformer...``), or
            its inner model (parameters named ``transformer...``).
    Returns:
        The adapted model in eval mode, on ``module``'s device and dtype. Changing one
        model's weights in place changes the other's.
    Raises:
        ValueError: not a LLaDA module, parameters missing/unexpected/misshapen, or spread
            over several devices or dtypes (e.g. a ``device_map`` with offloading).
        NotImplementedError: the config uses a flag this implementation does not support.
    """
    if not is_llada(module):
        raise ValueError("not a LLaDA model: module.config.model_type is "
                         f"{getattr(getattr(module, 'config', None), 'model_type', None)!r}")
    config = LLaDAConfig.from_dict(_config_dict(module.config))
    params = dict(module.named_parameters(remove_duplicate=False))
    if params and all(name.startswith("transformer.") for name in params):
        params = {"model." + name: p for name, p in params.items()}

    return _share(params, _build_meta(LLaDAModel, config), type(module).__name__)


def _share(params: Dict[str, nn.Parameter], model, source: str):
    """Registers ``params`` (upstream key -> Parameter) as the parameters of the meta-built
    ``model``, after checking names, shapes and placement."""
    expected = _expected_shapes(model)
    unexpected = [k for k in params if k not in expected]
    if unexpected:
        raise _unexpected_error(unexpected, source)
    _check_complete(list(params), expected, source)
    placements = {(p.device, p.dtype) for p in params.values()}
    if len(placements) != 1 or next(iter(placements))[0].type == "meta":
        raise ValueError("the reference's parameters must all be materialised on one device "
                         f"with one dtype; found {sorted(map(str, placements))}")
    for key, param in params.items():
        _check_tensor(key, param.shape, expected)
        owner_name, _, leaf = key.rpartition(".")
        # Registering the very Parameter object shares storage and leaves its flags alone.
        setattr(model.get_submodule(owner_name), leaf, param)
    return model.eval()


def dream_from_reference(module: nn.Module) -> DreamModel:
    """A :class:`DreamModel` whose parameters ARE ``module``'s (same ``nn.Parameter`` objects,
    same storage: no extra weight memory).

    Args:
        module: upstream's ``DreamModel`` as loaded through transformers
            (``config.model_type == "Dream"``, parameters named ``model.embed_tokens.weight``,
            ``model.layers...``, ``model.norm.weight``, ``lm_head.weight``), or any module
            with those names and config (:class:`genjo_fast.testing.UpstreamShapedDream`).
    Returns:
        The adapted model in eval mode, on ``module``'s device and dtype. Changing one
        model's weights in place changes the other's.
    Raises:
        ValueError: not a Dream module, parameters missing/unexpected/misshapen, a
            ``tie_word_embeddings`` model whose ``lm_head.weight`` is not its embedding, or
            parameters spread over several devices or dtypes.
        NotImplementedError: the config uses a flag this implementation does not support.
    """
    if not is_dream(module):
        raise ValueError(f"not a Dream model: module.config.model_type is "
                         f"{_model_type(module)!r}")
    config = DreamConfig.from_dict(_config_dict(module.config))
    params = dict(module.named_parameters(remove_duplicate=False))
    if config.tie_word_embeddings and "lm_head.weight" in params:
        head, embedding = params.pop("lm_head.weight"), params.get("model.embed_tokens.weight")
        if embedding is None or head.data_ptr() != embedding.data_ptr():
            raise ValueError("tie_word_embeddings is set but lm_head.weight is not the "
                             "embedding matrix (model.embed_tokens.weight)")
    return _share(params, _build_meta(DreamModel, config), type(module).__name__)


__all__ = ["load_llada", "save_llada", "from_reference", "is_llada", "load_dream", "save_dream",
           "dream_from_reference", "is_dream"]
