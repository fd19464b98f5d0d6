"""RAG stacks against a live `lowmem-e5 serve`, through the clients they ship: Cohere's SDK (v1 and v2), LangChain's
CohereEmbeddings in an InMemoryVectorStore, LlamaIndex's CohereEmbedding; the server's own OpenAPI document fuzzed
by schemathesis; an over-limit body reaching urllib as its 413. One server for the module (a tiny model, fp32)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.runtime.vector_formats import VectorCalibration, VectorFormat, index_identity, quantize

from .test_serving import Server

cohere = pytest.importorskip("cohere", reason="the dev extra's client packages are not installed")

SERVED = "embed-english-v3.0"  # a Cohere model name: LlamaIndex's CohereEmbedding accepts no other
DOCS = ["Paris is the capital and largest city of France.",
        "Photosynthesis converts light energy into chemical energy stored in glucose.",
        "def add(a, b):\n    return a + b",
        "The mitochondria produce ATP through oxidative phosphorylation."]
QUERIES = ["capital of france", "how do plants make sugar"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """(server, in-process embedder, calibration): the server runs the same folder, mode and max length."""
    folder = tmp_path_factory.mktemp("rag")
    embedder = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=128)))
    calibration = VectorCalibration.from_vectors(embedder.encode_documents(DOCS * 3),
                                                 index_identity(str(tiny_model_dir), embedder.config))
    (folder / "ranges.json").write_text(json.dumps(calibration.to_dict()))
    server = Server(["--model", tiny_model_dir, "--quant", "fp32", "--max-length", "128", "--served-name", SERVED,
                     "--query-task", "NQ", "--ranges", folder / "ranges.json", "--max-wait-ms", "1",
                     "--max-body-bytes", "100000"], folder)
    try:
        server.wait_ready()
        yield server, embedder, calibration
    finally:
        server.stop()


def close(got, expected) -> None:
    """Server vectors against the in-process ones: the same model, batched differently (fp32 rounding only)."""
    got, expected = np.asarray(got, dtype=np.float32), np.asarray(expected, dtype=np.float32)
    assert got.shape == expected.shape
    assert (got * expected).sum(axis=1).min() >= 0.99999


def test_cohere_v1_and_v2_clients_get_queries_documents_and_every_format(served):
    server, embedder, calibration = served
    v1 = cohere.Client(api_key="unused", base_url=server.url)
    floats = v1.embed(texts=DOCS, model=SERVED, input_type="search_document")
    assert floats.response_type == "embeddings_floats" and floats.texts == DOCS
    close(floats.embeddings, embedder.encode_documents(DOCS))
    queries = v1.embed(texts=QUERIES, model=SERVED, input_type="search_query")
    close(queries.embeddings, embedder.encode_queries(QUERIES, task="NQ"))

    v2 = cohere.ClientV2(api_key="unused", base_url=server.url)
    types = ["float", "int8", "uint8", "binary", "ubinary"]
    by_type = v2.embed(texts=DOCS, model=SERVED, input_type="search_document", embedding_types=types)
    e = by_type.embeddings
    close(e.float_, embedder.encode_documents(DOCS))
    vectors = np.asarray(e.float_, dtype=np.float32)
    for name in types[1:]:  # the codes are the vector-format module's codes of the same vectors
        assert np.array_equal(np.asarray(getattr(e, name)), quantize(vectors, VectorFormat(name), calibration)), name
    assert by_type.meta.billed_units.input_tokens > 0

    classified = v2.embed(texts=QUERIES, model=SERVED, input_type="classification",
                          request_options={"additional_body_parameters": {"instruction": "Classify the topic"}})
    close(classified.embeddings.float_, embedder.encode_queries(QUERIES, instruction="Classify the topic"))
    with pytest.raises(cohere.errors.BadRequestError) as refused:
        v2.embed(texts=QUERIES, model=SERVED, input_type="clustering")
    assert "needs an 'instruction'" in refused.value.body["message"]
    with pytest.raises(cohere.errors.NotFoundError) as unknown:
        v2.embed(texts=QUERIES, model="embed-v4.0", input_type="search_query")
    assert f"expected one of: {SERVED}" in unknown.value.body["message"]


def test_langchain_cohere_embeddings_in_an_in_memory_vector_store(served):
    from langchain_cohere import CohereEmbeddings
    from langchain_core.vectorstores import InMemoryVectorStore

    server, embedder, _ = served
    embeddings = CohereEmbeddings(model=SERVED, base_url=server.url, cohere_api_key="unused")
    close([embeddings.embed_query(QUERIES[0])], embedder.encode_queries(QUERIES[:1], task="NQ"))
    close(embeddings.embed_documents(DOCS), embedder.encode_documents(DOCS))
    store = InMemoryVectorStore.from_texts(DOCS, embeddings)
    expected = embedder.encode_queries(QUERIES, task="NQ") @ embedder.encode_documents(DOCS).T
    for query, scores in zip(QUERIES, expected):
        assert store.similarity_search(query, k=1)[0].page_content == DOCS[int(np.argmax(scores))]


def test_llama_index_cohere_embedding(served):
    from llama_index.embeddings.cohere import CohereEmbedding

    server, embedder, _ = served
    embeddings = CohereEmbedding(api_key="unused", model_name=SERVED, base_url=server.url)
    close([embeddings.get_query_embedding(QUERIES[0])], embedder.encode_queries(QUERIES[:1], task="NQ"))
    close([embeddings.get_text_embedding(DOCS[0])], embedder.encode_documents(DOCS[:1]))


def test_an_over_limit_body_reaches_urllib_as_its_413(served):
    """urllib sends the whole body before reading: the server reads and discards it, then answers (a connection
    reset before)."""
    server, _, _ = served
    body = json.dumps({"input": ["word " * 1000] * 400}).encode()  # ~2 MB, over this server's 100,000 bytes
    request = urllib.request.Request(server.url + "/v1/embeddings", data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as answered:
        urllib.request.urlopen(request, timeout=60)
    assert answered.value.code == 413
    assert json.loads(answered.value.read())["error"]["code"] == "payload_too_large"
    with urllib.request.urlopen(server.url + "/health", timeout=10) as still:  # and the server keeps serving
        assert json.loads(still.read())["status"] == "ok"


def test_schemathesis_finds_no_5xx_and_every_refusal_in_its_routes_shape(served):
    """Requests generated from the server's own /openapi.json, valid and invalid ones, at most 15 of each kind per
    operation (about 20 s)."""
    import hypothesis
    import schemathesis

    server, _, _ = served
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    counted: dict[str, int] = {}

    def fuzz(op, mode) -> None:
        label = f"{op.label} ({mode.value})"
        counted[label] = 0

        @hypothesis.settings(max_examples=15, deadline=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        def check(case) -> None:
            response = case.call(base_url=server.url, timeout=30)
            counted[label] += 1
            assert response.status_code < 500, (op.label, response.status_code, response.text[:300])
            if response.status_code >= 400:
                body = response.json()
                if op.path in ("/v1/embed", "/v2/embed"):
                    assert set(body) == {"id", "message"}, body
                else:
                    assert set(body) == {"error"} and body["error"]["message"], body

        try:
            check()
        except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (GET /health has no parameters)
            del counted[label]

    for operation in schema.get_all_operations():  # valid requests, then requests the schema says are invalid
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzz(operation.ok(), mode)
    print(f"schemathesis: {sum(counted.values())} requests: {counted}")
    assert len(counted) >= 12 and sum(counted.values()) >= 100
    with urllib.request.urlopen(server.url + "/health", timeout=10) as still:
        assert json.loads(still.read())["status"] == "ok"


def test_openapi_describes_every_route_and_refusals_keep_their_shape(tiny_embedder):
    """In process: request and response models in /openapi.json, /docs, 405 with Allow, Cohere's error shape on its
    routes, int8 refused without ranges, token ids refused naming the LangChain setting."""
    from starlette.testclient import TestClient

    from lowmem_e5.serving.config import ServeConfig
    from lowmem_e5.serving.server import build_server

    scheduler, app = build_server(lambda: tiny_embedder, ServeConfig(max_wait_ms=1))
    http = TestClient(app)
    scheduler.start()
    try:
        spec = http.get("/openapi.json").json()
        for path, method in (("/v1/embeddings", "post"), ("/v1/embed", "post"), ("/v2/embed", "post"),
                             ("/v1/adapters", "post")):
            op = spec["paths"][path][method]
            assert op["requestBody"]["content"]["application/json"]["schema"]["properties"], path
            assert "$ref" in json.dumps(op["responses"]["200" if method != "post" or path != "/v1/adapters"
                                                         else "201"]), path
            assert "400" in op["responses"], path
        assert {"/health", "/v1/models", "/metrics", "/v1/adapters/{name}"} <= set(spec["paths"])
        assert http.get("/docs").status_code == 200
        wrong = http.get("/v1/embed")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and set(wrong.json()) == {"id", "message"}
        wrong = http.put("/v1/embeddings", json={})
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and "error" in wrong.json()
        refused = http.post("/v2/embed", json={"texts": ["a"], "input_type": "search_document",
                                                "embedding_types": ["int8"]})
        assert refused.status_code == 400 and "--ranges FILE" in refused.json()["message"]
        binary = http.post("/v2/embed", json={"texts": ["a"], "input_type": "search_document",
                                               "embedding_types": ["binary"]})
        assert binary.status_code == 200 and len(binary.json()["embeddings"]["binary"][0]) == 8
        refused = http.post("/v1/embed", json={"texts": ["a"], "output_dimension": 256})
        assert refused.status_code == 400 and "not a Matryoshka model" in refused.json()["message"]
        ids = http.post("/v1/embeddings", json={"input": [101, 2023, 102]})
        assert ids.status_code == 400 and "check_embedding_ctx_length=False" in ids.json()["error"]["message"]
    finally:
        scheduler.stop(timeout=30)
