"""The torch backend's sampling op against the reference's full-tensor arithmetic."""
import pytest
import torch
import torch.nn.functional as F

from genjo_fast import reference, sampling
from genjo_fast.contract import combine_cfg


def reference_sample(logits, un_logits, cfg_scale, temperature, remasking, eos_inf, eot_inf,
                     uniform, remask_u, eos_id, eot_id):
    """The reference's per-step statements, on the whole (B, N, V) tensor."""
    if un_logits is not None:
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
    else:
        logits = logits.clone()
    if eos_inf:
        logits[:, :, eos_id] = -torch.inf
    noised = reference.add_gumbel_noise(logits, temperature, lambda: uniform)
    x0 = noised.argmax(-1)
    if eot_inf:
        noised[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
    if remasking == "random":
        return x0, remask_u
    return x0, F.softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.6])
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("flags", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_matches_reference(monkeypatch, dtype, temperature, cfg, flags, remasking):
    monkeypatch.setattr(sampling, "_MAX_CHUNK_ELEMENTS", 3 * 2 * 257)  # several chunks
    batch, seq, num_pos, vocab, start = 2, 11, 7, 257, 3
    eos_id, eot_id = 5, 9
    g = torch.Generator().manual_seed(0)
    full = (torch.randn(batch, seq, vocab, generator=g) * 3).to(dtype)
    full[:, :, eos_id] += 4  # make EOS a frequent argmax so the flags matter
    logits = full[:, start:start + num_pos]  # a strided block slice, as generate passes it
    un_logits = (torch.randn(batch, num_pos, vocab, generator=g) * 3).to(dtype) if cfg else None
    uniform = torch.rand(batch, num_pos, vocab, generator=g, dtype=torch.float64)
    remask_u = torch.rand(batch, num_pos, generator=g)
    before = full.clone()
    x0, conf = sampling.gumbel_argmax_confidence(
        logits, un_logits=un_logits, cfg_scale=1.5, temperature=temperature,
        remasking=remasking, logits_eos_inf=flags[0], confidence_eos_eot_inf=flags[1],
        eos_id=eos_id, eot_id=eot_id, gumbel_uniform=lambda a, b: uniform[:, a:b],
        remask_uniform=lambda a, b: remask_u[:, a:b])
    ref_x0, ref_conf = reference_sample(logits, un_logits, 1.5, temperature, remasking, *flags,
                                        uniform, remask_u, eos_id, eot_id)
    assert torch.equal(x0, ref_x0)
    assert conf.dtype == ref_conf.dtype
    assert torch.equal(conf, ref_conf)
    assert torch.equal(full, before), "the caller's logits were modified"


def test_no_full_float64_tensor(monkeypatch):
    """At temperature > 0 the float64 temporaries are bounded by the chunk size."""
    monkeypatch.setattr(sampling, "_MAX_CHUNK_ELEMENTS", 2 * 101)
    shapes = []

    def uniform(a, b):
        shapes.append(b - a)
        return torch.rand(2, b - a, 101, dtype=torch.float64)

    sampling.gumbel_argmax_confidence(torch.randn(2, 5, 101), temperature=1.0,
                                      remasking="low_confidence", gumbel_uniform=uniform)
    assert shapes == [1] * 5


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_default_sampling_frequencies(temperature):
    """Without injected draws, x0 follows softmax(logits / T) (support and frequencies),
    including -inf logits (EOS forbidden), and a seeded generator reproduces it."""
    vocab, n = 7, 20000
    base = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.1, -0.4, 0.9])
    logits = base.expand(1, n, vocab).clone()
    kw = dict(temperature=temperature, remasking="low_confidence", logits_eos_inf=True, eos_id=2)
    x0, _ = sampling.gumbel_argmax_confidence(logits, generator=torch.Generator().manual_seed(0),
                                              **kw)
    again, _ = sampling.gumbel_argmax_confidence(logits,
                                                 generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(x0, again)
    freq = torch.bincount(x0.flatten(), minlength=vocab).double() / n
    masked = base.double().clone()
    masked[2] = -torch.inf
    expected = torch.softmax(masked / temperature, 0)
    assert freq[2] == 0
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-4)


