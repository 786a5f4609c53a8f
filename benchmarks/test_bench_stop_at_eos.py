"""``stop_at_eos=True``: the forwards and the time saved when answers end early, side by side
with the same call without the option.

Setting of the issue: gen 256, block 32, answers ending in the first block. The model is a
random LLaDA model (vocab 126464, 2 layers, d_model 64, genjo_fast's LLaDAModel: the LM head
runs on the block rows only) whose EOS logit grows with the position in the answer, from 0 at
an onset (answer position 4, 6 positions later per padding position of the row) to +40 24
positions later (:class:`EndsEarly`), so that every row's answer ends within the first block,
each at its own place; left-padded batch 4, prompt 64, 128 steps (two tokens per step),
temperature 0.

Checks: each row's tokens up to and including its first EOS are identical to the call's
without the option, EOS after it; every answer ends in the first block. Figures: the forwards
(model calls) and row forwards of each side and their ratios, the time ratio. Target: 4x fewer
forwards (deterministic: checked in every mode) and a 3x speed-up.
Run with ``pytest benchmarks/test_bench_stop_at_eos.py --benchmark-only -s``.
"""
from types import SimpleNamespace

import torch
from torch import nn

import genjo_fast
from genjo_fast.testing import random_llada, random_prompts

from harness import quick

VOCAB, MASK_ID, EOS_ID, EOT_ID = 126464, 126336, 126081, 126348
PROMPT, GEN, BLOCK = 64, 256, 32
BATCH, STEPS = quick(4, 2), quick(128, 32)
REACH, TOP = 24, 40.0  # the EOS bias reaches TOP at answer position REACH


class EndsEarly(nn.Module):
    """A model whose EOS logit gets ``top * clamp((i - 4 - 6 * pads) / reach, 0, 1)`` at
    answer position ``i`` of a row with ``pads`` padding positions (0 on the prompt): its
    answers end early, each row at its own place. Takes ``logits_slice`` as the wrapped model does."""

    def __init__(self, model: nn.Module, answer_start: int, reach: int, top: float):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(vocab_size=model.config.vocab_size)  # not "llada"
        self.answer_start, self.reach, self.top = answer_start, reach, top

    def forward(self, input_ids, attention_mask=None, logits_slice=None):
        logits = self.model(input_ids, attention_mask=attention_mask,
                            logits_slice=logits_slice).logits
        positions = torch.arange(input_ids.shape[1], device=logits.device)
        if logits_slice is not None:
            positions = positions[logits_slice]
        pads = (torch.zeros(input_ids.shape[0], device=logits.device) if attention_mask is None
                else (attention_mask == 0).sum(1))
        onset = self.answer_start + 4 + 6 * pads[:, None]
        ramp = ((positions[None, :] - onset) / self.reach).clamp(0, 1) * self.top
        logits[..., EOS_ID] += ramp.to(logits.dtype)
        return SimpleNamespace(logits=logits)


def test_bench_stop_at_eos(bench, device):
    model = EndsEarly(random_llada(VOCAB, d_model=64, n_heads=4, n_layers=2, max_len=512,
                                   seed=0, device=device), PROMPT, REACH, TOP)
    prompt, attention_mask = random_prompts(BATCH, PROMPT, VOCAB, pad_id=EOS_ID,
                                            avoid=(MASK_ID, EOS_ID, EOT_ID), seed=0)
    prompt, attention_mask = prompt.to(device), attention_mask.to(device)
    setting = dict(steps=STEPS, gen_length=GEN, block_length=BLOCK, mask_id=MASK_ID,
                   eos_id=EOS_ID, eot_id=EOT_ID)
    bench.describe(dict(case=f"batch {BATCH}, gen {GEN}, block {BLOCK}, steps {STEPS}"),
                   batch=BATCH, prompt_length=PROMPT, vocab=VOCAB, d_model=64, layers=2,
                   eos_ramp=f"+{TOP:g} {REACH} positions after the onset (4 + 6 per pad)", temperature=0.0,
                   **setting)

    def run(**kw):
        return lambda: genjo_fast.generate(model, prompt, attention_mask, return_stats=True,
                                           **setting, **kw)

    sides = bench.measure({"without": run(), "stop_at_eos": run(stop_at_eos=True)},
                          repeats=3)
    (plain, plain_stats), (got, stats) = sides["without"].out, sides["stop_at_eos"].out
    ends = []
    for row_got, row_plain in zip(got[:, PROMPT:].tolist(), plain[:, PROMPT:].tolist()):
        p = next((i for i, t in enumerate(row_plain) if t in (EOS_ID, EOT_ID)), GEN)
        ends.append(p)
        bench.check(row_got[:p + 1] == row_plain[:p + 1] and
                    all(t == EOS_ID for t in row_got[p + 1:]),
                    "each row identical to the call without the option up to and including "
                    "its first EOS/EoT, EOS after it")
    bench.check(max(ends) < BLOCK, "every answer ends in the first block")
    bench.figure("answer lengths (min)", min(ends))
    bench.figure("answer lengths (max)", max(ends))
    bench.figure("forwards without", plain_stats.nfe)
    bench.figure("forwards with stop_at_eos", stats.nfe)
    bench.check(stats.nfe + stats.forwards_saved == plain_stats.nfe and
                stats.row_forwards + stats.row_forwards_saved == plain_stats.row_forwards,
                "the forwards saved reported add up to the call without the option")
    forwards = bench.figure("fewer forwards", plain_stats.nfe / stats.nfe, "x")
    bench.figure("fewer row forwards", plain_stats.row_forwards / stats.row_forwards, "x")
    bench.check(forwards >= 4, "at least 4x fewer forwards")
    bench.ratio("speed-up", "without", "stop_at_eos", target=3.0)
