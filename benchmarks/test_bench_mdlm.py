"""Masked LMs (genjo_fast.mdlm, the text-diffusion pipeline's sampler) vs a plain statement of
the upstream loop, and adaptive length.

``test_bench_mdlm`` (issue 12): a 2-layer ModernBERT-shaped ``ModernBertForMaskedLM`` with
random weights (hidden 768, intermediate 1152, 12 heads, vocab 50368), prompts of 64 tokens,
192 generated positions (``max_length`` 256), 64 steps, batch 8, diffusionGPT's defaults
(random reveal, edits on). Sides:

* ``upstream``: a plain statement of diffusionGPT's loop as it runs (:func:`upstream_generate`):
  one prompt at a time, the full ``(1, 256, V)`` logits every step, a
  ``torch.distributions.Categorical`` over the whole vocabulary for every position, fresh
  ``torch.rand`` draws. Each prompt runs the same loop on the same shapes, so the side runs
  ``UPSTREAM_PROMPTS`` of the prompts and its time is scaled to the batch (the figure
  ``upstream, scaled to the batch``; every prompt would take about half an hour of the 2-core
  machine); its peak memory is that of one prompt's loop whatever their number;
* ``genjo_fast``: ``mdlm_generate`` with its defaults: the 8 prompts as one batch, the LM head
  and the sampler on the rows each step changes, the model run as many canvas rows at a time
  as the forward memory budget holds (``forward_memory_mib``, 48 MiB: two rows here);
* ``genjo_fast one forward``: the same with ``forward_batch_size=8`` (the whole batch in one
  forward, the previous default): what the budget saves.

Checks: the timed outputs keep the prompts and leave no mask (every side); with the same draws
(:class:`KeyedDraws`), ``mdlm_generate`` (default and one forward) gives the tokens of the
plain statement of the upstream loop (:func:`genjo_fast.reference_mdlm.generate`, batch 1 per
row) on 2 prompts, 32 generated positions and 3 steps. Targets: 4x faster and 4x lower peak
memory than upstream (the default side).

``test_bench_mdlm_adaptive_length``: a 2-layer GPT-2-shaped DiffuGPT (hidden 768, vocab 50257)
whose prediction at a chosen position is EOS, a 512-token canvas (prompt 64), 32 steps,
batch 2: a fixed-length run vs ``adaptive_length=True`` (approximate), with the forward work
(positions through the body, rows through the LM head, the FLOPs they imply) and the time.
Checks: the adaptive answer ends at the EOS position; both modes give the statement's tokens
with the same draws (a 128-token canvas, 3 steps).

Quick mode: batch 2, 32 generated positions, 4 steps; adaptive length on a 256-token canvas,
4 steps. Run with ``pytest benchmarks/test_bench_mdlm.py --benchmark-only -s``.
"""
import pytest
import torch

from genjo_fast import reference_mdlm
from genjo_fast.mdlm import mdlm_generate
from genjo_fast.mdlm_contract import (edit_probability, model_call_kwargs, unmask_probability,
                                      visible_positions)

from harness import quick

transformers = pytest.importorskip("transformers")

MASK_ID, PAD_ID, EOS_ID = 50284, 50283, 50282  # ModernBERT's [MASK], [PAD], [SEP]
PROMPT = 64
GENERATED, STEPS, BATCH = quick(192, 32), quick(64, 4), quick(8, 2)
UPSTREAM_PROMPTS = 1  # timed, then scaled to BATCH (see the module docstring)
TARGETS = {"speed-up": 4.0, "memory ratio": 4.0}


class KeyedDraws:
    """An :class:`~genjo_fast.mdlm_contract.MDLMDraws` source whose numbers depend only on
    (step, batch row, position), computed when asked: the statement (every position of every
    row) and genjo_fast (the rows it computes) get the same numbers without a
    ``(steps, B, L, V)`` tensor in memory. ``length``: the canvas length."""

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed = length, seed

    def _rand(self, kind, step, row, position, n, dtype):
        g = torch.Generator().manual_seed(
            ((((self.seed * 3 + kind) * 100_003 + step) * 1_009 + row) * 10_007) + position)
        return torch.rand(n, dtype=dtype, generator=g)

    def token(self, step, batch_index, positions, vocab, device):
        return torch.stack([self._rand(0, step, b, p, vocab, torch.float64) for b, p in
                            zip(batch_index.tolist(), positions.tolist())]).to(device)

    def _decisions(self, kind, step, batch_index, start, stop, device):
        return torch.stack([self._rand(kind, step, b, -1, self.length, torch.float32)[start:stop]
                            for b in batch_index.tolist()]).to(device)

    def unmask(self, step, batch_index, start, stop, device):
        return self._decisions(1, step, batch_index, start, stop, device)

    def edit(self, step, batch_index, start, stop, device):
        return self._decisions(2, step, batch_index, start, stop, device)


