"""genjo-fast serve: the OpenAI-compatible server (genjo_fast.server) and its dynamic batching
(genjo_fast.batching), on localhost through the official ``openai`` client and raw HTTP.

The model is a tiny random LLaDA checkpoint with the character-level chat tokenizer of
``chat_helpers``, built so that its answers vary with the prompt (the LM head is the embedding,
the mask token's embedding is zero: a masked position predicts a mix of the context's tokens)
and end at varied places (EOS's embedding is the space's, slightly larger). The expected
answers come from ``genjo_fast.generate`` run in this process on each prompt alone.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import genjo_fast
from genjo_fast.chat import Settings, load_chat_model, run_sampler

from chat_helpers import EOS_ID, EOT_ID, MASK_ID, char_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install '.[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra")
openai = pytest.importorskip("openai", reason="the server tests use the openai client (.[test])")
httpx = pytest.importorskip("httpx")

from genjo_fast.batching import (MIN_ROWS, Batcher, Job, RowAttention, RowResult,  # noqa: E402
                                 batch_key, left_pad, make_batch_invariant)
from genjo_fast.server import BackgroundServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 512
NAME = "tiny"


def diverse_llada(seed=0):
    """The tests' model (see the module docstring), for ``char_tokenizer()``."""
    from genjo_fast.testing import random_llada

    tokenizer = char_tokenizer()
    model = random_llada(len(tokenizer), d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=128,
                         max_len=CONTEXT, seed=seed, weight_tying=True, mask_token_id=MASK_ID,
                         eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    wte = model.transformer.wte.weight
    with torch.no_grad():
        wte[MASK_ID] = 0
        wte[EOS_ID] = 1.05 * wte[tokenizer.convert_tokens_to_ids(" ")]
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from genjo_fast.models import save_llada

    directory = tmp_path_factory.mktemp("serve-checkpoint")
    save_llada(diverse_llada(), directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The model loaded apart from the server's (no batching wrapper): the answers alone."""
    return load_chat_model(str(checkpoint), device="cpu")


def alone(chat, ids, settings=None):
    """The family's sampler on one prompt alone: the answer's ids up to and including its
    first stop id (what the server returns as ``token_ids``)."""
    settings = settings or Settings()
    out, _ = run_sampler(chat, torch.tensor([ids]), None, settings.keywords(chat))
    answer = out[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(answer) if t in chat.stop_ids), None)
    return answer if stop is None else answer[:stop + 1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(server):
    return httpx.get(server.url + "/stats").json()


def wait_stats(server, condition, timeout=30):
    """The server's counters once ``condition(counters)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        counters = stats(server)
        if condition(counters):
            return counters
        assert time.monotonic() < deadline, f"the counters never got there: {counters}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(checkpoint):
    chat = load_chat_model(str(checkpoint), device="cpu")
    with BackgroundServer(chat, name=NAME, max_batch_size=8, batch_wait_ms=100) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def prompts_of_many_lengths(count, seed=0):
    """``count`` prompt texts of 1 to about 90 characters."""
    g = torch.Generator().manual_seed(seed)
    words = ["Sort: 3 1 2", "Reverse: abc", "add 12 and 30", "hello there", "x y z w"]
    out = []
    for i in range(count):
        n = 1 + (7 * i) % 18
        picks = torch.randint(0, len(words), (n,), generator=g).tolist()
        out.append(" ".join(words[j] for j in picks)[: 1 + (13 * i) % 90])
    return out


def sse_events(response):
    """The ``data:`` payloads of a server-sent event stream (``[DONE]`` as the string)."""
    events, lines = [], []
    for line in response.iter_lines():
        if line:
            lines.append(line)
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), lines
        payload = lines[0][len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
        lines = []
    assert not lines
    return events


# ----------------------------------------------------------------------------------------------
# The batch-invariant forward (library level)
# ----------------------------------------------------------------------------------------------

def test_matrix_product_rows_do_not_depend_on_the_row_count():
    """What the guarantee assumes of this machine's matrix products (batching.MIN_ROWS)."""
    g = torch.Generator().manual_seed(0)
    for n_in, n_out in ((64, 128), (64, 99), (128, 384)):
        weight = torch.randn(n_out, n_in, generator=g)
        rows = torch.randn(300, n_in, generator=g)
        full = F.linear(rows, weight)
        for m in range(MIN_ROWS, 300, 7):
            assert torch.equal(F.linear(rows[:m], weight), full[:m]), (n_in, n_out, m)
            assert torch.equal(F.linear(rows[-m:], weight), full[-m:]), (n_in, n_out, m)


def test_padded_rows_compute_bitwise_what_they_compute_alone():
    model = diverse_llada()
    make_batch_invariant(model)
    make_batch_invariant(model)  # idempotent
    assert all(isinstance(b.attention_dispatch, RowAttention)
               and not isinstance(b.attention_dispatch.inner, RowAttention) for b in model.blocks)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (4, 9, 17, 33, 40, 64)]
    x, mask, positions = left_pad(prompts, EOS_ID, 0)
    batched = model(x, mask, positions=positions).logits
    for row, ids in enumerate(prompts):
        solo = model(torch.tensor([ids])).logits[0]
        assert torch.equal(batched[row, x.shape[1] - len(ids):], solo), len(ids)


def test_row_attention_skips_padding_and_matches_the_call_alone():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 4, 10, 8, generator=g) for _ in range(3))
    key_mask = torch.ones(3, 10, dtype=torch.bool)
    key_mask[0, :3] = False
    key_mask[1, :7] = False
    sdpa = genjo_fast.attention.attention_sdpa
    out = RowAttention(sdpa)(q, k, v, key_mask)
    for row, pad in enumerate((3, 7, 0)):
        assert torch.equal(out[row, :, pad:],
                           sdpa(q[row:row + 1, :, pad:], k[row:row + 1, :, pad:],
                                v[row:row + 1, :, pad:])[0])
        assert not out[row, :, :pad].any()  # padded queries: zeros
    # queries on a cache's rows (fewer than the keys): every query, against the real keys
    out = RowAttention(sdpa)(q[:, :, -4:], k, v, key_mask)
    assert torch.equal(out[1], sdpa(q[1:2, :, -4:], k[1:2, :, 7:], v[1:2, :, 7:])[0])


