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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import InputError, OutOfMemoryError, TextTooLongError
from ..results import mode_label
from ..runtime.adapters import AdapterError
from ..runtime.encoder import resolve_instruction
from ..runtime.tokenization import TokenizedTexts
from .config import ServeConfig, check_adapter_name
from .metrics import ServerMetrics
from .. import __version__
from ..runtime.vector_formats import VectorFormat, quantize
from .cohere_protocol import (
    CohereEmbedRequest,
    CohereEmbedResponse,
    CohereError,
    cohere_response,
    error_body,
    parse_cohere_request,
    unsupported_type,
)
from .protocol import (
    AdapterDeleted,
    AdapterLoaded,
    AdapterLoadRequest,
    ApiError,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorBody,
    Health,
    ModelList,
    bad_request,
    embedding_response,
    input_texts,
    parse_request,
)
from .scheduler import Job, Scheduler

log = logging.getLogger(__name__)
COHERE_ROUTES = ("/v1/embed", "/v2/embed")
DRAIN_BOUND = 64 << 20  # bytes of an over-limit body read and discarded before the 413 closes the connection


def body_schema(model) -> dict:
    """The OpenAPI request body of a route that reads its JSON itself (to bound its size and word its errors)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


def errors(model, *codes: int) -> dict:
    return {code: {"model": model, "description": "refused, with the reason"} for code in codes}


def create_app(config: ServeConfig, scheduler: Scheduler, metrics: ServerMetrics,
               on_stopped: Callable[[], None] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        # uvicorn runs this after in-flight requests finished (SIGTERM drains first): then stop the model thread.
        await asyncio.to_thread(scheduler.stop)
        if on_stopped is not None:
            on_stopped()

    app = FastAPI(title="lowmem_e5", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  description="E5-Mistral embeddings: OpenAI's /v1/embeddings, Cohere's /v1/embed and /v2/embed, "
                              "LoRA adapters by name in `model`.")

    def error_response(request: Request, exc: ApiError) -> JSONResponse:
        """OpenAI's error shape, or Cohere's on Cohere's routes."""
        body = error_body(exc.message) if request.url.path in COHERE_ROUTES else exc.body()
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.failures.labels(exc.code or exc.type).inc()
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: "no such route; expected POST /v1/embeddings, /v1/embed or /v2/embed, GET /v1/models or "
                        "GET /health",
                   405: f"method {request.method} is not allowed on {request.url.path}; allowed: "
                        f"{(exc.headers or {}).get('Allow', '')}"}.get(exc.status_code, str(exc.detail))
        return error_response(request, ApiError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def invalid_path(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"]) or None
        return error_response(request, bad_request(f"{where}: {first['msg']}", param=where))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error: %s: %s", type(exc).__name__, exc)
        metrics.failures.labels("internal").inc()
        return error_response(request, ApiError(500, "internal error; the server log has the details",
                                                type="server_error"))

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

    async def too_large(request: Request, message: str) -> ApiError:
        """The 413, after reading and discarding the rest of the body up to a bound (nginx's lingering close): a
        client that sends its whole body before reading (Python's urllib) otherwise gets a connection reset."""
        drained = 0
        try:
            async for chunk in request.stream():
                drained += len(chunk)
                if drained > DRAIN_BOUND:
                    break
        except ClientDisconnect:
            pass
        return ApiError(413, message, code="payload_too_large", headers={"Connection": "close"})

    async def read_json(request: Request) -> Any:
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise await too_large(request, f"the request body has {declared} bytes, more than this server's "
                                           f"--max-body-bytes {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise await too_large(request, f"the request body is over this server's --max-body-bytes {limit}")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
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

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}},
                                                                        "description": "Prometheus metrics"}})
    async def prometheus() -> Response:
        metrics.queue_requests.set(scheduler.pending_requests)
        metrics.queue_tokens.set(scheduler.pending_tokens)
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, responses=errors(ErrorBody, 401))
    async def models(request: Request) -> dict:
        authorize(request)
        created = int(app.state.started)
        base = {"id": config.served_name, "object": "model", "created": created, "owned_by": "lowmem_e5",
                "root": scheduler.embedder.loaded.source if scheduler.ready.is_set() and scheduler.embedder else None,
                "parent": None}
        data = [base] + [{"id": n, "object": "model", "created": created, "owned_by": "lowmem_e5", "root": n,
                          "parent": config.served_name} for n in sorted(scheduler.adapter_names)]
        return {"object": "list", "data": data}

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, openapi_extra=body_schema(EmbeddingRequest),
              responses=errors(ErrorBody, 400, 401, 404, 413, 429, 503),
              summary="OpenAI's embeddings API (the openai client; input_type/task/instruction are extras)")
    async def embeddings(request: Request) -> JSONResponse:
        return await counted(_embeddings(request))

    async def counted(handling) -> JSONResponse:
        """Await an embedding route's work, counting its outcome and (when answered) its duration."""
        arrived = time.perf_counter()
        try:
            response = await handling
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
        vectors, job, tokens, inference_seconds = await embed(e, texts, adapter, instruction, req.truncate)
        body = embedding_response(vectors, req.encoding_format, req.model or config.served_name, job.n_tokens)
        return JSONResponse(body, headers=timing_headers(job, tokens, inference_seconds))

    def timing_headers(job: Job, tokens: TokenizedTexts, inference_seconds: float) -> dict[str, str]:
        queue_seconds = (job.started or job.enqueued) - job.enqueued
        return {"X-Queue-Time": f"{queue_seconds * 1000:.3f}", "X-Inference-Time": f"{inference_seconds * 1000:.3f}",
                "X-Truncated-Inputs": str(len(tokens.truncated))}

    async def embed(e, texts: list[str], adapter: str | None, instruction: str | None, truncate: bool | None):
        """Tokenise, queue, wait: the vectors, the job, its tokens and the inference time (metrics recorded)."""
        t0 = time.perf_counter()
        tokens = await asyncio.to_thread(tokenize, e, texts, instruction, truncate)
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
        metrics.queue_seconds.observe((job.started or job.enqueued) - job.enqueued)
        metrics.inference_seconds.observe(inference_seconds)
        metrics.texts.inc(len(texts))
        metrics.tokens.inc(job.n_tokens)
        return vectors, job, tokens, inference_seconds

    def cohere_instruction(req: CohereEmbedRequest) -> str | None:
        explicit = req.task is not None or req.instruction is not None
        kind = req.input_type or "search_document"
        if kind == "search_document":
            if explicit:
                raise bad_request("input_type search_document takes no task or instruction (documents are embedded "
                                  "without one)", param="input_type")
            return None
        try:
            if explicit:
                return resolve_instruction(req.task, req.instruction)
            if kind == "search_query":
                return resolve_instruction(None if config.query_instruction else config.query_task,
                                           config.query_instruction)
        except InputError as exc:
            raise bad_request(str(exc), param="task") from None
        raise bad_request(f"input_type {kind} needs an 'instruction' (E5 writes one per dataset, e.g. 'Classify the "
                          "sentiment expressed in the given movie review text from the IMDB dataset'); send it as an "
                          "extra body field", param="instruction")

    def cohere_codes(vectors, types: list[str]) -> dict:
        """The requested types' arrays; int8/uint8 were checked against --ranges before the model ran."""
        return {name: vectors if name in ("float", "base64") else quantize(vectors, VectorFormat(name), config.ranges)
                for name in dict.fromkeys(types)}

    async def cohere_embed(request: Request, version: int) -> JSONResponse:
        authorize(request)
        e = embedder()
        req = parse_cohere_request(await read_json(request), version)
        adapter = adapter_of(req.model)
        texts = input_texts(req.texts, config.max_client_batch_size, name="texts")
        instruction = cohere_instruction(req)
        types = req.embedding_types or ["float"]
        scalar = [t for t in types if t in ("int8", "uint8")]
        if scalar and config.ranges is None:
            raise unsupported_type(scalar[0])
        if scalar and adapter is not None:
            raise bad_request(f"embedding type {scalar[0]!r} with adapter {adapter!r}: the server's --ranges "
                              "were made for the base model, whose vectors the adapter changes; ask for float, "
                              "binary or ubinary", param="embedding_types", code="ranges_mismatch")
        vectors, job, tokens, inference_seconds = await embed(e, texts, adapter, instruction, req.truncate != "NONE")
        body = cohere_response(vectors, cohere_codes(vectors, types), texts, version,
                               by_type=version == 2 or req.embedding_types is not None, tokens=job.n_tokens)
        return JSONResponse(body, headers=timing_headers(job, tokens, inference_seconds))

    cohere_doc = dict(response_model=CohereEmbedResponse, openapi_extra=body_schema(CohereEmbedRequest),
                      responses=errors(CohereError, 400, 401, 404, 413, 429, 503))

    @app.post("/v1/embed", summary="Cohere's embed API, v1 (cohere.Client, LangChain's CohereEmbeddings)",
              **cohere_doc)
    async def embed_v1(request: Request) -> JSONResponse:
        return await counted(cohere_embed(request, 1))

    @app.post("/v2/embed", summary="Cohere's embed API, v2 (cohere.ClientV2, LlamaIndex's CohereEmbedding)",
              **cohere_doc)
    async def embed_v2(request: Request) -> JSONResponse:
        return await counted(cohere_embed(request, 2))

    def require_adapter_management(request: Request) -> None:
        authorize(request)
        if config.adapter_dir is None:
            raise ApiError(403, "loading and unloading adapters at run time is off; start the server with "
                                "--adapter-dir DIR and an API key", code="adapter_management_disabled")

    @app.post("/v1/adapters", response_model=AdapterLoaded, status_code=201,
              openapi_extra=body_schema(AdapterLoadRequest), responses=errors(ErrorBody, 400, 401, 403, 404, 409, 503))
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

    @app.delete("/v1/adapters/{name}", response_model=AdapterDeleted, responses=errors(ErrorBody, 401, 403, 404, 503))
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

