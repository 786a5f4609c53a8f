"""The shipped ``tiny-chat`` model: it loads, it answers held-out problems, and its
log-likelihoods rank the right ``add`` answer first (directly and through lm-eval).

CI does not retrain it (``python -m genjo_fast.train`` does; see the README's Models
section). Fresh problems come from the held-out split with seeds used nowhere else.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from genjo_fast import tasks, zoo  # noqa: E402
from genjo_fast.models import LLaDAModel  # noqa: E402
from genjo_fast.tokenizer import special_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_chat():
    return zoo.load("tiny-chat")


def test_shipped_files():
    directory = zoo.path("tiny-chat")
    files = {p.name: p.stat().st_size for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "training.json"} <= set(files)
    assert sum(files.values()) <= 20 * 2 ** 20
    info = json.loads((directory / "training.json").read_text())
    assert info["command"][:3] == ["python", "-m", "genjo_fast.train"]
    assert set(info["evals"][-1]["exact_accuracy"]) == set(tasks.TASKS)


def test_loads(tiny_chat):
    model, tokenizer = tiny_chat
    assert isinstance(model, LLaDAModel) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.vocab_size == len(tokenizer)
    ids = special_ids(tokenizer)
    assert (model.config.mask_token_id, model.config.eos_token_id) == (ids["mask_id"],
                                                                      ids["eos_id"])
    assert zoo.names() == ("tiny-chat",)
    with pytest.raises(ValueError, match="name='tiny'"):
        zoo.load("tiny")


def test_exact_accuracy_on_fresh_problems(tiny_chat):
    """50 held-out problems per task, gen_length 32, block 8, 32 steps, temperature 0."""
    model, tokenizer = tiny_chat
    accuracy = tasks.evaluate(model, tokenizer, n=50, seed=20_260_001, batch_size=50)
    assert min(accuracy.values()) >= 0.9, accuracy
    assert sum(accuracy.values()) / len(accuracy) >= 0.9, accuracy


def test_likelihood_ranks_the_right_sum_first(tiny_chat):
    model, tokenizer = tiny_chat
    assert tasks.likelihood_accuracy(model, tokenizer, n=60, seed=20_260_002, mc_num=32) >= 0.9


def test_lm_eval_multiple_choice_end_to_end(tiny_chat, tmp_path):
    """The same ranking as a local lm-eval task through ``python -m genjo_fast.eval``."""
    pytest.importorskip("lm_eval")
    model, tokenizer = tiny_chat
    seed, n, mc_num = 20_260_003, 40, 32
    tasks.write_lm_eval_task(tmp_path / "tasks", tokenizer, n=n, seed=seed, name="add_choice")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "GENJO_FAST_ATTENTION": "sdpa", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "genjo_fast.eval", "--include_path",
               str(tmp_path / "tasks"), "--tasks", "add_choice", "--model_args",
               f"pretrained={zoo.path('tiny-chat')},dtype=float32,mc_num={mc_num},"
               f"batch_size={mc_num}", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    (results,) = (tmp_path / "out").rglob("results*.json")
    harness = json.loads(results.read_text())["results"]["add_choice"]["acc,none"]
    direct = tasks.likelihood_accuracy(model, tokenizer, n=n, seed=seed, mc_num=mc_num)
    assert harness >= 0.9 and direct >= 0.9, (harness, direct)
    assert abs(harness - direct) <= 0.05  # the same estimator, other Monte Carlo draws
