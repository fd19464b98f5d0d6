"""The one thread that owns the model: it loads it, cuts batches across requests, and runs adapter loads between
batches. HTTP handlers only validate, tokenise and `submit`; they never touch the model.

A cycle takes the first queued job, then whatever else is queued (waiting at most `max_wait_ms` while the queue is
empty, when the last cycle held several requests) up to the token budget, and runs all their rows in one encoder call: each row carries its own adapter
(peft's mixed batch) and, for queries, its instruction, whose cached prefix it reads. The encoder plans the forward
batches by the cheapest cut under the token budget and halves it on out-of-memory, as `encode` does. A call that fails for one request's sake (a text that does not fit even alone, an adapter unloaded
while the request waited) is rerun request by request, so only that request fails.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..errors import OutOfMemoryError
from ..runtime.adapters import AdapterError
from ..runtime.encoder import Embedder
from ..runtime.tokenization import TokenizedTexts
from .protocol import ApiError

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request's texts, tokenised: whole rows ([BOS] + content + [EOS]), queries with their instruction."""

    tokens: TokenizedTexts
    adapter: str | None  # None: the base model
    instruction: str | None  # queries: their instruction (already in the rows); documents: None
    future: Future = field(default_factory=Future)  # -> (vectors (n, hidden) float32, inference seconds)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None

    @functools.cached_property
    def n_tokens(self) -> int:  # asked at admission, release, batching and metrics: counted once
        return sum(self.tokens.lengths)


@dataclass
class Control:
    """Work on the model between batches (adapter load/unload), in queue order with the jobs."""

    run: Callable[[Embedder], object]
    future: Future = field(default_factory=Future)


_STOP = object()


@dataclass(frozen=True)
class QueueLimits:
    max_requests: int  # queued or running requests
    max_tokens: int  # their tokens
    max_wait_ms: float  # how long a cycle waits for more work while the queue is empty
    max_batch_requests: int | None = None  # requests per cycle (None: as many as the token budget takes)


class Scheduler:
    def __init__(self, load: Callable[[], Embedder], limits: QueueLimits,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        self._load = load
        self.limits = limits
        self._on_batch = on_batch  # (requests, tokens) of each cycle, for metrics
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.pending_requests = 0
        self.pending_tokens = 0
        self.embedder: Embedder | None = None
        self.adapter_names: frozenset[str] = frozenset()
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self._last_cycle_requests = 0
        self._thread = threading.Thread(target=self._main, name="lowmem-e5-model", daemon=True)

    # --- called from request threads -----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def submit(self, job: Job) -> Future:
        """Queue a job, or refuse it with 429 when the queue is full (413 when it could never fit)."""
        n = job.n_tokens
        if n > self.limits.max_tokens:
            raise ApiError(413, f"the request has {n} tokens, more than the server's queue holds "
                                f"({self.limits.max_tokens}); split it", code="request_too_large")
        with self._lock:
            if self.pending_requests + 1 > self.limits.max_requests or self.pending_tokens + n > self.limits.max_tokens:
                raise ApiError(429, f"Model is overloaded: {self.pending_requests} requests with "
                                    f"{self.pending_tokens} tokens are queued; retry later",
                               type="rate_limit_error", code="overloaded", headers={"Retry-After": "1"})
            self.pending_requests += 1
            self.pending_tokens += n
        job.future.add_done_callback(lambda _f: self._release(n))
        self._queue.put(job)
        return job.future

    def control(self, run: Callable[[Embedder], object]) -> Future:
        item = Control(run)
        self._queue.put(item)
        return item.future

    def _release(self, n_tokens: int) -> None:
        with self._lock:
            self.pending_requests -= 1
            self.pending_tokens -= n_tokens

    # --- the model thread ------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.embedder = self._load()
            self.adapter_names = frozenset(self.embedder.adapters.names)
        except BaseException as exc:  # noqa: BLE001 - reported through /health and the serve command
            self.failed = exc
            log.error("loading the model failed: %s", exc)
            return
        finally:
            self.ready.set()
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, Control):
                self._run_control(item)
                continue
            jobs, after = self._collect(item)
            self._last_cycle_requests = len(jobs)
            if jobs:
                self._run_jobs(jobs)
            if after is _STOP:
                return
            if after is not None:
                self._run_control(after)

    def _collect(self, first: Job) -> tuple[list[Job], object]:
        """The first job and what else is queued, up to the token budget; stops at a control item. Jobs whose
        request was cancelled while queued are dropped (a future once running can no longer be cancelled).

        It waits for more work only while requests arrive together (the last cycle held several): a lone client
        never pays the wait."""
        jobs: list[Job] = []
        tokens = 0
        if first.future.set_running_or_notify_cancel():
            jobs, tokens = [first], first.n_tokens
        wait = self.limits.max_wait_ms / 1000 if self._last_cycle_requests > 1 else 0.0
        deadline = time.monotonic() + wait
        budget = self.embedder.token_budget
        most = self.limits.max_batch_requests or float("inf")
        while tokens < budget and len(jobs) < most:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not isinstance(item, Job):
                return jobs, item
            if item.future.set_running_or_notify_cancel():
                jobs.append(item)
                tokens += item.n_tokens
        return jobs, None

    def _run_control(self, item: Control) -> None:
        if not item.future.set_running_or_notify_cancel():
            return
        try:
            item.future.set_result(item.run(self.embedder))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            item.future.set_exception(exc)
        finally:
            self.adapter_names = frozenset(self.embedder.adapters.names)

    def _run_jobs(self, jobs: list[Job]) -> None:
        start = time.monotonic()
        for job in jobs:
            job.started = start
        if self._on_batch is not None:
            self._on_batch(len(jobs), sum(j.n_tokens for j in jobs))
        try:
            self._encode(jobs)
        except (OutOfMemoryError, AdapterError) as exc:
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
            else:  # one request's text or adapter: rerun each alone, so only that one fails
                for job in jobs:
                    self._run_alone(job)
        except BaseException as exc:  # noqa: BLE001 - every request of the cycle learns of it
            log.exception("a batch failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)

    def _encode(self, jobs: list[Job]) -> None:
        """All rows of the cycle in one call: each row with its own adapter and (queries) instruction."""
        rows = [row for job in jobs for row in job.tokens.rows]
        instructions = [job.instruction for job in jobs for _ in job.tokens.rows]
        adapters = [job.adapter for job in jobs for _ in job.tokens.rows]
        t0 = time.perf_counter()
        vectors, _ = self.embedder.encode_tokenized(TokenizedTexts(rows=rows, truncated=[]),
                                                    instruction=instructions, adapter=adapters)
        seconds = time.perf_counter() - t0
        offset = 0
        for job in jobs:
            n = len(job.tokens.rows)
            job.future.set_result((vectors[offset:offset + n], seconds))
            offset += n

    def _run_alone(self, job: Job) -> None:
        try:
            self._encode([job])
        except BaseException as exc:  # noqa: BLE001 - this request's own failure
            job.future.set_exception(exc)
