"""Dispatch in one place: the Registry's availability answers, genjo_fast.backend_status,
the models' attention resolved once, and the Triton ops as torch custom ops (fake impls)."""
import os

import pytest
import torch

import genjo_fast
from genjo_fast import attention as attention_mod
from genjo_fast import cuda_ext, sampling
from genjo_fast.attention import ATTENTION_BACKENDS, AttentionDispatch, attention_naive
from genjo_fast.backends import SAMPLING_BACKENDS
from genjo_fast.dispatch import BackendStatus, Registry
from genjo_fast.kernels import dream_sample as dk
from genjo_fast.kernels import flash_attention as fa
from genjo_fast.kernels import gumbel_argmax_confidence as gk
from genjo_fast.kernels import select_transfer as sk

INTERPRETED = gk._INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED,
                                       reason="the Triton interpreter is not active")


def small_registry():
    reg = Registry("widget", "GENJO_FAST_TEST_WIDGET")
    reg.register("fast", "fast-impl", lambda device, *inputs: None if device.type == "cuda"
                 else "CUDA only")
    reg.register("slow_here", "slow-impl", auto_reason=lambda device, *inputs: "too slow")
    reg.register("plain", "plain-impl")
    return reg


def test_registry_answers_read_the_right_way_round(monkeypatch):
    reg = small_registry()
    cpu = torch.device("cpu")
    assert reg.unavailable_reason("fast", cpu) == "CUDA only"
    assert reg.is_available("fast", cpu) is False
    assert reg.unavailable_reason("slow_here", "cpu") is None  # by name it runs
    assert reg.is_available("plain", "cpu") is True
    with pytest.raises(ValueError, match="widget='nope' is not known"):
        reg.unavailable_reason("nope", cpu)
    monkeypatch.delenv("GENJO_FAST_TEST_WIDGET", raising=False)
    assert reg.resolve(None, cpu) == ("plain", "plain-impl")  # auto skips slow_here
    assert reg.resolve("slow_here", cpu) == ("slow_here", "slow-impl")
    monkeypatch.setenv("GENJO_FAST_TEST_WIDGET", "fast")
    with pytest.raises(RuntimeError, match="GENJO_FAST_TEST_WIDGET='fast' .* CUDA only"):
        reg.resolve(None, cpu)
    assert reg.status("widgets", cpu) == (
        BackendStatus("widgets", "fast", False, "CUDA only", False),
        BackendStatus("widgets", "slow_here", True, None, False),
        BackendStatus("widgets", "plain", True, None, True))


def test_backend_status_on_cpu():
    """Every sampling and attention backend with its answer on CPU; exactly one per family is
    auto's, and it is what resolve(None) picks."""
    status = genjo_fast.backend_status("cpu")
    assert [(s.op, s.name) for s in status] == (
        [("sampling", n) for n in ("cuda", "triton", "torch")]
        + [("attention", n) for n in ("triton", "flash_attn", "sdpa")])
    by = {(s.op, s.name): s for s in status}
    assert all(s.usable == (s.reason is None) for s in status)
    cuda = by["sampling", "cuda"]
    assert not cuda.usable and cuda.reason == cuda_ext.unavailable_reason("cpu")
    assert by["sampling", "torch"].usable and by["sampling", "torch"].auto
    assert by["attention", "sdpa"].usable and by["attention", "sdpa"].auto
    assert not by["attention", "flash_attn"].usable and "flash_attn" in by["attention",
                                                                           "flash_attn"].reason
    for op in ("sampling", "attention"):
        assert sum(s.auto for s in status if s.op == op) == 1
    # The Triton kernels run on CPU through the interpreter only, and never for "auto" there.
    for key in (("sampling", "triton"), ("attention", "triton")):
        assert by[key].usable == INTERPRETED and not by[key].auto
        if not INTERPRETED:
            assert "TRITON_INTERPRET" in by[key].reason


def test_backend_status_default_device_and_accepted_names():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert genjo_fast.backend_status() == genjo_fast.backend_status(device)
    assert genjo_fast.accepted_backends() == {"sampling": ("cuda", "triton", "torch"),
                                              "attention": ("triton", "flash_attn", "sdpa")}
    meta = genjo_fast.backend_status(torch.device("meta"))
    assert not any(s.usable for s in meta if s.name == "triton")


