"""Bad input files: each gives one clear error naming the file, the line and what was expected."""

import pytest

from lowmem_e5.errors import InputError, ModelSourceError, OutputError
from lowmem_e5.jobs.inputs import check_output_path, read_texts
from lowmem_e5.runtime.sources import resolve_model_source


def write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_txt_one_text_per_line_with_line_numbers(tmp_path):
    got = read_texts(write(tmp_path, "a.txt", "first\r\nsecond ü\n".encode()))
    assert got.texts == ["first", "second ü"] and got.line_numbers == [1, 2]


def test_jsonl_reads_the_named_field(tmp_path):
    p = write(tmp_path, "a.jsonl", b'{"text": "one", "id": 1}\n{"body": "two", "text": "deux"}\n')
    assert read_texts(p).texts == ["one", "deux"]
    assert read_texts(write(tmp_path, "b.jsonl", b'{"body": "x"}\n'), field="body").texts == ["x"]


@pytest.mark.parametrize("name, data, message", [
    ("empty.txt", b"", "is empty; expected at least one text"),
    ("blank.txt", b"ok\n   \nfine\n", r"blank.txt:2: empty or whitespace-only text"),
    ("bad.txt", b"ok\nbad \xff\xfe byte\n", r"bad.txt:2: invalid UTF-8 at byte 4"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "unterminated}\n', r"bad.jsonl:2: malformed JSON"),
    ("list.jsonl", b'["text"]\n', r"list.jsonl:1: expected a JSON object, got list"),
    ("nofield.jsonl", b'{"body": "x"}\n', r"nofield.jsonl:1: no 'text' field; fields present: body"),
    ("num.jsonl", b'{"text": 5}\n', r"num.jsonl:1: field 'text' is int; expected a string"),
    ("ws.jsonl", b'{"text": " \\t "}\n', r"ws.jsonl:1: empty or whitespace-only text"),
    ("gap.jsonl", b'{"text": "a"}\n\n{"text": "b"}\n', r"gap.jsonl:2: empty line"),
    ("a.csv", b"x\n", r"has suffix '.csv'; expected one of: .txt, .jsonl"),
])
def test_bad_input_files(tmp_path, name, data, message):
    with pytest.raises(InputError, match=message):
        read_texts(write(tmp_path, name, data))


def test_missing_input_file(tmp_path):
    with pytest.raises(InputError, match="input file .*nope.txt' does not exist"):
        read_texts(tmp_path / "nope.txt")


def test_output_checks(tmp_path):
    assert check_output_path(tmp_path / "x.npy") == tmp_path / "x.npy"
    with pytest.raises(OutputError, match="output folder .*missing' does not exist"):
        check_output_path(tmp_path / "missing" / "x.npy")
    with pytest.raises(OutputError, match="must end in .npy"):
        check_output_path(tmp_path / "x.txt")


def test_model_sources(tmp_path):
    with pytest.raises(ModelSourceError, match="model path '/no/such/model' does not exist"):
        resolve_model_source("/no/such/model")
    with pytest.raises(ModelSourceError, match="has no config.json"):
        resolve_model_source(str(tmp_path))
    assert resolve_model_source("intfloat/e5-mistral-7b-instruct") == ("intfloat/e5-mistral-7b-instruct", False)
