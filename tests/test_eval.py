"""lm-evaluation-harness model ``genjo_fast``: requests, end-to-end runs, data parallelism.

A tiny random LLaDA checkpoint and a word-level tokenizer are written to a tmp dir, with three
local tasks over JSONL files: multiple choice (loglikelihood), generate_until and
loglikelihood_rolling. Needs the ``eval`` extra (lm-eval, accelerate); skipped without it.
"""
import inspect
import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import genjo_fast  # noqa: E402
from genjo_fast import eval as genjo_eval  # noqa: E402
from genjo_fast.likelihood import get_log_likelihood, is_greedy_continuation  # noqa: E402
from genjo_fast.models import save_llada  # noqa: E402
from genjo_fast.testing import random_llada  # noqa: E402

# Word-level vocabulary: id 0 "[UNK]", words, "." at id 23 (a token this random model
# generates often, so that stop strings matter) and the mask "[MASK]" last.
WORDS = ["[UNK]"] + [f"w{i}" for i in range(1, 23)] + ["."] + [f"w{i}" for i in range(23, 31)]
WORDS.append("[MASK]")
MASK_ID = len(WORDS) - 1
SETTINGS = dict(dtype="float32", mc_num=4, steps=4, gen_length=4, block_length=4,
                max_length=16, mask_id=MASK_ID, forward_batch_size=3)
TASKS = ["tiny_mc", "tiny_gen", "tiny_text"]
ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "GENJO_FAST_ATTENTION": "sdpa"}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for key, value in ENV.items():  # sdpa: the Triton interpreter is tested elsewhere
        monkeypatch.setenv(key, value)


def _write_tasks(root: Path) -> Path:
    rng = random.Random(0)

    def sentence(n):
        return " ".join(rng.choice(WORDS[1:MASK_ID]) for _ in range(n))

    tasks = root / "tasks"
    tasks.mkdir()
    docs = {
        "mc": [{"question": sentence(rng.randint(3, 8)),
                "choices": [sentence(rng.randint(1, 3)) for _ in range(3)],
                "label": rng.randint(0, 2)} for _ in range(6)],
        "gen": [{"question": sentence(rng.randint(2, 6)), "answer": sentence(2)}
                for _ in range(5)],
        "text": [{"text": sentence(n)} for n in (5, 30, 17)],
    }
    specs = {
        "mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}",
               "doc_to_choice": "{{choices}}", "doc_to_target": "label",
               "metric_list": [{"metric": "acc"}]},
        "gen": {"output_type": "generate_until", "doc_to_text": "{{question}}",
                "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["."]},
                "metric_list": [{"metric": "exact_match"}]},
        "text": {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                 "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}]},
    }
    for name, rows in docs.items():
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        spec = {"task": f"tiny_{name}", "dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(data)}}, **specs[name]}
        (tasks / f"{name}.yaml").write_text(json.dumps(spec, indent=1))  # YAML reads JSON
    return tasks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("genjo_eval")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model = random_llada(len(WORDS), d_model=32, n_heads=2, n_layers=2, mlp_hidden_size=64,
                         seed=1)
    save_llada(model, root / "model")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                            mask_token="[MASK]").save_pretrained(root / "model")
    return root, _write_tasks(root)


@pytest.fixture(scope="module")
def lm(workdir):
    return genjo_eval.GenjoFastLM(pretrained=str(workdir[0] / "model"), batch_size=2,
                                  device="cpu", **SETTINGS)


def requests(kind, args):
    from lm_eval.api.instance import Instance
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def encode(lm, text):
    return torch.tensor(lm.tokenizer(text)["input_ids"], dtype=torch.long)


def test_loglikelihood_is_the_estimator_with_per_request_draws(lm):
    args = [("w1 w2 w3", " w4 w5"), ("", " w6"), ("w1 w2 w3", " w4 w5"), ("w7 ", "w8 w9"),
            ("w1", "")]
    out = lm.loglikelihood(requests("loglikelihood", args))
    for (context, continuation), (logp, greedy) in zip(args[:2], out):
        prompt, answer = encode(lm, context), encode(lm, continuation)
        pair = (tuple(prompt.tolist()), tuple(answer.tolist()))
        expected = get_log_likelihood(lm.model, prompt, answer, 4, 2, mask_id=MASK_ID,
                                      draws=lm._draws(pair))
        assert logp == pytest.approx(expected, rel=1e-5)
        assert greedy is is_greedy_continuation(lm.model, prompt, answer, mask_id=MASK_ID)
    assert out[2] == out[0]  # seeded by the tokens: identical requests, identical results
    # As the reference harness: the context's trailing space moves to the continuation. (The
    # same draws in another batch composition: equal to float rounding.)
    alone = lm.loglikelihood(requests("loglikelihood", [("w7", " w8 w9")]))[0]
    assert out[3] == pytest.approx(alone, rel=1e-6)
    assert out[4] == (0.0, True)  # an empty continuation has probability 1


