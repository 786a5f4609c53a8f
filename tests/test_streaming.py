"""streamer= on generate and diffusion_generate: transformers' streamer protocol (put the
prompt, put_draft after every step, put what the decoded prefix gains, end), transformers'
own streamers, and genjo_fast's DiffusionIteratorStreamer for any batch."""
import contextlib
import io
import re
import threading

import pytest
import torch

import genjo_fast
from genjo_fast.streaming import DiffusionIteratorStreamer, StreamAdapter, decoded_prefix
from genjo_fast.testing import random_prompts

from chat_helpers import EOS_ID, EOT_ID, MASK_ID, char_tokenizer, tiny_llada

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llada(tokenizer)


def prompt_of(tokenizer, text="Sort: 3 1 2"):
    text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


class Recorder:
    """Records the calls of the protocol, in order."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.clone()))

    def put_draft(self, value):
        self.calls.append(("draft", value.clone()))

    def end(self):
        self.calls.append(("end", None))


def snapshots():
    """An observer keeping the canvas after every step."""
    seen = []
    return seen, lambda event: seen.append(event.x.clone())


def expected_calls(prompt, states, final, prompt_len, mask_id=MASK_ID):
    """The protocol's calls for the canvases ``states`` after each step (the statement of the
    adapter's contract, written out per step)."""
    calls, confirmed = [("put", prompt)], 0
    for x in states:
        answer = x[:, prompt_len:]
        masked = (answer == mask_id).any(0)
        prefix = int(masked.int().argmax()) if masked.any() else answer.shape[1]
        if prefix > confirmed:
            calls.append(("put", answer[:, confirmed:prefix]))
            confirmed = prefix
        calls.append(("draft", answer[:, confirmed:]))
    if final.shape[1] - prompt_len > confirmed:
        calls.append(("put", final[:, prompt_len + confirmed:]))
    calls.append(("end", None))
    return calls


def assert_calls(got, want):
    assert [name for name, _ in got] == [name for name, _ in want]
    for (name, value), (_, expected) in zip(got, want):
        if value is not None:
            assert value.dtype == torch.long and value.device.type == "cpu"
            assert torch.equal(value, expected.cpu()), name


SETTINGS = [
    dict(steps=8, gen_length=16, block_length=8),
    dict(steps=16, gen_length=16, block_length=4, temperature=1.0, remasking="random"),
    dict(steps=32, gen_length=16, block_length=16),  # more steps than tokens: skipped steps
    dict(steps=8, gen_length=16, block_length=8, threshold=0.5),
    dict(steps=8, gen_length=16, block_length=8, cache="dual", cfg_scale=1.0),
]