# --- attention resolved once ----------------------------------------------------------------

def counting_resolve(monkeypatch):
    calls = []
    real = ATTENTION_BACKENDS.resolve

    def spy(requested, device, *inputs):
        calls.append(requested)
        return real(requested, device, *inputs)

    monkeypatch.setattr(ATTENTION_BACKENDS, "resolve", spy)
    return calls


def test_attention_dispatch_resolves_once_per_key(monkeypatch):
    monkeypatch.setenv(attention_mod.ENV_VAR, "sdpa")
    calls = counting_resolve(monkeypatch)
    dispatch = AttentionDispatch()
    q, k, v = (torch.randn(2, 4, 5, 16) for _ in range(3))
    for _ in range(5):
        torch.testing.assert_close(dispatch(q, k, v), attention_naive(q, k, v))
    assert len(calls) == 1
    dispatch(q.double(), k.double(), v.double())  # another dtype: resolved once more
    dispatch(q[..., :8], k[..., :8], v[..., :8])  # another head size
    assert len(calls) == 3
    assert set(dispatch.chosen().values()) == {"sdpa"}
    # The env variable was read at resolution: changing it later does not re-resolve ...
    monkeypatch.setenv(attention_mod.ENV_VAR, "bogus")
    dispatch(q, k, v)
    assert len(calls) == 3
    # ... set_backend does (and validates the name at once).
    dispatch.set_backend(None)
    with pytest.raises(ValueError, match="bogus"):
        dispatch(q, k, v)
    with pytest.raises(ValueError, match="attention backend='nope' is not known"):
        dispatch.set_backend("nope")
    dispatch.set_backend("sdpa")
    assert dispatch.backend == "sdpa" and dispatch.resolve(q)[0] == "sdpa"


@needs_interpreter
def test_model_attention_backend_chosen_once(monkeypatch):
    """A LLaDA model resolves its attention once for all its layers and steps;
    set_attention_backend switches every block, with the same logits."""
    from genjo_fast.testing import random_llada

    monkeypatch.delenv(attention_mod.ENV_VAR, raising=False)
    model = random_llada(vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=3,
                         max_len=32)
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    calls = counting_resolve(monkeypatch)
    with torch.no_grad():
        auto = model(ids, attention_mask=mask).logits
        model(ids, attention_mask=mask)
        assert len(calls) == 1  # 3 layers x 2 forwards, one resolution
        assert set(model.attention_dispatch.chosen().values()) == {"sdpa"}  # auto on CPU
        assert all(b.attention_dispatch is model.attention_dispatch for b in model.blocks)
        model.set_attention_backend("triton")
        kernel = model(ids, attention_mask=mask).logits
        assert set(model.attention_dispatch.chosen().values()) == {"triton"}
    assert len(calls) == 2
    torch.testing.assert_close(kernel, auto, atol=1e-5, rtol=1e-4)


# --- the Triton ops as torch custom ops -------------------------------------------------------

def test_custom_ops_are_registered():
    for name in ("gumbel_argmax_confidence", "select_transfer", "flash_attention",
                 "dream_sample"):
        assert hasattr(torch.ops.genjo_fast_triton, name)


