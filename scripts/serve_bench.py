"""Embedding servers side by side on one machine and model: requests/s, texts/s and p50/p99 latency at several
concurrencies, for short queries (one per request) and mixed documents (four per request).

    python scripts/serve_bench.py [--modes fp32,nf4] [--concurrency 1,4,16] [--seconds 6] [--repeats 2]
                                  [--infinity-venv DIR] [--out calibration/results/serve_bench.json]

Engines, each its own server process on 127.0.0.1, all started before timing and timed in rotating order:
- lowmem_e5: `lowmem-e5 serve` (cross-request batching by the token budget, prefix cache for queries);
- one_at_a_time: the same server with `--max-batch-requests 1`: what cross-request batching gains;
- sentence_transformers: a minimal FastAPI endpoint calling `SentenceTransformer.encode`, as a user writes it
  (sync handler, so FastAPI's thread pool calls encode concurrently), set up as in scripts/bench.py;
- infinity (with --infinity-venv): infinity-emb in its own venv, on a converted copy of the model folder
  (scripts/infinity_model.py), fp32 only (its torch engine has no bitsandbytes modes).
Every engine's vectors are checked against the in-process Embedder before it is timed; while one engine is
timed the others are stopped (SIGSTOP), so an idle server's polling takes no CPU from it. The load generator's
threads share the 2 cores with the server, equally for every engine.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

MAX_LENGTH = 512
DOCS_PER_REQUEST = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- workloads ---------------------------------------------------------------------------------------------
def workloads(tokenizer) -> dict[str, list[dict]]:
    """Request bodies: each query alone with its task; documents four at a time (25-470 tokens)."""
    from bench import workloads as bench_workloads

    w = bench_workloads(tokenizer)
    queries = [{"input": [q], "input_type": "query", "task": t} for q, t in w["queries"]]
    docs = w["documents"]
    documents = [{"input": docs[i:i + DOCS_PER_REQUEST], "input_type": "document"}
                 for i in range(0, len(docs) - DOCS_PER_REQUEST + 1, DOCS_PER_REQUEST)]
    return {"queries": queries, "documents": documents}


# --- engines -------------------------------------------------------------------------------------------------
class Engine:
    def __init__(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(f"/tmp/serve-bench-{name}-{self.port}.log")
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], stdout=open(self.log_path, "w"),
                                     stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})

    def wait(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout} s")

    def pause(self, paused: bool) -> None:
        """SIGSTOP while another engine is timed: an idle server that polls (infinity's batch loop spins) must not
        take CPU from the one being measured."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        self.pause(False)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def engines_for(mode: str, infinity_venv: Path | None, model_dir: Path) -> list[Engine]:
    ours = [sys.executable, "-m", "lowmem_e5", "serve", "--quant", mode, "--max-length", str(MAX_LENGTH)]
    engines = [Engine("lowmem_e5", ours), Engine("one_at_a_time", ours + ["--max-batch-requests", "1"]),
               Engine("sentence_transformers", [sys.executable, __file__, "--child-st", mode])]
    if infinity_venv is not None and mode == "fp32":
        from infinity_model import infinity_command

        engines.append(Engine("infinity", infinity_command(infinity_venv, model_dir), env={"DO_NOT_TRACK": "1"}))
    return engines


def st_server(mode: str, port: int) -> None:
    """sentence-transformers behind the FastAPI endpoint its users write."""
    import uvicorn
    from bench import SentenceTransformers
    from fastapi import FastAPI

    from lowmem_e5.runtime.instructions import query_prefix, task_instruction

    st = SentenceTransformers(mode)
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    def embeddings(body: dict):
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if body.get("input_type") == "query":
            prompt = st.bos + query_prefix(task_instruction(body["task"]))
            vectors = st.model.encode([t + st.eos for t in texts], prompt=prompt, batch_size=32)
        else:
            vectors = st.model.encode([st.bos + t + st.eos for t in texts], batch_size=32)
        return {"object": "list", "model": "e5", "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                                                          for i, v in enumerate(vectors)]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- measuring -----------------------------------------------------------------------------------------------
def request_body(engine: Engine, body: dict) -> dict:
    if engine.name != "infinity":
        return {**body, "model": "e5-mistral", "encoding_format": "float"}
    from lowmem_e5.runtime.instructions import format_query, task_instruction

    texts = body["input"]  # infinity knows no instructions: the client formats queries, as its users do
    if body["input_type"] == "query":
        texts = [format_query(t, task_instruction(body["task"])) for t in texts]
    return {"input": texts, "model": "e5", "encoding_format": "float"}


def check(engine: Engine, requests: dict[str, list[dict]], embedder) -> float:
    """Min cosine of the engine's vectors to the in-process Embedder's, over sample requests of both kinds."""
    import httpx

    worst = 1.0
    for body in requests["queries"][:6] + requests["documents"][:3]:
        r = httpx.post(engine.url + "/v1/embeddings", json=request_body(engine, body), timeout=300)
        r.raise_for_status()
        got = np.array([d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])])
        if body["input_type"] == "query":
            want = embedder.encode_queries(body["input"], task=body["task"])
        else:
            want = embedder.encode_documents(body["input"])
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        worst = min(worst, float(cos.min()))
    return worst


