"""stop_at_eos=True: rows leave the batch once their answer is settled, without changing it.

Every case runs the plain statement (genjo_fast.reference / reference_dream) WITHOUT the
option and genjo_fast WITH it, on random models whose EOS logit is biased so that rows stop
early and at different times, with the same injected draws: each row's tokens up to and
including its first stop id must be identical, EOS after it; a row without a stop id is
identical throughout. Each case also checks that rows did stop (fewer row forwards).
"""
import pytest
import torch

import genjo_fast
from genjo_fast import TensorDraws, reference, reference_dream
from genjo_fast.dream import DreamTimes, MeanCountRule
from genjo_fast.backends import resolve_backend
from genjo_fast.engine import Window
from genjo_fast.stopping import Compaction, first_stops
from genjo_fast.testing import random_dream, random_llada, random_prompts, with_logit_bias

VOCAB, MASK_ID, PAD_ID, EOS, EOT = 101, 100, 0, 7, 9
PROMPT = 6
IDS = dict(mask_id=MASK_ID, eos_id=EOS, eot_id=EOT)


@pytest.fixture(autouse=True)
def _sdpa(monkeypatch):
    monkeypatch.setenv("GENJO_FAST_ATTENTION", "sdpa")


@pytest.fixture(scope="module")
def llada():
    m = random_llada(VOCAB, d_model=32, n_heads=2, n_kv_heads=1, n_layers=3,
                     mlp_hidden_size=48, max_len=128, seed=0)
    with torch.no_grad():
        m.transformer.ff_out.weight.mul_(4)  # peaked distributions
        for block in m.blocks:  # strong attention mixing: the cache's staleness matters
            block.attn_out.weight.mul_(3)
            block.v_proj.weight.mul_(2)
    return with_logit_bias(m, {EOS: 5.0, EOT: 4.0})  # answers end early, at varied places


def expect_stopped(got, want, stop_ids=(EOS, EOT), fill=EOS, prompt_len=PROMPT):
    """Per row: ``got`` equals ``want`` up to and including ``want``'s first stop id (after the
    prompt) and holds ``fill`` after it; equals ``want`` throughout without a stop id.
    Returns the first stop positions (``None`` for rows without one)."""
    assert got.shape == want.shape
    assert torch.equal(got[:, :prompt_len], want[:, :prompt_len])
    stops = []
    for row_got, row_want in zip(got[:, prompt_len:].tolist(), want[:, prompt_len:].tolist()):
        p = next((i for i, t in enumerate(row_want) if t in stop_ids), None)
        stops.append(p)
        if p is None:
            assert row_got == row_want
        else:
            assert row_got[:p + 1] == row_want[:p + 1]
            assert row_got[p + 1:] == [fill] * (len(row_got) - p - 1)
    return stops


