"""The ``genjo-fast`` command: ``genjo-fast chat`` (a console chat), ``genjo-fast web`` (the
Gradio app of :mod:`genjo_fast.web`) and ``genjo-fast serve`` (the OpenAI-compatible HTTP
server of :mod:`genjo_fast.server`).

``genjo-fast chat`` carries a multi-turn conversation (:class:`genjo_fast.chat.Conversation`).
On a terminal the answer is drawn denoising in place, step by step (masks dim, tokens decoded
at this step highlighted), then the number of forwards and the speed are shown. When stdin or
stdout is not a terminal it reads one message per line and prints each answer on its own
lines, nothing else, so it can be scripted::

    printf 'Sort: 3 1 2\\nReverse: abc\\n' | genjo-fast chat

Commands: ``/reset`` forgets the conversation, ``/model NAME_OR_DIR`` switches models,
``/exit`` (or end of input) quits. Errors (an empty or too long message, a bad model
directory, invalid settings) are reported on stderr and the chat goes on.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
from typing import Optional, Sequence, TextIO

import torch

from .chat import DEFAULT_MODEL, ChatError, ChatModel, Conversation, Reply, Settings, \
    load_chat_model
from .streaming import KEPT, MASK, NEW, StreamUpdate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                        help=f"a LLaDA or Dream checkpoint directory with its tokenizer files, "
                             f"or a genjo_fast.zoo name (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default=None,
                        help="where the model runs (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter dtype of a checkpoint directory (default: bfloat16 on "
                             "CUDA, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default: torch's choice; 1 is fastest for "
                             "small models on a busy machine)")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of :class:`genjo_fast.chat.Settings` (defaults: its defaults)."""
    d = Settings()
    group = parser.add_argument_group("sampling (both families)")
    group.add_argument("--gen-length", type=int, default=d.gen_length,
                       help="answer length in tokens (default %(default)s)")
    group.add_argument("--steps", type=int, default=d.steps,
                       help="denoising steps (default %(default)s)")
    group.add_argument("--temperature", type=float, default=d.temperature,
                       help="sampling temperature, 0 is greedy (default %(default)s)")
    group.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default=None,
                       help="backend of the sampling ops (default: $GENJO_FAST_BACKEND, else "
                            "auto)")
    group.add_argument("--seed", type=int, default=None,
                       help="seed of the sampled choices (temperature > 0, random remasking)")
    group.add_argument("--block-length", type=int, default=None,
                       help="semi-autoregressive block length (LLaDA's default: 8 when it "
                            "divides --gen-length, else --gen-length; Dream's: the whole "
                            "answer)")
    group.add_argument("--cache", choices=["prefix", "dual"], default=None,
                       help="APPROXIMATE: Fast-dLLM's block KV cache")
    group.add_argument("--refresh-every", type=int, default=None,
                       help="with --cache, a full forward every N steps of a block")
    group.add_argument("--threshold", type=float, default=None,
                       help="APPROXIMATE: parallel decoding, unmask every token whose "
                            "confidence is >= this (in [0, 1])")
    group.add_argument("--factor", type=float, default=None,
                       help="APPROXIMATE: factor-based parallel decoding (> 0)")
    group.add_argument("--stop-at-eos", action="store_true",
                       help="end the call once the answer has ended (the same answer, fewer "
                            "forwards)")
    group = parser.add_argument_group("LLaDA (genjo_fast.generate)")
    group.add_argument("--cfg-scale", type=float, default=d.cfg_scale,
                       help="classifier-free guidance scale (default %(default)s)")
    group.add_argument("--remasking", choices=["low_confidence", "random"],
                       default=d.remasking, help="which tokens to unmask first")
    group.add_argument("--constraints", default="", metavar="POS:WORD,...",
                       help="fix words at answer positions, e.g. '0:Once, 5:upon' (the "
                            "reference app's constraints)")
    group.add_argument("--sampler", choices=["generate", "app"], default=d.sampler,
                       help="the reference generate.py's sampler (default) or the reference "
                            "Gradio app's")
    group = parser.add_argument_group("Dream (genjo_fast.diffusion_generate)")
    group.add_argument("--alg", choices=["origin", "maskgit_plus", "topk_margin", "entropy"],
                       default=None, help="position rule (default entropy)")
    group.add_argument("--alg-temp", type=float, default=None,
                       help="temperature of the position draw")
    group.add_argument("--top-p", type=float, default=None, help="nucleus filter")
    group.add_argument("--top-k", type=int, default=None, help="top-k filter")