@pytest.mark.parametrize("kw", SETTINGS,
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_drives_the_protocol_step_by_step(model, kw, batch):
    vocab = model.config.vocab_size
    prompt, attention_mask = random_prompts(batch, 7, vocab, pad_id=EOS_ID,
                                            avoid=(MASK_ID, EOS_ID), seed=batch)
    common = dict(mask_id=MASK_ID, eos_id=EOS_ID, eot_id=EOT_ID, return_stats=True, **kw)
    plain, plain_stats = genjo_fast.generate(model, prompt, attention_mask,
                                             generator=torch.Generator().manual_seed(0), **common)
    recorder, (states, observer) = Recorder(), snapshots()
    out, stats = genjo_fast.generate(model, prompt, attention_mask, streamer=recorder,
                                     observer=observer,
                                     generator=torch.Generator().manual_seed(0), **common)
    assert torch.equal(out, plain)  # streaming changes no token
    assert stats.nfe == plain_stats.nfe == len(states)
    assert_calls(recorder.calls, expected_calls(prompt, states, out, prompt.shape[1]))
    drafts = [v for name, v in recorder.calls if name == "draft"]
    assert len(drafts) == stats.nfe
    # put calls after the prompt add up to the answer
    confirmed = torch.cat([v for name, v in recorder.calls[1:] if name == "put"], dim=1)
    assert torch.equal(confirmed, out[:, prompt.shape[1]:])


def test_llada_confirms_block_by_block(model):
    """LLaDA decodes left to right by blocks: the confirmed prefix grows at least at every
    block's end, so text arrives before the end of the call."""
    prompt = torch.tensor([[5, 6, 7, 8]])
    recorder = Recorder()
    genjo_fast.generate(model, prompt, steps=8, gen_length=16, block_length=4, mask_id=MASK_ID,
                        streamer=recorder)
    names = [name for name, _ in recorder.calls]
    puts_before_last_draft = names[1:len(names) - names[::-1].index("draft")].count("put")
    assert puts_before_last_draft >= 4


def test_no_streamer_builds_no_adapter(model, monkeypatch):
    """Without a streamer nothing of the streaming path runs (no host copy per step)."""
    def refuse(*args, **kwargs):
        raise AssertionError("StreamAdapter built without a streamer")
    monkeypatch.setattr(StreamAdapter, "__init__", refuse)
    genjo_fast.generate(model, torch.tensor([[5, 6, 7]]), steps=4, gen_length=8,
                        block_length=8, mask_id=MASK_ID)


def test_text_streamer_prints_the_answer(model, tokenizer):
    prompt = prompt_of(tokenizer)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        out = genjo_fast.generate(model, prompt, steps=8, gen_length=16, block_length=8,
                                  mask_id=MASK_ID,
                                  streamer=transformers.TextStreamer(tokenizer, skip_prompt=True))
    assert stdout.getvalue() == tokenizer.decode(out[0, prompt.shape[1]:]) + "\n"


def test_text_iterator_streamer_in_a_thread(model, tokenizer):
    prompt = prompt_of(tokenizer, "Reverse: abc")
    streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", genjo_fast.generate(
        model, prompt, steps=8, gen_length=16, block_length=4, mask_id=MASK_ID,
        streamer=streamer)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == tokenizer.decode(result["out"][0, prompt.shape[1]:])


def test_text_diffusion_streamer_draws_drafts_and_confirmed_text(model, tokenizer):
    prompt = prompt_of(tokenizer, "What is 2 plus 2?")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        out, stats = genjo_fast.generate(
            model, prompt, steps=8, gen_length=16, block_length=8, mask_id=MASK_ID,
            streamer=transformers.TextDiffusionStreamer(tokenizer, skip_prompt=True),
            return_stats=True)
    printed = stdout.getvalue()
    # each draft: save cursor, yellow text, reset; cleared by restore + erase
    drafts = re.findall("\0337\033\\[33m(.*?)\033\\[0m", printed, flags=re.S)
    assert len(drafts) == stats.nfe
    assert drafts[0].count(tokenizer.mask_token) > 0
    permanent = re.sub("\0337\033\\[33m.*?\033\\[0m", "", printed, flags=re.S)
    permanent = permanent.replace("\0338\033[J", "")
    assert permanent == tokenizer.decode(out[0, prompt.shape[1]:]) + "\n"


def test_transformers_streamers_refuse_batches(model):
    prompt = torch.tensor([[5, 6], [7, 8]])
    with pytest.raises(ValueError, match="batch size 1"):
        genjo_fast.generate(model, prompt, steps=4, gen_length=8, block_length=8,
                            mask_id=MASK_ID, streamer=transformers.TextStreamer(char_tokenizer()))


def test_bad_streamers_are_named(model):
    prompt = torch.tensor([[5, 6]])
    with pytest.raises(TypeError, match="streamer must have a callable put"):
        genjo_fast.generate(model, prompt, steps=4, gen_length=8, block_length=8,
                            mask_id=MASK_ID, streamer=object())

    class WantsLogits(Recorder):
        _takes_logits = True
    with pytest.raises(ValueError, match="_takes_logits"):
        genjo_fast.generate(model, prompt, steps=4, gen_length=8, block_length=8,
                            mask_id=MASK_ID, streamer=WantsLogits())


