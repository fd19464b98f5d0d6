"""The OpenAI embeddings API as this server speaks it: request and response models, and errors in OpenAI's shape.

Every refusal is an `ApiError` carrying its HTTP status, so the routes never build error bodies themselves.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema


class ApiError(Exception):
    """A request the server refuses: status code plus OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings. Fields beyond OpenAI's: input_type, task, instruction, truncate."""

    model_config = ConfigDict(extra="forbid")

    input: Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                                          "description": "a text or a list of texts (token ids are refused)"})]
    model: str | None = Field(None, description="the served model's name, or an adapter's")
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = Field(None, description="accepted and ignored, as OpenAI-compatible servers do")
    dimensions: int | None = Field(None, description="not supported: E5-Mistral is not a Matryoshka model")
    input_type: Literal["query", "document"] | None = None
    task: str | None = Field(None, description="an official task name: the texts are queries of it")
    instruction: str | None = Field(None, description="a free-text instruction: the texts are queries of it")
    truncate: bool | None = Field(None, description="cut texts over the maximum length (default: the server's "
                                  "setting)")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape, on every route but Cohere's."""

    error: ErrorDetail


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"]
    model: str | None = None
    served_name: str | None = None
    mode: str | None = None
    device: str | None = None
    weight_bytes: int | None = None
    max_length: int | None = None
    adapters: list[str] | None = None
    error: str | None = None


class AdapterLoaded(BaseModel):
    id: str
    object: Literal["model"] = "model"
    rank: int
    bytes: int


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


def validate_body(model: type[BaseModel], payload: Any):
    """A JSON body as `model`, or a 400 naming the first field that is wrong (and the known ones, for a typo)."""
    if not isinstance(payload, dict):
        raise bad_request(f"the request body is a JSON {type(payload).__name__}; expected a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            message = f"unknown field {where!r}; expected some of: {', '.join(model.model_fields)}"
        else:
            message = f"field {where!r}: {first['msg']}"
        raise bad_request(message, param=where) from None


def parse_request(payload: Any) -> EmbeddingRequest:
    return validate_body(EmbeddingRequest, payload)


def input_texts(value: Any, max_inputs: int, name: str = "input") -> list[str]:
    """`input` as a list of texts: a string or a list of strings. Token-id inputs are refused."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):
        if not value:
            raise bad_request(f"'{name}' is an empty list; expected at least one text", param=name)
        if all(isinstance(v, int) for v in value) or any(isinstance(v, list) for v in value):
            raise bad_request(f"'{name}' holds token ids or nested lists; this server takes text only: a string or a "
                              "list of strings. LangChain's OpenAIEmbeddings sends token ids unless created with "
                              "check_embedding_ctx_length=False (better: CohereEmbeddings against /v1/embed, which "
                              "also embeds queries as queries)", param=name, code="token_ids_not_supported")
        texts = value
    else:
        raise bad_request(f"'{name}' is {_json_type(value)}; expected a string or a list of strings", param=name)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise bad_request(f"'{name}[{i}]' is {_json_type(text)}; expected a string", param=name)
        if not text.strip():
            raise bad_request(f"'{name}[{i}]' is empty or whitespace only; expected some text to embed", param=name)
    if len(texts) > max_inputs:
        raise bad_request(f"'{name}' has {len(texts)} texts, more than this server's --max-client-batch-size "
                          f"{max_inputs}; split the request", param=name, code="too_many_inputs")
    return texts


def _json_type(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", dict: "an object",
            list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """float: a JSON list; base64: the little-endian float32 bytes, as the openai client decodes them."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


def embedding_response(vectors: np.ndarray, encoding_format: str, model: str, prompt_tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


class AdapterLoadRequest(BaseModel):
    """POST /v1/adapters: a name, resolved to a folder directly under --adapter-dir (never a path)."""

    model_config = ConfigDict(extra="forbid")

    name: str