def test_fake_impls_on_meta_tensors():
    """Shapes and dtypes from the fake implementations: meta tensors, no kernel runs."""
    ops = torch.ops.genjo_fast_triton
    meta = dict(device="meta")
    conf = torch.empty(3, 11, dtype=torch.bfloat16, **meta)
    for args in ((torch.empty(3, dtype=torch.long, **meta), None, None), (None, 0.5, None),
                 (None, None, 1.0)):
        out = ops.select_transfer(conf, *args)
        assert out.shape == (3, 11) and out.dtype == torch.bool and out.device.type == "meta"
    with pytest.raises(ValueError, match="exactly one of"):
        ops.select_transfer(conf, None, None, None)

    q = torch.empty(2, 8, 5, 64, dtype=torch.float16, **meta)
    kv = torch.empty(2, 2, 7, 64, dtype=torch.float16, **meta)
    out = ops.flash_attention(q, kv, kv, torch.empty(2, 7, dtype=torch.bool, **meta), None, 32)
    assert out.shape == (2, 8, 5, 64) and out.dtype == torch.float16 and out.is_contiguous()
    with pytest.raises(ValueError, match="head_dim"):
        ops.flash_attention(q[..., :12], kv[..., :12], kv[..., :12], None, None, None)

    logits = torch.empty(2, 4, 257, dtype=torch.bfloat16, **meta)
    x0 = torch.empty(2, 4, dtype=torch.long, **meta)
    c = torch.empty(2, 4, dtype=torch.bfloat16, **meta)
    assert ops.gumbel_argmax_confidence(logits, None, None, x0, c, 0.0, 0.0, True, False,
                                        False, -1, -1, True) is None
    with pytest.raises(ValueError, match="out\\[1\\]"):  # exact confidence: the logits' dtype
        ops.gumbel_argmax_confidence(logits, None, None, x0, c.float(), 0.0, 0.0, True, False,
                                     False, -1, -1, True)
    assert ops.dream_sample(logits, None, x0, c, 0.0, "margin") is None
    with pytest.raises(ValueError, match="confidence must be"):
        ops.dream_sample(logits, None, x0, c.float(), 0.0, "margin")


def test_fake_impls_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.genjo_fast_triton.select_transfer(torch.empty(2, 9), None, 0.9, None)
        assert out.shape == (2, 9) and out.dtype == torch.bool
        q = torch.empty(1, 2, 3, 32)
        assert torch.ops.genjo_fast_triton.flash_attention(q, q, q, None, None,
                                                           None).shape == (1, 2, 3, 32)


@needs_interpreter
def test_custom_ops_equal_their_torch_statements():
    """The registered ops themselves (through the dispatcher) against the plain-torch oracles,
    and torch.library.opcheck's schema / fake-tensor consistency checks."""
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(3, 13, generator=g)
    conf[0, 4] = -torch.inf
    k = torch.tensor([2, 0, 13])
    op = torch.ops.genjo_fast_triton.select_transfer
    assert torch.equal(op(conf, k, None, None), sampling.select_transfer(conf, k))
    assert torch.equal(op(conf, None, 0.6, None), sampling.select_transfer(conf, threshold=0.6))
    torch.library.opcheck(op.default, (conf, k, None, None))

    q = torch.randn(2, 4, 5, 16, generator=g)
    kv = torch.randn(2, 2, 7, 16, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False
    op = torch.ops.genjo_fast_triton.flash_attention
    torch.testing.assert_close(op(q, kv, kv, mask, None, None), attention_naive(q, kv, kv, mask),
                               atol=1e-5, rtol=1e-4)
    torch.library.opcheck(op.default, (q, kv, kv, mask, None, None))

    logits = (torch.randn(2, 3, 50, generator=g) * 3).bfloat16()
    x0 = torch.empty(2, 3, dtype=torch.long)
    c = torch.empty(2, 3, dtype=torch.bfloat16)
    op = torch.ops.genjo_fast_triton.gumbel_argmax_confidence
    op(logits, None, None, x0, c, 0.0, 0.0, True, False, False, -1, -1, True)
    want = sampling.gumbel_argmax_confidence(logits, temperature=0.0, remasking="low_confidence")
    assert torch.equal(x0, want[0]) and torch.equal(c, want[1])
    torch.library.opcheck(op.default, (logits, None, None, x0, c, 0.0, 0.0, True, False, False,
                                       -1, -1, True))

    op = torch.ops.genjo_fast_triton.dream_sample
    op(logits, None, x0, c, 0.0, "neg_entropy")
    want = sampling.dream_sample(logits, temperature=0.0, confidence="neg_entropy")
    assert torch.equal(x0, want[0]) and torch.equal(c, want[1])
    torch.library.opcheck(op.default, (logits, None, x0, c, 0.0, "neg_entropy"))


def test_kernel_modules_answer_unavailable_reason():
    for module in (gk, sk, fa, dk, cuda_ext):
        assert not hasattr(module, "is_available")  # the old, inverted name is gone
        reason = module.unavailable_reason(torch.device("meta"))
        assert isinstance(reason, str) and reason
    assert SAMPLING_BACKENDS.unavailable_reason("torch", "meta") is None
