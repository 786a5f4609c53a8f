"""CUDA-graph capture and replay of a window's cached step (``cuda_graph=True``).

:class:`GraphedStep` runs a step once for real (the warm-up CUDA graphs need), captures it,
and replays the graph for every later step of the window. All windows of one call share one
graph memory pool (:class:`GraphPool`), so a call with many blocks does not open a private
pool per block.

Code that has a sync-free variant for capture (the sampling kernel's exact-confidence check
counts flagged rows on the host, which a capture forbids) asks :func:`capturing`: it is true
during a capture and also during the warm-up run, so that the warm-up takes the same branch
as the captured graph.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Optional

import torch

_WARMING_UP = contextvars.ContextVar("genjo_fast_graph_warm_up", default=False)


def capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on ``device``'s current stream, or while
    :class:`GraphedStep` runs the warm-up of a capture: code must then take its sync-free
    branch."""
    if device.type != "cuda":
        return _WARMING_UP.get()
    return _WARMING_UP.get() or torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def warm_up_branch():
    """Within this block :func:`capturing` is true: run a step as the capture will."""
    token = _WARMING_UP.set(True)
    try:
        yield
    finally:
        _WARMING_UP.reset(token)


class GraphPool:
    """One CUDA graph memory pool shared by the graphs of a call (created on first use)."""

    def __init__(self):
        self.handle = None

    def get(self, cuda=torch.cuda):
        if self.handle is None:
            self.handle = cuda.graph_pool_handle()
        return self.handle


class GraphedStep:
    """A step captured in a CUDA graph on its first call and replayed afterwards.

    The first call runs the step for real on a side stream with :func:`capturing` forced
    (the warm-up), then captures it; each later call replays the graph, which reads and writes
    the same buffers (``x``, the cache, the transfer counts). ``fn`` must have static shapes
    and no host synchronisation.

    Args:
        fn: the step, ``fn() -> (x0, confidence, transfer)``.
        generator: the user's ``torch.Generator`` the step draws from, registered with the
            graph so that replays advance it; ``None`` for the default generator.
        device: the CUDA device of the model.
        pool: the call's :class:`GraphPool`.
        cuda: the ``torch.cuda`` module (a test stands in for it on CPU).
    """

    def __init__(self, fn: Callable[[], tuple], generator: Optional[torch.Generator],
                 device: torch.device, pool: GraphPool, cuda=torch.cuda):
        self.fn = fn
        self.generator = generator
        self.device = device
        self.pool = pool
        self.cuda = cuda
        self.graph = None
        self.outputs = None

    def __call__(self) -> tuple:
        with self.cuda.device(self.device):  # streams and graphs of the model's GPU
            if self.graph is not None:
                self.graph.replay()
                return self.outputs
            return self._warm_up_and_capture()

    def _warm_up_and_capture(self) -> tuple:
        cuda = self.cuda
        stream = cuda.Stream()
        stream.wait_stream(cuda.current_stream())
        with cuda.stream(stream), warm_up_branch():
            outputs = self.fn()
        cuda.current_stream().wait_stream(stream)
        graph = cuda.CUDAGraph()
        if self.generator is not None:  # replays must advance the user's generator too
            register = getattr(graph, "register_generator_state", None)
            if register is None:
                raise RuntimeError("this torch cannot replay a user generator in a CUDA graph; "
                                   "pass generator=None (the default CUDA generator is "
                                   "graph-safe)")
            register(self.generator)
        with cuda.graph(graph, pool=self.pool.get(cuda)):
            self.outputs = self.fn()
        self.graph = graph
        return outputs


def graph_steps(generator: Optional[torch.Generator], device: torch.device,
                cuda=torch.cuda) -> Callable[[Callable[[], tuple]], GraphedStep]:
    """The engine's ``graph_step`` factory for one call: each window's step gets a
    :class:`GraphedStep`, all sharing one pool."""
    pool = GraphPool()
    return lambda fn: GraphedStep(fn, generator, device, pool, cuda)
