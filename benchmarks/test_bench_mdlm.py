"""Masked LMs (genjo_fast.mdlm) vs a plain statement of the upstream loop, and adaptive length.

``test_bench_mdlm`` (issue 12, item 3): a 2-layer ModernBERT-shaped ``ModernBertForMaskedLM``
with random weights (hidden 768, intermediate 1152, 12 heads, vocab 50368), prompts of 64
tokens, 192 generated positions (``max_length`` 256), 64 steps, batch 8, diffusionGPT's
defaults (random reveal, edits on). ``upstream`` is a plain statement of diffusionGPT's loop as
it runs: one prompt at a time, the full ``(1, 256, V)`` logits every step, a
``torch.distributions.Categorical`` over the full vocabulary for every position. ``genjo_fast``
runs the 8 prompts as one batch, the LM head and the sampler on the rows each step changes;
``genjo_fast_fbs2`` the same with ``forward_batch_size=2`` (the model runs two canvas rows at
a time: the same tokens, a lower peak). Targets: 4x faster, 4x lower peak memory. The
upstream loop handles one prompt after the other, each with the same shapes and work, so it
is timed on ``UPSTREAM_PROMPTS`` of the 8 prompts and its time scaled to 8 (about 3 s per
prompt and step on the 2-core CPU machine: 8 prompts would take half an hour); its peak memory
is that of one prompt's loop, whatever their number.

``test_bench_adaptive_length`` (item 4): a 2-layer GPT-2-shaped DiffuGPT (hidden 768, vocab
50257) whose prediction at a chosen position is EOS, a 512-token canvas (prompt 64), 32 steps,
batch 2: a fixed-length run vs ``adaptive_length=True`` (approximate), with the forward work
(positions run through the body, rows through the LM head, and the FLOPs they imply) and time.

Run with ``pytest benchmarks/test_bench_mdlm.py --benchmark-only -s``; ratios are printed and
stored in each benchmark's ``extra_info``. Self-contained (pytest-benchmark's ``benchmark``
fixture, not yet the harness's ``bench``); measured before the harness landed, with 2 torch
threads (the harness now pins 1 unless ``GENJO_FAST_BENCH_THREADS`` says otherwise).
"""
import pytest
import torch

from genjo_fast.mdlm import mdlm_generate
from genjo_fast.mdlm_contract import (edit_probability, model_call_kwargs, unmask_probability,
                                      visible_positions)
from genjo_fast.timing import peak_memory  # hands the heap's free memory back first

transformers = pytest.importorskip("transformers")

MASK_ID, PAD_ID, EOS_ID = 50284, 50283, 50282  # ModernBERT's [MASK], [PAD], [SEP]
PROMPT, GENERATED, STEPS, BATCH = 64, 192, 64, 8
UPSTREAM_PROMPTS = 2  # timed, then scaled to BATCH (see the module docstring)
_results = {}


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


@pytest.fixture(scope="module")
def setting(device):
    model = modernbert(device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50000, (PROMPT,), generator=g).to(device) for _ in range(BATCH)]
    with torch.no_grad():  # warm up, so that the first case measured does not pay for it
        model(input_ids=torch.stack(prompts))
    return model, prompts


