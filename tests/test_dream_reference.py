"""genjo_fast.reference_dream: the plain statement of Dream's diffusion_generate.

Hand-built models with known logits check each rule of upstream's sampler (the shift, each
alg, the hooks, history, padding, the batch-mean quirk, settings); frequency tests check the
sampling distributions; tiny real models check DreamModel against the upstream-shaped
statement through the sampler.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from genjo_fast import TensorDraws, TorchDraws
from genjo_fast.dream_settings import DreamGenerateOutput, resolve_settings
from genjo_fast.reference_dream import diffusion_generate, inverse_cdf, sample_tokens
from genjo_fast.testing import UpstreamShapedDream, random_dream, random_prompts

MASK = 11  # the mask id of the hand-built models (vocabulary 12)


class TableModel:
    """Returns fixed logits: row ``r`` of every sequence is ``table[r]`` (or
    ``table[b, r]``), whatever the tokens; records what it is called with."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.calls = []

    def __call__(self, x, attention_mask, tok_idx):
        self.calls.append((x.clone(), attention_mask, tok_idx))
        table = self.table if self.table.dim() == 3 else self.table.expand(x.shape[0], -1, -1)
        return SimpleNamespace(logits=table[:, :x.shape[1]].clone())


def peaked_table(length: int, vocab: int = 12, token=lambda r: (r + 3) % MASK,
                 seed: int = 0) -> torch.Tensor:
    """Row r puts a large logit on ``token(r)`` over small random noise (mask id excluded)."""
    g = torch.Generator().manual_seed(seed)
    table = 0.1 * torch.randn(length, vocab, generator=g)
    table[:, MASK] = -30.0
    for r in range(length):
        table[r, token(r)] += 5.0 + 0.1 * r
    return table


def masked_count_schedule(masked: int, steps: int, eps: float = 1e-3) -> list:
    """Positions revealed per step for a batch whose rows all have ``masked`` masks: the
    documented ``int(n * (1 - s/t))`` (all remaining at the last step), in float32."""
    ts = torch.linspace(1, eps, steps + 1)
    out, left = [], masked
    for i in range(steps):
        n = left if i == steps - 1 else int(torch.tensor(float(left)) * (1 - ts[i + 1] / ts[i]))
        out.append(n)
        left -= n
    return out


# --------------------------------------------------------------------------------------------
# The canvas, the shift, the hooks, history
# --------------------------------------------------------------------------------------------

def test_shifted_logits_and_the_first_row():
    """Position i takes row i-1's prediction; position 0 (masked here by the tokens hook)
    takes row 0's (the first row is duplicated)."""
    model = TableModel(peaked_table(6))
    prompt = torch.tensor([[1, 2]])

    def mask_first(step, x, logits):
        if step is None:
            x[:, 0] = MASK
        return x

    out = diffusion_generate(model, prompt, max_new_tokens=4, steps=1, alg="maskgit_plus",
                             mask_token_id=MASK, generation_tokens_hook_func=mask_first)
    assert out.tolist() == [[3, 2, 4, 5, 6, 7]]  # row r predicts r + 3


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_reveal_count_schedule(alg):
    """Each step reveals int(mean masked * (1 - s/t)) positions, all remaining at the last."""
    model = TableModel(peaked_table(10, seed=1))
    out = diffusion_generate(model, torch.tensor([[1, 2]] * 2), max_new_tokens=8, steps=4,
                             alg=alg, mask_token_id=MASK, output_history=True,
                             return_dict_in_generate=True)
    revealed = [8 - int((h[0] == MASK).sum()) for h in out.history]
    steps_counts = [b - a for a, b in zip([0] + revealed, revealed)]
    assert steps_counts == masked_count_schedule(8, 4) == [1, 2, 2, 3]
    assert not (out.sequences == MASK).any()