def test_decoded_prefix():
    m = MASK_ID
    assert decoded_prefix(torch.tensor([[5, 6, m, 7]]), m) == 2
    assert decoded_prefix(torch.tensor([[5, 6, 7], [5, m, 7]]), m) == 1
    assert decoded_prefix(torch.tensor([[5, 6, 7]]), m) == 3
    assert decoded_prefix(torch.tensor([[m, 6, 7]]), m) == 0
    assert decoded_prefix(torch.zeros((2, 0), dtype=torch.long), m) == 0


def test_adapter_with_edits_confirms_only_at_the_end_and_follows_a_growing_answer():
    m = MASK_ID
    recorder = Recorder()
    adapter = StreamAdapter(recorder, m, edits=True)
    adapter.begin(torch.tensor([[9, 9]]))
    adapter.step(torch.tensor([[5, m, m]]))
    adapter.step(torch.tensor([[6, 7, m]]))  # an edit changed position 0
    adapter.finish(torch.tensor([[6, 7, 8]]))
    assert [(n, None if v is None else v.tolist()) for n, v in recorder.calls] == [
        ("put", [[9, 9]]), ("draft", [[5, m, m]]), ("draft", [[6, 7, m]]),
        ("put", [[6, 7, 8]]), ("end", None)]

    recorder = Recorder()
    adapter = StreamAdapter(recorder, m)
    adapter.begin(torch.tensor([[9]]))
    adapter.step(torch.tensor([[5, m]]))
    adapter.step(torch.tensor([[5, 6, m, m]]))  # the answer grew by a block
    adapter.finish(torch.tensor([[5, 6, 7, 8]]))
    assert [(n, None if v is None else v.tolist()) for n, v in recorder.calls] == [
        ("put", [[9]]), ("put", [[5]]), ("draft", [[m]]), ("put", [[6]]), ("draft", [[m, m]]),
        ("put", [[7, 8]]), ("end", None)]


def test_adapter_hands_out_copies():
    recorder = Recorder()
    adapter = StreamAdapter(recorder, MASK_ID)
    answer = torch.tensor([[5, MASK_ID]])
    adapter.begin(torch.tensor([[9]]))
    adapter.step(answer)
    answer[0, 1] = 6  # the sampler writes its canvas in place
    assert recorder.calls[-1][1].tolist() == [[MASK_ID]]


# -- genjo_fast's iterator streamer -------------------------------------------------------------

def run_iterated(model, prompt, attention_mask=None, tokenizer=None, **kw):
    tokenizer = tokenizer or char_tokenizer()
    streamer = DiffusionIteratorStreamer(tokenizer, MASK_ID, stop_ids=(EOS_ID, EOT_ID),
                                         timeout=60)
    states, observer = snapshots()
    transfers = []
    result = {}

    def observe(event):
        observer(event)
        transfers.append(event)

    def work():
        try:
            result["out"] = genjo_fast.generate(model, prompt, attention_mask, mask_id=MASK_ID,
                                                streamer=streamer, observer=observe, **kw)
        except BaseException as error:
            streamer.fail(error)

    thread = threading.Thread(target=work)
    thread.start()
    updates = list(streamer)
    thread.join()
    return updates, states, result["out"]


