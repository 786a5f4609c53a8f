"""The Triton flash-attention kernel against the float32 oracle and SDPA, on CPU tensors through
the Triton interpreter (tiny shapes: the interpreter pays per program and per loop trip).

The interpreter mode is fixed when triton is imported. Where triton was imported without it
before this module (a GPU machine), the same tests run on the GPU instead."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import torch  # noqa: E402

from genjo_fast import attention as attention_mod  # noqa: E402
from genjo_fast.attention import attention, attention_naive, attention_sdpa  # noqa: E402
from genjo_fast.kernels import flash_attention as fa  # noqa: E402
from genjo_fast.kernels.flash_attention import flash_attention, unavailable_reason  # noqa: E402

if fa._INTERPRETED:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_qkv(batch, q_heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seqlen_q, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=g)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def left_padded_mask(seqlen_k, pads):
    """``(len(pads), seqlen_k)`` bool: row ``j`` has ``pads[j]`` padding keys on the left."""
    mask = torch.ones(len(pads), seqlen_k, dtype=torch.bool, device=DEVICE)
    for j, pad in enumerate(pads):
        mask[j, :pad] = False
    return mask


def check(out, q, k, v, key_mask=None):
    """``out`` has no NaN and equals the oracle and SDPA (zero rows where all keys are padded)."""
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any()
    ref = attention_naive(q, k, v, key_mask).float()
    sdpa = attention_sdpa(q.float(), k.float(), v.float(), key_mask)
    if key_mask is not None:  # rows without a real key: the kernel's contract is zeros
        empty = ~key_mask.bool().any(1)
        ref[empty], sdpa[empty] = 0.0, 0.0
    torch.testing.assert_close(out.float(), ref, **TOL[q.dtype])
    torch.testing.assert_close(out.float(), sdpa, **TOL[q.dtype])


# (batch, q_heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, pads, block_n)
CASES = {
    "odd_37x37": (2, 2, 2, 37, 37, 64, torch.float32, None, None),
    "short_q_5x70_padded": (2, 2, 2, 5, 70, 64, torch.float32, (0, 23), None),
    "gqa_4_2_padded": (2, 4, 2, 37, 37, 64, torch.float32, (3, 11), None),
    # Key tiles of 16: the online softmax rescales across 5 tiles, the first two of row 1
    # entirely padded (running max still -inf), and the last one a tail of 6 keys.
    "mqa_4_1_d128_tiles": (2, 4, 1, 5, 70, 128, torch.float32, (1, 40), 16),
    "bf16_gqa_padded": (2, 4, 2, 37, 70, 64, torch.bfloat16, (5, 30), None),
    "fp16_d128_tiles": (1, 2, 1, 37, 37, 128, torch.float16, None, 16),
    "bf16_d128_padded_tiles": (2, 2, 1, 17, 64, 128, torch.bfloat16, (0, 33), 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(case):
    batch, hq, hkv, lq, lk, d, dtype, pads, block_n = CASES[case]
    q, k, v = make_qkv(batch, hq, hkv, lq, lk, d, dtype)
    key_mask = None if pads is None else left_padded_mask(lk, pads)
    check(flash_attention(q, k, v, key_mask, block_n=block_n), q, k, v, key_mask)


def test_query_tiles_and_tails():
    q, k, v = make_qkv(1, 2, 2, 70, 45, 64, torch.float32)
    key_mask = left_padded_mask(45, (7,))
    check(flash_attention(q, k, v, key_mask, block_m=16, block_n=16), q, k, v, key_mask)


def test_fully_padded_row_is_zero():
    q, k, v = make_qkv(2, 2, 1, 9, 40, 64, torch.float32)
    key_mask = left_padded_mask(40, (4, 40))  # row 1: every key is padding
    out = flash_attention(q, k, v, key_mask, block_n=16)
    assert not out.isnan().any()
    assert (out[1] == 0).all()
    check(out, q, k, v, key_mask)


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.float32])
def test_non_bool_mask(mask_dtype):
    q, k, v = make_qkv(2, 2, 2, 8, 30, 64, torch.float32)
    key_mask = left_padded_mask(30, (2, 9))
    out = flash_attention(q, k, v, key_mask.to(mask_dtype))
    check(out, q, k, v, key_mask)


def test_strided_inputs():
    """q from a ``(B, L, H, D)`` tensor, k and v from a packed ``(B, L, 2, H, D)`` one, all
    transposed to ``(B, H, L, D)`` without a copy; the mask a strided slice."""
    g = torch.Generator().manual_seed(1)
    batch, heads, lq, lk, d = 2, 4, 21, 50, 64
    q = torch.randn(batch, lq, heads, d, generator=g).to(DEVICE).transpose(1, 2)
    kv = torch.randn(batch, lk, 2, 2, d, generator=g).to(DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    key_mask = left_padded_mask(2 * lk, (6, 30))[:, 1::2]
    assert not (q.is_contiguous() or k.is_contiguous() or key_mask.is_contiguous())
    check(flash_attention(q, k, v, key_mask), q, k, v, key_mask)


def test_empty_shapes():
    q, k, v = make_qkv(1, 2, 2, 0, 16, 64, torch.float32)
    assert flash_attention(q, k, v).shape == (1, 2, 0, 64)
    q, k, v = make_qkv(1, 2, 2, 5, 0, 64, torch.float32)
    assert (flash_attention(q, k, v, left_padded_mask(0, (0,))) == 0).all()


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _bad(**changes):
    q, k, v = make_qkv(2, 4, 2, 8, 16, 64, torch.float32)
    args = dict(q=q, k=k, v=v, key_mask=left_padded_mask(16, (0, 0)))
    args.update(changes)
    return args


BAD = {
    "head_dim": (lambda: _bad(**dict(zip("qkv", make_qkv(2, 4, 2, 8, 16, 48, torch.float32)))),
                 ValueError, "q head_dim"),
    "dtype_mismatch": (lambda: _bad(k=_rand(2, 2, 16, 64, dtype=torch.float16)),
                       TypeError, "k dtype"),
    "q_dtype": (lambda: _bad(q=_rand(2, 4, 8, 64, dtype=torch.float64)), TypeError,
                "q dtype"),
    "gqa": (lambda: _bad(q=_rand(2, 3, 8, 64)), ValueError, r"q heads \(3\)"),
    "v_shape": (lambda: _bad(v=_rand(2, 2, 15, 64)), ValueError, "v shape"),
    "k_batch": (lambda: _bad(k=_rand(1, 2, 16, 64)), ValueError, "k shape"),
    "q_rank": (lambda: _bad(q=_rand(4, 8, 64)), ValueError, "q must have shape"),
    "mask_shape": (lambda: _bad(key_mask=left_padded_mask(15, (0, 0))), ValueError,
                   "key_mask shape"),
    "mask_type": (lambda: _bad(key_mask=[[1] * 16] * 2), TypeError, "key_mask"),
    "k_device": (lambda: _bad(k=torch.empty(2, 2, 16, 64, device="meta")), ValueError,
                 "k is on meta"),
    "not_tensor": (lambda: _bad(v="v"), TypeError, "v must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments(case):
    make, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        flash_attention(**make())


def test_bad_block_size():
    q, k, v = make_qkv(1, 1, 1, 8, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="block_n"):
        flash_attention(q, k, v, block_n=24)


def test_unavailable_reason(monkeypatch):
    assert unavailable_reason(DEVICE) is None
    assert "not supported" in unavailable_reason(torch.device("meta"))
    if DEVICE.type != "cpu":
        assert "TRITON_INTERPRET" in unavailable_reason(torch.device("cpu"))
        return
    assert "interpreter" in unavailable_reason(torch.device("cuda"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in unavailable_reason(torch.device("cpu"))
    q, k, v = make_qkv(1, 1, 1, 8, 8, 64, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        flash_attention(q, k, v)


# --- dispatch -------------------------------------------------------------------------------

def test_backend_triton():
    q, k, v = make_qkv(2, 4, 2, 11, 19, 64, torch.float32)
    key_mask = left_padded_mask(19, (0, 5))
    check(attention(q, k, v, key_mask, backend="triton"), q, k, v, key_mask)


def test_backend_order():
    assert attention_mod.ATTENTION_BACKENDS.names() == ("triton", "flash_attn", "sdpa")


def test_auto_prefers_triton_on_cuda_only(monkeypatch):
    """auto picks the Triton kernel for CUDA tensors; on CPU, where it needs the interpreter,
    only by name (and SDPA is auto's choice)."""
    monkeypatch.delenv(attention_mod.ENV_VAR, raising=False)
    resolve = attention_mod.ATTENTION_BACKENDS.resolve
    if DEVICE.type == "cuda":
        assert resolve(None, DEVICE)[0] == "triton"
        return
    assert resolve(None, DEVICE)[0] == "sdpa"  # flash_attn: CUDA only
    assert resolve("triton", DEVICE)[0] == "triton"


def _skip_if_flash_attn_usable():
    if attention_mod._flash_attn_reason(DEVICE) is None:
        pytest.skip(f"flash_attn is installed and usable on {DEVICE}")


def test_backend_flash_attn_unavailable():
    _skip_if_flash_attn_usable()
    q, k, v = make_qkv(1, 2, 2, 8, 8, 64, torch.float32)
    with pytest.raises(RuntimeError, match="flash_attn"):  # not installed, or not on CUDA
        attention(q, k, v, backend="flash_attn")


def test_env_var_is_honoured(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 8, 24, 64, torch.float32)
    calls = []
    real = attention_mod.ATTENTION_BACKENDS.resolve

    def spy(requested, device, *inputs):
        name, impl = real(requested, device, *inputs)
        calls.append(name)
        return name, impl

    monkeypatch.setattr(attention_mod.ATTENTION_BACKENDS, "resolve", spy)
    for name in ("triton", "sdpa"):
        monkeypatch.setenv(attention_mod.ENV_VAR, name)
        check(attention(q, k, v), q, k, v)
    assert calls == ["triton", "sdpa"]
    monkeypatch.setenv(attention_mod.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        attention(q, k, v)
    assert attention(q, k, v, backend="sdpa").shape == q.shape  # the argument wins
    _skip_if_flash_attn_usable()
    monkeypatch.setenv(attention_mod.ENV_VAR, "flash_attn")
    with pytest.raises(RuntimeError, match=attention_mod.ENV_VAR):
        attention(q, k, v)


def test_flash_attn_unpadding(monkeypatch):
    """attention_flash_attn's layout and varlen unpadding, against a stand-in flash_attn module
    written in torch (the real one needs CUDA)."""
    import sys
    import types

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        assert not causal and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        out = torch.zeros_like(q)  # a sequence without keys: zeros, as flash-attn writes
        for j in range(len(cu_seqlens_q) - 1):
            qs, ks = slice(*cu_seqlens_q[j:j + 2].tolist()), slice(*cu_seqlens_k[j:j + 2].tolist())
            assert qs.stop - qs.start <= max_seqlen_q and ks.stop - ks.start <= max_seqlen_k
            if ks.stop > ks.start:
                out[qs] = attention_naive(*(x[None].transpose(1, 2) for x in
                                            (q[qs], k[ks], v[ks])))[0].transpose(0, 1)
        return out

    def dense(q, k, v, causal):
        assert not causal
        return attention_naive(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)

    fake = types.SimpleNamespace(flash_attn_func=dense, flash_attn_varlen_func=varlen)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    q, k, v = make_qkv(3, 4, 2, 6, 20, 64, torch.bfloat16)
    holes = torch.rand(3, 20, generator=torch.Generator().manual_seed(0)) < 0.5
    holes[0] = True  # a row with no padding among rows with holes anywhere
    for key_mask in (None, left_padded_mask(20, (0, 7, 20)), holes.to(DEVICE),
                     torch.zeros(3, 20, dtype=torch.bool, device=DEVICE)):
        out = attention_mod.attention_flash_attn(q, k, v, key_mask)
        check(out, q, k, v, key_mask)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        attention_mod.attention_flash_attn(q.float(), k.float(), v.float())


def test_flash_attn_unpadding_has_no_host_sync(monkeypatch):
    """The packing runs on meta tensors, which have no values: no int(), .item() or boolean
    indexing (host syncs, which a CUDA graph capture forbids) reads one."""
    import sys
    import types

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        assert cu_seqlens_k.shape == (4,) and k.shape == (3 * 20, 2, 64) and max_seqlen_k == 20
        return torch.empty_like(q)

    fake = types.SimpleNamespace(flash_attn_func=None, flash_attn_varlen_func=varlen)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    q = torch.empty(3, 4, 6, 64, dtype=torch.bfloat16, device="meta")
    k = v = torch.empty(3, 2, 20, 64, dtype=torch.bfloat16, device="meta")
    out = attention_mod.attention_flash_attn(q, k, v, torch.ones(3, 20, dtype=torch.bool,
                                                                 device="meta"))
    assert out.shape == q.shape and out.device.type == "meta"


def test_auto_falls_back_on_unsupported_head_dim(monkeypatch):
    """head_dim 12 is not a kernel size: "auto" runs SDPA instead, explicit "triton" errors."""
    monkeypatch.delenv("GENJO_FAST_ATTENTION", raising=False)
    q, k, v = (torch.randn(1, 2, 5, 12) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), attention_naive(q, k, v))
    with pytest.raises(RuntimeError, match="head_dim 12 is not one of"):
        attention(q, k, v, backend="triton")


def test_training_never_runs_the_forward_only_kernel(monkeypatch):
    """The kernel has no backward: with inputs that require grad, "auto" runs SDPA (gradients
    equal the oracle's) on every device, and asking for "triton" by name is an error instead
    of an output silently cut from the graph. Under no_grad the kernel stays available."""
    monkeypatch.delenv(attention_mod.ENV_VAR, raising=False)
    monkeypatch.setitem(attention_mod.ATTENTION_BACKENDS._auto_reasons, "triton",
                        lambda device, *inputs: None)  # as on CUDA: auto would pick triton
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 2, 5, 7, 64, torch.float32))
    resolve = attention_mod.ATTENTION_BACKENDS.resolve
    assert resolve(None, DEVICE, q)[0] != "triton"
    out = attention(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = torch.autograd.grad(attention_naive(q, k, v).square().sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    with pytest.raises(RuntimeError, match="no backward pass"):
        attention(q, k, v, backend="triton")
    with torch.no_grad():
        assert resolve(None, DEVICE, q)[0] == "triton"


def test_dispatch_resolves_training_apart(monkeypatch):
    """A model first run for inference (where auto may pick the forward-only kernel) and then
    trained must not keep that choice: the dispatcher resolves training inputs separately."""
    monkeypatch.delenv(attention_mod.ENV_VAR, raising=False)
    monkeypatch.setitem(attention_mod.ATTENTION_BACKENDS._auto_reasons, "triton",
                        lambda device, *inputs: None)  # as on CUDA: auto would pick triton
    dispatch = attention_mod.AttentionDispatch()
    q, k, v = make_qkv(1, 2, 2, 5, 7, 64, torch.float32)
    with torch.no_grad():
        assert dispatch.resolve(q)[0] == "triton"
    q.requires_grad_()
    assert dispatch.resolve(q)[0] != "triton"
