"""Vectors on disk as Parquet: a folder `shard=<name>/` per input shard, each row an `id` and an `embedding`, a
fixed-size list of float32 (the layout vector databases and LanceDB ingest; `pyarrow.dataset` reads the whole
output as one table with a `shard` column), or of the codes of another vector format (`encode --vectors`: float16,
int8, uint8 values, or packed sign bits as int8 / uint8), whose format and calibration the manifest records.

A shard's files are first written under a staging folder, then checked (every expected id exactly once) and moved
into place with one rename, so the output never holds a partial shard.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

STAGING = ".staging"
PARTITION = "shard"


def id_array(ids: list):
    """The Arrow column of a shard's ids: int64 for row positions and integer ids, string otherwise."""
    import pyarrow as pa

    return pa.array(ids, type=pa.int64() if ids and isinstance(ids[0], (int, np.integer)) else pa.string())


def vector_table(ids: list, vectors: np.ndarray):
    """ids and vectors (float32, or the codes of another vector format: float16, int8, uint8, packed bits) as a
    table; the embedding's list type is the array's dtype."""
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors)
    flat = pa.array(vectors.reshape(-1))
    return pa.table({"id": id_array(ids),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


def shard_dir(root: Path, name: str) -> Path:
    return root / f"{PARTITION}={name}"


def write_table_atomic(path: Path, table) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def staged_ids(folder: Path) -> list | None:
    """Ids in a staged shard folder, or None while any of its files is still being written (no footer yet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids: list = []
    for f in sorted(folder.glob("*.parquet")):
        try:
            ids.extend(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        except (pa.ArrowException, OSError):
            return None
    return ids


class ShardCheckError(RuntimeError):
    """A staged shard holds rows that are not its input's ids exactly once."""


def check_staged(folder: Path, expected: list) -> bool:
    """True when the staged shard holds exactly the expected ids once each; False while rows are still missing."""
    ids = staged_ids(folder) if folder.is_dir() else []
    if ids is None or len(ids) < len(expected):
        return False
    if len(ids) > len(expected) or set(ids) != set(expected):
        extra = len(ids) - len(set(ids))
        raise ShardCheckError(f"{folder} holds {len(ids)} rows for {len(expected)} ids ({extra} repeated, "
                              f"{len(set(expected) - set(ids))} missing); expected each id exactly once")
    return True


def move_into_place(staged: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)


def read_vectors(output: str | Path) -> tuple[list, np.ndarray, list[str]]:
    """All (id, vector, shard) rows of an output folder, shards in name order, rows in file order."""
    import pyarrow.parquet as pq

    ids: list = []
    vectors: list[np.ndarray] = []
    shards: list[str] = []
    for folder in sorted(Path(output).glob(f"{PARTITION}=*")):
        for f in sorted(folder.glob("*.parquet")):
            t = pq.read_table(f)
            ids.extend(t.column("id").to_pylist())
            emb = t.column("embedding").combine_chunks()
            vectors.append(emb.values.to_numpy(zero_copy_only=False).reshape(len(t), emb.type.list_size))
            shards.extend([folder.name.split("=", 1)[1]] * len(t))
    return ids, (np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)), shards