def test_iterator_streamer_any_batch(model, tokenizer):
    prompt, attention_mask = random_prompts(3, 6, model.config.vocab_size, pad_id=EOS_ID,
                                            avoid=(MASK_ID, EOS_ID), seed=3)
    updates, states, out = run_iterated(model, prompt, attention_mask, tokenizer, steps=8,
                                        gen_length=16, block_length=8)
    answer = out[:, prompt.shape[1]:]
    assert len(updates) == len(states) + 1
    assert [u.index for u in updates] == list(range(len(updates)))
    assert [u.done for u in updates] == [False] * len(states) + [True]
    previous = torch.full_like(answer, MASK_ID)
    for update, x in zip(updates, states + [out]):
        now = x[:, prompt.shape[1]:]
        assert torch.equal(update.ids, now)
        for row in range(3):
            kinds = update.kinds[row]
            for pos, kind in enumerate(kinds):
                masked, was = now[row, pos] == MASK_ID, previous[row, pos] == MASK_ID
                assert kind == ("mask" if masked else "new" if was else "kept")
            ids = now[row].tolist()
            stop = next((i for i, t in enumerate(ids) if t in (EOS_ID, EOT_ID)), len(ids))
            assert update.ends[row] == stop
            c = update.confirmed_length
            assert update.confirmed[row] == tokenizer.decode(ids[:min(c, stop)],
                                                             skip_special_tokens=True)
            rest = ids[c:stop]
            assert update.draft[row].count("\u2591") == rest.count(MASK_ID)
            assert update.pieces[row][pos] == (
                "\u2591" if ids[pos] == MASK_ID else "\u220e" if ids[pos] in (EOS_ID, EOT_ID)
                else tokenizer.decode([ids[pos]]))
        previous = now
    final = updates[-1]
    for row in range(3):
        ids = answer[row].tolist()
        stop = next((i for i, t in enumerate(ids) if t in (EOS_ID, EOT_ID)), len(ids))
        assert final.text(row) == tokenizer.decode(ids[:stop], skip_special_tokens=True)
        assert final.draft[row] == ""


def test_iterator_streamer_renders_masks_inside_drafts():
    tokenizer = char_tokenizer()
    streamer = DiffusionIteratorStreamer(tokenizer, MASK_ID, stop_ids=(EOS_ID,), mask_text="_")
    ids = tokenizer("ab", add_special_tokens=False)["input_ids"]
    streamer.put(torch.tensor([[3]]))
    streamer.put(torch.tensor([ids[:1]]))
    streamer.put_draft(torch.tensor([[MASK_ID, ids[1], MASK_ID, EOS_ID, MASK_ID]]))
    update = next(iter(streamer))
    assert update.confirmed == ["a"] and update.draft == ["_b_"]
    assert update.kinds == [["new", "mask", "new", "mask", "new", "mask"]]
    assert update.pieces[0] == ["a", "_", "b", "_", "\u220e", "_"]
    assert update.ends == [4]


def test_iterator_streamer_raises_the_generating_threads_error(model):
    updates = []
    with pytest.raises(ValueError, match="gen_length"):
        for update in run_iterated(model, torch.tensor([[5, 6]]), steps=4, gen_length=10,
                                   block_length=4)[0]:
            updates.append(update)
    assert updates == []


def test_iterator_streamer_is_reusable(model, tokenizer):
    streamer = DiffusionIteratorStreamer(tokenizer, MASK_ID, timeout=60)
    for text in ("Sort: 1", "Sort: 2 1"):
        prompt = prompt_of(tokenizer, text)
        out = genjo_fast.generate(model, prompt, steps=4, gen_length=8, block_length=8,
                                  mask_id=MASK_ID, streamer=streamer)
        updates = []
        for update in streamer:
            updates.append(update)
        assert updates[0].index == 0 and updates[-1].done
        assert torch.equal(updates[-1].ids, out[:, prompt.shape[1]:])


# -- Dream ----------------------------------------------------------------------------------------

def _dream_sampler_missing():
    from genjo_fast.backends import resolve_backend
    return not hasattr(resolve_backend("torch", torch.device("cpu")), "dream_sample")


@pytest.mark.skipif(_dream_sampler_missing(),
                    reason="diffusion_generate needs the backends' dream_sample op, not in "
                           "this tree yet")
