"""The training script: a few steps lower the loss, checkpoints load, resume is exact.

Tiny models and a handful of steps: CI never retrains the shipped model.
"""
import json

import pytest
import torch

pytest.importorskip("transformers")

from genjo_fast import train as training  # noqa: E402
from genjo_fast.models import load_llada  # noqa: E402
from genjo_fast.tokenizer import build_tokenizer, special_ids  # noqa: E402

TINY = dict(d_model=32, n_heads=2, n_layers=2, mlp_hidden_size=64, batch_size=8,
            warmup=2, lr=3e-3, gen_length=16, task_weights=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _held_out_loss(config, model, tokenizer, steps=(10_001, 10_002)):
    """The objective on fixed batches and masks (steps the runs never train on)."""
    mask_id = special_ids(tokenizer)["mask_id"]
    with torch.no_grad():
        return sum(float(training.batch_loss(config, model,
                                             training.make_batch(config, tokenizer, s), mask_id,
                                             torch.Generator().manual_seed(s)))
                   for s in steps) / len(steps)


@pytest.mark.parametrize("objective", ["sft", "pretrain"])
def test_a_few_steps_lower_the_loss(tmp_path, tokenizer, objective):
    config = training.TrainConfig(steps=30, objective=objective, **TINY)
    before = _held_out_loss(config, training.init_model(config, tokenizer), tokenizer)
    info = training.train(config, tmp_path, checkpoint_every=0, final_eval_problems=0,
                          progress=False)
    model = load_llada(tmp_path / "model", dtype=torch.float32)
    after = _held_out_loss(config, model, tokenizer)
    assert after < 0.8 * before, (before, after)
    assert info["step"] == 30 and info["parameters"] == sum(p.numel() for p in model.parameters())


def test_batches_follow_the_layout(tokenizer):
    config = training.TrainConfig(**TINY)
    ids, attention_mask, prompt_length = training.make_batch(config, tokenizer, 3)
    special = special_ids(tokenizer)
    assert ids.shape == attention_mask.shape == (8, prompt_length + 16)
    answers = ids[:, prompt_length:]
    for row, mask in zip(answers.tolist(), attention_mask[:, prompt_length:]):
        assert mask.all() and special["eot_id"] in row
        end = row.index(special["eot_id"])
        assert end >= 1 and set(row[end + 1:]) <= {special["eos_id"]}
    # Prompts are left-padded and end with the generation prompt.
    assert (ids[:, prompt_length - 1] == tokenizer.convert_tokens_to_ids("<|assistant|>")).all()
    assert torch.equal(training.make_batch(config, tokenizer, 3)[0], ids)  # seeded by step
    assert not torch.equal(training.make_batch(config, tokenizer, 4)[0][:, :5], ids[:, :5])


def test_learning_rate_schedule():
    config = training.TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    rates = [training.learning_rate(config, s) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))  # cosine decay
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)


def test_resume_continues_exactly(tmp_path, tokenizer):
    config = training.TrainConfig(steps=6, **TINY)
    training.train(config, tmp_path / "straight", checkpoint_every=0, final_eval_problems=0,
                   progress=False)
    assert training.train(config, tmp_path / "resumed", stop_at=3, final_eval_problems=0,
                          progress=False) is None
    checkpoint = tmp_path / "resumed" / "checkpoint"
    assert json.loads((checkpoint / "training.json").read_text())["step"] == 3
    partial = load_llada(checkpoint, dtype=torch.float32)  # the reference format
    training.train(config, tmp_path / "resumed", resume=True, final_eval_problems=0,
                   progress=False)
    straight = load_llada(tmp_path / "straight" / "model", dtype=torch.float32).state_dict()
    resumed = load_llada(tmp_path / "resumed" / "model", dtype=torch.float32).state_dict()
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
    assert not torch.equal(partial.state_dict()[key], value)
    with pytest.raises(ValueError, match="only steps may grow"):
        training.train(training.TrainConfig(steps=8, **{**TINY, "lr": 1e-3}),
                       tmp_path / "resumed", resume=True, final_eval_problems=0, progress=False)


def test_model_directory_loads_with_its_tokenizer(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    config = training.TrainConfig(steps=2, **TINY)
    training.train(config, tmp_path, final_eval_problems=0, progress=False)
    directory = tmp_path / "model"
    model = load_llada(directory, dtype=torch.float32)
    loaded = AutoTokenizer.from_pretrained(str(directory))
    assert special_ids(loaded) == special_ids(tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.mask_token_id == special_ids(tokenizer)["mask_id"]
    assert {p.name for p in directory.iterdir()} >= {"config.json", "model.safetensors",
                                                     "tokenizer.json", "training.json"}


def test_cli(tmp_path, capsys):
    assert training.main(["--out", str(tmp_path), "--steps", "2", "--d-model", "32",
                          "--n-heads", "2", "--n-layers", "1", "--mlp-hidden-size", "32",
                          "--batch-size", "4", "--tasks", "reverse", "--task-weights", "1",
                          "--final-eval-problems", "4", "--no-progress"]) == 0
    info = json.loads((tmp_path / "model" / "training.json").read_text())
    assert info["config"]["tasks"] == ["reverse"] and info["command"][:3] == [
        "python", "-m", "genjo_fast.train"]
    assert set(info["evals"][-1]["exact_accuracy"]) == {"reverse"}


def test_bad_settings():
    with pytest.raises(ValueError, match="task='mul'"):
        training.TrainConfig(tasks=("mul",), task_weights=(1.0,))
    with pytest.raises(ValueError, match="task_weights"):
        training.TrainConfig(task_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="objective"):
        training.TrainConfig(objective="ar")
    with pytest.raises(ValueError, match="steps"):
        training.TrainConfig(steps=0)


def test_init_starts_from_a_trained_model(tmp_path, tokenizer):
    first = training.TrainConfig(steps=3, **TINY)
    training.train(first, tmp_path / "first", final_eval_problems=0, progress=False)
    second = training.TrainConfig(steps=2, **{**TINY, "task_weights": (1.0, 0.0, 0.0)})
    model, record = training.load_initial_model(tmp_path / "first" / "model", second, tokenizer)
    trained = load_llada(tmp_path / "first" / "model", dtype=torch.float32).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert model.training is False and all(p.requires_grad for p in model.parameters())
    assert record["step"] == 3 and record["config"]["task_weights"] == [1.0, 1.0, 1.0]
    info = training.train(second, tmp_path / "second", init=tmp_path / "first" / "model",
                          final_eval_problems=0, progress=False)
    assert info["init"]["path"] == str(tmp_path / "first" / "model")
    with pytest.raises(ValueError, match="architecture"):
        training.load_initial_model(tmp_path / "first" / "model",
                                    training.TrainConfig(**{**TINY, "d_model": 64}), tokenizer)
