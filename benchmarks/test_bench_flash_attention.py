"""The Triton flash-attention kernel vs PyTorch SDPA at LLaDA-8B's attention shapes.

LLaDA-8B: 32 heads (as many k/v heads), head_dim 128, bf16; batch 1..8, length 512..4096.
Without a mask SDPA runs its FlashAttention backend; with a key-padding mask it runs the backend
PyTorch picks (FlashAttention takes no mask). Each case stores its time, TFLOP/s
(``4 * B * H * Lq * Lk * D`` flops) and, for Triton, its speedup over SDPA in ``extra_info``.
The GPU cases need CUDA; one tiny case runs everywhere: on CPU through the Triton interpreter
(set here, before triton is imported, when there is no GPU), else on the GPU. Run with
``pytest benchmarks/test_bench_flash_attention.py --benchmark-only``.
"""
import pytest
import torch

pytest.importorskip("triton")

from genjo_fast.attention import attention_naive, attention_sdpa  # noqa: E402
from genjo_fast.kernels import flash_attention as fa  # noqa: E402
from genjo_fast.kernels.flash_attention import flash_attention  # noqa: E402

HEADS, HEAD_DIM = 32, 128
BATCHES = (1, 4, 8)
LENGTHS = (512, 1024, 2048, 4096)
_seconds = {}

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU benchmark: needs CUDA (test_bench_tiny runs without it)")


def make_inputs(batch, heads, length, head_dim, dtype, device, masked):
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=g, device=device,
                           dtype=dtype) for _ in range(3))
    key_mask = None
    if masked:  # left padding, a different amount per row (at most a quarter of the keys)
        pads = torch.arange(batch, device=device) * 97 % (length // 4)
        key_mask = torch.arange(length, device=device)[None, :] >= pads[:, None]
    return q, k, v, key_mask


def sdpa(q, k, v, key_mask):
    if key_mask is not None:
        return attention_sdpa(q, k, v, key_mask)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return attention_sdpa(q, k, v)


IMPLS = {"triton": flash_attention, "sdpa": sdpa}


# SDPA runs first in each case so that Triton's speedup comes from the same run.
@needs_cuda
@pytest.mark.parametrize("impl", ["sdpa", "triton"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padded"])
@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"L{n}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
def test_bench_flash_attention_cuda(benchmark, batch, length, masked, impl):
    q, k, v, key_mask = make_inputs(batch, HEADS, length, HEAD_DIM, torch.bfloat16,
                                    torch.device("cuda"), masked)
    fn = IMPLS[impl]
    out = fn(q, k, v, key_mask)  # also compiles the kernel before timing
    if impl == "triton":  # a wrong kernel must not post a time
        torch.testing.assert_close(out, sdpa(q, k, v, key_mask), atol=2e-2, rtol=2e-2)

    def call():
        fn(q, k, v, key_mask)
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=3)
    seconds = benchmark.stats.stats.median
    flops = 4 * batch * HEADS * length * length * HEAD_DIM
    case = (batch, length, masked)
    _seconds[case, impl] = seconds
    benchmark.extra_info.update(impl=impl, batch=batch, heads=HEADS, length=length,
                                head_dim=HEAD_DIM, masked=masked, seconds=seconds,
                                tflops=flops / seconds / 1e12,
                                device=torch.cuda.get_device_name())
    if impl == "triton" and (case, "sdpa") in _seconds:
        benchmark.extra_info["speedup_vs_sdpa"] = _seconds[case, "sdpa"] / seconds
        print(f"\nB{batch} L{length} {'padded' if masked else 'nomask'}: triton "
              f"{flops / seconds / 1e12:.0f} TFLOP/s, "
              f"{_seconds[case, 'sdpa'] / seconds:.2f}x SDPA")


def test_bench_tiny(benchmark):
    """B1 H2 L64 D64 fp32, padded: through the interpreter on CPU (no GPU), else on the GPU."""
    device = torch.device("cpu" if fa._INTERPRETED else "cuda")
    if fa.is_available(device) is not None:
        pytest.skip(f"the kernel cannot run on {device}: {fa.is_available(device)}")
    q, k, v, key_mask = make_inputs(1, 2, 64, 64, torch.float32, device, True)

    def call():
        out = flash_attention(q, k, v, key_mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(out, attention_naive(q, k, v, key_mask), atol=1e-5, rtol=1e-4)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(impl="triton-interpreter" if fa._INTERPRETED else "triton",
                                seconds=seconds, tflops=4 * 2 * 64 * 64 * 64 / seconds / 1e12,
                                device=str(device))
