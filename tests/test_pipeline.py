"""The transformers pipeline task "text-diffusion" (genjo_fast.pipeline).

Real transformers classes with tiny random configs and a word-level tokenizer built in-process
(mask, pad, EOS and chat markers); nothing is downloaded.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import BertModel, pipeline  # noqa: E402
from transformers.pipelines import PIPELINE_REGISTRY  # noqa: E402

from genjo_fast.mdlm import mdlm_generate  # noqa: E402
from genjo_fast.pipeline import TextDiffusionPipeline  # noqa: E402
from genjo_fast.testing_mdlm import (EOS_ID, KINDS, MASK_ID, PAD_ID, tiny_model,  # noqa: E402
                                     tiny_tokenizer)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["<|im_start|> user what is the cat <|im_end|> <|im_start|> assistant",
           "yes no", "the big red dog ran to the house and the cat sat on a mat"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def pipes(tokenizer):
    built = {}
    for kind in KINDS:
        extra = {"shift_logits": True} if kind == "gpt2" else {}
        built[kind] = pipeline("text-diffusion", model=tiny_model(kind, positions=40),
                               tokenizer=tokenizer, device="cpu", **extra)
    return built


def test_task_is_registered_through_the_registry():
    task = PIPELINE_REGISTRY.supported_tasks["text-diffusion"]
    assert task["impl"] is TextDiffusionPipeline
    assert "text-diffusion" in PIPELINE_REGISTRY.get_supported_tasks()


@pytest.mark.parametrize("kind", KINDS)
def test_call_is_mdlm_generate_on_the_tokenized_prompt(pipes, tokenizer, kind):
    """pipe(text): the tokenizer's ids, the tokenizer's special ids, the model's shift and
    max_length defaulting to the context window (40 < upstream's 512), decoded."""
    pipe = pipes[kind]
    out = pipe(PROMPTS[0], num_steps=6, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor(tokenizer.encode(PROMPTS[0]))
    assert set(out) == {"decoded_texts", "final_ids", "history"} and out["history"] is None
    assert out["final_ids"].shape == (1, 40)
    assert torch.equal(out["final_ids"][0, :len(prompt)], prompt)
    assert not bool((out["final_ids"] == MASK_ID).any())
    assert out["decoded_texts"] == [tokenizer.decode(out["final_ids"][0])]
    assert out["decoded_texts"][0].startswith(PROMPTS[0])
    expected = mdlm_generate(pipe.model, [prompt], max_length=40, num_steps=6, mask_id=MASK_ID,
                             pad_id=PAD_ID, eos_id=EOS_ID, shift=1 if kind == "gpt2" else 0,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(expected, out["final_ids"])


def test_options_given_at_construction_apply_to_every_call(tokenizer):
    model = tiny_model("bert", positions=40)
    pipe = pipeline("text-diffusion", model=model, tokenizer=tokenizer, device="cpu",
                    num_steps=3, max_length=20, allow_edits=False)
    out = pipe(PROMPTS[1], generator=torch.Generator().manual_seed(8))
    expected = mdlm_generate(model, [tokenizer.encode(PROMPTS[1])], max_length=20, num_steps=3,
                             allow_edits=False, mask_id=MASK_ID, pad_id=PAD_ID, eos_id=EOS_ID,
                             generator=torch.Generator().manual_seed(8))
    assert torch.equal(out["final_ids"], expected)


def test_batched_prompts_of_different_lengths(pipes, tokenizer):
    pipe = pipes["modernbert"]
    outs = pipe(PROMPTS, num_steps=5, max_length=32, return_history=True,
                generator=torch.Generator().manual_seed(1))
    assert isinstance(outs, list) and len(outs) == 3
    for text, out in zip(PROMPTS, outs):
        prompt = tokenizer.encode(text)
        assert out["final_ids"].shape == (1, 32)
        assert out["final_ids"][0, :len(prompt)].tolist() == prompt
        assert len(out["history"]) == 6  # the initial canvas, then every step
        assert bool((out["history"][0][0, len(prompt):] == MASK_ID).all())
        assert torch.equal(out["history"][-1], out["final_ids"])
    # batch_size=1 runs them one at a time.
    one_by_one = pipe(PROMPTS, num_steps=5, max_length=32, batch_size=1)
    assert [o["final_ids"].shape for o in one_by_one] == [(1, 32)] * 3


def test_stop_token_truncates(pipes, tokenizer):
    pipe = pipes["bert"]
    full = pipe(PROMPTS[1], num_steps=4, max_length=30,
                generator=torch.Generator().manual_seed(3))
    ids = full["final_ids"][0]
    n = len(tokenizer.encode(PROMPTS[1]))
    stop = tokenizer.convert_ids_to_tokens(int(ids[n + 3]))  # a token the answer holds
    cut = pipe(PROMPTS[1], num_steps=4, max_length=30, stop_token=stop,
               generator=torch.Generator().manual_seed(3))
    first = int((ids[n:] == ids[n + 3]).nonzero()[0])
    assert cut["final_ids"][0].tolist() == ids[:n + first].tolist()
    assert cut["decoded_texts"] == [tokenizer.decode(ids[:n + first])]


def test_stream_generation(pipes, tokenizer):
    pipe = pipes["roberta"]
    texts = list(pipe.stream_generation(PROMPTS[1], num_steps=4, max_length=20,
                                        generator=torch.Generator().manual_seed(4)))
    assert len(texts) == 5  # the canvas before the first step, then one per step
    assert texts[0] == tokenizer.decode(tokenizer.encode(PROMPTS[1]) + [MASK_ID] * 18)
    final = pipe(PROMPTS[1], num_steps=4, max_length=20,
                 generator=torch.Generator().manual_seed(4))
    assert texts[-1] == final["decoded_texts"][0]
    batched = list(pipe.stream_generation(PROMPTS[:2], num_steps=3, max_length=20))
    assert len(batched) == 4 and all(isinstance(t, list) and len(t) == 2 for t in batched)


def test_stream_generation_with_stop_token_ends_with_the_cut_text(pipes, tokenizer):
    pipe = pipes["bert"]
    options = dict(num_steps=3, max_length=24)
    texts = list(pipe.stream_generation(PROMPTS[1], generator=torch.Generator().manual_seed(5),
                                        **options))
    ids = tokenizer.encode(texts[-1])
    stop = tokenizer.convert_ids_to_tokens(ids[4])  # a token of the answer
    cut = list(pipe.stream_generation(PROMPTS[1], stop_token=stop,
                                      generator=torch.Generator().manual_seed(5), **options))
    assert cut[:-1] == texts  # every step as before, then the cut text
    assert cut[-1] == tokenizer.decode(ids[:2 + ids[2:].index(ids[4])])


@pytest.mark.parametrize("kind", ["modernbert", "gpt2"])
def test_semi_autoregressive_beyond_the_context_window(pipes, tokenizer, kind):
    pipe = pipes[kind]
    out = pipe.semi_autoregressive_generate(PROMPTS[0], block_size=16, max_length=100,
                                            num_steps=3, return_history=True,
                                            generator=torch.Generator().manual_seed(6))
    prompt = tokenizer.encode(PROMPTS[0])
    assert out["final_ids"].shape == (1, 100)  # 2.5 context windows
    assert out["final_ids"][0, :len(prompt)].tolist() == prompt
    assert not bool((out["final_ids"] == MASK_ID).any())
    blocks = -(-(100 - len(prompt)) // 16)
    assert len(out["history"]) == blocks * 3
    outs = pipe.semi_autoregressive_generate(PROMPTS[:2], block_size=16, max_length=60,
                                             num_steps=2)
    assert [o["final_ids"].shape for o in outs] == [(1, 60), (1, 60)]


def test_stream_semi_autoregressive_generate(pipes):
    pipe = pipes["bert"]
    texts = list(pipe.stream_semi_autoregressive_generate(PROMPTS[1], block_size=10,
                                                          max_length=32, num_steps=2))
    assert len(texts) == 3 * 2  # 30 tokens in blocks of 10, two steps each
    assert texts[0].startswith(PROMPTS[1]) and "<mask>" in texts[0]
    assert "<mask>" not in texts[-1]


def test_adaptive_length_option(pipes):
    out = pipes["gpt2"](PROMPTS[1], num_steps=4, max_length=30, adaptive_length=True,
                        length_threshold=0.0, generator=torch.Generator().manual_seed(7))
    # Threshold 0: the answer ends at its first position.
    assert out["final_ids"][0, 2:].tolist() == [EOS_ID] + [PAD_ID] * 27


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_top_p_and_forward_memory_options(pipes, tokenizer, kind):
    """top_p and forward_memory_mib reach mdlm_generate (a budget below one row's estimate
    runs one canvas row per forward: the same tokens)."""
    pipe = pipes[kind]
    options = dict(num_steps=4, max_length=30, top_p=0.6, temperature=0.8)
    outs = pipe(PROMPTS[:2], forward_memory_mib=1e-3, generator=torch.Generator().manual_seed(2),
                **options)
    expected = mdlm_generate(pipe.model, [tokenizer.encode(p) for p in PROMPTS[:2]],
                             mask_id=MASK_ID, pad_id=PAD_ID, eos_id=EOS_ID, shift=pipe.shift,
                             generator=torch.Generator().manual_seed(2), **options)
    assert all(torch.equal(out["final_ids"][0], row) for out, row in zip(outs, expected))
    semi = pipe.semi_autoregressive_generate(PROMPTS[1], block_size=8, max_length=50,
                                             num_steps=2, top_p=0.6, forward_memory_mib=1e-3,
                                             generator=torch.Generator().manual_seed(3))
    assert semi["final_ids"].shape == (1, 50)


def test_shift_from_the_config(tokenizer):
    model = tiny_model("gpt2", positions=40)
    model.config.shift_logits = True
    assert pipeline("text-diffusion", model=model, tokenizer=tokenizer, device="cpu").shift == 1
    masked = pipeline("text-diffusion", model=tiny_model("bert", positions=40),
                      tokenizer=tokenizer, device="cpu")
    assert masked.shift == 0


@pytest.mark.parametrize("kind", ["modernbert", "gpt2"])
def test_pipeline_from_a_checkpoint_directory(tokenizer, tmp_path, kind):
    """pipeline("text-diffusion", model=path): the registered model classes load it (a masked
    LM, or a causal LM whose saved config asks for the shift), the tokenizer comes along."""
    model = tiny_model(kind, positions=40)
    if kind == "gpt2":
        model.config.shift_logits = True
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    pipe = pipeline("text-diffusion", model=str(tmp_path), device="cpu")
    assert type(pipe.model).__name__ == type(model).__name__
    assert pipe.shift == (1 if kind == "gpt2" else 0)
    out = pipe(PROMPTS[1], num_steps=3, max_length=16, generator=torch.Generator().manual_seed(9))
    expected = mdlm_generate(model, [tokenizer.encode(PROMPTS[1])], max_length=16, num_steps=3,
                             mask_id=MASK_ID, pad_id=PAD_ID, eos_id=EOS_ID, shift=pipe.shift,
                             generator=torch.Generator().manual_seed(9))
    assert torch.equal(out["final_ids"], expected)


# ---------------------------------------------------------------------------------------------
# Bad input.

def test_unknown_options_are_errors(pipes):
    with pytest.raises(TypeError, match="unknown option\\(s\\) 'num_stepz'; the options are"):
        pipes["bert"](PROMPTS[0], num_stepz=3)
    with pytest.raises(TypeError, match="unknown option\\(s\\) 'colour'"):
        pipeline("text-diffusion", model=pipes["bert"].model, tokenizer=pipes["bert"].tokenizer,
                 device="cpu", colour="red")
    with pytest.raises(TypeError, match="semi-autoregressive: unknown option\\(s\\) 'top_k'"):
        pipes["bert"].semi_autoregressive_generate(PROMPTS[0], top_k=3)


@pytest.mark.parametrize("options, error, match", [
    (dict(num_steps=0), ValueError, "num_steps must be >= 1"),
    (dict(max_length=9), ValueError, "max_length=9 leaves no room to generate after a prompt "
                                     "of 9 tokens"),
    (dict(max_length=41), ValueError, "exceeds the model's context window \\(40 positions\\); "
                                      "generate beyond it"),
    (dict(stop_token="zebra"), ValueError, "stop_token='zebra' is not a token"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    (dict(top_p=0), ValueError, "top_p must be in"),
    (dict(forward_memory_mib=-1), ValueError, "forward_memory_mib must be a positive number"),
])
def test_bad_call_options(pipes, options, error, match):
    with pytest.raises(error, match=match):
        pipes["bert"](PROMPTS[0], **options)


def test_bad_inputs(pipes):
    with pytest.raises(TypeError, match="takes a prompt string or a non-empty list"):
        pipes["bert"](123)
    with pytest.raises(TypeError, match="takes a prompt string or a non-empty list"):
        pipes["bert"]([])
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        next(pipes["bert"].stream_generation(PROMPTS[0], num_steps=0))


def test_block_size_beyond_the_context_window(pipes):
    with pytest.raises(ValueError, match="block_size=41 must be smaller than the context "
                                         "window \\(40 positions\\)"):
        pipes["bert"].semi_autoregressive_generate(PROMPTS[0], block_size=41, max_length=90)


def test_tokenizer_without_a_mask_token(tokenizer):
    bare = tiny_tokenizer()
    bare.mask_token = None
    with pytest.raises(ValueError, match="the tokenizer has no mask token.*add_special_tokens"):
        pipeline("text-diffusion", model=tiny_model("bert", positions=40), tokenizer=bare,
                 device="cpu")


def test_model_without_a_masked_lm_head(tokenizer):
    model = BertModel(tiny_model("bert", positions=40).config)
    with pytest.raises(ValueError, match="BertModel has no language-model head.*"
                                         "AutoModelForMaskedLM"):
        pipeline("text-diffusion", model=model, tokenizer=tokenizer, device="cpu")


def test_causal_lm_needs_the_diffugpt_option(tokenizer):
    with pytest.raises(ValueError, match="GPT2LMHeadModel is a causal LM.*shift_logits=True"):
        pipeline("text-diffusion", model=tiny_model("gpt2", positions=40), tokenizer=tokenizer,
                 device="cpu")


# ---------------------------------------------------------------------------------------------
# Import: fast, optional transformers, registration when transformers' pipelines load.

REGISTERS_LATER = r'''
import sys
import genjo_fast
assert "transformers" not in sys.modules, "import genjo_fast imported transformers"
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY
assert PIPELINE_REGISTRY.supported_tasks["text-diffusion"]["impl"].__module__ == \
    "genjo_fast.pipeline"
print("ok")
'''

WITHOUT_TRANSFORMERS = r'''
import sys
sys.modules["transformers"] = None  # as if not installed: importing it fails
import genjo_fast, torch
out = genjo_fast.mdlm_generate(lambda x, attention_mask=None: torch.zeros(*x.shape, 9),
                               [[1, 2]], max_length=6, num_steps=2, mask_id=8)
assert out.shape == (1, 6)
print("ok")
'''


@pytest.mark.slow
def test_import_registers_the_task_when_transformers_pipelines_load():
    run = subprocess.run([sys.executable, "-c", REGISTERS_LATER], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_import_works_without_transformers():
    run = subprocess.run([sys.executable, "-c", WITHOUT_TRANSFORMERS], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