def test_each_confidence_rule_picks_its_own_position():
    """Three masked positions whose rows rank differently by top-1 probability, by top-1 minus
    top-2, and by negative entropy; one position is revealed at step 0 (int(3 * 0.4995))."""
    probs = torch.tensor([[0.50, 0.25, 0.25, 0, 0],
                          [0.45, 0.1375, 0.1375, 0.1375, 0.1375],
                          [0.45, 0.45, 0.10, 0, 0]])
    table = torch.full((4, 12), -30.0)
    table[:3, :5] = probs.clamp_min(1e-13).log()
    p = torch.softmax(table[:3], -1)
    top2 = p.topk(2).values
    expected = {"maskgit_plus": int(p.max(-1).values.argmax()),
                "topk_margin": int((top2[:, 0] - top2[:, 1]).argmax()),
                "entropy": int((p * torch.log(p + 1e-10)).sum(-1).argmax())}
    assert sorted(expected.values()) == [0, 1, 2]  # the three rules disagree here
    for alg, row in expected.items():
        out = diffusion_generate(TableModel(table), torch.tensor([[7]]), max_new_tokens=3,
                                 steps=2, alg=alg, mask_token_id=MASK, output_history=True,
                                 return_dict_in_generate=True)
        first = out.history[0][0]
        assert (first != MASK).tolist() == [True] + [j == row for j in range(3)], alg
        assert int(first[1 + row]) == 0  # the argmax of the row


def test_origin_reveals_by_the_remask_draws():
    """``origin``: a masked position is revealed at step i when its remask draw is below
    1 - s/t (0.4995 at step 0 of 2); at the last step every remaining one is."""
    model = TableModel(peaked_table(6))
    remask = torch.tensor([[[0.0, 0.0, 0.1, 0.9, 0.49, 0.51]],
                           [[0.0, 0.0, 0.99, 0.99, 0.99, 0.99]]])
    out = diffusion_generate(model, torch.tensor([[1, 2]]), max_new_tokens=4, steps=2,
                             mask_token_id=MASK, draws=TensorDraws(remask=remask),
                             output_history=True, return_dict_in_generate=True)
    assert out.history[0].tolist() == [[1, 2, 4, MASK, 6, MASK]]
    assert out.sequences.tolist() == [[1, 2, 4, 5, 6, 7]]


def test_hooks_history_and_return_forms():
    model = TableModel(peaked_table(7))
    logits_calls, token_calls = [], []

    def logits_hook(step, x, logits):
        logits_calls.append((step, x.shape, logits.shape))
        logits = logits.clone()
        logits[..., 9] = 100.0  # every position predicts 9
        return logits

    def tokens_hook(step, x, logits):
        token_calls.append((step, logits is None))
        x[:, -1] = 3  # pinned at every step
        return x

    out = diffusion_generate(model, torch.tensor([[1, 2], [4, 5]]), max_new_tokens=5, steps=3,
                             alg="entropy", mask_token_id=MASK, output_history=True,
                             return_dict_in_generate=True, generation_logits_hook_func=logits_hook,
                             generation_tokens_hook_func=tokens_hook)
    assert isinstance(out, DreamGenerateOutput)
    assert logits_calls == [(i, (2, 7), (2, 7, 12)) for i in range(3)]
    assert token_calls == [(None, True), (0, False), (1, False), (2, False)]
    assert out.sequences.tolist() == [[1, 2, 9, 9, 9, 9, 3], [4, 5, 9, 9, 9, 9, 3]]
    assert len(out.history) == 3 and torch.equal(out.history[-1], out.sequences)
    assert out.history[0] is not out.sequences and (out.history[0] == MASK).any()

    plain = diffusion_generate(model, torch.tensor([[1, 2]]), max_new_tokens=5, steps=3,
                               mask_token_id=MASK, output_history=True)
    assert isinstance(plain, torch.Tensor) and plain.shape == (1, 7)
    no_history = diffusion_generate(model, torch.tensor([[1, 2]]), max_new_tokens=5, steps=3,
                                    mask_token_id=MASK, return_dict_in_generate=True)
    assert no_history.history is None


def test_padding_inputs_as_upstream_builds_them():
    model = TableModel(peaked_table(6))
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 1]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    diffusion_generate(model, prompt, attention_mask=mask, max_new_tokens=2, steps=1,
                       mask_token_id=MASK)
    _, attn, tok_idx = model.calls[0]
    assert tok_idx.tolist() == [[1, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    real = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]).bool()
    assert attn.dtype == torch.bool and attn.shape == (2, 1, 6, 6)
    assert torch.equal(attn[:, 0], real[:, :, None] & real[:, None, :])
    for full_mask in (torch.ones_like(mask), None):
        model.calls.clear()
        diffusion_generate(model, prompt, attention_mask=full_mask, max_new_tokens=2, steps=1,
                           mask_token_id=MASK)
        assert model.calls[0][1] == "full" and model.calls[0][2] is None


def test_num_return_sequences_repeats_each_prompt():
    model = TableModel(peaked_table(5))
    out = diffusion_generate(model, torch.tensor([[1, 2], [3, 4]]), max_new_tokens=3, steps=2,
                             alg="maskgit_plus", mask_token_id=MASK, num_return_sequences=2)
    assert out.shape == (4, 5)
    assert out[:, :2].tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]