def test_loglikelihood_rolling_windows(lm):
    words = [WORDS[1 + i % 30] for i in range(30)]
    short, long = " ".join(words[:10]), " ".join(words)
    out = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,), (long,)]))

    def estimate(context, answer):
        pair = (tuple(context), tuple(answer))
        return get_log_likelihood(lm.model, torch.tensor(context, dtype=torch.long),
                                  torch.tensor(answer, dtype=torch.long), 4, 2,
                                  mask_id=MASK_ID, draws=lm._draws(pair))
    ids = encode(lm, long).tolist()
    # No BOS/EOS in this tokenizer: the first window has no context. Windows hold
    # max_length - 1 = 15 tokens; the second is conditioned on the token before it.
    assert out[0] == pytest.approx(estimate([], ids[:10]), rel=1e-5)
    assert out[1] == pytest.approx(estimate([], ids[:15]) + estimate(ids[14:15], ids[15:]),
                                   rel=1e-5)


def test_generate_until_cuts_at_the_first_stop_string(lm):
    contexts = ["w1 w2 w3", "w4", "w5 w6 w7", "w8 w9"]
    stops = [["."], "w30", [".", "w11"], []]
    out = lm.generate_until(requests("generate_until",
                                     [(c, {"until": s}) for c, s in zip(contexts, stops)]))
    for context, stop, text in zip(contexts, stops, out):
        prompt = encode(lm, context)[None]
        tokens = genjo_fast.generate(lm.model, prompt, steps=4, gen_length=4, block_length=4,
                                     mask_id=MASK_ID)[0, prompt.shape[1]:]
        full = lm.tokenizer.decode(tokens, skip_special_tokens=True)
        stop = [stop] if isinstance(stop, str) else stop
        cut = min([full.find(s) for s in stop if s in full], default=len(full))
        assert text == full[:cut].strip()


def test_cut_at_stop():
    assert genjo_eval._cut_at_stop("a b . c", ["c", "."]) == "a b "
    assert genjo_eval._cut_at_stop("abc", []) == "abc"
    assert genjo_eval._cut_at_stop("abc", ["", "x"]) == "abc"


def test_bad_model_args(workdir):
    path = str(workdir[0] / "model")
    with pytest.raises(ValueError, match=r"mc_num \(5\) must be a multiple of batch_size"):
        genjo_eval.GenjoFastLM(pretrained=path, batch_size=2, mc_num=5)
    with pytest.raises(ValueError, match="pretrained"):
        genjo_eval.GenjoFastLM()
    with pytest.raises(ValueError, match=r"gen_length \(6\) must be a multiple of block_length"):
        genjo_eval.GenjoFastLM(pretrained=path, gen_length=6, block_length=4)
    with pytest.raises(ValueError, match="block_length must be >= 1"):
        genjo_eval.GenjoFastLM(pretrained=path, gen_length=4, block_length=0)
    with pytest.raises(ValueError, match="cfg must be a number, got 'x'"):
        genjo_eval.GenjoFastLM(pretrained=path, cfg="x")


def test_unknown_model_args_are_rejected_before_loading():
    # A path that does not exist: the names are checked before anything is loaded.
    with pytest.raises(ValueError, match=r"'mc_nums' \(did you mean 'mc_num'\?\)") as info:
        genjo_eval.GenjoFastLM.create_from_arg_string("pretrained=/nonexistent,mc_nums=64",
                                                      {"device": "cpu"})
    for name in ("mc_num", "gen_length", "tokenizer", "cache", "threshold", "eos_id"):
        assert f" {name}," in str(info.value)  # the valid names are listed
    # generate keywords the harness sets itself are not model args either
    for name in ("return_stats", "temperature", "progress"):
        with pytest.raises(ValueError, match=f"unknown genjo_fast model arg '{name}'"):
            genjo_eval.GenjoFastLM(pretrained="/nonexistent", **{name: 1})


