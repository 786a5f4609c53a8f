"""``genjo-fast serve`` under load: dynamic batching vs one request at a time, side by side.

A bounded load test (issue 16, item 3): ``CLIENTS`` concurrent clients send ``REQUESTS``
completions in all (each client its share, one after the other) to a server on localhost,
through HTTP; every answer is checked against ``genjo_fast.generate`` on its prompt alone
(none lost, none mixed up: each request's ``token_ids`` are its own prompt's), then the
throughput of the two servers is compared. Both serve the same model in this process
(``genjo_fast.server.BackgroundServer``): ``batched`` (batches of up to 16 requests, 10 ms
wait) and ``one at a time`` (``max_batch_size=1``: each request is its own call).

Model: a tiny random LLaDA model (2 layers, d_model 64, 4 heads; the shipped ``tiny-chat`` has
4 layers of d_model 128) with genjo_fast's chat tokenizer; prompts of 8 to about 70
characters, answers of 32 tokens in 32 steps (blocks of 8), temperature 0. Quick mode: 16
clients, 48 requests.
Run with ``pytest benchmarks/test_bench_serve.py --benchmark-only -s``.
"""
import asyncio

import pytest
import torch

import genjo_fast
from harness import quick

pytest.importorskip("transformers")
pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install '.[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra")
httpx = pytest.importorskip("httpx")

CLIENTS = quick(64, 16)
REQUESTS = quick(256, 48)
PROMPTS = 64  # distinct prompts; request i asks for prompt i % PROMPTS
ANSWER = dict(max_tokens=32, steps=32, block_length=8)


def tiny_chat():
    """A :class:`genjo_fast.chat.ChatModel`: a tiny random LLaDA model and the chat
    tokenizer."""
    from genjo_fast.chat import chat_model
    from genjo_fast.testing import random_llada
    from genjo_fast.tokenizer import build_tokenizer, special_ids

    tokenizer = build_tokenizer()
    ids = special_ids(tokenizer)
    model = random_llada(len(tokenizer), d_model=64, n_heads=4, n_layers=2,
                         mlp_hidden_size=192, max_len=256, seed=0,
                         mask_token_id=ids["mask_id"], eos_token_id=ids["eos_id"],
                         pad_token_id=ids["pad_id"])
    return chat_model(model, tokenizer, "llada", "tiny")


def prompt_texts():
    g = torch.Generator().manual_seed(0)
    words = ["Sort: 3 1 2", "Reverse: abc def", "What is 12 plus 30?", "hello", "7 5 9 1"]
    out = []
    for i in range(PROMPTS):
        picks = torch.randint(0, len(words), (1 + i % 6,), generator=g).tolist()
        out.append(" ".join(words[j] for j in picks)[: 8 + (11 * i) % 64])
    return out


def load_test(url: str, texts, requests: int, clients: int):
    """``requests`` completions from ``clients`` concurrent clients; returns, per request
    index, its answer's ids, and the per-request latencies."""
    async def main():
        answers, latencies = {}, []
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     limits=httpx.Limits(max_connections=clients)) as http:
            async def client(first):
                for index in range(first, requests, clients):
                    start = asyncio.get_running_loop().time()
                    response = await http.post("/v1/completions", json=dict(
                        prompt=texts[index % PROMPTS], return_token_ids=True, **ANSWER))
                    response.raise_for_status()
                    latencies.append(asyncio.get_running_loop().time() - start)
                    answers[index] = response.json()["choices"][0]["token_ids"]
            await asyncio.gather(*(client(c) for c in range(clients)))
        return answers, latencies
    return asyncio.run(main())


def test_bench_serve(bench):
    from genjo_fast.chat import Settings
    from genjo_fast.server import BackgroundServer

    chat = tiny_chat()
    texts = prompt_texts()
    settings = Settings(gen_length=ANSWER["max_tokens"], steps=ANSWER["steps"],
                        block_length=ANSWER["block_length"])
    expected = []
    for text in texts:
        ids = chat.tokenizer(text)["input_ids"]
        out = genjo_fast.generate(chat.model, torch.tensor([ids]), **settings.keywords(chat))
        answer = out[0, len(ids):].tolist()
        stop = next((i for i, t in enumerate(answer) if t in chat.stop_ids), None)
        expected.append(answer if stop is None else answer[:stop + 1])
    bench.describe(dict(clients=CLIENTS, requests=REQUESTS), clients=CLIENTS,
                   requests=REQUESTS, distinct_prompts=PROMPTS,
                   model="LLaDA, 2 layers, d_model 64, random weights", temperature=0.0, **ANSWER,
                   max_batch_size=16, batch_wait_ms=10)
    latencies = {}
    with BackgroundServer(chat, max_batch_size=1, batch_wait_ms=0) as alone, \
            BackgroundServer(chat, max_batch_size=16, batch_wait_ms=10) as batched:
        servers = {"one at a time": alone, "batched": batched}

        def side(name, requests, clients):
            def run():
                answers, latencies[name] = load_test(servers[name].url, texts, requests,
                                                     clients)
                return answers
            return run

        sides = bench.measure({name: side(name, REQUESTS, CLIENTS) for name in servers},
                              repeats=1,
                              warmup_sides={name: side(name, 16, 16) for name in servers})
        counters = {name: httpx.get(server.url + "/stats").json()
                    for name, server in servers.items()}
    for name, result in sides.items():
        answers = result.out
        bench.check(sorted(answers) == list(range(REQUESTS)),
                    f"{name}: every one of the {REQUESTS} requests answered (none lost)")
        bench.check(all(answers[i] == expected[i % PROMPTS] for i in range(REQUESTS)),
                    f"{name}: each answer's tokens are its own prompt's alone (none mixed)")
        bench.figure(f"{name} requests/s", REQUESTS / result.median, "req/s")
        ordered = sorted(latencies[name])
        bench.figure(f"{name} p50 latency", ordered[len(ordered) // 2], "s")
        bench.figure(f"{name} p95 latency", ordered[int(0.95 * (len(ordered) - 1))], "s")
        bench.check(counters[name]["failed"] == 0, f"{name}: no request failed")
    bench.figure("batched: mean rows per call",
                 counters["batched"]["rows"] / counters["batched"]["batches"], "rows")
    bench.ratio("throughput batched vs one at a time", "one at a time", "batched",
                target=1.3)
