"""The FastAPI app: routes, API key, loading / ready / draining states, and the engine loop's lifetime.

    startup:  engine given -> EngineLoop now | engine_factory -> load on a thread (/health 503 until ready)
    request:  API key -> state (503 loading/draining) -> body (size cap) -> protocol checks -> prompts
              -> serving.submit -> JSON or SSE
    drain:    ServerState.drain() (SIGTERM, see run.py): new requests 503, running ones finish; at the
              deadline ServerState.abort() ends the rest (streams: finish_reason "abort" and [DONE])
    shutdown: EngineLoop.shutdown(); the engine is closed when the app loaded it

Routes: /v1/completions, /v1/chat/completions, /v1/models, /v1/models/{id}, /tokenize, /detokenize,
/version, /health, /metrics. Every error is vLLM's envelope `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest

from ..config import check_int
from ..errors import ConfigError
from .. import __version__
from ..runtime.loop import EngineLoop
from . import serving
from .logprobs import TokenText
from .metrics import PREFIXES, ServerMetrics
from .prompting import Prompter
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeChatRequest,
                       TokenizeRequest, error_body, parse_body, parse_json)
from .responses import Shape

log = logging.getLogger("moe_engine.server")
DRAIN_BODY_FACTOR = 16           # an oversized body is read (and dropped) up to this many times the cap


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str | None = None       # None: the model directory's name
    api_key: str | None = None
    max_num_seqs: int = 16
    max_model_len: int | None = None           # None: the model's context
    chat_template: str | None = None           # template text; None: the tokenizer's
    scheduler: str = "expert"
    max_batch: int | None = None
    max_waiting: int | None = None
    max_num_batched_tokens: int | None = None  # ids per step (decode rows + prompt chunks); None: the Batcher's
    max_seqs_per_client: int | None = None     # None: max(1, max_num_seqs // 4)
    max_cold_experts: int | None = None        # None: top_k x MoE layers // 2
    max_body_bytes: int = 1 << 20
    drain_timeout: float = 60.0
    allow_unknown_fields: bool = False         # drop (and log) request fields no schema knows instead of a 400
    read_timeout: float = 30.0                 # seconds a client has to send a request body (run.py: its head)
    metrics_prefix: str = "moe_engine"         # or "vllm": vLLM's exact metric names
    metrics_without_key: bool = False          # /metrics open with --api-key set (vLLM never asks a key there)

    def __post_init__(self):
        for name in ("max_num_seqs", "max_body_bytes", "max_model_len", "max_batch", "max_waiting",
                     "max_num_batched_tokens", "max_seqs_per_client"):
            check_int(getattr(self, name), name, optional=name not in ("max_num_seqs", "max_body_bytes"),
                      flag="--" + name.replace("_", "-"))
        check_int(self.max_cold_experts, "max_cold_experts", minimum=0, optional=True, flag="--max-cold-experts")
        rows = self.max_batch or self.max_num_seqs
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens <= rows:
            raise ConfigError(f"max_num_batched_tokens={self.max_num_batched_tokens} is invalid: a step's decode rows "
                              f"(up to {rows}, --max-batch or --max-num-seqs) come first and prompts need room after "
                              f"them; use more than {rows} (--max-num-batched-tokens)")
        if self.scheduler not in ("expert", "fifo"):
            raise ConfigError(f"scheduler={self.scheduler!r} is invalid: use expert or fifo (--scheduler)")
        for name in ("drain_timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: use a number of seconds > 0 "
                                  f"(--{name.replace('_', '-')})")
        if self.metrics_prefix not in PREFIXES:
            raise ConfigError(f"metrics_prefix={self.metrics_prefix!r} is invalid: use one of {', '.join(PREFIXES)} "
                              f"(--metrics-prefix)")


class ServerState:
    """What the routes share: the engine and its loop once loaded, the limits, the metrics."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.status = "loading"                   # loading | ready | draining | failed
        self.error: BaseException | None = None
        self.engine = self.loop = None
        self.owns_engine = False
        self.model_name = config.served_model_name
        self.limit = 0                            # prompt + max_tokens of one request
        self.chat_template = config.chat_template
        self.metrics = ServerMetrics(config.metrics_prefix)
        self.close_timeout = 30.0                 # how long close() waits for the loop's step (the runner sets it)
        self.on_fatal: Callable[[], None] | None = None      # set by the runner: stop the server
        self._lock = threading.Lock()

    def start(self, engine) -> None:
        cfg, ctx = self.config, engine.max_context
        if cfg.max_model_len is not None and cfg.max_model_len > ctx:
            raise ConfigError(f"--max-model-len {cfg.max_model_len} is more than the model's context ({ctx}, "
                              f"max_position_embeddings in config.json); use at most {ctx}")
        loop = EngineLoop(engine, cfg.max_num_seqs, cfg.max_batch, cfg.scheduler, cfg.max_waiting,
                          max_num_batched_tokens=cfg.max_num_batched_tokens,
                          max_seqs_per_client=cfg.max_seqs_per_client, max_cold_experts=cfg.max_cold_experts)
        self.limit = min(cfg.max_model_len or ctx, ctx, loop.kv_tokens)
        self.model_name = self.model_name or engine.checkpoint.model_dir.name
        self.metrics.attach(engine, loop, self.model_name, self.limit)
        self.prompter = Prompter(engine, self.limit, self.chat_template)
        if hasattr(engine, "on_failure"):         # an expert-parallel engine that lost a rank: 503, then exit
            engine.on_failure(self.fail)          # (before the loop starts: a rank lost meanwhile is reported too)
        with self._lock:
            self.engine, self.loop = engine, loop.start()
            if self.status == "loading":
                self.status = "ready"
        b = loop.batcher
        log.info("serving %s: up to %d tokens per request, %d sequences (at most %d per client while others wait), "
                 "%d tokens per step, %s scheduler", self.model_name, self.limit, cfg.max_num_seqs, b.client_cap,
                 b.budget, cfg.scheduler)

    def load_in_background(self, factory: Callable[[], object]) -> None:
        def run():
            try:
                engine = factory()
                self.owns_engine = True
                self.start(engine)
            except BaseException as e:   # noqa: BLE001 -- reported by /health and re-raised by the runner
                log.error("loading the model failed: %s", e)
                self.error, self.status = e, "failed"
                if self.on_fatal is not None:
                    self.on_fatal()
        threading.Thread(target=run, name="moe-engine-load", daemon=True).start()

    def fail(self, error: BaseException) -> None:
        """The engine cannot continue (distributed.RankError): every request gets 503 and the runner exits."""
        log.error("%s", error)
        with self._lock:
            self.error, self.status = error, "failed"
        if self.on_fatal is not None:
            self.on_fatal()

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests (503) and wait until running and queued ones have finished (default timeout:
        drain_timeout); False when some still run."""
        with self._lock:
            if self.status in ("loading", "failed"):
                return True
            self.status = "draining"
        return self.loop.drain(self.config.drain_timeout if timeout is None else timeout)

    def abort(self, timeout: float) -> bool:
        """End every request still queued or running with finish_reason "abort"; False when the loop's step
        outlasted `timeout`."""
        return self.loop is None or self.loop.abort_all(timeout)

    def close(self) -> None:
        with self._lock:
            self.status = "draining" if self.status == "ready" else self.status
        if self.loop is not None and not self.loop.shutdown(self.close_timeout):
            log.warning("the engine loop was still in a step after %.1fs; exiting without closing the engine",
                        self.close_timeout)
            return
        if self.owns_engine and self.engine is not None:
            self.engine.close()

    def require_ready(self) -> None:
        if self.status == "ready":
            return
        messages = {"loading": "the model is still loading; retry when /health returns 200",
                    "draining": "the server is shutting down and accepts no new requests",
                    "failed": f"loading the model failed: {self.error}" if self.engine is None else str(self.error)}
        raise APIError(503, messages[self.status])


def create_app(engine=None, *, engine_factory: Callable[[], object] | None = None, **options) -> FastAPI:
    """The server app over a loaded `engine`, or over `engine_factory()` run on a thread at startup.

    options: the fields of ServerConfig (served_model_name, api_key, max_num_seqs, max_model_len,
    chat_template, scheduler, max_batch, max_waiting, max_body_bytes, drain_timeout, read_timeout,
    metrics_prefix, metrics_without_key).
    """
    if (engine is None) == (engine_factory is None):
        raise ConfigError("create_app needs exactly one of engine and engine_factory")
    state = ServerState(ServerConfig(**options))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine is not None:
            state.start(engine)
        else:
            state.load_in_background(engine_factory)
        yield
        await asyncio.to_thread(state.close)

    app = FastAPI(title="moe-engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        headers = {"Connection": "close"} if exc.status == 408 else None      # the rest of that body is not read
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if state.status == "ready":
            return Response(status_code=200)
        return JSONResponse(error_body(503, _status_message(state)), status_code=503)

    @app.get("/metrics")
    async def metrics(request: HTTPRequest):
        if not state.config.metrics_without_key:
            _authorize(request, state)
        body = await asyncio.to_thread(state.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        _authorize(request, state)
        state.require_ready()
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: HTTPRequest):
        _authorize(request, state)
        state.require_ready()
        if model_id != state.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist; this server serves `{state.model_name}`",
                           "model")
        return _model_card(state)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        _authorize(request, state)
        state.require_ready()
        raw = await _read_body(request, state.config.max_body_bytes, state.config.read_timeout)
        data = parse_json(raw)
        cls = TokenizeChatRequest if isinstance(data, dict) and "messages" in data else TokenizeRequest
        body = _check_model(state, parse_body(raw, cls))
        return await asyncio.to_thread(_tokenize, state, body)

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        body = await _checked_body(request, state, DetokenizeRequest)
        if body.tokens and not all(0 <= t < state.engine.spec.vocab_size for t in body.tokens):
            raise APIError(400, f"tokens holds ids outside the vocabulary 0..{state.engine.spec.vocab_size - 1}",
                           "tokens")
        return {"prompt": await asyncio.to_thread(state.prompter.decode, body.tokens)}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await _checked_body(request, state, CompletionRequest)
        _, constraints = await asyncio.to_thread(state.prompter.structure, body, False)
        prompts, texts = await asyncio.to_thread(state.prompter.completion, body)
        return await _generate(request, state, body, prompts, texts, body.max_tokens,
                               serving.COMPLETION_DEFAULT_MAX_TOKENS, chat=False, constraints=constraints)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await _checked_body(request, state, ChatCompletionRequest)
        plan, constraints = await asyncio.to_thread(state.prompter.structure, body, True)
        prompt, echo = await asyncio.to_thread(state.prompter.chat, body, plan)
        return await _generate(request, state, body, [prompt], [echo], body.token_limit, None, chat=True,
                               plan=plan, constraints=constraints)


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "moe-engine",
            "root": state.model_name, "parent": None, "max_model_len": state.limit}


def _tokenize(state: ServerState, body) -> dict:
    p = state.prompter
    if isinstance(body, TokenizeChatRequest):
        ids, _ = p.chat(body)
    else:
        p.check_length(body.prompt, "prompt")
        ids = p.need_tokenizer("a text prompt")(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
    out = {"count": len(ids), "max_model_len": state.limit, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = p.tok.convert_ids_to_tokens(ids)
    return out


def _status_message(state: ServerState) -> str:
    try:
        state.require_ready()
    except APIError as e:
        return e.message
    return "ready"


# ---- request steps -----------------------------------------------------------------------------
def client_id(request: HTTPRequest, state: ServerState) -> str:
    """Who sent a request, for the fairness limits (--max-seqs-per-client): the API key it sends (a digest of it),
    unless the server checks one --api-key that every client sends; else its connection (peer address and port)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if state.config.api_key is None and scheme.lower() == "bearer" and token.strip():
        return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()[:16]
    peer = request.client
    return f"peer:{peer.host}:{peer.port}" if peer is not None else "peer:?"


