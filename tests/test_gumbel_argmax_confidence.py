"""The torch backend's sampling op against the reference's full-tensor arithmetic."""
import pytest
import torch
import torch.nn.functional as F

from genjo_fast import reference, sampling


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
