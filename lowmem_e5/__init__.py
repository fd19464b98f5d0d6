"""lowmem_e5: E5-Mistral-7B embeddings in 8-bit or 4-bit on small GPUs, with measured drift."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _package_version

from .terminal import install_notice_filters

install_notice_filters()  # first: before anything imports bitsandbytes, transformers or torchao

from .runtime.config import RuntimeConfig  # noqa: E402
from .runtime.encoder import Embedder, EncodeStats  # noqa: E402
from .runtime.instructions import TASK_INSTRUCTIONS, format_document, format_query  # noqa: E402
from .runtime.loading import LoadedModel, load_model  # noqa: E402

try:
    __version__ = _package_version("lowmem-e5")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"


def load_embedder(config: RuntimeConfig | None = None, **overrides) -> Embedder:
    """Load a model per config (or keyword overrides of the defaults) and wrap it for encoding."""
    config = (config or RuntimeConfig()).replace(**overrides) if overrides else (config or RuntimeConfig())
    return Embedder(load_model(config))


__all__ = ["RuntimeConfig", "Embedder", "EncodeStats", "LoadedModel", "load_model", "load_embedder",
           "TASK_INSTRUCTIONS", "format_query", "format_document", "__version__"]