def settings_from(args: argparse.Namespace) -> Settings:
    """The :class:`Settings` given by the parsed flags."""
    names = Settings.__dataclass_fields__
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if values.get("backend") == "auto":
        values["backend"] = None
    return Settings(**values)


def load_model_or_exit(args: argparse.Namespace, program: str, *,
                       device: Optional[str] = None,
                       dtype: Optional[torch.dtype] = None) -> ChatModel:
    """The model of ``--model`` (and ``--device``, ``--dtype``, unless ``device``/``dtype``
    are given); a bad one exits with status 2 and the reason on stderr."""
    if args.threads is not None:
        if args.threads < 1:
            print(f"{program}: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            raise SystemExit(2)
        torch.set_num_threads(args.threads)
    try:
        if dtype is None and args.dtype:
            dtype = DTYPES[args.dtype]
        return load_chat_model(args.model, device=device or args.device, dtype=dtype)
    except ChatError as error:
        print(f"{program}: {error}", file=sys.stderr)
        raise SystemExit(2)
    except RuntimeError as error:  # e.g. an unknown --device
        print(f"{program}: --device {args.device}: {error}", file=sys.stderr)
        raise SystemExit(2)


def describe(chat: ChatModel) -> str:
    """``"tiny-chat (llada, 0.8M parameters, cpu, context 256)"``."""
    params = sum(p.numel() for p in chat.model.parameters())
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else (
        f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params / 1e3:.1f}K")
    context = f", context {chat.context}" if chat.context else ""
    return f"{chat.name} ({chat.family}, {size} parameters, {chat.device}{context})"


# ----------------------------------------------------------------------------------------------
# genjo-fast chat
# ----------------------------------------------------------------------------------------------

STYLE = {MASK: "\033[2m", NEW: "\033[1;33m", KEPT: ""}
RESET, DIM = "\033[0m", "\033[2m"
BOT = "bot> "


class LiveAnswer:
    """Draws the answer of row 0 in place on a terminal: each update replaces the previous
    drawing (the cursor goes back up over the rows it took)."""

    def __init__(self, out: TextIO):
        self.out = out
        self.rows = 0

    def draw(self, update: StreamUpdate) -> None:
        pieces, kinds, stop = update.pieces[0], update.kinds[0], update.ends[0]
        plain = BOT + "".join(pieces[:stop])
        styled = BOT + "".join(STYLE[k] + p + (RESET if STYLE[k] else "")
                               for p, k in zip(pieces[:stop], kinds[:stop]))
        self._replace(styled, plain)

    def finish(self, reply: Reply) -> None:
        self._replace(BOT + reply.text, BOT + reply.text)
        self.out.write(f"\n{DIM}[{reply.summary()}]{RESET}\n")
        self.out.flush()
        self.rows = 0

    def _replace(self, styled: str, plain: str) -> None:
        up = f"\033[{self.rows - 1}A" if self.rows > 1 else ""
        self.out.write("\r" + up + "\033[J" + styled)
        self.out.flush()
        width = max(shutil.get_terminal_size().columns, 1)
        self.rows = sum(max(1, math.ceil(len(line) / width)) for line in plain.split("\n"))


def chat_main(args: argparse.Namespace) -> int:
    program = "genjo-fast chat"
    settings = settings_from(args)
    chat = load_model_or_exit(args, program)
    try:
        settings.keywords(chat)
    except ChatError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    conversation = Conversation(chat)
    if interactive:
        print(f"genjo-fast chat: {describe(chat)}; gen length {settings.gen_length}, "
              f"{settings.steps} steps.\n/reset forgets the conversation, /model NAME_OR_DIR "
              f"switches models, /exit or Ctrl-D quits.")
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            line = None
        if line is None or (not interactive and line == ""):
            if interactive:
                print()
            return 0
        line = line.rstrip("\n")
        command, _, rest = line.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            conversation.reset()
            if interactive:
                print("(conversation forgotten)")
            continue
        if command == "/model":
            try:
                new = load_chat_model(rest.strip() or None, device=chat.device)
                settings.keywords(new)
            except ChatError as error:
                print(f"{program}: {error}", file=sys.stderr)
                continue
            chat, conversation = new, Conversation(new)
            if interactive:
                print(f"(now chatting with {describe(chat)})")
            continue
        answer(conversation, line, settings, interactive, program)


def answer(conversation: Conversation, message: str, settings: Settings, interactive: bool,
           program: str) -> None:
    """One turn: streams the reply (drawn in place on a terminal, printed at the end
    otherwise); errors go to stderr and leave the conversation as it was."""
    live = LiveAnswer(sys.stdout) if interactive else None
    try:
        for item in conversation.reply(message, settings):
            if isinstance(item, Reply):
                if live is not None:
                    live.finish(item)
                else:
                    print(item.text, flush=True)
            elif live is not None:
                live.draw(item)
    except KeyboardInterrupt:
        if live is not None:
            print("\n(interrupted)")
    except Exception as error:  # reported; the chat goes on
        if live is not None and live.rows:
            print()
        print(f"{program}: {describe_error(error)}", file=sys.stderr, flush=True)


def describe_error(error: Exception) -> str:
    """The message of ``error`` for the user: bad input (:class:`ChatError`, ``ValueError``,
    ``TypeError``) as it is, anything else with its type (e.g. a failing model)."""
    if isinstance(error, (ChatError, ValueError, TypeError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------------
# genjo-fast web
# ----------------------------------------------------------------------------------------------

def web_main(args: argparse.Namespace) -> int:
    try:
        from . import web
    except ImportError as error:
        print(f"genjo-fast web: the web app needs gradio ({error}); install the app extra: "
              f"pip install 'genjo_fast[app]'", file=sys.stderr)
        return 2
    chat = load_model_or_exit(args, "genjo-fast web")
    if not 0 <= args.delay <= 10:
        print(f"genjo-fast web: --delay must lie in [0, 10] seconds, got {args.delay}",
              file=sys.stderr)
        return 2
    return web.serve(chat, settings_from(args), host=args.host, port=args.port,
                     dtype=DTYPES.get(args.dtype) if args.dtype else None, delay=args.delay)


# ----------------------------------------------------------------------------------------------
# genjo-fast serve
# ----------------------------------------------------------------------------------------------

def serve_main(args: argparse.Namespace) -> int:
    program = "genjo-fast serve"
    try:
        from . import server
    except ImportError as error:
        print(f"{program}: the server needs fastapi and uvicorn ({error}); install the serve "
              f"extra: pip install 'genjo_fast[serve]'", file=sys.stderr)
        return 2
    for flag, value, minimum in (("--max-batch-size", args.max_batch_size, 1),
                                 ("--max-queue", args.max_queue, 1),
                                 ("--batch-wait-ms", args.batch_wait_ms, 0)):
        if not value >= minimum:
            print(f"{program}: {flag} must be >= {minimum}, got {value}", file=sys.stderr)
            return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun on several ranks
        return serve_parallel(args, program, server)
    chat = load_model_or_exit(args, program)
    return serve_chat(args, program, server, chat, describe(chat))


def serve_chat(args: argparse.Namespace, program: str, server, chat: ChatModel,
               description: str, coordinator=None) -> int:
    """Serves ``chat`` in the foreground (rank 0 of a tensor-parallel model with
    ``coordinator``)."""
    print(f"{program}: {description} as {args.served_model_name or chat.name!r} on "
          f"http://{args.host}:{args.port}/v1 (batches of up to {args.max_batch_size}, "
          f"waiting {args.batch_wait_ms:g} ms)", file=sys.stderr, flush=True)
    try:
        return server.serve(chat, host=args.host, port=args.port, name=args.served_model_name,
                            max_batch_size=args.max_batch_size,
                            batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                            log_level=args.log_level, coordinator=coordinator)
    except OSError as error:  # the address: a port in use, a host not of this machine
        print(f"{program}: cannot listen on {args.host}:{args.port}: {error.strerror or error}",
              file=sys.stderr)
        return 2


def serve_parallel(args: argparse.Namespace, program: str, server) -> int:
    """``torchrun --nproc_per_node N -m genjo_fast.cli serve ...``: every rank loads the model
    on the CPU and keeps its shards (:func:`genjo_fast.parallel.parallelize`, on
    ``cuda:LOCAL_RANK`` or the CPU; the LM head split over the vocabulary when it divides);
    rank 0 serves, the other ranks follow its calls until it stops."""
    import torch.distributed as dist

    from . import batching, parallel

    if args.device is not None:
        print(f"{program}: --device is set by torchrun (cuda:LOCAL_RANK, else cpu); leave it "
              "out", file=sys.stderr)
        return 2
    device = parallel.init_distributed()
    try:
        dtype = DTYPES[args.dtype] if args.dtype else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        chat = load_model_or_exit(args, program, device="cpu", dtype=dtype)
        world = dist.get_world_size()
        description = f"{describe(chat)}, split over {world} ranks ({device.type})"
        try:
            parallel.parallelize(chat.model, device=device,
                                 shard_lm_head=parallel.splits_lm_head(chat.model, world))
        except (ValueError, TypeError) as error:  # every rank fails alike
            print(f"{program}: --model {chat.name}: {error}", file=sys.stderr)
            return 2
        coordinator = parallel.Coordinator(chat.model)
        if not coordinator.is_leader:
            # Ctrl-C reaches every rank: the followers wait for rank 0 to release them
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            batching.follow(chat, coordinator)
            return 0
        try:
            return serve_chat(args, program, server, chat, description, coordinator)
        finally:  # done by the batcher once it ran; here too if it never did
            coordinator.close()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genjo-fast", description="Chat with a masked-diffusion LM and watch it denoise.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chat = commands.add_parser("chat", help="multi-turn chat in the console",
                               description=__doc__.replace("``", ""),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(chat)
    add_settings_arguments(chat)
    chat.set_defaults(run=chat_main)
    web = commands.add_parser("web", help="the web app (Gradio): chat, denoising view, settings")
    add_model_arguments(web)
    web.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default %(default)s; 0.0.0.0 for every "
                          "interface)")
    web.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    web.add_argument("--delay", type=float, default=0.05,
                     help="pause between two steps of the denoising view, in seconds (default "
                          "%(default)s; the sampler is not slowed, only the display)")
    add_settings_arguments(web)
    web.set_defaults(run=web_main)
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server with dynamic batching",
        description="An OpenAI-compatible HTTP server (/v1/models, /v1/completions, "
                    "/v1/chat/completions, streaming as server-sent events). Concurrent "
                    "requests with the same options run as one batch; at temperature 0 each "
                    "gets exactly the tokens it gets alone. Sampling options are request "
                    "fields (README, 'HTTP server').")
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default %(default)s; 0.0.0.0 for every "
                            "interface)")
    serve.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    serve.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="the model's id in the API (default: the --model value)")
    serve.add_argument("--max-batch-size", type=int, default=16,
                       help="the most requests in one batched call (default %(default)s; 1 "
                            "runs one request at a time)")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0,
                       help="how long the oldest waiting request waits for compatible ones "
                            "before its batch starts, in ms (default %(default)s)")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="the most requests waiting; more get HTTP 503 (default "
                            "%(default)s)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level (default %(default)s)")
    serve.set_defaults(run=serve_main)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
