"""The embeddings server end to end: `lowmem-e5 serve` in a subprocess on 127.0.0.1, called over real HTTP by the
official `openai` client and by httpx. Every vector is checked against the in-process Embedder."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.runtime.instructions import TASK_INSTRUCTIONS

from .conftest import MIXED_TEXTS

openai = pytest.importorskip("openai")

API_KEY = "test-key-0123456789"
QUERIES = ["how do plants make sugar", "capital of france", "what is pi", "python add function"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m lowmem_e5 serve ...` on a free loopback port; stopped by its PID."""

    def __init__(self, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lowmem_e5", "serve", "--port", str(self.port), *map(str, args)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})

    def wait_ready(self, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
                assert r.status_code == 503 and r.json()["status"] == "loading", r.text
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def start_server(tmp_path):
    servers: list[Server] = []

    def start(*args, env=None) -> Server:
        server = Server(list(args), tmp_path, env=env)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


def client(server: Server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kwargs.pop("api_key", API_KEY), **kwargs)


def cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def vectors(response) -> np.ndarray:
    """The client decodes base64 itself only when it chose it (no encoding_format given); decode the rest here."""
    rows = [d.embedding for d in response.data]
    if rows and isinstance(rows[0], str):
        rows = [np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows]
    return np.array(rows, dtype=np.float32)


def in_process(model_dir, quant: str, adapters: dict[str, Path]) -> Embedder:
    e = Embedder(load_model(RuntimeConfig(model=str(model_dir), quant=quant, max_length=512)))
    for name, folder in adapters.items():
        e.load_adapter(name, folder)
    return e


@pytest.mark.parametrize("quant", ["fp32", "nf4"])
def test_openai_client_gets_the_in_process_vectors(start_server, tiny_model_dir, tiny_adapters, quant):
    adapters = {"A": tiny_adapters["A"], "B": tiny_adapters["B"]}
    server = start_server("--model", tiny_model_dir, "--quant", quant, "--max-length", 512,
                          "--adapter", f"A={adapters['A']}", "--adapter", f"B={adapters['B']}",
                          "--api-key-env", "LOWMEM_E5_TEST_KEY", env={"LOWMEM_E5_TEST_KEY": API_KEY})
    health = httpx.get(server.url + "/health").json()
    assert health["mode"] == quant and health["weight_bytes"] > 0 and health["adapters"] == ["A", "B"]
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["e5-mistral", "A", "B"]
    local = in_process(tiny_model_dir, quant, adapters)
    docs = MIXED_TEXTS
    for model, adapter in (("e5-mistral", None), ("A", "A"), ("B", "B")):
        want_docs = local.encode_documents(docs, adapter=adapter)
        want_queries = local.encode_queries(QUERIES, task="NQ", adapter=adapter)
        for fmt in ("float", "base64"):
            got = c.embeddings.create(input=docs, model=model, encoding_format=fmt)
            assert [d.index for d in got.data] == list(range(len(docs))) and got.model == model
            assert cos(vectors(got), want_docs).min() >= 0.9999
            n_tokens = sum(local.tokenize(docs).lengths)
            assert got.usage.prompt_tokens == got.usage.total_tokens == n_tokens
            got_q = c.embeddings.create(input=QUERIES, model=model, encoding_format=fmt, extra_body={"task": "NQ"})
            assert cos(vectors(got_q), want_queries).min() >= 0.9999
        # the client's default (base64, decoded by the client) and input_type + instruction give the same
        got = c.embeddings.create(input=QUERIES, model=model,
                                  extra_body={"input_type": "query", "instruction": TASK_INSTRUCTIONS["NQ"]})
        assert cos(vectors(got), want_queries).min() >= 0.9999
    # every adapter changes the vectors, over HTTP too (a silent adapter would answer base vectors with 200)
    base = vectors(c.embeddings.create(input=docs, model="e5-mistral"))
    for name in ("A", "B"):
        other = vectors(c.embeddings.create(input=docs, model=name))
        assert cos(base, other).max() < 0.999, name
    # a single string input, and the raw base64 is little-endian float32
    raw = httpx.post(server.url + "/v1/embeddings", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"input": docs[0], "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert raw.status_code == 200 and vec.shape == (local.dim,) and cos(vec, local.encode_documents(docs[:1])[0]) >= 0.9999


def post(server: Server, body, key: str | None = API_KEY, path: str = "/v1/embeddings", **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                          timeout=60, **kwargs)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kwargs)


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(start_server, tiny_model_dir, tiny_adapters,
                                                                   tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    adapter_dir = tmp_path / "adapters"
    adapter_dir.mkdir()
    (adapter_dir / "escape").symlink_to(tiny_adapters["C"])  # a link out of the adapter dir
    server = start_server("--model", tiny_model_dir, "--quant", "fp32", "--max-length", 32,
                          "--max-client-batch-size", 4, "--max-body-bytes", 20000, "--api-key-file", key_file,
                          "--adapter", f"A={tiny_adapters['A']}", "--adapter-dir", adapter_dir)
    valid = {"input": ["a valid text"], "model": "e5-mistral"}
    long_text = "word " * 100
    cases = [
        (b"{not json", None, 400, "not valid JSON"),
        ({"input": []}, None, 400, "empty list"),
        ({"input": "   "}, None, 400, "empty or whitespace"),
        ({"input": ["ok", ""]}, None, 400, "'input[1]' is empty"),
        ({"input": 5}, None, 400, "'input' is a number"),
        ({"input": None}, None, 400, "'input' is null"),
        ({"input": [["nested"]]}, None, 400, "token ids or nested lists"),
        ({"input": [101, 102]}, None, 400, "token ids"),
        ({"input": ["ok", 3]}, None, 400, "'input[1]' is a number"),
        ({"input": "x", "model": "nope"}, None, 404, "model 'nope' is not served here; expected one of: e5-mistral, A"),
        ({"input": "x", "task": "Nope"}, None, 400, "unknown task 'Nope'"),
        ({"input": "x", "task": "NQ", "instruction": "find it"}, None, 400, "not both"),
        ({"input": "x", "input_type": "query"}, None, 400, "queries need a 'task'"),
        ({"input": "x", "input_type": "document", "task": "NQ"}, None, 400, "documents are embedded without"),
        ({"input": ["a"] * 5}, None, 400, "more than this server's --max-client-batch-size 4"),
        ({"input": long_text, "truncate": False}, None, 400, "more than the maximum 32"),
        ({"input": "x" * 30000}, None, 413, "--max-body-bytes 20000"),
        ({"input": "x", "dimensions": 32}, None, 400, "not a Matryoshka model"),
        ({"input": "x", "encoding_format": "int8"}, None, 400, "encoding_format"),
        ({"input": "x", "surprise": 1}, None, 400, "unknown field 'surprise'"),
        (valid, "", 401, "missing or wrong API key"),
        (valid, "wrong-key", 401, "missing or wrong API key"),
        ({"name": "../A"}, "/v1/adapters", 400, "not valid"),
        ({"name": "/etc"}, "/v1/adapters", 400, "not valid"),
        ({"name": "escape"}, "/v1/adapters", 403, "leads out of the adapter dir"),
        ({"name": "missing"}, "/v1/adapters", 404, "not a folder in the adapter dir"),
        ({"path": str(tiny_adapters["B"])}, "/v1/adapters", 400, "expected {\"name\": ADAPTER}"),
    ]
    for body, extra, status, message in cases:
        key = API_KEY if extra is None or extra.startswith("/") else (extra or None)
        path = extra if extra and extra.startswith("/") else "/v1/embeddings"
        r = post(server, body, key=key, path=path)
        assert r.status_code == status, (body, r.status_code, r.text)
        error = r.json()["error"]
        assert message in error["message"], (body, error)
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in r.text
        ok = post(server, valid)
        assert ok.status_code == 200, (body, ok.text)
    # truncation is the default and is counted in a header
    r = post(server, {"input": [long_text, "short"]})
    assert r.status_code == 200 and r.headers["X-Truncated-Inputs"] == "1"
    assert float(r.headers["X-Queue-Time"]) >= 0 and float(r.headers["X-Inference-Time"]) > 0
    short_tokens = post(server, {"input": "short"}).json()["usage"]["prompt_tokens"]
    assert r.json()["usage"]["prompt_tokens"] == 32 + short_tokens  # the long text counts its 32 kept tokens
    # /health and /metrics are public; the OpenAI client sees the key errors as its own exceptions
    assert httpx.get(server.url + "/health").status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert "lowmem_e5_request_failure_total" in metrics and 'code="invalid_api_key"' in metrics
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="wrong").embeddings.create(input="x", model="e5-mistral")
    with pytest.raises(openai.BadRequestError, match="Matryoshka"):
        client(server).embeddings.create(input="x", model="e5-mistral", dimensions=16)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client(server).embeddings.create(input="x", model="B")


def test_adapters_load_and_unload_at_run_time_without_cross_talk(start_server, tiny_model_dir, tiny_adapters,
                                                                 tmp_path):
    import shutil

    adapter_dir = tmp_path / "adapters"
    adapter_dir.mkdir()
    shutil.copytree(tiny_adapters["B"], adapter_dir / "B")
    server = start_server("--model", tiny_model_dir, "--quant", "fp32", "--max-length", 512,
                          "--api-key-env", "LOWMEM_E5_TEST_KEY", "--adapter-dir", adapter_dir, "--max-wait-ms", 20,
                          env={"LOWMEM_E5_TEST_KEY": API_KEY})
    local = in_process(tiny_model_dir, "fp32", {"B": tiny_adapters["B"]})
    docs = MIXED_TEXTS
    want_b, want_base = local.encode_documents(docs, adapter="B"), local.encode_documents(docs)
    assert post(server, {"name": "B"}, key=None, path="/v1/adapters").status_code == 401
    r = post(server, {"name": "B"}, path="/v1/adapters")
    assert r.status_code == 201 and r.json()["id"] == "B", r.text
    assert post(server, {"name": "B"}, path="/v1/adapters").status_code == 409
    assert [m.id for m in client(server).models.list().data] == ["e5-mistral", "B"]
    assert cos(vectors(client(server).embeddings.create(input=docs, model="B")), want_b).min() >= 0.9999

    # Unload while requests for B are queued: each finishes with B's vectors or fails clearly; none gets others'.
    outcomes: list[tuple[int, dict]] = []

    def ask(model: str) -> None:
        r = post(server, {"input": docs, "model": model, "encoding_format": "float"})
        outcomes.append((r.status_code, r.json(), model))

    threads = [threading.Thread(target=ask, args=("B" if i % 2 else "e5-mistral",)) for i in range(24)]
    for t in threads[:12]:
        t.start()
    deleted = httpx.delete(server.url + "/v1/adapters/B", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    for t in threads[12:]:
        t.start()
    for t in threads:
        t.join()
    assert deleted.status_code == 200, deleted.text
    for status, body, model in outcomes:
        if status == 200:
            got = np.array([d["embedding"] for d in body["data"]])
            assert cos(got, want_b if model == "B" else want_base).min() >= 0.9999, model
        else:
            assert status == 404 and model == "B" and ("unloaded" in body["error"]["message"]
                                                      or "not served here" in body["error"]["message"]), body
    assert sum(1 for s, _, m in outcomes if m == "e5-mistral" and s == 200) == 12
    assert post(server, {"input": "x", "model": "B"}).status_code == 404
    assert httpx.delete(server.url + "/v1/adapters/B", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 404
    # loaded again, it gives its vectors again (prefix cache and peft state follow the reload)
    assert post(server, {"name": "B"}, path="/v1/adapters").status_code == 201
    got = vectors(client(server).embeddings.create(input=QUERIES, model="B", extra_body={"task": "NQ"}))
    assert cos(got, local.encode_queries(QUERIES, task="NQ", adapter="B")).min() >= 0.9999


DOCS_MIXED = MIXED_TEXTS + ["A longer document about rivers, lakes and the water cycle. " * 12,
                            "Short note.", "Bread needs flour, water, salt and yeast; knead, rest and bake. " * 5]
KINDS = [("document", None), ("query", "NQ"), ("query", "STS")]
MODELS = ["e5-mistral", "A", "B"]


@pytest.fixture(scope="module")
def table(tiny_model_dir, tiny_adapters) -> dict:
    """(model, kind, task, text) -> the vector of that text encoded alone, in process, with its adapter."""
    local = in_process(tiny_model_dir, "fp32", {"A": tiny_adapters["A"], "B": tiny_adapters["B"]})
    table = {}
    for model in MODELS:
        adapter = None if model == "e5-mistral" else model
        for kind, task in KINDS:
            for text in (DOCS_MIXED if kind == "document" else QUERIES + DOCS_MIXED[:3]):
                if kind == "document":
                    table[(model, kind, task, text)] = local.encode_documents([text], adapter=adapter)[0]
                else:
                    table[(model, kind, task, text)] = local.encode_queries([text], task=task, adapter=adapter)[0]
    return table


def run_clients(server: Server, table: dict, n_clients: int, seconds: float, seed: int = 0,
                stop: threading.Event | None = None) -> list[dict]:
    """n_clients threads, each sending random requests until `seconds` pass (or `stop` is set); one record each."""
    keys = sorted({(m, k, t) for m, k, t, _ in table})
    texts = {key: [x for m, k, t, x in table if (m, k, t) == key] for key in keys}
    records: list[dict] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as http:
            while time.monotonic() < deadline and not (stop and stop.is_set()):
                model, kind, task = keys[rng.integers(len(keys))]
                pool = texts[(model, kind, task)]
                chosen = [pool[j] for j in rng.choice(len(pool), size=rng.integers(1, 5), replace=False)]
                body = {"input": chosen, "model": model, "encoding_format": "base64"}
                body.update({"input_type": "query", "task": task} if kind == "query" else {"input_type": "document"})
                sent = time.monotonic()
                try:
                    r = http.post("/v1/embeddings", json=body)
                    record = {"status": r.status_code, "body": r.json(), "retry_after": r.headers.get("Retry-After")}
                except httpx.TransportError as exc:
                    record = {"status": None, "error": repr(exc)}
                record.update(sent=sent, done=time.monotonic(), key=(model, kind, task), texts=chosen)
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def check_vectors(record: dict, table: dict) -> None:
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in record["body"]["data"]])
    want = np.stack([table[(*record["key"], text)] for text in record["texts"]])
    assert cos(got, want).min() >= 0.9999, record["key"]


@pytest.mark.slow  # 27 s; mixed adapters over HTTP fast: test_adapters_load_and_unload_at_run_time_without_cross_talk
def test_load_16_clients_mixing_adapters_tasks_and_lengths(start_server, tiny_model_dir, tiny_adapters, table):
    adapters = {"A": tiny_adapters["A"], "B": tiny_adapters["B"]}
    server = start_server("--model", tiny_model_dir, "--quant", "fp32", "--max-length", 512, "--adapter",
                          f"A={adapters['A']}", "--adapter", f"B={adapters['B']}", "--api-key-env",
                          "LOWMEM_E5_TEST_KEY", env={"LOWMEM_E5_TEST_KEY": API_KEY})
    run_clients(server, table, n_clients=16, seconds=3)  # warm-up: allocator pools and caches reach their size
    rss_before = server.rss()
    started = time.monotonic()
    records = run_clients(server, table, n_clients=16, seconds=20, seed=100)
    assert time.monotonic() - started >= 20
    rss_after = server.rss()
    assert [r for r in records if r["status"] != 200] == []  # no errors while the queue has room
    for record in records:
        check_vectors(record, table)  # no cross-talk between adapters, tasks or neighbours in a batch
    assert len({r["key"] for r in records}) == 9 and len(records) > 100
    assert rss_after <= rss_before * 1.05, (rss_before, rss_after)
    # requests really shared batches
    metrics = httpx.get(server.url + "/metrics").text
    cycles = float(next(line.split()[-1] for line in metrics.splitlines()
                        if line.startswith("lowmem_e5_batch_requests_count")))
    requests = float(next(line.split()[-1] for line in metrics.splitlines()
                          if line.startswith("lowmem_e5_batch_requests_sum")))
    assert requests / cycles > 1.5, (requests, cycles)


def test_overload_answers_429_with_retry_after_and_nothing_else(start_server, tiny_model_dir, tiny_adapters, table):
    adapters = {"A": tiny_adapters["A"], "B": tiny_adapters["B"]}
    server = start_server("--model", tiny_model_dir, "--quant", "fp32", "--max-length", 512, "--adapter",
                          f"A={adapters['A']}", "--adapter", f"B={adapters['B']}", "--max-queue-requests", 2,
                          "--max-queue-tokens", 2000, "--api-key-env", "LOWMEM_E5_TEST_KEY",
                          env={"LOWMEM_E5_TEST_KEY": API_KEY})
    records = run_clients(server, table, n_clients=16, seconds=6)
    statuses = {r["status"] for r in records}
    assert statuses == {200, 429}, statuses
    for record in records:
        if record["status"] == 429:
            assert record["retry_after"] == "1" and "overloaded" in record["body"]["error"]["message"]
            assert record["body"]["error"]["type"] == "rate_limit_error"
        else:
            check_vectors(record, table)
    # the openai client retries 429 by itself and gets through
    got = client(server, max_retries=8).embeddings.create(input=QUERIES, model="A", extra_body={"task": "NQ"})
    assert len(got.data) == len(QUERIES)


def test_sigterm_during_load_finishes_every_accepted_request(start_server, tiny_model_dir, tiny_adapters, table):
    adapters = {"A": tiny_adapters["A"], "B": tiny_adapters["B"]}
    server = start_server("--model", tiny_model_dir, "--quant", "fp32", "--max-length", 512, "--adapter",
                          f"A={adapters['A']}", "--adapter", f"B={adapters['B']}", "--api-key-env",
                          "LOWMEM_E5_TEST_KEY", env={"LOWMEM_E5_TEST_KEY": API_KEY})
    stop = threading.Event()
    records: list[dict] = []
    load = threading.Thread(target=lambda: records.extend(run_clients(server, table, 16, 60, stop=stop)))
    load.start()
    time.sleep(3)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == -signal.SIGTERM  # uvicorn drains, then re-raises the signal
    assert "stopped: every accepted request answered" in server.output()
    stop.set()
    load.join()
    in_flight = [r for r in records if r["sent"] < signalled < r["done"]]
    assert in_flight, "no request was in flight at SIGTERM; the test did not exercise the drain"
    for record in records:
        if record["sent"] < signalled:  # accepted before the signal: answered, correctly
            assert record["status"] == 200, record
            check_vectors(record, table)
        else:  # after it: refused at the door, never a wrong vector or a 5xx
            assert record["status"] is None or record["status"] == 200, record
            if record["status"] == 200:
                check_vectors(record, table)
    assert sum(r["status"] == 200 for r in in_flight) == len(in_flight)


def test_a_text_that_fits_nowhere_fails_its_own_request_only(tiny_model_dir):
    """An out-of-memory on a text even alone gives that request its error; requests batched with it succeed."""
    import torch

    from lowmem_e5.errors import OutOfMemoryError
    from lowmem_e5.serving.scheduler import Job, QueueLimits, Scheduler

    e = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=512)))
    real_forward = e._forward

    def forward(rows, names=None, prefix=None):  # the device holds at most 100 tokens per row
        if max(len(r) for r in rows) > 100:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(rows, names, prefix)

    e._forward = forward
    scheduler = Scheduler(lambda: e, QueueLimits(max_requests=10, max_tokens=10**6, max_wait_ms=50))
    texts = [["short text"], ["long " * 300, "fits"], ["another short one", "and one more"]]
    jobs = [Job(tokens=e.tokenize(t), adapter=None, instruction=None) for t in texts]
    futures = [scheduler.submit(job) for job in jobs]  # queued before the thread starts: one cycle takes all
    scheduler.start()
    try:
        with pytest.raises(OutOfMemoryError, match="does not fit"):
            futures[1].result(timeout=60)
        for i in (0, 2):
            vectors, _ = futures[i].result(timeout=60)
            e._forward = real_forward
            assert cos(vectors, e.encode_documents(texts[i])).min() >= 0.9999
            e._forward = forward
        assert scheduler.pending_requests == 0 and scheduler.pending_tokens == 0
    finally:
        scheduler.stop(timeout=30)