def load(engine: Engine, bodies: list[dict], clients: int, seconds: float) -> dict:
    """`clients` threads sending requests back to back for `seconds`; stops by itself."""
    import httpx

    latencies: list[float] = []
    texts = [0]
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        with httpx.Client(timeout=300) as http:
            k = i
            while time.monotonic() < deadline:
                body = request_body(engine, bodies[k % len(bodies)])
                k += clients
                t0 = time.perf_counter()
                r = http.post(engine.url + "/v1/embeddings", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        texts[0] += len(body["input"])
                    else:
                        errors[0] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "texts": texts[0], "errors": errors[0], "seconds": elapsed,
            "latencies": latencies}


def summarise(phases: list[dict]) -> dict:
    lat = sorted(x for p in phases for x in p["latencies"])
    rps = [p["requests"] / p["seconds"] for p in phases]
    tps = [p["texts"] / p["seconds"] for p in phases]
    return {"requests_per_s": statistics.median(rps), "texts_per_s": statistics.median(tps),
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "requests": sum(p["requests"] for p in phases), "errors": sum(p["errors"] for p in phases),
            "runs_texts_per_s": tps}


def bench_mode(mode: str, args, model_dir: Path) -> dict:
    from lowmem_e5 import Embedder, RuntimeConfig, load_model

    embedder = Embedder(load_model(RuntimeConfig(quant=mode, max_length=MAX_LENGTH)))
    requests = workloads(embedder.loaded.tokenizer)
    engines = engines_for(mode, args.infinity_venv, model_dir)
    try:
        for e in engines:
            e.wait()
        checks = {e.name: check(e, requests, embedder) for e in engines}
        print(f"[{mode}] min cosine to the in-process Embedder: {checks}", file=sys.stderr)
        for name, c in checks.items():
            if c < 0.99:
                raise RuntimeError(f"{name} gives other vectors (min cosine {c:.4f}); refusing to time it")
        del embedder
        for e in engines:  # untimed warm-up: first-call costs, each instruction's cached prefix, allocator pools
            for other in engines:
                other.pause(other is not e)
            for bodies in requests.values():
                load(e, bodies, 4, 2.0)
        results: dict = {"vector_check_min_cosine": checks, "workloads": {}}
        for workload, bodies in requests.items():
            per_c = {}
            for clients in args.concurrency:
                phases: dict[str, list[dict]] = {e.name: [] for e in engines}
                for rep in range(args.repeats):
                    order = engines[rep % len(engines):] + engines[:rep % len(engines)]
                    for e in order:
                        for other in engines:
                            other.pause(other is not e)
                        phases[e.name].append(load(e, bodies, clients, args.seconds))
                for e in engines:
                    e.pause(False)
                per_c[str(clients)] = {name: summarise(p) for name, p in phases.items()}
                row = per_c[str(clients)]
                print(f"[{mode}] {workload} x{clients}: " + ", ".join(
                    f"{n} {s['texts_per_s']:.1f} texts/s p50 {s['p50_ms']:.0f} ms" for n, s in row.items()),
                    file=sys.stderr)
            results["workloads"][workload] = per_c
        return results
    finally:
        for e in engines:
            e.stop()


def table(result: dict) -> str:
    lines = ["| mode | workload | clients | engine | requests/s | texts/s | p50 ms | p99 ms | vs lowmem_e5 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, m in result["modes"].items():
        for workload, per_c in m["workloads"].items():
            for clients, row in per_c.items():
                ours = row["lowmem_e5"]["texts_per_s"]
                for name, s in row.items():
                    lines.append(f"| {mode} | {workload} | {clients} | {name} | {s['requests_per_s']:.1f} | "
                                 f"{s['texts_per_s']:.1f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | "
                                 f"{ours / s['texts_per_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="fp32,nf4")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--infinity-venv", type=Path, help="a venv with infinity-emb (scripts/infinity_model.py)")
    ap.add_argument("--out", type=Path, default=ROOT / "calibration/results/serve_bench.json")
    ap.add_argument("--child-st", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_st:
        return st_server(args.child_st, args.port)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    from lowmem_e5.default_model import ensure_default_model
    from lowmem_e5.jobs.atomic import write_json_atomic
    from lowmem_e5.results import environment

    model_dir = ensure_default_model()
    result = {"command": "python " + " ".join(sys.argv), "model": str(model_dir),
              "note": "SmolLM2-135M in E5-Mistral's architecture: a general language model, not a trained embedder",
              "seconds_per_run": args.seconds, "repeats": args.repeats, "docs_per_request": DOCS_PER_REQUEST,
              "environment": environment(), "modes": {}}
    for mode in args.modes.split(","):
        result["modes"][mode] = bench_mode(mode, args, model_dir)
    for m in result["modes"].values():
        for per_c in m["workloads"].values():
            for row in per_c.values():
                for s in row.values():
                    s.pop("latencies", None)
    write_json_atomic(args.out, result)
    print(table(result))


if __name__ == "__main__":
    main()
