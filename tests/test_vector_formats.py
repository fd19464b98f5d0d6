"""Stored vector formats: bytes, codes, calibration, search with rescoring, and codes written by encode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowmem_e5 import RuntimeConfig
from lowmem_e5.quality.vector_search import exact_search, search_codes
from lowmem_e5.runtime.vector_formats import (
    FORMATS,
    VectorCalibration,
    VectorFormat,
    VectorFormatError,
    dequantize,
    index_identity,
    packed_bits,
    parse_formats,
    quantize,
)

from .conftest import DATA, MIXED_TEXTS, write_corpus

IDENTITY = {"model": {"weights_sha256": "a"}, "mode": {"quant": "fp32"}, "adapter": None}


def unit_rows(n: int, d: int, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32) + shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def calibration_of(x: np.ndarray) -> VectorCalibration:
    return VectorCalibration.from_vectors(x, IDENTITY)


@pytest.mark.parametrize("d, expected", [
    (4096, {"float32": 16384, "float16": 8192, "int8": 4096, "uint8": 4096, "binary": 512, "ubinary": 512}),
    (576, {"float32": 2304, "float16": 1152, "int8": 576, "uint8": 576, "binary": 72, "ubinary": 72}),
    (10, {"float32": 40, "float16": 20, "int8": 10, "uint8": 10, "binary": 2, "ubinary": 2}),
])
def test_bytes_per_vector_are_exact_and_equal_the_codes_nbytes(d, expected):
    x = unit_rows(5, d)
    cal = calibration_of(x)
    for name in FORMATS:
        fmt = VectorFormat(name)
        codes = quantize(x, fmt, cal)
        assert fmt.bytes_per_vector(d) == expected[name] == codes.nbytes // 5, name
        assert codes.dtype == fmt.dtype


def test_int8_codes_clip_out_of_range_values_instead_of_wrapping():
    sample = np.array([[-1.0, 0.0], [1.0, 0.5]], dtype=np.float32)
    cal = calibration_of(sample)
    outside = np.array([[-5.0, 9.0], [5.0, -9.0]], dtype=np.float32)
    assert quantize(outside, "int8", cal).tolist() == [[-128, 127], [127, -128]]
    assert quantize(outside, "uint8", cal).tolist() == [[0, 255], [255, 0]]
    assert quantize(sample, "int8", cal).tolist() == [[-128, -128], [127, 127]]  # the sample's ends are the ends
    # inside the range, dequantising is within half a step
    x = unit_rows(50, 2) * 0.5
    err = np.abs(dequantize(quantize(x, "int8", cal), "int8", cal) - np.clip(x, sample.min(0), sample.max(0)))
    assert (err <= cal.step / 2 + 1e-7).all()


def test_binary_codes_are_the_packed_sign_bits_as_sentence_transformers_makes_them():
    from sentence_transformers.quantization import quantize_embeddings

    x = unit_rows(20, 70)  # not a multiple of 8: the last byte is padded with zeros
    x[0, :5] = 0.0  # zero is not > 0
    binary, ubinary = quantize(x, "binary"), quantize(x, "ubinary")
    assert np.array_equal(binary, quantize_embeddings(x, "binary"))
    assert np.array_equal(ubinary, quantize_embeddings(x, "ubinary"))
    assert np.array_equal(np.unpackbits(ubinary, axis=1, count=70).astype(bool), x > 0)
    assert np.array_equal(dequantize(binary, "binary", dimensions=70), np.where(x > 0, 1.0, -1.0))
    centred = calibration_of(x)
    assert np.array_equal(np.unpackbits(quantize(x, "ubinary:centred", centred), axis=1, count=70).astype(bool),
                          x - centred.centre > 0)


def test_int8_codes_do_not_depend_on_the_batch_unlike_per_batch_ranges():
    from sentence_transformers.quantization import quantize_embeddings

    x = unit_rows(64, 32, seed=1)
    cal = calibration_of(x)
    whole, half = quantize(x, "int8", cal), quantize(x[:8], "int8", cal)
    assert np.array_equal(whole[:8], half)
    theirs_whole, theirs_half = quantize_embeddings(x, "int8"), quantize_embeddings(x[:8], "int8")
    assert not np.array_equal(theirs_whole[:8], theirs_half)  # what a calibration file prevents


def test_unknown_formats_and_options_are_refused_listing_the_choices():
    with pytest.raises(VectorFormatError, match="float32, float16, int8, uint8, binary, ubinary"):
        VectorFormat.parse("int4")
    with pytest.raises(VectorFormatError, match="only binary and ubinary take a centre"):
        VectorFormat.parse("int8:centred")
    with pytest.raises(VectorFormatError, match="name one twice"):
        parse_formats("int8,int8")
    with pytest.raises(VectorFormatError, match="needs a calibration"):
        quantize(unit_rows(3, 8), "int8")


def test_a_calibration_of_another_model_mode_or_adapter_is_refused_with_the_reason(tmp_path):
    cal = calibration_of(unit_rows(10, 8))
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps(cal.to_dict()))
    back = VectorCalibration.read(path)
    assert back.sha256 == cal.sha256 and np.array_equal(back.minimum, cal.minimum)
    back.check(json.loads(json.dumps(IDENTITY)))  # its own: accepted
    with pytest.raises(VectorFormatError, match=r"another mode .*\"nf4\".* here"):
        back.check({**IDENTITY, "mode": {"quant": "nf4"}})
    with pytest.raises(VectorFormatError, match="another adapter, model"):
        back.check({**IDENTITY, "model": {"weights_sha256": "b"}, "adapter": "c0ffee"})
    path.write_text('{"min": []}')
    with pytest.raises(VectorFormatError, match="not a vector calibration"):
        VectorCalibration.read(path)


def brute_force(queries, doc_scores, k):
    """A full numpy sort: score descending, then document index ascending."""
    idx = np.arange(doc_scores.shape[1])
    order = [np.lexsort((idx, -row))[:k] for row in doc_scores]
    return np.array(order), np.take_along_axis(doc_scores, np.array(order), axis=1)


@pytest.mark.parametrize("name", ["float32", "float16", "int8", "uint8"])
def test_scalar_search_in_blocks_equals_brute_force_on_dequantised_vectors(name):
    queries, docs = unit_rows(13, 24, seed=2), unit_rows(300, 24, seed=3)
    cal = calibration_of(docs[:100])
    codes = quantize(docs, name, cal)
    expected = queries @ dequantize(codes, name, cal).T
    idx, scores = search_codes(queries, codes, VectorFormat(name), cal, k=20, doc_chunk=37)
    want_idx, want_scores = brute_force(queries, expected, 20)
    assert np.array_equal(idx, want_idx)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)


@pytest.mark.parametrize("name", ["binary", "ubinary", "binary:centred"])
def test_hamming_search_and_rescoring_equal_brute_force(name):
    fmt = VectorFormat.parse(name)
    queries, docs = unit_rows(11, 40, seed=4, shift=0.3), unit_rows(500, 40, seed=5, shift=0.3)
    cal = calibration_of(docs)
    codes = quantize(docs, fmt, cal)
    q_bits = np.unpackbits(packed_bits(quantize(queries, fmt, cal), fmt), axis=1, count=40)
    d_bits = np.unpackbits(packed_bits(codes, fmt), axis=1, count=40)
    assert np.array_equal(d_bits.astype(bool), docs - (cal.centre if fmt.centred else 0) > 0)
    hamming = (q_bits[:, None, :] != d_bits[None, :, :]).sum(axis=2)
    k = 10
    idx, scores = search_codes(queries, codes, fmt, cal, k=k, doc_chunk=64)
    want_idx, _ = brute_force(queries, -hamming, k)
    assert np.array_equal(idx, want_idx) and np.array_equal(-scores, np.take_along_axis(hamming, idx, axis=1))
    # rescoring: the k x 4 Hamming-nearest (ties to the lower index), ranked by the float query against +-1 codes
    idx4, scores4 = search_codes(queries, codes, fmt, cal, k=k, rescore=4, doc_chunk=64)
    candidates, _ = brute_force(queries, -hamming, 4 * k)
    signs = d_bits.astype(np.float32) * 2 - 1
    for q, cand, got, got_scores in zip(queries, candidates, idx4, scores4):
        s = signs[cand] @ (q - cal.centre if fmt.centred else q)  # centred codes: the query is centred too
        order = np.lexsort((cand, -s))[:k]
        assert np.array_equal(got, cand[order])
        np.testing.assert_allclose(got_scores, s[order], rtol=1e-6)


def test_rescoring_is_refused_for_formats_scored_by_inner_products():
    with pytest.raises(VectorFormatError, match="rescoring applies to binary and ubinary"):
        search_codes(unit_rows(2, 8), quantize(unit_rows(5, 8), "float16"), VectorFormat("float16"), None, rescore=4)


def test_float32_search_is_todays_exact_search():
    queries, docs = unit_rows(9, 16, seed=6), unit_rows(200, 16, seed=7)
    a = exact_search(queries, docs, k=15)
    b = search_codes(queries, docs, VectorFormat("float32"), None, k=15)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def ok(cli_main, *argv) -> dict:
    rc, out, err = cli_main(*argv)
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_encode_writes_codes_of_an_index_calibration_that_are_equal_across_calls_and_batches(tmp_path, cli_main,
                                                                                            tiny_model_dir):
    model = ["--model", tiny_model_dir, "--quant", "fp32", "--max-length", "128", "--quiet"]
    ranges = tmp_path / "ranges.json"
    out = ok(cli_main, "calibrate-vectors", "--input", DATA / "sample_docs.txt", "--output", ranges,
                  "--sample", 10, *model)
    assert out["rows"] == 10 and out["of_rows"] == 15 and out["dimensions"] == 64
    both = tmp_path / "both.txt"
    both.write_text("\n".join(MIXED_TEXTS[:3]) + "\n")
    alone = tmp_path / "alone.txt"
    alone.write_text(MIXED_TEXTS[1] + "\n")
    written = {}
    for name in ("int8", "binary:centred"):
        a = ok(cli_main, "encode", "--input", both, "--output", tmp_path / "a.npy", "--vectors", name,
                    "--ranges", ranges, "--restart", *model)
        b = ok(cli_main, "encode", "--input", alone, "--output", tmp_path / "b.npy", "--vectors", name,
                    "--ranges", ranges, "--restart", *model)
        codes_a, codes_b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
        assert a["vectors"] == b["vectors"] == name and codes_a.dtype == np.int8
        assert codes_a.shape == (3, 64 if name == "int8" else 8)
        assert np.array_equal(codes_a[1], codes_b[0]), name
        written[name] = codes_a
    floats = ok(cli_main, "encode", "--input", both, "--output", tmp_path / "f.npy", *model)
    cal = VectorCalibration.read(ranges)
    assert floats["vectors"] == "float32"
    for name, codes in written.items():  # the codes are the float vectors quantised with the file's calibration
        assert np.array_equal(codes, quantize(np.load(tmp_path / "f.npy"), name, cal)), name


def test_encode_refuses_codes_without_ranges_and_ranges_of_another_mode(tmp_path, cli_main, tiny_model_dir):
    model = ["--model", tiny_model_dir, "--max-length", "128", "--quiet"]
    out = tmp_path / "x.npy"
    rc, _, err = cli_main("encode", "--input", DATA / "sample_docs.txt", "--output", out, "--vectors", "int4", *model)
    assert rc == 2 and "float32, float16, int8, uint8, binary, ubinary" in err
    rc, _, err = cli_main("encode", "--input", DATA / "sample_docs.txt", "--output", out, "--vectors", "uint8", *model)
    assert rc == 2 and "needs --ranges FILE" in err
    ranges = tmp_path / "r.json"
    config = RuntimeConfig(model=str(tiny_model_dir), quant="nf4")
    ranges.write_text(json.dumps(VectorCalibration.from_vectors(
        unit_rows(4, 64), index_identity(str(tiny_model_dir), config)).to_dict()))
    rc, _, err = cli_main("encode", "--input", DATA / "sample_docs.txt", "--output", out, "--vectors", "int8",
                          "--ranges", ranges, "--quant", "fp32", *model)
    assert rc == 2 and "was made with another mode" in err and "calibrate-vectors" in err and not out.exists()


def test_parquet_codes_and_their_calibration_read_back_equal(tmp_path, cli_main, tiny_model_dir):
    from lowmem_e5.jobs.manifest import MANIFEST
    from lowmem_e5.jobs.vector_shards import read_vectors

    write_corpus(tmp_path / "in", shards=2, rows=5)
    model = ["--model", tiny_model_dir, "--quant", "fp32", "--max-length", "128", "--quiet"]
    ranges = tmp_path / "ranges.json"
    ok(cli_main, "calibrate-vectors", "--input", tmp_path / "in", "--output", ranges, *model)
    ok(cli_main, "encode", "--input", tmp_path / "in", "--output", tmp_path / "floats", *model)
    ok(cli_main, "encode", "--input", tmp_path / "in", "--output", tmp_path / "codes", "--vectors", "int8",
            "--ranges", ranges, *model)
    ids, floats, _ = read_vectors(tmp_path / "floats")
    ids_c, codes, _ = read_vectors(tmp_path / "codes")
    manifest = json.loads((tmp_path / "codes" / MANIFEST).read_text())
    cal = VectorCalibration.from_dict(manifest["vectors"]["calibration"])
    assert manifest["vectors"]["format"] == "int8" and cal.sha256 == VectorCalibration.read(ranges).sha256
    assert ids == ids_c and codes.dtype == np.int8 and codes.shape == (10, 64)
    assert np.array_equal(codes, quantize(floats, "int8", cal))
    # a resume with other ranges is refused, naming the change
    other = VectorCalibration.from_vectors(floats[:3], cal.identity)
    ranges.write_text(json.dumps(other.to_dict()))
    rc, _, err = cli_main("encode", "--input", tmp_path / "in", "--output", tmp_path / "codes", "--vectors", "int8",
                          "--ranges", ranges, *model)
    assert rc == 2 and "calibration" in err, err


def test_plan_shows_index_bytes_per_format_beside_the_weights(cli_main):
    rc, out, _ = cli_main("plan", "--docs", "1000000", "--json")
    plan = json.loads(out)
    index = {r["format"]: r for r in plan["index"]}
    assert index["float32"]["index_bytes"] == 16_384 * 10**6 and index["binary"]["index_bytes"] == 512 * 10**6
    nf4 = next(r for r in plan["modes"] if r["mode"] == "nf4")
    assert index["int8"]["with_weights"]["nf4"] == nf4["weight_bytes"] + 4096 * 10**6
    assert cli_main("plan", "--docs", "0")[0] == 2


def test_uint8_and_ubinary_rank_exactly_as_int8_and_binary():
    queries, docs = unit_rows(7, 48, seed=8), unit_rows(120, 48, seed=9)
    cal = calibration_of(docs)
    for signed, unsigned in (("int8", "uint8"), ("binary", "ubinary"), ("binary:centred", "ubinary:centred")):
        a, b = VectorFormat.parse(signed), VectorFormat.parse(unsigned)
        for rescore in ((0, 3) if a.is_binary else (0,)):
            ra = search_codes(queries, quantize(docs, a, cal), a, cal, k=30, rescore=rescore)
            rb = search_codes(queries, quantize(docs, b, cal), b, cal, k=30, rescore=rescore)
            assert np.array_equal(ra[0], rb[0]) and np.array_equal(ra[1], rb[1]), (signed, rescore)