def test_left_pad_gives_each_row_its_own_positions():
    prompt, mask, positions = left_pad([[5, 6], [7, 8, 9, 10], [11]], EOS_ID, 3)
    assert prompt.tolist() == [[EOS_ID, EOS_ID, 5, 6], [7, 8, 9, 10], [EOS_ID] * 3 + [11]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    assert positions.tolist() == [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6],
                                  [0, 0, 0, 0, 1, 2, 3]]
    prompt, mask, positions = left_pad([[5, 6], [7, 8]], EOS_ID, 3)
    assert prompt.tolist() == [[5, 6], [7, 8]] and mask is None and positions is None


@pytest.mark.parametrize("options", [
    dict(),
    dict(cfg_scale=1.5),
    dict(cache="dual"),
    dict(cache="prefix", refresh_every=3),
    dict(threshold=0.5),
    dict(gen_length=24, steps=12, block_length=8),
], ids=["exact", "cfg", "dual", "prefix", "threshold", "two-per-step"])
def test_generate_with_positions_gives_padded_rows_their_tokens_alone(options):
    model = diverse_llada()
    make_batch_invariant(model)
    tokenizer = char_tokenizer()
    prompts = [tokenizer(t)["input_ids"] for t in prompts_of_many_lengths(12)]
    keywords = dict(dict(gen_length=32, steps=32, block_length=8), **options)
    keywords.update(mask_id=MASK_ID, eos_id=EOS_ID, eot_id=EOT_ID)
    x, mask, positions = left_pad(prompts, EOS_ID, keywords["gen_length"])
    out = genjo_fast.generate(model, x, mask, positions=positions, **keywords)
    for row, ids in enumerate(prompts):
        solo = genjo_fast.generate(model, torch.tensor([ids]), **keywords)
        assert out[row, x.shape[1]:].tolist() == solo[0, len(ids):].tolist(), row


def test_generate_positions_are_checked():
    model = diverse_llada()
    prompt = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=r"positions must have the canvas' shape .*\(1, 11\)"):
        genjo_fast.generate(model, prompt, gen_length=8, steps=8, block_length=8,
                            mask_id=MASK_ID, positions=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="positions must hold integer positions"):
        genjo_fast.generate(model, prompt, gen_length=8, steps=8, block_length=8,
                            mask_id=MASK_ID, positions=torch.zeros(1, 11))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        genjo_fast.generate(model, prompt, gen_length=8, steps=8, block_length=8,
                            mask_id=MASK_ID, positions=torch.full((1, 11), -1))
    with pytest.raises(ValueError, match="positions needs a LLaDA model"):
        genjo_fast.generate(genjo_fast.testing.TinyBidirectionalLM(130, seed=0), prompt,
                            gen_length=8, steps=8, block_length=8, mask_id=129,
                            positions=torch.zeros(1, 11, dtype=torch.long))
    # the default positions 0 .. L-1, given explicitly, change nothing
    kw = dict(gen_length=8, steps=8, block_length=4, mask_id=MASK_ID)
    assert torch.equal(genjo_fast.generate(model, prompt, **kw),
                       genjo_fast.generate(model, prompt, positions=torch.arange(11)[None], **kw))


