"""The local model server's HTTP API: OpenAI's chat completions for one loaded base and
its adapters (``finetune.serving.server``)::

    GET  /v1/models              the base as "<base-name>", each adapter by name
    GET  /v1/models/{id}         one of them
    POST /v1/chat/completions    OpenAI's request; "stream": true answers with SSE chunks
    GET  /healthz                base, adapters, adapters that failed to load

One request at a time reaches the model: generations and refreshes run on one worker
thread per loaded model (``GenerationWorker``), never on the event loop, and at most
``DEFAULT_MAX_QUEUED`` wait for it; past that the server answers 503. A stream's
generation runs on that thread and hands text to the event loop through transformers'
``AsyncTextIteratorStreamer``; a client that goes away cancels its generation at the next
token. The registry is read again every ``DEFAULT_REFRESH_S`` seconds, and at once when a
request names a model the server does not know, so a ``safegate models deploy`` is
picked up without a restart.

Errors leave as OpenAI-style bodies (``finetune.errors.ServingError`` and its subclasses
carry status, type and code); a malformed request is a 400, never a 422 or a 500.

The gateway reaches this server through litellm as an OpenAI-compatible upstream
(``hosted_vllm/<name>`` or ``openai/<name>`` with ``api_base="http://127.0.0.1:8001/v1"``).

Past one machine
----------------
This server is for one CPU or GPU box. To serve the same adapters at scale, point vLLM at
the same base and the same adapter folders (the registry's ``path`` of each adapter)::

    vllm serve microsoft/Phi-3-mini-4k-instruct --enable-lora --max-lora-rank 64 \\
        --lora-modules safety-tuned=/srv/safegate/models/safety-tuned \\
                       support-bot=/srv/safegate/models/support-bot \\
        --port 8001

vLLM exposes the same ``/v1/chat/completions`` and ``/v1/models``, the adapters under the
same names, so the gateway changes only its upstream: litellm's ``hosted_vllm/`` route,
``model="hosted_vllm/safety-tuned"`` with ``api_base="http://vllm-host:8001/v1"``. Run
several vLLM replicas behind a load balancer (or litellm's Router) for more throughput;
adapters can be added at run time with vLLM's ``/v1/load_lora_adapter`` when
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune.errors import ModelNotFound, ServerBusy, ServingError, failure_reason
from finetune.registry import ModelKind
from finetune.serving.generation import Completion, FinishReason, StopFilter
from finetune.serving.schemas import (
    ERROR_RESPONSES,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    Health,
    ModelCard,
    ModelList,
    Usage,
    error_body,
)
from finetune.serving.server import LocalModelServer, ServedModel

log = logging.getLogger("safegate.finetune.serving")

T = TypeVar("T")

DEFAULT_MAX_QUEUED = 16  # requests waiting for the model beyond this get a 503
DEFAULT_REFRESH_S = 10.0  # how often the registry is read again; 0 turns it off
MIN_REFRESH_GAP_S = 1.0  # an unknown model triggers a refresh at most this often


class GenerationWorker:
    """The one thread that runs a loaded model's work, with a bounded queue in front.

    ``run`` and ``submit`` refuse with ``ServerBusy`` when ``max_queued`` calls are
    already waiting or running; ``admit=False`` (refreshes) skips that check. ``close()``
    stops the thread; the next call starts a new one (an app may be started again).
    """

    def __init__(self, *, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self.max_queued = max_queued
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, fn: Callable[[], T], *, admit: bool = True) -> asyncio.Future[T]:
        with self._lock:
            if admit and self._pending >= self.max_queued:
                raise ServerBusy(
                    f"{self._pending} requests are already waiting for the model; retry shortly"
                )
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="safegate-serve"
                )
            future: Future[T] = self._executor.submit(fn)
            self._pending += 1
        future.add_done_callback(self._done)
        return asyncio.wrap_future(future)

    async def run(self, fn: Callable[[], T], *, admit: bool = True) -> T:
        return await self.submit(fn, admit=admit)

    def _done(self, _future: Future[Any]) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        """Stop taking work; what is queued is cancelled, a running call finishes."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


