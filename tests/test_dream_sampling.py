"""Dream's sampler (upstream ``sample_tokens``): the torch op against a plain statement of
upstream's arithmetic and hand-computed cases, then the fused Triton kernel against the torch op
(through the Triton interpreter on CPU tensors; on a GPU machine, on CUDA tensors)."""
import os

import pytest
import torch

from genjo_fast import sampling
from genjo_fast.backends import SAMPLING_BACKENDS

KINDS = sampling.DREAM_CONFIDENCES


def upstream_statement(logits2d, temperature, top_p, top_k, kind, u=None):
    """Upstream's sample_tokens on the (M, V) rows of the masked positions, in plain torch;
    at temperature > 0 the draw is the project's convention (inverse CDF, one float64 u per
    row) in place of Categorical."""
    if temperature > 0:
        logits2d = logits2d / temperature
    lowest = torch.finfo(logits2d.dtype).min
    if top_p is not None and top_p < 1:
        values, ids = torch.sort(logits2d, descending=True)
        over = torch.cumsum(torch.softmax(values, -1), -1) > top_p
        over[:, 1:] = over[:, :-1].clone()
        over[:, 0] = False
        logits2d = logits2d.masked_fill(torch.zeros_like(over).scatter_(-1, ids, over), lowest)
    if top_k is not None:
        k = min(top_k, logits2d.shape[-1])
        logits2d = logits2d.masked_fill(logits2d < torch.topk(logits2d, k)[0][:, -1:], lowest)
    probs = torch.softmax(logits2d, -1)
    if temperature > 0:
        cdf = torch.cumsum(probs.double(), -1)
        x0 = torch.tensor([int((cdf[j] <= u[j] * cdf[j, -1]).sum()) for j in range(len(u))])
        x0 = x0.clamp(max=probs.shape[-1] - 1)
        conf = probs.gather(-1, x0[:, None])[:, 0]
    else:
        conf, x0 = probs.max(-1)
    if kind == "margin":
        ordered = torch.sort(probs, -1, descending=True).values
        conf = ordered[:, 0] - ordered[:, 1]
    elif kind == "neg_entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    return x0, conf