# upstream runs first so that the ratio comes from one run, side by side.
@pytest.mark.parametrize("impl", ["upstream", "genjo_fast", "genjo_fast_fbs2"])
def test_bench_mdlm(benchmark, device, setting, impl):
    model, prompts = setting
    options = dict(max_length=PROMPT + GENERATED, num_steps=STEPS, mask_id=MASK_ID,
                   pad_id=PAD_ID, eos_id=EOS_ID)
    memory = {}

    def call():
        torch.manual_seed(0)
        with peak_memory(device, memory):
            if impl == "upstream":
                return torch.cat([upstream_generate(model, p, **options)
                                  for p in prompts[:UPSTREAM_PROMPTS]])
            return mdlm_generate(model, prompts, **options,
                                 forward_batch_size=2 if impl == "genjo_fast_fbs2" else None)

    out = benchmark.pedantic(call, rounds=1, iterations=1, warmup_rounds=0)
    assert out.shape == (UPSTREAM_PROMPTS if impl == "upstream" else BATCH, PROMPT + GENERATED)
    assert not bool((out == MASK_ID).any())
    seconds = benchmark.stats.stats.mean
    if impl == "upstream":
        seconds *= BATCH / UPSTREAM_PROMPTS
    benchmark.extra_info.update(impl=impl, seconds=seconds, peak_mib=memory["peak"] / 2**20,
                                device=str(device))
    if impl == "upstream":
        _results["mdlm"] = (seconds, memory["peak"])
        return
    ref_seconds, ref_peak = _results["mdlm"]
    benchmark.extra_info.update(speedup=ref_seconds / seconds,
                                memory_ratio=ref_peak / max(memory["peak"], 1))
    print(f"\nmdlm B{BATCH} prompt {PROMPT} gen {GENERATED} steps {STEPS}: {impl} "
          f"{ref_seconds / seconds:.2f}x faster than upstream's loop ({ref_seconds:.1f} s "
          f"(timed on {UPSTREAM_PROMPTS} prompts, scaled) -> "
          f"{seconds:.1f} s), peak memory {ref_peak / 2**20:.0f} MiB -> "
          f"{memory['peak'] / 2**20:.0f} MiB ({ref_peak / max(memory['peak'], 1):.1f}x lower)")


CANVAS, ANSWER = 512, 16  # DiffuGPT's fixed 512 positions; the answer ends at 64 + 16


def diffugpt_with_eos_at(position, device):
    """A GPT-2-shaped random DiffuGPT (full attention, shifted logits) whose prediction at
    ``position`` is EOS: the position embedding of ``position - 1`` points at EOS's row."""
    config = transformers.GPT2Config(vocab_size=50257, n_embd=768, n_layer=2, n_head=12,
                                     n_positions=1024, eos_token_id=50256, bos_token_id=50256)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wpe.weight[position - 1] += 40 * model.lm_head.weight[50256]
    return model.to(device)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_bench_adaptive_length(benchmark, device, mode):
    eos, mask = 50256, 50255  # a stand-in mask id (DiffuGPT adds one to GPT-2's vocabulary)
    model = diffugpt_with_eos_at(PROMPT + ANSWER, device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50000, (PROMPT,), generator=g).to(device) for _ in range(2)]

    def call():
        return mdlm_generate(model, prompts, max_length=CANVAS, num_steps=32, mask_id=mask,
                             pad_id=eos, eos_id=eos, shift=1, allow_edits=False,
                             adaptive_length=mode == "adaptive", length_threshold=0.9,
                             generator=torch.Generator(device=device).manual_seed(0),
                             return_stats=True)

    out, stats = benchmark.pedantic(call, rounds=1, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.mean
    body = sum(p.numel() for p in model.transformer.h.parameters())
    flops = 2 * body * stats.forward_tokens + 2 * 768 * 50257 * stats.head_rows
    benchmark.extra_info.update(mode=mode, seconds=seconds, forward_tokens=stats.forward_tokens,
                                head_rows=stats.head_rows, gflops=flops / 1e9)
    if mode == "fixed":
        _results["fixed"] = (seconds, stats, flops)
        return
    assert bool((out[:, PROMPT + ANSWER] == eos).all())
    ref_seconds, ref_stats, ref_flops = _results["fixed"]
    print(f"\nadaptive length (answer {ANSWER} of {CANVAS - PROMPT}): forward positions "
          f"{ref_stats.forward_tokens} -> {stats.forward_tokens}, LM-head rows "
          f"{ref_stats.head_rows} -> {stats.head_rows}, ~{ref_flops / 1e9:.0f} -> "
          f"{flops / 1e9:.0f} GFLOP (matmuls), time {ref_seconds:.1f} s -> {seconds:.1f} s "
          f"({ref_seconds / seconds:.1f}x)")
