"""Retrieval on the labelled set's packages part through LangChain against `lowmem-e5 serve`: what a RAG stack gets.

    python scripts/rag_clients_retrieval.py [--quant nf4]      # ~7 min on 2 cores

Starts `lowmem-e5 serve` (127.0.0.1, a free port, `--query-instruction` the part's instruction, as `lowmem-e5
retrieval` uses it; stopped by its PID at the end), puts the part's 1,600 documents in a LangChain
`InMemoryVectorStore` through langchain-cohere's `CohereEmbeddings` (documents as `search_document`), and searches
the 300 test queries three ways: `CohereEmbeddings` (queries as `search_query`: the instruction applies),
langchain-openai's `OpenAIEmbeddings(check_embedding_ctx_length=False)` (queries arrive as documents: OpenAI's API has
no query field) and, with its defaults, `OpenAIEmbeddings()` (token ids, refused by the server). Documents are the
same vectors for both classes (the server embeds a document alike on either route), so the store is built once.
nDCG@10 from the top 100 per query with ir-measures, as `lowmem-e5 retrieval` scores. Writes
calibration/results/rag_clients_retrieval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowmem_e5.jobs.atomic import write_json_atomic  # noqa: E402
from lowmem_e5.quality.beir import load_beir, suggested_instruction  # noqa: E402
from lowmem_e5.quality.retrieval_metrics import per_query_scores, run_from_search, summarize  # noqa: E402
from lowmem_e5.results import environment  # noqa: E402

PART = ROOT / "calibration/labelled_v1/packages"
OUT = ROOT / "calibration/results/rag_clients_retrieval.json"
SERVED = "embed-english-v3.0"  # a Cohere model name: LlamaIndex's CohereEmbedding accepts no other


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(quant: str, instruction: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "lowmem_e5", "serve", "--port", str(port), "--quant", quant,
                             "--max-length", "512", "--served-name", SERVED, "--query-instruction", instruction,
                             "--max-client-batch-size", "96"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(900):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server was not ready in 180 s")


def ndcg(split, ranked: list[list[tuple[str, float]]]) -> float:
    index = {d: i for i, d in enumerate(split.doc_ids)}
    idx = np.array([[index[d] for d, _ in hits] for hits in ranked])
    scores = np.array([[s for _, s in hits] for hits in ranked], dtype=np.float32)
    return summarize(per_query_scores(split.qrels, run_from_search(split.query_ids, split.doc_ids, idx, scores),
                                      split.query_ids))["nDCG@10"]


def search(store, queries: list[str], k: int = 100) -> list[list[tuple[str, float]]]:
    """The store's top k per query, each query embedded by the store's embeddings class (its embed_query)."""
    out = []
    for q in queries:
        hits = store.similarity_search_with_score(q, k=k)
        out.append([(doc.metadata["id"], score) for doc, score in hits])
    return out


def main() -> None:
    from langchain_cohere import CohereEmbeddings
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_openai import OpenAIEmbeddings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quant", default="nf4")
    args = ap.parse_args()
    split = load_beir(PART, "test")
    instruction = suggested_instruction(PART)
    proc, url = start_server(args.quant, instruction, Path("/tmp/rag_clients_serve.log"))
    record: dict = {"command": f"python scripts/rag_clients_retrieval.py --quant {args.quant}", "part": "packages",
                    "queries": len(split.query_ids), "documents": len(split.doc_ids), "quant": args.quant,
                    "instruction": instruction}
    try:
        cohere = CohereEmbeddings(model=SERVED, base_url=url, cohere_api_key="unused")
        t0 = time.perf_counter()
        store = InMemoryVectorStore(embedding=cohere)
        for i in range(0, len(split.doc_ids), 96):  # CohereEmbeddings sends one request per call; Cohere's limit: 96
            store.add_texts(split.doc_texts[i:i + 96], metadatas=[{"id": d} for d in split.doc_ids[i:i + 96]],
                            ids=split.doc_ids[i:i + 96])
        record["documents_seconds"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        record["nDCG@10"] = {"CohereEmbeddings": ndcg(split, search(store, split.query_texts))}
        record["cohere_queries_seconds"] = round(time.perf_counter() - t0, 1)
        openai_strings = OpenAIEmbeddings(model=SERVED, base_url=url + "/v1", api_key="unused",
                                          check_embedding_ctx_length=False)
        as_documents = InMemoryVectorStore(embedding=openai_strings)
        as_documents.store = store.store  # the same document vectors
        record["nDCG@10"]["OpenAIEmbeddings(check_embedding_ctx_length=False)"] = ndcg(
            split, search(as_documents, split.query_texts))
        try:
            OpenAIEmbeddings(model=SERVED, base_url=url + "/v1", api_key="unused").embed_query(split.query_texts[0])
            record["OpenAIEmbeddings() defaults"] = "answered"
        except Exception as exc:  # the server refuses token ids: this is what a user sees
            record["OpenAIEmbeddings() defaults"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    record["environment"] = environment()
    write_json_atomic(OUT, record)
    print(json.dumps({k: v for k, v in record.items() if k != "environment"}, indent=2))


if __name__ == "__main__":
    main()