def same_values(a, b):
    """Equal dtypes, NaN at the same places, equal (bit for bit) elsewhere."""
    nan = a.isnan()
    return (a.dtype == b.dtype and torch.equal(nan, b.isnan())
            and torch.equal(a[~nan].cpu(), b[~nan].cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("filters", [(None, None), (0.9, None), (None, 5), (0.8, 20)])
def test_torch_op_equals_upstream_statement(monkeypatch, dtype, kind, temperature, filters):
    """On block slices of (B, L, V) logits, in chunks of rows, with injected uniforms: the
    statement on the flattened rows (as upstream's logits[mask_index])."""
    monkeypatch.setattr(sampling, "_MAX_CHUNK_ELEMENTS", 2 * 3 * 257)  # chunks of 3 positions
    g = torch.Generator().manual_seed(len(kind) + int(10 * temperature))
    full = (torch.randn(2, 11, 257, generator=g) * 3).to(dtype)
    logits = full[:, 2:9]
    u = torch.rand(2, 7, generator=g, dtype=torch.float64)
    before = full.clone()
    x0, conf = sampling.dream_sample(logits, temperature=temperature, confidence=kind,
                                     top_p=filters[0], top_k=filters[1],
                                     token_uniform=lambda a, b: u[:, a:b])
    want_x0, want_conf = upstream_statement(logits.reshape(14, 257), temperature, *filters,
                                            kind, u.reshape(14))
    assert torch.equal(x0.reshape(14), want_x0)
    assert conf.dtype == dtype and same_values(conf.reshape(14), want_conf)
    assert torch.equal(full, before), "the caller's logits were modified"


def test_temperature0_takes_the_max_rounded_probability():
    """bf16: two logits one unit apart have probabilities that round to the same bf16 value,
    so the LOWER id wins although its logit is smaller (upstream's probs.max)."""
    logits = torch.full((1, 1, 64), -3.0)
    logits[0, 0, 3] = 0.75
    logits[0, 0, 9] = 0.75390625  # the next bf16 value
    logits = logits.bfloat16()
    probs = torch.softmax(logits[0, 0], -1)
    assert probs[3] == probs[9] and logits[0, 0].argmax() == 9
    x0, conf = sampling.dream_sample(logits, temperature=0.0, confidence="prob")
    assert x0.item() == 3 and conf.item() == probs[3]


def test_confidences_by_hand():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = p.log()[None, None]
    for kind, want in (("prob", 0.5), ("margin", 0.25),
                       ("neg_entropy", float((p * (p + 1e-10).log()).sum()))):
        x0, conf = sampling.dream_sample(logits, temperature=0.0, confidence=kind)
        assert x0.item() == 0
        torch.testing.assert_close(conf, torch.tensor([[want]]), rtol=1e-6, atol=0)
    # a duplicated maximum: margin 0, the lowest id
    x0, conf = sampling.dream_sample(torch.tensor([[[1.0, 3.0, 0.0, 3.0]]]), temperature=0.0,
                                     confidence="margin")
    assert x0.item() == 1 and conf.item() == 0


def test_filters_by_hand():
    """top_p keeps the smallest prefix whose mass reaches top_p (its last id included); top_k
    keeps ties at the k-th value."""
    p = torch.tensor([0.3, 0.5, 0.05, 0.15])
    logits = p.log()
    got = sampling.dream_probs(logits, 0.0, top_p=0.7)
    torch.testing.assert_close(got, torch.tensor([0.375, 0.625, 0.0, 0.0]))
    got = sampling.dream_probs(torch.tensor([3.0, 1.0, 1.0, 0.0]), 0.0, top_k=2)
    assert (got > 0).tolist() == [True, True, True, False]
    assert torch.equal(sampling.dream_probs(logits, 0.0, top_p=1.0),
                       torch.softmax(logits, -1))  # top_p >= 1 is off
    assert torch.equal(sampling.dream_probs(logits, 0.0, top_k=10), torch.softmax(logits, -1))


def test_draw_convention_by_hand():
    """x0 = the first id whose float64 running sum of probabilities exceeds u * total; ids of
    probability 0 are never drawn."""
    logits = torch.tensor([0.25, 0.0, 0.5, 0.25]).log().expand(1, 5, 4)
    u = torch.tensor([[0.0, 0.1, 0.25, 0.3, 0.999]], dtype=torch.float64)
    x0, conf = sampling.dream_sample(logits, temperature=1.0, confidence="prob",
                                     token_uniform=lambda a, b: u[:, a:b])
    assert x0.tolist() == [[0, 0, 2, 2, 3]]
    torch.testing.assert_close(conf, torch.tensor([[0.25, 0.25, 0.5, 0.5, 0.25]]))


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_sampling_frequencies(temperature):
    base = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.1, -torch.inf, 0.9])
    n = 20000
    kw = dict(temperature=temperature, confidence="prob")
    x0, conf = sampling.dream_sample(base.expand(1, n, 7),
                                     generator=torch.Generator().manual_seed(0), **kw)
    again, _ = sampling.dream_sample(base.expand(1, n, 7),
                                     generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(x0, again)
    expected = torch.softmax(base.double() / temperature, 0)
    freq = torch.bincount(x0.flatten(), minlength=7).double() / n
    assert freq[5] == 0
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-4)
    assert torch.equal(conf[0], torch.softmax(base / temperature, 0)[x0[0]])


@pytest.mark.parametrize("bad,error,match", [
    (dict(logits=torch.zeros(2, 3)), ValueError, "logits must have shape"),
    (dict(logits=torch.zeros(1, 2, 3, dtype=torch.long)), TypeError, "floating-point"),
    (dict(temperature=-0.5), ValueError, "temperature must be"),
    (dict(temperature=float("nan")), ValueError, "temperature must be"),
    (dict(confidence="maskgit_plus"), ValueError, "confidence must be one of"),
    (dict(logits=torch.zeros(1, 2, 1), confidence="margin"), ValueError, "at least 2 ids"),
    (dict(top_p="0.9"), ValueError, "top_p must be"),
    (dict(top_k=0), ValueError, "top_k must be"),
    (dict(top_k=2.5), ValueError, "top_k must be"),
])
def test_validation(bad, error, match):
    kw = dict(logits=torch.zeros(1, 2, 4), temperature=0.0, confidence="prob")
    kw.update(bad)
    with pytest.raises(error, match=match):
        sampling.dream_sample(kw.pop("logits"), **kw)


