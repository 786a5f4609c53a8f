"""The masked-LM family (genjo_fast.mdlm) against its plain statement (genjo_fast.reference_mdlm).

Real transformers classes with tiny random configs (ModernBERT, BERT, RoBERTa masked LMs;
GPT-2 run as DiffuGPT). Token-for-token tests hand both sides the same draws; frequency tests
check the distributions the draws produce.
"""
import math

import pytest
import torch

pytest.importorskip("transformers")

from genjo_fast import engine, reference_mdlm  # noqa: E402
from genjo_fast.mdlm import (MDLMStats, RowRunner, activation_bytes,  # noqa: E402
                             context_window, cut_at_eos, forward_rows, head_split,
                             mdlm_generate, mdlm_generate_steps, mdlm_semi_autoregressive)
from genjo_fast.mdlm_contract import (TensorMDLMDraws, TorchMDLMDraws,  # noqa: E402
                                      edit_probability, num_to_unmask, unmask_probability)
from genjo_fast.mdlm_sampling import sample_rows  # noqa: E402
from genjo_fast.testing import TinyBidirectionalLM  # noqa: E402
from genjo_fast.testing_mdlm import (EOS_ID, KINDS, MASK_ID, PAD_ID, tiny_model,  # noqa: E402
                                     tiny_tokenizer)

VOCAB = 61
SHIFT = {"modernbert": 0, "bert": 0, "roberta": 0, "gpt2": 1}


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_model(kind, positions=48) for kind in KINDS}


@pytest.fixture(scope="module")
def prompts():
    tok = tiny_tokenizer()
    return [torch.tensor(tok.encode(text)) for text in
            ("the cat sat on", "yes no what why how the dog", "<|im_start|> user hot")]


def options(kind, **overrides):
    base = dict(mask_id=MASK_ID, pad_id=PAD_ID, eos_id=EOS_ID, shift=SHIFT[kind])
    base.update(overrides)
    return base


def fresh_draws(steps, batch, length, seed=0):
    return TensorMDLMDraws.random(steps, batch, length, VOCAB,
                                  generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The model: head split, full attention for GPT-2, context windows.

@pytest.mark.parametrize("kind", KINDS)
def test_head_split_equals_the_models_forward(models, kind):
    model = models[kind]
    body, head = head_split(model)
    x = torch.randint(6, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    kwargs = {"is_causal": False} if kind == "gpt2" else {}
    with torch.no_grad():
        assert torch.equal(head(body(x, **kwargs)[0]), model(x, **kwargs).logits)


def test_gpt2_runs_with_full_attention(models):
    """is_causal=False is transformers' full attention: equal to an explicit all-visible 4-D
    mask, different from the causal forward, and the first position sees the last."""
    model = models["gpt2"]
    x = torch.randint(6, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x, is_causal=False).logits
        explicit = model(x, attention_mask=torch.zeros(2, 1, 12, 12)).logits
        causal = model(x).logits
        changed = x.clone()
        changed[:, -1] = (changed[:, -1] + 1 - 6) % (VOCAB - 6) + 6
        first = model(changed, is_causal=False).logits[:, 0]
    torch.testing.assert_close(full, explicit)
    assert not torch.allclose(full, causal)
    assert not torch.allclose(first, full[:, 0])


def test_a_causal_lm_that_ignores_full_attention_is_refused(prompts):
    """An older transformers would run GPT-2 causally despite is_causal=False: refused."""
    class StillCausalForCausalLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(self, x, attention_mask=None, **kwargs):
            return self.embed(x).cumsum(1)  # position i sees positions <= i only

    with pytest.raises(RuntimeError, match="stays causal under is_causal=False"):
        mdlm_generate(StillCausalForCausalLM(), prompts, **options("gpt2", max_length=24))


def test_context_window(models):
    assert context_window(models["modernbert"]) == 48
    assert context_window(models["bert"]) == 48
    assert context_window(models["roberta"]) == 48  # its positions start at pad_id + 1
    assert context_window(models["gpt2"]) == 48
    models["bert"].config.seq_length = 40
    try:
        assert context_window(models["bert"]) == 40
    finally:
        del models["bert"].config.seq_length
    assert context_window(TinyBidirectionalLM(VOCAB, d_model=16, n_heads=2, n_layers=1)) is None


# ---------------------------------------------------------------------------------------------
# Token for token against the statement.

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_confidence", [False, True])
@pytest.mark.parametrize("allow_edits", [False, True])
def test_equals_statement_with_the_same_draws(models, prompts, kind, use_confidence,
                                              allow_edits):
    model, length, steps = models[kind], 30, 8
    kw = options(kind, max_length=length, num_steps=steps, allow_edits=allow_edits,
                 use_confidence=use_confidence)
    draws = fresh_draws(steps, len(prompts), length)
    expected = reference_mdlm.generate(model, prompts, draws=draws, **kw)
    out, stats = mdlm_generate(model, prompts, draws=draws, return_stats=True, **kw)
    assert torch.equal(out, expected)
    for b, prompt in enumerate(prompts):
        assert torch.equal(out[b, :len(prompt)], prompt)  # the prompt is never written
    assert not bool((out == MASK_ID).any())  # the last step reveals every masked position
    # The head ran on the changing rows only: far fewer than steps x generated positions.
    generated = sum(length - len(p) for p in prompts)
    assert stats.steps == steps and 0 < stats.head_rows
    if not use_confidence:
        assert stats.head_rows < steps * generated / 2


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.5])
def test_temperature_equals_statement(models, prompts, temperature):
    kw = options("modernbert", max_length=26, num_steps=6, use_confidence=True,
                 temperature=temperature)
    draws = fresh_draws(6, len(prompts), 26, seed=3)
    expected = reference_mdlm.generate(models["modernbert"], prompts, draws=draws, **kw)
    assert torch.equal(mdlm_generate(models["modernbert"], prompts, draws=draws, **kw), expected)