# --------------------------------------------------------------------------------------------
# The batch-mean quirk
# --------------------------------------------------------------------------------------------

def quirk_setup(seed=0):
    """Row 0 has 6 masked positions (2 mask ids in its prompt), row 1 has 4: the batch mean
    is 5, so at a single (last) step row 0 keeps one mask and row 1 must take a position that
    is not masked."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(2, 7, 12, generator=g)
    table[..., MASK] = -30.0
    prompt = torch.tensor([[1, MASK, MASK], [1, 2, 3]])
    return TableModel(table), prompt


@pytest.mark.parametrize("alg_temp", [None, 0.5])
def test_batch_mean_quirk_remasks_the_lowest_unmasked_position(alg_temp):
    model, prompt = quirk_setup()
    draws = TensorDraws(position=torch.rand(1, 2, 7, dtype=torch.float64,
                                            generator=torch.Generator().manual_seed(1)))
    out = diffusion_generate(model, prompt, max_new_tokens=4, steps=1, alg="maskgit_plus",
                             alg_temp=alg_temp, mask_token_id=MASK, draws=draws)
    # Row 1: its 4 masked positions are revealed and position 0 (a prompt token, confidence
    # -inf, the lowest such position) gets the mask id written over it.
    assert out[1, 0] == MASK and not (out[1, 1:] == MASK).any()
    # Row 0: five of its six masked positions are revealed, one mask is left in the output.
    assert int((out[0] == MASK).sum()) == 1 and out[0, 0] == 1
    if alg_temp is None:  # the least confident masked position is the one left
        shifted = torch.cat([model.table[0, :1], model.table[0, :-1]])
        conf = torch.softmax(shifted, -1).max(-1).values
        masked = [1, 2, 3, 4, 5, 6]
        assert int((out[0] == MASK).nonzero()) == min(masked, key=lambda j: conf[j])


def test_batch_mean_quirk_when_a_row_has_no_mask_left():
    """A row without masks while the batch-mean count is positive: ``topk`` re-masks its
    lowest positions; with ``alg_temp`` upstream's multinomial raises (all-NaN weights)."""
    model, prompt = quirk_setup()
    prompt = torch.tensor([[1, 2, 3], [1, 2, 3]])

    def fill_row_1(step, x, logits):
        if step is None:
            x[1, 3:] = 4
        return x

    out = diffusion_generate(model, prompt, max_new_tokens=4, steps=1, alg="entropy",
                             mask_token_id=MASK, generation_tokens_hook_func=fill_row_1)
    assert out[1].tolist() == [MASK, MASK, 3, 4, 4, 4, 4]  # n = int(4 / 2) = 2
    assert int((out[0, 3:] == MASK).sum()) == 2 and out[0, :3].tolist() == [1, 2, 3]
    with pytest.raises(RuntimeError, match="alg_temp"):
        diffusion_generate(model, prompt, max_new_tokens=4, steps=1, alg="entropy",
                           alg_temp=1.0, mask_token_id=MASK,
                           generation_tokens_hook_func=fill_row_1)


# --------------------------------------------------------------------------------------------
# Sampling: distributions and upstream's fallback
# --------------------------------------------------------------------------------------------

def assert_frequencies(counts: torch.Tensor, probs: torch.Tensor, n: int):
    freq = counts.double() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-12).all(), (freq, probs)


@pytest.mark.parametrize("alg, filters", [("maskgit_plus", dict(top_k=4)),
                                          ("origin", dict(top_p=0.8)),
                                          ("entropy", {})])
def test_tokens_follow_the_filtered_softmax(alg, filters):
    n = 4000
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 1.5, -1.0, 0.2, 0.9, -2.0, 0.1, 0.3, -30.0])
    table = logits.expand(2, 12)
    g = torch.Generator().manual_seed(0)
    out = diffusion_generate(TableModel(table), torch.full((n, 1), 2), max_new_tokens=1,
                             steps=1, alg=alg, temperature=0.7, mask_token_id=MASK,
                             draws=TorchDraws(g), **filters)
    scaled = logits / 0.7
    p = torch.softmax(scaled, -1)
    if "top_k" in filters:
        keep = scaled >= scaled.topk(filters["top_k"]).values[-1]
    elif "top_p" in filters:  # the smallest prefix of the sorted tokens reaching top_p
        order = p.argsort(descending=True)
        reach = (p[order].cumsum(0) - p[order]) < filters["top_p"]
        keep = torch.zeros(12, dtype=torch.bool)
        keep[order[reach]] = True
    else:
        keep = torch.ones(12, dtype=torch.bool)
    expected = torch.where(keep, p, 0.0).double()
    expected /= expected.sum()
    counts = torch.bincount(out[:, 1], minlength=12)
    assert (counts[~keep] == 0).all()
    assert_frequencies(counts, expected, n)