@torch.no_grad()
def upstream_generate(model, prompt, *, max_length, num_steps, mask_id, pad_id, eos_id):
    """diffusionGPT's loop for one prompt, as upstream runs it (full logits, a Categorical over
    the whole vocabulary for every position, fresh torch.rand draws), in plain torch."""
    x = torch.full((1, max_length), mask_id, dtype=torch.long, device=prompt.device)
    x[0, :len(prompt)] = prompt
    generated = (x == mask_id) | (x == pad_id)
    for step in range(num_steps):
        logits = model(input_ids=x, **model_call_kwargs(model)).logits
        logits[:, :, mask_id] = torch.finfo(logits.dtype).min
        probs = torch.softmax(logits, dim=-1)
        sampled = torch.distributions.Categorical(probs).sample()
        still = (x == mask_id) | (x == pad_id)
        reveal = torch.rand(x.shape, device=x.device) < unmask_probability(step, num_steps)
        update = reveal & still & generated
        edit = torch.rand(x.shape, device=x.device) < edit_probability(step, num_steps)
        update |= edit & visible_positions(x, generated, mask_id, pad_id, eos_id)
        x[update] = sampled[update]
    return x


def modernbert(device):
    config = transformers.ModernBertConfig(
        vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=2,
        num_attention_heads=12, max_position_embeddings=512, pad_token_id=PAD_ID,
        eos_token_id=EOS_ID, bos_token_id=50281, cls_token_id=50281, sep_token_id=EOS_ID)
    torch.manual_seed(0)
    return transformers.ModernBertForMaskedLM(config).eval().to(device)


def check_generated(bench, out, prompts, what):
    bench.check(all(torch.equal(row[:len(p)], p) for row, p in zip(out, prompts))
                and not bool((out == MASK_ID).any()),
                f"{what}: the prompts kept and every position unmasked")


def test_bench_mdlm(bench, device):
    model = modernbert(device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50000, (PROMPT,), generator=g).to(device) for _ in range(BATCH)]
    setting = dict(max_length=PROMPT + GENERATED, num_steps=STEPS, mask_id=MASK_ID,
                   pad_id=PAD_ID, eos_id=EOS_ID)
    bench.describe(dict(case=f"batch {BATCH}, prompt {PROMPT}, {GENERATED} generated, "
                             f"{STEPS} steps"),
                   model="ModernBERT-shaped, 2 layers, hidden 768, vocab 50368", batch=BATCH,
                   prompt_length=PROMPT, generated=GENERATED, steps=STEPS,
                   upstream_prompts=UPSTREAM_PROMPTS, allow_edits=True, use_confidence=False)

    def upstream(steps):
        return lambda: torch.cat([upstream_generate(model, p, **dict(setting, num_steps=steps))
                                  for p in prompts[:UPSTREAM_PROMPTS]])

    def fast(steps, **kw):
        return lambda: mdlm_generate(model, prompts, **dict(setting, num_steps=steps), **kw)

    sides = bench.measure(
        {"upstream": upstream(STEPS), "genjo_fast": fast(STEPS),
         "genjo_fast one forward": fast(STEPS, forward_batch_size=BATCH)},
        repeats=1, memory=True,  # a round takes minutes; warm-up: 2 steps, the same shapes
        warmup_sides={"upstream": upstream(2), "genjo_fast": fast(2),
                      "genjo_fast one forward": fast(2, forward_batch_size=BATCH)})
    check_generated(bench, sides["upstream"].out, prompts[:UPSTREAM_PROMPTS], "upstream")
    for name in ("genjo_fast", "genjo_fast one forward"):
        check_generated(bench, sides[name].out, prompts, name)

    few = dict(setting, max_length=PROMPT + 32, num_steps=3)
    expected = reference_mdlm.generate(model, prompts[:2], draws=KeyedDraws(PROMPT + 32), **few)
    for what, kw in (("genjo_fast", {}), ("genjo_fast one forward", dict(forward_batch_size=2))):
        bench.assert_equal(mdlm_generate(model, prompts[:2], draws=KeyedDraws(PROMPT + 32),
                                         **few, **kw), expected,
                           f"{what}: tokens identical to the plain statement of the upstream "
                           f"loop with the same draws (2 prompts, 32 generated, 3 steps)")

    scaled = sides["upstream"].median * BATCH / UPSTREAM_PROMPTS
    bench.figure("upstream, scaled to the batch", scaled, "s")
    for name, suffix in (("genjo_fast", ""), ("genjo_fast one forward", " (one forward)")):
        speed_up = bench.figure("speed-up" + suffix, scaled / sides[name].median, "x")
        memory = bench.ratio("memory ratio" + suffix, "upstream", name, memory=True)
        if not suffix:
            bench.target("speed-up", speed_up, TARGETS["speed-up"])
            bench.target("memory ratio", memory, TARGETS["memory ratio"])