def test_registered_in_every_backend():
    for name in SAMPLING_BACKENDS.names():
        impl = SAMPLING_BACKENDS._backends[name][0]
        assert callable(impl.dream_sample)
    assert SAMPLING_BACKENDS.resolve("torch", torch.device("cpu"))[1].dream_sample is \
        sampling.dream_sample


# ---------------------------------------------------------------------------------------------
# The Triton kernel (genjo_fast.kernels.dream_sample) against the torch op.
# ---------------------------------------------------------------------------------------------
from genjo_fast.kernels import dream_sample as dk  # noqa: E402

if dk.unavailable_reason("cpu") is None:
    KDEVICE = torch.device("cpu")
elif dk.unavailable_reason("cuda") is None:
    KDEVICE = torch.device("cuda")
else:
    KDEVICE = None
needs_kernel = pytest.mark.skipif(
    KDEVICE is None, reason=f"the Triton kernel cannot run here: {dk.unavailable_reason('cpu')}")


def make_generator(seed):
    return torch.Generator(device=KDEVICE).manual_seed(seed)


def kernel_inputs(dtype, vocab, batch=2, num_pos=5, seed=0, scale=3.0):
    """Block slices (strided views) of (B, L, V) logits, with a few near-ties at the max."""
    g = torch.Generator().manual_seed(seed + vocab)
    full = torch.randn(batch, num_pos + 4, vocab, generator=g) * scale
    full[0, 3, 11] = full[0, 3].max() - 0.004  # within a bf16 unit of the max
    return full.to(KDEVICE, dtype)[:, 2:2 + num_pos]


def small_tiles(monkeypatch, block_v=64, block_r=2):
    """Several vocabulary chunks per row and several programs per call."""
    monkeypatch.setattr(dk, "_launch_config", lambda n_rows, vocab, sample: (block_r, block_v, 4))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [257, 1000])
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_temperature0_equals_torch_op(dtype, vocab, kind):
    logits = kernel_inputs(dtype, vocab)
    before = logits.clone()
    x0, conf = dk.dream_sample(logits, temperature=0.0, confidence=kind)
    want_x0, want_conf = sampling.dream_sample(logits, temperature=0.0, confidence=kind)
    assert torch.equal(x0, want_x0)
    assert same_values(conf, want_conf)
    assert torch.equal(logits, before)


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_kernel_chunks_and_programs(monkeypatch, kind, temperature):
    """Several chunks per row (the running max, second max and duplicates across chunk
    boundaries) and several programs: the torch op's results (at T > 0 its confidence of the
    kernel's draw)."""
    small_tiles(monkeypatch)
    logits = kernel_inputs(torch.bfloat16, 300, batch=3, num_pos=3, scale=1.0)
    logits[0, 0] = 1.0  # every id ties
    logits[0, 1, 200] = logits[0, 1, 70] = 9.0  # the max twice, in different chunks: margin 0
    logits[1, 2, 250] = 9.0
    logits[1, 2, 40] = 9.0 - 0.0625  # the second max in an earlier chunk
    x0, conf = dk.dream_sample(logits, temperature=temperature, confidence=kind,
                               generator=make_generator(0))
    probs = sampling.dream_probs(logits, temperature)
    if temperature == 0:
        assert torch.equal(x0, sampling.dream_greedy(probs))
        assert x0[0, 0] == 0 and x0[0, 1] == 70 and x0[1, 2] == 250
    assert same_values(conf, sampling.dream_confidence(probs, x0, kind))
    if kind == "margin" and temperature == 0:
        assert conf[0, 1] == 0


def flagged_rows(monkeypatch):
    """Replaces the recheck by a recorder of the rows it was handed."""
    handed = []
    monkeypatch.setattr(dk, "_recompute_rows",
                        lambda logits, x0, conf, rows, *args: handed.append(rows))
    return handed


