"""The task suite of genjo_fast's trained models: generated problems, chat prompts, scoring.

Three tasks, each a one-turn chat (the user's message, the assistant's answer):

* ``add``: ``What is {a} plus {b}?`` with integers ``0 <= a, b <= 99`` -> ``{a + b}``;
* ``sort``: ``Sort: {digits}`` with 3 to 8 space-separated digits -> the digits in ascending
  order, space-separated;
* ``reverse``: ``Reverse: {word}`` with 3 to 8 lowercase letters -> the word reversed.

Problems are drawn by seeded generators. Every problem belongs to one split, ``"train"`` or
``"test"``, decided by a hash of its user message (about one problem in ten is a test
problem), so held-out sets are fresh draws that training never sees, even for ``add``, whose
10,000 problems a long training run would otherwise cover.

Scoring is exact match on the decoded answer: the generated ids up to the first EOS or EoT,
special tokens skipped, surrounding whitespace stripped.
"""
from __future__ import annotations

import random
import string
import zlib
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

TASKS = ("add", "sort", "reverse")
SPLITS = ("train", "test")
#: One problem in ``TEST_MODULUS`` (by the CRC32 of its user message) is a test problem.
TEST_MODULUS = 10


@dataclass(frozen=True)
class Problem:
    """One problem: ``task`` name, the user's message and the expected answer text."""
    task: str
    question: str
    answer: str


def split_of(question: str) -> str:
    """``"test"`` or ``"train"``: the split a user message belongs to (CRC32 modulo
    :data:`TEST_MODULUS` is 0 for test)."""
    return "test" if zlib.crc32(question.encode()) % TEST_MODULUS == 0 else "train"


def _draw_add(rng: random.Random) -> Problem:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return Problem("add", f"What is {a} plus {b}?", str(a + b))


def _draw_sort(rng: random.Random) -> Problem:
    digits = [rng.choice(string.digits) for _ in range(rng.randint(3, 8))]
    return Problem("sort", "Sort: " + " ".join(digits), " ".join(sorted(digits)))


def _draw_reverse(rng: random.Random) -> Problem:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
    return Problem("reverse", f"Reverse: {word}", word[::-1])


_DRAW = {"add": _draw_add, "sort": _draw_sort, "reverse": _draw_reverse}


def check_task(task: str) -> None:
    """Raises ValueError naming ``task`` when it is not one of :data:`TASKS`."""
    if task not in _DRAW:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}")


def draw(task: str, rng: random.Random, split: str = "train") -> Problem:
    """One problem of ``task`` from ``split``, drawn with ``rng`` (rejection sampling: draws of
    the other split are discarded)."""
    check_task(task)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    while True:
        problem = _DRAW[task](rng)
        if split_of(problem.question) == split:
            return problem


def problems(task: str, n: int, seed: int, split: str = "test") -> List[Problem]:
    """``n`` problems of ``task`` drawn from ``split`` by ``random.Random(seed)`` (the same
    seed gives the same list; repeats are possible, as in any i.i.d. draw)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    return [draw(task, rng, split) for _ in range(n)]


def prompt_text(tokenizer, question: str) -> str:
    """The chat prompt of a user message: the tokenizer's chat template with
    ``add_generation_prompt=True``."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, questions: Sequence[str]):
    """Left-padded prompt ids and attention mask of user messages.

    Returns:
        ``(prompt, attention_mask)``, int64 ``(B, Lp)`` each (``Lp`` the longest prompt;
        padding ``pad_token_id`` with mask 0 on the left).
    """
    texts = [prompt_text(tokenizer, q) for q in questions]
    batch = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt",
                      add_special_tokens=False)
    return batch["input_ids"].long(), batch["attention_mask"].long()