def test_generate_options_are_converted_and_checked_eagerly(workdir):
    lm = genjo_eval.GenjoFastLM(pretrained=str(workdir[0] / "model"), batch_size=2,
                                device="cpu", cache="prefix", refresh_every=2,
                                logits_eos_inf="True", eos_id=23, eot_id=None, **SETTINGS)
    # converted as generate wants them; eot_id=None means generate's default
    assert lm.generate_options == {"cache": "prefix", "refresh_every": 2,
                                   "logits_eos_inf": True, "eos_id": 23}
    bad = [({"cache": "bogus"}, "cache must be None, 'prefix' or 'dual'"),
           ({"threshold": "abc"}, "threshold must be a number"),  # a TypeError
           ({"threshold": -1.0}, "threshold must be finite and >= 0"),
           ({"threshold": 0.9, "factor": 1.0}, "threshold and factor are exclusive"),
           ({"refresh_every": 2}, "refresh_every needs a cache"),
           ({"cuda_graph": "ture"}, "cuda_graph must be a boolean"),
           ({"eos_id": "x"}, "eos_id must be an integer"),
           ({"eot_id": -1}, "eot_id must be >= 0")]
    for options, message in bad:  # all before the (nonexistent) model is looked at
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            genjo_eval.GenjoFastLM(pretrained="/nonexistent", **options)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
            genjo_eval.GenjoFastLM(pretrained="/nonexistent", device="cpu", cuda_graph=True,
                                   cache="dual")