def llada_draws(temperature, remasking, steps, batch, seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDraws(
        torch.rand(steps, batch, seq_len, VOCAB, generator=g, dtype=torch.float64)
        if temperature > 0 else None,
        torch.rand(steps, batch, seq_len, generator=g) if remasking == "random" else None)


def run_llada(model, batch=5, padded=True, seed=0, **kw):
    """The statement without the option, genjo_fast without and with it (same draws)."""
    args = dict(steps=24, gen_length=24, block_length=8, temperature=0.0,
                remasking="low_confidence", **IDS)
    args.update(kw)
    prompt, attention_mask = random_prompts(batch, PROMPT, VOCAB, pad_id=PAD_ID,
                                            avoid=(MASK_ID, PAD_ID, EOS, EOT), seed=batch + seed,
                                            padded=padded)
    adaptive = "threshold" in args or "factor" in args
    draw_steps = args["gen_length"] if adaptive else args["steps"]
    draws = llada_draws(args["temperature"], args["remasking"], draw_steps, batch,
                        PROMPT + args["gen_length"], seed)
    approximate = adaptive or "cache" in args
    statement = reference.generate_approximate if approximate else reference.generate
    want = statement(model, prompt, attention_mask, draws=draws, **args)
    plain, plain_stats = genjo_fast.generate(model, prompt, attention_mask, draws=draws,
                                             return_stats=True, **args)
    got, stats = genjo_fast.generate(model, prompt, attention_mask, draws=draws,
                                     return_stats=True, stop_at_eos=True, **args)
    return want, plain, plain_stats, got, stats


def check_llada(model, **kw):
    want, plain, plain_stats, got, stats = run_llada(model, **kw)
    assert torch.equal(plain, want)  # the premise: genjo_fast without the option is exact
    stops = expect_stopped(got, want)
    assert any(p is not None for p in stops)
    assert stats.row_forwards < plain_stats.row_forwards  # rows did leave the batch
    assert plain_stats.row_forwards == plain_stats.nfe * got.shape[0]
    if stats.forwards_saved is not None:
        assert stats.nfe + stats.forwards_saved == plain_stats.nfe
        assert stats.row_forwards + stats.row_forwards_saved == plain_stats.row_forwards
    return stops, stats, plain_stats


# (gen_length, block_length, steps): one block; one token per step; several tokens per step;
# more steps than tokens (skipped steps)
SCHEDULES = [(24, 24, 24), (24, 8, 24), (24, 8, 9), (24, 4, 36)]
SAMPLING = [  # (temperature, remasking, cfg_scale)
    (0.0, "low_confidence", 0.0),
    (0.0, "low_confidence", 1.5),
    (0.0, "random", 0.0),
    (0.9, "low_confidence", 0.0),
    (0.7, "random", 1.0),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "gen{}_blk{}_st{}".format(*s))
@pytest.mark.parametrize("sampling", SAMPLING, ids=lambda s: "T{}_{}_cfg{}".format(*s))
def test_llada_exact(llada, schedule, sampling):
    gen_length, block_length, steps = schedule
    temperature, remasking, cfg_scale = sampling
    check_llada(llada, gen_length=gen_length, block_length=block_length, steps=steps,
                temperature=temperature, remasking=remasking, cfg_scale=cfg_scale)


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("rule", [{}, {"threshold": 0.7}, {"factor": 1.0}],
                         ids=["fixed", "threshold", "factor"])
def test_llada_approximate(llada, cache, rule):
    kw = dict(rule)
    if cache is not None:
        kw["cache"] = cache
    if not kw:
        kw["steps"] = 12
    _, stats, _ = check_llada(llada, **kw)
    if rule:  # blocks last until decoded: what the call without the option runs is unknown
        assert stats.forwards_saved is None and stats.row_forwards_saved is None


@pytest.mark.parametrize("options", [
    dict(cache="dual", cfg_scale=1.5),
    dict(cache="prefix", temperature=0.8, remasking="random", threshold=0.5),
    dict(cache="dual", refresh_every=2, steps=12),
    dict(cache="prefix", padded=False, cfg_scale=0.5, factor=0.8),
    dict(logits_eos_inf=False, confidence_eos_eot_inf=True),
], ids=str)
def test_llada_options(llada, options):
    check_llada(llada, **options)


def test_llada_rows_stop_at_different_times(llada):
    """The premise of the tests above: with this model rows stop in different blocks, some
    never; the call runs only while rows remain, and the counts say what was saved."""
    stops, stats, plain = check_llada(llada, batch=6, gen_length=32, block_length=8, steps=32)
    assert None in stops  # a row that runs to the end (so no forward can be saved)
    assert len({p // 8 for p in stops if p is not None}) >= 2  # stops in different blocks
    assert stats.nfe == plain.nfe and stats.forwards_saved == 0
    assert stats.row_forwards_saved > 0


def test_llada_call_ends_when_every_row_stopped(llada):
    """gen 64 / block 8 with every answer ending early: the call ends with the last row, and
    the forwards saved are those of the remaining blocks."""
    stops, stats, plain = check_llada(llada, batch=4, seed=2, gen_length=64, block_length=8,
                                      steps=64, temperature=0.9)
    assert all(p is not None and p < 32 for p in stops)
    assert stats.nfe < plain.nfe / 2 and stats.forwards_saved == plain.nfe - stats.nfe


def test_llada_observer_sees_the_whole_batch(llada):
    """Observer events keep the whole batch in its original order: stopped rows show their
    tokens (filled), no transfer and confidence -inf; running rows what the call without the
    option shows."""
    prompt, attention_mask = random_prompts(5, PROMPT, VOCAB, pad_id=PAD_ID,
                                            avoid=(MASK_ID, PAD_ID, EOS, EOT), seed=5)
    args = dict(steps=24, gen_length=24, block_length=8, **IDS)
    plain_events, events = [], []
    genjo_fast.generate(llada, prompt, attention_mask, observer=plain_events.append, **args)
    got = genjo_fast.generate(llada, prompt, attention_mask, stop_at_eos=True,
                              observer=lambda e: events.append(
                                  (e.step, e.x.clone(), e.x0, e.transfer, e.confidence)),
                              **args)
    assert len(events) == len(plain_events)  # a row runs to the end here
    stopped_rows = set()
    for (step, x, x0, transfer, confidence), plain in zip(events, plain_events):
        assert step == plain.step and x.shape == plain.x.shape and x0.shape == plain.x0.shape
        finished, _ = first_stops(x[:, PROMPT:], torch.tensor([EOS, EOT]), MASK_ID)
        for row in range(x.shape[0]):
            if row in stopped_rows:  # stopped before this step
                assert not transfer[row].any() and (confidence[row] == -torch.inf).all()
            else:
                assert torch.equal(transfer[row], plain.transfer[row])
                assert torch.equal(x0[row], plain.x0[row])
            if finished[row]:
                stopped_rows.add(row)
    assert 0 < len(stopped_rows) < 5
    assert torch.equal(events[-1][1], got)


def test_llada_generator_draws_keep_the_distribution(llada):
    """Without injected draws the samplers draw from the generator for the running rows only:
    equal in distribution, so only the shape of the result is fixed; at temperature 0 with
    low_confidence nothing is random and the answers are identical."""
    prompt, attention_mask = random_prompts(4, PROMPT, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID,))
    args = dict(steps=16, gen_length=16, block_length=8, **IDS)
    want = genjo_fast.generate(llada, prompt, attention_mask, **args)
    got = genjo_fast.generate(llada, prompt, attention_mask, stop_at_eos=True, **args)
    expect_stopped(got, want)
    sampled = genjo_fast.generate(llada, prompt, attention_mask, stop_at_eos=True,
                                  temperature=1.0, generator=torch.Generator().manual_seed(0),
                                  **args)
    assert sampled.shape == want.shape and not (sampled == MASK_ID).any()


def test_llada_custom_stop_ids_and_fill(llada):
    """stop_ids=(EOT,): only EoT ends a row (an EOS before it does not), and the fill is the
    first stop id (the tests above use the default stop ids, (eos_id, eot_id))."""
    prompt, attention_mask = random_prompts(6, PROMPT, VOCAB, pad_id=PAD_ID,
                                            avoid=(MASK_ID, PAD_ID, EOS, EOT), seed=1)
    draws = llada_draws(0.9, "low_confidence", 24, 6, PROMPT + 24, seed=1)
    args = dict(steps=24, gen_length=24, block_length=8, temperature=0.9, draws=draws, **IDS)
    want = reference.generate(llada, prompt, attention_mask, **args)
    got = genjo_fast.generate(llada, prompt, attention_mask, stop_at_eos=True, stop_ids=[EOT],
                              **args)
    stops = expect_stopped(got, want, stop_ids=(EOT,), fill=EOT)
    assert any(p is not None and EOS in want[row, PROMPT:PROMPT + p].tolist()
               for row, p in enumerate(stops))  # an EOS that did not stop its row


# --------------------------------------------------------------------------------------------
# Dream
# --------------------------------------------------------------------------------------------

DREAM_VOCAB, DREAM_MASK, DREAM_PAD, NEW = 97, 96, 95, 24


@pytest.fixture(scope="module")
def dream():
    m = random_dream(DREAM_VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=3, intermediate_size=48, seed=0,
                     mask_token_id=DREAM_MASK)
    with torch.no_grad():
        m.lm_head.weight.mul_(8)
        for layer in m.layers:
            layer.self_attn.o_proj.weight.mul_(3)
            layer.self_attn.v_proj.weight.mul_(2)
    return with_logit_bias(m, {EOS: 3.0})


def run_dream(model, batch=6, seed=0, **kw):
    inputs, attention_mask = random_prompts(batch, PROMPT, DREAM_VOCAB, pad_id=DREAM_PAD,
                                            avoid=(DREAM_MASK, DREAM_PAD, EOS, EOT), seed=3)
    g = torch.Generator().manual_seed(seed)
    size = (NEW, batch, PROMPT + NEW)
    draws = TensorDraws(remask=torch.rand(*size, generator=g),
                        token=torch.rand(*size, generator=g, dtype=torch.float64),
                        position=torch.rand(*size, generator=g, dtype=torch.float64))
    args = dict(max_new_tokens=NEW, steps=NEW, mask_token_id=DREAM_MASK, alg="maskgit_plus")
    args.update(kw)
    statement = (reference_dream.diffusion_generate_blocks if "block_length" in args
                 else reference_dream.diffusion_generate)
    want = statement(model, inputs, attention_mask=attention_mask, draws=draws, **args)
    _, plain = genjo_fast.diffusion_generate(model, inputs, attention_mask=attention_mask,
                                             draws=draws, return_stats=True, **args)
    got, stats = genjo_fast.diffusion_generate(model, inputs, attention_mask=attention_mask,
                                               draws=draws, return_stats=True, stop_at_eos=True,
                                               stop_ids=(EOS, EOT), **args)
    stops = expect_stopped(got, want)
    assert any(p is not None for p in stops)
    assert stats.row_forwards < plain.row_forwards
    if stats.forwards_saved is not None:
        assert stats.row_forwards + stats.row_forwards_saved == plain.row_forwards
    return stops, stats, plain


@pytest.mark.parametrize("options", [
    dict(alg="origin"), dict(alg="maskgit_plus"), dict(alg="topk_margin"), dict(alg="entropy"),
    dict(alg="maskgit_plus", alg_temp=0.5), dict(alg="entropy", temperature=0.8),
    dict(alg="topk_margin", temperature=1.0, top_p=0.9), dict(alg="origin", temperature=0.7),
    dict(alg="maskgit_plus", steps=8),
], ids=lambda o: "_".join(f"{k}{v}" for k, v in o.items()))
def test_dream_exact(dream, options):
    run_dream(dream, **options)


@pytest.mark.parametrize("options", [
    dict(block_length=8), dict(block_length=8, cache="prefix"),
    dict(block_length=8, cache="dual", alg="entropy"),
    dict(block_length=8, threshold=0.6), dict(block_length=8, cache="dual", factor=1.0),
    dict(block_length=4, steps=12, alg="origin", cache="prefix"),
], ids=lambda o: "_".join(f"{k}{v}" for k, v in o.items()))
def test_dream_blocks(dream, options):
    run_dream(dream, **options)


def test_dream_call_ends_when_every_row_stopped(dream):
    """Rows stop at different steps; the call ends with the last one, and the forwards saved
    are the steps left."""
    stops, stats, plain = run_dream(dream, alg="entropy")
    assert None not in stops and len(set(stops)) >= 3
    assert stats.nfe < plain.nfe / 2 and stats.forwards_saved == plain.nfe - stats.nfe


def test_dream_stopped_rows_keep_counting_in_the_batch_mean():
    """The count of maskgit_plus & co. is the batch MEAN of the masked counts: a row that stops
    keeps counting, with the count the call without the option would give it (it unmasks
    ``min(k, count)`` per step), so the running rows unmask what they would in the whole
    batch. Rows with unequal counts (a model's choice of the mask id leaves a position masked)
    make the difference visible: the mean of the running rows alone differs."""
    ops = resolve_backend("torch", torch.device("cpu"))
    times = DreamTimes(6, 1e-3, torch.device("cpu"))
    whole = MeanCountRule(ops, times, 3, alg_temp=None, generator=None, draws=None)
    running = MeanCountRule(ops, times, 3, alg_temp=None, generator=None, draws=None)
    for rule in (whole, running):
        rule.begin(Window(0, 0, 12, 6, 0))
    masked = torch.ones(3, 12, dtype=torch.bool)
    masked[1, 9:] = masked[2, 11:] = False  # counts 12, 9, 11
    confidence = torch.rand(3, 12, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([0, 2])
    running.compact(Compaction(keep, 3, torch.zeros(2, 12, dtype=torch.long), masked[1:2]))
    differs = False
    for step in range(6):
        conf = confidence.masked_fill(~masked, -torch.inf)
        chosen = whole(conf, masked, step) & masked
        assert torch.equal(running(conf[keep], masked[keep], step) & masked[keep], chosen[keep])
        alone = int(masked[keep].sum() / 2 * times.fraction(step))  # running rows only
        differs |= alone != int(chosen[0].sum())
        masked &= ~chosen
    assert differs
    assert whole.stopped is None  # no bookkeeping without stopped rows


def test_dream_observer_and_history_keep_the_batch(dream):
    inputs, attention_mask = random_prompts(4, PROMPT, DREAM_VOCAB, pad_id=DREAM_PAD,
                                            avoid=(DREAM_MASK, DREAM_PAD, EOS), seed=3)
    events = []
    out = genjo_fast.diffusion_generate(
        dream, inputs, attention_mask=attention_mask, max_new_tokens=NEW, steps=NEW,
        mask_token_id=DREAM_MASK, alg="entropy", stop_at_eos=True, stop_ids=(EOS,),
        output_history=True, return_dict_in_generate=True,
        observer=lambda e: events.append(e.x0.shape))
    assert all(shape == (4, NEW) for shape in events)
    assert all(h.shape == (4, PROMPT + NEW) for h in out.history)
    assert torch.equal(out.history[-1], out.sequences)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stop_ids, error", [
    ((EOS, VOCAB), ValueError), ((EOS, 10**6), ValueError), ((-1,), ValueError),
    ((MASK_ID,), ValueError), ((), ValueError), ((EOS, 1.5), TypeError), ("7", TypeError),
    ((True,), TypeError),
])
def test_bad_stop_ids_name_the_argument(llada, stop_ids, error):
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(error, match="stop_ids"):
        genjo_fast.generate(llada, prompt, steps=8, gen_length=8, block_length=8,
                            stop_at_eos=True, stop_ids=stop_ids, **IDS)


def test_bad_stop_ids_dream(dream):
    inputs = torch.zeros(1, 4, dtype=torch.long)
    for stop_ids in ((EOS, DREAM_VOCAB), (DREAM_MASK,)):
        with pytest.raises(ValueError, match="stop_ids"):
            genjo_fast.diffusion_generate(dream, inputs, max_new_tokens=4, steps=4,
                                          mask_token_id=DREAM_MASK, stop_at_eos=True,
                                          stop_ids=stop_ids)
    # the defaults (151643, 151645) are outside this small vocabulary: said so
    with pytest.raises(ValueError, match=r"stop_ids\[0\]=151643"):
        genjo_fast.diffusion_generate(dream, inputs, max_new_tokens=4, steps=4,
                                      mask_token_id=DREAM_MASK, stop_at_eos=True)


def test_refused_combinations(llada, dream):
    prompt = torch.zeros(1, 4, dtype=torch.long)
    args = dict(steps=8, gen_length=8, block_length=8, **IDS)
    with pytest.raises(ValueError, match="stop_ids"):
        genjo_fast.generate(llada, prompt, stop_ids=(EOS,), **args)
    with pytest.raises(TypeError, match="stop_at_eos"):
        genjo_fast.generate(llada, prompt, stop_at_eos=1, **args)
    with pytest.raises(ValueError, match="cuda_graph"):
        genjo_fast.generate(llada, prompt, stop_at_eos=True, cuda_graph=True, **args)
    with pytest.raises(ValueError, match="hook"):
        genjo_fast.diffusion_generate(dream, prompt, max_new_tokens=4, steps=4,
                                      mask_token_id=DREAM_MASK, stop_at_eos=True,
                                      stop_ids=(EOS,),
                                      generation_tokens_hook_func=lambda s, x, l: x)


def test_vocab_check_without_a_config(llada):
    """A model that does not state its vocabulary: the stop ids are checked against the
    logits at the first forward."""
    from genjo_fast.testing import TinyBidirectionalLM

    class NoConfig(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TinyBidirectionalLM(VOCAB, d_model=16, n_heads=2, n_layers=1)

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids, attention_mask=attention_mask)

    with pytest.raises(ValueError, match=r"stop_ids\[1\]=500"):
        genjo_fast.generate(NoConfig(), torch.zeros(1, 4, dtype=torch.long), steps=8,
                            gen_length=8, block_length=8, stop_at_eos=True,
                            stop_ids=(EOS, 500), **IDS)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("temperature,remasking", [(0.0, "low_confidence"), (0.8, "random")])
def test_llada_with_constraints(llada, cfg_scale, temperature, remasking):
    """Constraints give rows different per-block counts; rows stopping at EOS leave the batch:
    the rows going on keep their own counts (the call without the option is the oracle)."""
    batch, gen_length = 5, 24
    prompt, attention_mask = random_prompts(batch, PROMPT, VOCAB, pad_id=PAD_ID,
                                            avoid=(MASK_ID, PAD_ID, EOS, EOT), seed=11)
    draws = llada_draws(temperature, remasking, 12, batch, PROMPT + gen_length, seed=3)
    args = dict(steps=12, gen_length=gen_length, block_length=8, temperature=temperature,
                remasking=remasking, cfg_scale=cfg_scale, constraints={9: [20, 21], 17: 30},
                draws=draws, **IDS)
    plain, plain_stats = genjo_fast.generate(llada, prompt, attention_mask, return_stats=True,
                                             **args)
    got, stats = genjo_fast.generate(llada, prompt, attention_mask, return_stats=True,
                                     stop_at_eos=True, **args)
    stops = expect_stopped(got, plain)
    assert any(p is not None and p < 8 for p in stops)  # some rows stop before a constraint
    assert stats.row_forwards < plain_stats.row_forwards
    assert stats.nfe + stats.forwards_saved == plain_stats.nfe


@pytest.mark.parametrize("other", [dict(sampler="app"), dict(adaptive_length=True)])
def test_refused_with_app_sampler_and_adaptive_length(llada, other):
    prompt = torch.randint(0, 50, (1, PROMPT))
    with pytest.raises(ValueError, match="stop_at_eos"):
        genjo_fast.generate(llada, prompt, steps=8, gen_length=8, block_length=8,
                            stop_at_eos=True, **IDS, **other)


# ----------------------------------------------------------------------------------------------
# drop_rows: rows nobody wants any more leave the batch; the others are not affected
# ----------------------------------------------------------------------------------------------

class DropAfter:
    """``drop_rows`` naming ``rows`` from the ``after``-th call on (as a server names its
    cancelled requests at every step), recording how often it was called."""

    def __init__(self, rows, after):
        self.rows, self.after, self.calls = rows, after, 0

    def __call__(self):
        self.calls += 1
        return self.rows if self.calls >= self.after else ()


def check_dropped(sampler, model, inputs, kw, rows, after):
    """``sampler`` with ``stop_at_eos`` and without then with ``drop_rows``: the rows not
    dropped are identical, the dropped ones hold the canvas of the step that dropped them
    (masks left), and fewer row forwards ran."""
    seen = []
    full, full_stats = sampler(model, inputs, stop_at_eos=True, return_stats=True,
                               observer=lambda e: seen.append(e.x.clone()), **kw)
    drop = DropAfter(rows, after)
    got, stats = sampler(model, inputs, stop_at_eos=True, return_stats=True, drop_rows=drop,
                         **kw)
    kept = [r for r in range(inputs.shape[0]) if r not in rows]
    assert torch.equal(got[kept], full[kept])
    assert torch.equal(got[list(rows)], seen[after - 1][list(rows)])
    assert bool((got[list(rows)] == kw["mask_id" if "mask_id" in kw else "mask_token_id"])
                .any())  # dropped mid-answer
    assert stats.row_forwards < full_stats.row_forwards
    if stats.forwards_saved is not None:  # what the call without either option runs
        assert stats.row_forwards + stats.row_forwards_saved == \
            full_stats.row_forwards + full_stats.row_forwards_saved
    assert drop.calls == stats.nfe  # called once after every step that ran the model
    return stats


@pytest.mark.parametrize("options", [
    dict(), dict(cfg_scale=1.5), dict(cache="dual"), dict(threshold=0.7, cache="prefix"),
    dict(temperature=0.9, remasking="random"),
], ids=str)
def test_llada_drop_rows(llada, options):
    batch = 5
    prompt, attention_mask = random_prompts(batch, PROMPT, VOCAB, pad_id=PAD_ID,
                                            avoid=(MASK_ID, PAD_ID, EOS, EOT), seed=5)
    kw = dict(attention_mask=attention_mask, steps=24, gen_length=24, block_length=8, **IDS,
              **options)
    if "temperature" in options:
        kw["draws"] = llada_draws(options["temperature"], options["remasking"], 24, batch,
                                  PROMPT + 24)
    check_dropped(genjo_fast.generate, llada, prompt, kw, rows=(1, 3), after=3)


def test_llada_drop_every_row_ends_the_call(llada):
    prompt, _ = random_prompts(3, PROMPT, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID, PAD_ID, EOS, EOT),
                               seed=1, padded=False)
    stats = check_dropped(genjo_fast.generate, llada, prompt,
                          dict(steps=24, gen_length=24, block_length=8, **IDS),
                          rows=(0, 1, 2), after=2)
    assert stats.nfe == 2 and stats.forwards_saved == 22