def test_origin_reveal_rate():
    n = 4000
    out = diffusion_generate(TableModel(peaked_table(2)), torch.full((n, 1), 2),
                             max_new_tokens=1, steps=2, mask_token_id=MASK,
                             draws=TorchDraws(torch.Generator().manual_seed(1)),
                             output_history=True, return_dict_in_generate=True)
    ts = torch.linspace(1, 1e-3, 3)
    p = float(1 - ts[1] / ts[0])
    revealed = int((out.history[0][:, 1] != MASK).sum())
    assert abs(revealed / n - p) <= 5 * math.sqrt(p * (1 - p) / n)
    assert not (out.sequences == MASK).any()


def test_alg_temp_positions_follow_sequential_multinomial():
    """With alg_temp, the 2 positions revealed at step 0 (int(5 * 0.4995)) are distributed as
    two draws without replacement from softmax(confidence / alg_temp)."""
    n, alg_temp = 4000, 0.1
    g = torch.Generator().manual_seed(0)
    table = torch.randn(6, 12, generator=g) * 1.5
    table[:, MASK] = -30.0
    out = diffusion_generate(TableModel(table), torch.full((n, 1), 2), max_new_tokens=5,
                             steps=2, alg="maskgit_plus", alg_temp=alg_temp, mask_token_id=MASK,
                             draws=TorchDraws(torch.Generator().manual_seed(2)),
                             output_history=True, return_dict_in_generate=True)
    conf = torch.softmax(table[:5], -1).max(-1).values  # positions 1..5 use rows 0..4
    w = torch.softmax(conf / alg_temp, -1).double()
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    expected = torch.tensor([w[i] * w[j] / (1 - w[i]) + w[j] * w[i] / (1 - w[j])
                             for i, j in pairs])
    revealed = out.history[0][:, 1:] != MASK
    assert (revealed.sum(1) == 2).all()
    counts = torch.tensor([int((revealed[:, i] & revealed[:, j]).sum()) for i, j in pairs])
    assert_frequencies(counts, expected, n)


