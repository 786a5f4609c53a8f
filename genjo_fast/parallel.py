"""Tensor parallelism for genjo_fast's LLaDA and Dream models on ``torch.distributed``.

Megatron's layout, one process per GPU (``torchrun --nproc_per_node N``):

* column-wise (each rank holds a contiguous slice of the OUTPUT features, biases included):
  the q/k/v projections and the MLP's gate and up projections (LLaDA ``q_proj``, ``k_proj``,
  ``v_proj``, ``ff_proj``, ``up_proj``; Dream ``self_attn.{q,k,v}_proj``,
  ``mlp.{gate,up}_proj``). Their rows are head-major, so a rank holds whole heads: query heads
  ``[r H / N, (r + 1) H / N)`` and the key/value heads they are grouped with;
* row-wise (a slice of the INPUT features): the attention output and the MLP's down
  projection (LLaDA ``attn_out``, ``ff_out``; Dream ``self_attn.o_proj``, ``mlp.down_proj``);
  their partial products are summed over the ranks by one ``all_reduce`` each;
* the untied LM head (LLaDA ``model.transformer.ff_out``, Dream ``lm_head``) column-wise over
  the vocabulary, its logits all-gathered (``shard_lm_head=False`` keeps it whole on every
  rank); the embedding, the norms and a tied LM head are replicated.

Two collectives per layer and one per LM-head call; everything else (attention over the
rank's heads, RoPE, norms, residuals, sampling) runs locally. The parallel model is still a
:class:`~genjo_fast.models.LLaDAModel` / :class:`~genjo_fast.models.DreamModel` whose forward
returns the full logits on every rank, so ``generate``, ``diffusion_generate``, the
likelihood and the block cache run on it unchanged, on every rank with the same arguments.
Every rank then makes the same choices: the collectives hand every rank the same bits, and
the random draws are the same (:func:`parallelize` gives every rank rank 0's default RNG
state; a ``generator`` passed to a sampler must be seeded the same on every rank).

The layout is written by hand with ``torch.distributed.all_reduce`` / ``all_gather`` in
forward hooks on plain tensors, not with DTensor's ``parallelize_module``: DTensor gives the
same logits but dispatches every sharded matmul through DTensor (a 2-layer model on CPU with
gloo, 2 ranks, on a busy 2-core machine: 2.2x to 2.9x the time per forward of the layout
here, 32 against 11-15 ms and 63 against 28 ms in two runs), and plain tensors keep the
Triton kernels, CUDA graphs, ``model.dtype`` and ``state_dict()`` as they are. Inference
only: the collectives are not differentiated.

Memory: :func:`load_parallel` reads the checkpoint on every rank through safetensors'
memory map (the pages are shared by the ranks of a node; nothing but the rank's slices is
copied when the file's dtype is the one asked for) and moves only the rank's shards to its
device: per GPU, ``1/N`` of the layers plus the replicated embedding and norms (and the LM
head when it is tied or ``shard_lm_head=False``); the block cache holds ``1/N`` of the
key/value heads.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .models import DreamModel, LLaDAModel, load_dream, load_llada
from .models.loading import PathLike, _read_config

_log = logging.getLogger(__name__)

ParallelModel = Union[LLaDAModel, DreamModel]

# Per family: the layers' path, the per-layer modules split column-wise and row-wise, the
# untied LM head's path, and the config fields that must divide by the world size.
_LAYOUTS = {
    LLaDAModel: dict(
        layers="model.transformer.blocks",
        column=("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj"),
        row=("attn_out", "ff_out"),
        head="model.transformer.ff_out",
        tied="weight_tying",
        sizes=("n_heads", "n_kv_heads", "mlp_hidden_size"),
        vocab="embedding_size"),
    DreamModel: dict(
        layers="model.layers",
        column=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                "mlp.up_proj"),
        row=("self_attn.o_proj", "mlp.down_proj"),
        head="lm_head",
        tied="tie_word_embeddings",
        sizes=("num_attention_heads", "num_key_value_heads", "intermediate_size"),
        vocab="vocab_size"),
}


@dataclass(frozen=True)
class TensorParallel:
    """How a model was parallelised (``model.tensor_parallel``).

    Attributes:
        group: the process group the collectives run on. rank: this process's rank in it.
        world: the group's size. shard_lm_head: whether the LM head is split over the
            vocabulary (its logits all-gathered) rather than replicated.
    """
    group: Any
    rank: int
    world: int
    shard_lm_head: bool


def _layout(model) -> dict:
    for cls, layout in _LAYOUTS.items():
        if isinstance(model, cls):
            return layout
    raise TypeError(f"model must be genjo_fast's LLaDAModel or DreamModel, got "
                    f"{type(model).__name__} (a transformers-loaded reference model: adapt it "
                    "with genjo_fast.models.from_reference or dream_from_reference first)")


def _resolve_group(group):
    """The process group of ``group``: ``None`` (the default group), a ``ProcessGroup`` or a
    one-dimensional ``DeviceMesh``."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tensor parallelism needs torch.distributed initialised: launch with "
                           "torchrun and call genjo_fast.parallel.init_distributed() (or "
                           "torch.distributed.init_process_group) first")
    if group is None:
        return dist.group.WORLD
    get_group = getattr(group, "get_group", None)  # a DeviceMesh
    if callable(get_group):
        if group.ndim != 1:
            raise ValueError(f"group: a DeviceMesh must be one-dimensional, got {group.ndim} "
                             "dimensions")
        return get_group()
    return group