CANVAS, ANSWER = quick(512, 256), 16  # DiffuGPT's fixed 512 positions; the answer ends at 80
ADAPTIVE_STEPS = quick(32, 4)
GPT2_EOS, GPT2_MASK = 50256, 50255  # a stand-in mask id (DiffuGPT adds one to GPT-2's vocab)


def diffugpt_with_eos_at(position, device):
    """A GPT-2-shaped random DiffuGPT (full attention, shifted logits) whose prediction at
    ``position`` is EOS: the position embedding of ``position - 1`` points at EOS's row."""
    config = transformers.GPT2Config(vocab_size=50257, n_embd=768, n_layer=2, n_head=12,
                                     n_positions=1024, eos_token_id=GPT2_EOS,
                                     bos_token_id=GPT2_EOS)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wpe.weight[position - 1] += 40 * model.lm_head.weight[GPT2_EOS]
    return model.to(device)


def test_bench_mdlm_adaptive_length(bench, device):
    model = diffugpt_with_eos_at(PROMPT + ANSWER, device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50000, (PROMPT,), generator=g).to(device) for _ in range(2)]
    setting = dict(max_length=CANVAS, num_steps=ADAPTIVE_STEPS, mask_id=GPT2_MASK,
                   pad_id=GPT2_EOS, eos_id=GPT2_EOS, shift=1, allow_edits=False,
                   length_threshold=0.9)
    bench.describe(dict(case=f"batch 2, canvas {CANVAS}, EOS at {PROMPT + ANSWER}, "
                             f"{ADAPTIVE_STEPS} steps"),
                   model="GPT-2-shaped DiffuGPT, 2 layers, hidden 768, vocab 50257", batch=2,
                   prompt_length=PROMPT, answer=ANSWER, **setting)

    def run(adaptive, steps):
        return lambda: mdlm_generate(model, prompts, adaptive_length=adaptive, return_stats=True,
                                     generator=torch.Generator(device=device).manual_seed(0),
                                     **dict(setting, num_steps=steps))

    sides = bench.measure({"fixed": run(False, ADAPTIVE_STEPS),
                           "adaptive": run(True, ADAPTIVE_STEPS)}, repeats=1,
                          warmup_sides={"fixed": run(False, 2), "adaptive": run(True, 2)})
    (fixed, fixed_stats), (adaptive, stats) = sides["fixed"].out, sides["adaptive"].out
    bench.check(bool((adaptive[:, PROMPT + ANSWER] == GPT2_EOS).all())
                and bool((adaptive[:, PROMPT + ANSWER + 1:] == GPT2_EOS).all()),
                "adaptive: the answer ends at the EOS position, pad after it")
    small = dict(setting, max_length=128, num_steps=3)
    for adaptive_length in (False, True):
        bench.assert_equal(
            mdlm_generate(model, prompts, adaptive_length=adaptive_length,
                          draws=KeyedDraws(128), **small),
            reference_mdlm.generate(model, prompts, adaptive_length=adaptive_length,
                                    draws=KeyedDraws(128), **small),
            f"{'adaptive' if adaptive_length else 'fixed'}: tokens identical to the statement "
            f"with the same draws (canvas 128, 3 steps)")
    body = sum(p.numel() for p in model.transformer.h.parameters())
    gflops = {name: (2 * body * s.forward_tokens + 2 * 768 * 50257 * s.head_rows) / 1e9
              for name, s in (("fixed", fixed_stats), ("adaptive", stats))}
    bench.figure("forward positions, fixed", fixed_stats.forward_tokens)
    bench.figure("forward positions, adaptive", stats.forward_tokens)
    bench.figure("GFLOP, fixed", gflops["fixed"])
    bench.figure("GFLOP, adaptive", gflops["adaptive"])
    bench.ratio("speed-up", "fixed", "adaptive")
