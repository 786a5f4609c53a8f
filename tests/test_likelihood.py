"""Monte Carlo log-likelihood: genjo_fast's estimator against the plain reference statement."""
import pytest
import torch

import genjo_fast
from genjo_fast import likelihood, reference_likelihood as ref
from genjo_fast.reference_likelihood import TensorMaskDraws, TorchMaskDraws
from genjo_fast.testing import FullLogitsOnly, TinyBidirectionalLM, random_llada

from conftest import MASK_ID, VOCAB


@pytest.fixture(autouse=True)
def _sdpa(monkeypatch):
    monkeypatch.setenv("GENJO_FAST_ATTENTION", "sdpa")  # the interpreter is tested elsewhere


@pytest.fixture(scope="module")
def models():
    tiny = TinyBidirectionalLM(VOCAB, d_model=32, n_heads=2, n_layers=2, seed=0)
    return {
        # genjo_fast's LLaDA model: hidden states of the masked rows only reach the LM head.
        "llada": random_llada(VOCAB, d_model=32, n_heads=2, n_layers=2, mlp_hidden_size=64,
                              seed=0),
        # forward(logits_slice=...): logits from the first answer position on.
        "sliced": tiny,
        # full logits only (an HF model): read at the masked rows.
        "generic": FullLogitsOnly(tiny),
    }


def tokens(length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MASK_ID, (length,), generator=g)


def pair(prompt_len, answer_len, seed=0):
    return tokens(prompt_len, seed), tokens(answer_len, seed + 1000)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("kind", ["llada", "sliced", "generic"])
@pytest.mark.parametrize("prompt_len,answer_len", [(7, 5), (0, 6), (4, 1)])
def test_equals_reference_statement_with_same_draws(models, kind, cfg_scale, prompt_len,
                                                   answer_len):
    prompt, answer = pair(prompt_len, answer_len)
    draws = TensorMaskDraws.sample(4, answer_len, 4, torch.Generator().manual_seed(3))
    args = (prompt, answer, 16, 4, cfg_scale, MASK_ID)
    expected = ref.get_log_likelihood(models[kind], *args, draws=draws)
    got = likelihood.get_log_likelihood(models[kind], *args, draws=draws)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_default_draws_consume_the_rng_as_the_reference(models):
    prompt, answer = pair(6, 5)
    torch.manual_seed(7)
    expected = ref.get_log_likelihood(models["llada"], prompt, answer, 8, 4, mask_id=MASK_ID)
    torch.manual_seed(7)
    got = likelihood.get_log_likelihood(models["llada"], prompt, answer, 8, 4, mask_id=MASK_ID)
    assert got == pytest.approx(expected, rel=1e-5)


def test_mask_counts_are_the_stratified_reference_counts():
    # round(linspace(1, 1 + 3 * 10 / 4, 4)) = round([1, 3.5, 6, 8.5]) (half to even)
    assert ref.mask_counts(1, 10, 4).tolist() == [1, 4, 6, 8]
    # wrapped into 1..T by ((x - 1) % T) + 1
    assert ref.mask_counts(7, 20, 3).tolist() == [7, 14, 20]
    assert ref.mask_counts(3, 7, 16).tolist() == [3, 3, 4, 4, 5, 5, 6, 6, 6, 7, 7, 1, 1, 2, 2, 3]


PAIRS = [(3, 4), (9, 2), (0, 7), (5, 1), (9, 6), (2, 3)]


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
@pytest.mark.parametrize("kind", ["llada", "generic"])
def test_batched_equals_pair_by_pair(models, kind, cfg_scale):
    pairs = [pair(p, a, seed=i) for i, (p, a) in enumerate(PAIRS)]
    g = torch.Generator().manual_seed(5)
    draws = [TensorMaskDraws.sample(2, len(a), 4, g) for _, a in pairs]
    # 7 rows per call: pairs split across calls and packed with others of other lengths.
    batched = likelihood.get_log_likelihoods(models[kind], pairs, 8, 4, cfg_scale, MASK_ID,
                                             draws=draws, forward_batch_size=7)
    one_by_one = [likelihood.get_log_likelihood(models[kind], p, a, 8, 4, cfg_scale, MASK_ID,
                                                draws=d) for (p, a), d in zip(pairs, draws)]
    oracle = [ref.get_log_likelihood(models[kind], p, a, 8, 4, cfg_scale, MASK_ID, draws=d)
              for (p, a), d in zip(pairs, draws)]
    assert batched == pytest.approx(one_by_one, rel=1e-5, abs=1e-5)
    assert batched == pytest.approx(oracle, rel=1e-5, abs=1e-5)


