"""What the server is told at start, checked: names, limits, keys and where adapters may be loaded from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"adapter name {name!r} is not valid; expected 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (a name, never a path)")
    return name


@dataclass(frozen=True)
class ServeConfig:
    served_name: str = "e5-mistral"  # the base model's name in `model` and /v1/models
    default_task: str | None = None  # requests without input_type/task/instruction are queries of this task
    adapters: tuple[tuple[str, str], ...] = ()  # (name, folder) loaded at start
    adapter_dir: Path | None = None  # POST /v1/adapters loads folders directly under it (needs an API key)
    api_key: str | None = field(default=None, repr=False)
    max_client_batch_size: int = 32  # texts per request (TEI's default)
    max_body_bytes: int = 2_000_000  # request body (TEI's --payload-limit)
    max_queue_requests: int = 512  # queued or running requests (TEI's --max-concurrent-requests)
    max_queue_tokens: int = 262_144  # their tokens: 16 full token budgets
    max_wait_ms: float = 5.0  # how long a cycle waits for more requests while the queue is empty
    max_batch_requests: int | None = None  # requests per scheduler cycle; 1 turns cross-request batching off
    query_task: str = "MSMARCO"  # Cohere's input_type search_query: queries of this official task
    query_instruction: str | None = None  # ... or of this free-text instruction (instead of query_task)
    # int8/uint8 ranges of the served index (runtime.vector_formats.VectorCalibration), for embedding_types
    ranges: object | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.served_name or not self.served_name.strip():
            raise ValueError(f"served_name={self.served_name!r} is not valid; expected a model name")
        for name, _folder in self.adapters:
            check_adapter_name(name)
            if name == self.served_name:
                raise ValueError(f"adapter name {name!r} is the served name of the base; choose another")
        names = [n for n, _ in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names {names} repeat; expected each name once")
        for key in ("max_client_batch_size", "max_body_bytes", "max_queue_requests", "max_queue_tokens"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r} is not valid; expected an integer >= 1")
        if self.max_batch_requests is not None and int(self.max_batch_requests) < 1:
            raise ValueError(f"max_batch_requests={self.max_batch_requests!r} is not valid; expected an integer >= 1")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={self.max_wait_ms!r} is not valid; expected >= 0")
        if self.adapter_dir is not None:
            if self.api_key is None:
                raise ValueError("loading adapters at run time (--adapter-dir) needs an API key "
                                 "(--api-key-file or --api-key-env); refusing to open it to anyone")
            if not Path(self.adapter_dir).is_dir():
                raise ValueError(f"adapter dir {str(self.adapter_dir)!r} is not a folder")
        from ..runtime.instructions import task_instruction

        task_instruction(self.query_task)  # an unknown name raises, listing the valid ones
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty; expected a non-empty secret")

    def adapter_folder(self, name: str) -> Path:
        """The folder of adapter `name` directly under adapter_dir; refuses anything that leads out of it."""
        if self.adapter_dir is None:
            raise PermissionError("loading adapters at run time is off; start the server with --adapter-dir")
        check_adapter_name(name)
        root = Path(self.adapter_dir).resolve()
        folder = (root / name).resolve()  # follows symlinks: a link out of the folder ends elsewhere
        if folder.parent != root:
            raise PermissionError(f"adapter {name!r} leads out of the adapter dir; expected a folder directly in it")
        if not folder.is_dir():
            available = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise FileNotFoundError(f"adapter {name!r} is not a folder in the adapter dir; available: "
                                    f"{', '.join(available) or 'none'}")
        return folder
