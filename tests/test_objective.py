"""The MDLM training losses against a literal statement of LLaDA's description, and their
expectation against the ELBO that the likelihood estimator targets.

The description (LLaDA's guidelines): ``t ~ U(0, 1)`` per row, ``p = (1 - eps) t + eps``,
each maskable token masked when its uniform is below ``p``; cross-entropy on masked tokens
divided by ``p``; pre-training sums over the batch and divides by ``B * L``; SFT never masks
the prompt and divides each row by its answer length, then by ``B``.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from genjo_fast import get_log_likelihood
from genjo_fast.objective import EPS, forward_process, pretraining_loss, sft_loss
from genjo_fast.testing import TinyBidirectionalLM, random_llada

VOCAB, MASK = 23, 22


def _model(kind):
    if kind == "llada":
        return random_llada(VOCAB, d_model=32, n_heads=2, n_layers=2, seed=3)
    return TinyBidirectionalLM(VOCAB, d_model=32, n_heads=2, n_layers=2, seed=3)


def _tokens(batch, length, seed=0):
    return torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _literal(model, x, maskable, attention_mask, seed, eps, normalise):
    """Element by element, the draws in the documented order: t (B,), then u (B, L)."""
    g = torch.Generator().manual_seed(seed)
    batch, length = x.shape
    t = torch.rand(batch, generator=g)
    u = torch.rand(batch, length, generator=g)
    total = 0.0
    for b in range(batch):
        p = (1 - eps) * float(t[b]) + eps
        noisy = x[b].clone()
        masked = [i for i in range(length) if maskable[b][i] and float(u[b, i]) < p]
        noisy[masked] = MASK
        key = None if attention_mask is None else attention_mask[b:b + 1]
        logits = model(noisy[None], attention_mask=key).logits[0].float()
        row = sum(float(F.cross_entropy(logits[i], x[b, i])) / p for i in masked)
        total += normalise(b, row)
    return total


@pytest.mark.parametrize("kind", ["llada", "generic"])
def test_sft_loss_is_the_statement(kind):
    model = _model(kind)
    x = _tokens(5, 13)
    prompt_lengths = torch.tensor([3, 7, 1, 12, 5])
    loss = sft_loss(model, x, prompt_lengths, MASK, generator=torch.Generator().manual_seed(7))
    maskable = [[i >= int(prompt_lengths[b]) for i in range(13)] for b in range(5)]
    expected = _literal(model, x, maskable, None, 7, EPS,
                        lambda b, row: row / (13 - int(prompt_lengths[b])) / 5)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_sft_loss_with_left_padded_prompts():
    """Left padding lies in the prompt region: never masked, and masked out as keys."""
    model = _model("llada")
    x = _tokens(3, 10, seed=1)
    attention_mask = torch.ones(3, 10, dtype=torch.long)
    attention_mask[1, :2] = 0
    attention_mask[2, :4] = 0
    loss = sft_loss(model, x, 5, MASK, attention_mask, generator=torch.Generator().manual_seed(2))
    maskable = [[i >= 5 for i in range(10)]] * 3
    expected = _literal(model, x, maskable, attention_mask, 2, EPS, lambda b, row: row / 5 / 3)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_pretraining_loss_is_the_statement(padded):
    model = _model("llada")
    x = _tokens(4, 11, seed=4)
    attention_mask = None
    if padded:
        attention_mask = torch.ones(4, 11, dtype=torch.long)
        attention_mask[0, :3] = 0
    loss = pretraining_loss(model, x, MASK, attention_mask, eps=0.05,
                            generator=torch.Generator().manual_seed(9))
    real = [[attention_mask is None or bool(attention_mask[b, i]) for i in range(11)]
            for b in range(4)]
    tokens = sum(map(sum, real))
    assert tokens == (44 - 3 if padded else 44)
    expected = _literal(model, x, real, attention_mask, 9, 0.05, lambda b, row: row / tokens)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_forward_process_masks_with_probability_p():
    x = torch.zeros(4000, 50, dtype=torch.long)
    maskable = torch.ones_like(x, dtype=torch.bool)
    maskable[:, :10] = False
    noisy, masked, p = forward_process(x, maskable, 7, generator=torch.Generator().manual_seed(0))
    assert not masked[:, :10].any() and torch.equal(noisy == 7, masked)
    assert float(p.min()) >= EPS and float(p.max()) <= 1
    assert abs(float(p.mean()) - 0.5) < 0.02  # t ~ U(0, 1)
    # Given p, each maskable position is masked with probability p.
    rate = masked[:, 10:].float().mean(1)
    assert float((rate - p).abs().mean()) < 0.07


def test_gradients_reach_every_parameter():
    model = _model("llada").requires_grad_(True)
    loss = sft_loss(model, _tokens(4, 12), 4, MASK, generator=torch.Generator().manual_seed(0))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name


def test_expectation_is_the_likelihood_elbo():
    """E[answer length * SFT loss] equals, up to eps, the quantity the reference likelihood
    estimator averages, sum_k E_{|m| = k}[sum_{i in m} CE_i(m)] / k: both are minus LLaDA's
    ELBO of log p(answer | prompt). Exact values by enumerating the 2^4 answer masks."""
    model = _model("llada")
    prompt, answer = torch.tensor([1, 5, 9]), torch.tensor([2, 8, 3, 4])
    length = len(answer)
    sequence = torch.cat([prompt, answer])
    masks = [m for m in itertools.product([0, 1], repeat=length) if any(m)]
    ce_sums = {}
    with torch.no_grad():
        for m in masks:
            noisy = sequence.clone()
            positions = [len(prompt) + i for i in range(length) if m[i]]
            noisy[positions] = MASK
            logits = model(noisy[None]).logits[0].float()
            ce_sums[m] = float(F.cross_entropy(logits[positions], sequence[positions],
                                               reduction="sum"))
    elbo_terms = sum(ce_sums[m] / sum(m) / math.comb(length, sum(m)) for m in masks)

    # E_t over a fine midpoint grid of the per-row SFT loss times the answer length.
    t = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    p = (1 - EPS) * t + EPS
    expected = sum(float((p ** sum(m) * (1 - p) ** (length - sum(m)) / p).mean()) * ce_sums[m]
                   for m in masks)
    assert expected == pytest.approx(elbo_terms, rel=1e-2)  # eps moves it a little

    rows = 40_000
    x = sequence.repeat(rows, 1)
    with torch.no_grad():
        per_row = [float(sft_loss(model, x[i:i + 8000], len(prompt), MASK,
                                  generator=torch.Generator().manual_seed(i))) * length
                   for i in range(0, rows, 8000)]
    mean = sum(per_row) / len(per_row)
    spread = (sum((v - mean) ** 2 for v in per_row) / (len(per_row) - 1)) ** 0.5
    assert abs(mean - expected) < 4 * spread / len(per_row) ** 0.5 + 1e-3 * expected

    estimate = get_log_likelihood(model, prompt, answer, mc_num=512, batch_size=64,
                                  mask_id=MASK, generator=torch.Generator().manual_seed(0))
    assert -estimate == pytest.approx(elbo_terms, rel=0.03)


def test_bad_arguments():
    model = _model("llada")
    x = _tokens(2, 6)
    with pytest.raises(ValueError, match="prompt_lengths"):
        sft_loss(model, x, 6, MASK)  # no answer left
    with pytest.raises(ValueError, match="attention_mask"):
        sft_loss(model, x, 2, MASK, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="eps"):
        pretraining_loss(model, x, MASK, eps=1.0)
    with pytest.raises(ValueError, match="maskable"):
        forward_process(x, torch.ones(2, 6), MASK)