@pytest.mark.parametrize("kind", ["modernbert", "gpt2"])
@pytest.mark.parametrize("use_confidence", [False, True])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.9), (0.7, 0.5), (1.5, 0.2), (0.0, 0.6)])
def test_top_p_equals_statement(models, prompts, kind, use_confidence, temperature, top_p):
    """DiffuLLaMA's nucleus filter: the same tokens as the statement for the same draws;
    different tokens from the unfiltered sampler at temperature > 0; at temperature 0 the
    tokens are the argmax either way (the filter only renormalises the confidences)."""
    kw = options(kind, max_length=28, num_steps=6, use_confidence=use_confidence,
                 temperature=temperature)
    draws = fresh_draws(6, len(prompts), 28, seed=21)
    expected = reference_mdlm.generate(models[kind], prompts, draws=draws, top_p=top_p, **kw)
    out = mdlm_generate(models[kind], prompts, draws=draws, top_p=top_p, **kw)
    assert torch.equal(out, expected)
    unfiltered = mdlm_generate(models[kind], prompts, draws=draws, **kw)
    if temperature > 0:
        assert not torch.equal(out, unfiltered)
    elif not use_confidence:
        assert torch.equal(out, unfiltered)


def test_top_p_one_is_no_filter(models, prompts):
    kw = options("bert", max_length=24, num_steps=4)
    draws = fresh_draws(4, len(prompts), 24, seed=22)
    plain = mdlm_generate(models["bert"], prompts, draws=draws, **kw)
    assert torch.equal(mdlm_generate(models["bert"], prompts, draws=draws, top_p=1.0, **kw),
                       plain)
    assert torch.equal(reference_mdlm.generate(models["bert"], prompts, draws=draws, top_p=1,
                                               **kw), plain)


def test_top_p_semi_autoregressive_equals_statement(models, prompts):
    kw = options("roberta", block_size=6, max_length=40, num_steps=3, top_p=0.7)
    draws = fresh_draws(30, len(prompts), 20, seed=23)
    expected = reference_mdlm.semi_autoregressive_generate(models["roberta"], prompts,
                                                           context_window=20, draws=draws, **kw)
    out = mdlm_semi_autoregressive(models["roberta"], prompts, window=20, draws=draws, **kw)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))


