"""Variable length (APPROXIMATE, opt-in ``adaptive_length``): the work an answer's predicted
end saves LLaDA's ``generate``, against the fixed-length canvas.

Setting of the constraints/variable-length issue: a random LLaDA model (vocab 126464, 2
layers, d_model 64; genjo_fast's own model, its LM head on the sampled rows only) whose EOS
logit gets +20 from a chosen answer position on in each row
(:class:`genjo_fast.testing.EOSBias`: a model that pads its answer with EOS, as LLaDA's SFT
trains it to), prompt 64, temperature 0. Cases:

* ``B1_blocks``: batch 1, gen 256 in blocks of 32, 128 steps, the answer ending at 40: the
  blocks after the end never run;
* ``B4_one_block``: batch 4, gen 128 in one block, 32 steps, answers ending at 16, 32, 48, 64:
  every step after the first runs on the longest answer (65 columns) instead of 128, the
  shorter rows' tails masked out of the attention, and samples 65 rows instead of 128.

Sides: ``fixed`` (the exact sampler) and ``adaptive`` (``adaptive_length=True``, threshold
0.5). Figures: the speed-up, the model forwards and the canvas positions they ran over
(``batch x width`` summed over forwards) on each side. Checks: the adaptive tokens are the
plain statement's (:func:`genjo_fast.reference.generate` with ``adaptive_length``) on the same
setting with 2 steps per block (the statement computes full logits every step); every row is
EOS from its end on. Targets: ``B1_blocks`` 4x faster (8 blocks, 2 run); ``B4_one_block``
1.5x. Run with ``pytest benchmarks/test_bench_adaptive_length.py --benchmark-only -s``.
"""
import pytest
import torch

import genjo_fast
from genjo_fast import reference
from genjo_fast.contract import EOS_ID, MASK_ID
from genjo_fast.testing import EOSBias, random_llada, random_prompts

from harness import quick

VOCAB, PROMPT = 126464, 64
CASES = {  # batch, gen_length, block_length, steps, answer ends
    "B1_blocks": (1, quick(256, 64), quick(32, 16), quick(128, 16), [quick(40, 12)]),
    "B4_one_block": (quick(4, 2), quick(128, 64), quick(128, 64), quick(32, 8),
                     quick([16, 32, 48, 64], [10, 30])),
}
TARGETS = {"B1_blocks": 4.0, "B4_one_block": 1.5}


@pytest.fixture(scope="module")
def base(device):
    return random_llada(VOCAB, d_model=64, n_heads=4, n_layers=2, seed=0, device=device)


class Counted(torch.nn.Module):
    """Counts the forwards and the canvas positions they run over."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.forwards = self.positions = 0

    def forward(self, input_ids, attention_mask=None, logits_slice=None):
        self.forwards += 1
        self.positions += input_ids.numel()
        return self.model(input_ids, attention_mask, logits_slice=logits_slice)


@pytest.mark.parametrize("case", list(CASES))
def test_bench_adaptive_length(bench, device, base, case):
    batch, gen_length, block_length, steps, ends = CASES[case]
    model = EOSBias(base, EOS_ID, PROMPT + torch.tensor(ends)).to(device)
    prompt, attention_mask = random_prompts(batch, PROMPT, VOCAB, pad_id=EOS_ID,
                                            avoid=(MASK_ID, EOS_ID), seed=0)
    prompt, attention_mask = prompt.to(device), attention_mask.to(device)
    setting = dict(steps=steps, gen_length=gen_length, block_length=block_length)
    bench.describe(dict(case=f"batch {batch}, gen {gen_length}, block {block_length}, steps "
                             f"{steps}, answers end at {ends}"),
                   batch=batch, prompt_length=PROMPT, vocab=VOCAB, d_model=64, layers=2,
                   eos_bias=20.0, length_threshold=0.5, ends=ends, **setting)

    def run(adaptive, net=model, **kw):
        # fast_model=False: the wrapper is run as given (the LLaDA model inside it is already
        # genjo_fast's own; its LM head still runs on the sampled rows only).
        return lambda: genjo_fast.generate(net, prompt, attention_mask, fast_model=False,
                                           adaptive_length=adaptive, **{**setting, **kw})

    sides = bench.measure({"fixed": run(False), "adaptive": run(True)}, repeats=3)
    out = sides["adaptive"].out
    for row, end in enumerate(ends):
        bench.check(bool((out[row, PROMPT + end:] == EOS_ID).all()),
                    "every row is EOS from its end on")
    bench.check(not bool((out == MASK_ID).any()), "every position unmasked")
    few = dict(steps=2 * (gen_length // block_length))
    bench.assert_equal(run(True, **few)(),
                       reference.generate(model, prompt, attention_mask, adaptive_length=True,
                                          **{**setting, **few}),
                       f"tokens identical to the statement's ({few['steps']} steps)")
    for name, adaptive in (("fixed", False), ("adaptive", True)):
        counted = Counted(model)
        run(adaptive, counted)()
        bench.figure(f"{name} forwards", counted.forwards)
        bench.figure(f"{name} positions", counted.positions)
    bench.figure("positions saved",
                 100 * (1 - bench.figures["adaptive positions"]["value"]
                        / bench.figures["fixed positions"]["value"]), "%")
    bench.ratio("speed-up", "fixed", "adaptive", target=TARGETS[case])