def test_shared_generator_gives_sequential_values(models):
    pairs = [pair(p, a, seed=i) for i, (p, a) in enumerate(PAIRS)]
    batched = likelihood.get_log_likelihoods(models["llada"], pairs, 8, 4, mask_id=MASK_ID,
                                             generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    sequential = [likelihood.get_log_likelihood(models["llada"], p, a, 8, 4, mask_id=MASK_ID,
                                                generator=g) for p, a in pairs]
    assert batched == pytest.approx(sequential, rel=1e-5, abs=1e-5)


def test_lm_head_runs_on_masked_rows_only(models, monkeypatch):
    model = models["llada"]
    rows = []
    head = model.lm_head
    monkeypatch.setattr(model, "lm_head", lambda h: rows.append(h.shape[0]) or head(h))
    prompt, answer = pair(8, 6)
    draws = TensorMaskDraws.sample(2, 6, 4, torch.Generator().manual_seed(0))
    likelihood.get_log_likelihood(model, prompt, answer, 8, 4, mask_id=MASK_ID, draws=draws)
    masked = sum(int(ref.mask_counts(int(draws.k[r]), 6, 4).sum()) for r in range(2))
    assert sum(rows) == masked


def test_variance_shrinks_with_mc_num(models):
    # 48 independent estimates of one pair: 4x the samples should halve the spread.
    prompt, answer = pair(5, 6)
    estimates = {}
    for mc_num in (16, 64):
        values = likelihood.get_log_likelihoods(
            models["llada"], [(prompt, answer)] * 48, mc_num, 16, mask_id=MASK_ID,
            generator=torch.Generator().manual_seed(mc_num))
        estimates[mc_num] = torch.tensor(values, dtype=torch.float64)
    ratio = float(estimates[16].std() / estimates[64].std())
    assert 1.3 < ratio < 3.2
    # Same expectation: the means agree within a few standard errors.
    error = float((estimates[16].var() / 48 + estimates[64].var() / 48).sqrt())
    assert abs(float(estimates[16].mean() - estimates[64].mean())) < 4 * error


def greedy_answer(model, prompt, length, cfg_scale=0.0):
    """The model's own one-token-per-step greedy continuation (generate with one step per
    token at temperature 0 unmasks the most confident position at each step)."""
    out = genjo_fast.generate(model, prompt[None], steps=length, gen_length=length,
                              block_length=length, cfg_scale=cfg_scale, mask_id=MASK_ID)
    return out[0, len(prompt):]


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["llada", "generic"])
def test_is_greedy_on_constructed_case(models, kind, cfg_scale):
    model = models[kind]
    for seed in range(21, 40):  # a prompt whose greedy answer holds no mask id
        prompt = tokens(6, seed)
        answer = greedy_answer(model, prompt, 5, cfg_scale)
        if not bool((answer == MASK_ID).any()):
            break
    wrong = answer.clone()
    wrong[2] = (wrong[2] + 1) % MASK_ID
    for candidate, expected in ((answer, True), (wrong, False)):
        assert ref.is_greedy_continuation(model, prompt, candidate, cfg_scale, MASK_ID) is expected
        assert likelihood.is_greedy_continuation(model, prompt, candidate, cfg_scale,
                                                 MASK_ID) is expected


