"""Prometheus metrics of one server (its own registry, so several servers in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lowmem_e5_request", "embedding requests answered", ["status"], registry=r)
        self.failures = Counter("lowmem_e5_request_failure", "embedding requests refused or failed, by error code",
                                ["code"], registry=r)
        self.texts = Counter("lowmem_e5_texts", "texts embedded", registry=r)
        self.tokens = Counter("lowmem_e5_tokens", "tokens embedded (BOS, instruction and EOS included)", registry=r)
        self.queue_requests = Gauge("lowmem_e5_queue_size", "requests queued or running", registry=r)
        self.queue_tokens = Gauge("lowmem_e5_queue_tokens", "tokens of the requests queued or running", registry=r)
        self.batch_tokens = Histogram("lowmem_e5_batch_tokens", "tokens per scheduler cycle", buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.batch_requests = Histogram("lowmem_e5_batch_requests", "requests per scheduler cycle",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.tokenize_seconds = Histogram("lowmem_e5_tokenize_duration_seconds", "validation and tokenisation",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("lowmem_e5_queue_duration_seconds", "time from enqueue to the model",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("lowmem_e5_inference_duration_seconds", "model time of the request's call",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("lowmem_e5_request_duration_seconds", "whole request",
                                         buckets=LATENCY_BUCKETS, registry=r)

    def on_batch(self, requests: int, tokens: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_tokens.observe(tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