def test_batch_keys(reference):
    plain = batch_key(reference, Settings(), 10)
    assert plain is not None and plain == batch_key(reference, Settings(), 50)
    assert plain != batch_key(reference, Settings(gen_length=16, steps=16), 10)
    assert plain != batch_key(reference, Settings(temperature=0.5), 10)
    assert batch_key(reference, Settings(seed=3), 10) is None         # its own generator
    assert batch_key(reference, Settings(block_length=2), 10) is None  # too few rows alone
    assert batch_key(reference, Settings(gen_length=2, steps=2, block_length=2), 1) is None


def test_batcher_delivers_each_job_its_own_answer(reference, checkpoint):
    chat = load_chat_model(str(checkpoint), device="cpu")
    batcher = Batcher(chat, max_batch_size=4, batch_wait=0.2)
    tokenizer = chat.tokenizer
    prompts = [tokenizer(t)["input_ids"] for t in prompts_of_many_lengths(10, seed=3)]
    results, updates, lock = {}, {}, threading.Lock()

    def record(index):
        def on_event(event):
            with lock:
                if isinstance(event, RowResult):
                    results[index] = event
                else:
                    assert not isinstance(event, BaseException), event
                    updates.setdefault(index, []).append(event)
        return on_event

    try:
        for index, ids in enumerate(prompts):
            batcher.submit(Job(ids, Settings(), record(index), stream=index % 2 == 0))
        deadline = time.monotonic() + 60
        while len(results) < len(prompts):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        batcher.close(30)
    for index, ids in enumerate(prompts):
        expected = alone(reference, ids)
        assert results[index].ids == expected
        assert results[index].text == tokenizer.decode(
            expected[:-1] if results[index].finish_reason == "stop" else expected,
            skip_special_tokens=True)
        assert (index in updates) == (index % 2 == 0)
    assert max(r.batch_size for r in results.values()) > 1
    stats = batcher.stats()
    assert stats.completed == stats.rows == len(prompts) and stats.largest_batch <= 4
    assert stats.batches < len(prompts) and stats.queued == stats.running == 0
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(Job([5], Settings(), print))


def run_batch(chat, prompts, settings, cancel=(), stream=(), idle=0.0, **options):
    """The prompts through one batcher call (submitted before its wait ends, after ``idle``
    seconds). The jobs in ``stream`` and ``cancel`` stream; those in ``cancel`` are cancelled
    from their first stream update (in the worker: at a known step). ``options``: the
    Batcher's. Returns ``(each job's last event: a RowResult or an exception, batcher
    stats)``."""
    batcher = Batcher(chat, max_batch_size=len(prompts), batch_wait=5, **options)
    time.sleep(idle)
    results, jobs = {}, []

    def record(index):
        def on_event(event):
            if isinstance(event, (RowResult, BaseException)):
                results[index] = event
            elif index in cancel:
                batcher.cancel(jobs[index])
        return on_event

    try:
        for index, ids in enumerate(prompts):
            jobs.append(Job(ids, settings, record(index), stream=index in cancel + stream))
            batcher.submit(jobs[-1])
        deadline = time.monotonic() + 60
        while not (all(j.done or j.cancelled for j in jobs) and all_calls_ended(batcher.stats())):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        batcher.close(30)
    return results, batcher.stats()


def all_calls_ended(stats):
    """Nothing queued and every call started has ended."""
    return stats.queued == 0 and stats.calls_ended == stats.batches


def answers(results):
    """``{index: ids}`` of the jobs answered (each result checked to be an answer)."""
    for event in results.values():
        assert isinstance(event, RowResult), event
    return {index: event.ids for index, event in results.items()}


