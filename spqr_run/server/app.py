"""The HTTP app: routes, API-key check, body-size limit, OpenAI-shaped errors, background model loading.

The socket comes up first; the model loads in a thread while /health (and every model route) answers 503.
Every error is `{"error": {message, type, param, code}}`; a 500 means a bug and its traceback is logged.

Text that is not valid Unicode in a request body (bytes that are not UTF-8, lone surrogates such as
"\ud800" in JSON strings) is replaced with U+FFFD in every field before anything reads it (`Guard`,
`spqr_run.text`); the answer carries an `X-Spqr-Warning` header naming the fields, and the log a warning.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spqr_run.errors import SpqrError
from spqr_run.server import protocol as P
from spqr_run.server.engine import Engine
from spqr_run.server.metrics import Metrics
from spqr_run.server.protocol import APIError
from spqr_run.server.serving import OpenAIServing
from spqr_run.server.serving_chat import create_chat_completion
from spqr_run.server.serving_completion import create_completion
from spqr_run.text import valid_json

log = logging.getLogger("spqr_run.server")

ROUTES = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
)


@dataclass
class ServerConfig:
    model_path: str
    model_name: str
    device: str = "auto"
    ctx: int | None = None
    memory: int | None = None  # bytes for weights + KV cache (None: the free memory)
    kv_cache: str = "auto"
    parallel: int = 4
    max_queue: int = 64
    prefix_reuse: bool = True
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    load_delay_s: float = 0.0  # test hook: stay in the loading state this long
    verify_checksums: bool = True  # check a .spqr's tensors against its header's checksums


class ServerState:
    """The model, engine and serving layer once loaded; `error` when loading failed."""

    def __init__(self, config: ServerConfig, on_load_failed: Callable[[str], None] | None = None) -> None:
        self.config, self.on_load_failed = config, on_load_failed
        self.metrics = Metrics()
        self.serving: OpenAIServing | None = None
        self.engine: Engine | None = None
        self.error: str | None = None
        self.created = int(time.time())

    def load(self) -> None:
        from spqr_run.runtime import load_runtime

        cfg = self.config
        try:
            time.sleep(cfg.load_delay_s)
            runtime = load_runtime(
                cfg.model_path,
                device=cfg.device,
                ctx=cfg.ctx,
                rows=cfg.parallel,
                memory=cfg.memory,
                kv_cache=cfg.kv_cache,
                verify_checksums=cfg.verify_checksums,
            )
            engine = Engine(
                runtime.model,
                runtime.tokenizer,
                slots=cfg.parallel,
                max_context=runtime.max_context,
                max_queue=cfg.max_queue,
                prefix_reuse=cfg.prefix_reuse,
                metrics=self.metrics,
            )
            engine.start()
            self.engine = engine
            from spqr_run.ops import model_kernel_path

            path = model_kernel_path(runtime.model)
            self.metrics.gpu_kernels = None if path is None else (path.name, path.reason)
            self.serving = OpenAIServing(runtime, engine, cfg.model_name)
            log.info(
                "ready: model %s loaded, %d slots of %d tokens (GET /health answers 200)",
                cfg.model_name,
                cfg.parallel,
                engine.max_context,
            )
        except Exception as e:  # noqa: BLE001 - a user error (bad file) or a bug: either way the server must stop
            self.error = str(e) if isinstance(e, SpqrError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, SpqrError):
                log.exception("loading the model failed")
            if self.on_load_failed:
                self.on_load_failed(self.error)

    def ready(self) -> OpenAIServing:
        if self.serving is None:
            raise APIError(
                503,
                "the model is still loading; retry shortly",
                type="service_unavailable",
                code="model_loading",
            )
        return self.serving


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # "\ud800"-"\udfff" in JSON text
WARNING_HEADER = b"x-spqr-warning"


def valid_body(body: bytes) -> tuple[bytes, list[str]]:
    """A JSON request body with every string made valid Unicode (`spqr_run.text.valid_json`), and the
    paths of the fields that changed ("messages[0].content"). Bodies that are valid UTF-8 without surrogate
    escapes (nearly all) and bodies that are not JSON come back unchanged."""
    try:
        body.decode("utf-8")
        if not _SURROGATE_ESCAPE.search(body):
            return body, []
    except UnicodeDecodeError:
        pass
    try:
        value = json.loads(body.decode("utf-8", errors="surrogateescape"))
    except ValueError:
        return body, []  # not JSON: the route's own parsing reports it
    value, fields = valid_json(value, "")
    if not fields:
        return body, []
    return json.dumps(value, ensure_ascii=False).encode("utf-8"), fields


class Guard:
    """ASGI middleware: rejects bodies over `max_body` bytes (413), makes the text in JSON bodies valid
    Unicode (`valid_body`, with an `X-Spqr-Warning` header on the answer), and counts answers by route and
    status."""

    def __init__(self, app: ASGIApp, *, max_body: int, metrics: Metrics) -> None:
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 0
        warning: bytes | None = None

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if warning is not None:
                    message = {**message, "headers": [*message.get("headers", []), (WARNING_HEADER, warning)]}
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                err = APIError(
                    413, f"the request body is larger than {self.max_body} bytes", code="request_too_large"
                )
                await JSONResponse(err.body(), status_code=413)(scope, receive, counted_send)
                return
            body, fields = valid_body(body)
            if fields:
                shown = ", ".join(fields[:8]) + (f" and {len(fields) - 8} more" if len(fields) > 8 else "")
                note = f"text that is not valid Unicode was replaced with U+FFFD in {shown}"
                warning = note.encode("ascii", errors="backslashreplace")
                log.warning("%s %s: %s", scope.get("method", ""), scope["path"], note)
                headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-length"]
                scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
            done = False

            async def replay() -> Message:
                nonlocal done
                if not done:
                    done = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, counted_send)
        finally:
            self.metrics.request_done(route, status or 499)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in err.get("loc", ())]
    if loc[:1] == ["body"]:
        loc = loc[1:]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('msg')}")
    param = ".".join(loc) or None
    # a union (str | list[...]) reports each alternative; name the field itself
    for i, part in enumerate(loc):
        if part in {"str", "list[str]", "list[int]", "list[list[int]]", "float", "int"} or "[" in part:
            param = ".".join(loc[:i]) or None
            break
    what = f"invalid {param}" if param else "invalid request body"
    return APIError(400, f"{what}: {err.get('msg')}", param=param)


def _install_errors(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        err = APIError(exc.status_code, message, code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def user_error(_: Request, exc: Exception) -> JSONResponse:
        err = APIError(400, str(exc))
        return JSONResponse(err.body(), status_code=400)

    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        err = APIError(
            500, f"internal server error ({type(exc).__name__})", type="server_error", code="internal_error"
        )
        return JSONResponse(err.body(), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(SpqrError, user_error)
    app.add_exception_handler(Exception, bug)


def _serving(request: Request) -> OpenAIServing:
    """Dependency: the serving layer, or 503 while the model loads."""
    return request.app.state.server.ready()


Ready = Annotated[OpenAIServing, Depends(_serving)]


def _respond(result: Any) -> Response:
    if result is None:  # the client left; nobody reads this
        return Response(status_code=499)
    if isinstance(result, P.BaseModel):
        return JSONResponse(result.model_dump())
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(result, media_type="text/event-stream", headers=headers)


def create_app(config: ServerConfig, *, on_load_failed: Callable[[str], None] | None = None) -> FastAPI:
    """The app; the model starts loading in a thread when the app starts up."""
    state = ServerState(config, on_load_failed)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, name="spqr-loader", daemon=True)
        loader.start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="spqr-run", summary="OpenAI-compatible server for SpQR models", lifespan=lifespan)
    app.state.server = state
    _install_errors(app)
    app.add_middleware(Guard, max_body=config.max_body_bytes, metrics=state.metrics)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        )
        if not ok:
            raise APIError(
                401, "missing or incorrect API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"
            )

    errors: dict[int | str, dict[str, Any]] = {
        s: {"model": P.ErrorResponse} for s in (400, 401, 404, 413, 429, 503)
    }
    api = APIRouter(dependencies=[Depends(check_key)], responses=errors)

    @app.get("/health", response_model=P.HealthResponse, responses={503: {"model": P.ErrorResponse}})
    def health() -> Any:
        if state.error is not None:
            err = APIError(
                503,
                f"loading the model failed: {state.error}",
                type="service_unavailable",
                code="load_failed",
            )
            return JSONResponse(err.body(), status_code=503)
        state.ready()
        return P.HealthResponse(status="ok")

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models", response_model=P.ModelList)
    def models(s: Ready) -> P.ModelList:
        card = P.ModelCard(id=s.model_name, created=state.created, max_model_len=s.max_context)
        return P.ModelList(data=[card])

    # with "stream": true the answer is server-sent events (chunks of the same shape, then "data: [DONE]");
    # before OpenAPI 3.2 a stream's `schema` describes one event: its fields, `data` a chunk's JSON or [DONE]
    event = {
        "type": "object",
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
        "required": ["data"],
    }
    streamed: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": event}}}}

    @api.post("/v1/completions", response_model=P.CompletionResponse, responses=streamed)
    async def completions(body: P.CompletionRequest, request: Request, s: Ready) -> Response:
        return _respond(await create_completion(s, body, request.is_disconnected))

    @api.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, responses=streamed)
    async def chat(body: P.ChatCompletionRequest, request: Request, s: Ready) -> Response:
        return _respond(await create_chat_completion(s, body, request.is_disconnected))

    @api.post("/tokenize", response_model=P.TokenizeResponse)
    def tokenize(body: P.TokenizeRequest, s: Ready) -> P.TokenizeResponse:
        s.check_model(body.model)
        if body.messages is not None:
            ids = s.chat_prompt(body.messages)
        elif body.prompt is not None:
            ids = s.tokenizer.encode(body.prompt, add_bos=None if body.add_special_tokens else False)
        else:
            raise APIError(400, "give 'prompt' or 'messages'", param="prompt")
        return P.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=s.max_context)

    @api.post("/detokenize", response_model=P.DetokenizeResponse)
    def detokenize(body: P.DetokenizeRequest, s: Ready) -> P.DetokenizeResponse:
        s.check_model(body.model)
        s.check_ids(body.tokens, "tokens")
        return P.DetokenizeResponse(prompt=s.tokenizer.decode(body.tokens))

    @api.get("/tokenizer_info", response_model=P.TokenizerInfoResponse)
    def tokenizer_info(s: Ready) -> P.TokenizerInfoResponse:
        tok = s.tokenizer
        pad = None if tok.pad_id is None else tok.decode([tok.pad_id])
        return P.TokenizerInfoResponse(
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            pad_token=pad,
            add_bos_token=tok.add_bos,
            model_max_length=s.max_context,
            chat_template=s.runtime.chat_template.source,
        )

    app.include_router(api)
    return app
