"""Transfer selection: each backend vs the reference's per-row ``topk`` loop.

Batch 32, block length 32 and 256, float32 confidences (``-inf`` where already decoded), the
top-k rule with a per-row k as the reference's schedule gives it:

* ``reference``: the reference's loop, one ``torch.topk`` per row (k read on the host);
* ``torch``: genjo_fast's torch backend (one batched stable sort);
* ``triton``: the Triton kernel (one launch, rank counting);
* ``cuda``: the CUDA extension's op (``genjo_fast._C``), when built.

Each case stores its time and its speed-up over the reference (same run). The GPU cases need
CUDA; ``test_bench_tiny`` runs everywhere (on CPU through the Triton interpreter). Run with
``pytest benchmarks/test_bench_select_transfer.py --benchmark-only -s``.
"""
import pytest
import torch

pytest.importorskip("triton")

from genjo_fast import cuda_ext, sampling  # noqa: E402
from genjo_fast.kernels import select_transfer as sk  # noqa: E402

BATCH = 32
_seconds = {}

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU benchmark: needs CUDA (test_bench_tiny runs without it)")


def reference_loop(confidence, num_transfer):
    """The reference's statement: a topk per row, k from the (B,) schedule tensor."""
    transfer = torch.zeros_like(confidence, dtype=torch.bool)
    for j in range(confidence.shape[0]):
        _, index = torch.topk(confidence[j], k=int(num_transfer[j]))
        transfer[j, index] = True
    return transfer


IMPLS = {"reference": reference_loop, "torch": sampling.select_transfer,
         "triton": sk.select_transfer, "cuda": cuda_ext.select_transfer}


def make_inputs(batch, block, device):
    g = torch.Generator().manual_seed(block)
    confidence = torch.rand(batch, block, generator=g)
    confidence[torch.rand(batch, block, generator=g) < 0.5] = -torch.inf  # half decoded
    finite = (confidence > -torch.inf).sum(1)
    k = torch.minimum(finite, torch.full_like(finite, max(1, block // 8)))
    return confidence.to(device), k.to(device)


# The reference runs first in each case so that the speed-ups come from the same run.
@needs_cuda
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("block", [32, 256], ids=lambda n: f"block{n}")
def test_bench_select_transfer_cuda(benchmark, block, impl):
    if impl == "cuda" and cuda_ext.is_available("cuda") is not None:
        pytest.skip(cuda_ext.is_available("cuda"))
    confidence, k = make_inputs(BATCH, block, torch.device("cuda"))
    fn = IMPLS[impl]
    got = fn(confidence, k)  # also compiles the kernel before timing
    assert torch.equal(got, sampling.select_transfer(confidence, k))

    def call():
        fn(confidence, k)
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=50, iterations=1, warmup_rounds=5)
    seconds = benchmark.stats.stats.median
    _seconds[block, impl] = seconds
    benchmark.extra_info.update(impl=impl, batch=BATCH, block=block, seconds=seconds,
                                device=torch.cuda.get_device_name())
    ref = _seconds.get((block, "reference"))
    if ref is not None and impl != "reference":
        benchmark.extra_info["speedup_vs_reference"] = ref / seconds
        print(f"\nbatch {BATCH} block {block} {impl}: {seconds * 1e6:.1f} us, "
              f"{ref / seconds:.1f}x reference")


def test_bench_tiny(benchmark):
    """Batch 4, block 32: the Triton kernel through the interpreter on CPU (no GPU), else on
    the GPU."""
    device = torch.device("cpu" if sk._INTERPRETED else "cuda")
    reason = sk.is_available(device)
    if reason is not None:
        pytest.skip(f"the kernel cannot run on {device}: {reason}")
    confidence, k = make_inputs(4, 32, device)

    def call():
        out = sk.select_transfer(confidence, k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    got = benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.equal(got.cpu(), reference_loop(confidence.cpu(), k.cpu()))
    benchmark.extra_info.update(impl="triton-interpreter" if sk._INTERPRETED else "triton",
                                seconds=benchmark.stats.stats.median, device=str(device))
