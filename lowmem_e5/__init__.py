"""lowmem_e5: E5-Mistral-7B embeddings in 8-bit or 4-bit on small GPUs, with measured drift."""

from __future__ import annotations

from .runtime import bnb_notices  # noqa: F401  (first: filters bitsandbytes' notices before anything imports it)
from .runtime.config import RuntimeConfig
from .runtime.encoder import Embedder, EncodeStats
from .runtime.instructions import TASK_INSTRUCTIONS, format_document, format_query
from .runtime.loading import LoadedModel, load_model

__version__ = "0.1.0"


def load_embedder(config: RuntimeConfig | None = None, **overrides) -> Embedder:
    """Load a model per config (or keyword overrides of the defaults) and wrap it for encoding."""
    config = (config or RuntimeConfig()).replace(**overrides) if overrides else (config or RuntimeConfig())
    return Embedder(load_model(config))


__all__ = ["RuntimeConfig", "Embedder", "EncodeStats", "LoadedModel", "load_model", "load_embedder",
           "TASK_INSTRUCTIONS", "format_query", "format_document", "__version__"]
