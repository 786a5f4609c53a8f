"""Train a small LLaDA model on the task suite: ``python -m genjo_fast.train --out DIR``.

The objective is LLaDA's (:mod:`genjo_fast.objective`; SFT by default: the chat prompt is never
masked and the answer is followed by ``<|eot_id|>`` and padded with EOS to ``gen_length``
tokens, the window ``genjo_fast.generate`` fills), on genjo_fast's own
:class:`~genjo_fast.models.LLaDAModel` with the character-level chat tokenizer
(:mod:`genjo_fast.tokenizer`) and problems drawn from the ``train`` split of
:mod:`genjo_fast.tasks`. AdamW, linear warm-up then cosine decay of the learning rate,
gradient clipping, a tqdm progress bar.

Reproducible: the batch of step ``s`` (its problems and its masks) is a function of ``seed``
and ``s`` only, so a run resumed from a checkpoint (``--resume``) continues exactly as the
uninterrupted run would (same thread count, same machine).

Outputs, under ``--out``:

* ``checkpoint/``: the latest checkpoint, rewritten atomically every ``--checkpoint-every``
  steps: the model in the reference format (``config.json``, ``model.safetensors``: what
  :func:`~genjo_fast.models.load_llada` reads), the tokenizer files, ``trainer_state.pt``
  (optimizer state and step, read back with ``weights_only=True``) and ``training.json``.
* ``model/``: the final model, tokenizer and ``training.json`` (the settings, the command,
  the model it started from (``--init``), the wall and CPU time and the held-out exact-mode
  accuracy per task), loadable with ``load_llada`` and ``AutoTokenizer.from_pretrained``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import tasks as task_suite
from .objective import EPS, pretraining_loss, sft_loss
from .models import LLaDAConfig, LLaDAModel, load_llada, save_llada
from .tokenizer import build_tokenizer, special_ids

CHECKPOINT_DIR, MODEL_DIR = "checkpoint", "model"
STATE_NAME, INFO_NAME = "trainer_state.pt", "training.json"
OBJECTIVES = ("sft", "pretrain")


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved in its checkpoints).

    Model: ``d_model``, ``n_heads``, ``n_layers``, ``mlp_hidden_size`` (SwiGLU width),
    ``rope_theta``. Data: ``tasks`` and their sampling ``task_weights``, ``gen_length`` (the
    answer window: answer, ``<|eot_id|>``, EOS padding). Optimisation: ``steps``,
    ``batch_size``, AdamW with peak ``lr``, ``betas``, ``weight_decay`` (on matrices only),
    ``warmup`` steps of linear warm-up then cosine decay to ``min_lr_ratio * lr``,
    ``grad_clip`` (max global norm), ``eps`` of the forward process. ``objective``: ``"sft"``
    or ``"pretrain"`` (every real token maskable). ``seed`` fixes the initial weights, the
    batches and the masks.

    The defaults are the recipe of the shipped ``tiny-chat`` model. A peak learning rate above
    about 1e-3 is a trap here: ``add`` and ``sort`` (whose answers read the prompt by content)
    still learn, but ``reverse`` (which must read it by position) stays at 0% (measured: a
    4-layer model at 2e-3 never left the plateau, at 2.5e-4 to 5e-4 it learned at once).
    """
    steps: int = 6000
    batch_size: int = 64
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    betas: Tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    eps: float = EPS
    objective: str = "sft"
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    mlp_hidden_size: int = 384
    rope_theta: float = 10000.0
    tasks: Tuple[str, ...] = task_suite.TASKS
    task_weights: Tuple[float, ...] = (0.35, 0.35, 0.3)
    gen_length: int = 32
    seed: int = 0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.tasks = tuple(self.tasks)
        self.task_weights = tuple(float(w) for w in self.task_weights)
        for name in ("steps", "batch_size", "d_model", "n_heads", "n_layers",
                     "mlp_hidden_size", "gen_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is not one of {OBJECTIVES}")
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        for task in self.tasks:
            task_suite.check_task(task)
        if len(self.task_weights) != len(self.tasks) or min(self.task_weights) < 0 or not any(
                self.task_weights):
            raise ValueError(f"task_weights={self.task_weights} must give one weight >= 0 per "
                             f"task of {self.tasks}, not all 0")

    def model_config(self, tokenizer) -> LLaDAConfig:
        """The architecture for ``tokenizer``'s vocabulary, with its special ids."""
        ids = special_ids(tokenizer)
        return LLaDAConfig(d_model=self.d_model, n_heads=self.n_heads, n_layers=self.n_layers,
                           mlp_hidden_size=self.mlp_hidden_size, vocab_size=len(tokenizer),
                           rope_theta=self.rope_theta, max_sequence_length=256,
                           mask_token_id=ids["mask_id"], eos_token_id=ids["eos_id"],
                           pad_token_id=ids["pad_id"])

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**values)


