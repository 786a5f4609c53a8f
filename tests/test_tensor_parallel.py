"""Tensor parallelism (genjo_fast.parallel) on CPU: 2 processes, the gloo backend.

Both ranks run the same calls on the parallel models; the parent process runs them on the
same models unsplit. fp32 logits and likelihoods equal the single process's to 1e-5; the
tokens of generate and diffusion_generate (temperature 0, temperature 1 with a generator or
with the default RNG seeded differently per rank before parallelize, the block cache) are
identical; and every rank's results are bitwise the same.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

import genjo_fast
from genjo_fast import parallel, parallel_demo
from genjo_fast.chat import Settings
from genjo_fast.models import load_llada, save_llada
from genjo_fast.testing import random_dream, random_llada, random_prompts

WORLD = 2
VOCAB, MASK_ID, PAD_ID = 96, 95, 94
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_models():
    """name -> (full model, parallelize keywords). GQA everywhere (4 query heads, 2 kv)."""
    llada = random_llada(VOCAB, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                         mlp_hidden_size=48, seed=0)
    dream = random_dream(VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, intermediate_size=48, seed=1,
                         mask_token_id=MASK_ID, pad_token_id=PAD_ID)
    tied = random_dream(VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=1, intermediate_size=48, seed=2,
                        mask_token_id=MASK_ID, pad_token_id=PAD_ID, tie_word_embeddings=True)
    whole_head = random_llada(VOCAB, d_model=32, n_heads=2, n_kv_heads=2, n_layers=1,
                              mlp_hidden_size=48, seed=3)
    with torch.no_grad():  # peaked distributions: varied choices, few near-ties
        llada.transformer.ff_out.weight.mul_(8)
        dream.lm_head.weight.mul_(8)
    return {"llada": (llada, {}), "dream": (dream, {}), "tied": (tied, {}),
            "whole_head": (whole_head, {"shard_lm_head": False})}


def prompts(batch=2, seed=0):
    return random_prompts(batch, 6, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID, PAD_ID), seed=seed)


def generate_kw(**kw):
    return {**dict(steps=8, gen_length=8, block_length=4, mask_id=MASK_ID), **kw}


def dream_kw(**kw):
    return {**dict(max_new_tokens=8, steps=8, mask_token_id=MASK_ID), **kw}


def seeded(seed=5):
    return torch.Generator().manual_seed(seed)


def scenarios(models):
    """name -> result tensor, the same calls in the same order in every process."""
    llada, dream, tied, whole = (models[k][0] for k in ("llada", "dream", "tied", "whole_head"))
    x, mask = prompts()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = {}
    with torch.no_grad():
        out["llada_logits"] = llada(x, attention_mask=mask).logits
        out["llada_logits_slice"] = llada(x, logits_slice=slice(2, 5)).logits
        out["dream_logits"] = dream(x, attention_mask=mask, position_ids=positions).logits
        out["tied_logits"] = tied(x, attention_mask=mask).logits
        out["whole_head_logits"] = whole(x, attention_mask=mask).logits
    # The default RNG first: every rank seeded it differently before parallelize.
    out["llada_default_rng"] = genjo_fast.generate(llada, x, mask, temperature=1.0,
                                                   **generate_kw())
    out["llada_t0"] = genjo_fast.generate(llada, x, mask, **generate_kw())
    out["llada_t1"] = genjo_fast.generate(llada, x, mask, temperature=1.0, remasking="random",
                                          generator=seeded(), **generate_kw())
    out["llada_cfg"] = genjo_fast.generate(llada, x, mask, cfg_scale=1.0, **generate_kw())
    for cache in ("prefix", "dual"):
        out[f"llada_{cache}"] = genjo_fast.generate(llada, x, mask, cache=cache,
                                                    temperature=0.5, generator=seeded(),
                                                    **generate_kw())
    out["llada_dual_threshold"] = genjo_fast.generate(llada, x, mask, cache="dual",
                                                      threshold=0.3, **generate_kw())
    out["dream_t0"] = genjo_fast.diffusion_generate(dream, x, attention_mask=mask,
                                                    alg="entropy", **dream_kw())
    out["dream_t1"] = genjo_fast.diffusion_generate(dream, x, attention_mask=mask,
                                                    temperature=1.0, top_p=0.9, alg="origin",
                                                    generator=seeded(), **dream_kw())
    out["dream_dual"] = genjo_fast.diffusion_generate(dream, x, attention_mask=mask,
                                                      block_length=4, cache="dual",
                                                      alg="maskgit_plus", **dream_kw())
    out["whole_head_t0"] = genjo_fast.generate(whole, x, mask, **generate_kw())
    prompt, answer = x[1, 1:], torch.tensor([3, 7, 11, 19, 23])
    out["likelihood"] = torch.tensor(genjo_fast.get_log_likelihood(
        llada, prompt, answer, mc_num=8, batch_size=4, mask_id=MASK_ID, generator=seeded()),
        dtype=torch.float64)
    out["likelihood_cfg"] = torch.tensor(genjo_fast.get_log_likelihood(
        llada, prompt, answer, mc_num=8, batch_size=4, cfg_scale=0.5, mask_id=MASK_ID,
        generator=seeded()), dtype=torch.float64)
    return out


def led_generate(model, prompt, attention_mask, seed, **kw):
    """What a server's request runs on every rank (the Coordinator's fn)."""
    return genjo_fast.generate(model, prompt, attention_mask, generator=seeded(seed), **kw)


def save_checkpoint(path):
    """A random LLaDA with genjo_fast's character tokenizer (125 ids, 128 embedding rows)."""
    tokenizer = pytest.importorskip("genjo_fast.tokenizer").build_tokenizer()
    model = random_llada(len(tokenizer), d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                         mlp_hidden_size=48, seed=4, embedding_size=128,
                         mask_token_id=tokenizer.mask_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    save_llada(model, path)
    tokenizer.save_pretrained(path)


DEMO_SETTINGS = Settings(gen_length=8, steps=8, temperature=1.0, seed=3)


def worker(rank, store_file, checkpoint, results):
    torch.set_num_threads(1)
    os.environ["GENJO_FAST_ATTENTION"] = "sdpa"
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                            world_size=WORLD)
    try:
        models = build_models()
        torch.manual_seed(100 + rank)  # parallelize gives every rank rank 0's RNG state
        models["whole_head"][1]["group"] = init_device_mesh("cpu", (WORLD,))  # a mesh works
        for model, kw in models.values():
            parallel.parallelize(model, **kw)
        out = scenarios(models)
        llada = models["llada"][0]
        out["same_on_all_ranks"] = torch.tensor([
            parallel.same_on_all_ranks(out[k]) for k in ("llada_logits", "dream_logits",
                                                         "llada_t1", "dream_dual")])
        out["kv_heads_per_rank"] = torch.tensor([b.n_kv_heads for b in llada.blocks])
        try:
            parallel.parallelize(llada)
        except ValueError as error:
            out["twice"] = str(error)
        try:
            parallel.parallelize(build_models()["llada"][0],
                                 group=init_device_mesh("cpu", (1, WORLD)))
        except ValueError as error:
            out["mesh_2d"] = str(error)
        loaded = parallel.load_parallel(checkpoint, dtype=torch.float32)
        x, mask = prompts()
        with torch.no_grad():
            out["loaded_logits"] = loaded(x, attention_mask=mask).logits
        out["demo_answer"] = parallel_demo.answer(checkpoint, "Sort: 3 1 2", None,
                                                  DEMO_SETTINGS, torch.device("cpu"))[0]
        with parallel.Coordinator(llada) as coordinator:
            if coordinator.is_leader:
                out["led"] = coordinator.run(led_generate, x, mask, 7, temperature=1.0,
                                             **generate_kw())
                try:
                    coordinator.run(led_generate, x, mask, 7, **generate_kw(block_length=3))
                except ValueError as error:
                    out["led_error"] = str(error)
                out["led_after_error"] = coordinator.run(led_generate, x, mask, 8,
                                                         **generate_kw(temperature=1.0))
            else:
                out["followed"] = coordinator.follow()
        coordinator.close()  # a second close does nothing (rank 1 has left)
        if coordinator.is_leader:
            try:
                coordinator.run(led_generate, x, mask, 7, **generate_kw())
            except RuntimeError as error:
                out["run_after_close"] = str(error)
        # rank 0's host-side decision, every rank's (its errors too)
        out["decided"] = parallel.decided_by_leader(
            llada, (lambda: ["drop", 3]) if rank == 0 else None)()
        try:
            parallel.decided_by_leader(llada, (lambda: 1 // 0) if rank == 0 else None)()
        except ZeroDivisionError:
            out["decide_error"] = True
        torch.save(out, os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(rank results, single-process results, full models)``."""
    tmp = tmp_path_factory.mktemp("tp")
    models = build_models()
    save_checkpoint(tmp / "llada")
    # Forked, the workers start with the parent's modules imported (torch, transformers).
    mp.start_processes(worker, args=(str(tmp / "store"), str(tmp / "llada"), str(tmp)),
                       nprocs=WORLD, start_method="fork")
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    os.environ["GENJO_FAST_ATTENTION"] = "sdpa"
    try:
        torch.manual_seed(100)
        single = scenarios(models)
        x, mask = prompts()
        single["led"] = led_generate(models["llada"][0], x, mask, 7, temperature=1.0,
                                     **generate_kw())
        single["led_after_error"] = led_generate(models["llada"][0], x, mask, 8,
                                                 **generate_kw(temperature=1.0))
        loaded = load_llada(tmp / "llada", dtype=torch.float32)
        with torch.no_grad():
            single["loaded_logits"] = loaded(x, attention_mask=mask).logits
        single["demo_answer"] = one_process_answer(loaded, tmp / "llada")
    finally:
        del os.environ["GENJO_FAST_ATTENTION"]
    return ranks, single, models


LOGITS = ["llada_logits", "llada_logits_slice", "dream_logits", "tied_logits",
          "whole_head_logits", "likelihood", "likelihood_cfg"]
TOKENS = ["llada_default_rng", "llada_t0", "llada_t1", "llada_cfg", "llada_prefix",
          "llada_dual", "llada_dual_threshold", "dream_t0", "dream_t1", "dream_dual",
          "whole_head_t0"]


@pytest.mark.parametrize("name", LOGITS)
def test_logits_equal_single_process(runs, name):
    ranks, single, _ = runs
    for out in ranks:
        assert out[name].shape == single[name].shape
        torch.testing.assert_close(out[name], single[name], rtol=0, atol=1e-5)
    assert torch.equal(ranks[0][name], ranks[1][name])  # every rank sees the same bits


@pytest.mark.parametrize("name", TOKENS)
def test_tokens_identical(runs, name):
    ranks, single, _ = runs
    for out in ranks:
        assert torch.equal(out[name], single[name]), name
    assert not (single[name][:, 6:] == MASK_ID).any()  # a finished answer, not a no-op


def test_random_choices_matter(runs):
    """The T > 0 cases are sensitive to the draws: another generator changes their tokens
    (so equal tokens mean equal draws on every rank)."""
    _, single, models = runs
    x, mask = prompts()
    other = genjo_fast.generate(models["llada"][0], x, mask, temperature=1.0,
                                remasking="random", generator=seeded(6), **generate_kw())
    assert not torch.equal(other, single["llada_t1"])
    assert not torch.equal(single["llada_default_rng"], single["llada_t0"])


def test_ranks_hold_their_share(runs):
    ranks, _, _ = runs
    for out in ranks:
        assert out["same_on_all_ranks"].all()
        assert out["kv_heads_per_rank"].tolist() == [1, 1]  # 2 kv heads over 2 ranks
        assert "already parallelised" in out["twice"]
        assert "one-dimensional" in out["mesh_2d"]


def one_process_answer(model, path):
    """The chat apps' path through one process: template, sampler, decoded answer."""
    from transformers import AutoTokenizer

    from genjo_fast.chat import (Conversation, _quiet_transformers, answer_text, chat_model,
                                 run_sampler)

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
    chat = chat_model(model, tokenizer, "llada", str(path))
    ids, _, _ = Conversation(chat).prompt("Sort: 3 1 2", DEMO_SETTINGS.gen_length)
    out, _ = run_sampler(chat, torch.tensor([ids]), None, DEMO_SETTINGS.keywords(chat))
    return answer_text(chat, out[0, len(ids):].tolist())


def test_load_parallel(runs):
    ranks, single, _ = runs
    for out in ranks:
        torch.testing.assert_close(out["loaded_logits"], single["loaded_logits"], rtol=0,
                                   atol=1e-5)


def test_demo_answer(runs):
    """The launcher's checkpoint path (load_parallel, the tokenizer's chat template, the
    sampler) answers as one process does."""
    ranks, single, _ = runs
    assert single["demo_answer"]  # some text: the random model does not stop at once
    assert [out["demo_answer"] for out in ranks] == [single["demo_answer"]] * WORLD


def test_coordinator(runs):
    """Rank 0 leads three calls (one failing validation), rank 1 follows all three."""
    ranks, single, _ = runs
    assert torch.equal(ranks[0]["led"], single["led"])
    assert torch.equal(ranks[0]["led_after_error"], single["led_after_error"])
    assert "block_length" in ranks[0]["led_error"]
    assert ranks[1]["followed"] == 3
    assert "closed" in ranks[0]["run_after_close"]
    assert [out["decided"] for out in ranks] == [["drop", 3]] * WORLD
    assert all(out.get("decide_error") for out in ranks)


def test_shard_plan():
    models = build_models()
    plan = parallel.shard_plan(models["llada"][0])
    assert plan["model.transformer.blocks.1.q_proj"] == 0
    assert plan["model.transformer.blocks.1.ff_out"] == 1
    assert plan["model.transformer.ff_out"] == 0
    assert len(plan) == 2 * 7 + 1
    assert "model.transformer.ff_out" not in parallel.shard_plan(models["llada"][0], False)
    dream_plan = parallel.shard_plan(models["dream"][0])
    assert dream_plan["model.layers.0.self_attn.o_proj"] == 1
    assert dream_plan["lm_head"] == 0
    assert "lm_head" not in parallel.shard_plan(models["tied"][0])  # tied: replicated


@pytest.mark.parametrize("world, kw, field", [
    (2, dict(n_heads=3, n_kv_heads=3, d_model=48), "n_heads=3"),
    (2, dict(n_heads=4, n_kv_heads=1), "n_kv_heads=1"),
    (2, dict(mlp_hidden_size=45), "mlp_hidden_size=45"),
    (3, dict(n_heads=6, n_kv_heads=3, d_model=48, vocab_size=97), "embedding_size=97"),
])
def test_bad_world_sizes(world, kw, field):
    args = dict(vocab_size=96, d_model=32, n_heads=4, n_kv_heads=2, n_layers=1,
                mlp_hidden_size=48)
    args.update(kw)
    model = random_llada(**args)
    with pytest.raises(ValueError, match=f"over {world} ranks splits {field}"):
        parallel.check_world_size(model, world)
    if field.startswith("embedding_size"):
        parallel.check_world_size(model, world, shard_lm_head=False)  # a whole head fits
        assert not parallel.splits_lm_head(model, world)
    assert parallel.splits_lm_head(model, 1) == (not model.config.weight_tying)


def test_bad_world_size_dream():
    model = random_dream(96, hidden_size=56, num_attention_heads=7, num_key_value_heads=1,
                         num_hidden_layers=1)
    with pytest.raises(ValueError, match="num_attention_heads=7"):
        parallel.check_world_size(model, 2)


def test_needs_distributed_and_our_models(tiny_model):
    model = random_llada(96, d_model=32, n_layers=1)
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallel.parallelize(model)
    with pytest.raises(TypeError, match="LLaDAModel or DreamModel"):
        parallel.parallelize(tiny_model)


@pytest.mark.slow
def test_demo_under_torchrun():
    """The launcher: torchrun, 2 CPU processes, a random tiny model, tokens compared with one
    process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GENJO_FAST_ATTENTION="sdpa")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "genjo_fast.parallel_demo", "--family", "dream",
         "--gen-length", "8", "--steps", "8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tokens identical to one process: True" in run.stdout