# ---------------------------------------------------------------------------------------------
# The Triton kernel (genjo_fast.kernels.gumbel_argmax_confidence) against the torch op above.
# Without a GPU the kernel runs on CPU tensors through the Triton interpreter (tests/conftest.py
# sets TRITON_INTERPRET=1 before triton is imported); on a GPU machine, on CUDA tensors. Shapes
# stay small: the interpreter pays per program and per loop trip.
# ---------------------------------------------------------------------------------------------
import os  # noqa: E402

from genjo_fast import generate as fast_generate  # noqa: E402
from genjo_fast.kernels import gumbel_argmax_confidence as gk  # noqa: E402
from genjo_fast.testing import TinyBidirectionalLM, random_prompts  # noqa: E402

if gk.unavailable_reason("cpu") is None:
    KDEVICE = torch.device("cpu")
elif gk.unavailable_reason("cuda") is None:
    KDEVICE = torch.device("cuda")
else:
    KDEVICE = None
needs_kernel = pytest.mark.skipif(
    KDEVICE is None,
    reason=f"the Triton kernel cannot run here: {gk.unavailable_reason('cpu')}")
KERNEL_EOS, KERNEL_EOT = 5, 9


def kernel_inputs(dtype, vocab, cfg, batch=2, num_pos=5, seed=0, ties=False):
    """Block slices (strided views) of (B, L, V) logits, as generate passes them."""
    g = torch.Generator().manual_seed(seed + vocab)
    shape = (batch, num_pos + 4, vocab)
    if ties:  # few distinct values: ties for the argmax, also across chunks
        full = torch.randint(-6, 4, shape, generator=g).float() / 2
    else:
        full = torch.randn(shape, generator=g) * 3
    full[:, :, KERNEL_EOS] += 4  # EOS a frequent argmax, so that the EOS options matter
    full = full.to(KDEVICE, dtype)
    un = (torch.randn(shape, generator=g) * 3).to(KDEVICE, dtype) if cfg else None
    return full[:, 2:2 + num_pos], (un[:, 1:1 + num_pos] if cfg else None)


def small_chunks(monkeypatch, block_v=64, block_r=2):
    """Forces several vocabulary chunks and several programs per call."""
    monkeypatch.setattr(gk, "_launch_config", lambda n_rows, vocab, sample: (block_r, block_v, 4))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [257, 1000])
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("flags", [(False, False), (True, True), (False, True)])
def test_kernel_temperature0_equals_torch_op(dtype, vocab, cfg, flags):
    """ids and confidence bit-identical to the torch op (exact_confidence), with CFG (a scale
    that is not representable in bf16, so the rounding sequence matters) and the EOS options."""
    logits, un = kernel_inputs(dtype, vocab, cfg, ties=vocab == 257)
    before = logits.clone()
    kw = dict(temperature=0.0, remasking="low_confidence", un_logits=un, cfg_scale=0.1,
              logits_eos_inf=flags[0], confidence_eos_eot_inf=flags[1], eos_id=KERNEL_EOS,
              eot_id=KERNEL_EOT)
    x0, conf = gk.gumbel_argmax_confidence(logits, **kw)
    ref_x0, ref_conf = sampling.gumbel_argmax_confidence(logits, **kw)
    assert torch.equal(x0, ref_x0)
    assert conf.dtype == ref_conf.dtype == dtype
    assert torch.equal(conf, ref_conf)
    assert torch.equal(logits, before), "the caller's logits were modified"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_chunked_ties_and_programs(monkeypatch, dtype):
    """Several vocabulary chunks per row and rows per program: ties go to the lowest id across
    chunk boundaries; the rows past the end of the last program are not written."""
    small_chunks(monkeypatch)
    logits, un = kernel_inputs(dtype, 300, cfg=True, batch=3, num_pos=3, ties=True)
    logits[0, 0] = 1.0  # every id ties: x0 = 0
    logits[0, 1, 200] = logits[0, 1, 70] = 50.0  # the max twice, in different chunks: 70
    for kw in (dict(), dict(un_logits=un, cfg_scale=1.5, logits_eos_inf=True)):
        kw.update(temperature=0.0, remasking="low_confidence", eos_id=KERNEL_EOS)
        x0, conf = gk.gumbel_argmax_confidence(logits, **kw)
        ref_x0, ref_conf = sampling.gumbel_argmax_confidence(logits, **kw)
        assert torch.equal(x0, ref_x0) and torch.equal(conf, ref_conf)
        if "un_logits" not in kw:
            assert x0[0, 0] == 0 and x0[0, 1] == 70