@pytest.mark.parametrize("alg", ["entropy", "origin"])
def test_diffusion_generate_drives_the_protocol(alg, monkeypatch):
    from genjo_fast.dream import diffusion_generate
    from genjo_fast.testing import random_dream

    monkeypatch.setenv("GENJO_FAST_ATTENTION", "sdpa")
    model = random_dream(97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, intermediate_size=48, seed=0, mask_token_id=96,
                         pad_token_id=95)
    inputs, attention_mask = random_prompts(2, 5, 97, pad_id=95, avoid=(96, 95), seed=0)
    kw = dict(attention_mask=attention_mask, max_new_tokens=12, steps=6, alg=alg,
              mask_token_id=96, return_stats=True)
    plain, _ = diffusion_generate(model, inputs, generator=torch.Generator().manual_seed(0), **kw)
    recorder, (states, observer) = Recorder(), snapshots()
    out, stats = diffusion_generate(model, inputs, streamer=recorder, observer=observer,
                                    generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out, plain)
    assert_calls(recorder.calls, expected_calls(inputs, states, out, inputs.shape[1], 96))
    assert len(states) == stats.nfe


# -- masked LMs: mdlm_generate, mdlm_semi_autoregressive and the text-diffusion pipeline -------

def _mdlm():
    from genjo_fast import testing_mdlm
    return testing_mdlm


@pytest.fixture(scope="module")
def mdlm_tokenizer():
    return _mdlm().tiny_tokenizer()


@pytest.fixture(scope="module")
def mdlm_model():
    return _mdlm().tiny_model("bert", positions=40)


def mdlm_ids():
    t = _mdlm()
    return dict(mask_id=t.MASK_ID, pad_id=t.PAD_ID, eos_id=t.EOS_ID)


def mdlm_expected_calls(prompts, states, final, *, allow_edits, stop_id=None, settle_from=0):
    """The protocol's calls for canvases ``states`` after each step, statement of the family's
    contract: a generated position may still change while it holds the mask or the pad id,
    or, with edits, any token but EOS; the answers end before ``stop_id`` (the padding after a
    cut changes while the stop token may); rows are right-padded with the pad id; before step
    ``settle_from`` every generated position may change (adaptive length)."""
    t = _mdlm()

    def rows(x, done, settled=True):
        out = []
        for b, prompt in enumerate(prompts):
            answer = x[b, len(prompt):]
            may = torch.zeros(len(answer), dtype=torch.bool)
            if not done:
                may = (answer == t.MASK_ID) | (answer == t.PAD_ID)
                if allow_edits:
                    may |= ~may & (answer != t.EOS_ID)
                if not settled:
                    may[:] = True
            tail = False
            if stop_id is not None and bool((answer == stop_id).any()):
                end = int((answer == stop_id).nonzero()[0])
                answer, may, tail = answer[:end], may[:end], bool(may[end])
            out.append((answer, may, tail))
        width = max(len(a) for a, _, _ in out)
        ids = torch.full((len(out), width), t.PAD_ID)
        still = torch.zeros((len(out), width), dtype=torch.bool)
        for b, (answer, may, tail) in enumerate(out):
            ids[b, :len(answer)], still[b, :len(answer)], still[b, len(answer):] = answer, may, tail
        return ids, still

    width = max(len(p) for p in prompts)
    prompt = torch.full((len(prompts), width), t.PAD_ID)
    for b, p in enumerate(prompts):
        prompt[b, width - len(p):] = p
    calls, confirmed = [("put", prompt)], 0
    for i, x in enumerate(states):
        ids, still = rows(x, False, i >= settle_from)
        cols = still.any(0)
        prefix = int(cols.int().argmax()) if bool(cols.any()) else ids.shape[1]
        if prefix > confirmed:
            calls.append(("put", ids[:, confirmed:prefix]))
            confirmed = prefix
        calls.append(("draft", ids[:, confirmed:]))
    ids, _ = rows(final, True)
    if ids.shape[1] > confirmed:
        calls.append(("put", ids[:, confirmed:]))
    calls.append(("end", None))
    return calls


MDLM_PROMPTS = [[7, 8, 9], [10, 11], [12, 13, 14, 15, 16]]


