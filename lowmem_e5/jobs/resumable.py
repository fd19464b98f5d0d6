"""A resumable encode job: the corpus is cut into chunks, each saved atomically, then joined into one .npy (of float32
vectors, or of the codes of another vector format, made at the join from the float chunks).

Finished chunks live in OUTPUT.parts/ beside the output, with job.json recording what they were made from; a
rerun with the same inputs and settings skips them, a rerun with other inputs or settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..errors import ResumeMismatchError
from ..runtime.encoder import Embedder, EncodeStats
from ..runtime.vector_formats import VectorCalibration, VectorFormat, quantize
from .atomic import save_npy_atomic, save_npz_atomic, write_json_atomic


@dataclass(frozen=True)
class JobSpec:
    texts: list[str]
    output: Path
    query: bool = False
    task: str | None = None
    instruction: str | None = None
    chunk_size: int = 256
    adapter: str | None = None  # folder of the LoRA adapter loaded as "cli" (part of the job's identity)
    vectors: str = "float32"  # the format of the output's rows (runtime.vector_formats); chunks stay float32
    calibration: VectorCalibration | None = None  # where the format needs one

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} is not valid; expected an integer >= 1")

    @property
    def n_chunks(self) -> int:
        return (len(self.texts) + self.chunk_size - 1) // self.chunk_size

    def chunk(self, k: int) -> list[str]:
        return self.texts[k * self.chunk_size:(k + 1) * self.chunk_size]


@dataclass
class JobResult:
    output: Path
    shape: tuple[int, int]
    stats: EncodeStats
    chunks_total: int
    chunks_resumed: int


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def job_identity(spec: JobSpec, embedder: Embedder) -> dict:
    """What the chunks depend on; a resumed run must match it exactly."""
    digest = hashlib.sha256()
    for t in spec.texts:
        digest.update(t.encode("utf-8"))
        digest.update(b"\0")
    config = embedder.config.to_dict()
    config.pop("token_budget")  # batching does not change the vectors
    config.pop("cache_query_prefix", None)  # nor does reusing the instruction prefix (beyond float rounding)
    identity = {
        "texts_sha256": digest.hexdigest(),
        "n_texts": len(spec.texts),
        "chunk_size": spec.chunk_size,
        "query": spec.query,
        "task": spec.task,
        "instruction": spec.instruction,
        "adapter": spec.adapter,
        "model_source": embedder.loaded.source,
        "config": config,
        "vectors": spec.vectors,
        "calibration_sha256": spec.calibration.sha256 if spec.calibration is not None else None,
    }
    return json.loads(json.dumps(identity))  # as it reads back from job.json (tuples become lists)


def run_job(
    spec: JobSpec,
    embedder: Embedder,
    *,
    restart: bool = False,
    progress: bool = True,
    on_chunk_done: Callable[[int], None] | None = None,
) -> JobResult:
    parts = parts_dir(spec.output)
    identity = job_identity(spec, embedder)
    job_file = parts / "job.json"
    if restart:
        shutil.rmtree(parts, ignore_errors=True)
    if job_file.exists():
        previous = json.loads(job_file.read_text())
        if previous != identity:
            changed = sorted(k for k in identity if previous.get(k) != identity.get(k))
            raise ResumeMismatchError(
                f"{parts} holds a partial run with other {', '.join(changed)}; rerun with --restart to discard it"
            )
    else:
        parts.mkdir(exist_ok=True)
        write_json_atomic(job_file, identity)

    stats = EncodeStats()
    done = [k for k in range(spec.n_chunks) if (parts / f"chunk-{k:06d}.npz").exists()]
    bar = tqdm(total=len(spec.texts), unit="text", disable=not progress, desc="encode",
               initial=sum(len(spec.chunk(k)) for k in done))
    try:
        for k in range(spec.n_chunks):
            path = parts / f"chunk-{k:06d}.npz"
            if path.exists():
                continue
            vectors, chunk_stats = embedder.encode(
                spec.chunk(k), query=spec.query, task=spec.task, instruction=spec.instruction,
                adapter="cli" if spec.adapter else None, on_batch=bar.update
            )
            save_npz_atomic(path, embeddings=vectors, truncated=np.asarray(chunk_stats.truncated, dtype=np.int64),
                            counts=np.asarray([chunk_stats.real_tokens, chunk_stats.padded_tokens,
                                               chunk_stats.n_batches, chunk_stats.oom_retries], dtype=np.int64))
            if on_chunk_done is not None:
                on_chunk_done(k)
    finally:
        bar.close()

    arrays = []
    for k in range(spec.n_chunks):
        with np.load(parts / f"chunk-{k:06d}.npz") as z:
            arrays.append(z["embeddings"])
            real, padded, batches, retries = (int(x) for x in z["counts"])
            truncated = [int(i) for i in z["truncated"]]
        stats.merge(EncodeStats(n_texts=len(arrays[-1]), n_truncated=len(truncated), truncated=truncated,
                                real_tokens=real, padded_tokens=padded, n_batches=batches, oom_retries=retries),
                    offset=k * spec.chunk_size)
    result = quantize(np.concatenate(arrays, axis=0), VectorFormat.parse(spec.vectors), spec.calibration)
    save_npy_atomic(spec.output, result)
    shutil.rmtree(parts)
    return JobResult(output=spec.output, shape=tuple(result.shape), stats=stats, chunks_total=spec.n_chunks,
                     chunks_resumed=len(done))