@needs_kernel
@pytest.mark.parametrize("temperature,remasking", [(0.0, "low_confidence"), (0.9, "random"),
                                                   (1.3, "low_confidence")])
def test_kernel_split_vocabulary(monkeypatch, temperature, remasking):
    """Rows split over several programs (as on a GPU with few rows) and merged by the second
    kernel: the same x0 as one program per row (the noise is keyed by (row, id), not by the
    launch), and at temperature 0 the torch op's results."""
    small_chunks(monkeypatch, block_v=64, block_r=4)
    logits, un = kernel_inputs(torch.bfloat16, 1000, cfg=True, batch=2, num_pos=3, ties=True)
    kw = dict(temperature=temperature, remasking=remasking, un_logits=un, cfg_scale=0.5,
              confidence_eos_eot_inf=True, eos_id=KERNEL_EOS, eot_id=KERNEL_EOT)
    whole = gk.gumbel_argmax_confidence(logits, generator=make_generator(2), **kw)
    monkeypatch.setattr(gk, "_num_splits", lambda *args: 5)
    split = gk.gumbel_argmax_confidence(logits, generator=make_generator(2), **kw)
    assert torch.equal(split[0], whole[0]) and torch.equal(split[1], whole[1])
    if temperature == 0:
        ref_x0, ref_conf = sampling.gumbel_argmax_confidence(logits, **kw)
        assert torch.equal(split[0], ref_x0) and torch.equal(split[1], ref_conf)
    fp32 = gk.gumbel_argmax_confidence(logits, generator=make_generator(2),
                                       exact_confidence=False, **kw)
    assert torch.equal(fp32[0], whole[0])


@needs_kernel
def test_kernel_llada_vocabulary():
    """Once at LLaDA's vocabulary (126464, not a power of two) with its EOS/EoT ids, bf16."""
    g = torch.Generator().manual_seed(0)
    full = (torch.randn(1, 4, 126464, generator=g) * 4).to(KDEVICE, torch.bfloat16)
    full[:, :, 126081] += 12  # EOS wins the argmax: the EOS options change the outcome
    for flags in [(False, False), (True, True), (False, True)]:
        kw = dict(temperature=0.0, remasking="low_confidence", logits_eos_inf=flags[0],
                  confidence_eos_eot_inf=flags[1])
        x0, conf = gk.gumbel_argmax_confidence(full[:, 1:3], **kw)
        ref_x0, ref_conf = sampling.gumbel_argmax_confidence(full[:, 1:3], **kw)
        assert torch.equal(x0, ref_x0) and torch.equal(conf, ref_conf)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_kernel_fp32_confidence_close_to_softmax(dtype, temperature):
    """exact_confidence=False: the kernel's float32 probability of x0, no fallback."""
    logits, un = kernel_inputs(dtype, 1000, cfg=True)
    kw = dict(temperature=temperature, remasking="low_confidence", un_logits=un, cfg_scale=1.5,
              confidence_eos_eot_inf=True, eos_id=KERNEL_EOS, eot_id=KERNEL_EOT)
    x0, conf = gk.gumbel_argmax_confidence(logits, exact_confidence=False,
                                           generator=make_generator(0), **kw)
    assert conf.dtype == torch.float32
    chunk = combine_cfg(logits, un, 1.5).double()
    chunk[..., KERNEL_EOT] = -torch.inf
    if temperature == 0:
        chunk[..., KERNEL_EOS] = -torch.inf
    want = torch.softmax(chunk, -1).gather(-1, x0[..., None]).squeeze(-1)
    torch.testing.assert_close(conf.double(), want, rtol=1e-5, atol=1e-30)
    if temperature == 0:
        ref_x0, ref_conf = sampling.gumbel_argmax_confidence(logits, **kw)
        assert torch.equal(x0, ref_x0)
        # rounded to the dtype: torch's value, or a neighbour near a rounding boundary
        torch.testing.assert_close(conf.to(dtype), ref_conf, rtol=4 * torch.finfo(dtype).eps,
                                   atol=0)