def test_pretrained_that_is_not_a_checkpoint_directory(workdir, tmp_path):
    tokenizer = str(workdir[0] / "model")
    with pytest.raises(FileNotFoundError, match="pretrained=/nonexistent/llada: the directory "
                                                "does not exist"):
        genjo_eval.GenjoFastLM(pretrained="/nonexistent/llada", tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match=r"pretrained=\./no_such_dir: the directory"):
        genjo_eval.GenjoFastLM(pretrained="./no_such_dir", tokenizer=tokenizer)
    with pytest.raises(NotADirectoryError, match="not a directory"):
        genjo_eval.GenjoFastLM(pretrained=str(workdir[0] / "model" / "config.json"),
                               tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="the directory has no config.json"):
        genjo_eval.GenjoFastLM(pretrained=str(tmp_path), tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer=/nonexistent: the directory"):
        genjo_eval.GenjoFastLM(pretrained=str(workdir[0] / "model"), tokenizer="/nonexistent")


def test_checkpoint_without_tokenizer_files_names_the_tokenizer_arg(workdir, tmp_path):
    save_llada(random_llada(len(WORDS), d_model=32, n_heads=2, n_layers=1, seed=2),
               tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory .*bare holds no "
                                                r"tokenizer files .*model arg tokenizer="):
        genjo_eval.GenjoFastLM(pretrained=str(tmp_path / "bare"), device="cpu", batch_size=2,
                               **SETTINGS)
    lm = genjo_eval.GenjoFastLM(pretrained=str(tmp_path / "bare"), device="cpu",
                                tokenizer=str(workdir[0] / "model"), batch_size=2, **SETTINGS)
    assert lm.tokenizer.convert_ids_to_tokens(MASK_ID) == "[MASK]"
    with pytest.raises(FileNotFoundError, match=r"tokenizer directory .*bare holds no"):
        genjo_eval.GenjoFastLM(pretrained=str(workdir[0] / "model"),
                               tokenizer=str(tmp_path / "bare"))


def _checkpoint(root: Path, workdir, mask_in_tokenizer=True, **ids) -> str:
    """A tiny checkpoint with the special ``ids`` in its config and workdir's tokenizer
    (without its mask token if ``mask_in_tokenizer`` is False)."""
    from transformers import AutoTokenizer

    save_llada(random_llada(len(WORDS), d_model=32, n_heads=2, n_layers=1, seed=3, **ids), root)
    tokenizer = AutoTokenizer.from_pretrained(str(workdir[0] / "model"))
    if not mask_in_tokenizer:
        tokenizer.mask_token = None
    tokenizer.save_pretrained(root)
    return str(root)


def test_special_ids_default_to_the_checkpoint(workdir, tmp_path):
    settings = {k: v for k, v in SETTINGS.items() if k != "mask_id"}
    # the config's ids (not the tokenizer's mask 33, not LLaDA's constants)
    path = _checkpoint(tmp_path / "ids", workdir, mask_token_id=32, eos_token_id=23)
    lm = genjo_eval.GenjoFastLM(pretrained=path, device="cpu", batch_size=2, **settings)
    assert (lm.mask_id, lm.generate_options["eos_id"]) == (32, 23)
    (logp, _), = lm.loglikelihood(requests("loglikelihood", [("w1 w2 w3", " w4 w5")]))
    prompt, answer = encode(lm, "w1 w2 w3"), encode(lm, " w4 w5")
    assert logp == pytest.approx(get_log_likelihood(
        lm.model, prompt, answer, 4, 2, mask_id=32,
        draws=lm._draws((tuple(prompt.tolist()), tuple(answer.tolist())))), rel=1e-5)
    # explicit model args win
    lm = genjo_eval.GenjoFastLM(pretrained=path, device="cpu", batch_size=2, mask_id=MASK_ID,
                                eos_id=5, **settings)
    assert (lm.mask_id, lm.generate_options["eos_id"]) == (MASK_ID, 5)
    # no id in the config: the tokenizer's mask token; no EOS in either: LLaDA's (unused,
    # so not checked against this vocabulary, unless an EOS option is on: below)
    lm = genjo_eval.GenjoFastLM(pretrained=str(workdir[0] / "model"), device="cpu",
                                batch_size=2, **settings)
    assert (lm.mask_id, lm.generate_options["eos_id"]) == (MASK_ID, genjo_fast.contract.EOS_ID)
    # in neither: LLaDA's, which this vocabulary does not have, so the model is refused
    path = _checkpoint(tmp_path / "none", workdir, mask_in_tokenizer=False)
    with pytest.raises(ValueError, match=r"mask_id=126336 \(from LLaDA's default \(no "
                                         r"mask_token_id .*set mask_id= in the model args"):
        genjo_eval.GenjoFastLM(pretrained=path, device="cpu", batch_size=2, **settings)
    with pytest.raises(ValueError, match=r"eos_id=126081 \(from LLaDA's default"):
        genjo_eval.GenjoFastLM(pretrained=path, device="cpu", batch_size=2, mask_id=MASK_ID,
                               logits_eos_inf=True, **settings)


def test_likelihood_needs_no_generation_settings(workdir):
    # The defaults steps = gen_length = block_length = 1024 exceed max_length=16: only
    # generation needs max_length > gen_length, and it says so when asked to generate.
    likelihood_only = {k: v for k, v in SETTINGS.items()
                       if k not in ("steps", "gen_length", "block_length")}
    lm = genjo_eval.GenjoFastLM(pretrained=str(workdir[0] / "model"), batch_size=2,
                                device="cpu", **likelihood_only)
    args = [("w1 w2 w3", " w4 w5")]
    assert lm.loglikelihood(requests("loglikelihood", args)) == \
        genjo_eval.GenjoFastLM(pretrained=str(workdir[0] / "model"), batch_size=2,
                               device="cpu", **SETTINGS).loglikelihood(
            requests("loglikelihood", args))
    with pytest.raises(ValueError, match=r"max_length \(16\) must exceed gen_length \(1024\)"):
        lm.generate_until(requests("generate_until", [("w1", {"until": ["."]})]))


def test_model_args_help_is_complete():
    constructor = genjo_eval._constructor_args()
    generate_params = inspect.signature(genjo_fast.generate).parameters
    assert set(genjo_eval.MODEL_ARGS) == set(constructor)
    assert set(genjo_eval.GENERATE_OPTIONS) == set(genjo_eval._generate_parameters())
    text = genjo_eval.model_args_help()
    for name, meaning in {**genjo_eval.MODEL_ARGS, **genjo_eval.GENERATE_OPTIONS}.items():
        default = (None if name == "eos_id" else constructor[name].default
                   if name in constructor else generate_params[name].default)
        assert f"  {name}={default} " in text
        assert " ".join(meaning.split()[:4]) in " ".join(text.split())


def test_help_shows_the_model_args_then_lm_eval_help():
    run = subprocess.run([sys.executable, "-m", "genjo_fast.eval", "--help"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, **ENV})
    assert run.returncode == 0, run.stderr[-4000:]
    ours = run.stdout.index("python -m genjo_fast.eval --model_args pretrained=")
    assert ours < run.stdout.index("mc_num=128 ") < run.stdout.index("usage: lm-eval run")
    assert "--model_args" in run.stdout[run.stdout.index("usage: lm-eval run"):]


def test_cli_implies_the_model(monkeypatch):
    import lm_eval.__main__
    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    genjo_eval.main(["--tasks", "x"])
    genjo_eval.main(["run", "--model", "hf", "--tasks", "x"])
    genjo_eval.main(["ls", "tasks"])
    assert seen[0][1:] == ["--model", "genjo_fast", "--tasks", "x"]
    assert seen[1][1:] == ["run", "--model", "hf", "--tasks", "x"]
    assert seen[2][1:] == ["ls", "tasks"]


@pytest.fixture(scope="module")
def single_process(workdir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV.items():
            mp.setenv(key, value)
        model_args = ",".join(f"pretrained={workdir[0] / 'model'}".split(",") +
                              [f"{k}={v}" for k, v in SETTINGS.items()])
        return simple_evaluate(model="genjo_fast", model_args=model_args, tasks=TASKS,
                               batch_size=2, device="cpu", log_samples=True,
                               task_manager=TaskManager(include_path=str(workdir[1]),
                                                        include_defaults=False))


def test_simple_evaluate_single_process(single_process):
    results, samples = single_process["results"], single_process["samples"]
    assert 0.0 <= results["tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["tiny_gen"]["exact_match,none"] <= 1.0
    assert results["tiny_text"]["word_perplexity,none"] > 1.0
    assert [len(samples[t]) for t in TASKS] == [6, 5, 3]
    for sample in samples["tiny_mc"]:
        assert len(sample["resps"]) == 3  # one (logprob, is_greedy) per choice


def test_likelihood_tasks_run_with_the_default_generation_settings(workdir, single_process):
    # max_length=16 with the default gen_length=1024: what stopped likelihood-only tasks.
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    settings = {k: v for k, v in SETTINGS.items()
                if k not in ("steps", "gen_length", "block_length")}
    model_args = ",".join([f"pretrained={workdir[0] / 'model'}"] +
                          [f"{k}={v}" for k, v in settings.items()])
    tasks = ["tiny_mc", "tiny_text"]
    out = simple_evaluate(model="genjo_fast", model_args=model_args, tasks=tasks, batch_size=2,
                          device="cpu", task_manager=TaskManager(include_path=str(workdir[1]),
                                                                 include_defaults=False))
    for task, metric in zip(tasks, ["acc,none", "word_perplexity,none"]):
        assert out["results"][task][metric] == single_process["results"][task][metric]


def _first_responses(samples):
    return {s["doc_id"]: [r[0] for r in s["resps"]] for s in samples}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_data_parallel_matches_single_process(workdir, single_process, tmp_path):
    pytest.importorskip("accelerate")
    model_args = ",".join([f"pretrained={workdir[0] / 'model'}"] +
                          [f"{k}={v}" for k, v in SETTINGS.items()])
    # accelerate's --cpu launcher starts a single process unless MPI is set up; the
    # multi-process launcher on a machine without CUDA gives CPU processes over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "genjo_fast.eval", "--model_args", model_args, "--tasks", ",".join(TASKS),
               "--include_path", str(workdir[1]), "--batch_size", "2", "--device", "cpu",
               "--output_path", str(tmp_path), "--log_samples"]
    env = {**os.environ, **ENV, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "rank 1" in run.stderr or "rank 1" in run.stdout  # really two ranks

    for task in TASKS:
        files = list(tmp_path.rglob(f"samples_{task}_*.jsonl"))
        assert len(files) == 1
        parallel = _first_responses(json.loads(line) for line in files[0].read_text().split("\n")
                                    if line)
        single = _first_responses(single_process["samples"][task])
        assert parallel.keys() == single.keys()
        for doc_id, responses in single.items():
            for a, b in zip(responses, parallel[doc_id]):
                if task == "tiny_gen":
                    assert a == b
                else:  # (logprob, is_greedy) or logprob; written as strings
                    a, b = (a, b) if isinstance(a, (list, tuple)) else ([a], [b])
                    assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-5)
                    assert [str(x) for x in a[1:]] == [str(x) for x in b[1:]]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]
    for task, metric in zip(TASKS, ["acc,none", "exact_match,none", "word_perplexity,none"]):
        assert results[task][metric] == pytest.approx(
            single_process["results"][task][metric], rel=1e-6)