def test_health_is_503_while_loading_and_after_a_failed_load(tiny_model_dir):
    from starlette.testclient import TestClient

    from lowmem_e5.serving.config import ServeConfig
    from lowmem_e5.serving.server import build_server

    gate = threading.Event()

    def slow_load():
        gate.wait(60)
        return Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=64)))

    small = ServeConfig(max_queue_requests=8, max_queue_tokens=10_000, max_wait_ms=1)
    scheduler, app = build_server(slow_load, small)
    http = TestClient(app)
    scheduler.start()
    try:
        assert http.get("/health").status_code == 503 and http.get("/health").json() == {"status": "loading"}
        r = http.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 503 and r.headers["Retry-After"] == "5" and "still loading" in r.json()["error"]["message"]
        gate.set()
        assert scheduler.ready.wait(60)
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["mode"] == "fp32" and health["weight_bytes"] > 0
        assert http.post("/v1/embeddings", json={"input": "x"}).status_code == 200
    finally:
        gate.set()
        scheduler.stop(timeout=30)

    def failing_load():
        raise ValueError("model folder '/nowhere' has no config.json")

    broken, app = build_server(failing_load, small)
    http = TestClient(app)
    broken.start()
    assert broken.ready.wait(10)
    assert http.get("/health").status_code == 503 and "no config.json" in http.get("/health").json()["error"]
    r = http.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]