def iterate_in_a_thread(streamer, call):
    """Runs ``call()`` in a thread while iterating ``streamer``: (the items, the result)."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", call()))
    thread.start()
    items = list(streamer)
    thread.join()
    return items, result["out"]


@pytest.mark.parametrize("kw", [dict(allow_edits=False), dict(allow_edits=True),
                                dict(allow_edits=False, use_confidence=True),
                                dict(allow_edits=False, stop_id=20),
                                dict(allow_edits=True, stop_id=20),
                                dict(allow_edits=False, adaptive_length=True,
                                     length_threshold=0.05)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("batch", [1, 3])
def test_mdlm_generate_drives_the_protocol_step_by_step(mdlm_model, kw, batch):
    from genjo_fast.mdlm import mdlm_generate
    prompts = [torch.tensor(p) for p in MDLM_PROMPTS[:batch]]
    model = mdlm_model
    if "stop_id" in kw:  # make the stop token frequent
        model = _mdlm().tiny_model("bert", positions=40)
        with torch.no_grad():
            model.cls.predictions.bias[20] += 3.0
    common = dict(max_length=24, num_steps=6, **mdlm_ids(), **kw)
    plain = mdlm_generate(model, prompts, generator=torch.Generator().manual_seed(0), **common)
    recorder, (states, observer) = Recorder(), snapshots()
    out = mdlm_generate(model, prompts, streamer=recorder, observer=observer,
                        generator=torch.Generator().manual_seed(0), **common)
    assert torch.equal(out, plain)  # streaming changes no token
    width = 24  # the canvas before adaptive length's cut: the full state is the result's
    full = [torch.cat([x, out[:, x.shape[1]:]], 1) if x.shape[1] < width else x for x in states]
    assert_calls(recorder.calls, mdlm_expected_calls(
        prompts, full, out, allow_edits=kw["allow_edits"], stop_id=kw.get("stop_id"),
        settle_from=1 if kw.get("adaptive_length") else 0))
    assert [name for name, _ in recorder.calls].count("draft") == len(states)
    assert len(states) == 6 or kw.get("adaptive_length")  # the cut may leave nothing to do
    # what was put after the prompt adds up to the answers (cut, padded)
    answers = torch.cat([v for name, v in recorder.calls[1:] if name == "put"], dim=1)
    for b, p in enumerate(prompts):
        answer = out[b, len(p):]
        if "stop_id" in kw and bool((answer == 20).any()):
            answer = answer[:int((answer == 20).nonzero()[0])]
        assert torch.equal(answers[b, :len(answer)], answer)
        assert bool((answers[b, len(answer):] == _mdlm().PAD_ID).all())


def test_mdlm_edits_confirm_nothing_a_later_step_may_edit(mdlm_model):
    """With edits, a visible token may be rewritten at any step (the last included), so it is
    not confirmed: the confirmed part stays empty before the end, and some token shown in a
    draft is indeed rewritten later; without edits decoded tokens arrive before the end."""
    from genjo_fast.mdlm import mdlm_generate
    prompt = [torch.tensor([7, 8, 9])]
    common = dict(max_length=30, num_steps=8, **mdlm_ids())
    for allow_edits in (True, False):
        recorder = Recorder()
        out = mdlm_generate(mdlm_model, prompt, streamer=recorder, allow_edits=allow_edits,
                            generator=torch.Generator().manual_seed(3), **common)
        names = [name for name, _ in recorder.calls]
        early = names[1:len(names) - names[::-1].index("draft")].count("put")
        drafts = [v[0] for name, v in recorder.calls if name == "draft"]
        puts = [v for name, v in recorder.calls[1:] if name == "put"]
        assert names[-1] == "end" and torch.equal(torch.cat(puts, dim=1)[0], out[0, 3:])
        if allow_edits:
            assert early == 0 and all(len(d) == 27 for d in drafts)
            rewritten = any(bool(((a != b) & (a != MASK_ID_MDLM) & (b != MASK_ID_MDLM)).any())
                            for a, b in zip(drafts, drafts[1:]))
            assert rewritten
        else:
            assert early > 0


MASK_ID_MDLM = 1  # testing_mdlm's mask id (its specials are ids 0..5)


def test_mdlm_semi_autoregressive_confirms_finished_blocks(mdlm_model):
    """Beyond the window, block by block: a finished block never changes, so it is confirmed
    even with edits; the streamed answer is the result."""
    from genjo_fast.mdlm import mdlm_semi_autoregressive
    prompts = [torch.tensor([7, 8, 9])]
    recorder = Recorder()
    out = mdlm_semi_autoregressive(mdlm_model, prompts, block_size=8, max_length=43,
                                   num_steps=3, window=20, streamer=recorder,
                                   generator=torch.Generator().manual_seed(4), **mdlm_ids())
    names = [name for name, _ in recorder.calls]
    assert names.count("draft") == 5 * 3 and names[-1] == "end"
    puts = [v for name, v in recorder.calls[1:] if name == "put"]
    assert len(puts) >= 5  # each finished block (4 of them before the last), then the rest
    assert torch.equal(torch.cat(puts, dim=1)[0], out[0][3:])
    confirmed, step = 0, 0
    for name, value in recorder.calls[1:-1]:
        if name == "put":
            confirmed += value.shape[1]
        else:  # the draft of step `step`, in block step // 3 (40 = 5 blocks of 8)
            block = step // 3
            assert confirmed >= 8 * block  # the finished blocks are confirmed
            assert confirmed + value.shape[1] == 8 * (block + 1)
            step += 1


def test_mdlm_iterator_streamer_any_batch(mdlm_tokenizer):
    """DiffusionIteratorStreamer with prompts of different lengths: one update per step, then
    the final one, whose texts are the rows' answers."""
    from genjo_fast.pipeline import TextDiffusionPipeline
    t = _mdlm()
    pipe = TextDiffusionPipeline(t.tiny_model("roberta", positions=40), mdlm_tokenizer,
                                 device="cpu")
    texts = ["the cat", "yes no what why how the dog"]
    streamer = DiffusionIteratorStreamer(mdlm_tokenizer, t.MASK_ID, stop_ids=(t.EOS_ID,),
                                         timeout=60)
    updates, outs = iterate_in_a_thread(streamer, lambda: pipe(
        texts, num_steps=5, max_length=24, allow_edits=False, streamer=streamer,
        generator=torch.Generator().manual_seed(5)))
    assert len(updates) == 6 and updates[-1].done
    for row, (text, out) in enumerate(zip(texts, outs)):
        n = len(mdlm_tokenizer.encode(text))
        answer = out["final_ids"][0, n:].tolist()
        stop = answer.index(t.EOS_ID) if t.EOS_ID in answer else len(answer)
        assert updates[-1].text(row) == mdlm_tokenizer.decode(answer[:stop],
                                                              skip_special_tokens=True)