@pytest.mark.parametrize("options", [dict(alg="entropy"), dict(alg="maskgit_plus", alg_temp=0.5),
                                     dict(alg="origin", block_length=8, cache="dual")], ids=str)
def test_dream_drop_rows(dream, options):
    """A dropped row keeps counting in maskgit_plus' batch-mean schedule, as a finished row
    does: the other rows unmask what they would."""
    inputs, attention_mask = random_prompts(4, PROMPT, DREAM_VOCAB, pad_id=DREAM_PAD,
                                            avoid=(DREAM_MASK, DREAM_PAD, EOS, EOT), seed=3)
    g = torch.Generator().manual_seed(0)
    size = (NEW, 4, PROMPT + NEW)
    draws = TensorDraws(remask=torch.rand(*size, generator=g),
                        token=torch.rand(*size, generator=g, dtype=torch.float64),
                        position=torch.rand(*size, generator=g, dtype=torch.float64))
    kw = dict(attention_mask=attention_mask, draws=draws, max_new_tokens=NEW, steps=NEW,
              mask_token_id=DREAM_MASK, stop_ids=(EOS, EOT), **options)
    check_dropped(genjo_fast.diffusion_generate, dream, inputs, kw, rows=(2,), after=2)


def test_first_stops():
    answer = torch.tensor([[5, EOS, MASK_ID], [MASK_ID, EOS, 5], [5, 6, 8], [5, 5, EOT]])
    finished, first = first_stops(answer, torch.tensor([EOS, EOT]), MASK_ID)
    assert finished.tolist() == [True, False, False, True] and first.tolist() == [1, 1, 3, 2]


def test_bad_drop_rows_name_the_argument(llada, dream):
    prompt = torch.zeros(2, 4, dtype=torch.long)
    args = dict(steps=8, gen_length=8, block_length=8, **IDS)
    with pytest.raises(ValueError, match="drop_rows.*stop_at_eos=True"):
        genjo_fast.generate(llada, prompt, drop_rows=lambda: (), **args)
    with pytest.raises(TypeError, match="drop_rows must be callable"):
        genjo_fast.generate(llada, prompt, stop_at_eos=True, drop_rows=[0], **args)
    with pytest.raises(ValueError, match=r"drop_rows\(\) returned row 2, outside the batch"):
        genjo_fast.generate(llada, prompt, stop_at_eos=True, drop_rows=lambda: [2], **args)
    with pytest.raises(TypeError, match=r"drop_rows\(\) must return row indices"):
        genjo_fast.generate(llada, prompt, stop_at_eos=True, drop_rows=lambda: ["0"], **args)
    with pytest.raises(ValueError, match="drop_rows.*stop_at_eos=True"):
        genjo_fast.diffusion_generate(dream, prompt, max_new_tokens=4, steps=4,
                                      mask_token_id=DREAM_MASK, drop_rows=lambda: ())
