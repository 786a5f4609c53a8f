"""CUDA-graph plumbing (cuda_graph=True) exercised on CPU with a stand-in for torch.cuda.

A real capture needs a GPU; what can be checked here is the logic around it: the warm-up runs
the branch the capture will take, every graph of a call shares one memory pool, and replays
write into the captured outputs so that generate's tokens are those of the plain cached run.
"""
import contextlib
import functools
import sys
from types import SimpleNamespace

import pytest
import torch

import genjo_fast
from genjo_fast import cuda_graph
from genjo_fast.testing import random_llada, random_prompts

VOCAB, MASK_ID, PAD_ID = 101, 100, 0
generate_module = sys.modules["genjo_fast.generate"]  # the attribute is the function


class FakeCuda:
    """Enough of torch.cuda for GraphedStep: a "graph" records the function run under its
    capture context and a replay runs it again into the captured outputs."""

    def __init__(self):
        self.pools = 0
        self.captures = []  # capturing() as seen by each captured function call
        self.graphs = []

    def device(self, device):
        return contextlib.nullcontext()

    def Stream(self):
        return SimpleNamespace(wait_stream=lambda other: None)

    def current_stream(self):
        return SimpleNamespace(wait_stream=lambda other: None)

    def stream(self, stream):
        return contextlib.nullcontext()

    def graph_pool_handle(self):
        self.pools += 1
        return ("pool", self.pools)

    def CUDAGraph(self):
        graph = SimpleNamespace(pool=None, fn=None, outputs=None)
        graph.replay = lambda: [o.copy_(n) for o, n in zip(graph.outputs, graph.fn())]
        self.graphs.append(graph)
        return graph

    @contextlib.contextmanager
    def graph(self, graph, pool=None):
        graph.pool = pool
        with cuda_graph.warm_up_branch():  # a capture also reports capturing()
            yield
        # GraphedStep stores the captured outputs on itself; the test hands fn and outputs
        # to the fake graph through the step (see _bind).


def _bind(step):
    """Connects a GraphedStep's function and captured outputs to its fake graph."""
    graph = step.graph
    graph.fn, graph.outputs = step.fn, step.outputs


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    steps = []

    def factory(generator, device):
        make = cuda_graph.graph_steps(generator, device, cuda=fake)

        def wrap(fn):
            step = make(fn)
            steps.append(step)
            original = step.__call__

            def call():
                out = original()
                if step.graph is not None and step.graph.fn is None:
                    _bind(step)
                return out
            return call
        return wrap

    monkeypatch.setattr(generate_module, "graph_steps", factory)
    monkeypatch.setattr(generate_module, "check_cuda_graph_args", lambda *a: None)
    monkeypatch.setenv("GENJO_FAST_ATTENTION", "sdpa")
    fake.steps = steps
    return fake


@pytest.fixture(scope="module")
def model():
    return random_llada(VOCAB, d_model=32, n_heads=2, n_kv_heads=1, n_layers=2,
                        mlp_hidden_size=48, max_len=64, seed=0)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_replayed_steps_give_the_cached_tokens(model, fake_cuda, cache):
    prompt, attention_mask = random_prompts(3, 6, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    args = dict(steps=12, gen_length=12, block_length=4, mask_id=MASK_ID, cache=cache)
    want = genjo_fast.generate(model, prompt, attention_mask, **args)
    got, stats = genjo_fast.generate(model, prompt, attention_mask, cuda_graph=True,
                                     return_stats=True, **args)
    assert torch.equal(got, want)
    assert stats.nfe == 12 and stats.full_forwards == 3
    assert len(fake_cuda.steps) == 3 and all(s.graph is not None for s in fake_cuda.steps)
    assert fake_cuda.pools == 1  # one pool shared by the three blocks' graphs
    assert {g.pool for g in fake_cuda.graphs} == {("pool", 1)}


def test_warm_up_takes_the_capture_branch():
    """The warm-up run and the capture both see capturing() true: the same branch."""
    fake = FakeCuda()
    seen = []
    fn = functools.partial(lambda: (seen.append(cuda_graph.capturing(torch.device("cpu"))),
                                    torch.zeros(1))[1:])
    step = cuda_graph.GraphedStep(fn, None, torch.device("cpu"), cuda_graph.GraphPool(), fake)
    step()
    assert seen == [True, True]
    assert not cuda_graph.capturing(torch.device("cpu"))  # only inside


def test_sampling_kernel_recheck_follows_the_capture_branch():
    """The sampling kernels' exact recheck counts flagged rows on the host, except in a capture
    and in its warm-up, where it recomputes every row (no sync): the same branch in both."""
    from genjo_fast.kernels.gumbel_argmax_confidence import rows_to_recheck

    flag = torch.tensor([0, 1, 0, 1], dtype=torch.int8)
    assert rows_to_recheck(flag, torch.bfloat16, torch.device("cpu")).tolist() == [1, 3]
    with cuda_graph.warm_up_branch():
        assert rows_to_recheck(flag, torch.bfloat16, torch.device("cpu")) is None