@pytest.fixture(scope="module")
def mdlm_pipe(mdlm_tokenizer):
    from genjo_fast.pipeline import TextDiffusionPipeline
    return TextDiffusionPipeline(_mdlm().tiny_model("modernbert", positions=40),
                                 mdlm_tokenizer, device="cpu")


PIPE_PROMPT = "<|im_start|> user what is the cat <|im_end|> <|im_start|> assistant"


def _answer(pipe, out):
    return out["final_ids"][0, len(pipe.tokenizer.encode(PIPE_PROMPT)):]


@pytest.mark.parametrize("allow_edits", [False, True])
def test_pipe_text_streamer_prints_the_final_text(mdlm_pipe, allow_edits):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        out = mdlm_pipe(PIPE_PROMPT, num_steps=6, max_length=30, allow_edits=allow_edits,
                        streamer=transformers.TextStreamer(mdlm_pipe.tokenizer, skip_prompt=True),
                        generator=torch.Generator().manual_seed(6))
    assert stdout.getvalue() == mdlm_pipe.tokenizer.decode(_answer(mdlm_pipe, out)) + "\n"


def test_pipe_streamer_text_ends_before_the_stop_token(mdlm_pipe):
    full = mdlm_pipe(PIPE_PROMPT, num_steps=4, max_length=30,
                     generator=torch.Generator().manual_seed(7))
    stop = mdlm_pipe.tokenizer.convert_ids_to_tokens(int(_answer(mdlm_pipe, full)[5]))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        out = mdlm_pipe(PIPE_PROMPT, num_steps=4, max_length=30, stop_token=stop,
                        streamer=transformers.TextStreamer(mdlm_pipe.tokenizer, skip_prompt=True),
                        generator=torch.Generator().manual_seed(7))
    answer = _answer(mdlm_pipe, out)
    assert len(answer) <= 5  # cut before the stop token
    assert stdout.getvalue() == mdlm_pipe.tokenizer.decode(answer) + "\n"
    assert out["decoded_texts"][0].endswith(stdout.getvalue()[:-1])