def test_serve_exits_2_with_the_reason_when_the_model_cannot_load(tmp_path):
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "lowmem_e5", "serve", "--port", str(port), "--model", tmp_path / "none"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "model path" in r.stderr and "does not exist" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "lowmem_e5", "serve", "--port", str(port), "--api-key-env", "NO_SUCH_VAR"],
                       capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                                         if k != "NO_SUCH_VAR"})
    assert r.returncode == 2 and "NO_SUCH_VAR is not set" in r.stderr, r.stderr


def test_a_request_cancelled_while_queued_is_dropped_and_its_batch_answered(tiny_model_dir):
    """A handler cancelled while its job waits (client gone, shutdown) must not break the cycle it would join."""
    from lowmem_e5.serving.scheduler import Job, QueueLimits, Scheduler

    e = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=64)))
    scheduler = Scheduler(lambda: e, QueueLimits(max_requests=10, max_tokens=10**6, max_wait_ms=20))
    texts = ["one text", "two texts", "three texts"]
    futures = [scheduler.submit(Job(tokens=e.tokenize([t]), adapter=None, instruction=None)) for t in texts]
    assert futures[1].cancel() and scheduler.pending_requests == 2  # released at once
    scheduler.start()
    try:
        for i in (0, 2):
            assert cos(futures[i].result(timeout=60)[0], e.encode_documents([texts[i]])).min() >= 0.9999
        assert futures[1].cancelled() and scheduler.pending_requests == 0 and scheduler.pending_tokens == 0
    finally:
        scheduler.stop(timeout=30)