@needs_kernel
@pytest.mark.parametrize("dtype,share", [(torch.bfloat16, {"prob": 0.15, "margin": 0.25,
                                                           "neg_entropy": 0.6}),
                                         (torch.float16, {"prob": 0.5, "margin": 0.7,
                                                          "neg_entropy": 1.0})])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_kernel_unflagged_rows_are_exact(monkeypatch, dtype, share, kind, temperature):
    """Without the recheck: every row the kernel did NOT flag already equals the torch op
    (the flags are what makes the kernel exact), and the flagged share stays small."""
    logits = kernel_inputs(dtype, 1000, batch=4, num_pos=32, scale=2.0)
    handed = flagged_rows(monkeypatch)
    x0, conf = dk.dream_sample(logits, temperature=temperature, confidence=kind,
                               generator=make_generator(1))
    (rows,) = handed
    ok = torch.ones(128, dtype=torch.bool, device=KDEVICE)
    ok[rows] = False
    probs = sampling.dream_probs(logits, temperature)
    want_x0 = sampling.dream_greedy(probs) if temperature == 0 else x0
    want_conf = sampling.dream_confidence(probs, want_x0, kind)
    assert torch.equal(x0.view(-1)[ok], want_x0.view(-1)[ok])
    assert same_values(conf.view(-1)[ok], want_conf.view(-1)[ok])
    assert rows.numel() <= share[kind] * 128, rows.numel()


@needs_kernel
@pytest.mark.parametrize("kind", ["prob", "margin"])
def test_kernel_flags_rows_near_a_rounding_boundary(monkeypatch, kind):
    """The flags against an independent statement: every row whose float32 probability of the
    max (and, for the margin, of the second largest logit) lies within half the window of a
    bf16 rounding boundary, or with a logit within half TIE_DELTA below the max, is handed to
    the recheck."""
    logits = kernel_inputs(torch.bfloat16, 1000, batch=4, num_pos=64, scale=2.0)
    logits[1, :8] = logits[1, :8].clamp(max=0.5)  # near ties: the max one bf16 unit above
    logits[1, :8, 500], logits[1, :8, 501] = 0.75390625, 0.75  # the second
    handed = flagged_rows(monkeypatch)
    dk.dream_sample(logits, temperature=0.0, confidence=kind)
    flagged = torch.zeros(256, dtype=torch.bool, device=KDEVICE)
    if handed:
        flagged[handed[0]] = True

    def near(p, window=dk.EXACT_WINDOW / 2):
        return ((p * (1 - window)).bfloat16() != (p * (1 + window)).bfloat16()).view(-1)

    p32 = torch.softmax(logits.float(), -1)
    top = torch.topk(p32, 2, -1).values
    must = near(top[..., 0]) | (near(top[..., 1]) if kind == "margin" else False)
    ordered = torch.topk(logits.float(), 2, -1).values
    gap = (ordered[..., 0] - ordered[..., 1]).view(-1)
    must |= (gap > 0) & (gap < dk.TIE_DELTA[torch.bfloat16] / 2)
    assert must.sum() >= 8  # the test has cases
    assert not (must & ~flagged).any()


@needs_kernel
def test_kernel_rounded_probability_tie():
    """The bf16 tie of the torch op's test: the kernel flags the near tie and returns the
    lower id, as upstream."""
    logits = torch.full((1, 2, 300), -4.5)
    logits[0, :, 3] = 0.75
    logits[0, :, 259] = 0.75390625  # the next bf16 value, in a later chunk
    logits = logits.to(KDEVICE, torch.bfloat16)
    probs = torch.softmax(logits[0, 0].cpu(), -1)
    assert probs[3] == probs[259]  # tied after rounding
    for kind in KINDS:
        x0, conf = dk.dream_sample(logits, temperature=0.0, confidence=kind)
        want = sampling.dream_sample(logits, temperature=0.0, confidence=kind)
        assert x0.tolist() == [[3, 3]] and torch.equal(x0, want[0])
        assert same_values(conf, want[1])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_non_finite_rows(dtype, kind):
    """NaN logits, rows of -inf, +inf: at T == 0 the torch op's x0 and (NaN) confidence."""
    logits = kernel_inputs(dtype, 257, batch=2, num_pos=4)
    logits[0, 0, 30] = float("nan")
    logits[0, 1] = -torch.inf
    logits[1, 2, 100] = torch.inf
    x0, conf = dk.dream_sample(logits, temperature=0.0, confidence=kind)
    want = sampling.dream_sample(logits, temperature=0.0, confidence=kind)
    assert torch.equal(x0, want[0]) and same_values(conf, want[1])
    assert conf[0, 0].isnan() and conf[0, 1].isnan()