def test_greedy_batched_equals_reference(models):
    model = models["llada"]
    pairs = []
    for i, (p, a) in enumerate(PAIRS):
        prompt = tokens(p, 40 + i)
        answer = greedy_answer(model, prompt, a) if i % 2 == 0 else tokens(a, 60 + i)
        answer[answer == MASK_ID] = 0
        pairs.append((prompt, answer))
    pairs.append((pairs[0][0], pairs[0][1][:-1]))  # a prefix of a greedy answer
    expected = [ref.is_greedy_continuation(model, p, a, mask_id=MASK_ID) for p, a in pairs]
    got = likelihood.greedy_continuations(model, pairs, mask_id=MASK_ID, forward_batch_size=3)
    assert got == expected
    assert any(expected)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(answer=torch.tensor([], dtype=torch.long)), ValueError, "answer is empty"),
    (dict(mc_num=10, batch_size=4), ValueError, r"mc_num \(10\) must be a multiple of batch"),
    (dict(mc_num=0), ValueError, "mc_num must be >= 1"),
    (dict(batch_size=2.0), TypeError, "batch_size must be an int"),
    (dict(prompt=torch.tensor([1, MASK_ID])), ValueError, "prompt contains mask_id=129"),
    (dict(answer=torch.tensor([MASK_ID])), ValueError, "answer contains mask_id=129"),
    (dict(prompt=torch.ones(2, 3, dtype=torch.long)), ValueError, "prompt must have shape"),
    (dict(answer=torch.ones(3)), TypeError, "answer must hold integer token ids"),
    (dict(answer=[1, 2]), TypeError, "answer must be a torch.Tensor"),
    (dict(cfg_scale=-1.0), ValueError, "cfg_scale must be finite and >= 0"),
    (dict(mask_id=VOCAB + 3), ValueError, "mask_id=133 is outside the model vocabulary"),
    (dict(forward_batch_size=0), ValueError, "forward_batch_size must be >= 1"),
    (dict(draws=TensorMaskDraws(torch.tensor([1, 1]), torch.zeros(2, 4, 9, dtype=torch.long))),
     ValueError, "TensorMaskDraws holds 2 rounds"),
    (dict(draws=object()), TypeError, "draws must have a draw"),
])
def test_validation(models, kwargs, error, match):
    args = dict(prompt=torch.tensor([1, 2, 3]), answer=torch.tensor([4, 5]), mc_num=8,
                batch_size=4, mask_id=MASK_ID)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        likelihood.get_log_likelihood(models["llada"], **args)
    if not {"draws", "forward_batch_size", "mask_id"} & set(kwargs):  # the oracle's own
        with pytest.raises(error, match=match):
            ref.get_log_likelihood(models["llada"], **args)


def test_validation_of_pairs(models):
    with pytest.raises(ValueError, match=r"answer of pairs\[1\] is empty"):
        likelihood.get_log_likelihoods(models["llada"], [pair(2, 2), (torch.tensor([1]),
                                       torch.tensor([], dtype=torch.long))], 4, 4,
                                       mask_id=MASK_ID)
    with pytest.raises(TypeError, match=r"pairs\[0\] must be a \(prompt, answer\) pair"):
        likelihood.get_log_likelihoods(models["llada"], [torch.tensor([1, 2])], 4, 4,
                                       mask_id=MASK_ID)
    with pytest.raises(ValueError, match="draws holds 1 sources for 2 pairs"):
        likelihood.get_log_likelihoods(models["llada"], [pair(2, 2), pair(3, 3)], 4, 4,
                                       mask_id=MASK_ID, draws=[TorchMaskDraws()])


def test_tokens_outside_the_vocabulary_are_named():
    from genjo_fast.testing import random_llada

    model = random_llada(50, d_model=16, n_heads=2, n_layers=1)
    with pytest.raises(ValueError, match=r"a prompt or answer holds token ids outside the model vocabulary"):
        genjo_fast.get_log_likelihood(model, torch.tensor([1, 60]), torch.tensor([2, 3]),
                                      mc_num=2, batch_size=2, mask_id=49)