# --------------------------------------------------------------------------------------------
# Model, data, schedule
# --------------------------------------------------------------------------------------------

def init_model(config: TrainConfig, tokenizer) -> LLaDAModel:
    """A fresh float32 model: normal(0, 0.02) embeddings and linear weights, the residual
    projections (``attn_out``, the blocks' ``ff_out``) scaled by ``1 / sqrt(2 n_layers)``,
    RMSNorm weights 1. Seeded by ``config.seed``."""
    torch.manual_seed(config.seed)
    model = LLaDAModel(config.model_config(tokenizer))
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    for name, param in model.named_parameters():
        if name.endswith(("attn_norm.weight", "ff_norm.weight", "ln_f.weight")):
            nn.init.ones_(param)
        elif ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight")):
            nn.init.normal_(param, std=residual_std)
        else:
            nn.init.normal_(param, std=0.02)
    return model


def load_initial_model(directory: Path, config: TrainConfig, tokenizer
                       ) -> Tuple[LLaDAModel, Dict]:
    """A trained model to start from (fine-tuning, or a second stage of training), float32 and
    trainable, and a record of where it came from (its path, and its own ``training.json``'s
    settings and step when it has one).

    Raises:
        ValueError: its architecture or special ids differ from ``config``'s for
            ``tokenizer`` (both are named).
    """
    directory = Path(directory)
    model = load_llada(directory, dtype=torch.float32).requires_grad_(True)
    expected = config.model_config(tokenizer)
    if model.config != expected:
        raise ValueError(f"--init {directory}: its architecture {model.config} differs from the "
                         f"settings' {expected}")
    record = {"path": str(directory)}
    if (directory / INFO_NAME).is_file():
        info = json.loads((directory / INFO_NAME).read_text())
        record.update(config=info.get("config"), step=info.get("step"),
                      command=info.get("command"), init=info.get("init"))
    return model, record


def _step_seed(seed: int, step: int) -> int:
    return random.Random(f"genjo_fast.train:{seed}:{step}").getrandbits(63)


def make_batch(config: TrainConfig, tokenizer, step: int
               ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The training batch of ``step`` (a function of ``config.seed`` and ``step`` only).

    Rows pick their task with ``config.task_weights`` and draw a problem of the ``train``
    split; each row is its left-padded chat prompt then
    :func:`~genjo_fast.tasks.answer_window`.

    Returns:
        ``(input_ids, attention_mask, prompt_length)``: int64 ``(B, Lp + gen_length)`` each
        (0 on the left padding) and ``Lp``, the longest prompt (the prompt region of every
        row, padding included).
    """
    rng = random.Random(_step_seed(config.seed, step))
    chosen = rng.choices(config.tasks, weights=config.task_weights, k=config.batch_size)
    items = [task_suite.draw(task, rng, "train") for task in chosen]
    prompt, prompt_mask = task_suite.encode_prompts(tokenizer, [p.question for p in items])
    answers = torch.tensor([task_suite.answer_window(tokenizer, p.answer, config.gen_length)
                            for p in items], dtype=torch.long)
    input_ids = torch.cat([prompt, answers], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(answers)], dim=1)
    return input_ids, attention_mask, prompt.shape[1]


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps to ``lr``, then cosine decay to
    ``min_lr_ratio * lr`` at ``steps`` (``step`` counts from 0)."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices of the linear layers, not on embeddings or norms."""
    decay, keep = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() == 2 and "wte" not in name else keep).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": keep, "weight_decay": 0.0}],
                             lr=config.lr, betas=config.betas)


