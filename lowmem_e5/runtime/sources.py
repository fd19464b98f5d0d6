"""Which folder or hub id a model name means: a local folder (checked), a hub id, "default" (also "smollm2-e5"), the
cached small model made an embedder, or "smollm2-raw", that model before the E5 recipe; built on first use by
default_model."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelSourceError
from .config import DEFAULT_MODEL


def resolve_model_source(model: str) -> tuple[str, bool]:
    """(source, is_local). The default model's names are built into the cache on first use."""
    from ..default_model import E5_MODEL, RAW_MODEL

    if model in (DEFAULT_MODEL, E5_MODEL):
        from ..default_model import ensure_default_model

        return str(ensure_default_model()), True
    if model == RAW_MODEL:
        from ..default_model import ensure_raw_model

        return str(ensure_raw_model()), True
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"model path {model!r} is a file; expected a folder with config.json and weights")
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model folder {model!r} has no config.json; expected a transformers model folder")
        return str(path), True
    looks_like_path = model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or "\\" in model
    if looks_like_path:
        raise ModelSourceError(f"model path {model!r} does not exist; expected a model folder or a hub id like {'intfloat/e5-mistral-7b-instruct'!r}")
    return model, False
