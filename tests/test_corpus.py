"""A corpus with ids into Parquet shards on one machine: ids, the manifest, resume, refusals and bad input."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from lowmem_e5.errors import InputError, OutputError, ResumeMismatchError
from lowmem_e5.jobs.corpus import open_corpus
from lowmem_e5.jobs.corpus_job import EmbedSettings, job_identity, run_corpus_local
from lowmem_e5.jobs.manifest import Manifest
from lowmem_e5.jobs.vector_shards import read_vectors

from .conftest import write_corpus


def run_local(corpus_dir, out, embedder, settings=EmbedSettings(), **kw):
    corpus = open_corpus(corpus_dir, **kw)
    identity = job_identity(embedder.config, embedder.loaded.source, corpus, settings)
    return run_corpus_local(corpus, Manifest(out, identity, corpus), embedder, settings, progress=False)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_shards_hold_each_id_once_with_the_vectors_of_a_plain_encode(tmp_path, tiny_embedder, fmt):
    texts = write_corpus(tmp_path / "in", shards=3, rows=7, fmt=fmt)
    summary = run_local(tmp_path / "in", tmp_path / "out", tiny_embedder)
    assert summary.rows == 21 and summary.shards == 3 and summary.shards_skipped == 0 and summary.real_tokens > 0
    ids, vectors, shards = read_vectors(tmp_path / "out")
    assert sorted(ids) == sorted(texts) and len(set(ids)) == len(ids)
    assert sorted(set(shards)) == ["part-0", "part-1", "part-2"]
    expected, _ = tiny_embedder.encode([texts[i] for i in ids])
    assert np.abs(vectors - expected).max() < 1e-5
    table = ds.dataset(tmp_path / "out", format="parquet", partitioning="hive").to_table()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), tiny_embedder.dim)
    assert table.schema.field("id").type == pa.string() and table.num_rows == 21
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["identity"]["config"]["quant"] == "fp32" and manifest["identity"]["model_fingerprint"]
    entry = manifest["shards"]["part-1"]
    assert entry["rows"] == 7 and entry["done"] and entry["output"] == "shard=part-1" and len(entry["sha256"]) == 64
    assert not (tmp_path / "out" / ".staging").exists()


def test_without_an_id_field_ids_are_row_positions(tmp_path, tiny_embedder):
    (tmp_path / "in").mkdir()
    for s, texts in enumerate([["a b", "c d"], ["e f", "g h", "i j"]]):
        (tmp_path / "in" / f"p{s}.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    run_local(tmp_path / "in", tmp_path / "out", tiny_embedder, text_key="body")
    ids, vectors, _ = read_vectors(tmp_path / "out")
    assert ids == [0, 1, 2, 3, 4]
    expected, _ = tiny_embedder.encode(["a b", "c d", "e f", "g h", "i j"])
    assert np.abs(vectors - expected).max() < 1e-5


def test_rerun_skips_finished_shards_redoes_changed_ones_and_refuses_other_settings(tmp_path, tiny_embedder):
    write_corpus(tmp_path / "in", shards=3, rows=4)
    run_local(tmp_path / "in", tmp_path / "out", tiny_embedder)
    before = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard=*/*.parquet")}
    again = run_local(tmp_path / "in", tmp_path / "out", tiny_embedder)
    assert again.shards_skipped == 3 and again.real_tokens == 0
    changed = tmp_path / "in" / "part-2.jsonl"
    changed.write_text(changed.read_text().replace("passage", "section"))
    redo = run_local(tmp_path / "in", tmp_path / "out", tiny_embedder)
    assert redo.shards_skipped == 2
    after = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard=*/*.parquet")}
    assert set(after) == set(before) and all(after[k] == before[k] for k in ("shard=part-0", "shard=part-1"))
    assert after["shard=part-2"] != before["shard=part-2"]
    with pytest.raises(ResumeMismatchError, match=r"query \(False -> True\).*--restart"):
        run_local(tmp_path / "in", tmp_path / "out", tiny_embedder, settings=EmbedSettings(query=True, task="NQ"))


def test_output_folder_that_is_not_ours_is_refused(tmp_path, tiny_embedder):
    write_corpus(tmp_path / "in", shards=1, rows=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not empty and holds no _manifest.json"):
        run_local(tmp_path / "in", tmp_path / "out", tiny_embedder)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("files, kwargs, message", [
    ({"a.jsonl": [{"id": "x", "text": "one"}, {"text": "two"}]}, {},
     r"a.jsonl:2: no 'id' field \(the id\); fields present: text; name the id field with --id-field"),
    ({"a.jsonl": [{"key": 1, "text": "one"}]}, {"id_field": "doc_id"}, r"a.jsonl:1: no 'doc_id' field"),
    ({"a.jsonl": [{"id": "x", "text": "one"}], "b.jsonl": [{"id": "y", "text": "two"}, {"id": "x", "text": "3"}]},
     {}, r"b.jsonl:2: duplicate id 'x' \(first at .*a.jsonl:1\); expected unique ids"),
    ({"a.jsonl": [{"id": 1, "text": "one"}, {"id": "2", "text": "two"}]}, {},
     r"a.jsonl:2: id '2' is a string but earlier ids are integers"),
    ({"a.jsonl": [{"id": 1.5, "text": "one"}]}, {}, r"a.jsonl:1: field 'id' is float; expected a string or an integer"),
    ({"a.jsonl": [{"id": 1, "text": "one"}, '{"id": 2, "text": "tw']}, {}, r"a.jsonl:2: malformed JSON"),
    ({"a.jsonl": [{"id": 1, "text": "one"}], "b.jsonl": []}, {}, r"input shard '.*b.jsonl' is empty"),
    ({"a.parquet": b"PAR1 not really"}, {}, r"a.parquet: not a readable Parquet file"),
    ({"a.jsonl": [{"id": 1, "text": "one"}], "a.parquet": None}, {}, r"holds a.jsonl and a.parquet: shards must"),
])
def test_bad_corpus_input_names_the_file_and_what_was_expected(tmp_path, files, kwargs, message):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, rows in files.items():
        if isinstance(rows, bytes):
            (folder / name).write_bytes(rows)
        elif rows is None:
            pq.write_table(pa.table({"id": [9], "text": ["nine"]}), folder / name)
        else:
            jsonl(folder / name, rows)
    with pytest.raises(InputError, match=message):
        open_corpus(folder, **kwargs)


def test_bad_parquet_columns(tmp_path):
    pq.write_table(pa.table({"id": [1, 2], "body": ["a", "b"]}), tmp_path / "a.parquet")
    with pytest.raises(InputError, match=r"a.parquet: no 'text' column; columns present: id, body"):
        open_corpus(tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": [1, 1], "text": ["a", "b"]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"b.parquet: row 1: duplicate id 1 \(first at .*b.parquet: row 0\)"):
        open_corpus(tmp_path / "b.parquet")
    pq.write_table(pa.table({"id": [1.0], "text": ["a"]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"c.parquet: id column 'id' has type double; expected integers or strings"):
        open_corpus(tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"holds no .jsonl or .parquet shards"):
        open_corpus((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_cli_writes_parquet_and_resumes(tmp_path, tiny_model_dir, cli_main):
    texts = write_corpus(tmp_path / "in", shards=2, rows=3, fmt="parquet", id_prefix=None)
    args = ["encode", "--input", tmp_path / "in", "--output", tmp_path / "out", "--model", tiny_model_dir, "--quant",
            "fp32", "--quiet"]
    rc, out, err = cli_main(*args)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["rows"] == 6 and summary["shards_skipped"] == 0 and summary["tokens_per_s"] > 0
    assert sorted(read_vectors(tmp_path / "out")[0]) == sorted(texts)
    rc, out, err = cli_main(*args)
    assert rc == 0 and json.loads(out)["shards_skipped"] == 2
    rc, out, err = cli_main(*args, "--quant", "nf4")
    assert rc == 2
    assert "holds vectors made with other settings: config.quant ('fp32' -> 'nf4')" in err
    assert "Traceback" not in err
    rc, out, err = cli_main(*args[:4], tmp_path / "x.npy", "--id-field", "id")
    assert rc == 2 and "--id-field writes Parquet shards with ids" in err


def test_a_too_long_text_is_named_by_its_shard_and_line(tmp_path, tiny_model_dir):
    from lowmem_e5 import RuntimeConfig
    from lowmem_e5.runtime.encoder import Embedder
    from lowmem_e5.runtime.loading import load_model

    jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": "short"}, {"id": 2, "text": "long " * 50}])
    strict = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=16,
                                               truncate=False)))
    with pytest.raises(InputError, match=r"in.jsonl: line 2: text has \d+ tokens, more than max_length=16"):
        run_local(tmp_path / "in.jsonl", tmp_path / "out", strict)
    assert not list((tmp_path / "out").glob("shard=*"))
