"""The fused sampling kernel vs the reference's statements, at LLaDA's vocabulary.

One sampling step on ``rows`` positions of 126464 bf16 logits (1024 rows: a batch of 32 with a
32-token block, or 8 x 128; 32 rows: batch 1, the split-vocabulary path), temperature 0 and 1:

* ``reference``: the reference's statements on those rows: at temperature > 0 a float64
  uniform per logit and ``exp(l.double()) / (-log u) ** T``, the argmax, then
  ``softmax(logits)`` in bf16 and the gather of x0's probability;
* ``torch``: genjo_fast's torch backend (:mod:`genjo_fast.sampling`);
* ``triton``: the kernel, exact confidence (bf16 rows near a rounding boundary recomputed);
* ``triton_fp32``: the kernel, ``exact_confidence=False`` (no fallback, no host sync).

All four are timed side by side in one case; each case records their times, the bandwidth
``bytes of logits read / time``, the device copy bandwidth (``2 * bytes / time`` of a 1 GiB
clone, same run) and the speed-ups over the reference. Checks: at temperature 0 every side
picks the reference's tokens; the confidence is the reference's ``softmax(logits)[x0]`` in
bf16 bit for bit (``triton_fp32``: the float64 softmax within rtol 1e-5), at temperature 1 for
each side's own (random) tokens. The GPU cases need CUDA; ``test_bench_tiny`` runs everywhere
(on CPU through the Triton interpreter). Run with
``pytest benchmarks/test_bench_gumbel_argmax_confidence.py --benchmark-only -s``.
"""
import pytest
import torch

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from genjo_fast import sampling, timing  # noqa: E402
from genjo_fast.kernels import gumbel_argmax_confidence as gk  # noqa: E402

VOCAB = 126464

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU benchmark: needs CUDA (test_bench_tiny runs without it)")


def confidence_of(logits, x0):
    """The reference's confidence of the chosen tokens: ``softmax(logits)[x0]`` in the logits'
    dtype."""
    return torch.gather(F.softmax(logits, dim=-1), -1, x0[..., None]).squeeze(-1)


def reference_step(logits, temperature):
    """The reference's sampling statements on (B, N, V) logits."""
    if temperature == 0:
        noised = logits
    else:
        u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device)
        noised = logits.to(torch.float64).exp() / (-torch.log(u)) ** temperature
    x0 = noised.argmax(-1)
    return x0, confidence_of(logits, x0)


IMPLS = {
    "reference": reference_step,
    "torch": lambda logits, t: sampling.gumbel_argmax_confidence(
        logits, temperature=t, remasking="low_confidence"),
    "triton": lambda logits, t: gk.gumbel_argmax_confidence(
        logits, temperature=t, remasking="low_confidence"),
    "triton_fp32": lambda logits, t: gk.gumbel_argmax_confidence(
        logits, temperature=t, remasking="low_confidence", exact_confidence=False),
}


def check_sides(bench, sides, logits, temperature):
    """Every side against the reference's statements (see the module's docstring)."""
    for name, side in sides.items():
        if name == "reference":
            continue
        x0, conf = side.out
        bench.check(bool(((x0 >= 0) & (x0 < logits.shape[-1])).all()),
                    f"{name}: tokens in the vocabulary")
        if temperature == 0:
            bench.assert_equal(x0, sides["reference"].out[0], f"{name}: the reference's tokens")
        if name == "triton_fp32":
            want = torch.gather(torch.softmax(logits.double(), -1), -1, x0[..., None])
            bench.assert_close(conf.double(), want.squeeze(-1),
                               f"{name}: confidence = float64 softmax at its tokens",
                               atol=1e-30, rtol=1e-5)
        else:
            bench.assert_equal(conf, confidence_of(logits, x0),
                               f"{name}: confidence = the reference's softmax at its tokens")


_copy = {}


def copy_bandwidth():
    """Device copy bandwidth in bytes/s: ``2 * bytes / time`` of a 1 GiB clone."""
    if "bw" not in _copy:
        x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
        side = timing.measure({"copy": x.clone}, x.device, repeats=20)["copy"]
        _copy["bw"] = 2 * x.numel() * x.element_size() / side.median
        del x, side
    return _copy["bw"]


@needs_cuda
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["T0", "T1"])
@pytest.mark.parametrize("rows", [1024, 32], ids=lambda r: f"rows{r}")
def test_bench_gumbel_argmax_confidence_cuda(bench, rows, temperature):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(1, rows, VOCAB, generator=g, device="cuda") * 3).to(torch.bfloat16)
    bench.describe(dict(rows=rows, temperature=temperature), rows=rows, vocab=VOCAB,
                   temperature=temperature, dtype="bfloat16")
    copy = copy_bandwidth()
    sides = bench.measure({name: (lambda fn=fn: fn(logits, temperature))
                           for name, fn in IMPLS.items()}, repeats=20)
    check_sides(bench, sides, logits, temperature)
    read = logits.numel() * logits.element_size()
    bench.figure("copy bandwidth", copy / 1e9, "GB/s")
    for name, side in sides.items():
        bench.figure(f"{name} bandwidth", read / side.median / 1e9, "GB/s")
        if name != "reference":
            bench.ratio(f"{name} vs reference", "reference", name)
    bench.figure("triton fraction of copy", 100 * read / sides["triton"].median / copy, "%")


def test_bench_tiny(bench):
    """4 rows x 1000 bf16 logits at temperature 0: through the interpreter on CPU (no GPU),
    else on the GPU."""
    device = torch.device("cpu" if gk._INTERPRETED else "cuda")
    reason = gk.unavailable_reason(device)
    if reason is not None:
        pytest.skip(f"the kernel cannot run on {device}: {reason}")
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(1, 4, 1000, generator=g) * 3).to(device, torch.bfloat16)
    bench.describe(dict(rows=4, vocab=1000, kernel="interpreter" if gk._INTERPRETED
                        else "compiled"), rows=4, vocab=1000, temperature=0.0,
                   dtype="bfloat16", interpreter=gk._INTERPRETED)
    sides = bench.measure({name: (lambda fn=IMPLS[name]: fn(logits, 0.0))
                           for name in ("reference", "triton")}, repeats=3, device=device)
    check_sides(bench, sides, logits, 0.0)