def _authorize(request: HTTPRequest, state: ServerState) -> None:
    key = state.config.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        what = "is missing" if not given else "is wrong"
        raise APIError(401, f"the API key {what}: send the header 'Authorization: Bearer <key>' with the "
                       f"server's --api-key")


async def _read_body(request: HTTPRequest, cap: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap * DRAIN_BODY_FACTOR:
        raise APIError(413, f"the request body has {declared} bytes; the server accepts at most {cap}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size <= cap:
                    chunks.append(chunk)
                elif size > cap * DRAIN_BODY_FACTOR:
                    break
    except (TimeoutError, ClientDisconnect) as e:
        raise _abandoned_body(request, size, declared, timeout, isinstance(e, TimeoutError)) from None
    if size > cap:
        raise APIError(413, f"the request body has {size}{'+' if size > cap * DRAIN_BODY_FACTOR else ''} bytes; "
                       f"the server accepts at most {cap}")
    return b"".join(chunks)


async def _checked_body(request: HTTPRequest, state: ServerState, model_cls):
    _authorize(request, state)
    state.require_ready()
    raw = await _read_body(request, state.config.max_body_bytes, state.config.read_timeout)
    return _check_model(state, parse_body(raw, model_cls, state.config.allow_unknown_fields))


def _check_model(state: ServerState, body):
    if body.model is not None and body.model != state.model_name:
        raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{state.model_name}` "
                       f"(see /v1/models)", "model")
    return body


def _abandoned_body(request: HTTPRequest, size: int, declared: str, timeout: float, timed_out: bool) -> APIError:
    """One log line for a body that never ended (the client stalled or left); the error answers a stalled one."""
    client = request.client
    where = f"{request.method} {request.url.path} from {client.host}:{client.port}" if client else request.url.path
    got = f"{size} of {declared or '?'} bytes"
    if timed_out:
        log.warning("dropped the body of %s: %s after %gs (--read-timeout)", where, got, timeout)
        return APIError(408, f"the request body did not arrive within {timeout:g}s ({got}); send it at once")
    log.info("dropped the body of %s: the client left after %s", where, got)
    return APIError(400, "the client closed the connection before the request body ended")


async def _generate(request: HTTPRequest, state: ServerState, body, prompts, texts, asked, default, chat: bool,
                    plan=None, constraints=None):
    what = "messages" if chat else "prompt"
    out = serving.output_for(body, chat)
    serving.check_token_ids(body, state.engine.spec.vocab_size, state.engine.generation_config, out)
    max_tokens = [serving.max_tokens_for(asked, len(p), state.limit, default, what) for p in prompts]
    eos = set(state.prompter.engine_eos())
    job = serving.submit(state.loop, state.metrics, state.engine.generation_config, prompts, max_tokens, body, out,
                         eos, texts, constraints, client=client_id(request, state))
    job.watch(request.receive)
    shape = Shape(out, state.model_name, TokenText(state.engine.tokenizer, body.return_tokens_as_token_ids),
                  body.request_id, plan if plan is not None and plan.mode != "none" else None)
    if body.stream:
        return StreamingResponse(serving.stream(job, shape, body.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    result = await serving.collect(job, shape)
    return JSONResponse(result if result is not None else {})


__all__ = ["ServerConfig", "ServerState", "create_app"]