def shard_plan(model: ParallelModel, shard_lm_head: bool = True) -> Dict[str, int]:
    """The modules :func:`parallelize` splits and how: module name -> dimension of its weight
    that is split (``0``: column-wise, the output features, with the bias; ``1``: row-wise,
    the input features). Modules not listed are replicated.

    Args:
        model: a (not yet parallelised) LLaDA or Dream model.
        shard_lm_head: include the untied LM head (split over the vocabulary).
    """
    layout = _layout(model)
    plan = {}
    for i in range(len(model.get_submodule(layout["layers"]))):
        prefix = f"{layout['layers']}.{i}."
        plan.update({prefix + name: 0 for name in layout["column"]})
        plan.update({prefix + name: 1 for name in layout["row"]})
    if shard_lm_head and not getattr(model.config, layout["tied"]):
        plan[layout["head"]] = 0
    return plan


def check_world_size(model: ParallelModel, world: int, shard_lm_head: bool = True) -> None:
    """Raises ValueError unless ``world`` ranks split ``model`` evenly: query heads, key/value
    heads and the MLP width (and the vocabulary when the LM head is split) must be multiples
    of ``world``. The message names the config field."""
    layout = _layout(model)
    fields = list(layout["sizes"])
    if shard_lm_head and not getattr(model.config, layout["tied"]):
        fields.append(layout["vocab"])
    for field in fields:
        value = getattr(model.config, field)
        if value % world:
            hint = (" (or keep the LM head whole: shard_lm_head=False)"
                    if field == layout["vocab"] else "")
            raise ValueError(f"tensor parallelism over {world} ranks splits {field}={value}, "
                             f"which is not a multiple of {world}: use a world size dividing "
                             f"{', '.join(f'{f}={getattr(model.config, f)}' for f in fields)}"
                             f"{hint}")


def splits_lm_head(model: ParallelModel, world: int) -> bool:
    """Whether ``world`` ranks can split ``model``'s LM head over the vocabulary: it is untied
    and the vocabulary is a multiple of ``world`` (else pass ``shard_lm_head=False``)."""
    layout = _layout(model)
    config = model.config
    return not getattr(config, layout["tied"]) and getattr(config, layout["vocab"]) % world == 0


