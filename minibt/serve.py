"""`minibt serve RUN_DIR` on the HF engine: an OpenAI-compatible endpoint over a run's Session.

Each request's `model` names an adapter of the run (or `base`). A chat is rendered by
`Session.chat_prompt`, as `minibt chat` renders it (the seed tag as system prompt with forward.tags); a
completion's prompt is raw text, as the protocol has it. Defaults are the run's: greedy (temperature 0), and
`Session.answer_tokens` new tokens (myx: `instruction_tokens`). One worker thread owns the engine:
requests that arrive while it runs wait in a queue and run as one batch per adapter and settings;
streamed requests run one at a time (`engine.stream`). On vLLM, minibt/vllm_serve.py starts vLLM's
own server instead.
"""

from __future__ import annotations

import asyncio
import json
import queue
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from minibt.engine import BASE, generation_budget
from minibt.engine.sampling import seeded
from minibt.roles import MYX
from minibt.session import Session


class ApiError(Exception):
    """An error in the protocol's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 500: "server_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# sampling and output options this server does not implement: refused when set, never ignored
UNSUPPORTED = ("logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias", "best_of", "echo",
               "suffix", "tools", "functions", "response_format")


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Settings(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields this server does not use (user, logprobs: False)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the chat API's newer name for max_tokens
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # greedy unless asked, as minibt generate and chat
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1  # one choice per request: ask again for more


class ChatRequest(Settings):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Settings):
    prompt: str | list[str]


@dataclass
class Answer:
    text: str
    usage: dict[str, int]
    out_of_budget: bool


@dataclass
class Job:
    """One prompt to complete; `on_text` set: streamed, one piece of text at a time."""

    adapter: str
    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    on_text: Callable[[str], None] | None = None
    done: Future = field(default_factory=Future)

    def group(self) -> tuple:
        """Jobs of one group run as one `generate` call. A seeded sampled job runs alone: its sample must
        not depend on what else was waiting."""
        alone = id(self) if self.temperature > 0 and self.seed is not None else None
        return self.adapter, self.max_new_tokens, self.temperature, self.top_p, alone


class Worker:
    """The one thread that runs the engine; `submit` queues a job, the thread takes every job waiting."""

    def __init__(self, session: Session, max_batch: int = 16):
        self.session, self.max_batch = session, max_batch
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="minibt-serve-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        self.jobs.put(job)
        return job.done

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (first := self.jobs.get()) is not None:
            waiting, stopping = [first], False
            while not self.jobs.empty():
                job = self.jobs.get_nowait()
                stopping = stopping or job is None
                if job is not None:
                    waiting.append(job)
            groups: dict[tuple, list[Job]] = {}
            for job in waiting:
                if job.on_text is not None:
                    self._guarded([job], self._stream)
                else:
                    groups.setdefault(job.group(), []).append(job)
            for jobs in groups.values():
                self._guarded(jobs, self._generate)
            if stopping:
                return

    def _guarded(self, jobs: list[Job], run: Callable[[list[Job]], None]) -> None:
        try:
            run(jobs)
        except Exception as e:  # the request fails, the server goes on
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(e)

    def _generate(self, jobs: list[Job]) -> None:
        j = jobs[0]
        seed = j.seed if j.seed is not None else random.randrange(2**31)  # unseeded samples differ per call
        texts = self.session.engine.generate(j.adapter, [x.prompt for x in jobs], j.max_new_tokens, j.temperature,
                                             j.top_p, batch_size=min(len(jobs), self.max_batch), seed=seed)
        for job, text in zip(jobs, texts):
            job.done.set_result(self._answer(job, text))

    def _stream(self, jobs: list[Job]) -> None:
        j = jobs[0]
        assert j.on_text is not None
        with seeded(j.seed if j.seed is not None else random.randrange(2**31)):
            text = self.session.engine.stream(j.adapter, j.prompt, j.max_new_tokens, j.temperature, j.top_p, j.on_text)
        j.done.set_result(self._answer(j, text))

    def _answer(self, job: Job, text: str) -> Answer:
        """`text` with its usage by the engine's clipping rule (`generation_budget`): the prompt tokens the model
        read, those cut from the prompt's start, the answer's tokens, and whether it used its whole budget.
        Here, not in the server's thread: one thread uses the tokenizer."""
        rules = self.session.engine.text
        given = len(rules.tokenizer(job.prompt)["input_ids"])  # as `TextRules.fit` counts a prompt
        kept, budget = generation_budget(given, job.max_new_tokens, rules.max_length)
        made = min(budget, rules.count_tokens(text))
        usage = {"prompt_tokens": kept, "completion_tokens": made, "total_tokens": kept + made, "clipped_prompt_tokens": given - kept}
        return Answer(text, usage, made >= budget)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(`text` up to the first stop string, stripped as the engine strips; whether one was found)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)].strip(), True) if hits else (text.strip(), False)


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` may still begin a stop string (not sent yet)."""
    return max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)


def build_app(session: Session, api_key: str | None = None) -> tuple[FastAPI, Worker]:
    served = [*session.run.adapter_names(), BASE]
    worker = Worker(session)
    app = FastAPI(title="minibt serve")
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return ApiError(400, f"{param}: {first['msg']}", param, "invalid_request").response()

    @app.exception_handler(Exception)
    async def failed(_: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"{type(e).__name__}: {e}").response()

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return ApiError(401, "a wrong or missing API key (Authorization: Bearer KEY)", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "minibt"} for m in served]}

    def job(req: Settings, prompt: str) -> Job:
        if req.model not in served:
            raise ApiError(404, f"model {req.model!r} is not served here; served: {', '.join(served)}", "model", "model_not_found")
        for name in UNSUPPORTED:
            if (req.model_extra or {}).get(name) not in (None, False, 0, [], {}):
                raise ApiError(400, f"{name}: not supported by minibt serve on the HF engine", name, "unsupported_parameter")
        default = session.instruction_tokens if req.model == MYX else session.answer_tokens
        return Job(req.model, prompt, req.max_completion_tokens or req.max_tokens or default, req.temperature, req.top_p, req.seed)

    async def answer(req: Settings, prompts: list[str], chat: bool) -> Any:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        jobs = [job(req, p) for p in prompts]
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        if req.stream:
            return StreamingResponse(stream(jobs[0], stops, head, chat), media_type="text/event-stream")
        answers = await asyncio.gather(*(asyncio.wrap_future(worker.submit(j)) for j in jobs))
        choices, total = [], dict.fromkeys(answers[0].usage, 0)
        for i, a in enumerate(answers):
            text, stopped = cut_at_stop(a.text, stops)
            total = {k: total[k] + a.usage[k] for k in total}
            reason = "length" if a.out_of_budget and not stopped else "stop"
            body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
            choices.append({"index": i, **body, "finish_reason": reason})
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": total}

    async def stream(j: Job, stops: list[str], head: dict, chat: bool) -> AsyncIterator[str]:
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue[str | None]()

        def on_text(piece: str) -> None:  # called in the worker's thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        j.on_text = on_text
        done = asyncio.wrap_future(worker.submit(j))
        done.add_done_callback(lambda _: pieces.put_nowait(None))
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None = None, delta: dict | None = None, **extra: Any) -> str:
            if chat:
                delta = delta if delta is not None else {"content": text} if text is not None else {}
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice], **extra})}\n\n"

        if chat:
            yield chunk(None, delta={"role": "assistant"})
        full, sent = "", ""
        while (piece := await pieces.get()) is not None:
            full += piece
            text, stopped = cut_at_stop(full, stops)
            if not stopped:  # held back: trailing spaces (the answer is stripped) and a stop string's beginning
                raw = full.lstrip()
                text = raw[: len(raw) - held_back(raw, stops)].rstrip()
            if text.startswith(sent) and len(text) > len(sent):
                yield chunk(text[len(sent):])
                sent = text
        try:
            answer_ = await done
        except Exception as e:  # the stream has begun: the error is its last event
            yield f"data: {json.dumps(ApiError(500, f'{type(e).__name__}: {e}').body())}\n\n"
            return
        text, stopped = cut_at_stop(answer_.text, stops)
        if len(text) > len(sent):
            yield chunk(text[len(sent):])
        yield chunk(None, "length" if answer_.out_of_budget and not stopped else "stop", usage=answer_.usage)
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        return await answer(req, [session.chat_prompt([m.model_dump() for m in req.messages])], chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or (req.stream and len(prompts) > 1):
            raise ApiError(400, "prompt: one prompt to stream, at least one otherwise", "prompt", "invalid_request")
        return await answer(req, prompts, chat=False)

    return app, worker


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the startup line so that it can name the port (--port 0: any free one)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # a client that comes before uvicorn's loop waits in the backlog rather than being refused
    return sock


def serve(session: Session, sock: socket.socket, api_key: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM (requests in flight finish), then stop the worker and return."""
    import uvicorn

    app, worker = build_app(session, api_key)
    # lifespan off: the app has no start-up or shutdown hooks, and uvicorn's lifespan task logs a CancelledError traceback on Ctrl-C
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30, lifespan="off"))

    def stop(*_: Any) -> None:  # uvicorn re-sends the signal it stopped on once it is done: a no-op then
        server.should_exit = True

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, stop)
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        sock.close()
