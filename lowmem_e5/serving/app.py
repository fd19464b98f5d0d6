"""Routes, auth, limits and metrics of the embeddings server. Handlers validate, tokenise and hand a job to the
scheduler; they never run the model. Every refusal is an OpenAI-shaped JSON error; nothing shows a stack trace."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, OutOfMemoryError, TextTooLongError
from ..results import mode_label
from ..runtime.adapters import AdapterError
from ..runtime.encoder import resolve_instruction
from ..runtime.tokenization import TokenizedTexts
from .config import ServeConfig, check_adapter_name
from .metrics import ServerMetrics
from .protocol import AdapterLoadRequest, ApiError, bad_request, embedding_response, input_texts, parse_request
from .scheduler import Job, Scheduler

log = logging.getLogger(__name__)


def create_app(config: ServeConfig, scheduler: Scheduler, metrics: ServerMetrics,
               on_stopped: Callable[[], None] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        # uvicorn runs this after in-flight requests finished (SIGTERM drains first): then stop the model thread.
        await asyncio.to_thread(scheduler.stop)
        if on_stopped is not None:
            on_stopped()

    app = FastAPI(title="lowmem_e5", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        metrics.failures.labels(exc.code or exc.type).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: "no such route; expected POST /v1/embeddings, GET /v1/models or GET /health",
                   405: "method not allowed on this route"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error: %s: %s", type(exc).__name__, exc)
        metrics.failures.labels("internal").inc()
        body = ApiError(500, "internal error; the server log has the details", type="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def embedder():
        if scheduler.failed is not None:
            raise ApiError(503, f"the model failed to load: {scheduler.failed}", type="server_error",
                           code="model_failed")
        if not scheduler.ready.is_set():
            raise ApiError(503, "the model is still loading; retry shortly", type="server_error",
                           code="model_loading", headers={"Retry-After": "5"})
        return scheduler.embedder

    def adapter_of(model: str | None) -> str | None:
        if model is None or model == config.served_name:
            return None
        if model in scheduler.adapter_names:
            return model
        names = ", ".join([config.served_name, *sorted(scheduler.adapter_names)])
        raise ApiError(404, f"model {model!r} is not served here; expected one of: {names}", param="model",
                       code="model_not_found")

    def instruction_of(req) -> str | None:
        """The queries' instruction, or None for documents."""
        explicit = req.task is not None or req.instruction is not None
        if req.input_type == "document":
            if explicit:
                raise bad_request("input_type 'document' takes no task or instruction (documents are embedded "
                                  "without one)", param="input_type")
            return None
        if req.input_type is None and not explicit and config.default_task is None:
            return None  # documents are the default
        try:
            if not explicit:
                if config.default_task is None:
                    raise InputError("queries need a 'task' (official name) or an 'instruction'; this server has no "
                                     "--default-task")
                return resolve_instruction(config.default_task, None)
            return resolve_instruction(req.task, req.instruction)
        except InputError as exc:
            raise bad_request(str(exc), param="task") from None

    async def read_json(request: Request) -> Any:
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body has {declared} bytes, more than this server's --max-body-bytes "
                                f"{limit}", code="payload_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body is over this server's --max-body-bytes {limit}",
                               code="payload_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    @app.get("/health")
    async def health() -> JSONResponse:
        if scheduler.failed is not None:
            return JSONResponse({"status": "failed", "error": str(scheduler.failed)}, status_code=503)
        if not scheduler.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        e = scheduler.embedder
        return JSONResponse({
            "status": "ok", "model": e.loaded.source, "served_name": config.served_name,
            "mode": mode_label(e.config.quant, e.config.double_quant, None,
                               e.config.group_size if e.config.quant == "gptq4" else None),
            "device": e.loaded.device,
            "weight_bytes": e.loaded.weight_bytes.total, "max_length": e.config.max_length,
            "adapters": sorted(scheduler.adapter_names),
        })

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_requests.set(scheduler.pending_requests)
        metrics.queue_tokens.set(scheduler.pending_tokens)
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        created = int(app.state.started)
        base = {"id": config.served_name, "object": "model", "created": created, "owned_by": "lowmem_e5",
                "root": scheduler.embedder.loaded.source if scheduler.ready.is_set() and scheduler.embedder else None,
                "parent": None}
        data = [base] + [{"id": n, "object": "model", "created": created, "owned_by": "lowmem_e5", "root": n,
                          "parent": config.served_name} for n in sorted(scheduler.adapter_names)]
        return {"object": "list", "data": data}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        arrived = time.perf_counter()
        try:
            response = await _embeddings(request)
        except ApiError as exc:
            metrics.requests.labels(str(exc.status)).inc()
            raise
        metrics.requests.labels("200").inc()
        metrics.request_seconds.observe(time.perf_counter() - arrived)
        return response

    async def _embeddings(request: Request) -> JSONResponse:
        authorize(request)
        e = embedder()
        req = parse_request(await read_json(request))
        if req.dimensions is not None:
            raise bad_request("'dimensions' is not supported: E5-Mistral is not a Matryoshka model, so a shortened "
                              "vector is not a valid embedding; leave it out", param="dimensions",
                              code="unsupported_parameter")
        adapter = adapter_of(req.model)
        texts = input_texts(req.input, config.max_client_batch_size)
        instruction = instruction_of(req)
        t0 = time.perf_counter()
        tokens = await asyncio.to_thread(tokenize, e, texts, instruction, req.truncate)
        metrics.tokenize_seconds.observe(time.perf_counter() - t0)
        job = Job(tokens=tokens, adapter=adapter, instruction=instruction)
        try:
            vectors, inference_seconds = await asyncio.wrap_future(scheduler.submit(job))
        except OutOfMemoryError as exc:
            raise ApiError(413, f"a text of this request does not fit on the device even alone: {exc}",
                           param="input", code="input_too_large") from None
        except AdapterError as exc:
            raise ApiError(404, f"adapter {adapter!r} was unloaded before this request ran: {exc}", param="model",
                           code="model_not_found") from None
        queue_seconds = (job.started or job.enqueued) - job.enqueued
        metrics.queue_seconds.observe(queue_seconds)
        metrics.inference_seconds.observe(inference_seconds)
        metrics.texts.inc(len(texts))
        metrics.tokens.inc(job.n_tokens)
        body = embedding_response(vectors, req.encoding_format, req.model or config.served_name, job.n_tokens)
        headers = {"X-Queue-Time": f"{queue_seconds * 1000:.3f}", "X-Inference-Time": f"{inference_seconds * 1000:.3f}",
                   "X-Truncated-Inputs": str(len(tokens.truncated))}
        return JSONResponse(body, headers=headers)

    def require_adapter_management(request: Request) -> None:
        authorize(request)
        if config.adapter_dir is None:
            raise ApiError(403, "loading and unloading adapters at run time is off; start the server with "
                                "--adapter-dir DIR and an API key", code="adapter_management_disabled")

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> JSONResponse:
        require_adapter_management(request)
        embedder()
        payload = await read_json(request)
        try:
            name = check_adapter_name(AdapterLoadRequest.model_validate(payload).name)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError too
            raise bad_request(f"expected {{\"name\": ADAPTER}} with a folder name from the adapter dir: "
                              f"{str(exc).splitlines()[0]}", param="name") from None
        try:
            folder = config.adapter_folder(name)
        except PermissionError as exc:
            raise ApiError(403, str(exc), param="name", code="adapter_outside_dir") from None
        except FileNotFoundError as exc:
            raise ApiError(404, str(exc), param="name", code="adapter_not_found") from None
        if name == config.served_name or name in scheduler.adapter_names:
            raise ApiError(409, f"adapter {name!r} is already loaded; unload it first", param="name",
                           code="adapter_exists")
        try:
            info = await asyncio.wrap_future(scheduler.control(lambda e: e.load_adapter(name, folder)))
        except AdapterError as exc:
            raise bad_request(str(exc), param="name", code="adapter_invalid") from None
        return JSONResponse({"id": info.name, "object": "model", "rank": info.rank, "bytes": info.bytes},
                            status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request) -> JSONResponse:
        require_adapter_management(request)
        embedder()
        if name not in scheduler.adapter_names:
            raise ApiError(404, f"adapter {name!r} is not loaded; loaded: {', '.join(sorted(scheduler.adapter_names)) or 'none'}",
                           param="name", code="adapter_not_found")
        # Queued behind the requests already accepted for it: those finish first, later ones get a 404.
        await asyncio.wrap_future(scheduler.control(lambda e: e.adapters.delete(name)))
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    app.state.started = time.time()
    return app


def tokenize(embedder, texts: list[str], instruction: str | None, truncate: bool | None) -> TokenizedTexts:
    try:
        return embedder.tokenize(texts, query=instruction is not None, instruction=instruction, truncate=truncate)
    except TextTooLongError as exc:
        raise ApiError(400, f"'input[{exc.index}]' has {exc.n_tokens} tokens, more than the maximum "
                            f"{exc.max_length}; shorten it or send truncate: true", param="input",
                       code="context_length_exceeded") from None
    except InputError as exc:
        raise bad_request(str(exc), param="input") from None