def create_app(
    server: LocalModelServer,
    *,
    refresh_s: float = DEFAULT_REFRESH_S,
    max_queued: int = DEFAULT_MAX_QUEUED,
) -> FastAPI:
    """The OpenAI-compatible app for a loaded ``server``."""
    worker = GenerationWorker(max_queued=max_queued)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        if server.registry is not None and refresh_s > 0:
            task = asyncio.create_task(_refresh_forever(server, worker, refresh_s))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            worker.close()

    app = FastAPI(
        title="safegate local models",
        version="0.1.0",
        summary=f"OpenAI-compatible chat completions for {server.base.name} and its adapters",
        lifespan=lifespan,
    )
    app.state.server = server
    app.state.worker = worker
    _install_errors(app)

    @app.get("/healthz")
    async def healthz() -> Health:
        adapters = [m.id for m in server.served() if m.kind is ModelKind.ADAPTER]
        return Health(
            base=server.base.name, adapters=adapters, failed=server.failed, queued=worker.pending
        )

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[_card(model) for model in server.served()])

    @app.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
    async def retrieve_model(model_id: Annotated[str, PathParam()]) -> ModelCard:
        await _ensure_known(server, worker, model_id)
        for model in server.served():
            if model.id == model_id:
                return _card(model)
        server.adapter_for(model_id)  # raises the 404 or 503 that explains why
        raise ModelNotFound(f"the model {model_id!r} does not exist", param="model")

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={
            **ERROR_RESPONSES,
            200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks"},
        },
    )
    async def chat_completions(
        body: ChatCompletionRequest,
    ) -> ChatCompletion | StreamingResponse:
        turns = body.turns()
        params = body.params(server.sampling_defaults)
        await _ensure_known(server, worker, body.model)
        prompt = await worker.run(partial(server.prepare, body.model, turns, params))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            from transformers import AsyncTextIteratorStreamer

            streamer = AsyncTextIteratorStreamer(
                server.tokenizer,
                skip_prompt=True,
                timeout=params.timeout_s,
                skip_special_tokens=True,
            )
            cancel = threading.Event()
            generation = worker.submit(  # a 503 here still gets a status line
                partial(server.generate, prompt, params, streamer=streamer, cancel=cancel)
            )
            generation.add_done_callback(_retrieve)  # a stream cut short never awaits it
            chunks = _stream(
                streamer,
                generation,
                cancel,
                model=body.model,
                stop=params.stop,
                request_id=request_id,
                created=created,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
            )
            return StreamingResponse(
                chunks,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        cancel = threading.Event()
        try:
            completion = await worker.run(partial(server.generate, prompt, params, cancel=cancel))
        finally:
            cancel.set()  # cancelled while waiting: the worker skips or stops the generation
        return ChatCompletion(
            id=request_id,
            created=created,
            model=body.model,
            choices=[
                Choice(
                    message=AssistantMessage(content=completion.text),
                    finish_reason=completion.finish_reason,
                )
            ],
            usage=Usage.of(completion),
        )

    return app


def _card(model: ServedModel) -> ModelCard:
    return ModelCard(id=model.id, created=model.created, kind=model.kind, base=model.base)


async def _ensure_known(server: LocalModelServer, worker: GenerationWorker, name: str) -> None:
    """An unknown name may have just been deployed: read the registry once before a 404."""
    if server.knows(name) or server.registry is None:
        return
    if time.monotonic() - server.last_refresh >= MIN_REFRESH_GAP_S:
        try:
            await worker.run(server.refresh, admit=False)
        except Exception as exc:  # noqa: BLE001 - answer with what is loaded
            log.error("refresh failed: %s", failure_reason(exc))


def _retrieve(future: asyncio.Future[Completion]) -> None:
    if not future.cancelled():
        future.exception()


async def _refresh_forever(
    server: LocalModelServer, worker: GenerationWorker, every_s: float
) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await worker.run(server.refresh, admit=False)
        except Exception as exc:  # noqa: BLE001 - the server keeps what it has loaded
            log.error("refresh failed: %s", failure_reason(exc))


async def _stream(
    streamer: AsyncIterator[str],
    generation: asyncio.Future[Completion],
    cancel: threading.Event,
    *,
    model: str,
    stop: Sequence[str],
    request_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """OpenAI's ``chat.completion.chunk`` events for a generation, then ``[DONE]``."""

    def chunk(delta: Mapping[str, str], finish: FinishReason | None = None, **extra: object) -> str:
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return _sse(
            {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [] if extra else choices,
                **extra,
            }
        )

    try:
        yield chunk({"role": "assistant", "content": ""})
        text = StopFilter(stop)
        async for piece in streamer:
            out = text.feed(piece)
            if out:
                yield chunk({"content": out})
            if text.stopped:
                break
        tail = text.flush()
        if tail:
            yield chunk({"content": tail})
        completion = await generation
        yield chunk({}, completion.finish_reason)
        if include_usage:
            yield chunk({}, usage=Usage.of(completion).model_dump())
    except ServingError as exc:
        yield _sse(error_body(exc.message, type=exc.type, param=exc.param, code=exc.code))
    except TimeoutError:
        message = "no token came within the generation timeout"
        yield _sse(error_body(message, type="server_error", code="timeout"))
    except Exception as exc:  # noqa: BLE001 - the stream has started; report, do not raise
        log.error("stream failed: %s", failure_reason(exc))
        yield _sse(error_body("internal error while generating", type="server_error"))
    finally:
        cancel.set()  # the client may be gone: stop generating at the next token
    yield "data: [DONE]\n\n"


def _sse(body: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _install_errors(app: FastAPI) -> None:
    """Every failure leaves as an OpenAI-style error body; bad requests are 400s."""

    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError) -> JSONResponse:
        body = error_body(exc.message, type=exc.type, param=exc.param, code=exc.code)
        return JSONResponse(status_code=exc.status, content=body)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            body = error_body(
                "the request body is not valid JSON",
                type="invalid_request_error",
                code="invalid_json",
            )
            return JSONResponse(status_code=400, content=body)
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        detail = str(first.get("msg", "invalid request"))
        message = f"{param}: {detail}" if param else detail
        body = error_body(message, type="invalid_request_error", param=param, code="invalid_value")
        return JSONResponse(status_code=400, content=body)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = error_body(str(exc.detail), type=kind)
        return JSONResponse(status_code=exc.status_code, content=body)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return JSONResponse(
            status_code=500, content=error_body("internal error", type="server_error")
        )