def make_generator(seed):
    return torch.Generator(device=KDEVICE).manual_seed(seed)


@needs_kernel
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_kernel_sampling_frequencies(monkeypatch, temperature):
    """x0 ~ softmax(logits / T): per-id 4-sigma bounds and a chi-square bound over many rows of
    the same logits; -inf and EOS-forbidden ids never appear. The confidence is the softmax
    probability of the sampled id (with the quirk: EoT left the softmax, EOS did not)."""
    # two chunks per row; many rows per program under the interpreter
    small_chunks(monkeypatch, block_v=8, block_r=4096 if KDEVICE.type == "cpu" else 64)
    base = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.1, -torch.inf, 0.9, -0.4, 1.6, 0.5, -2.0])
    vocab, n, eos, eot = base.numel(), 40000, 2, 8
    logits = base.expand(1, n, vocab).to(KDEVICE)
    kw = dict(temperature=temperature, remasking="low_confidence", logits_eos_inf=True,
              confidence_eos_eot_inf=True, eos_id=eos, eot_id=eot)
    x0, conf = gk.gumbel_argmax_confidence(logits, generator=make_generator(1), **kw)
    counts = torch.bincount(x0.flatten().cpu(), minlength=vocab).double()
    masked = base.double().clone()
    masked[eos] = -torch.inf
    expected = torch.softmax(masked / temperature, 0)
    assert counts[eos] == 0 and counts[5] == 0  # forbidden / -inf never sampled
    freq = counts / n
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-4)
    support = expected > 0
    chi2 = ((counts[support] - n * expected[support]) ** 2 / (n * expected[support])).sum()
    assert chi2 < 35  # 8 degrees of freedom: P(chi2 > 35) < 3e-5
    p = masked.float().to(KDEVICE)
    p[eot] = -torch.inf
    assert torch.equal(conf.flatten(), torch.softmax(p, 0)[x0.flatten()])


