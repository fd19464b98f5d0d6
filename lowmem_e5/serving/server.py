"""Start the server: the scheduler loads the model on its thread while uvicorn already answers /health (503 until
ready); a model that fails to load stops the server with the reason."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..runtime.config import RuntimeConfig
from ..runtime.encoder import Embedder
from ..runtime.loading import load_model
from ..runtime.vector_formats import index_identity
from .app import create_app
from .config import ServeConfig
from .metrics import ServerMetrics
from .scheduler import QueueLimits, Scheduler


def model_loader(runtime: RuntimeConfig, config: ServeConfig) -> Callable[[], Embedder]:
    """What the scheduler's thread runs first: the model per the runtime config, with the start-up adapters."""
    def load() -> Embedder:
        embedder = Embedder(load_model(runtime))
        if config.ranges is not None:  # int8 codes of another model or mode would not be this index's
            config.ranges.check(index_identity(embedder.loaded.source, embedder.config),
                                where="the --ranges calibration")
        for name, folder in config.adapters:
            embedder.load_adapter(name, folder)
        return embedder

    return load


def build_server(load: Callable[[], Embedder], config: ServeConfig,
                 on_stopped: Callable[[], None] | None = None) -> tuple[Scheduler, object]:
    """The scheduler (not started; `load` runs on its thread) and the ASGI app around it, limits from config."""
    metrics = ServerMetrics()
    limits = QueueLimits(max_requests=config.max_queue_requests, max_tokens=config.max_queue_tokens,
                         max_wait_ms=config.max_wait_ms, max_batch_requests=config.max_batch_requests)
    scheduler = Scheduler(load, limits, on_batch=metrics.on_batch)
    return scheduler, create_app(config, scheduler, metrics, on_stopped)


def serve(runtime: RuntimeConfig, config: ServeConfig, host: str, port: int, log: Callable[[str], None]) -> int:
    """Run until SIGINT/SIGTERM: requests already accepted finish first, then the process ends by that signal (as
    uvicorn re-raises it). Returns 2 when the model failed to load."""
    import uvicorn

    scheduler, app = build_server(model_loader(runtime, config), config,
                                  on_stopped=lambda: log("stopped: every accepted request answered"))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           lifespan="on"))

    def report_when_ready() -> None:
        scheduler.ready.wait()
        if scheduler.failed is not None:
            log(f"error: the model failed to load: {scheduler.failed}")
            server.should_exit = True
            return
        e = scheduler.embedder
        names = ", ".join([config.served_name, *sorted(scheduler.adapter_names)])
        log(f"ready on http://{host}:{port}: {e.loaded.source} as {e.config.quant} on {e.loaded.device}, "
            f"{e.loaded.weight_bytes.total:,} weight bytes; models: {names}")

    scheduler.start()
    threading.Thread(target=report_when_ready, name="lowmem-e5-ready", daemon=True).start()
    log(f"listening on http://{host}:{port} (loading the model; /health answers 503 until it is ready)")
    server.run()
    return 2 if scheduler.failed is not None else 0