def batch_loss(config: TrainConfig, model: nn.Module, batch, mask_id: int,
               generator: torch.Generator) -> torch.Tensor:
    """The configured objective on a :func:`make_batch` batch."""
    input_ids, attention_mask, prompt_length = batch
    if config.objective == "sft":
        return sft_loss(model, input_ids, prompt_length, mask_id, attention_mask,
                        eps=config.eps, generator=generator)
    return pretraining_loss(model, input_ids, mask_id, attention_mask, eps=config.eps,
                            generator=generator)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def _write_dir(directory: Path, write) -> None:
    """Writes a directory atomically: ``write(staging)``, then swap it in place."""
    staging = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    for leftover in (staging, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    staging.mkdir(parents=True)
    write(staging)
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def _write_model_files(directory: Path, model: LLaDAModel, tokenizer, info: Dict) -> None:
    save_llada(model, directory)
    tokenizer.save_pretrained(directory)
    (directory / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")


def save_model_dir(model: LLaDAModel, tokenizer, directory: Path, info: Dict) -> None:
    """The model (reference format), its tokenizer and ``training.json`` in ``directory``
    (replaced atomically)."""
    _write_dir(directory, lambda staging: _write_model_files(staging, model, tokenizer, info))


def save_checkpoint(directory: Path, model: LLaDAModel, tokenizer, optimizer, step: int,
                    info: Dict) -> None:
    """A resumable checkpoint: what :func:`save_model_dir` writes plus ``trainer_state.pt``
    (step, optimizer state, wall and CPU seconds so far)."""
    def write(staging: Path) -> None:
        _write_model_files(staging, model, tokenizer, info)
        torch.save({"step": step, "optimizer": optimizer.state_dict(),
                    "elapsed_s": info["elapsed_s"], "cpu_s": info["cpu_s"]},
                   staging / STATE_NAME)
    _write_dir(directory, write)


def load_checkpoint(directory: Path) -> Tuple[TrainConfig, LLaDAModel, Dict, Dict]:
    """``(config, model, trainer_state, info)`` of a checkpoint written by
    :func:`save_checkpoint` (the model in float32, trainable)."""
    info = json.loads((directory / INFO_NAME).read_text())
    config = TrainConfig.from_dict(info["config"])
    model = load_llada(directory, dtype=torch.float32).requires_grad_(True)
    state = torch.load(directory / STATE_NAME, weights_only=True)
    return config, model, state, info


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def train(config: TrainConfig, out: Path, resume: bool = False, checkpoint_every: int = 250,
          eval_every: int = 0, eval_problems: int = 64, final_eval_problems: int = 300,
          threads: Optional[int] = None, progress: bool = True,
          command: Optional[Sequence[str]] = None, stop_at: Optional[int] = None,
          init: Optional[os.PathLike] = None) -> Optional[Dict]:
    """Runs (or resumes) a training run and writes its checkpoints and final model.

    Args:
        config: the run's settings (on resume they must equal the checkpoint's, except
            ``steps``, which may grow).
        out: output directory (``checkpoint/`` and ``model/`` go there).
        resume: continue from ``out/checkpoint`` when it exists.
        checkpoint_every: steps between checkpoints (0: only at the end).
        eval_every: steps between held-out exact-mode evaluations of ``eval_problems``
            problems per task, printed and recorded (0: none during training).
        final_eval_problems: held-out problems per task of the final evaluation (0: none).
        threads: ``torch.set_num_threads`` (default: torch's own).
        progress: show a tqdm bar.
        command: the command line to record in ``training.json``.
        stop_at: save a checkpoint and return ``None`` after this many steps (continue later
            with ``resume=True``), e.g. to free a shared machine.
        init: a model directory (or checkpoint) to start from instead of random weights, with
            a fresh optimizer and schedule (see :func:`load_initial_model`); ignored when
            resuming, where the checkpoint's weights and record are used.
    Returns:
        The ``training.json`` dict of the final model (``None`` when stopped by ``stop_at``).
    """
    from tqdm.auto import tqdm

    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out)
    tokenizer = build_tokenizer()
    mask_id = special_ids(tokenizer)["mask_id"]
    checkpoint = out / CHECKPOINT_DIR
    start, elapsed, cpu, history, init_record = 0, 0.0, 0.0, [], None
    if resume and (checkpoint / STATE_NAME).is_file():
        saved, model, state, info = load_checkpoint(checkpoint)
        if dataclasses.replace(saved, steps=config.steps) != config or config.steps < saved.steps:
            raise ValueError(f"--resume: the settings differ from the checkpoint's in "
                             f"{checkpoint} (only steps may grow):\n saved {saved}\n given {config}")
        optimizer = make_optimizer(config, model)
        optimizer.load_state_dict(state["optimizer"])
        start, history, init_record = int(state["step"]), info["evals"], info.get("init")
        elapsed, cpu = float(state["elapsed_s"]), float(state["cpu_s"])
    else:
        if init is None:
            model = init_model(config, tokenizer)
        else:
            model, init_record = load_initial_model(init, config, tokenizer)
        optimizer = make_optimizer(config, model)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    def info_dict(step: int) -> Dict:
        return {"config": config.to_dict(), "step": step,
                "elapsed_s": round(time.perf_counter() - began, 1),
                "cpu_s": round(time.process_time() - cpu_began, 1), "parameters": n_params,
                "threads": torch.get_num_threads(),
                "command": list(command) if command else None, "init": init_record,
                "evals": history}

    def evaluate(step: int, n: int, seed: int) -> Dict[str, float]:
        model.eval()
        accuracy = task_suite.evaluate(model, tokenizer, config.tasks, n=n, seed=seed,
                                       gen_length=config.gen_length, steps=config.gen_length,
                                       block_length=min(8, config.gen_length))
        model.train()
        history.append({"step": step, "problems_per_task": n, "seed": seed,
                        "exact_accuracy": accuracy})
        tqdm.write(f"step {step}: held-out exact accuracy " +
                   ", ".join(f"{t} {a:.1%}" for t, a in accuracy.items()))
        return accuracy

    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="train",
               dynamic_ncols=True, mininterval=2.0)
    began, cpu_began, smooth = time.perf_counter() - elapsed, time.process_time() - cpu, None
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        batch = make_batch(config, tokenizer, step)
        generator = torch.Generator().manual_seed(_step_seed(config.seed, step) ^ 1)
        loss = batch_loss(config, model, batch, mask_id, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is {value} at step {step}")
        smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{learning_rate(config, step):.2e}",
                        refresh=False)
        done = step + 1
        if not progress and done % 50 == 0:
            print(f"step {done} loss {smooth:.4f} lr {learning_rate(config, step):.2e} "
                  f"{time.perf_counter() - began:.0f}s", flush=True)
        if eval_every and done % eval_every == 0 and done < config.steps:
            evaluate(done, eval_problems, seed=10_000 + done)
        if done < config.steps and (done == stop_at or checkpoint_every
                                    and done % checkpoint_every == 0):
            save_checkpoint(checkpoint, model, tokenizer, optimizer, done, info_dict(done))
        if done == stop_at and done < config.steps:
            bar.close()
            return None
    bar.close()
    info = info_dict(config.steps)  # the training's time, without the final evaluation
    save_checkpoint(checkpoint, model, tokenizer, optimizer, config.steps, info)
    if final_eval_problems:
        evaluate(config.steps, final_eval_problems, seed=1)
    model.eval().requires_grad_(False)
    save_model_dir(model, tokenizer, out / MODEL_DIR, info)
    return info


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m genjo_fast.train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (checkpoint/, model/)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint when it exists")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=0,
                   help="steps between small held-out evaluations (0: none)")
    p.add_argument("--eval-problems", type=int, default=64)
    p.add_argument("--final-eval-problems", type=int, default=300)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (a log line every 50 steps instead)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="checkpoint and exit after this step (continue with --resume)")
    p.add_argument("--init", default=None,
                   help="start from this model directory's weights (a fresh optimizer and "
                        "schedule): fine-tuning, or a second stage of training")
    for field in dataclasses.fields(TrainConfig):
        value = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, tuple):
            kind = str if isinstance(value[0], str) else float
            p.add_argument(flag, type=kind, nargs="+", default=list(value),
                           help=f"default: {' '.join(map(str, value))}")
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"default: {value}")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    config = TrainConfig(**{name: getattr(args, name) for name in names})
    command = ["python", "-m", "genjo_fast.train", *(sys.argv[1:] if argv is None else argv)]
    info = train(config, Path(args.out), resume=args.resume,
                 checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                 eval_problems=args.eval_problems, final_eval_problems=args.final_eval_problems,
                 threads=args.threads, progress=not args.no_progress, command=command,
                 stop_at=args.stop_at, init=args.init)
    if info is None:
        print(f"stopped after step {args.stop_at}; continue with --resume")
        return 0
    print(json.dumps({k: info[k] for k in ("step", "elapsed_s", "parameters")}))
    if info["evals"]:
        print(json.dumps(info["evals"][-1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