def test_default_task_makes_plain_requests_queries_and_documents_stay_reachable(tiny_model_dir):
    from starlette.testclient import TestClient

    from lowmem_e5.serving.config import ServeConfig
    from lowmem_e5.serving.server import build_server

    e = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=512)))
    scheduler, app = build_server(lambda: e, ServeConfig(default_task="NQ", max_queue_requests=8,
                                                         max_queue_tokens=100_000, max_wait_ms=1))
    http = TestClient(app)
    scheduler.start()
    try:
        def ask(**extra):
            r = http.post("/v1/embeddings", json={"input": QUERIES, **extra})
            assert r.status_code == 200, r.text
            return np.array([d["embedding"] for d in r.json()["data"]])

        assert cos(ask(), e.encode_queries(QUERIES, task="NQ")).min() >= 0.9999
        assert cos(ask(input_type="document"), e.encode_documents(QUERIES)).min() >= 0.9999
        assert cos(ask(task="STS"), e.encode_queries(QUERIES, task="STS")).min() >= 0.9999
    finally:
        scheduler.stop(timeout=30)


def test_truncation_follows_the_server_unless_the_request_says(tiny_model_dir):
    from starlette.testclient import TestClient

    from lowmem_e5.serving.config import ServeConfig
    from lowmem_e5.serving.server import build_server

    e = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=16, truncate=False)))
    scheduler, app = build_server(lambda: e, ServeConfig(max_queue_requests=8, max_queue_tokens=100_000,
                                                         max_wait_ms=1))
    http = TestClient(app)
    scheduler.start()
    try:
        long_text = "word " * 40
        refused = http.post("/v1/embeddings", json={"input": long_text})  # the server runs with --no-truncate
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
        cut = http.post("/v1/embeddings", json={"input": long_text, "truncate": True})
        assert cut.status_code == 200 and cut.headers["X-Truncated-Inputs"] == "1"
        assert cut.json()["usage"]["prompt_tokens"] == 16
    finally:
        scheduler.stop(timeout=30)