def test_pipe_text_iterator_streamer_in_a_thread(mdlm_pipe):
    streamer = transformers.TextIteratorStreamer(mdlm_pipe.tokenizer, skip_prompt=True,
                                                 timeout=60)
    pieces, out = iterate_in_a_thread(streamer, lambda: mdlm_pipe(
        PIPE_PROMPT, num_steps=5, max_length=30, allow_edits=False, streamer=streamer,
        generator=torch.Generator().manual_seed(8)))
    assert "".join(pieces) == mdlm_pipe.tokenizer.decode(_answer(mdlm_pipe, out))


def test_pipe_text_diffusion_streamer_draws_every_step(mdlm_pipe):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        out = mdlm_pipe(PIPE_PROMPT, num_steps=6, max_length=30,
                        streamer=transformers.TextDiffusionStreamer(mdlm_pipe.tokenizer,
                                                                    skip_prompt=True),
                        generator=torch.Generator().manual_seed(9))
    printed = stdout.getvalue()
    drafts = re.findall("\0337\033\\[33m(.*?)\033\\[0m", printed, flags=re.S)
    assert len(drafts) == 6  # one per step
    assert drafts[0].count(mdlm_pipe.tokenizer.mask_token) > 0
    permanent = re.sub("\0337\033\\[33m.*?\033\\[0m", "", printed, flags=re.S)
    permanent = permanent.replace("\0338\033[J", "")
    assert permanent == mdlm_pipe.tokenizer.decode(_answer(mdlm_pipe, out)) + "\n"


def test_pipe_semi_autoregressive_streamer(mdlm_pipe):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        out = mdlm_pipe.semi_autoregressive_generate(
            PIPE_PROMPT, block_size=10, max_length=60, num_steps=2,
            streamer=transformers.TextDiffusionStreamer(mdlm_pipe.tokenizer, skip_prompt=True),
            generator=torch.Generator().manual_seed(10))
    printed = stdout.getvalue()
    assert len(re.findall("\0337\033\\[33m", printed)) == 6 * 2  # 6 blocks, 2 steps each
    permanent = re.sub("\0337\033\\[33m.*?\033\\[0m", "", printed, flags=re.S)
    assert permanent.replace("\0338\033[J", "") == mdlm_pipe.tokenizer.decode(
        _answer(mdlm_pipe, out)) + "\n"


def test_pipe_streamer_errors(mdlm_pipe, mdlm_tokenizer):
    with pytest.raises(ValueError, match="batch size 1"):
        mdlm_pipe(["the cat", "the dog"], num_steps=2, max_length=20,
                  streamer=transformers.TextStreamer(mdlm_tokenizer))
    with pytest.raises(ValueError, match="streamer= streams one batch"):
        mdlm_pipe(["the cat", "the dog"], num_steps=2, max_length=20, batch_size=1,
                  streamer=Recorder())
    with pytest.raises(TypeError, match="streamer must have a callable put"):
        mdlm_pipe("the cat", num_steps=2, max_length=20, streamer=object())
    from genjo_fast.mdlm import mdlm_generate
    with pytest.raises(ValueError, match="needs pad_id or eos_id"):
        mdlm_generate(mdlm_pipe.model, [[7, 8], [9]], max_length=20, num_steps=2,
                      mask_id=_mdlm().MASK_ID, streamer=Recorder())
