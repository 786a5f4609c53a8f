"""Transfer selection: each backend vs the reference's per-row ``topk`` loop.

Batch 32, block length 32 and 256, float32 confidences (``-inf`` where already decoded), the
top-k rule with a per-row k as the reference's schedule gives it:

* ``reference``: the reference's loop, one ``torch.topk`` per row (k read on the host);
* ``torch``: genjo_fast's torch backend (one batched stable sort);
* ``triton``: the Triton kernel (one launch, rank counting);
* ``cuda``: the CUDA extension's op (``genjo_fast._C``), when built.

All sides are timed side by side in one case; each must select exactly the reference loop's
positions (the confidences have no ties). The GPU cases need CUDA; ``test_bench_tiny`` runs
everywhere (on CPU through the Triton interpreter). Run with
``pytest benchmarks/test_bench_select_transfer.py --benchmark-only -s``.
"""
import pytest
import torch

pytest.importorskip("triton")

from genjo_fast import cuda_ext, sampling  # noqa: E402
from genjo_fast.kernels import select_transfer as sk  # noqa: E402

BATCH = 32

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


def make_inputs(batch, block, device):
    g = torch.Generator().manual_seed(block)
    confidence = torch.rand(batch, block, generator=g)
    confidence[torch.rand(batch, block, generator=g) < 0.5] = -torch.inf  # half decoded
    finite = (confidence > -torch.inf).sum(1)
    k = torch.minimum(finite, torch.full_like(finite, max(1, block // 8)))
    return confidence.to(device), k.to(device)


def check_against_reference(bench, sides):
    for name, side in sides.items():
        if name != "reference":
            bench.assert_equal(side.out, sides["reference"].out,
                               f"{name}: the reference loop's positions")


@needs_cuda
@pytest.mark.parametrize("block", [32, 256], ids=lambda n: f"block{n}")
def test_bench_select_transfer_cuda(bench, block):
    confidence, k = make_inputs(BATCH, block, torch.device("cuda"))
    impls = {"reference": reference_loop, "torch": sampling.select_transfer,
             "triton": sk.select_transfer}
    missing = cuda_ext.unavailable_reason("cuda")  # None when the extension is built
    if missing is None:
        impls["cuda"] = cuda_ext.select_transfer
    bench.describe(dict(batch=BATCH, block=block), batch=BATCH, block=block,
                   cuda_extension=missing or "timed")
    sides = bench.measure({name: (lambda fn=fn: fn(confidence, k)) for name, fn in impls.items()},
                          repeats=50)
    check_against_reference(bench, sides)
    for name in sides:
        if name != "reference":
            bench.ratio(f"{name} vs reference", "reference", name)


def test_bench_tiny(bench):
    """Batch 4, block 32: the Triton kernel through the interpreter on CPU (no GPU), else on
    the GPU."""
    device = torch.device("cpu" if sk._INTERPRETED else "cuda")
    reason = sk.unavailable_reason(device)
    if reason is not None:
        pytest.skip(f"the kernel cannot run on {device}: {reason}")
    confidence, k = make_inputs(4, 32, device)
    bench.describe(dict(batch=4, block=32,
                        kernel="interpreter" if sk._INTERPRETED else "compiled"),
                   batch=4, block=32, interpreter=sk._INTERPRETED)
    sides = bench.measure({"reference": lambda: reference_loop(confidence, k),
                           "triton": lambda: sk.select_transfer(confidence, k)},
                          repeats=3, device=device)
    check_against_reference(bench, sides)
