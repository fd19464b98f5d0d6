"""`serve`: the OpenAI-compatible embeddings server (lowmem_e5.serving)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import LowmemError
from ..serving.config import ServeConfig
from .shared import add_runtime_args, log, runtime_config


def api_key(args: argparse.Namespace) -> str | None:
    """From a file or an environment variable, never from the command line (other users see it in `ps`)."""
    if args.api_key_file is not None and args.api_key_env is not None:
        raise LowmemError("give --api-key-file or --api-key-env, not both")
    if args.api_key_file is not None:
        if not args.api_key_file.is_file():
            raise LowmemError(f"API key file {str(args.api_key_file)!r} does not exist")
        key = args.api_key_file.read_text().strip()
        if not key:
            raise LowmemError(f"API key file {str(args.api_key_file)!r} is empty; expected the key on one line")
        return key
    if args.api_key_env is not None:
        key = os.environ.get(args.api_key_env, "").strip()
        if not key:
            raise LowmemError(f"environment variable {args.api_key_env} is not set or empty; expected the API key")
        return key
    return None


def parse_adapter(entry: str) -> tuple[str, str]:
    name, sep, folder = entry.partition("=")
    if not sep or not name or not folder:
        raise LowmemError(f"--adapter {entry!r} is not valid; expected NAME=FOLDER")
    if not Path(folder).is_dir():
        raise LowmemError(f"--adapter {entry!r}: folder {folder!r} does not exist")
    return name, folder


def cmd_serve(args: argparse.Namespace) -> int:
    from ..runtime.encoder import resolve_instruction
    from ..serving.server import serve

    runtime = runtime_config(args)
    for task in (args.default_task, args.query_task):
        if task is not None:
            resolve_instruction(task, None)  # unknown task: fail before loading anything
    ranges = None
    if args.ranges is not None:
        from ..runtime.vector_formats import VectorCalibration

        ranges = VectorCalibration.read(args.ranges)  # checked against the model once it is loaded
    config = ServeConfig(
        served_name=args.served_name, default_task=args.default_task,
        adapters=tuple(parse_adapter(a) for a in args.adapter), adapter_dir=args.adapter_dir, api_key=api_key(args),
        max_client_batch_size=args.max_client_batch_size, max_body_bytes=args.max_body_bytes,
        max_queue_requests=args.max_queue_requests, max_queue_tokens=args.max_queue_tokens,
        max_wait_ms=args.max_wait_ms, max_batch_requests=args.max_batch_requests, query_task=args.query_task,
        query_instruction=args.query_instruction, ranges=ranges,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        log(f"warning: serving on {args.host} without an API key: anyone who reaches this address can use it")
    return serve(runtime, config, args.host, args.port, log)


def add_commands(sub: argparse._SubParsersAction) -> None:
    d = ServeConfig()
    sv = sub.add_parser("serve", help="an OpenAI-compatible /v1/embeddings server with per-request LoRA adapters")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--served-name", default=d.served_name, help="the base model's name in `model` and /v1/models")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                    help="a LoRA adapter to serve under NAME (repeatable); requests select it by `model`")
    sv.add_argument("--default-task", help="official task name: requests without input_type/task/instruction are "
                                           "queries of this task (default: they are documents)")
    sv.add_argument("--query-task", default=d.query_task, help="official task of Cohere's input_type search_query "
                    f"(default: {d.query_task}; a request's `task` or `instruction` overrides it)")
    sv.add_argument("--query-instruction", help="instead of --query-task: a free-text instruction for search_query")
    sv.add_argument("--ranges", type=Path, help="the index's calibration (`lowmem-e5 calibrate-vectors`, same model and "
                    "mode): int8 and uint8 in Cohere's embedding_types")
    sv.add_argument("--api-key-file", type=Path, help="file holding the API key clients send as a Bearer token")
    sv.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    sv.add_argument("--adapter-dir", type=Path,
                    help="allow POST /v1/adapters to load folders directly under DIR by name (needs an API key)")
    sv.add_argument("--max-client-batch-size", type=int, default=d.max_client_batch_size, help="texts per request")
    sv.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    sv.add_argument("--max-queue-requests", type=int, default=d.max_queue_requests,
                    help="requests queued or running; past it: 429 with Retry-After")
    sv.add_argument("--max-queue-tokens", type=int, default=d.max_queue_tokens, help="their tokens; past it: 429")
    sv.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                    help="how long a batch waits for more requests while the queue is empty")
    sv.add_argument("--max-batch-requests", type=int, default=d.max_batch_requests,
                    help="requests per batch (default: as many as the token budget takes; 1: no cross-request batching)")
    add_runtime_args(sv)
    sv.set_defaults(func=cmd_serve)
