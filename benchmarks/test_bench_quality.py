"""Answer quality vs speed of every sampling mode, on the shipped trained model.

The Fast-dLLM-style table: ``tiny-chat`` (:mod:`genjo_fast.zoo`) answers 300 held-out problems
per task of :mod:`genjo_fast.tasks` (``add``, ``sort``, ``reverse``; quick mode: 40) with
``gen_length=32, block_length=8, steps=32``, temperature 0, one batched call per task, under
each mode: the reference sampler, genjo_fast exact, the block caches, threshold and factor
decoding (with and without the dual cache), stopping at EOS and the approximate variable
length. For each mode: exact-match accuracy per task and
averaged, its change vs exact (points), the model forwards an answer needs, and answers per
second.

"Forwards per answer" counts, for every answer, the steps at which its row still had a masked
position in the block being decoded: the forwards the answer would need were it generated
alone (a batched call keeps running rows whose block is done while others finish theirs).
With a cache, all but one forward per block run only the block (prefix: and what follows),
hence the higher answers/s at the same count.

Checks: the reference and genjo_fast exact give identical tokens; every approximate mode gives
the tokens of its plain statement (:func:`genjo_fast.reference.generate_approximate`) on the
first 16 problems of each task (with ``stop_at_eos``: up to each answer's first EOS/EoT, the
guarantee of stopping). Target (issue 13), checked in every run (accuracy and counts, not
times): dual cache + threshold 0.9 within 2 points of exact accuracy with at least 3x fewer
forwards per answer.
Run with ``pytest benchmarks/test_bench_quality.py --benchmark-only -s``.
"""
from typing import Dict

import pytest
import torch

import genjo_fast
from genjo_fast import reference, tasks, zoo
from genjo_fast.tokenizer import special_ids

from harness import quick

pytest.importorskip("transformers")

N = quick(300, 40)
SEED = 31_000  # held-out draws used by no test
SETTING = dict(gen_length=32, block_length=8, steps=32, temperature=0.)
CHECKED_ROWS = 16
MODES = {
    "reference": None,
    "exact": {},
    "prefix cache": dict(cache="prefix"),
    "dual cache": dict(cache="dual"),
    "threshold 0.9": dict(threshold=0.9),
    "threshold 0.7": dict(threshold=0.7),
    "threshold 0.5": dict(threshold=0.5),
    "dual + threshold 0.9": dict(cache="dual", threshold=0.9),
    "dual + threshold 0.7": dict(cache="dual", threshold=0.7),
    "dual + threshold 0.5": dict(cache="dual", threshold=0.5),
    "factor 1.0": dict(factor=1.0),
    "dual + factor 1.0": dict(cache="dual", factor=1.0),
    "stop at EOS": dict(stop_at_eos=True),
    "dual + threshold 0.9 + stop at EOS": dict(cache="dual", threshold=0.9, stop_at_eos=True),
    "adaptive length 0.5": dict(adaptive_length=True),
    "adaptive length 0.9": dict(adaptive_length=True, length_threshold=0.9),
}


def first_stops_equal(got: torch.Tensor, want: torch.Tensor, prompt_len: int, stop_ids) -> bool:
    """Per row: ``got`` equals ``want`` up to and including ``want``'s first stop id (all of
    it without one): what stopping at EOS guarantees."""
    for row_got, row_want in zip(got[:, prompt_len:].tolist(), want[:, prompt_len:].tolist()):
        end = next((i + 1 for i, t in enumerate(row_want) if t in stop_ids), len(row_want))
        if row_got[:end] != row_want[:end]:
            return False
    return True


@pytest.fixture(scope="module")
def suite(device):
    """The model, the special ids and per task the prompts, their masks and the problems."""
    model, tokenizer = zoo.load("tiny-chat", device=device)
    ids = special_ids(tokenizer)
    batches = {}
    for index, task in enumerate(tasks.TASKS):
        items = tasks.problems(task, N, SEED + index, "test")
        prompt, attention_mask = tasks.encode_prompts(tokenizer, [p.question for p in items])
        batches[task] = (prompt.to(device), attention_mask.to(device), items)
    special = dict(mask_id=ids["mask_id"], eos_id=ids["eos_id"], eot_id=ids["eot_id"])
    return model, tokenizer, special, batches


class ForwardCounter:
    """An ``observer`` counting, per row, the steps at which the row still had a masked
    position in the block being decoded (the forwards it would need alone)."""

    def __init__(self):
        self.per_row = None

    def __call__(self, event) -> None:
        active = torch.isfinite(event.confidence).any(-1).long().cpu()  # [B]
        self.per_row = active if self.per_row is None else self.per_row + active