def test_top_p_frequencies_match_the_nucleus():
    """Tokens outside the nucleus are never drawn; inside it the frequencies are the
    renormalised probabilities (the reported probability too)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0, 0.0, -1.0, 1.5, 0.2]])
    mask_id, temperature, top_p = 3, 0.8, 0.75
    masked = logits.masked_fill(torch.arange(8) == mask_id, -torch.inf) / temperature
    probs = torch.softmax(masked, -1)[0]
    order = probs.argsort(descending=True)
    before = torch.cumsum(probs[order], 0) - probs[order]  # mass of the more probable ids
    kept = torch.zeros(8, dtype=torch.bool)
    kept[order[before <= top_p]] = True  # the ids up to the one crossing top_p
    assert 1 < int(kept.sum()) < 7  # the setting filters something and keeps a choice
    expected = torch.where(kept, probs, 0) / probs[kept].sum()
    n = 40000
    generator = torch.Generator().manual_seed(2)
    tokens, p, _ = sample_rows(lambda a, b: logits.expand(b - a, 8).clone(), n, 8,
                               lambda a, b: torch.rand((b - a, 8), dtype=torch.float64,
                                                       generator=generator),
                               mask_id=mask_id, temperature=temperature, top_p=top_p,
                               chunk_elements=4096)
    counts = torch.bincount(tokens, minlength=8).double() / n
    assert bool((counts[~kept] == 0).all())
    sigma = (expected * (1 - expected) / n).sqrt()
    assert bool(((counts - expected).abs() <= 5 * sigma + 1e-12).all()), (counts, expected)
    torch.testing.assert_close(p, expected.float()[tokens])


def test_edits_change_decoded_tokens(models, prompts):
    """With the same draws, edits rewrite tokens that were already decoded."""
    kw = options("bert", max_length=30, num_steps=8)
    draws = fresh_draws(8, len(prompts), 30, seed=4)
    rewritten = 0

    def observer(event):
        nonlocal rewritten, before
        written = event.transfer & (before[:, event.block_start:event.block_stop] != MASK_ID)
        rewritten += int(written.sum())
        before = event.x.clone()

    before = torch.stack([torch.cat([p, torch.full((30 - len(p),), MASK_ID)]) for p in prompts])
    with_edits = mdlm_generate(models["bert"], prompts, draws=draws, observer=observer, **kw)
    assert rewritten > 0
    without = mdlm_generate(models["bert"], prompts, draws=draws, allow_edits=False,
                            **{k: v for k, v in kw.items()})
    assert not torch.equal(with_edits, without)


@pytest.mark.parametrize("kind", ["modernbert", "gpt2"])
@pytest.mark.parametrize("forward_batch_size", [1, 2])
def test_forward_batch_size_equals_statement(models, prompts, kind, forward_batch_size):
    """The model run a few canvas rows at a time, rows with nothing to change skipped: the same
    tokens (on CPU the tiny models' rows do not depend on the batch's composition)."""
    kw = options(kind, max_length=30, num_steps=8)
    draws = fresh_draws(8, len(prompts), 30, seed=14)
    expected = reference_mdlm.generate(models[kind], prompts, draws=draws, **kw)
    out, stats = mdlm_generate(models[kind], prompts, draws=draws, return_stats=True,
                               forward_batch_size=forward_batch_size, **kw)
    assert torch.equal(out, expected)
    assert stats.forwards <= 8 * -(-len(prompts) // forward_batch_size)
    assert stats.forward_tokens <= 8 * len(prompts) * 30


def test_forward_rows_by_memory_budget(models, prompts):
    """The default runs as many canvas rows per forward as the budget holds by the estimate:
    a budget below one row's estimate runs one row at a time, the default (48 MiB) the tiny
    batch at once; the tokens are the statement's either way."""
    model, width = models["modernbert"], 30
    per_row = activation_bytes(model, width) * width
    kw = options("modernbert", max_length=width, num_steps=5)
    draws = fresh_draws(5, len(prompts), width, seed=16)
    expected = reference_mdlm.generate(model, prompts, draws=draws, **kw)
    for budget, rows in ((None, 3), (per_row * 0.9 / 2**20, 1), (per_row * 2.5 / 2**20, 2)):
        assert forward_rows(model, len(prompts), width, forward_memory_mib=budget) == rows
        out, stats = mdlm_generate(model, prompts, draws=draws, forward_memory_mib=budget,
                                   return_stats=True, **kw)
        assert torch.equal(out, expected)
        assert stats.forwards == 5 * -(-len(prompts) // rows)  # every row changes every step
    assert forward_rows(model, 3, width, forward_batch_size=2, forward_memory_mib=1e-6) == 2
    assert forward_rows(model, 3, width, forward_batch_size=8) == 3


def test_activation_bytes_estimate(models):
    """e * (12 hidden + 10 intermediate), + 4 heads x width with eager attention, + the
    vocabulary for a model returning full logits; None without a config's hidden size."""
    bert = models["bert"]  # hidden 32, intermediate 64, 2 heads
    eager = bert.config._attn_implementation == "eager"
    assert activation_bytes(bert, 30) == 4 * (12 * 32 + 10 * 64 + (4 * 2 * 30 if eager else 0))
    gpt2 = tiny_model("gpt2", intermediate=48)
    gpt2.config._attn_implementation = "eager"
    assert activation_bytes(gpt2, 10) == 4 * (12 * 32 + 10 * 48 + 4 * 2 * 10)
    assert activation_bytes(gpt2.half(), 10) == 2 * (12 * 32 + 10 * 48 + 4 * 2 * 10)

    class NoKnownHead(torch.nn.Module):  # full logits: the vocabulary counts
        def __init__(self):
            super().__init__()
            self.config = bert.config
            self.weight = torch.nn.Parameter(torch.zeros(1))
    assert activation_bytes(NoKnownHead(), 30) == activation_bytes(bert, 30) + 4 * VOCAB
    model = TinyBidirectionalLM(VOCAB, d_model=16, n_heads=2, n_layers=1)
    assert activation_bytes(model, 30) is None
    assert forward_rows(model, 5, 30, forward_memory_mib=1e-6) == 5  # unknown: all rows


def test_model_without_a_known_head_runs_its_full_forward(prompts):
    """Any callable returning .logits works (the logits are gathered on the rows)."""
    model = TinyBidirectionalLM(VOCAB, d_model=32, n_heads=2, n_layers=2, seed=0)
    assert head_split(model) is None
    kw = options("bert", max_length=24, num_steps=5, use_confidence=True)
    draws = fresh_draws(5, len(prompts), 24, seed=5)
    assert torch.equal(mdlm_generate(model, prompts, draws=draws, **kw),
                       reference_mdlm.generate(model, prompts, draws=draws, **kw))


def test_batched_equals_one_prompt_at_a_time(models, prompts):
    """A row of a batch is one upstream (batch 1) call: the same draws give the same tokens."""
    kw = options("modernbert", max_length=28, num_steps=6)
    draws = fresh_draws(6, len(prompts), 28, seed=6)
    batched = mdlm_generate(models["modernbert"], prompts, draws=draws, **kw)
    for b, prompt in enumerate(prompts):
        one = TensorMDLMDraws(draws._token[:, b:b + 1], draws._unmask[:, b:b + 1],
                              draws._edit[:, b:b + 1])
        assert torch.equal(mdlm_generate(models["modernbert"], [prompt], draws=one, **kw)[0],
                           batched[b])


def test_prompt_as_a_2d_tensor_and_lists(models):
    prompt = torch.tensor([[7, 8, 9], [10, 11, 12]])
    kw = options("bert", max_length=12, num_steps=4, generator=torch.Generator().manual_seed(0))
    a = mdlm_generate(models["bert"], prompt, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    b = mdlm_generate(models["bert"], [[7, 8, 9], [10, 11, 12]], **kw)
    assert torch.equal(a, b) and a.shape == (2, 12)


# ---------------------------------------------------------------------------------------------
# Frequency tests: the distributions.

def test_sampler_frequencies_match_softmax_without_the_mask():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 1.5
    logits[0, 3] = 4.0  # the mask id is the most likely token: it must never be drawn
    expected = torch.softmax(logits.masked_fill(torch.arange(12) == 3, -torch.inf), -1)[0]
    n = 40000
    generator = torch.Generator().manual_seed(1)
    tokens, p, _ = sample_rows(lambda a, b: logits.expand(b - a, 12).clone(), n, 12,
                               lambda a, b: torch.rand((b - a, 12), dtype=torch.float64,
                                                       generator=generator),
                               mask_id=3, temperature=1.0, chunk_elements=4096)
    counts = torch.bincount(tokens, minlength=12).double() / n
    assert counts[3] == 0
    # 5 sigma of a binomial proportion, for every token.
    sigma = (expected * (1 - expected) / n).sqrt()
    assert bool(((counts - expected).abs() <= 5 * sigma + 1e-12).all()), (counts, expected)
    # The reported probability is the sampled token's.
    torch.testing.assert_close(p, torch.softmax(
        logits.masked_fill(torch.arange(12) == 3, torch.finfo(torch.float32).min), -1)[0][tokens])


def test_reveal_schedule_frequencies(models):
    """Random variant: after step k the expected masked fraction is (T - k - 1) / T."""
    steps, batch, length = 6, 48, 32
    prompts = [torch.tensor([7])] * batch
    fractions = []

    def observer(event):
        fractions.append(float((event.x[:, 1:] == MASK_ID).double().mean()))

    mdlm_generate(models["bert"], prompts, observer=observer,
                  generator=torch.Generator().manual_seed(0),
                  **options("bert", max_length=length, num_steps=steps, allow_edits=False,
                            pad_id=None))
    n = batch * (length - 1)
    for k, fraction in enumerate(fractions):
        expected = (steps - k - 1) / steps
        assert abs(fraction - expected) <= 5 * math.sqrt(max(expected * (1 - expected), 1e-9)
                                                        / n) + 1e-9, (k, fraction, expected)


def test_edit_rate_frequencies(models):
    """Each visible generated token is rewritten with probability 0.1 * (1 - k / T)."""
    steps, batch, length = 4, 64, 40
    prompts = [torch.tensor([7])] * batch
    edited, visible = [0] * steps, [0] * steps
    state = {}

    def observer(event):
        before = state.get("x")
        if before is not None:
            was_visible = (before != MASK_ID) & (before != PAD_ID) & (before != EOS_ID)
            was_visible[:, 0] = False
            edited[event.step] += int((event.transfer & was_visible[:, 1:]).sum())
            visible[event.step] += int(was_visible.sum())
        state["x"] = event.x.clone()

    mdlm_generate(models["roberta"], prompts, observer=observer,
                  generator=torch.Generator().manual_seed(0),
                  **options("roberta", max_length=length, num_steps=steps))
    for k in range(1, steps):
        rate, expected = edited[k] / visible[k], edit_probability(k, steps)
        sigma = math.sqrt(expected * (1 - expected) / visible[k])
        assert abs(rate - expected) <= 5 * sigma, (k, rate, expected)


def test_confidence_variant_reveals_ceil_n_p_most_probable(models, prompts):
    steps = 5
    kw = options("modernbert", max_length=30, num_steps=steps, use_confidence=True,
                 allow_edits=False, pad_id=None)
    start = min(len(p) for p in prompts)
    opened = torch.stack([torch.arange(start, 30) >= len(p) for p in prompts])

    def observer(event):
        nonlocal opened
        open_now = opened
        count = num_to_unmask(open_now.sum(1), event.step, steps)
        assert torch.equal(event.transfer.sum(1), count)
        # The revealed positions are the most probable of the open ones.
        conf = event.confidence.masked_fill(~open_now, -torch.inf)
        for b in range(conf.shape[0]):
            if count[b]:
                chosen = conf[b][event.transfer[b]]
                rest = conf[b][open_now[b] & ~event.transfer[b]]
                assert len(rest) == 0 or chosen.min() >= rest.max()
        opened = event.x[:, event.block_start:] == MASK_ID

    mdlm_generate(models["modernbert"], prompts, observer=observer,
                  generator=torch.Generator().manual_seed(0), **kw)


def test_schedules():
    assert unmask_probability(0, 4) == pytest.approx(0.25)
    assert unmask_probability(2, 4) == pytest.approx(0.5)
    assert unmask_probability(3, 4) == 1.0
    assert edit_probability(0, 10) == pytest.approx(0.1)
    assert edit_probability(5, 10) == pytest.approx(0.05)
    assert torch.equal(num_to_unmask(torch.tensor([10, 3, 0]), 0, 4), torch.tensor([3, 1, 0]))
    assert torch.equal(num_to_unmask(torch.tensor([10, 3]), 3, 4), torch.tensor([10, 3]))


def test_pad_counts_as_masked(models):
    """A sampled pad stays open: it is sampled again at later steps, never edited."""
    model = tiny_model("bert", positions=48)
    with torch.no_grad():
        model.cls.predictions.bias[PAD_ID] += 6.0  # the model prefers pad everywhere
    kw = options("bert", max_length=20, num_steps=6, allow_edits=True)
    draws = fresh_draws(6, 1, 20, seed=8)
    out = mdlm_generate(model, [torch.tensor([7, 8])], draws=draws, **kw)
    assert torch.equal(out, reference_mdlm.generate(model, [torch.tensor([7, 8])], draws=draws,
                                                    **kw))
    assert bool((out[0, 2:] == PAD_ID).any())


# ---------------------------------------------------------------------------------------------
# Adaptive length (approximate, opt-in).

def eos_at(kind, position, length=32):
    """A tiny model whose prediction at ``position`` of a prompt + masks canvas is EOS with
    probability near 1, and near 0 at the other masked positions."""
    model = tiny_model(kind, positions=48)
    with torch.no_grad():
        if kind == "gpt2":  # its logits are shifted: the row before carries the prediction
            model.transformer.wpe.weight[position - 1] += 3 * model.lm_head.weight[EOS_ID]
            return model
        embeddings = getattr(model, model.base_model_prefix).embeddings
        offset = embeddings.padding_idx + 1 if kind == "roberta" else 0
        embeddings.position_embeddings.weight[position + offset] += torch.randn(
            32, generator=torch.Generator().manual_seed(0))
        # Point the EOS row of the decoder at what the decoder sees there, with the boundary
        # halfway from the other masked positions.
        x = torch.full((1, length), MASK_ID)
        x[0, :3] = 7
        features = []
        decoder = model.get_output_embeddings()
        hook = decoder.register_forward_hook(lambda m, i, o: features.append(i[0][0]))
        model(x)
        hook.remove()
        others = features[0][3:].mean(0)
        direction = features[0][position] - others
        decoder.weight[EOS_ID] = direction * 40 / direction.norm() ** 2
        decoder.bias[EOS_ID] = -(decoder.weight[EOS_ID] @ (others + direction / 2))
    return model


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
@pytest.mark.parametrize("use_confidence", [False, True])
def test_adaptive_length_equals_statement(prompts, kind, use_confidence):
    model = eos_at(kind, 14)
    kw = options(kind, max_length=32, num_steps=6, use_confidence=use_confidence,
                 adaptive_length=True, length_threshold=0.5)
    draws = fresh_draws(6, len(prompts), 32, seed=9)
    expected = reference_mdlm.generate(model, prompts, draws=draws, **kw)
    out, stats = mdlm_generate(model, prompts, draws=draws, return_stats=True, **kw)
    assert torch.equal(out, expected)
    assert bool((out[:, 14] == EOS_ID).all()) and bool((out[:, 15:] == PAD_ID).all())
    fixed, fixed_stats = mdlm_generate(model, prompts, draws=draws, return_stats=True,
                                       **{**kw, "adaptive_length": False})
    # Steps after the first run on the first 15 columns only.
    assert stats.forward_tokens == len(prompts) * (32 + 15 * (stats.forwards - 1))
    assert stats.forward_tokens < fixed_stats.forward_tokens


def test_adaptive_length_rows_of_different_lengths():
    """Rows cut at different positions: the canvas keeps the longest, the shorter rows' tails
    are masked out of the attention; the statement agrees."""
    model = eos_at("gpt2", 20)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())  # untie
    with torch.no_grad():  # EOS also right after a prompt ending in token 9
        model.transformer.wte.weight[9] += 3 * model.lm_head.weight[EOS_ID]
    rows = [torch.tensor([7, 8, 10]), torch.tensor([7, 10, 9])]
    kw = options("gpt2", max_length=32, num_steps=5, adaptive_length=True,
                 length_threshold=0.5)
    draws = fresh_draws(5, 2, 32, seed=10)
    expected = reference_mdlm.generate(model, rows, draws=draws, **kw)
    out, stats = mdlm_generate(model, rows, draws=draws, return_stats=True, **kw)
    assert torch.equal(out, expected)
    assert out[0, 20] == EOS_ID and out[1, 3] == EOS_ID and bool((out[1, 4:] == PAD_ID).all())
    assert stats.forward_tokens == 2 * (32 + 21 * (stats.forwards - 1))


def test_cut_at_eos():
    x = torch.full((3, 8), MASK_ID)
    x[:, :2] = 7
    region = x == MASK_ID
    probability = torch.zeros(3, 6)
    probability[0, 3] = 0.9  # position 5
    probability[1, 0] = 0.95  # position 2
    probability[1, 4] = 0.99
    width, mask = cut_at_eos(x, region, probability, 0.5, eos_id=EOS_ID, pad_id=PAD_ID)
    assert width == 8  # row 2 has no EOS
    assert x[0].tolist() == [7, 7, MASK_ID, MASK_ID, MASK_ID, EOS_ID, PAD_ID, PAD_ID]
    assert x[1].tolist() == [7, 7, EOS_ID] + [PAD_ID] * 5
    assert region[0].tolist() == [False, False, True, True, True, False, False, False]
    assert mask.tolist()[1] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert mask.tolist()[2] == [1] * 8


# ---------------------------------------------------------------------------------------------
# Semi-autoregressive generation beyond the context window.

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_confidence", [False, True])
def test_semi_autoregressive_equals_statement(models, prompts, kind, use_confidence):
    model = models[kind]
    kw = options(kind, block_size=7, max_length=60, num_steps=3,
                 use_confidence=use_confidence)
    draws = fresh_draws(30, len(prompts), 20, seed=11)
    expected = reference_mdlm.semi_autoregressive_generate(model, prompts, context_window=20,
                                                           draws=draws, **kw)
    out, stats = mdlm_semi_autoregressive(model, prompts, window=20, draws=draws,
                                          return_stats=True, **kw)
    assert len(out) == len(expected)
    for got, want, prompt in zip(out, expected, prompts):
        assert torch.equal(got, want)
        assert len(got) == 60 > 48  # past the model's context window
        assert torch.equal(got[:len(prompt)], prompt)
    assert stats.forward_tokens <= stats.forwards * len(prompts) * 20  # never wider than 20


def test_semi_autoregressive_stop_token(prompts):
    model = tiny_model("modernbert", positions=48)
    stop = 20
    with torch.no_grad():
        model.decoder.bias[stop] += 4.0
    kw = options("modernbert", block_size=5, max_length=50, num_steps=3, stop_id=stop)
    draws = fresh_draws(30, len(prompts), 16, seed=12)
    expected = reference_mdlm.semi_autoregressive_generate(model, prompts, context_window=16,
                                                           draws=draws, **kw)
    out = mdlm_semi_autoregressive(model, prompts, window=16, draws=draws, **kw)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    assert any(len(s) < 50 for s in out)  # some sequence stopped
    for sequence, prompt in zip(out, prompts):
        assert not bool((sequence[len(prompt):] == stop).any())


# ---------------------------------------------------------------------------------------------
# The engine's planning hook.

def test_engine_plan_lets_a_rule_rewrite_decoded_positions():
    """A rule with plan(): the runner gets its rows, and decoded positions are written."""
    seen = {}

    class Rule:
        def prepare(self, i):
            return True

        def plan(self, x_window, masked, step):
            return torch.tensor([[True, False, True]])  # position 0 is decoded

        def __call__(self, confidence, rows, step):
            seen["confidence"] = confidence.clone()
            return torch.ones_like(rows)

    def runner(x, start, stop, full, rows):
        seen["rows"] = rows
        return None, None

    def sampler(logits, un_logits, step, start):
        return torch.tensor([[40, 41, 42]]), torch.tensor([[0.5, 0.6, 0.7]])

    x = torch.tensor([[5, 7, 99, 99]])
    x0, confidence, transfer = engine.denoise_step(x, 1, 4, 0, True, runner, sampler, Rule(), 99)
    assert x.tolist() == [[5, 40, 99, 42]]  # 7 rewritten, the unplanned mask kept
    assert seen["rows"].tolist() == [[True, False, True]]
    assert seen["confidence"][0, 1] == -torch.inf


def test_denoise_steps_streams_what_denoise_observes(models, prompts):
    kw = options("bert", max_length=24, num_steps=4)
    draws = fresh_draws(4, len(prompts), 24, seed=13)
    streamed = [event.x.clone() for event in mdlm_generate_steps(models["bert"], prompts,
                                                                 draws=draws, **kw)]
    observed = []
    mdlm_generate(models["bert"], prompts, draws=draws, observer=lambda e: observed.append(
        e.x.clone()), **kw)
    assert len(streamed) == 4 and all(torch.equal(a, b) for a, b in zip(streamed, observed))


def test_runner_skips_the_forward_when_no_row_changes(models):
    stats = MDLMStats()
    runner = RowRunner(models["bert"], None, 0, stats)
    logits, _ = runner(torch.full((2, 6), 7), 2, 6, True, torch.zeros(2, 4, dtype=torch.bool))
    assert len(logits.positions) == 0 and stats.forwards == 0


def test_runner_runs_only_the_canvas_rows_that_change(models):
    """forward_batch_size=1: one forward of the one row with a changing position, whose
    logits are the model's."""
    stats = MDLMStats()
    runner = RowRunner(models["bert"], None, 0, stats, forward_batch_size=1)
    x = torch.randint(6, VOCAB, (3, 6), generator=torch.Generator().manual_seed(15))
    rows = torch.zeros(3, 4, dtype=torch.bool)
    rows[1, 2] = True
    logits, _ = runner(x, 2, 6, True, rows)
    assert stats.forwards == 1 and stats.forward_tokens == 6 and stats.head_rows == 1
    with torch.no_grad():
        torch.testing.assert_close(logits.chunk(0, 1)[0], models["bert"](x[1:2]).logits[0, 4])


# ---------------------------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize("overrides, error, match", [
    (dict(num_steps=0), ValueError, "num_steps must be >= 1"),
    (dict(num_steps=2.5), TypeError, "num_steps must be an int"),
    (dict(max_length=5), ValueError, "leaves no room to generate after a prompt of 7 tokens"),
    (dict(max_length=49), ValueError, "exceeds the model's context window"),
    (dict(shift=2), ValueError, "shift must be 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be finite and >= 0"),
    (dict(length_threshold=1.5), ValueError, "length_threshold must be a probability"),
    (dict(adaptive_length=True, eos_id=None), ValueError, "adaptive_length=True needs eos_id"),
    (dict(allow_edits=1), TypeError, "allow_edits must be True or False"),
    (dict(mask_id=VOCAB), ValueError, "mask_id=61 is outside the model vocabulary"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    (dict(forward_batch_size=0), ValueError, "forward_batch_size must be >= 1"),
    (dict(forward_memory_mib=0), ValueError, "forward_memory_mib must be a positive number"),
    (dict(forward_memory_mib="64"), ValueError, "forward_memory_mib must be a positive"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=True), ValueError, r"top_p must be in \(0, 1\]"),
])
def test_bad_arguments(models, prompts, overrides, error, match):
    kw = options("bert", max_length=24, num_steps=4)
    kw.update(overrides)
    with pytest.raises(error, match=match):
        mdlm_generate(models["bert"], prompts, **kw)