def _shard(tensor: torch.Tensor, dim: int, rank: int, world: int,
           device: Optional[torch.device]) -> nn.Parameter:
    """This rank's contiguous slice of ``tensor`` along ``dim``, as a new (contiguous,
    frozen) parameter on ``device``, so the full tensor can be freed."""
    size = tensor.shape[dim] // world
    piece = tensor.narrow(dim, rank * size, size)
    out = torch.empty(piece.shape, dtype=piece.dtype, device=device or tensor.device)
    return nn.Parameter(out.copy_(piece), requires_grad=False)


def _all_reduce(group, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a row-wise module: the sum of the ranks' partial products."""
    dist.all_reduce(output, group=group)
    return output


def _all_gather_last(group, world: int, module: nn.Module, args,
                     output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the vocabulary-split LM head: ``(..., V / N)`` -> ``(..., V)``."""
    parts = [torch.empty_like(output) for _ in range(world)]
    dist.all_gather(parts, output.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def parallelize(model: ParallelModel, group=None, *, device: Union[str, torch.device, None] = None,
                shard_lm_head: bool = True) -> ParallelModel:
    """Splits ``model`` in place over the ranks of ``group`` (see the module's docstring).

    Call it on every rank, with the same full model on each (the same checkpoint, or random
    weights from the same seed). Afterwards ``model(...)`` takes the same replicated inputs
    on every rank and returns the full logits on every rank; every rank must make the same
    calls in the same order (the collectives pair them up).

    It also gives every rank rank 0's default CPU RNG state (and, on CUDA, the model device's
    CUDA RNG state), so that samplers called without a ``generator`` draw the same numbers on
    every rank.

    Args:
        model: a :class:`~genjo_fast.models.LLaDAModel` or
            :class:`~genjo_fast.models.DreamModel`, not yet parallelised.
        group: ``None`` (the default process group), a ``ProcessGroup`` or a one-dimensional
            ``DeviceMesh``.
        device: where the shards and the replicated parameters go (default: where they are).
            Loading on the CPU and moving shards only keeps the full model off the GPUs.
        shard_lm_head: split an untied LM head over the vocabulary and all-gather its logits
            (default), or keep it whole on every rank. A tied head is always replicated.
    Returns:
        ``model``, with ``model.tensor_parallel`` (:class:`TensorParallel`) set.
    Raises:
        TypeError: not a LLaDA or Dream model of genjo_fast.
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: the model is already parallelised, or the world size does not divide the
            heads, the key/value heads, the MLP width or (when split) the vocabulary.
    """
    layout = _layout(model)
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("model is already parallelised (model.tensor_parallel is set)")
    group = _resolve_group(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    check_world_size(model, world, shard_lm_head)
    device = None if device is None else torch.device(device)

    for name, dim in shard_plan(model, shard_lm_head).items():
        module = model.get_submodule(name)
        module.weight = _shard(module.weight, dim, rank, world, device)
        bias = getattr(module, "bias", None)
        if bias is not None:
            if dim == 1:  # would be added once per rank by the all-reduce
                raise NotImplementedError(f"{name} is row-wise and has a bias")
            module.bias = _shard(bias, 0, rank, world, device)
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        if name == layout["head"]:
            module.register_forward_hook(functools.partial(_all_gather_last, group, world))
        elif dim == 1:
            module.register_forward_hook(functools.partial(_all_reduce, group))
    for layer in model.get_submodule(layout["layers"]):
        layer.n_heads //= world
        layer.n_kv_heads //= world
    if device is not None:
        model.to(device)
    model.tensor_parallel = TensorParallel(group, rank, world, shard_lm_head)
    sync_rng(group, model.device)
    return model


def sync_rng(group=None, device: Union[str, torch.device] = "cpu") -> None:
    """Gives every rank of ``group`` the default CPU RNG state of its rank 0, and on a CUDA
    ``device`` that device's default CUDA RNG state too (collective: call it on every
    rank)."""
    group = _resolve_group(group)
    device = torch.device(device)
    cuda = device.type == "cuda"
    states = [torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None]
    dist.broadcast_object_list(states, src=dist.get_global_rank(group, 0), group=group,
                               device=device if cuda else None)
    torch.set_rng_state(states[0])
    if cuda:
        torch.cuda.set_rng_state(states[1], device)


def same_on_all_ranks(tensor: torch.Tensor, group=None) -> bool:
    """Whether ``tensor`` (same shape and dtype on every rank) holds the same values on every
    rank of ``group`` (collective: call it on every rank; every rank gets the answer)."""
    group = _resolve_group(group)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return all(torch.equal(part, parts[0]) for part in parts)


def load_parallel(path: PathLike, dtype: torch.dtype = torch.bfloat16,
                  device: Union[str, torch.device] = "cpu", group=None,
                  shard_lm_head: bool = True) -> ParallelModel:
    """Loads a LLaDA or Dream checkpoint directory (``config.json``'s ``model_type``) on every
    rank and parallelises it: :func:`~genjo_fast.models.load_llada` /
    :func:`~genjo_fast.models.load_dream` on the CPU (memory-mapped), then :func:`parallelize`
    with the shards moved to ``device``.

    Args:
        path: the checkpoint directory. dtype: parameter dtype.
        device: this rank's device (``init_distributed()`` returns it).
        group, shard_lm_head: as :func:`parallelize`.
    Raises:
        ValueError: ``model_type`` is neither ``"llada"`` nor ``"Dream"``; and what the loader
            and :func:`parallelize` raise.
    """
    model_type = _read_config(Path(path)).get("model_type")
    load = {"llada": load_llada, "Dream": load_dream}.get(model_type)
    if load is None:
        raise ValueError(f"{path}: config.json's model_type is {model_type!r}; tensor "
                         "parallelism runs LLaDA ('llada') and Dream ('Dream') checkpoints")
    model = load(path, dtype=dtype, device="cpu")
    return parallelize(model, group, device=device, shard_lm_head=shard_lm_head)


def init_distributed(backend: Optional[str] = None) -> torch.device:
    """Initialises the default process group from torchrun's environment (if not done yet)
    and returns this rank's device: ``cuda:LOCAL_RANK`` (made the current device) when CUDA
    is available, else the CPU.

    Args:
        backend: ``None`` picks ``"nccl"`` with CUDA, else ``"gloo"``.
    """
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return device


#: What :meth:`Coordinator.ping` sends: a message that runs nothing.
_PING = "ping"


class Coordinator:
    """Runs a front-end on every rank of a parallel model: rank 0 leads (a server's
    request loop calls :meth:`run`), the other ranks :meth:`follow`.

    :meth:`run` sends ``(fn, args, kwargs)`` to the followers (pickled: ``fn`` must be a
    module-level function, tensors should be on the CPU; build a generator inside ``fn``
    from a seed argument rather than passing one) and every rank calls
    ``fn(model, *args, **kwargs)``. An exception in ``fn`` is raised on the leader; a follower
    reports it and waits for the next call (the front-ends validate their arguments before
    any collective, so every rank fails at the same point). Leaving a ``with`` block on the
    leader releases the followers::

        with Coordinator(model) as coordinator:
            if coordinator.is_leader:
                out = coordinator.run(genjo_fast.generate, prompt, steps=64, gen_length=64)
            else:
                coordinator.follow()

    The followers wait in a collective between calls: a leader idle for longer than the
    process group's timeout (``init_process_group(timeout=...)``: 10 minutes with NCCL by
    default) should :meth:`ping` them in the meantime. The leader's :meth:`run`, :meth:`ping`
    and :meth:`close` hold a lock (one at a time, whatever thread calls them; nothing else
    should use the process group meanwhile), and :meth:`close` may be called more than once.

    Args:
        model: a parallelised model (:func:`parallelize`); the calls go to the ranks of its
            group.
    """

    def __init__(self, model: ParallelModel):
        info = getattr(model, "tensor_parallel", None)
        if info is None:
            raise ValueError("model is not parallelised (call genjo_fast.parallel.parallelize)")
        self.model = model
        self.group = info.group
        self.is_leader = dist.get_rank(self.group) == 0
        self._src = dist.get_global_rank(self.group, 0)
        self._device = _collective_device(model)
        self._lock = threading.Lock()
        self._closed = False

    def _broadcast(self, message=None):
        box = [message]
        dist.broadcast_object_list(box, src=self._src, group=self.group, device=self._device)
        return box[0]

    def run(self, fn: Callable, *args, leader_only: Optional[Dict[str, Any]] = None, **kwargs):
        """Leader only: ``fn(model, *args, **kwargs)`` on every rank; returns the leader's
        result. ``leader_only``: keyword arguments passed to the leader's call only, not sent
        (callbacks, e.g. an observer; ``fn`` must then make every rank do the same, see
        :func:`decided_by_leader`)."""
        with self._leading("run"):
            self._broadcast((fn, args, kwargs))
            return fn(self.model, *args, **kwargs, **(leader_only or {}))

    def ping(self) -> None:
        """Leader only: a message that runs nothing, so that the followers' wait does not
        time out."""
        with self._leading("ping"):
            self._broadcast(_PING)

    @contextlib.contextmanager
    def _leading(self, what: str):
        if not self.is_leader:
            raise RuntimeError(f"Coordinator.{what} is for rank 0; the other ranks call "
                               "follow()")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"Coordinator.{what}: the coordinator is closed (the other "
                                   "ranks have left)")
            yield

    def follow(self) -> int:
        """Followers: run the leader's calls until it closes; returns how many ran."""
        if self.is_leader:
            raise RuntimeError("Coordinator.follow is for ranks other than 0")
        calls = 0
        while True:
            message = self._broadcast()
            if message is None:
                return calls
            if message == _PING:
                continue
            fn, args, kwargs = message
            calls += 1
            try:
                fn(self.model, *args, **kwargs)
            except Exception as error:  # the leader raises the same error to its caller
                _log.warning("rank %d: %s: %s", dist.get_rank(), type(error).__name__, error)

    def close(self) -> None:
        """Leader: releases the followers from :meth:`follow` (after the call under way; once:
        later calls do nothing). Nothing on the other ranks."""
        if not self.is_leader:
            return
        with self._lock:
            if not self._closed:
                self._closed = True
                self._broadcast(None)

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _collective_device(model: ParallelModel) -> Optional[torch.device]:
    """The device object collectives go through: the model's CUDA device (NCCL), else
    ``None`` (the CPU)."""
    device = model.device
    return device if device.type == "cuda" else None


def decided_by_leader(model: ParallelModel,
                      decide: Optional[Callable[[], Any]]) -> Callable[[], Any]:
    """A host-side decision that rank 0 makes and every rank follows, e.g. which rows leave a
    running call (a sampler's ``drop_rows``): the returned callable, called at the same point
    of the same call on every rank of ``model``'s group (it is a collective), runs ``decide``
    on rank 0 and returns its (picklable) result on every rank, or raises its exception on
    every rank. ``decide`` is only read on rank 0 (pass ``None`` elsewhere)."""
    info = model.tensor_parallel
    src, device = dist.get_global_rank(info.group, 0), _collective_device(model)
    if info.rank == 0 and not callable(decide):
        raise TypeError(f"decide must be callable on rank 0, got {type(decide).__name__}")

    def decided():
        box = [None]
        if info.rank == 0:  # an error is every rank's too: none is left waiting
            try:
                box[0] = (True, decide())
            except Exception as error:
                box[0] = (False, error)
        dist.broadcast_object_list(box, src=src, group=info.group, device=device)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    return decided


__all__ = ["parallelize", "load_parallel", "init_distributed", "shard_plan",
           "check_world_size", "sync_rng", "same_on_all_ranks", "Coordinator",
           "decided_by_leader", "splits_lm_head",
           "TensorParallel"]