def test_a_cancelled_row_leaves_its_running_batch(reference, checkpoint):
    """A job cancelled while its batch runs stops computing (drop_rows) and the others still
    get exactly their answers alone."""
    chat = load_chat_model(str(checkpoint), device="cpu")
    tokenizer = chat.tokenizer
    prompts = [tokenizer(t)["input_ids"] for t in prompts_of_many_lengths(4, seed=5)]
    settings = Settings(gen_length=48, steps=48, block_length=48)
    results, whole_stats = run_batch(chat, prompts, settings)
    whole = answers(results)
    assert whole_stats.batches == 1 and whole_stats.largest_batch == 4
    results, stats = run_batch(chat, prompts, settings, cancel=(1, 2))
    got = answers(results)
    assert stats.batches == 1 and stats.cancelled_running == 2 and sorted(got) == [0, 3]
    for index in (0, 3):
        assert got[index] == whole[index] == alone(reference, prompts[index], settings)
    # each cancelled row ran the step that sent its update and the next one, then left
    assert stats.row_forwards < whole_stats.row_forwards
    assert stats.row_forwards == whole_stats.row_forwards - sum(
        forwards - 2 for forwards in row_forwards(reference, prompts, settings, (1, 2)))
    assert stats.row_forwards + stats.row_forwards_saved == 4 * 48