def answer_window(tokenizer, answer: str, gen_length: int = 32) -> List[int]:
    """The layout of an answer in training and in scoring: its ids, ``<|eot_id|>``, then EOS
    up to ``gen_length`` ids (LLaDA-Instruct's SFT padding; the window ``generate`` fills).

    Raises:
        ValueError: the answer and EoT do not fit in ``gen_length``.
    """
    from .tokenizer import special_ids

    ids = special_ids(tokenizer)
    tokens = tokenizer(answer, add_special_tokens=False)["input_ids"] + [ids["eot_id"]]
    if len(tokens) > gen_length:
        raise ValueError(f"answer {answer!r} takes {len(tokens)} tokens with EoT, more than "
                         f"gen_length={gen_length}")
    return tokens + [ids["eos_id"]] * (gen_length - len(tokens))


def decode_answer(tokenizer, ids: Sequence[int], eos_id: int, eot_id: int) -> str:
    """The answer text of generated ids: up to the first EOS or EoT, special tokens skipped,
    stripped."""
    ids = [int(i) for i in ids]
    for stop in (eos_id, eot_id):
        if stop in ids:
            ids = ids[:ids.index(stop)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def score(problem: Problem, answer_text: str) -> bool:
    """Exact match of a decoded answer with the problem's answer."""
    return answer_text == problem.answer


@torch.no_grad()
def evaluate(model, tokenizer, tasks: Sequence[str] = TASKS, n: int = 100, seed: int = 0,
             batch_size: int = 128, split: str = "test", **generate_kwargs) -> Dict[str, float]:
    """Exact-match accuracy of ``model`` on ``n`` fresh problems per task.

    Args:
        model: a mask predictor for ``genjo_fast.generate`` (e.g. the zoo's ``tiny-chat``).
        tokenizer: its tokenizer (:func:`genjo_fast.tokenizer.build_tokenizer`'s kind).
        tasks: task names; ``n`` problems each, drawn with seed ``seed + index of the task``.
        batch_size: prompts per ``generate`` call.
        generate_kwargs: ``genjo_fast.generate`` options; the default is the measured setting
            ``gen_length=32, block_length=8, steps=32``, temperature 0. The special ids come
            from the tokenizer.
    Returns:
        ``{task: accuracy in [0, 1]}``.
    """
    from .generate import generate
    from .tokenizer import special_ids

    ids = special_ids(tokenizer)
    options = dict(gen_length=32, block_length=8, steps=32, temperature=0.)
    options.update(generate_kwargs)
    options.update(mask_id=ids["mask_id"], eos_id=ids["eos_id"], eot_id=ids["eot_id"])
    accuracy = {}
    for index, task in enumerate(tasks):
        items = problems(task, n, seed + index, split)
        correct = 0
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompt, attention_mask = encode_prompts(tokenizer, [p.question for p in chunk])
            device = getattr(model, "device", torch.device("cpu"))
            out = generate(model, prompt.to(device), attention_mask.to(device), **options)
            for problem, row in zip(chunk, out[:, prompt.shape[1]:].tolist()):
                text = decode_answer(tokenizer, row, ids["eos_id"], ids["eot_id"])
                correct += score(problem, text)
        accuracy[task] = correct / max(len(items), 1)
    return accuracy


# --------------------------------------------------------------------------------------------
# Multiple choice (log-likelihood ranking) on ``add``
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChoiceProblem:
    """An ``add`` problem with four candidate answers: ``choices[label]`` is right; the others
    are off by 1, off by 10, and the right answer with two adjacent digits swapped."""
    problem: Problem
    choices: Tuple[str, ...]
    label: int


def _swaps(text: str) -> List[str]:
    """Numbers made by swapping two adjacent, different digits of ``text`` (no leading 0)."""
    out = []
    for i in range(len(text) - 1):
        swapped = text[:i] + text[i + 1] + text[i] + text[i + 2:]
        if text[i] != text[i + 1] and swapped[0] != "0":
            out.append(swapped)
    return out


def draw_choice(rng: random.Random, split: str = "test") -> ChoiceProblem:
    """An ``add`` problem of ``split`` with its distractors, in shuffled order. Problems whose
    sum has no digit swap (one digit, or repeated digits such as 11 or 100) are skipped, so
    that all four candidates are distinct numbers."""
    while True:
        problem = draw("add", rng, split)
        total = int(problem.answer)
        swaps = _swaps(problem.answer)
        if not swaps:
            continue
        near = total + rng.choice((-1, 1)) if total >= 1 else total + 1
        ten = total + rng.choice((-10, 10)) if total >= 10 else total + 10
        choices = [problem.answer, str(near), str(ten), rng.choice(swaps)]
        order = list(range(4))
        rng.shuffle(order)
        return ChoiceProblem(problem, tuple(choices[i] for i in order), order.index(0))


def choice_problems(n: int, seed: int, split: str = "test") -> List[ChoiceProblem]:
    """``n`` :class:`ChoiceProblem` drawn by ``random.Random(seed)`` from ``split``."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    return [draw_choice(rng, split) for _ in range(n)]


def choice_continuation(tokenizer, choice: str, gen_length: int = 32) -> str:
    """The scored continuation of a candidate answer: its :func:`answer_window` as text (the
    answer, ``<|eot_id|>``, EOS padding), the layout the model was trained on. (The bare
    answer would also score "10" as the start of "100", and a sequence that ends right after
    the answer is one the model never saw.)"""
    return tokenizer.decode(answer_window(tokenizer, choice, gen_length))


@torch.no_grad()
def likelihood_accuracy(model, tokenizer, n: int = 100, seed: int = 0, mc_num: int = 32,
                        batch_size: int = 32, split: str = "test", generator_seed: int = 0,
                        gen_length: int = 32) -> float:
    """How often ``genjo_fast.get_log_likelihoods`` ranks the right ``add`` answer first.

    For each of ``n`` :func:`choice_problems`, the log-likelihood of each
    :func:`choice_continuation` (``gen_length`` tokens) given the chat prompt (``mc_num`` Monte Carlo rows, draws from
    a generator seeded with ``generator_seed``); the problem counts as right when the right
    answer's estimate is the highest of the four.

    Returns:
        The fraction of problems ranked right, in ``[0, 1]``.
    """
    from .likelihood import get_log_likelihoods
    from .tokenizer import special_ids

    items = choice_problems(n, seed, split)
    pairs = []
    for item in items:
        prompt = tokenizer(prompt_text(tokenizer, item.problem.question),
                           add_special_tokens=False)["input_ids"]
        for choice in item.choices:
            answer = answer_window(tokenizer, choice, gen_length)
            pairs.append((torch.tensor(prompt), torch.tensor(answer)))
    scores = get_log_likelihoods(model, pairs, mc_num, batch_size,
                                 mask_id=special_ids(tokenizer)["mask_id"],
                                 generator=torch.Generator().manual_seed(generator_seed))
    right = sum(max(range(4), key=lambda c: scores[4 * i + c]) == item.label
                for i, item in enumerate(items))
    return right / max(len(items), 1)


def write_lm_eval_task(directory, tokenizer, n: int = 100, seed: int = 0,
                       name: str = "genjo_add_choice", split: str = "test",
                       gen_length: int = 32):
    """Writes a local lm-evaluation-harness multiple-choice task of :func:`choice_problems`.

    Files: ``{name}.jsonl`` (the chat prompt, the four continuations, the label) and
    ``{name}.yaml`` (``output_type: multiple_choice``, metric ``acc``, no delimiter between
    prompt and continuation). Run it with ``python -m genjo_fast.eval --include_path DIRECTORY
    --tasks NAME --model_args pretrained=MODEL_DIR,...``.

    Returns:
        The ``Path`` of the YAML file.
    """
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    rows = [{"prompt": prompt_text(tokenizer, item.problem.question),
             "choices": [choice_continuation(tokenizer, c, gen_length) for c in item.choices],
             "label": item.label}
            for item in choice_problems(n, seed, split)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"task": name, "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "label", "target_delimiter": "",
            "metric_list": [{"metric": "acc"}]}
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(spec, indent=1) + "\n")  # JSON is YAML
    return path


__all__ = ["TASKS", "SPLITS", "Problem", "split_of", "check_task", "draw", "problems",
           "prompt_text", "encode_prompts", "answer_window", "decode_answer", "score",
           "evaluate", "ChoiceProblem", "draw_choice", "choice_problems", "choice_continuation",
           "likelihood_accuracy", "write_lm_eval_task"]