@needs_kernel
@pytest.mark.parametrize("temperature", [0.5, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_sampling_frequencies(monkeypatch, temperature, dtype):
    """x0 ~ the probabilities in the dtype (per-id 4-sigma bounds and a chi-square bound over
    many rows of the same logits); -inf ids are never drawn; each confidence is the torch op's
    for the drawn id."""
    small_tiles(monkeypatch, block_v=8, block_r=4096 if KDEVICE.type == "cpu" else 64)
    base = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.1, -torch.inf, 0.9, -0.4, 1.6, 0.5, -2.0])
    vocab, n = base.numel(), 40000
    logits = base.to(dtype).expand(1, n, vocab).to(KDEVICE)
    x0, conf = dk.dream_sample(logits, temperature=temperature, confidence="prob",
                               generator=make_generator(1))
    probs = sampling.dream_probs(logits[0, 0], temperature).double().cpu()
    expected = probs / probs.sum()
    counts = torch.bincount(x0.flatten().cpu(), minlength=vocab).double()
    assert counts[5] == 0
    freq = counts / n
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-4)
    support = expected > 0
    chi2 = ((counts[support] - n * expected[support]) ** 2 / (n * expected[support])).sum()
    assert chi2 < 35  # 9 degrees of freedom: P(chi2 > 35) < 1e-4
    probs_dev = sampling.dream_probs(logits[0, :1], temperature)[0]
    assert torch.equal(conf.flatten(), probs_dev[x0.flatten()])


