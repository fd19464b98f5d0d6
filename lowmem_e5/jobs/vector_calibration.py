"""`calibrate-vectors`: the int8/uint8 ranges (and binary centre) of an index, from a sample of its documents, made
once and used by every later call that writes codes of that index (encode, a resumed encode, Ray workers, serve).

The sample is a fixed random draw (seed 0) of the input's texts, embedded as documents in the index's model, mode
and adapter; the file records that identity, and a call with another model, mode or adapter is refused.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..hashing import file_sha256
from ..runtime.encoder import Embedder
from ..runtime.vector_formats import VectorCalibration, index_identity, sample_indices
from .corpus import open_corpus, read_shard
from .inputs import INPUT_SUFFIXES, read_texts

DEFAULT_SAMPLE = 1000


def input_texts(path: str | Path, field: str = "text") -> list[str]:
    """Every text of what `encode` reads: a .txt / .jsonl file, or a .parquet file or folder of shards."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in INPUT_SUFFIXES:
        return read_texts(path, field=field).texts
    corpus = open_corpus(path, field)
    return [t for shard in corpus.shards for t in read_shard(shard, corpus.text_field, corpus.id_field).texts]


def sample_texts(texts: list[str], rows: int = DEFAULT_SAMPLE, seed: int = 0) -> list[str]:
    if rows < 2:
        raise InputError(f"--sample {rows} is not valid; expected at least 2 documents")
    return [texts[i] for i in sample_indices(len(texts), rows, seed)]


def calibrate(embedder: Embedder, path: str | Path, field: str = "text", rows: int = DEFAULT_SAMPLE,
              adapter: str | None = None, progress: bool = False) -> VectorCalibration:
    """Embed a sample of the input as documents (with the adapter loaded as "job", if given) and take its
    per-dimension min, max and mean."""
    texts = input_texts(path, field)
    sample = sample_texts(texts, rows)
    if len(sample) < 2:
        raise InputError(f"input {str(path)!r} has {len(sample)} text; a calibration needs at least 2 documents")
    if adapter:
        embedder.load_adapter("job", adapter)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sample), unit="text", desc="calibrate")
    try:
        vectors, _ = embedder.encode(sample, adapter="job" if adapter else None,
                                     on_batch=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    source = Path(path)
    info = {"source": str(source), "of_rows": len(texts), "seed": 0}
    if source.is_file():
        info["sha256"] = file_sha256(source)
    return VectorCalibration.from_vectors(vectors, index_identity(embedder.loaded.source, embedder.config, adapter),
                                          info)