@needs_kernel
def test_kernel_seed_reproducibility():
    """Same generator seed -> same draws; another seed or the advanced generator -> others."""
    logits, un = kernel_inputs(torch.bfloat16, 1000, cfg=True, batch=2, num_pos=8)
    logits = torch.zeros_like(logits)  # uniform: every draw is informative
    for remasking in ("low_confidence", "random"):
        kw = dict(temperature=1.0, remasking=remasking, un_logits=un, cfg_scale=0.5)
        a = gk.gumbel_argmax_confidence(logits, generator=make_generator(7), **kw)
        b = gk.gumbel_argmax_confidence(logits, generator=make_generator(7), **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        c = gk.gumbel_argmax_confidence(logits, generator=make_generator(8), **kw)
        assert not torch.equal(a[0], c[0])
        g = make_generator(7)
        first = gk.gumbel_argmax_confidence(logits, generator=g, **kw)
        second = gk.gumbel_argmax_confidence(logits, generator=g, **kw)
        assert torch.equal(first[0], a[0]) and not torch.equal(second[0], a[0])


@needs_kernel
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kernel_random_remasking(temperature):
    """remasking='random': a float32 U(0, 1) per position from Philox; x0 as usual."""
    logits, _ = kernel_inputs(torch.bfloat16, 257, cfg=False, batch=4, num_pos=500)
    x0, conf = gk.gumbel_argmax_confidence(logits, temperature=temperature, remasking="random",
                                           generator=make_generator(3))
    assert conf.dtype == torch.float32 and conf.shape == (4, 500)
    assert ((conf >= 0) & (conf < 1)).all()
    assert conf.unique().numel() > 1900
    assert abs(conf.double().mean().item() - 0.5) < 4 * (1 / 12 / 2000) ** 0.5
    assert torch.equal(conf * 2**24, (conf * 2**24).floor())  # torch.rand's 24-bit lattice
    if temperature == 0:
        assert torch.equal(x0, logits.argmax(-1))


@needs_kernel
@pytest.mark.parametrize("remasking,exact", [("low_confidence", True),
                                             ("low_confidence", False), ("random", True)])
def test_kernel_writes_every_output(remasking, exact):
    """out= buffers poisoned with NaN / -1 are fully overwritten, with the values of a plain
    call (several programs, a partial last one)."""
    logits, _ = kernel_inputs(torch.bfloat16, 257, cfg=False, batch=3, num_pos=7)
    kw = dict(temperature=0.8, remasking=remasking, exact_confidence=exact)
    want = gk.gumbel_argmax_confidence(logits, generator=make_generator(5), **kw)
    dtype = torch.bfloat16 if remasking == "low_confidence" and exact else torch.float32
    out = (torch.full((3, 7), -1, dtype=torch.long, device=KDEVICE),
           torch.full((3, 7), float("nan"), dtype=dtype, device=KDEVICE))
    got = gk.gumbel_argmax_confidence(logits, generator=make_generator(5), out=out, **kw)
    assert got[0] is out[0] and got[1] is out[1]
    assert not out[1].isnan().any() and (out[0] >= 0).all()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    with pytest.raises(ValueError, match="out\\[1\\]"):
        gk.gumbel_argmax_confidence(logits, out=(out[0], out[1].double()), **kw)


@needs_kernel
@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_kernel_injected_draws_delegate_to_torch_op(temperature):
    """With gumbel_uniform / remask_uniform the reference's formula is applied to those draws."""
    logits, un = kernel_inputs(torch.bfloat16, 257, cfg=True)
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(2, 5, 257, generator=g, dtype=torch.float64).to(KDEVICE)
    remask_u = torch.rand(2, 5, generator=g).to(KDEVICE)
    for remasking in ("low_confidence", "random"):
        kw = dict(temperature=temperature, remasking=remasking, un_logits=un, cfg_scale=1.5,
                  gumbel_uniform=lambda a, b: uniform[:, a:b],
                  remask_uniform=lambda a, b: remask_u[:, a:b])
        got = gk.gumbel_argmax_confidence(logits, **kw)
        want = sampling.gumbel_argmax_confidence(logits, **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_kernel
@pytest.mark.parametrize("bad,error,match", [
    (dict(logits=torch.zeros(2, 3)), ValueError, "logits must have shape"),
    (dict(logits=torch.zeros(1, 2, 3, dtype=torch.int32)), TypeError, "logits dtype"),
    (dict(un_logits=torch.zeros(1, 2, 5)), ValueError, "un_logits shape"),
    (dict(remasking="lowest"), ValueError, "remasking must be one of"),
    (dict(temperature=-1.0), ValueError, "temperature must be"),
    (dict(logits_eos_inf=True, eos_id=10), ValueError, "eos_id must be an int in"),
    (dict(confidence_eos_eot_inf=True, eot_id=-1), ValueError, "eot_id must be an int in"),
])
def test_kernel_validation(bad, error, match):
    kw = dict(logits=torch.zeros(1, 2, 4, device=KDEVICE), temperature=0.0,
              remasking="low_confidence", eos_id=0, eot_id=1)
    kw.update({k: v.to(KDEVICE) if isinstance(v, torch.Tensor) else v for k, v in bad.items()})
    with pytest.raises(error, match=match):
        gk.gumbel_argmax_confidence(kw.pop("logits"), **kw)


@needs_kernel
@pytest.mark.parametrize("dtype,cfg_scale,flags", [
    (torch.float32, 0.0, (False, False)),
    (torch.bfloat16, 1.0, (True, True)),
])
def test_generate_triton_backend_equals_torch_backend(monkeypatch, dtype, cfg_scale, flags):
    """GENJO_FAST_BACKEND=triton: generate runs the kernels end to end and, at temperature 0,
    gives the torch backend's tokens."""
    vocab, mask_id, eos, eot = 130, 129, 48, 117
    model = TinyBidirectionalLM(vocab, d_model=32, n_heads=2, n_layers=1, seed=0,
                                dtype=dtype).to(KDEVICE)
    prompt, attention_mask = random_prompts(2, 5, vocab, pad_id=eos, avoid=(mask_id,))
    kw = dict(steps=8, gen_length=16, block_length=8, temperature=0.0, cfg_scale=cfg_scale,
              mask_id=mask_id, logits_eos_inf=flags[0], confidence_eos_eot_inf=flags[1],
              eos_id=eos, eot_id=eot)
    prompt, attention_mask = prompt.to(KDEVICE), attention_mask.to(KDEVICE)
    monkeypatch.setenv("GENJO_FAST_BACKEND", "triton")
    got = fast_generate(model, prompt, attention_mask, **kw)
    monkeypatch.setenv("GENJO_FAST_BACKEND", "torch")
    want = fast_generate(model, prompt, attention_mask, **kw)
    assert torch.equal(got, want)
    assert not (got == mask_id).any()
    monkeypatch.delenv("GENJO_FAST_BACKEND")
    if KDEVICE.type == "cpu":  # auto does not pick the interpreter on CPU
        from genjo_fast.backends import SAMPLING_BACKENDS
        assert SAMPLING_BACKENDS.resolve(None, KDEVICE)[0] == "torch"
        assert os.environ.get("TRITON_INTERPRET") == "1"


@needs_kernel
def test_generate_triton_backend_sampling_reproducible():
    """temperature > 0 and random remasking through the kernels: a seeded generator gives the
    same tokens twice, another seed other tokens; every position gets decoded."""
    vocab, mask_id = 130, 129
    model = TinyBidirectionalLM(vocab, d_model=32, n_heads=2, n_layers=1, seed=0).to(KDEVICE)
    prompt, attention_mask = random_prompts(2, 5, vocab, pad_id=48, avoid=(mask_id,))
    kw = dict(steps=8, gen_length=16, block_length=8, temperature=1.0, remasking="random",
              mask_id=mask_id, backend="triton")
    prompt, attention_mask = prompt.to(KDEVICE), attention_mask.to(KDEVICE)
    runs = [fast_generate(model, prompt, attention_mask, generator=make_generator(seed), **kw)
            for seed in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not (runs[0] == mask_id).any()


@pytest.mark.parametrize("temperature,injected", [(0.0, False), (0.7, False), (0.7, True)])
def test_float64_logits_are_not_modified(temperature, injected):
    """float64 logits: .to(float64) is the tensor itself, so the in-place noise must work on a
    copy; the confidence is computed from the untouched logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 33, generator=g, dtype=torch.float64)
    before = logits.clone()
    uniform = torch.rand(2, 5, 33, generator=g, dtype=torch.float64)
    kw = dict(gumbel_uniform=lambda a, b: uniform[:, a:b]) if injected else dict(generator=g)
    x0, conf = sampling.gumbel_argmax_confidence(logits, temperature=temperature,
                                                 remasking="low_confidence", **kw)
    assert torch.equal(logits, before)
    assert torch.equal(conf, torch.softmax(before, -1).gather(-1, x0[..., None])[..., 0])


@needs_kernel
def test_kernel_float64_logits_run_the_torch_op():
    """float64 logits (a float64 model) are not a kernel dtype: the launcher hands them to the
    torch op instead of failing, so an automatic GPU backend still serves float64 models."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 40, generator=g, dtype=torch.float64).to(KDEVICE)
    got = gk.gumbel_argmax_confidence(logits, temperature=0.0, remasking="low_confidence")
    want = sampling.gumbel_argmax_confidence(logits, temperature=0.0, remasking="low_confidence")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# NaN: torch.argmax counts NaN above every number (a row's first NaN is its argmax) and
# softmax makes a NaN row; the kernel must do the same, on the GPU's NaN bit patterns too.
# ---------------------------------------------------------------------------------------------

def same_values(a, b):
    """Equal dtypes, NaN at the same places, equal elsewhere (bit for bit, -0.0 included)."""
    nan = a.isnan()
    return (a.dtype == b.dtype and torch.equal(nan, b.isnan())
            and torch.equal(a[~nan].view(-1).cpu(), b[~nan].view(-1).cpu())
            and torch.equal(a[~nan].signbit(), b[~nan].signbit()))


if gk.triton is not None:
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402

    @triton.jit
    def _round_to_probe(X, Y, n, ROUND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < n)
        tl.store(Y + offs, gk._round_to(x, ROUND), mask=offs < n)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_to_keeps_nan_and_rounds_like_torch(dtype):
    """_round_to on float32 bit patterns built explicitly: the GPU's NaN 0x7FFFFFFF (which the
    bit arithmetic alone turned into -0.0), other NaNs (0x7F800001 became +inf), and numbers:
    ties to even, overflow to inf, subnormals, signed zeros, as torch's cast rounds them."""
    patterns = [0x7FFFFFFF, -1, 0x7FC00000, 0x7F800001, 0x7FBFFFFF, -0x00400000,  # NaNs
                0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7FFFFF, 0x7F800000, -0x00800000,
                0x00000001, 0x00408000, 0x0, -0x80000000, 0x3DCCCCCD, 0x477FF000, 0x33000001]
    bits = torch.tensor(patterns, dtype=torch.int64).to(torch.int32)  # two's complement
    x = bits.view(torch.float32).to(KDEVICE)
    y = torch.empty_like(x)
    code = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]
    _round_to_probe[(1,)](x, y, x.numel(), ROUND=code, BLOCK=32)
    assert y[:6].isnan().all(), y[:6].view(torch.int32)
    assert same_values(y, x.to(dtype).float())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_nan_rows_match_torch_op(monkeypatch, dtype, splits):
    """At temperature 0: CFG with -inf in both halves (a NaN logit), NaN logits, rows of -inf
    (softmax 0 / 0): x0 and the confidence (NaN included) are the torch op's, with the row's
    vocabulary in one program or split over several."""
    small_chunks(monkeypatch, block_v=64, block_r=2)
    monkeypatch.setattr(gk, "_num_splits", lambda *args: splits)
    logits, un = kernel_inputs(dtype, 300, cfg=True, batch=2, num_pos=5)
    logits[0, 0, 150] = un[0, 0, 150] = -torch.inf  # CFG: -inf - -inf = NaN
    logits[0, 0, 200] = un[0, 0, 200] = -torch.inf  # a later NaN: the first one wins
    logits[0, 1] = -torch.inf  # the whole row: argmax 0, softmax NaN
    un[0, 1] = -torch.inf
    logits[0, 2, 7] = logits[0, 2, 290] = float("nan")  # NaN logits, in different chunks
    logits[1, 3, 250] = float("nan")
    logits[1, 3, 10] = 1e4  # a large logit before the NaN does not win
    for kw in (dict(), dict(un_logits=un, cfg_scale=0.5), dict(confidence_eos_eot_inf=True)):
        kw.update(temperature=0.0, remasking="low_confidence", eos_id=KERNEL_EOS,
                  eot_id=KERNEL_EOT)
        want = sampling.gumbel_argmax_confidence(logits, **kw)
        for exact in (True, False):
            x0, conf = gk.gumbel_argmax_confidence(logits, exact_confidence=exact, **kw)
            assert torch.equal(x0, want[0]), (kw, exact)
            assert torch.equal(conf.isnan(), want[1].isnan())
            if exact:
                assert same_values(conf, want[1])
    x0, _ = gk.gumbel_argmax_confidence(logits, temperature=0.0, remasking="low_confidence",
                                        un_logits=un, cfg_scale=0.5)
    assert x0[0, 0] == 150 and x0[0, 1] == 0 and x0[0, 2] == 7 and x0[1, 3] == 250


@needs_kernel
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_sampling_takes_the_first_nan(monkeypatch, splits):
    """At temperature > 0 a NaN logit makes a NaN Gumbel key: x0 is the row's first NaN, as the
    reference's argmax of exp(l) / (-log u) ** T gives for any draws."""
    small_chunks(monkeypatch, block_v=64, block_r=2)
    monkeypatch.setattr(gk, "_num_splits", lambda *args: splits)
    logits, _ = kernel_inputs(torch.bfloat16, 300, cfg=False, batch=2, num_pos=3)
    logits[0, 1, 260] = logits[0, 1, 280] = float("nan")
    logits[1, 2, 70] = float("nan")
    x0, conf = gk.gumbel_argmax_confidence(logits, temperature=0.8, remasking="low_confidence",
                                           generator=make_generator(0))
    assert x0[0, 1] == 260 and x0[1, 2] == 70
    assert conf[0, 1].isnan() and conf[1, 2].isnan() and not conf[0, 0].isnan()