def coordinated(rank, store, checkpoint, prompts, settings, results):
    """A rank of the 2-process test below: rank 0 batches (pinging rank 1 while idle), rank 1
    follows."""
    import torch.distributed as dist

    from genjo_fast import parallel
    from genjo_fast.batching import follow

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        chat = load_chat_model(checkpoint, device="cpu")
        parallel.parallelize(chat.model,
                             shard_lm_head=parallel.splits_lm_head(chat.model, 2))
        coordinator = parallel.Coordinator(chat.model)
        if rank == 0:
            got, stats = run_batch(chat, prompts, settings, cancel=(1,), idle=0.5,
                                   coordinator=coordinator, ping_every=0.05)
            out = dict(ids=answers(got), stats=vars(stats))
        else:
            out = dict(followed=follow(chat, coordinator))
        torch.save(out, os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_batcher_over_a_tensor_parallel_model(reference, checkpoint, tmp_path, family):
    """Batcher + Coordinator on 2 processes (gloo): idle pings, a row cancelled mid-call
    dropped on both ranks (rank 1 follows rank 0's decision: no hang, no mismatch), the other
    rows' answers those of one process alone; closing the batcher releases rank 1. LLaDA's
    three jobs share one call; Dream's run one by one."""
    import torch.multiprocessing as mp

    from chat_helpers import save_dream_checkpoint

    if family == "dream":
        checkpoint = save_dream_checkpoint(tmp_path / "dream")
        reference = load_chat_model(str(checkpoint), device="cpu")
    prompts = [reference.tokenizer(t)["input_ids"] for t in prompts_of_many_lengths(3, seed=2)]
    settings = Settings(gen_length=48, steps=48, block_length=48 if family == "llada" else None)
    mp.start_processes(coordinated, args=(str(tmp_path / "store"), str(checkpoint), prompts,
                                          settings, str(tmp_path)),
                       nprocs=2, start_method="fork")
    leader, follower = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    stats = leader["stats"]
    calls = 1 if family == "llada" else 3
    assert stats["pings"] >= 3 and follower["followed"] == stats["batches"] == calls
    assert stats["cancelled_running"] == 1 and sorted(leader["ids"]) == [0, 2]
    for index in (0, 2):
        assert leader["ids"][index] == alone(reference, prompts[index], settings)
    assert stats["row_forwards"] + stats["row_forwards_saved"] == 3 * 48
    assert stats["row_forwards_saved"] >= 48 - 2  # the cancelled row ran 2 steps


def test_a_failure_in_a_rows_events_fails_that_job_only(reference, checkpoint, monkeypatch):
    """An exception while handling one row's stream events fails that job (its row leaves the
    call) and never aborts the call: its batch-mates get their answers alone. (Under tensor
    parallelism an exception ending rank 0's call alone would leave the others waiting.)"""
    from genjo_fast import batching

    chat = load_chat_model(str(checkpoint), device="cpu")
    prompts = [chat.tokenizer(t)["input_ids"] for t in prompts_of_many_lengths(4, seed=5)]
    settings = Settings(gen_length=48, steps=48, block_length=48)

    def broken(self, answer, still_open=None):
        raise RuntimeError("a broken streamer")

    monkeypatch.setattr(batching.StreamAdapter, "step", broken)
    results, stats = run_batch(chat, prompts, settings, stream=(2,))
    assert isinstance(results[2], RuntimeError) and "broken streamer" in str(results[2])
    got = answers({i: r for i, r in results.items() if i != 2})
    for index in (0, 1, 3):
        assert got[index] == alone(reference, prompts[index], settings)
    assert stats.failed == 1 and stats.completed == 3 and stats.calls_ended == 1
    assert stats.row_forwards_saved >= 48 - 1  # the failed row left after its first step


def row_forwards(chat, prompts, settings, rows):
    """The forwards each of ``rows`` runs in the batch with stop_at_eos (alone: the same,
    rows are independent): one per step until its answer is settled."""
    out = []
    for row in rows:
        _, stats = genjo_fast.generate(chat.model, torch.tensor([prompts[row]]),
                                       stop_at_eos=True, return_stats=True,
                                       **settings.keywords(chat))
        out.append(stats.row_forwards)
    return out


# ----------------------------------------------------------------------------------------------
# The HTTP API
# ----------------------------------------------------------------------------------------------

def test_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME] and models[0].owned_by == "genjo_fast"
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completion_and_chat_answers_are_generate_alone(client, reference):
    tokenizer = reference.tokenizer
    out = client.completions.create(model=NAME, prompt="Sort: 3 1 2", max_tokens=16,
                                    extra_body={"return_token_ids": True, "steps": 8})
    ids = tokenizer("Sort: 3 1 2")["input_ids"]
    expected = alone(reference, ids, Settings(gen_length=16, steps=8))
    choice = out.choices[0]
    assert choice.token_ids == expected
    assert choice.finish_reason == ("stop" if expected[-1] in reference.stop_ids else "length")
    assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(expected) - (choice.finish_reason == "stop")
    # several prompts: one choice each, in order
    many = client.completions.create(model=NAME, prompt=["Reverse: abc", "hi"], max_tokens=8)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[1].text == tokenizer.decode(
        alone(reference, tokenizer("hi")["input_ids"], Settings(gen_length=8, steps=8)),
        skip_special_tokens=True)
    # chat: the prompt through the chat template
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Sort: 3 1 2"}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16,
                                           extra_body={"return_token_ids": True})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = alone(reference, tokenizer(text, add_special_tokens=False)["input_ids"],
                     Settings(gen_length=16, steps=16))
    assert reply.choices[0].token_ids == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == tokenizer.decode(expected,
                                                                skip_special_tokens=True)
    # a seed makes a sampled answer reproducible; a higher temperature changes it
    sampled = [client.completions.create(model=NAME, prompt="hello", max_tokens=32,
                                         temperature=2.0, seed=7).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_are_batched_and_each_gets_its_tokens_alone(server, reference):
    """The guarantee: at temperature 0, concurrent requests (batched together, different
    prompt lengths, streaming or not, two groups of options) get exactly their tokens alone."""
    tokenizer = reference.tokenizer
    texts = prompts_of_many_lengths(40, seed=5)
    groups = [dict(max_tokens=32), dict(max_tokens=16, steps=8, block_length=8)]
    before = stats(server)

    def request(index):
        body = dict(model=NAME, prompt=texts[index], return_token_ids=True,
                    **groups[index % 2])
        if index % 3 == 0:  # streaming
            body["stream"] = True
            with httpx.stream("POST", server.url + "/v1/completions", json=body,
                              timeout=120) as response:
                assert response.status_code == 200
                events = sse_events(response)
            assert events[-1] == "[DONE]"
            final = events[-2]["choices"][0]
            text = "".join(e["choices"][0]["text"] for e in events[:-1])
            return index, final["token_ids"], text
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return index, choice["token_ids"], choice["text"]

    with ThreadPoolExecutor(len(texts)) as pool:
        answers = list(pool.map(request, range(len(texts))))
    reasons = set()
    for index, ids, text in answers:
        group = groups[index % 2]
        settings = Settings(gen_length=group["max_tokens"],
                            steps=group.get("steps", group["max_tokens"]),
                            block_length=group.get("block_length"))
        expected = alone(reference, tokenizer(texts[index])["input_ids"], settings)
        assert ids == expected, index
        stopped = expected[-1] in reference.stop_ids
        reasons.add(stopped)
        assert text == tokenizer.decode(expected[:-1] if stopped else expected,
                                        skip_special_tokens=True)
    assert reasons == {True, False}  # answers that ended (settled early) and that ran out
    after = stats(server)
    batches, rows = after["batches"] - before["batches"], after["rows"] - before["rows"]
    assert rows == len(texts) and batches < rows and after["largest_batch"] > 1
    assert after["completed"] - before["completed"] == len(texts)


def test_stream_format(server, client, reference):
    body = dict(model=NAME, prompt="Sort: 3 1 2", max_tokens=16, steps=16, block_length=16)
    plain = httpx.post(server.url + "/v1/completions", json=body).json()
    with httpx.stream("POST", server.url + "/v1/completions",
                      json=dict(body, stream=True, stream_options={"include_usage": True})
                      ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    usage, final, steps = events[-2], events[-3], events[:-3]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    assert final["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert final["choices"][0]["draft"] == ""
    assert all(e["choices"][0]["finish_reason"] is None for e in steps)
    assert all(e["id"] == events[0]["id"] and e["object"] == "text_completion"
               for e in events[:-1])
    # the texts concatenate to the answer; drafts show the masked positions
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == plain["choices"][0]["text"]
    assert "\u2591" in steps[0]["choices"][0]["draft"]
    assert steps[0]["choices"][0]["draft"].count("\u2591") == 15  # one token per step
    for e in steps:  # confirmed text + draft: the whole answer so far, one char per token
        assert len(e["choices"][0]["draft"]) <= 16
    # chat, through the openai client: a role chunk, then content deltas with drafts
    chunks = list(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Sort: 3 1 2"}], max_tokens=16,
        stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    reply = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Sort: 3 1 2"}], max_tokens=16)
    assert content == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert any("\u2591" in c.choices[0].model_extra["draft"] for c in chunks[1:])


BAD_REQUESTS = [
    # (endpoint, raw body, status, words the message must hold)
    ("completions", b'{"prompt": "hi", ', 400, "malformed JSON"),
    ("completions", b"", 400, "malformed JSON"),
    ("completions", b"[1, 2]", 400, "must be a JSON object"),
    ("completions", b'{"prompt": "hi", "bogus": 1}', 400, "unknown field 'bogus'"),
    ("completions", b'{"prompt": "hi", "logprobs": 2}', 400, "unknown field 'logprobs'"),
    ("completions", b'{"max_tokens": 8}', 400, "prompt is required"),
    ("completions", b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    ("completions", b'{"prompt": "hi", "max_tokens": "8"}', 400, "max_tokens"),
    ("completions", b'{"prompt": "hi", "max_tokens": 8.5}', 400, "max_tokens"),
    ("completions", b'{"prompt": "hi", "temperature": -0.5}', 400, "temperature"),
    ("completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("completions", b'{"prompt": "hi", "temperature": Infinity}', 400, "finite"),
    ("completions", b'{"prompt": "hi", "threshold": 1.5}', 400, "threshold"),
    ("completions", b'{"prompt": "hi", "factor": 0}', 400, "factor"),
    ("completions", b'{"prompt": "hi", "cache": "full"}', 400, "cache"),
    ("completions", b'{"prompt": "hi", "remasking": "best"}', 400, "remasking"),
    ("completions", b'{"prompt": "hi", "refresh_every": 2}', 400, "refresh_every needs a cache"),
    ("completions", b'{"prompt": "hi", "threshold": 0.5, "factor": 1}', 400, "exclusive"),
    ("completions", b'{"prompt": "hi", "stream": "yes"}', 400, "stream"),
    ("completions", b'{"prompt": "hi", "n": 2}', 400, "n must be 1"),
    ("completions", b'{"prompt": "hi", "max_tokens": 40, "block_length": 16}', 400,
     "multiple of block_length"),
    ("completions", b'{"prompt": "hi", "max_tokens": 8, "steps": 9}', 400,
     "steps (9) must be <= max_tokens (8)"),
    ("completions", b'{"prompt": "hi", "max_tokens": 32, "steps": 10}', 400,
     "steps (10) must be a multiple of the number of blocks"),
    ("completions", b'{"prompt": "hi", "top_k": 5}', 400, "top_k is not an option of LLaDA"),
    ("completions", b'{"prompt": ""}', 400, "prompt is empty"),
    ("completions", b'{"prompt": []}', 400, "empty list"),
    ("completions", b'{"prompt": ["ok", ""]}', 400, "prompt[1] is empty"),
    ("completions", b'{"prompt": [1, 2]}', 400, "prompt"),
    ("completions", b'{"prompt": "a <|mask|> b"}', 400, "mask token"),
    ("completions", b'{"prompt": "hi", "max_tokens": 600}', 400, "context of 512"),
    ("completions", json.dumps({"prompt": "x" * 500, "max_tokens": 32}).encode(), 400,
     "532 tokens, more than the model's context of 512"),
    ("completions", b'{"prompt": "hi", "model": "gpt-4"}', 404, "model 'gpt-4' does not exist"),
    ("chat/completions", b'{"messages": []}', 400, "messages is empty"),
    ("chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}', 400,
     "messages.0.role"),
    ("chat/completions", b'{"messages": [{"role": "user"}]}', 400, "content is required"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi", "x": 1}]}', 400,
     "unknown field 'messages.0.x'"),
    ("chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, '
     b'"max_completion_tokens": 16}', 400, "differ"),
    ("chat/completions", b'{"prompt": "hi"}', 400, "unknown field 'prompt'"),
]


@pytest.mark.parametrize("endpoint, body, status, words", BAD_REQUESTS,
                         ids=[f"{i}-{words[:24]}" for i, (_, _, _, words) in
                              enumerate(BAD_REQUESTS)])
def test_bad_requests_get_a_clear_4xx(server, endpoint, body, status, words):
    response = httpx.post(f"{server.url}/v1/{endpoint}", content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"], error["message"]
    assert error["type"] == "invalid_request_error"


def test_bad_requests_through_the_openai_client_and_the_server_survives(client, server):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="unknown field 'bogus'"):
        client.chat.completions.create(model=NAME, messages=messages,
                                       extra_body={"bogus": True})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="context") as error:
        client.chat.completions.create(model=NAME, messages=[
            {"role": "user", "content": "y" * 600}])
    assert error.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="nope", prompt="hi")
    assert error.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="hi", temperature=-1, stream=True)
    # still serving
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=8).choices[0]
    counters = stats(server)
    assert counters["failed"] == 0 and counters["queued"] == 0


def long_request(**extra):
    """A request that takes about a second on the tiny model (one 448-token block)."""
    return dict(model=NAME, prompt="Sort: 3 1 2", max_tokens=448, steps=448, block_length=448,
                **extra)


def test_a_client_leaving_mid_stream_frees_its_row(server):
    before = stats(server)
    with httpx.stream("POST", server.url + "/v1/completions",
                      json=long_request(stream=True)) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the first step arrived: leave
    after = wait_stats(server, lambda s: s["calls_ended"] > before["calls_ended"])
    assert after["cancelled_running"] == before["cancelled_running"] + 1
    assert after["running"] == 0 and after["queued"] == 0
    assert after["steps"] - before["steps"] < 448  # the call stopped: its only row was gone
    assert after["row_forwards_saved"] - before["row_forwards_saved"] > 400
    assert after["completed"] == before["completed"] and after["failed"] == before["failed"]
    assert httpx.post(server.url + "/v1/completions",
                      json=dict(prompt="hi", max_tokens=8)).status_code == 200


def test_a_client_leaving_while_waiting_frees_its_row(server):
    """Non-streaming: a client gone while its answer is computed (stopping the call), and one
    gone while it is queued (never computed)."""
    before = stats(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=long_request(), timeout=0.5)
    after = wait_stats(server, lambda s: s["calls_ended"] > before["calls_ended"])
    assert after["cancelled_running"] == before["cancelled_running"] + 1
    # seeded requests run alone: the second waits behind the first, and leaves
    first = threading.Thread(target=httpx.post, args=(server.url + "/v1/completions",),
                             kwargs=dict(json=long_request(seed=1), timeout=60))
    first.start()
    wait_stats(server, lambda s: s["running"] == 1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=long_request(seed=2), timeout=0.3)
    first.join()
    done = wait_stats(server, lambda s: s["cancelled_queued"] > after["cancelled_queued"])
    assert done["batches"] == after["batches"] + 1  # the second never ran
    assert done["completed"] == after["completed"] + 1


def test_serve_flags_are_checked(checkpoint, capsys):
    from genjo_fast.cli import main

    for flag, value in (("--max-batch-size", "0"), ("--max-queue", "0"),
                        ("--batch-wait-ms", "-1")):
        assert main(["serve", "--model", str(checkpoint), flag, value]) == 2
        assert f"{flag} must be >= " in capsys.readouterr().err


def wait_until_serving(process, port, timeout=180):
    """The server's URL once its /health answers (the process must keep running)."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.communicate()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "genjo-fast serve did not start"
        time.sleep(0.2)


def test_genjo_fast_serve_command(checkpoint):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "genjo_fast.cli", "serve", "--model", str(checkpoint),
         "--port", str(port), "--threads", "1", "--served-model-name", NAME,
         "--max-batch-size", "4", "--batch-wait-ms", "5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = wait_until_serving(process, port)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert f"as '{NAME}' on http://127.0.0.1:{port}/v1" in stderr


def worker_ranks(parent: int):
    """``{rank: pid}`` of a torchrun process's workers (read from Linux's /proc)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                env = (entry / "environ").read_bytes().split(b"\0")
                ranks[next(int(e[5:]) for e in env if e.startswith(b"RANK="))] = int(entry.name)
        except (OSError, StopIteration, ValueError):
            continue  # gone, or not ours
    return ranks


def test_a_port_in_use_is_a_clear_error(checkpoint, capsys):
    from genjo_fast.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(checkpoint), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_under_torchrun_exits_when_rank_0_cannot_listen(checkpoint):
    """Rank 0 fails to bind its port: it says so, releases rank 1, and the run ends."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", "-m", "genjo_fast.cli", "serve", "--model", str(checkpoint), "--port",
             str(port)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
            capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr, run.stderr


@pytest.mark.slow
def test_serve_under_torchrun(checkpoint, reference):
    """``torchrun --nproc_per_node 2 -m genjo_fast.cli serve``: the model split over 2 CPU
    processes (gloo), rank 0 serving. Concurrent requests are batched and each gets its
    answer alone (that of one process); a client leaving mid-stream drops its row from the
    running batch on both ranks (its batch-mate's answer unchanged, the server still serving);
    Ctrl-C on rank 0 stops the server and releases rank 1: every process exits with 0."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", "-m", "genjo_fast.cli", "serve", "--model", str(checkpoint), "--port", str(port),
         "--served-model-name", NAME, "--max-batch-size", "8", "--batch-wait-ms", "300",
         "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = wait_until_serving(process, port)
        tokenizer = reference.tokenizer
        texts = prompts_of_many_lengths(6, seed=7)

        def ask(body):
            response = httpx.post(url + "/v1/completions", timeout=300, json=dict(
                model=NAME, return_token_ids=True, **body))
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(len(texts)) as pool:
            batched = list(pool.map(lambda t: ask(dict(prompt=t, max_tokens=32)), texts))
        assert httpx.get(url + "/stats").json()["largest_batch"] > 1
        for text, got in zip(texts, batched):
            expected = alone(reference, tokenizer(text)["input_ids"])
            assert got == ask(dict(prompt=text, max_tokens=32)) == expected, text

        # a client leaving its batch mid-stream; its batch-mate runs on
        batches = httpx.get(url + "/stats").json()["batches"]
        long = dict(max_tokens=448, steps=448, block_length=448)
        with ThreadPoolExecutor(1) as pool:
            mate = pool.submit(ask, dict(prompt="Reverse: abc", **long))
            with httpx.stream("POST", url + "/v1/completions", timeout=300, json=dict(
                    model=NAME, prompt="Sort: 3 1 2", stream=True, **long)) as response:
                assert next(response.iter_lines()).startswith("data: ")
            settings = Settings(gen_length=448, steps=448, block_length=448)
            assert mate.result() == alone(reference, tokenizer("Reverse: abc")["input_ids"],
                                          settings)
        counters = httpx.get(url + "/stats").json()
        assert counters["cancelled_running"] == 1 and counters["failed"] == 0
        assert counters["batches"] == batches + 1  # the two shared one call
        assert counters["row_forwards_saved"] > 300  # the cancelled row left early
        assert ask(dict(prompt="hi", max_tokens=8))  # still serving
        ranks = worker_ranks(process.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[0], signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "split over 2 ranks (cpu)" in stderr and "Traceback" not in stderr, stderr


def test_dream_requests_run_alone(tmp_path):
    from chat_helpers import save_dream_checkpoint

    chat = load_chat_model(str(save_dream_checkpoint(tmp_path / "dream")), device="cpu")
    settings = Settings(gen_length=8, steps=8)
    assert batch_key(chat, settings, 10) is None
    prompts = [chat.tokenizer(t)["input_ids"] for t in ("Sort: 3 1 2", "hi")]
    results = {}
    batcher = Batcher(chat, max_batch_size=8, batch_wait=0.1)
    try:
        for index, ids in enumerate(prompts):
            batcher.submit(Job(ids, settings, lambda e, i=index: results.setdefault(i, e)))
        deadline = time.monotonic() + 60
        while len(results) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        batcher.close(30)
    for index, ids in enumerate(prompts):
        out = genjo_fast.diffusion_generate(chat.model, torch.tensor([ids]),
                                            **settings.keywords(chat))
        answer = out[0, len(ids):].tolist()
        stop = next((i for i, t in enumerate(answer) if t in chat.stop_ids), None)
        assert isinstance(results[index], RowResult) and results[index].batch_size == 1
        assert results[index].ids == (answer if stop is None else answer[:stop + 1])