def accuracy(tokenizer, special, batches, outputs) -> Dict[str, float]:
    """Exact-match accuracy per task of the answers in ``outputs`` (task -> tokens)."""
    result = {}
    for task, (prompt, _, items) in batches.items():
        answers = outputs[task][:, prompt.shape[1]:].tolist()
        right = sum(tasks.score(p, tasks.decode_answer(tokenizer, row, special["eos_id"],
                                                       special["eot_id"]))
                    for p, row in zip(items, answers))
        result[task] = right / len(items)
    return result


def run_mode(model, special, batches, mode, **extra):
    """A zero-argument callable answering every task's batch under ``mode``; it returns
    (task -> tokens, task -> per-row forward counts, task -> stats)."""
    def call():
        outputs, forwards, stats = {}, {}, {}
        for task, (prompt, attention_mask, _) in batches.items():
            if MODES[mode] is None:
                outputs[task] = reference.generate(model, prompt, attention_mask, **SETTING,
                                                   mask_id=special["mask_id"], **extra)
                continue
            counter = ForwardCounter()
            outputs[task], stats[task] = genjo_fast.generate(
                model, prompt, attention_mask, **SETTING, **special, **MODES[mode],
                observer=counter, return_stats=True, **extra)
            forwards[task] = counter.per_row
        return outputs, forwards, stats
    return call


#: Outputs of the cases run so far (mode -> task -> tokens): the exact case checks itself
#: against the reference's without running it twice.
OUTPUTS: Dict[str, Dict[str, torch.Tensor]] = {}


def outputs_of(suite, mode):
    if mode not in OUTPUTS:
        model, _, special, batches = suite
        OUTPUTS[mode] = run_mode(model, special, batches, mode)()[0]
    return OUTPUTS[mode]


@pytest.fixture(scope="module")
def exact_accuracy(suite):
    _, tokenizer, special, batches = suite
    return accuracy(tokenizer, special, batches, outputs_of(suite, "exact"))


@pytest.mark.parametrize("mode", list(MODES))
def test_bench_quality(bench, suite, exact_accuracy, mode):
    model, tokenizer, special, batches = suite
    bench.describe(dict(mode=mode), model="tiny-chat", problems_per_task=N, seed=SEED,
                   **SETTING, options=MODES[mode])
    warm = {t: (p[:4], m[:4], items[:4]) for t, (p, m, items) in batches.items()}
    sides = bench.measure({"time": run_mode(model, special, batches, mode)}, repeats=3,
                          warmup_sides={"time": run_mode(model, special, warm, mode)})
    outputs, forwards, _ = sides["time"].out
    OUTPUTS.setdefault(mode, outputs)

    if mode in ("reference", "exact"):
        expected = outputs_of(suite, "exact" if mode == "reference" else "reference")
        for task in batches:
            bench.assert_equal(outputs[task], expected[task],
                               f"{task}: tokens identical, reference vs genjo_fast exact")
    else:
        options = dict(MODES[mode])
        stopping = options.pop("stop_at_eos", False)
        for task, (prompt, attention_mask, _) in batches.items():
            rows = (prompt[:CHECKED_ROWS], attention_mask[:CHECKED_ROWS])
            if options.get("adaptive_length"):
                statement = reference.generate(model, *rows, **SETTING, **special, **options)
            elif options:
                statement = reference.generate_approximate(model, *rows, **SETTING, **special,
                                                           **options)
            else:
                statement = reference.generate(model, *rows, **SETTING,
                                               mask_id=special["mask_id"])
            got = outputs[task][:CHECKED_ROWS]
            if stopping:
                bench.check(first_stops_equal(got, statement, prompt.shape[1],
                                              (special["eos_id"], special["eot_id"])),
                            f"{task}: up to each answer's first EOS/EoT, the tokens of the "
                            f"plain statement without stopping (first {CHECKED_ROWS} problems)")
            else:
                bench.assert_equal(got, statement, f"{task}: tokens of the plain statement "
                                                   f"(first {CHECKED_ROWS} problems)")

    result = accuracy(tokenizer, special, batches, outputs)
    for task, value in result.items():
        bench.figure(f"{task} accuracy", 100 * value, "%")
    mean = sum(result.values()) / len(result)
    exact_mean = sum(exact_accuracy.values()) / len(exact_accuracy)
    bench.figure("mean accuracy", 100 * mean, "%")
    bench.figure("vs exact", 100 * (mean - exact_mean), "points")
    answers = sum(len(items) for _, _, items in batches.values())
    if forwards:
        per_answer = sum(int(f.sum()) for f in forwards.values()) / answers
    else:  # the reference runs every step of every block
        per_answer = float(SETTING["steps"])
    bench.figure("forwards per answer", per_answer)
    bench.figure("answers/s", answers / sides["time"].median)
    if mode == "dual + threshold 0.9":  # counts, not times: checked on any machine
        bench.check(100 * (exact_mean - mean) <= 2 and SETTING["steps"] / per_answer >= 3,
                    "issue 13's target: within 2 points of exact accuracy with at least 3x "
                    "fewer forwards per answer")
