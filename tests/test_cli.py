"""The command line end to end, in subprocesses like a user runs it, and the resumable job."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lowmem_e5 import RuntimeConfig
from lowmem_e5.errors import ResumeMismatchError
from lowmem_e5.jobs.resumable import JobSpec, parts_dir, run_job

from .conftest import DATA


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lowmem_e5", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_encode_round_trip_on_the_default_model(tmp_path, real_model_dir):
    out = tmp_path / "docs.npy"
    r = cli("encode", "--input", DATA / "sample_docs.txt", "--output", out, "--quant", "int8", "--quiet")
    assert r.returncode == 0, r.stderr
    n = len((DATA / "sample_docs.txt").read_text().splitlines())
    vectors = np.load(out)
    assert vectors.shape == (n, 576) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    summary = json.loads(r.stdout)
    assert summary["shape"] == [n, 576] and summary["truncated"] == 0 and summary["weight_bytes"] > 0
    assert not parts_dir(out).exists()


def test_queries_with_a_task_and_truncation_is_reported(tmp_path, tiny_model_dir):
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"text": "short query"}) + "\n" + json.dumps({"text": "long " * 200}) + "\n")
    out = tmp_path / "q.npy"
    r = cli("encode", "--input", src, "--output", out, "--model", tiny_model_dir, "--quant", "fp32",
            "--task", "NQ", "--max-length", "64", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "1 of 2 texts exceed max_length=64 and are truncated (first: " in r.stderr and "q.jsonl:2)" in r.stderr
    assert json.loads(r.stdout)["truncated"] == 1 and np.load(out).shape == (2, 64)


@pytest.mark.parametrize("extra, message", [
    (["--task", "Nope"], "unknown task 'Nope'; expected one of: STS"),
    (["--max-length", "8", "--no-truncate"], "sample_docs.txt:1: text has 13 tokens, more than max_length=8"),
    (["--model", "/no/such/folder"], "model path '/no/such/folder' does not exist"),
    (["--double-quant", "--quant", "int8"], "double_quant=True is not valid with quant='int8'"),
])
def test_errors_exit_2_with_one_clear_line_and_write_nothing(tmp_path, tiny_model_dir, extra, message):
    out = tmp_path / "x.npy"
    args = ["encode", "--input", DATA / "sample_docs.txt", "--output", out, "--quiet"]
    if "--model" not in extra:
        args += ["--model", tiny_model_dir, "--quant", "fp32"] if "--quant" not in extra else ["--model", tiny_model_dir]
    r = cli(*args, *extra)
    assert r.returncode == 2, r.stderr
    assert "lowmem-e5: error: " in r.stderr
    assert re.search(message, r.stderr), r.stderr
    assert not out.exists() and not parts_dir(out).exists()


def test_unknown_quant_mode_lists_the_choices(tmp_path):
    r = cli("encode", "--input", DATA / "sample_docs.txt", "--output", tmp_path / "x.npy", "--quant", "int4")
    assert r.returncode == 2 and "invalid choice: 'int4'" in r.stderr
    assert all(mode in r.stderr.split("invalid choice")[1] for mode in ("fp32", "fp16", "bf16", "int8", "nf4", "fp4"))


def test_output_in_a_missing_folder_fails_before_loading(tmp_path):
    r = cli("encode", "--input", DATA / "sample_docs.txt", "--output", tmp_path / "nope" / "x.npy")
    assert r.returncode == 2 and "output folder" in r.stderr and "does not exist" in r.stderr
    assert "loaded" not in r.stderr


def test_config_file_with_flag_overrides(tmp_path, tiny_model_dir):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(RuntimeConfig(model=str(tiny_model_dir), quant="nf4", max_length=128).to_json())
    out = tmp_path / "x.npy"
    r = cli("encode", "--config", cfg, "--quant", "fp32", "--input", DATA / "sample_docs.txt", "--output", out,
            "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quant"] == "fp32"


class Interrupt(Exception):
    pass


def test_an_interrupted_job_resumes_without_recomputing_finished_chunks(tmp_path, tiny_embedder):
    texts = (DATA / "sample_docs.txt").read_text().splitlines()
    spec = JobSpec(texts=texts, output=tmp_path / "out.npy", chunk_size=4)
    reference = tiny_embedder.encode(texts)[0]

    def stop_after_two(k):
        if k == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_job(spec, tiny_embedder, progress=False, on_chunk_done=stop_after_two)
    assert not spec.output.exists()
    assert sorted(p.name for p in parts_dir(spec.output).glob("chunk-*")) == ["chunk-000000.npz", "chunk-000001.npz"]

    computed = []
    result = run_job(spec, tiny_embedder, progress=False, on_chunk_done=computed.append)
    assert computed == [2, 3] and result.chunks_resumed == 2 and result.chunks_total == 4
    assert np.allclose(np.load(spec.output), reference, atol=1e-6)
    assert not parts_dir(spec.output).exists()


def test_resuming_with_other_texts_is_refused(tmp_path, tiny_embedder):
    out = tmp_path / "out.npy"
    with pytest.raises(Interrupt):
        run_job(JobSpec(texts=["a", "b", "c"], output=out, chunk_size=1), tiny_embedder, progress=False,
                on_chunk_done=lambda k: (_ for _ in ()).throw(Interrupt))
    with pytest.raises(ResumeMismatchError, match="other n_texts, texts_sha256; rerun with --restart"):
        run_job(JobSpec(texts=["a", "b", "d", "e"], output=out, chunk_size=1), tiny_embedder, progress=False)
    result = run_job(JobSpec(texts=["a", "b", "d", "e"], output=out, chunk_size=1), tiny_embedder, progress=False,
                     restart=True)
    assert result.shape == (4, 64) and result.chunks_resumed == 0


@pytest.mark.slow  # 30 s; in-process twin: test_an_interrupted_job_resumes_without_recomputing_finished_chunks
def test_a_killed_cli_run_leaves_no_output_and_resumes(tmp_path, real_model_dir):
    src = tmp_path / "many.txt"
    lines = (DATA / "sample_docs.txt").read_text().splitlines()
    src.write_text("\n".join(f"{i}: {lines[i % len(lines)]} " * 6 for i in range(80)) + "\n")
    out = tmp_path / "many.npy"
    args = [sys.executable, "-m", "lowmem_e5", "encode", "--input", src, "--output", out, "--quant", "fp32",
            "--chunk-size", "2", "--quiet"]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = parts_dir(out)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(parts.glob("chunk-*.npz"))) < 3 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("chunk-*.npz")))
    assert 3 <= done_before < 40, "the run must be killed part-way"
    assert not out.exists()
    r = cli("encode", "--input", src, "--output", out, "--quant", "fp32", "--chunk-size", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["chunks_resumed"] >= done_before and summary["chunks"] == 40
    assert np.load(out).shape == (80, 576)


def test_env_reports_that_bitsandbytes_works_here():
    r = cli("env")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["packages"]["bitsandbytes"] and report["packages"]["transformers"]
    for mode in ("int8", "nf4", "fp4"):
        assert report["bitsandbytes"][mode].startswith("ok"), report["bitsandbytes"]


def test_python_dash_m_and_console_script_agree():
    r = cli("tasks")
    assert r.returncode == 0 and "MSMARCO\tGiven a web search query" in r.stdout


def test_quality_commands_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir, cli_main):
    """reference -> drift -> scan -> compare -> repair -> plan, as a user chains them (in this process: the commands'
    own subprocess behaviour is tested above)."""
    ref = tmp_path / "ref.safetensors"
    common = ["--model", tiny_model_dir]
    rc, out, err = cli_main("reference", *common, "--max-length", "256", "--output", ref)
    assert rc == 0, err
    assert json.loads(out)["rows"] == 132 and json.loads(out)["mode"] == "fp32"
    scan = tmp_path / "scan.json"
    rc, out, err = cli_main("scan", *common, "--max-chars", "200", "--fractions", "0.5", "--output", scan)
    assert rc == 0, err
    assert len(json.loads(scan.read_text())["modules"]) == 14
    grid = tmp_path / "grid"
    rc, out, err = cli_main("compare", *common, "--reference", ref, "--max-chars", "200", "--modes", "fp32,nf4",
                            "--scan", scan, "--out-dir", grid)
    assert rc == 0, err
    assert {"fp32.json", "nf4.json", "nf4-emb-int8.json", "nf4-int8-50-emb-int8.json", "table.md",
            "memory_vs_drift.png"} <= {p.name for p in grid.iterdir()}
    rc, out, err = cli_main("compare", *common, "--reference", ref, "--modes", "fp32,int3", "--out-dir", grid)
    assert rc == 2 and "--modes has unknown ['int3']" in err
    rc, out, err = cli_main("repair", *common, "--quant", "nf4", "--reference", ref, "--max-chars", "200", "--epochs",
                            "2", "--lr", "2e-3", "--output", tmp_path / "repair", "--quiet")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["adapter_bytes"] > 0 and (tmp_path / "repair" / "adapter_model.safetensors").is_file()
    rc, out, err = cli_main("plan", "--vram", "8GiB")
    assert rc == 0 and "| nf4 | 4,188,559,360 |" in out and "on 8GiB" in out
    rc, out, err = cli_main("plan", "--vram", "eight")
    assert rc == 2 and "size 'eight' is not valid" in err


def test_bitsandbytes_notice_about_the_kernels_package_is_not_shown():
    """bitsandbytes logs on import, on AVX512-BF16 CPUs, that the optional `kernels` package is missing; its fallback
    kernel is the one we want, so a user of lowmem_e5 must not see that line (and still sees other warnings)."""
    notice = "Failed to load CPU gemm_4bit_forward from kernels-community"
    code = "import logging; logging.basicConfig(); {} import bitsandbytes; logging.getLogger('bitsandbytes.backends.cpu.ops').warning('other')"
    bare = subprocess.run([sys.executable, "-c", code.format("")], capture_output=True, text=True, timeout=120)
    if notice not in bare.stderr:
        pytest.skip("bitsandbytes prints no kernels notice on this CPU (no AVX512-BF16, or `kernels` installed)")
    ours = subprocess.run([sys.executable, "-c", code.format("import lowmem_e5;")], capture_output=True, text=True,
                          timeout=120)
    assert ours.returncode == 0, ours.stderr
    assert notice not in ours.stderr and "other" in ours.stderr, ours.stderr


OUR_LINE = re.compile(r"^(lowmem-e5: |encode: +\d+%\|)")


def test_a_plain_encode_prints_only_our_lines_and_progress_bars(tmp_path, real_model_dir):
    """With every extra installed (gptqmodel pulls torchao, which transformers imports whenever it is installed),
    an nf4 encode with an adapter (peft would import gptqmodel) prints our lines and bars only, and never imports the
    gptq extra's packages."""
    from lowmem_e5.default_model import E5_ADAPTER_DIR

    out = tmp_path / "docs.npy"
    code = ("import sys; from lowmem_e5.cli.main import main; rc = main(sys.argv[1:]); "
            "print('IMPORTED', sorted({m.split('.')[0] for m in sys.modules} & {'gptqmodel', 'optimum', 'logbar'})); "
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "encode", "--input", DATA / "sample_docs.txt", "--output", out,
                        "--quant", "nf4", "--adapter", E5_ADAPTER_DIR], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    lines = [line for line in re.split(r"[\r\n]+", r.stderr) if line.strip()]
    foreign = [line for line in lines if not OUR_LINE.match(line)]
    assert not foreign, "\n".join(foreign)
    assert any(line.startswith("lowmem-e5: loaded ") for line in lines)
    assert "IMPORTED []" in r.stdout, r.stdout


def test_version():
    from lowmem_e5 import __version__

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lowmem-e5 {__version__}" and __version__ != "0.0.0+unknown"