def test_categorical_failure_falls_back_to_argmax():
    """Upstream's Categorical(probs) rejects bf16 rows whose normalised sum is not 1 in bf16;
    its bare except then takes the argmax for every row of the call."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        logits = (3 * torch.randn(4, 50, generator=g)).to(torch.bfloat16)
        try:
            torch.distributions.Categorical(probs=torch.softmax(logits, -1))
        except ValueError:
            break
    else:
        pytest.fail("no bf16 example rejected by Categorical was found")
    u = torch.full((4,), 0.999, dtype=torch.float64)
    conf, x0 = sample_tokens(logits, temperature=1.0, uniform=u)
    probs = torch.softmax(logits, -1)
    assert torch.equal(x0, probs.argmax(-1)) and torch.equal(conf, probs.max(-1).values)
    # In float32 the same rows pass the check and the draws decide.
    conf32, x32 = sample_tokens(logits.float(), temperature=1.0, uniform=u)
    probs32 = torch.softmax(logits.float(), -1)
    assert torch.equal(x32, inverse_cdf(probs32, u)) and not torch.equal(x32, x0)
    assert torch.equal(conf32, probs32.gather(-1, x32[:, None])[:, 0])


def test_inverse_cdf_never_picks_zero_probability_ids():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 5)
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.9999], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [1, 1, 1, 3, 3]


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

def test_settings_defaults_and_lengths():
    s = resolve_settings(object(), 5)
    assert (s.max_length, s.steps, s.eps, s.alg, s.temperature, s.top_p, s.top_k,
            s.alg_temp, s.mask_token_id) == (25, 512, 1e-3, "origin", 0.0, None, None, None,
                                             151666)
    assert resolve_settings(object(), 5, max_new_tokens=7, max_length=40).max_length == 12
    assert resolve_settings(object(), 5, max_length=20).max_length == 20  # passed: kept
    assert resolve_settings(object(), 5, max_length=None).max_length == 25
    with pytest.raises(ValueError, match="max_length"):
        resolve_settings(object(), 20, max_length=20)


def test_settings_from_the_model_config_when_no_generation_config():
    """Upstream builds its generation config from the model's config: under transformers 4.4x
    a config carries temperature 1.0, top_k 50, top_p 1.0, max_length 20."""
    model = SimpleNamespace(config=SimpleNamespace(
        temperature=1.0, top_k=50, top_p=1.0, max_length=20, max_position_embeddings=22,
        mask_token_id=7, hidden_size=8))
    s = resolve_settings(model, 5)
    assert (s.temperature, s.top_k, s.top_p, s.max_length, s.mask_token_id) == (
        1.0, 50, 1.0, 22, 7)  # 20 + 5 capped at 22
    assert resolve_settings(model, 5, temperature=0.3, top_k=None).temperature == 0.3
    assert resolve_settings(model, 5, top_k=None).top_k is None


def test_settings_from_a_generation_config_and_kwargs():
    model = SimpleNamespace(config=SimpleNamespace(temperature=1.0, top_k=50, mask_token_id=7),
                            generation_config=SimpleNamespace(mask_token_id=9))
    given = SimpleNamespace(temperature=0.5, steps=10, max_length=30, mask_token_id=None,
                            alg="entropy")
    s = resolve_settings(model, 5, given, steps=3)
    assert (s.temperature, s.top_k, s.steps, s.max_length, s.mask_token_id, s.alg) == (
        0.5, None, 3, 30, 9, "entropy")
    assert resolve_settings(model, 5, {"max_length": 20}).max_length == 25  # upstream's 20
    assert resolve_settings(model, 5, {"max_new_tokens": 4}).max_length == 9


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(alg="greedy"), ValueError, "alg"), (dict(steps=0), ValueError, "steps"),
    (dict(top_k=0), ValueError, "top_k"), (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(threshold=0.9), TypeError, "threshold"),
])
def test_settings_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        resolve_settings(object(), 5, **kwargs)


def test_bad_inputs():
    model = TableModel(peaked_table(6))
    with pytest.raises(ValueError, match="inputs"):
        diffusion_generate(model, torch.tensor([1, 2]), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        diffusion_generate(model, torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3),
                           max_new_tokens=2)


# --------------------------------------------------------------------------------------------
# Draws and real models
# --------------------------------------------------------------------------------------------

def test_dream_draws():
    g = torch.Generator().manual_seed(0)
    token = torch.rand(3, 2, 9, dtype=torch.float64, generator=g)
    draws = TensorDraws(token=token, position=token.flip(0))
    assert torch.equal(draws.token(1, 2, 7, 2, "cpu"), token[1, :, 2:7])
    assert torch.equal(draws.position(0, 0, 9, 1, "cpu"), token[2, :1])
    with pytest.raises(ValueError, match="token"):
        TensorDraws().token(0, 0, 1, 1, "cpu")
    fresh = TorchDraws(torch.Generator().manual_seed(0))
    for draw in (fresh.token, fresh.position):
        assert draw(0, 3, 8, 2, "cpu").shape == (2, 5)
        assert draw(0, 3, 8, 2, "cpu").dtype == torch.float64


@pytest.mark.parametrize("alg, temperature, alg_temp", [
    ("maskgit_plus", 0.0, None), ("topk_margin", 0.0, None), ("entropy", 0.9, 0.5),
    ("origin", 0.8, None),
])
def test_dream_model_and_the_upstream_statement_sample_alike(alg, temperature, alg_temp):
    model = random_dream(vocab_size=101, hidden_size=48, num_key_value_heads=2, seed=3,
                         mask_token_id=100)
    upstream = UpstreamShapedDream(model.config.to_dict())
    upstream.load_state_dict(model.state_dict())
    prompt, mask = random_prompts(3, 6, 100, pad_id=0, seed=4)
    g = torch.Generator().manual_seed(5)
    draws = TensorDraws(remask=torch.rand(6, 3, 14, generator=g),
                        token=torch.rand(6, 3, 14, dtype=torch.float64, generator=g),
                        position=torch.rand(6, 3, 14, dtype=torch.float64, generator=g))
    kw = dict(attention_mask=mask, max_new_tokens=8, steps=6, alg=alg, alg_temp=alg_temp,
              temperature=temperature, draws=draws)
    got = diffusion_generate(model, prompt, **kw)
    want = diffusion_generate(upstream, prompt, **kw)
    assert got.shape == (3, 14) and torch.equal(got, want)
    assert torch.equal(got[:, :6], prompt)
