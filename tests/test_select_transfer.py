"""Batched variable-k transfer selection against the reference's per-row topk loop."""
import pytest
import torch

from genjo_fast import reference, sampling


def per_row_reference(confidence, k):
    out = torch.zeros_like(confidence, dtype=torch.bool)
    for j in range(confidence.shape[0]):
        out[j, reference.topk_lowest_position(confidence[j], int(k[j]))] = True
    return out


@pytest.mark.parametrize("batch,num_pos", [(1, 1), (3, 7), (8, 33), (5, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_per_row_topk(batch, num_pos, dtype):
    g = torch.Generator().manual_seed(batch * num_pos)
    # few distinct values: many ties; some positions already decoded (-inf)
    confidence = (torch.randint(0, 4, (batch, num_pos), generator=g).to(dtype) / 4)
    decoded = torch.rand(batch, num_pos, generator=g) < 0.3
    confidence[decoded] = -torch.inf
    available = (~decoded).sum(1)
    k = (torch.rand(batch, generator=g) * (available + 1)).long().clamp(max=available)
    got = sampling.select_transfer(confidence, k)
    assert torch.equal(got, per_row_reference(confidence, k))
    assert torch.equal(got.sum(1), k)
    assert not (got & decoded).any()


def test_ties_lowest_position_first():
    confidence = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.5, -torch.inf, 0.5],
                               [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    got = sampling.select_transfer(confidence, torch.tensor([3, 2]))
    assert got[0].nonzero().flatten().tolist() == [0, 1, 3]
    assert got[1].nonzero().flatten().tolist() == [0, 1]


def test_k_zero_selects_nothing():
    assert not sampling.select_transfer(torch.rand(4, 9), torch.zeros(4, dtype=torch.long)).any()


def random_rows(batch, num_pos, seed, levels=8, dtype=torch.float32):
    """Confidences in [0, 1] with ties, some -inf (already decoded), one row all -inf."""
    g = torch.Generator().manual_seed(seed)
    confidence = (torch.randint(0, levels + 1, (batch, num_pos), generator=g).float()
                  / levels).to(dtype)
    confidence[torch.rand(batch, num_pos, generator=g) < 0.3] = -torch.inf
    confidence[-1] = -torch.inf
    return confidence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, 0.83, 1.0, 1.5])
@pytest.mark.parametrize("batch,num_pos", [(3, 7), (6, 32)])
def test_threshold_rule_matches_per_row_statement(threshold, batch, num_pos, dtype):
    confidence = random_rows(batch, num_pos, seed=num_pos, levels=100, dtype=dtype)
    got = sampling.select_transfer(confidence, threshold=threshold)
    for j in range(batch):
        want = torch.zeros(num_pos, dtype=torch.bool)
        want[reference.threshold_transfer_row(confidence[j], threshold)] = True
        assert torch.equal(got[j], want)
    assert not got[-1].any()  # nothing to transfer in a finished row
    assert (got.sum(1)[:-1] >= 1).all()  # always at least the most confident


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factor", [0.0, 0.5, 1.0, 2.0, 10.0])
@pytest.mark.parametrize("batch,num_pos", [(3, 7), (6, 32)])
def test_factor_rule_matches_per_row_statement(factor, batch, num_pos, dtype):
    confidence = random_rows(batch, num_pos, seed=int(10 * factor) + num_pos, levels=100,
                             dtype=dtype)
    got = sampling.select_transfer(confidence, factor=factor)
    for j in range(batch):
        want = torch.zeros(num_pos, dtype=torch.bool)
        want[reference.factor_transfer_row(confidence[j], factor)] = True
        assert torch.equal(got[j], want)


def test_factor_bf16_thresholds_compare_in_float32():
    """The review's case: 0.83203125 (bf16) < 1 - 1/6 = 0.8333 in float32, though the bf16
    rounding of the threshold (0.83203125) would let it pass: the fifth position stops."""
    c = torch.tensor([[0.99, 0.98, 0.97, 0.96, 0.83203125, 0.1]], dtype=torch.bfloat16)
    got = sampling.select_transfer(c, factor=1.0)
    want = torch.zeros_like(got)
    want[0, reference.factor_transfer_row(c[0], 1.0)] = True
    assert torch.equal(got, want) and got.sum() == 4


def test_threshold_and_factor_by_hand():
    c = torch.tensor([[0.2, 0.95, 0.5, 0.91, -torch.inf, 0.95]])
    assert sampling.select_transfer(c, threshold=0.9)[0].nonzero().flatten().tolist() == [1, 3, 5]
    assert sampling.select_transfer(c, threshold=0.99)[0].nonzero().flatten().tolist() == [1]
    # sorted: 0.95 (pos 1), 0.95 (pos 5), 0.91 (pos 3), 0.5, 0.2. Thresholds for n = 2, 3, 4:
    # 1 - 1/3, 1 - 1/4, 1 - 1/5 with factor 1: 0.95, 0.91 pass, 0.5 < 0.8 stops.
    assert sampling.select_transfer(c, factor=1.0)[0].nonzero().flatten().tolist() == [1, 3, 5]
    assert sampling.select_transfer(c, factor=0.1)[0].nonzero().flatten().tolist() == [1]


def test_exactly_one_rule():
    with pytest.raises(ValueError, match="exactly one of"):
        sampling.select_transfer(torch.rand(2, 3), torch.ones(2, dtype=torch.long), threshold=0.5)
    with pytest.raises(ValueError, match="exactly one of"):
        sampling.select_transfer(torch.rand(2, 3))


# ---------------------------------------------------------------------------------------------
# The Triton kernel (genjo_fast.kernels.select_transfer) and the CUDA extension's op
# (genjo_fast._C, torch.ops.genjo_fast.select_transfer) against the torch op above. Without a
# GPU the Triton kernel runs on CPU tensors through the interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1); the CUDA op is compared where the extension was built and CUDA exists.
# ---------------------------------------------------------------------------------------------
from genjo_fast import cuda_ext  # noqa: E402
from genjo_fast.backends import SAMPLING_BACKENDS  # noqa: E402
from genjo_fast.kernels import select_transfer as sk  # noqa: E402

if sk.unavailable_reason("cpu") is None:
    KDEVICE = torch.device("cpu")
elif sk.unavailable_reason("cuda") is None:
    KDEVICE = torch.device("cuda")
else:
    KDEVICE = None
needs_kernel = pytest.mark.skipif(
    KDEVICE is None,
    reason=f"the Triton kernel cannot run here: {sk.unavailable_reason('cpu')}")
needs_extension = pytest.mark.skipif(cuda_ext._C is None, reason=str(cuda_ext.IMPORT_ERROR))

RULES = [dict(threshold=t) for t in (0.0, 0.5, 0.9, 1.0, 1.5)] + \
        [dict(factor=f) for f in (0.0, 0.3, 1.0, 2.0, 10.0)]


def rule_cases(confidence, seed):
    """The three rules on one batch: top-k with random k (including 0 and all finite entries),
    then every threshold and factor of RULES."""
    g = torch.Generator().manual_seed(seed)
    finite = (confidence > -torch.inf).sum(1).cpu()
    k = (torch.rand(confidence.shape[0], generator=g) * (finite + 1)).long().clamp(max=finite)
    k[0] = 0
    k[-1] = finite[-1]
    cases = [dict(num_transfer=k.to(confidence.device)),
             dict(num_transfer=finite.to(confidence.device))]
    return cases + RULES


def check_against_torch_op(impl, confidence, seed=0, cases=None):
    for kw in rule_cases(confidence, seed) if cases is None else cases:
        got = impl(confidence, **kw)
        want = sampling.select_transfer(confidence.cpu(), **{
            k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
        assert got.dtype == torch.bool and got.shape == confidence.shape
        assert torch.equal(got.cpu(), want), kw


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("batch,num_pos,levels", [(1, 1, 4), (3, 7, 4), (6, 32, 16),
                                                  (4, 200, 1000)])
def test_kernel_equals_torch_op(dtype, batch, num_pos, levels):
    """All three rules, ties (few levels), -inf entries, k = 0 and a row all -inf."""
    confidence = random_rows(batch, num_pos, seed=num_pos, levels=levels).to(KDEVICE, dtype)
    check_against_torch_op(sk.select_transfer, confidence, seed=num_pos)


@needs_kernel
def test_kernel_tiles_and_strides(monkeypatch):
    """Rows longer than one tile of positions (both loops, the factor rule's two passes) and a
    strided column slice of a wider tensor."""
    monkeypatch.setattr(sk, "_tile_config", lambda num_pos: (16, 16, 4))
    confidence = random_rows(3, 40, seed=3, levels=6)
    wide = torch.full((3, 80), 0.7)
    wide[:, 20:60] = confidence
    wide = wide.to(KDEVICE)
    cases = rule_cases(confidence, seed=3)[:1] + [dict(threshold=0.5), dict(factor=0.3),
                                                  dict(factor=1.0)]
    check_against_torch_op(sk.select_transfer, wide[:, 20:60], cases=cases)
    check_against_torch_op(sk.select_transfer, wide.t().contiguous().t()[:, 20:60],
                           cases=cases[1:2])


@needs_kernel
def test_kernel_threshold_rounded_like_torch():
    """torch compares bf16 confidences with the threshold rounded to bf16: 0.9 -> 0.8984375."""
    confidence = torch.tensor([[0.2, 0.8984375, 0.5, 0.95]], dtype=torch.bfloat16)
    got = sk.select_transfer(confidence.to(KDEVICE), threshold=0.9)
    assert got.cpu()[0].tolist() == [False, True, False, True]
    assert torch.equal(got.cpu(), sampling.select_transfer(confidence, threshold=0.9))


@needs_kernel
@pytest.mark.parametrize("args,kwargs,error,match", [
    ((torch.rand(2, 3),), dict(), ValueError, "exactly one of"),
    ((torch.rand(2, 3), torch.ones(2, dtype=torch.long)), dict(factor=1.0), ValueError,
     "exactly one of"),
    ((torch.rand(2, 3, 1),), dict(threshold=0.5), ValueError, "confidence must have shape"),
    ((torch.ones(2, 3, dtype=torch.long),), dict(threshold=0.5), TypeError, "confidence dtype"),
    ((torch.rand(2, 3), torch.ones(2)), dict(), TypeError, "num_transfer must be an integer"),
    ((torch.rand(2, 3), torch.ones(3, dtype=torch.long)), dict(), ValueError,
     "num_transfer shape"),
    ((torch.rand(2, 3),), dict(threshold="0.5"), TypeError, "threshold must be a number"),
])
def test_kernel_validation(args, kwargs, error, match):
    args = tuple(a.to(KDEVICE) for a in args)
    with pytest.raises(error, match=match):
        sk.select_transfer(*args, **kwargs)


@needs_kernel
def test_triton_backend_dispatch(monkeypatch):
    """The triton backend is picked by name (on CPU only then: auto avoids the interpreter)."""
    name, ops = SAMPLING_BACKENDS.resolve("triton", KDEVICE)
    assert name == "triton" and ops.select_transfer is sk.select_transfer
    monkeypatch.setenv("GENJO_FAST_BACKEND", "triton")
    assert SAMPLING_BACKENDS.resolve(None, KDEVICE)[0] == "triton"
    monkeypatch.delenv("GENJO_FAST_BACKEND")
    auto = SAMPLING_BACKENDS.resolve(None, KDEVICE)[0]
    assert auto == ("torch" if KDEVICE.type == "cpu" else
                    ("cuda" if cuda_ext.unavailable_reason(KDEVICE) is None else "triton"))


def test_cuda_backend_reason():
    reason = cuda_ext.unavailable_reason("cpu")
    assert reason is not None
    assert ("CUDA tensors only" in reason if cuda_ext._C is not None
            else "the CUDA extension was not built" in reason)
    with pytest.raises(RuntimeError, match="backend='cuda' was requested but is unavailable"):
        SAMPLING_BACKENDS.resolve("cuda", torch.device("cpu"))


@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA op needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("batch,num_pos,levels", [(1, 1, 4), (3, 7, 4), (6, 32, 16),
                                                  (4, 200, 1000), (2, 1500, 50)])
def test_cuda_op_equals_torch_op(dtype, batch, num_pos, levels):
    confidence = random_rows(batch, num_pos, seed=num_pos, levels=levels).to("cuda", dtype)
    check_against_torch_op(cuda_ext.select_transfer, confidence, seed=num_pos)
    check_against_torch_op(cuda_ext.select_transfer, confidence.t().contiguous().t())


@needs_extension
def test_extension_cpu_op_equals_torch_op():
    """The extension's CPU kernel (the same per-row rules as its CUDA kernel)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        confidence = random_rows(6, 33, seed=1, levels=8).to(dtype)
        check_against_torch_op(cuda_ext.select_transfer, confidence, seed=1)


@needs_extension
def test_extension_fake_impl():
    """The fake implementation (FakeTensorMode, meta tensors, torch.compile) gives the shape
    and dtype of the result; opcheck validates the registration where torch has it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.genjo_fast.select_transfer
    with FakeTensorMode():
        out = op(torch.empty(3, 17, dtype=torch.bfloat16), None, 0.5, None)
        assert out.shape == (3, 17) and out.dtype == torch.bool
    meta = op(torch.empty(4, 9, device="meta"), torch.empty(4, dtype=torch.long, device="meta"),
              None, None)
    assert meta.shape == (4, 9) and meta.dtype == torch.bool and meta.device.type == "meta"
    if hasattr(torch.library, "opcheck"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        confidence = random_rows(4, 9, seed=0).to(device)
        for args in ((confidence, torch.tensor([1, 2, 3, 0], device=device), None, None),
                     (confidence, None, 0.5, None), (confidence, None, None, 1.0)):
            torch.library.opcheck(op.default, args)


def nan_rows(dtype):
    """Rows with NaN confidences (a 0/0 softmax upstream) among numbers, ties and -inf; a row
    all NaN, a row all -inf, NaN next to +inf."""
    nan, inf = float("nan"), float("inf")
    rows = [[0.5, nan, -inf, 0.9, nan, 0.5, 0.2, 0.95],
            [nan, nan, nan, nan, nan, nan, nan, nan],
            [-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf],
            [0.3, 0.3, nan, 0.99, -inf, inf, 0.3, nan],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, nan],
            [nan, -inf, 0.97, 0.97, -inf, nan, 0.6, 0.96]]
    return torch.tensor(rows, dtype=dtype)


def nan_cases(batch):
    cases = [dict(num_transfer=torch.full((batch,), k)) for k in (0, 1, 2, 3, 5, 8)]
    return cases + [dict(threshold=0.5), dict(threshold=0.95), dict(factor=1.0),
                    dict(factor=0.2), dict(factor=10.0)]


def test_torch_op_nan_order():
    """The oracle: NaN first (by position), then numbers, then -inf; top-k takes NaN, the
    threshold and factor rules never do; k never selects more than k."""
    c = nan_rows(torch.float32)
    got = sampling.select_transfer(c, torch.full((6,), 3))
    assert got[0].nonzero().flatten().tolist() == [1, 4, 7]
    assert got[3].nonzero().flatten().tolist() == [2, 5, 7]
    assert (got.sum(1) == 3).all()
    assert not (sampling.select_transfer(c, threshold=0.0) & c.isnan()).any()
    assert not (sampling.select_transfer(c, factor=10.0) & c.isnan()).any()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kernel_nan_confidences_equal_torch_op(dtype):
    """NaN ranks as torch's sort puts it (before every number): the kernel selects exactly the
    torch op's positions (top-k never more than k), in one tile and in several."""
    confidence = nan_rows(dtype).to(KDEVICE)
    check_against_torch_op(sk.select_transfer, confidence, cases=nan_cases(6))
    mixed = random_rows(5, 40, seed=7, levels=6, dtype=dtype)
    mixed[torch.rand(5, 40, generator=torch.Generator().manual_seed(7)) < 0.2] = float("nan")
    check_against_torch_op(sk.select_transfer, mixed.to(KDEVICE), seed=7)


@needs_kernel
def test_kernel_nan_confidences_in_tiles(monkeypatch):
    monkeypatch.setattr(sk, "_tile_config", lambda num_pos: (16, 16, 4))
    mixed = random_rows(4, 40, seed=9, levels=6)
    mixed[torch.rand(4, 40, generator=torch.Generator().manual_seed(9)) < 0.25] = float("nan")
    check_against_torch_op(sk.select_transfer, mixed.to(KDEVICE), seed=9)


@needs_extension
def test_extension_cpu_op_nan_confidences():
    """The extension's CPU kernel, which shares its rank rule (csrc/select_transfer.h) with the
    CUDA kernel."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        check_against_torch_op(cuda_ext.select_transfer, nan_rows(dtype), cases=nan_cases(6))
