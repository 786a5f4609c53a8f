"""``genjo-fast web``: a Gradio app to chat with a masked-diffusion LM and watch it denoise.

The page: the conversation (the answer drawn while it denoises, masks as ``░``), the message
box, positional constraints (``pos:word, ...``), the denoising view of the last step (each
answer position coloured: still masked, decoded at this step, decoded earlier), the number of
forwards and the speed of each answer, every sampling setting of the model's family, and a
model field to load another checkpoint directory. Bad input (an empty or too long message, a
directory that is not a checkpoint, settings the sampler refuses) is reported on the page and
the app keeps running.

Needs the ``app`` extra (``pip install "genjo_fast[app]"``): gradio, and transformers for
checkpoint tokenizers. Nothing is fetched from the network: Gradio's analytics are off and the
page uses the system's fonts.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from .chat import (ChatError, ChatModel, Conversation, Reply, Settings,  # noqa: E402
                   load_chat_model)
from .cli import describe, describe_error  # noqa: E402
from .streaming import KEPT, MASK, NEW, StreamUpdate  # noqa: E402

#: Colours of the denoising view (the reference app's mask grey).
COLORS = {MASK: "#444444", NEW: "#f2a03d", KEPT: "#6699cc"}
LABELS = {MASK: "masked", NEW: "decoded at this step", KEPT: "decoded earlier"}
CSS = """
#visualisation .textspan { font-family: ui-monospace, monospace; }
#stats, #status { min-height: 1.5em; }
footer { display: none !important; }
"""


class Models:
    """The loaded models, by name (each loaded once and shared by every session)."""

    def __init__(self, first: ChatModel, dtype: Optional[torch.dtype]):
        self.models: Dict[str, ChatModel] = {first.name: first}
        self.default = first.name
        self.device = first.device
        self.dtype = dtype
        self.lock = threading.Lock()

    def get(self, name: str) -> ChatModel:
        """The model ``name`` (loading it on first use). Raises :class:`ChatError`."""
        name = name.strip() or self.default
        with self.lock:
            if name not in self.models:
                self.models[name] = load_chat_model(name, device=self.device, dtype=self.dtype)
            return self.models[name]


@dataclass
class Session:
    """One browser session: its model and conversation, and the chat as shown."""
    conversation: Conversation
    shown: List[Dict[str, str]]


def warning(error: Exception) -> str:
    """The status line for ``error``."""
    return f"\u26a0\ufe0f {describe_error(error)}"


def view(update: StreamUpdate) -> List[Tuple[str, Optional[str]]]:
    """The denoising view of row 0: ``(piece, kind label)`` per answer position up to its end
    (the first stop id, included)."""
    end = min(update.ends[0] + 1, len(update.pieces[0]))
    return [(piece, LABELS[kind])
            for piece, kind in zip(update.pieces[0][:end], update.kinds[0][:end])]


def build(models: Models, settings: Settings, delay: float = 0.05) -> gr.Blocks:
    """The app's page and handlers; ``settings`` gives the controls' initial values,
    ``delay`` the pause (seconds) between two steps of the denoising view."""
    chat0 = models.get(models.default)
    with gr.Blocks(title="genjo_fast chat") as demo:
        gr.Markdown("## genjo_fast: chat with a masked-diffusion LM and watch it denoise")
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot",
                                     buttons=[], feedback_options=None)
                with gr.Row():
                    message = gr.Textbox(placeholder="Ask something, e.g. Sort: 3 1 2",
                                         show_label=False, scale=5, elem_id="message",
                                         autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                constraints = gr.Textbox(
                    label="Positional constraints (LLaDA)", value=settings.constraints,
                    placeholder="0:Once, 5:upon", elem_id="constraints",
                    info="pos:word, ... places each word (with a leading space) from that "
                         "answer position on, kept at every step (the reference app's "
                         "constraints)")
                clear = gr.Button("Clear conversation", elem_id="clear")
            with gr.Column(scale=2):
                visual = gr.HighlightedText(
                    label="Denoising (the answer's positions after each step)",
                    color_map={LABELS[k]: c for k, c in COLORS.items()}, show_legend=True,
                    combine_adjacent=False, elem_id="visualisation")
                stats = gr.Markdown(elem_id="stats")
                status = gr.Markdown(elem_id="status")
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                model_name = gr.Textbox(label="Model (checkpoint directory or zoo name)",
                                        value=chat0.name, elem_id="model", scale=4)
                load = gr.Button("Load", scale=1, elem_id="load")
            model_info = gr.Markdown(describe(chat0), elem_id="model-info")
            with gr.Row():
                gen_length = gr.Slider(8, 512, value=settings.gen_length, step=8,
                                       label="Answer length (tokens)")
                steps = gr.Slider(1, 512, value=settings.steps, step=1, label="Steps")
                temperature = gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05,
                                        label="Temperature")
                seed = gr.Number(value=settings.seed or 0, precision=0,
                                 label="Seed (of sampled choices)")
            with gr.Row():
                backend = gr.Dropdown(["auto", "torch", "triton", "cuda"],
                                      value=settings.backend or "auto", label="Backend")
                delay_ = gr.Slider(0.0, 1.0, value=delay, step=0.01,
                                  label="Visualisation delay per step (s)")
            with gr.Group(visible=chat0.family == "llada") as llada_box:
                with gr.Row():
                    block_length = gr.Slider(1, 512, step=1, value=settings.llada_block_length(),
                                             label="Block length (divides the answer length)")
                    cfg_scale = gr.Slider(0.0, 3.0, value=settings.cfg_scale, step=0.1,
                                          label="CFG scale")
                    remasking = gr.Radio(["low_confidence", "random"],
                                         value=settings.remasking, label="Remasking")
                with gr.Row():
                    cache = gr.Dropdown(["none", "prefix", "dual"],
                                        value=settings.cache or "none",
                                        label="KV cache (approximate)")
                    parallel = gr.Checkbox(value=settings.threshold is not None,
                                           label="Threshold decoding (approximate)")
                    threshold = gr.Slider(0.0, 1.0, step=0.01,
                                          value=0.9 if settings.threshold is None
                                          else settings.threshold, label="Threshold")
                    stop_at_eos = gr.Checkbox(value=settings.stop_at_eos, label="Stop at EOS")
                    sampler = gr.Radio(["generate", "app"], value=settings.sampler,
                                       label="Sampler (the reference generate.py's or its "
                                             "Gradio app's)", elem_id="sampler")
            with gr.Group(visible=chat0.family == "dream") as dream_box:
                with gr.Row():
                    alg = gr.Dropdown(["entropy", "maskgit_plus", "topk_margin", "origin"],
                                      value=settings.alg or "entropy", label="Position rule")
                    top_p = gr.Slider(0.01, 1.0, step=0.01, value=settings.top_p or 1.0,
                                      label="Top-p (1: off)")
                    top_k = gr.Number(value=settings.top_k or 0, precision=0,
                                      label="Top-k (0: off)")
        controls = [gen_length, steps, temperature, seed, backend, block_length, cfg_scale,
                    remasking, cache, parallel, threshold, stop_at_eos, alg, top_p, top_k,
                    constraints, sampler]

        def read_settings(chat: ChatModel, values) -> Settings:
            """The controls' values as :class:`Settings` (those of the other family left at
            their defaults; Gradio sends 0 for an emptied number field)."""
            (gen, n, temp, seed_, backend_, block, cfg, remask, cache_, use_threshold, thr,
             stop, alg_, p, k, cons, sampler_) = values
            if chat.family == "dream":
                return Settings(gen_length=int(gen), steps=int(n), temperature=float(temp),
                                seed=int(seed_ or 0),
                                backend=None if backend_ == "auto" else backend_,
                                stop_at_eos=bool(stop), alg=alg_,
                                top_p=float(p) if p and p < 1 else None,
                                top_k=int(k) if k else None)
            return Settings(gen_length=int(gen), steps=int(n), temperature=float(temp),
                            seed=int(seed_ or 0),
                            backend=None if backend_ == "auto" else backend_,
                            block_length=int(block), cfg_scale=float(cfg), remasking=remask,
                            cache=None if cache_ == "none" else cache_,
                            threshold=float(thr) if use_threshold else None,
                            stop_at_eos=bool(stop), constraints=cons or "",
                            sampler=sampler_)

        def session_of(state: Optional[Session], name: str) -> Session:
            chat = models.get(name)
            if state is None or state.conversation.chat is not chat:
                state = Session(Conversation(chat), [])
            return state

        def respond(text, state, name, wait, *values):
            """Streams one turn: (chatbot, visual, stats, status, message box, state)."""
            state = session_of(state, name)
            shown = state.shown
            try:
                settings_ = read_settings(state.conversation.chat, values)
                turn = state.conversation.reply(text, settings_)
                first = next(turn)  # bad input raises here, before anything is shown
            except Exception as error:  # shown on the page; the app goes on
                yield shown, gr.skip(), gr.skip(), warning(error), text, state
                return
            pending = shown + [{"role": "user", "content": text},
                               {"role": "assistant", "content": ""}]
            item, last = first, []
            try:
                while True:
                    if isinstance(item, Reply):
                        break
                    if not item.done:  # the end's update repeats the last step's tokens
                        pending[-1] = {"role": "assistant", "content": item.text(0)}
                        last = view(item)
                        yield pending, last, gr.skip(), "", "", state
                        if wait:
                            time.sleep(float(wait))
                    item = next(turn)
            except Exception as error:
                yield shown, gr.skip(), gr.skip(), warning(error), text, state
                return
            note = (f" ({item.dropped_turns} earliest turn(s) left out to fit the context)"
                    if item.dropped_turns else "")
            pending[-1] = {"role": "assistant", "content": item.text}
            state.shown = pending
            yield pending, last, item.summary() + note, "", "", state

        def reset(state, name):
            try:
                return [], [], "", "", Session(Conversation(models.get(name)), [])
            except ChatError as error:
                return gr.skip(), gr.skip(), gr.skip(), warning(error), state

        def load_model(name, state):
            try:
                chat = models.get(name)
            except ChatError as error:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), warning(error), state
            return (describe(chat), gr.Group(visible=chat.family == "llada"),
                    gr.Group(visible=chat.family == "dream"), [],
                    f"Loaded {chat.name}.", Session(Conversation(chat), []))

        outputs = [chatbot, visual, stats, status, message, session]
        inputs = [message, session, model_name, delay_] + controls
        # the streamed answer shows the progress: no spinner over the outputs
        send.click(respond, inputs, outputs, show_progress="hidden")
        message.submit(respond, inputs, outputs, show_progress="hidden")
        clear.click(reset, [session, model_name], [chatbot, visual, stats, status, session])
        chatbot.clear(reset, [session, model_name], [chatbot, visual, stats, status, session])
        load.click(load_model, [model_name, session],
                   [model_info, llada_box, dream_box, chatbot, status, session])
    return demo


def theme() -> gr.themes.Base:
    """Gradio's default theme with the system's fonts (no font is fetched)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def serve(chat: ChatModel, settings: Settings, *, host: str = "127.0.0.1", port: int = 7860,
          dtype: Optional[torch.dtype] = None, delay: float = 0.05) -> int:
    """Builds the app for ``chat`` and serves it until interrupted."""
    demo = build(Models(chat, dtype), settings, delay)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
        ssr_mode=False, theme=theme(), css=CSS, footer_links=[])
    return 0
