"""The Triton flash-attention kernel vs PyTorch SDPA at LLaDA-8B's attention shapes.

LLaDA-8B: 32 heads (as many k/v heads), head_dim 128, bf16; batch 1..8, length 512..4096.
Without a mask SDPA runs its FlashAttention backend; with a key-padding mask it runs the backend
PyTorch picks (FlashAttention takes no mask). Each case times both side by side and records
their TFLOP/s (``4 * B * H * Lq * Lk * D`` flops) and Triton's speed-up over SDPA; the kernel's
output must equal SDPA's within atol = rtol = 2e-2 (bf16). The GPU cases need CUDA; one tiny
case runs everywhere: on CPU through the Triton interpreter (set by conftest when there is no
GPU), else on the GPU, checked against the plain statement (``attention_naive``, fp32, atol
1e-5, rtol 1e-4). Run with
``pytest benchmarks/test_bench_flash_attention.py --benchmark-only -s``.
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


def record_tflops(bench, sides, flops):
    for name, side in sides.items():
        bench.figure(f"{name} throughput", flops / side.median / 1e12, "TFLOP/s")


@needs_cuda
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padded"])
@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"L{n}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
def test_bench_flash_attention_cuda(bench, batch, length, masked):
    q, k, v, key_mask = make_inputs(batch, HEADS, length, HEAD_DIM, torch.bfloat16,
                                    torch.device("cuda"), masked)
    bench.describe(dict(batch=batch, length=length, mask="padded" if masked else "none"),
                   batch=batch, heads=HEADS, length=length, head_dim=HEAD_DIM, dtype="bfloat16",
                   masked=masked)
    sides = bench.measure({"sdpa": lambda: sdpa(q, k, v, key_mask),
                           "triton": lambda: flash_attention(q, k, v, key_mask)}, repeats=20)
    bench.assert_close(sides["triton"].out, sides["sdpa"].out, "triton equal to SDPA",
                       atol=2e-2, rtol=2e-2)
    record_tflops(bench, sides, 4 * batch * HEADS * length * length * HEAD_DIM)
    bench.ratio("triton vs sdpa", "sdpa", "triton")


def test_bench_tiny(bench):
    """B1 H2 L64 D64 fp32, padded: through the interpreter on CPU (no GPU), else on the GPU."""
    device = torch.device("cpu" if fa._INTERPRETED else "cuda")
    if fa.unavailable_reason(device) is not None:
        pytest.skip(f"the kernel cannot run on {device}: {fa.unavailable_reason(device)}")
    q, k, v, key_mask = make_inputs(1, 2, 64, 64, torch.float32, device, True)
    bench.describe(dict(batch=1, length=64, mask="padded",
                        kernel="interpreter" if fa._INTERPRETED else "compiled"),
                   batch=1, heads=2, length=64, head_dim=64, dtype="float32", masked=True,
                   interpreter=fa._INTERPRETED)
    sides = bench.measure({"naive": lambda: attention_naive(q, k, v, key_mask),
                           "triton": lambda: flash_attention(q, k, v, key_mask)},
                          repeats=3, device=device)
    bench.assert_close(sides["triton"].out, sides["naive"].out,
                       "triton equal to the plain statement", atol=1e-5, rtol=1e-4)
    record_tflops(bench, sides, 4 * 2 * 64 * 64 * 64)
