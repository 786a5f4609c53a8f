"""The task suite and the character-level chat tokenizer."""
import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from genjo_fast import tasks  # noqa: E402
from genjo_fast.tokenizer import (CHARACTERS, EOS, EOT, MASK, PLACE_DIGITS,  # noqa: E402
                                  build_tokenizer, special_ids)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# --- tokenizer ------------------------------------------------------------------------------

def test_special_tokens_and_ids(tokenizer):
    ids = special_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens([ids["mask_id"], ids["eos_id"], ids["eot_id"]]) == [
        MASK, EOS, EOT]
    assert ids["pad_id"] == ids["eos_id"]  # LLaDA pads with EOS
    assert len(set(tokenizer.get_vocab().values())) == len(tokenizer) == (
        8 + len(CHARACTERS) + len(PLACE_DIGITS))
    assert tokenizer.padding_side == "left"


def test_characters_round_trip(tokenizer):
    text = "What is 47 plus 185?\tSort: 3 1 2\nReverse: abc ~{} 2024."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    for unknown in ("é", "\u2032"):  # a place mark of the text's own is unknown too
        assert tokenizer(unknown, add_special_tokens=False)["input_ids"] == [
            tokenizer.unk_token_id]


@pytest.mark.parametrize("text, tokens", [
    ("7", ["7"]), ("47", ["4\u2032", "7"]), ("132", ["1\u2033", "3\u2032", "2"]),
    ("2024", ["2\u2033", "0\u2033", "2\u2032", "4"]), ("3 1", ["3", " ", "1"]),
    ("a12b", ["a", "1\u2032", "2", "b"])])
def test_digits_carry_their_place(tokenizer, text, tokens):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == tokens
    assert tokenizer.decode(ids) == text


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "Reverse: abc"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|user|>Reverse: abc<|eot_id|><|assistant|>"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 + len("Reverse: abc")  # the special tokens are single tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Reverse: abc"
    closed = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "cba"}],
                                           tokenize=False)
    assert closed == "<|bos|><|user|>Reverse: abc<|eot_id|><|assistant|>cba<|eot_id|>"
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_save_and_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert special_ids(loaded) == special_ids(tokenizer)
    assert loaded.chat_template == tokenizer.chat_template
    text = tasks.prompt_text(tokenizer, "Sort: 9 1 5")
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


# --- problems -------------------------------------------------------------------------------

@pytest.mark.parametrize("task", tasks.TASKS)
def test_problems_are_seeded_and_correct(task):
    first = tasks.problems(task, 300, seed=5)
    assert first == tasks.problems(task, 300, seed=5)
    assert first != tasks.problems(task, 300, seed=6)
    for p in first:
        assert p.task == task and tasks.split_of(p.question) == "test"
        if task == "add":
            a, b = map(int, p.question.removeprefix("What is ").removesuffix("?").split(" plus "))
            assert 0 <= a <= 99 and 0 <= b <= 99 and p.answer == str(a + b)
        elif task == "sort":
            digits = p.question.removeprefix("Sort: ").split(" ")
            assert 3 <= len(digits) <= 8 and all(d.isdigit() and len(d) == 1 for d in digits)
            assert p.answer == " ".join(sorted(digits))
        else:
            word = p.question.removeprefix("Reverse: ")
            assert 3 <= len(word) <= 8 and word.isalpha() and word.islower()
            assert p.answer == word[::-1]


def test_splits_are_disjoint():
    rng = random.Random(0)
    train = {tasks.draw("add", rng, "train").question for _ in range(3000)}
    test = {p.question for p in tasks.problems("add", 1000, seed=0)}
    assert train and test and not train & test
    # About one problem in ten is held out.
    everything = [f"What is {a} plus {b}?" for a in range(100) for b in range(100)]
    share = sum(tasks.split_of(q) == "test" for q in everything) / len(everything)
    assert 0.08 < share < 0.12


def test_bad_task_and_split():
    with pytest.raises(ValueError, match="task='mul'"):
        tasks.problems("mul", 3, 0)
    with pytest.raises(ValueError, match="split='dev'"):
        tasks.problems("add", 3, 0, split="dev")


# --- scoring --------------------------------------------------------------------------------

def test_decode_answer_stops_at_eos_or_eot_and_skips_specials(tokenizer):
    ids = special_ids(tokenizer)

    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos, eot, mask = ids["eos_id"], ids["eot_id"], ids["mask_id"]
    decode = lambda row: tasks.decode_answer(tokenizer, row, eos, eot)  # noqa: E731
    assert decode(enc(" 42 ") + [eot] + enc("9") + [eos]) == "42"
    assert decode(enc("4") + [mask] + enc("2") + [eos, eot] + enc("7")) == "42"
    assert decode(enc("cba")) == "cba"  # no stop token: everything
    problem = tasks.Problem("reverse", "Reverse: abc", "cba")
    assert tasks.score(problem, "cba") and not tasks.score(problem, "cb")


def test_encode_prompts_left_pads(tokenizer):
    prompt, mask = tasks.encode_prompts(tokenizer, ["Reverse: abc", "Sort: 1 2 3 4 5"])
    assert prompt.dtype == mask.dtype == torch.int64 and prompt.shape == mask.shape
    short = len(tasks.prompt_text(tokenizer, "Reverse: abc").replace("<|bos|>", "B")
                .replace("<|user|>", "U").replace("<|eot_id|>", "E").replace("<|assistant|>", "A"))
    assert int(mask[0].sum()) == short and mask[0, 0] == 0 and mask[1].all()
    assert (prompt[0, :prompt.shape[1] - short] == tokenizer.pad_token_id).all()


def test_choice_problems():
    items = tasks.choice_problems(200, seed=3)
    assert items == tasks.choice_problems(200, seed=3)
    labels = set()
    for item in items:
        right = item.problem.answer
        assert item.choices[item.label] == right and len(set(item.choices)) == 4
        wrong = [c for c in item.choices if c != right]
        (swapped,) = [c for c in wrong if sorted(c) == sorted(right)]
        assert sorted(abs(int(c) - int(right)) for c in wrong if c != swapped) == [1, 10]
        assert swapped[0] != "0"
        assert sum(x != y for x, y in zip(swapped, right)) == 2
        labels.add(item.label)
    assert labels == {0, 1, 2, 3}


def test_write_lm_eval_task(tokenizer, tmp_path):
    path = tasks.write_lm_eval_task(tmp_path, tokenizer, n=5, seed=1, name="t")
    spec = json.loads(path.read_text())
    assert spec["task"] == "t" and spec["output_type"] == "multiple_choice"
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    items = tasks.choice_problems(5, seed=1)
    for row, item in zip(rows, items):
        assert row["prompt"] == tasks.prompt_text(tokenizer, item.problem.question)
        right = row["choices"][row["label"]]
        assert right == item.problem.answer + EOT + EOS * (31 - len(item.problem.answer))
        ids = tokenizer(right, add_special_tokens=False)["input_ids"]
        assert ids == tasks.answer_window(tokenizer, item.problem.answer)  # re-encodes
