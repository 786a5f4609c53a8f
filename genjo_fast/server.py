"""``genjo-fast serve``: an OpenAI-compatible HTTP server over a masked-diffusion model
(FastAPI and uvicorn: ``pip install "genjo_fast[serve]"``).

Endpoints: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``,
``POST /v1/chat/completions`` (the prompt through the tokenizer's chat template),
``GET /health`` and ``GET /stats`` (the batcher's counters,
:class:`genjo_fast.batching.BatcherStats`).
Requests run through a :class:`genjo_fast.batching.Batcher`: concurrent requests with the same
options share one batched sampler call, and at temperature 0 each gets exactly the tokens it
gets alone.

Request fields, besides OpenAI's ``model`` (optional; another name than the served one is a
404), ``prompt`` / ``messages``, ``stream``, ``stream_options``, ``n`` (1 only) and ``user``:
the sampler's options: ``max_tokens`` (the answer length, ``generate``'s ``gen_length``;
``max_completion_tokens`` too in chat; default :data:`DEFAULT_MAX_TOKENS`), ``steps`` (default
``max_tokens``: one token per step; at most ``max_tokens``), ``block_length`` (default: 8 when
it divides ``max_tokens``, else ``max_tokens``; Dream: the whole answer), ``temperature``
(0), ``cfg_scale`` (0), ``remasking`` (``low_confidence``), ``cache``, ``refresh_every``,
``threshold``, ``factor``, ``seed`` (none), and Dream's ``alg`` (``entropy``), ``alg_temp``,
``top_p``, ``top_k`` (none): :class:`genjo_fast.chat.Settings`' defaults but for ``steps``.
``return_token_ids`` adds each answer's ids to its choice. Unknown fields, values of the wrong
type or out of range, a prompt that does not fit the model's context with its answer, options
the model's family lacks or the sampler refuses: a 400 whose ``error.message`` says what to
fix (OpenAI's error object); an unknown model: 404; a full queue: 503.

Streaming (``stream: true``) sends server-sent events, one ``data: <json>`` line and a blank
line each: after every denoising step a chunk per answer whose text (``choices[i].text``, or
``choices[i].delta.content`` in chat) is what the answer's *confirmed* text gained (the
decoded prefix before the first masked position: it never changes, so the texts concatenate
to the answer) and whose ``choices[i].draft`` is the rest of the answer as it stands, each
masked position shown as ``\u2591`` (it changes from step to step); then the chunk with the
rest of the text and ``finish_reason`` (``"stop"``: the model ended the answer, ``"length"``:
``max_tokens`` reached), a usage chunk with ``stream_options.include_usage``, and
``data: [DONE]``. Chat streams start with a chunk holding ``delta.role``. An error after the
stream began is sent as ``data: {"error": {...}}`` before ``[DONE]``.

A client that disconnects frees its row: a queued request is dropped, a running one gets
nothing more and leaves its batch's computation after the step under way.

Under ``torchrun --nproc_per_node N`` (``genjo-fast serve`` does it when launched so) the model
is split over the N ranks (:mod:`genjo_fast.parallel`): rank 0 serves HTTP and runs each
batch on every rank through a :class:`~genjo_fast.parallel.Coordinator`; the other ranks
follow (:func:`genjo_fast.batching.follow`).
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from dataclasses import asdict
from typing import Any, AsyncIterator, Dict, List, Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .batching import Batcher, Job, QueueFull, RowResult
from .chat import ChatError, ChatModel, Settings
from .streaming import StreamUpdate
from .validation import check_approximate_args, check_generate_args

#: ``max_tokens`` when a request does not give it (the other defaults: the module docstring).
DEFAULT_MAX_TOKENS = 32
#: Seconds between two checks that a waiting client is still connected.
POLL = 0.05


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------

def _finite(default=None, **bounds):
    return Field(default, allow_inf_nan=False, **bounds)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields both endpoints share (see the module docstring)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = _finite(None, ge=0)
    steps: Optional[int] = Field(None, ge=1)
    block_length: Optional[int] = Field(None, ge=1)
    cfg_scale: Optional[float] = _finite(None, ge=0)
    remasking: Optional[Literal["low_confidence", "random"]] = None
    cache: Optional[Literal["prefix", "dual"]] = None
    refresh_every: Optional[int] = Field(None, ge=1)
    threshold: Optional[float] = _finite(None, ge=0, le=1)
    factor: Optional[float] = _finite(None, gt=0)
    seed: Optional[int] = None
    alg: Optional[Literal["origin", "maskgit_plus", "topk_margin", "entropy"]] = None
    alg_temp: Optional[float] = _finite(None, ge=0)
    top_p: Optional[float] = _finite(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    user: Optional[str] = None
    return_token_ids: bool = False


class CompletionRequest(SamplingRequest):
    prompt: Union[str, List[str]]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: Union[str, List[TextPart]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(SamplingRequest):
    messages: List[Message]
    max_completion_tokens: Optional[int] = Field(None, ge=1)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> Dict[str, Any]:
        """OpenAI's error object."""
        kind = ("invalid_request_error" if self.status < 500 and self.status != 503
                else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def validation_error(error: ValidationError, fields) -> ApiError:
    """A 400 naming each bad field and what is wrong with it."""
    messages, param = [], None
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"])
        param = param or loc or None
        kind = item["type"]
        if kind == "json_invalid":
            messages.append(f"malformed JSON: {item.get('ctx', {}).get('error', item['msg'])}")
        elif kind == "extra_forbidden":
            messages.append(f"unknown field {loc!r} (the fields are: {', '.join(fields)})")
        elif kind == "missing":
            messages.append(f"{loc} is required")
        elif not loc:
            messages.append(f"the request body must be a JSON object ({item['msg']})")
        else:
            messages.append(f"{loc}: {item['msg']} (got {repr(item.get('input'))[:80]})")
    return ApiError(400, "; ".join(messages), param=param,
                    code="invalid_json" if messages[0].startswith("malformed") else None)


def sampler_error(error: BaseException) -> ApiError:
    """The sampler's refusal of an option (400), or a failure (500)."""
    if isinstance(error, (ChatError, ValueError, TypeError)):
        message = str(error)
        if "gen_length" in message:
            message += " (max_tokens is the sampler's gen_length)"
        return ApiError(400, message)
    return ApiError(500, f"the sampler failed: {type(error).__name__}: {error}")


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------

class Server:
    """The endpoints' logic over one model and its :class:`~genjo_fast.batching.Batcher`.

    Args:
        chat: the model (:func:`genjo_fast.chat.load_chat_model`).
        batcher: its batcher.
        name: the model's id in the API (requests naming another get a 404).
    """

    def __init__(self, chat: ChatModel, batcher: Batcher, name: str):
        self.chat, self.batcher, self.name = chat, batcher, name
        self.created = int(time.time())

    # -- requests -> jobs ------------------------------------------------------------------------

    def settings(self, request: SamplingRequest, max_tokens: Optional[int]) -> Settings:
        """The request's sampling options, the server's defaults filled in, checked."""
        if request.model is not None and request.model != self.name:
            raise ApiError(404, f"model {request.model!r} does not exist: this server serves "
                                f"{self.name!r} (GET /v1/models)", param="model",
                           code="model_not_found")
        if request.n != 1:
            raise ApiError(400, f"n must be 1, got {request.n}: send several prompts, or "
                                "several requests, for several answers", param="n")
        gen_length = max_tokens or DEFAULT_MAX_TOKENS
        steps = request.steps or gen_length
        if steps > gen_length:
            raise ApiError(400, f"steps ({steps}) must be <= max_tokens ({gen_length}): a step "
                                f"that unmasks no token changes nothing", param="steps")
        values = {name: getattr(request, name) for name in (
            "temperature", "block_length", "cfg_scale", "remasking", "cache", "refresh_every",
            "threshold", "factor", "seed", "alg", "alg_temp", "top_p", "top_k")}
        settings = Settings(gen_length=gen_length, steps=steps,
                            **{k: v for k, v in values.items() if v is not None})
        try:
            settings.keywords(self.chat)
            if self.chat.family == "llada":
                check_approximate_args(settings.cache, settings.refresh_every,
                                       settings.threshold, settings.factor)
        except (ChatError, ValueError, TypeError) as error:
            raise sampler_error(error) from None
        return settings

    def check_prompt(self, ids: List[int], settings: Settings, what: str) -> None:
        """The prompt's ids must be non-empty, fit the context with the answer, and pass the
        sampler's checks (no mask token, divisible lengths)."""
        chat = self.chat
        if not ids:
            raise ApiError(400, f"{what} is empty", param=what)
        if chat.context is not None and len(ids) + settings.gen_length > chat.context:
            raise ApiError(400, f"{what} takes {len(ids)} tokens and the answer max_tokens="
                                f"{settings.gen_length}: {len(ids) + settings.gen_length} "
                                f"tokens, more than the model's context of {chat.context}",
                           param=what, code="context_length_exceeded")
        if chat.mask_id in ids:
            raise ApiError(400, f"{what} holds the mask token (id {chat.mask_id}), which marks "
                                "the positions to generate: remove it", param=what)
        if chat.family == "llada":
            try:
                check_generate_args(torch.tensor([ids]), None, settings.steps,
                                    settings.gen_length, settings.llada_block_length(),
                                    settings.temperature, settings.cfg_scale,
                                    settings.remasking, chat.mask_id, {})
            except (ValueError, TypeError) as error:
                raise sampler_error(error) from None

    def completion_prompts(self, request: CompletionRequest) -> List[List[int]]:
        """The ids of each prompt (the tokenizer's own special tokens added, as it does by
        default)."""
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list", param="prompt")
        tokenizer = self.chat.tokenizer
        return [list(tokenizer(text)["input_ids"]) for text in prompts]

    def chat_prompt(self, request: ChatRequest) -> List[int]:
        """The ids of the messages through the chat template, with the assistant's turn
        opened."""
        if not request.messages:
            raise ApiError(400, "messages is empty", param="messages")
        tokenizer = self.chat.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"the tokenizer of {self.name!r} has no chat template: use "
                                "/v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as error:  # the template's own refusal (e.g. a role it lacks)
            raise ApiError(400, f"the chat template refused the messages: {error}",
                           param="messages") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- running -----------------------------------------------------------------------------------

    async def run(self, http: Request, request: SamplingRequest, prompts: List[List[int]],
                  settings: Settings, chat_format: bool):
        """Submits one job per prompt and answers: a JSON response, or an SSE stream."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for index, ids in enumerate(prompts):
            job = Job(ids, settings, lambda event, i=index: loop.call_soon_threadsafe(
                events.put_nowait, (i, event)), stream=request.stream)
            try:
                self.batcher.submit(job)
            except QueueFull as error:
                self._cancel(jobs)
                return ApiError(503, f"the server is busy: {error}; retry later").response()
            jobs.append(job)
        reply = Reply(self, request, prompts, chat_format)
        if not request.stream:
            while not reply.finished():
                item = await self._next(events, http, jobs)
                if item is None:
                    return None
                reply.take(*item)
                if reply.error is not None:
                    self._cancel(jobs)
                    return reply.error.response()
            return JSONResponse(reply.body())
        first = await self._next(events, http, jobs)  # refusals before the first step: JSON
        if first is None:
            return None
        if isinstance(first[1], BaseException):
            self._cancel(jobs)
            return sampler_error(first[1]).response()
        return StreamingResponse(self._stream(reply, first, events, jobs),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _next(self, events: asyncio.Queue, http: Request, jobs: List[Job]):
        """The next ``(index, event)``, or ``None`` (jobs cancelled) if the client left."""
        getter = asyncio.ensure_future(events.get())
        while True:
            done, _ = await asyncio.wait({getter}, timeout=POLL)
            if done:
                return getter.result()
            if await http.is_disconnected():
                getter.cancel()
                self._cancel(jobs)
                return None

    async def _stream(self, reply: "Reply", first, events: asyncio.Queue,
                      jobs: List[Job]) -> AsyncIterator[str]:
        try:
            if reply.chat_format:
                yield sse(reply.chunk([{"index": i, "delta": {"role": "assistant"},
                                        "finish_reason": None} for i in range(len(jobs))]))
            item = first
            while True:
                chunk = reply.take(*item)
                if reply.error is not None:
                    yield sse(reply.error.body())
                    break
                if chunk is not None:
                    yield sse(chunk)
                if reply.finished():
                    if request_usage(reply.request):
                        yield sse(reply.chunk([], usage=reply.usage()))
                    break
                item = await events.get()
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled), or all was sent
            self._cancel(jobs)

    def _cancel(self, jobs: List[Job]) -> None:
        for job in jobs:
            self.batcher.cancel(job)


def request_usage(request: SamplingRequest) -> bool:
    """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
    return request.stream_options is not None and request.stream_options.include_usage


def sse(payload: Dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Reply:
    """The answers of one request as their events arrive: the final body, or stream chunks."""

    def __init__(self, server: Server, request: SamplingRequest, prompts: List[List[int]],
                 chat_format: bool):
        self.server, self.request, self.prompts = server, request, prompts
        self.chat_format = chat_format
        self.id = ("chatcmpl-" if chat_format else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.results: Dict[int, RowResult] = {}
        self.sent = [""] * len(prompts)  # confirmed text streamed so far, per answer
        self.error: Optional[ApiError] = None

    def finished(self) -> bool:
        """Every answer has its result."""
        return len(self.results) == len(self.prompts)

    def take(self, index: int, event) -> Optional[Dict[str, Any]]:
        """Records an event; returns its stream chunk (``None`` for none)."""
        if isinstance(event, BaseException):
            self.error = sampler_error(event)
            return None
        if isinstance(event, StreamUpdate):
            if event.done:
                return None  # the RowResult that follows carries the end
            return self.chunk([self.choice(index, event.confirmed[0], event.draft[0], None)])
        self.results[index] = event
        choice = self.choice(index, event.text, "", event.finish_reason)
        if self.request.return_token_ids:
            choice["token_ids"] = event.ids
        return self.chunk([choice])

    def choice(self, index: int, confirmed: str, draft: str,
               finish_reason: Optional[str]) -> Dict[str, Any]:
        """A stream choice: what the confirmed text gained, and the draft."""
        sent = self.sent[index]
        delta = confirmed[len(sent):] if confirmed.startswith(sent) else ""
        self.sent[index] = sent + delta
        if self.chat_format:
            return {"index": index, "delta": {"content": delta}, "finish_reason": finish_reason,
                    "draft": draft}
        return {"index": index, "text": delta, "finish_reason": finish_reason,
                "logprobs": None, "draft": draft}

    def chunk(self, choices: List[Dict[str, Any]], usage=None) -> Dict[str, Any]:
        """A stream chunk holding ``choices`` (and ``usage``)."""
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat_format
               else "text_completion", "created": self.created, "model": self.server.name,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def usage(self) -> Dict[str, int]:
        """Prompt and answer tokens, summed over the answers."""
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(r.completion_tokens for r in self.results.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def body(self) -> Dict[str, Any]:
        """The non-streaming response."""
        choices = []
        for index in range(len(self.prompts)):
            result = self.results[index]
            if self.chat_format:
                choice = {"index": index, "message": {"role": "assistant",
                                                      "content": result.text},
                          "finish_reason": result.finish_reason, "logprobs": None}
            else:
                choice = {"index": index, "text": result.text,
                          "finish_reason": result.finish_reason, "logprobs": None}
            if self.request.return_token_ids:
                choice["token_ids"] = result.ids
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.chat_format
                else "text_completion", "created": self.created, "model": self.server.name,
                "choices": choices, "usage": self.usage()}


async def parse(http: Request, model: type) -> BaseModel:
    """The request's JSON body as ``model``; a 400 naming every bad field otherwise."""
    try:
        return model.model_validate_json(await http.body())
    except ValidationError as error:
        raise validation_error(error, sorted(model.model_fields)) from None


def create_app(chat: ChatModel, batcher: Batcher, name: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving ``chat`` through ``batcher`` (see the module docstring);
    ``name``: the model's id (default ``chat.name``). Closing the batcher is the caller's."""
    server = Server(chat, batcher, name or chat.name)
    app = FastAPI(title="genjo_fast", description=__doc__.split("\n\n")[0])
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError):
        return error.response()

    @app.exception_handler(Exception)
    async def failure(_: Request, error: Exception):
        return ApiError(500, f"internal error: {type(error).__name__}: {error}").response()

    def model_card() -> Dict[str, Any]:
        return {"id": server.name, "object": "model", "created": server.created,
                "owned_by": "genjo_fast", "family": chat.family, "context": chat.context}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return asdict(batcher.stats())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != server.name:
            raise ApiError(404, f"model {model_id!r} does not exist: this server serves "
                                f"{server.name!r}", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(http: Request):
        request = await parse(http, CompletionRequest)
        settings = server.settings(request, request.max_tokens)
        prompts = server.completion_prompts(request)
        for index, ids in enumerate(prompts):
            server.check_prompt(ids, settings, "prompt" if isinstance(request.prompt, str)
                                else f"prompt[{index}]")
        return await server.run(http, request, prompts, settings, chat_format=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        request = await parse(http, ChatRequest)
        if None not in (request.max_tokens, request.max_completion_tokens) \
                and request.max_tokens != request.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ: give one",
                           param="max_tokens")
        settings = server.settings(request, request.max_completion_tokens or request.max_tokens)
        ids = server.chat_prompt(request)
        server.check_prompt(ids, settings, "messages")
        return await server.run(http, request, [ids], settings, chat_format=True)

    return app


class BackgroundServer:
    """The server on uvicorn: in a thread of this process (:meth:`start`, or ``with``; for
    tests, benchmarks and notebooks), or in the foreground (:meth:`run`, what
    ``genjo-fast serve`` does)::

        with BackgroundServer(chat, max_batch_size=8) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")

    Args:
        chat: the model (:func:`genjo_fast.chat.load_chat_model`).
        host, port: where to listen; port 0 (the default) takes a free port (:attr:`port`).
        name: the model's id in the API (default ``chat.name``).
        max_batch_size, batch_wait_ms, max_queue, coordinator: the
            :class:`~genjo_fast.batching.Batcher`'s (``coordinator``: rank 0's, with a
            tensor-parallel model; stopping the server then releases the other ranks).
        log_level: uvicorn's.
    """

    def __init__(self, chat: ChatModel, *, host: str = "127.0.0.1", port: int = 0,
                 name: Optional[str] = None, max_batch_size: int = 16,
                 batch_wait_ms: float = 10.0, max_queue: int = 1024,
                 log_level: str = "warning", coordinator=None):
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:  # before the batcher: a port in use leaves nothing running
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        self.batcher = Batcher(chat, max_batch_size=max_batch_size,
                               batch_wait=batch_wait_ms / 1000, max_queue=max_queue,
                               coordinator=coordinator)
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(create_app(chat, self.batcher, name), log_level=log_level)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._socket]},
                                        name="genjo_fast-server", daemon=True)

    def run(self) -> None:
        """Serves in this thread until interrupted (Ctrl-C), then closes the batcher."""
        try:
            self._server.run(sockets=[self._socket])
        except KeyboardInterrupt:  # uvicorn re-raises it once shut down (as uvicorn.run)
            pass
        finally:
            self.batcher.close(10)
            self._socket.close()

    def start(self, timeout: float = 60) -> "BackgroundServer":
        """Starts serving; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30) -> None:
        """Stops serving (after the running call) and closes the batcher."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.batcher.close(timeout)
        self._socket.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(chat: ChatModel, *, host: str = "127.0.0.1", port: int = 8000,
          name: Optional[str] = None, max_batch_size: int = 16, batch_wait_ms: float = 10.0,
          max_queue: int = 1024, log_level: str = "info", coordinator=None) -> int:
    """Runs the server in the foreground until interrupted; returns the exit status. The
    arguments: :class:`BackgroundServer`'s."""
    BackgroundServer(chat, host=host, port=port, name=name, max_batch_size=max_batch_size,
                     batch_wait_ms=batch_wait_ms, max_queue=max_queue,
                     log_level=log_level, coordinator=coordinator).run()
    return 0


__all__ = ["create_app", "serve", "BackgroundServer", "Server", "ApiError",
           "DEFAULT_MAX_TOKENS", "CompletionRequest", "ChatRequest"]