def test_bad_prompts(models):
    kw = options("bert", max_length=24, num_steps=4)
    with pytest.raises(ValueError, match=r"prompts\[1\] contains mask_id"):
        mdlm_generate(models["bert"], [torch.tensor([7]), torch.tensor([7, MASK_ID])], **kw)
    with pytest.raises(ValueError, match="prompts is empty"):
        mdlm_generate(models["bert"], [], **kw)
    with pytest.raises(TypeError, match="prompts must be a list"):
        mdlm_generate(models["bert"], "the cat", **kw)
    with pytest.raises(TypeError, match=r"prompts\[0\] must hold integer token ids"):
        mdlm_generate(models["bert"], [torch.tensor([1.5])], **kw)
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty: a shifted model"):
        mdlm_generate(models["gpt2"], [torch.tensor([], dtype=torch.long)],
                      **options("gpt2", max_length=24, num_steps=4))
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        mdlm_generate(models["bert"], [torch.tensor([VOCAB + 3])], **kw)


def test_errors_come_at_the_call_of_the_step_iterators(models, prompts):
    with pytest.raises(ValueError, match="num_steps"):
        mdlm_generate_steps(models["bert"], prompts, **options("bert", max_length=24,
                                                                num_steps=0))


def test_semi_autoregressive_bad_arguments(models, prompts):
    kw = options("bert", num_steps=2, max_length=60)
    with pytest.raises(ValueError, match="block_size=48 must be smaller than the context "
                                         "window"):
        mdlm_semi_autoregressive(models["bert"], prompts, block_size=48, **kw)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        mdlm_semi_autoregressive(models["bert"], prompts, block_size=0, **kw)
    model = TinyBidirectionalLM(VOCAB, d_model=16, n_heads=2, n_layers=1)
    with pytest.raises(ValueError, match="context window of TinyBidirectionalLM is unknown"):
        mdlm_semi_autoregressive(model, prompts, block_size=4, **kw)


def test_torch_draws_are_reproducible_with_a_generator(models, prompts):
    kw = options("roberta", max_length=24, num_steps=4)
    a = mdlm_generate(models["roberta"], prompts, draws=TorchMDLMDraws(
        torch.Generator().manual_seed(5)), **kw)
    b = mdlm_generate(models["roberta"], prompts, generator=torch.Generator().manual_seed(5),
                      **kw)
    assert torch.equal(a, b)