@needs_kernel
def test_kernel_seed_reproducibility():
    logits = torch.zeros(2, 8, 1000, device=KDEVICE, dtype=torch.bfloat16)  # uniform
    kw = dict(temperature=1.0, confidence="margin")
    a = dk.dream_sample(logits, generator=make_generator(7), **kw)
    b = dk.dream_sample(logits, generator=make_generator(7), **kw)
    c = dk.dream_sample(logits, generator=make_generator(8), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    g = make_generator(7)
    first, second = dk.dream_sample(logits, generator=g, **kw), dk.dream_sample(logits,
                                                                                generator=g, **kw)
    assert torch.equal(first[0], a[0]) and not torch.equal(second[0], a[0])


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_kernel_writes_every_output(kind, temperature):
    """The registered op writes every element of x0 / confidence buffers poisoned with -1 /
    NaN (several programs, a partial last one)."""
    logits = kernel_inputs(torch.bfloat16, 257, batch=3, num_pos=7)
    seed = torch.tensor([12345], device=KDEVICE) if temperature > 0 else None
    outs = []
    for _ in range(2):
        x0 = torch.full((3, 7), -1, dtype=torch.long, device=KDEVICE)
        conf = torch.full((3, 7), float("nan"), dtype=torch.bfloat16, device=KDEVICE)
        torch.ops.genjo_fast_triton.dream_sample(logits, seed, x0, conf, temperature, kind)
        assert (x0 >= 0).all() and not conf.isnan().any()
        outs.append((x0, conf))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@needs_kernel
@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_kernel_hands_filters_and_draws_to_torch_op(temperature):
    """top_p / top_k, injected draws and float64 logits run the torch op: the same results."""
    logits = kernel_inputs(torch.bfloat16, 257)
    u = torch.rand(2, 5, generator=torch.Generator().manual_seed(0),
                   dtype=torch.float64).to(KDEVICE)
    for kw in (dict(top_p=0.8), dict(top_k=7), dict(top_p=0.95, top_k=50),
               dict(token_uniform=lambda a, b: u[:, a:b])):
        for kind in KINDS:
            got = dk.dream_sample(logits, temperature=temperature, confidence=kind,
                                  generator=make_generator(3), **kw)
            want = sampling.dream_sample(logits, temperature=temperature, confidence=kind,
                                         generator=make_generator(3), **kw)
            assert torch.equal(got[0], want[0]) and same_values(got[1], want[1])
    wide = logits.double()
    got = dk.dream_sample(wide, temperature=0.0, confidence="prob")
    want = sampling.dream_sample(wide, temperature=0.0, confidence="prob")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_kernel
def test_triton_backend_runs_the_kernel(monkeypatch):
    ops = SAMPLING_BACKENDS.resolve("triton", KDEVICE)[1]
    assert ops.dream_sample is dk.dream_sample
    if KDEVICE.type == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"


def test_categorical_rejects_is_the_distribution_check():
    """categorical_rejects says, row by row, what torch.distributions.Categorical says of the
    whole tensor: bf16 rows that miss the 1e-6 sum check are rejected."""
    g = torch.Generator().manual_seed(0)
    rejected_somewhere = False
    for scale in (1.0, 4.0, 12.0):
        logits = (torch.randn(64, 3000, generator=g) * scale).to(torch.bfloat16)
        probs = torch.softmax(logits, -1)
        per_row = sampling.categorical_rejects(probs)
        for r in range(probs.shape[0]):
            try:
                torch.distributions.Categorical(probs=probs[r:r + 1])
                fails = False
            except ValueError:
                fails = True
            assert bool(per_row[r]) == fails
        rejected_somewhere |= bool(per_row.any())
    assert rejected_somewhere  # the check does reject bf16 rows here


def test_check_rows_fallback_to_argmax():
    """At temperature > 0, one rejected row among check_rows turns the whole call greedy;
    rejected rows outside check_rows do not."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(1, 64, 3000, generator=g) * 12).to(torch.bfloat16)
    probs = torch.softmax(logits[0], -1)
    rejects = sampling.categorical_rejects(probs)
    assert rejects.any() and not rejects.all()
    u = torch.rand(1, 64, dtype=torch.float64, generator=g)
    kw = dict(temperature=1.0, confidence="prob", token_uniform=lambda a, b: u[:, a:b])
    greedy = sampling.dream_sample(logits, temperature=0.0, confidence="prob")
    sampled = sampling.dream_sample(logits, **kw)
    assert not torch.equal(sampled[0], greedy[0])
    fell_back = sampling.dream_sample(logits, check_rows=rejects[None], **kw)
    assert torch.equal(fell_back[0], greedy[0]) and torch.equal(fell_back[1], greedy[1])
    kept = sampling.dream_sample(logits, check_rows=~rejects[None], **kw)
    assert torch.equal(kept[0], sampled[0]) and torch.equal(kept[1], sampled[1])


# ---------------------------------------------------------------------------------------------
# The filtered path (top_p / top_k): sampling.filtered_rows against the plain formulas.
# ---------------------------------------------------------------------------------------------
from genjo_fast import reference_dream  # noqa: E402

FILTERS = [(0.5, None), (0.9, None), (0.95, None), (1.0, 7), (None, 1), (0.9, 3), (0.95, 40)]


def tied_logits(rows, vocab, dtype, seed, scale=3.0, step=0.25):
    """Logits on a coarse grid (``step``): every row holds many equal values, so the top-p cut
    and the top-k threshold fall inside groups of tied ids, where the order matters."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(rows, vocab, generator=g) * scale / step).round() * step).to(dtype)


def same_rows(got, want):
    """Every field of two DreamRows equal (NaN at the same places), dtypes included."""
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            assert same_values(a, b) if a.dtype.is_floating_point else torch.equal(a, b)


def statement_keep(tempered, top_p, top_k):
    """The ids the plain statement's filters keep (genjo_fast.reference_dream)."""
    lowest = torch.finfo(tempered.dtype).min
    filtered = tempered
    if top_p is not None and top_p < 1:
        filtered = reference_dream.top_p_logits(filtered, top_p)
    if top_k is not None:
        filtered = reference_dream.top_k_logits(filtered, top_k)
    return filtered != lowest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("filters", FILTERS)
def test_nucleus_keep_is_the_statements_mask(dtype, filters):
    """The kept ids, tie order included, equal those of reference_dream's top_p_logits /
    top_k_logits (a stable sort, ties by lowest id) on rows full of ties; every row here is
    regular; the test has rows whose cut splits a group of tied ids."""
    top_p, top_k = filters
    logits = tied_logits(24, 301, dtype, seed=len(FILTERS) * 3 + (top_k or 0))
    keep, regular = sampling.nucleus_keep(logits, top_p, top_k)
    assert regular.all()
    assert torch.equal(keep, statement_keep(logits, top_p, top_k))
    if top_p is not None and top_p < 1 and top_k is None:
        cut = logits.masked_fill(~keep, torch.inf).min(-1, keepdim=True).values
        split = ((logits == cut) & ~keep).any(-1)  # a tied id of the last kept value dropped
        assert split.any()


def test_nucleus_keep_ties_go_to_the_lowest_ids():
    """By hand: probabilities 4/9 (id 0), then 1/9 for each of the tied ids 1, 3, 4, 6: the
    running sums 0.44, 0.56, 0.67 cross 0.6 at the third entry, which stays: id 0 and the two
    LOWEST tied ids, 1 and 3."""
    logits = torch.tensor([[4.0, 1.0, 0.5, 1.0, 1.0, 0.5, 1.0, 1e-9]]).log()
    keep, regular = sampling.nucleus_keep(logits, 0.6, None)
    assert regular.all()
    assert keep[0].nonzero()[:, 0].tolist() == [0, 1, 3]
    assert torch.equal(keep, statement_keep(logits, 0.6, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("filters", FILTERS)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_filtered_rows_equal_plain_rows(dtype, filters, temperature):
    """Every output (x0, confidence, the argmax, its confidence, the Categorical check) of the
    filtered path equals the plain formulas' bit for bit, for the same draws, on rows with
    ties, for every confidence."""
    top_p, top_k = filters
    logits = tied_logits(40, 257, dtype, seed=int(temperature * 10) + (top_k or 0), scale=2.0)
    u = torch.rand(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u = u if temperature > 0 else None
    for kind in KINDS:
        for fallback in (False, True):
            args = (logits, temperature, kind, top_p, top_k, u, fallback)
            same_rows(sampling.filtered_rows(*args), sampling.plain_rows(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_filtered_rows_irregular_rows(dtype):
    """Rows the fast path cannot state (NaN, +inf, all -inf, a maximum near the dtype's
    minimum) are marked irregular and computed by the plain formulas: same results."""
    logits = tied_logits(6, 200, dtype, seed=5)
    logits[0, 17] = float("nan")
    logits[1, 3] = torch.inf
    logits[2] = -torch.inf
    logits[3] = torch.finfo(dtype).min
    logits[3, 9] = torch.finfo(dtype).min / 2  # finite, far from the others: still regular
    logits[4, :] = -torch.inf
    logits[4, 5] = 1.0  # one finite id
    _, regular = sampling.nucleus_keep(logits, 0.9, None)
    assert regular.tolist() == [False, False, False, True, True, True]
    u = torch.rand(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for top_p, top_k in ((0.9, None), (None, 4), (0.9, 4)):
        for temperature, draws in ((0.0, None), (1.0, u)):
            args = (logits, temperature, "prob", top_p, top_k, draws, True)
            same_rows(sampling.filtered_rows(*args), sampling.plain_rows(*args))


def test_filtered_rows_float16_maximum_near_the_minimum():
    """float16: a maximum within 128 of the dtype's minimum misses the fast path's margin
    (which makes exp(min - m), a removed logit's weight, underflow to 0 in every dtype): the
    row goes to the plain path, with the same results."""
    lowest = torch.finfo(torch.float16).min
    logits = torch.full((1, 50), lowest, dtype=torch.float16)
    logits[0, :4] = torch.tensor([lowest + 32 * i for i in range(4)], dtype=torch.float16)
    _, regular = sampling.nucleus_keep(logits, 0.5, None)
    assert not regular.any()
    args = (logits, 0.0, "neg_entropy", 0.5, None, None, False)
    same_rows(sampling.filtered_rows(*args), sampling.plain_rows(*args))


def test_filtered_rows_tiny_kept_probabilities_take_the_full_sum(monkeypatch):
    """float32 kept probabilities below 2^-29 (top_k over a wide range of logits): the kept
    ids' float64 running sum is then not exact, and a parallel scan (CUDA's cumsum) may round
    it differently from the whole vocabulary's, so those rows draw from the full sum (handed
    to inverse_cdf with all 300 columns); the draws are the plain formulas'."""
    logits = torch.linspace(0.0, -60.0, 300)[None].repeat(8, 1)
    logits[:, 0] = 5.0
    u = torch.tensor([0.0, 0.5, 0.99, 0.999, 0.9999, 1 - 2.0 ** -53, 0.3, 0.9999999],
                     dtype=torch.float64)
    full_sums = []
    real_inverse_cdf = sampling.inverse_cdf
    monkeypatch.setattr(sampling, "inverse_cdf", lambda cdf, v: (
        full_sums.append(cdf.shape[-1] == 300), real_inverse_cdf(cdf, v))[1])
    args = (logits, 1.0, "prob", None, 250, u, True)
    got = sampling.filtered_rows(*args)
    assert any(full_sums)
    same_rows(got, sampling.plain_rows(*args))


def test_filtered_rows_both_helpers_agree():
    """The numpy and the torch forms of the two helpers give the same results."""
    logits = tied_logits(12, 333, torch.bfloat16, seed=3)
    logits[0, 4] = float("nan")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        rows = logits.to(dtype)
        a = sampling.sorted_values(rows, use_numpy=True)
        b = sampling.sorted_values(rows, use_numpy=False)
        assert same_values(a.to(dtype), b) and torch.equal(a[1:], torch.sort(
            rows[1:], dim=-1, descending=True).values.flip(-1).to(a.dtype))
        assert a[0, -1].isnan() and b[0, -1].isnan()  # NaN last
    keep = logits > 0.5
    keep[3] = False
    for use_numpy in (True, False):
        ids, counts = sampling.nonzero_ids(keep, use_numpy=use_numpy)
        assert ids.shape == (12, 1 + int(keep.sum(-1).max()))
        assert counts.tolist() == keep.sum(-1).tolist()
        for r in range(12):
            assert ids[r, :counts[r]].tolist() == keep[r].nonzero()[:, 0].tolist()
            assert (ids[r, counts[r]:] == 0).all()


@pytest.mark.parametrize("filters", [(0.9, None), (None, 5), (0.6, 3)])
def test_filtered_sampling_frequencies(filters):
    """Drawn with a generator, x0 follows the filtered distribution (4-sigma per id, removed
    ids never drawn); each confidence is the probability of its token."""
    top_p, top_k = filters
    base = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.1, -torch.inf, 0.9, 1.1, -0.4])
    n = 20000
    x0, conf = sampling.dream_sample(base.expand(1, n, 9), temperature=0.8, confidence="prob",
                                     top_p=top_p, top_k=top_k,
                                     generator=torch.Generator().manual_seed(0))
    expected = sampling.dream_probs(base, 0.8, top_p, top_k).double()
    assert (expected > 0).sum() < 8  # the filter removes ids
    freq = torch.bincount(x0.flatten(), minlength=9).double() / n
    assert torch.all(freq[expected == 0] == 0)
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-4)
    assert torch.equal(conf[0], sampling.dream_probs(base, 0.8, top_p, top_k)[x0[0]])


def test_filtered_dream_sample_large_vocabulary():
    """Dream's vocabulary size in float32 and bf16, through dream_sample's chunks, with the
    argmax fallback: the same tokens and confidences as the plain formulas."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 152064, generator=g) * 0.6
    u = torch.rand(2, 3, generator=g, dtype=torch.float64)
    check = torch.ones(2, 3, dtype=torch.bool)
    for dtype in (torch.float32, torch.bfloat16):
        rows = logits.to(dtype)
        for top_p, top_k in ((0.95, None), (0.5, 50)):
            kw = dict(temperature=0.2, confidence="prob", top_p=top_p, top_k=top_k,
                      token_uniform=lambda a, b: u[:, a:b], check_rows=check)
            got = sampling.dream_sample(rows, **kw)
            want = sampling.plain_rows(rows.reshape(6, -1), 0.2, "prob", top_p,
                                       top_k, u.reshape(6), True)
            assert got[0].shape == (2, 3)
            rejected = bool((want.rejects).any())
            want_x0 = want.greedy_x0 if rejected else want.x0
            want_conf = want.greedy_confidence if rejected else want.confidence
            assert torch.equal(got[0].reshape(6), want_x0)
            assert same_values(got[1].reshape(6), want_conf)
