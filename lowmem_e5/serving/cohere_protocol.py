"""Cohere's embed API as this server speaks it (`POST /v1/embed`, `POST /v2/embed`), as the `cohere` 5.x SDK's
`Client` and `ClientV2` send and parse it, and what LangChain's `CohereEmbeddings` and LlamaIndex's `CohereEmbedding`
call.

It carries what E5 needs and OpenAI's API lacks: `input_type` says whether a text is a query (`search_query`: the
served query task's instruction) or a document (`search_document`), and `embedding_types` asks for stored vector
formats (runtime.vector_formats) per request. Errors are Cohere's shape, `{"id": ..., "message": ...}`.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .protocol import ApiError, bad_request, validate_body

InputType = Literal["search_document", "search_query", "classification", "clustering"]
EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
Truncate = Literal["NONE", "START", "END"]
EMBEDDING_TYPES: tuple[str, ...] = EmbeddingType.__args__  # type: ignore[attr-defined]


class CohereEmbedRequest(BaseModel):
    """POST /v1/embed and /v2/embed. `task` / `instruction` are this server's extras (Cohere's SDK sends them with
    `request_options={"additional_body_parameters": {...}}`): the instruction of a query, or of classification and
    clustering inputs, whose instructions E5 writes per dataset."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] | None = Field(None, description="the texts to embed")
    model: str | None = Field(None, description="the served model's name, or an adapter's")
    input_type: InputType | None = Field(None, description="search_query: a query (the served --query-task's "
                                         "instruction); search_document: a document; classification / clustering: "
                                         "a query of the request's `instruction`. v1 default: search_document")
    embedding_types: list[EmbeddingType] | None = Field(None, description="vector formats to return (int8 and "
                                                        "uint8 need the server's --ranges)")
    truncate: Truncate | None = Field(None, description="END (default): cut a text over the maximum length; NONE: "
                                      "refuse it; START is not supported")
    task: str | None = Field(None, description="extra: an official task name for the instruction")
    instruction: str | None = Field(None, description="extra: a free-text instruction")
    images: list[Any] | None = Field(None, description="not supported: E5-Mistral embeds text only")
    inputs: list[Any] | None = Field(None, description="not supported: send `texts`")
    max_tokens: int | None = Field(None, description="not supported: the server's --max-length applies")
    output_dimension: int | None = Field(None, description="not supported: E5-Mistral is not a Matryoshka model")
    priority: int | None = Field(None, description="accepted and ignored")


class CohereEmbeddingsByType(BaseModel):
    float_: list[list[float]] | None = Field(None, alias="float")
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class CohereApiVersion(BaseModel):
    version: str


class CohereBilledUnits(BaseModel):
    input_tokens: int


class CohereMeta(BaseModel):
    api_version: CohereApiVersion
    billed_units: CohereBilledUnits


class CohereEmbedResponse(BaseModel):
    """v1 answers `embeddings_floats` (a list of float lists) without `embedding_types`, else `embeddings_by_type`;
    v2 always answers by type."""

    id: str
    response_type: Literal["embeddings_floats", "embeddings_by_type"]
    embeddings: CohereEmbeddingsByType | list[list[float]]
    texts: list[str]
    meta: CohereMeta


class CohereError(BaseModel):
    id: str
    message: str


def error_body(message: str) -> dict[str, str]:
    return {"id": str(uuid.uuid4()), "message": message}


def parse_cohere_request(payload: Any, version: int) -> CohereEmbedRequest:
    req = validate_body(CohereEmbedRequest, payload)
    for name, why in (("images", "this server embeds text only (E5-Mistral has no image encoder)"),
                      ("inputs", "send the texts in `texts`"),
                      ("max_tokens", "the server's --max-length applies; send truncate END or NONE"),
                      ("output_dimension", "E5-Mistral is not a Matryoshka model, so a shortened vector is not a "
                                           "valid embedding")):
        if getattr(req, name) is not None:
            raise bad_request(f"'{name}' is not supported: {why}", param=name, code="unsupported_parameter")
    if not req.texts:
        raise bad_request("'texts' is missing or empty; expected a list of at least one text", param="texts")
    if version == 2 and req.input_type is None:
        raise bad_request("'input_type' is required: search_query, search_document, classification or clustering",
                          param="input_type")
    if req.truncate == "START":
        raise bad_request("truncate START (keep the end of a long text) is not supported: the E5 pooling reads the "
                          "appended end token, and texts are cut at the end; send END or NONE", param="truncate",
                          code="unsupported_parameter")
    return req


def cohere_response(vectors: np.ndarray, codes: dict[str, np.ndarray], texts: list[str], version: int,
                    by_type: bool, tokens: int) -> dict[str, Any]:
    """The response body. codes: the requested types' arrays (float: the float32 vectors)."""
    meta = {"api_version": {"version": str(version)}, "billed_units": {"input_tokens": tokens}}
    if not by_type:
        return {"id": str(uuid.uuid4()), "response_type": "embeddings_floats", "embeddings": vectors.tolist(),
                "texts": texts, "meta": meta}
    embeddings: dict[str, Any] = {}
    for name, array in codes.items():
        if name == "base64":
            embeddings[name] = [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
                                for v in array]
        else:
            embeddings[name] = array.tolist()
    return {"id": str(uuid.uuid4()), "response_type": "embeddings_by_type", "embeddings": embeddings, "texts": texts,
            "meta": meta}


def unsupported_type(name: str) -> ApiError:
    return bad_request(f"embedding type {name!r} needs int8 ranges: start the server with --ranges FILE (made by "
                       "`lowmem-e5 calibrate-vectors` with the served model and mode)", param="embedding_types",
                       code="ranges_missing")
