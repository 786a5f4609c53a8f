"""The fused sampling kernel vs the reference's statements, at LLaDA's vocabulary.

One sampling step on ``rows`` positions of 126464 bf16 logits (1024 rows: a batch of 32 with a
32-token block, or 8 x 128; 32 rows: batch 1, the split-vocabulary path), temperature 0 and 1:

* ``reference``: the reference's statements on those rows: at temperature > 0 a float64
  uniform per logit and ``exp(l.double()) / (-log u) ** T``, the argmax, then
  ``softmax(logits)`` in bf16 and the gather of x0's probability;
* ``torch``: genjo_fast's torch backend (:mod:`genjo_fast.sampling`);
* ``triton``: the kernel, exact confidence (bf16 rows near a rounding boundary recomputed);
* ``triton_fp32``: the kernel, ``exact_confidence=False`` (no fallback, no host sync).

Each case stores its time, the bandwidth ``bytes of logits read / time`` and, in the same run,
the device copy bandwidth (``2 * bytes / time`` of a 1 GiB clone) and the speed-up over the
reference. The GPU cases need CUDA; ``test_bench_tiny`` runs everywhere (on CPU through the
Triton interpreter). Run with
``pytest benchmarks/test_bench_gumbel_argmax_confidence.py --benchmark-only -s``.
"""
import pytest
import torch

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from genjo_fast import sampling  # noqa: E402
from genjo_fast.kernels import gumbel_argmax_confidence as gk  # noqa: E402

VOCAB = 126464
_seconds = {}
_copy = {}

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU benchmark: needs CUDA (test_bench_tiny runs without it)")


def reference_step(logits, temperature):
    """The reference's sampling statements on (B, N, V) logits."""
    if temperature == 0:
        noised = logits
    else:
        u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device)
        noised = logits.to(torch.float64).exp() / (-torch.log(u)) ** temperature
    x0 = noised.argmax(-1)
    p = F.softmax(logits, dim=-1)
    return x0, torch.gather(p, -1, x0[..., None]).squeeze(-1)


IMPLS = {
    "reference": reference_step,
    "torch": lambda logits, t: sampling.gumbel_argmax_confidence(
        logits, temperature=t, remasking="low_confidence"),
    "triton": lambda logits, t: gk.gumbel_argmax_confidence(
        logits, temperature=t, remasking="low_confidence"),
    "triton_fp32": lambda logits, t: gk.gumbel_argmax_confidence(
        logits, temperature=t, remasking="low_confidence", exact_confidence=False),
}


def cuda_seconds(fn, reps=20):
    """Median of ``reps`` timings with CUDA events (after a warm-up)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth():
    """Device copy bandwidth in bytes/s: ``2 * bytes / time`` of a 1 GiB clone."""
    if "bw" not in _copy:
        x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
        _copy["bw"] = 2 * x.numel() * x.element_size() / cuda_seconds(lambda: x.clone())
        del x
    return _copy["bw"]


# The reference runs first in each case so that the speed-ups come from the same run.
@needs_cuda
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["T0", "T1"])
@pytest.mark.parametrize("rows", [1024, 32], ids=lambda r: f"rows{r}")
def test_bench_gumbel_argmax_confidence_cuda(benchmark, rows, temperature, impl):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(1, rows, VOCAB, generator=g, device="cuda") * 3).to(torch.bfloat16)
    fn = IMPLS[impl]
    x0, conf = fn(logits, temperature)  # also compiles the kernel before timing
    if impl.startswith("triton") and temperature == 0:  # a wrong kernel must not post a time
        ref_x0, ref_conf = reference_step(logits, 0.0)
        assert torch.equal(x0, ref_x0)
        if impl == "triton":
            assert torch.equal(conf, ref_conf)

    def call():
        fn(logits, temperature)
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=3)
    seconds = benchmark.stats.stats.median
    read = logits.numel() * logits.element_size()
    bandwidth, copy = read / seconds, copy_bandwidth()
    _seconds[rows, temperature, impl] = seconds
    benchmark.extra_info.update(impl=impl, rows=rows, vocab=VOCAB, temperature=temperature,
                                seconds=seconds, gb_per_s=bandwidth / 1e9,
                                copy_gb_per_s=copy / 1e9, fraction_of_copy=bandwidth / copy,
                                device=torch.cuda.get_device_name())
    ref = _seconds.get((rows, temperature, "reference"))
    if ref is not None and impl != "reference":
        benchmark.extra_info["speedup_vs_reference"] = ref / seconds
        print(f"\nrows {rows} T{temperature:g} {impl}: {seconds * 1e6:.0f} us, "
              f"{bandwidth / 1e9:.0f} GB/s ({bandwidth / copy:.0%} of copy "
              f"{copy / 1e9:.0f} GB/s), {ref / seconds:.1f}x reference")


def test_bench_tiny(benchmark):
    """4 rows x 1000 bf16 logits at temperature 0: through the interpreter on CPU (no GPU),
    else on the GPU."""
    device = torch.device("cpu" if gk._INTERPRETED else "cuda")
    reason = gk.is_available(device)
    if reason is not None:
        pytest.skip(f"the kernel cannot run on {device}: {reason}")
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(1, 4, 1000, generator=g) * 3).to(device, torch.bfloat16)

    def call():
        out = gk.gumbel_argmax_confidence(logits, temperature=0.0, remasking="low_confidence")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    x0, conf = benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
    ref_x0, ref_conf = reference_step(logits, 0.0)
    assert torch.equal(x0, ref_x0) and torch.equal(conf, ref_conf)
    benchmark.extra_info.update(impl="triton-interpreter" if gk._INTERPRETED else "triton",
                                seconds=benchmark.stats.stats.median, device=str(device))
