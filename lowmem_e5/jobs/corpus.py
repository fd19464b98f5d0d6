"""A corpus with ids: one JSONL or Parquet file, or a folder of such shards, read strictly.

Shared by the single-machine job and the Ray one. `open_corpus` reads every shard once, before any work: it checks
each row (a text, an id of one type), refuses duplicate ids naming the first one, and records each shard's sha256
and row count for the manifest. `read_shard` then returns one shard's ids and texts, in file order, wherever the
shard is read (the driver, or a Ray worker).

Ids come from `id_field` (default "id" when the first row has one; a named field must be in every row) and are
int64 or strings; without an id field, a row's id is its 0-based position in the corpus (shards in name order),
the row it has in the `.npy` output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..hashing import file_sha256
from .inputs import parse_jsonl_line, read_lines, text_field

CORPUS_SUFFIXES = (".jsonl", ".parquet")
DEFAULT_ID_FIELD = "id"


@dataclass(frozen=True)
class Shard:
    path: Path
    name: str  # the output partition: shard=<name>
    sha256: str
    rows: int
    first_row: int  # position of its first row in the corpus (row-number ids)


@dataclass(frozen=True)
class ShardRows:
    ids: list  # int or str, one type in a corpus
    texts: list[str]


@dataclass
class Corpus:
    root: Path
    shards: list[Shard]
    text_field: str
    id_field: str | None  # None: ids are row positions
    id_type: str  # "int" or "str"
    ids: dict[str, list] = field(default_factory=dict, repr=False)  # shard name -> ids in file order

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def read(self, shard: Shard) -> ShardRows:
        return read_shard(shard, self.text_field, self.id_field)


def shard_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {str(path)!r} does not exist; expected a .jsonl or .parquet file or a folder of them")
    if path.is_file():
        if path.suffix.lower() not in CORPUS_SUFFIXES:
            raise InputError(f"input file {str(path)!r} has suffix {path.suffix!r}; expected one of: "
                             f"{', '.join(CORPUS_SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES)
    if not files:
        raise InputError(f"input folder {str(path)!r} holds no .jsonl or .parquet shards")
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise InputError(f"input folder {str(path)!r} holds {stems[p.stem].name} and {p.name}: shards must have "
                             "distinct names without their suffix (each names its output shard)")
        stems[p.stem] = p
    return files


def _check_id(where: str, value: object, id_field: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{where}: field {id_field!r} is {type(value).__name__}; expected a string or an integer id")
    if isinstance(value, str) and not value:
        raise InputError(f"{where}: field {id_field!r} is an empty string; expected a non-empty id")
    return value


def _read_jsonl(path: Path, text_key: str, id_field: str | None) -> tuple[list, list[str], list[str]]:
    ids, texts, where = [], [], []
    for lineno, line in read_lines(path):
        at = f"{path}:{lineno}"
        obj = parse_jsonl_line(path, lineno, line)
        texts.append(text_field(at, obj, text_key))
        if id_field is not None:
            if id_field not in obj:
                raise InputError(f"{at}: no {id_field!r} field (the id); fields present: {', '.join(sorted(obj))}; "
                                 "name the id field with --id-field")
            ids.append(_check_id(at, obj[id_field], id_field))
        where.append(at)
    return ids, texts, where


def _read_parquet(path: Path, text_key: str, id_field: str | None) -> tuple[list, list[str], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        wanted = [text_key] + ([id_field] if id_field is not None else [])
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise InputError(f"{path}: no {missing[0]!r} column; columns present: {', '.join(schema.names)}"
                             + ("; name the id field with --id-field" if missing[0] == id_field else ""))
        table = pq.read_table(path, columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    if not pa.types.is_string(table.schema.field(text_key).type) and \
            not pa.types.is_large_string(table.schema.field(text_key).type):
        raise InputError(f"{path}: column {text_key!r} has type {table.schema.field(text_key).type}; expected strings")
    where = [f"{path}: row {i}" for i in range(table.num_rows)]
    texts = []
    for at, t in zip(where, table.column(text_key).to_pylist()):
        if t is None:
            raise InputError(f"{at}: {text_key!r} is null; expected some text to embed")
        texts.append(text_field(at, {text_key: t}, text_key))
    ids = []
    if id_field is not None:
        kind = table.schema.field(id_field).type
        if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InputError(f"{path}: id column {id_field!r} has type {kind}; expected integers or strings")
        for at, v in zip(where, table.column(id_field).to_pylist()):
            if v is None:
                raise InputError(f"{at}: id {id_field!r} is null; expected an id")
            ids.append(_check_id(at, v, id_field))
    return ids, texts, where


def _read_rows(path: Path, text_key: str, id_field: str | None) -> tuple[list, list[str], list[str]]:
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path, text_key, id_field)
    return _read_jsonl(path, text_key, id_field)


def _has_field(path: Path, name: str) -> bool:
    """Whether the first row of a shard has this field (the default id field is used only if so)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return name in pq.read_schema(path).names
        except Exception:
            return False  # the full read names the problem
    lines = read_lines(path)
    return bool(lines) and name in parse_jsonl_line(path, *lines[0])


def read_shard(shard: Shard, text_key: str, id_field: str | None) -> ShardRows:
    ids, texts, _ = _read_rows(shard.path, text_key, id_field)
    if id_field is None:
        ids = list(range(shard.first_row, shard.first_row + len(texts)))
    return ShardRows(ids=ids, texts=texts)


def open_corpus(path: str | Path, text_key: str = "text", id_field: str | None = None) -> Corpus:
    """Read and check every shard. id_field None: "id" if the first row has one, else row positions."""
    files = shard_files(path)
    if id_field is None and _has_field(files[0], DEFAULT_ID_FIELD):
        id_field = DEFAULT_ID_FIELD
    shards: list[Shard] = []
    all_ids: dict[str, list] = {}
    seen: dict[object, str] = {}
    id_type: str | None = None
    first_row = 0
    for p in files:
        ids, texts, where = _read_rows(p, text_key, id_field)
        if not texts:
            raise InputError(f"input shard {str(p)!r} is empty; expected at least one row")
        if id_field is None:
            ids = list(range(first_row, first_row + len(texts)))
        for value, at in zip(ids, where):
            kind = "int" if isinstance(value, int) else "str"
            if id_type is None:
                id_type = kind
            elif kind != id_type:
                raise InputError(f"{at}: id {value!r} is {'an integer' if kind == 'int' else 'a string'} but earlier "
                                 f"ids are {'integers' if id_type == 'int' else 'strings'}; expected one id type")
            if value in seen:
                raise InputError(f"{at}: duplicate id {value!r} (first at {seen[value]}); expected unique ids")
            seen[value] = at
        shards.append(Shard(path=p, name=p.stem, sha256=file_sha256(p), rows=len(texts), first_row=first_row))
        all_ids[p.stem] = ids
        first_row += len(texts)
    return Corpus(root=Path(path), shards=shards, text_field=text_key, id_field=id_field, id_type=id_type or "int",
                  ids=all_ids)
