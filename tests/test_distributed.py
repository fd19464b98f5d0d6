"""Scale-out on a real local Ray cluster (2 CPUs, no dashboard, auth off): the vectors of the single-process path,
every id exactly once, through a killed worker and a killed driver."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed: pip install 'lowmem-e5[ray]'")

from lowmem_e5 import RuntimeConfig  # noqa: E402
from lowmem_e5.jobs.corpus import open_corpus  # noqa: E402
from lowmem_e5.jobs.corpus_job import EmbedSettings, job_identity  # noqa: E402
from lowmem_e5.jobs.distributed import run_corpus_on_ray  # noqa: E402
from lowmem_e5.jobs.manifest import MANIFEST, Manifest  # noqa: E402
from lowmem_e5.jobs.vector_shards import read_vectors  # noqa: E402
from lowmem_e5.runtime.encoder import Embedder  # noqa: E402
from lowmem_e5.runtime.loading import load_model  # noqa: E402
from lowmem_e5.runtime.vector_formats import VectorCalibration, index_identity, quantize  # noqa: E402

from .conftest import write_corpus  # noqa: E402

WORKER_TITLE = "ray::MapWorker(MapBatches(EmbedWorker))"


@pytest.fixture(autouse=True)
def ray_auth_off(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    yield
    if ray.is_initialized():
        ray.shutdown()


def on_ray(corpus_dir, out, config, settings=EmbedSettings(), **kw):
    corpus = open_corpus(corpus_dir)
    manifest = Manifest(out, job_identity(config, config.model, corpus, settings), corpus,
                        vectors=settings.vectors_entry())
    return run_corpus_on_ray(corpus, manifest, config, settings, local_cpus=2, log=lambda m: None, **kw)


def assert_same_vectors(out, texts: dict, embedder: Embedder, min_cos: float):
    ids, vectors, _ = read_vectors(out)
    assert sorted(ids) == sorted(texts) and len(ids) == len(set(ids)), "every input id exactly once"
    expected, _ = embedder.encode([texts[i] for i in ids])
    cos = (vectors * expected).sum(axis=1)
    assert cos.min() >= min_cos, f"lowest cosine to the single-process vectors: {cos.min()}"


# fp32 is `slow` (17 s): nf4 keeps the Ray path's fast test, and fp32 has its own everywhere else
@pytest.mark.parametrize("quant", [pytest.param("fp32", marks=pytest.mark.slow), "nf4"])
def test_two_workers_give_the_single_process_vectors(tmp_path, tiny_model_dir, quant):
    """nf4 (the fast one) stores float16 codes: the workers write the job's vector format."""
    texts = write_corpus(tmp_path / "in", shards=4, rows=9)
    config = RuntimeConfig(model=str(tiny_model_dir), quant=quant, max_length=512)
    settings = EmbedSettings(vectors="float16" if quant == "nf4" else "float32")
    summary = on_ray(tmp_path / "in", tmp_path / "out", config, settings, workers=2, batch_size=4)
    assert summary.rows == 36 and summary.shards == 4 and summary.retries == 0 and summary.real_tokens > 0
    # Ray Data starts both actors but may finish a small job before the second has loaded its model (seen in CI
    # under CPU contention: one load reported), so the loads reported are one per worker that finished loading
    assert summary.extra["workers"] == 2 and 1 <= len(summary.extra["model_load_s"]) <= 2
    assert all(s > 0 for s in summary.extra["model_load_s"]) and summary.extra["ray_start_s"] > 0
    assert not ray.is_initialized()
    assert_same_vectors(tmp_path / "out", texts, Embedder(load_model(config)), 0.9999)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert all(e["done"] for e in manifest["shards"].values())
    assert read_vectors(tmp_path / "out")[1].dtype == (np.float16 if quant == "nf4" else np.float32)


@pytest.mark.slow  # 15 s; the Ray path's fast test writes float16 codes, the int8 codes' fast tests run here
def test_ray_workers_write_the_int8_codes_of_the_jobs_calibration(tmp_path, tiny_model_dir):
    texts = write_corpus(tmp_path / "in", shards=2, rows=6)
    config = RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=512)
    embedder = Embedder(load_model(config))
    floats, _ = embedder.encode(list(texts.values()))
    calibration = VectorCalibration.from_vectors(floats, index_identity(str(tiny_model_dir), config))
    settings = EmbedSettings(vectors="int8", calibration=calibration.to_dict())
    on_ray(tmp_path / "in", tmp_path / "out", config, settings, workers=1, batch_size=4)
    ids, codes, _ = read_vectors(tmp_path / "out")
    expected = quantize(floats, "int8", calibration)[[list(texts).index(i) for i in ids]]
    assert codes.dtype == np.int8 and np.abs(codes.astype(int) - expected).max() <= 1  # one step: float rounding
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["vectors"]["format"] == "int8" and manifest["vectors"]["calibration"] == calibration.to_dict()
    assert manifest["identity"]["calibration"] == calibration.sha256


def ray_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(WORKER_TITLE.encode()):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow  # 80 s on the real model; the Ray path's fast tests: test_two_workers_give_the_single_process_vectors
def test_a_worker_killed_mid_run_loses_and_repeats_no_row(tmp_path, real_model_dir, real_fp32):
    texts = write_corpus(tmp_path / "in", shards=6, rows=30)
    config = RuntimeConfig(model=str(real_model_dir), quant="fp32", max_length=512)
    killed: list[tuple[int, int]] = []

    def kill_one_worker_after_the_first_shard():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            manifest = tmp_path / "out" / MANIFEST
            done = sum(e["done"] for e in json.loads(manifest.read_text())["shards"].values()) if manifest.exists() else 0
            pids = ray_worker_pids()
            if done >= 1 and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append((pids[0], done))
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_one_worker_after_the_first_shard)
    watcher.start()
    try:
        summary = on_ray(tmp_path / "in", tmp_path / "out", config, workers=2, batch_size=8)
    finally:
        watcher.join()
    assert killed and killed[0][1] < 6, f"the worker must die mid-run (shards done when killed: {killed})"
    assert summary.retries >= 1, "Ray Data restarted the killed worker"
    assert_same_vectors(tmp_path / "out", texts, real_fp32, 0.9999)


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(proc.name))
        except (OSError, IndexError, ValueError):
            pass
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # 75 s on the real model; resume's fast test: test_corpus.py::test_cli_writes_parquet_and_resumes
def test_a_killed_driver_resumes_from_its_finished_shards(tmp_path, real_model_dir, real_fp32):
    texts = write_corpus(tmp_path / "in", shards=6, rows=30)
    args = [sys.executable, "-m", "lowmem_e5", "encode", "--input", tmp_path / "in", "--output", tmp_path / "out",
            "--model", real_model_dir, "--quant", "fp32", "--max-length", "512", "--ray", "--workers", "2",
            "--local-cpus", "2", "--batch-size", "8", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    manifest = tmp_path / "out" / MANIFEST
    done_at_kill, family = 0, set()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            family |= descendants(driver.pid)
            if manifest.exists():
                done_at_kill = sum(e["done"] for e in json.loads(manifest.read_text())["shards"].values())
                if done_at_kill >= 1:
                    break
            time.sleep(0.1)
    finally:
        family |= descendants(driver.pid)
        for pid in [driver.pid, *family]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        driver.communicate(timeout=30)
    done_at_kill = sum(e["done"] for e in json.loads(manifest.read_text())["shards"].values())
    assert 1 <= done_at_kill < 6, f"the driver must die mid-run ({done_at_kill} of 6 shards done)"
    for pid in family:  # reap: every process of the killed run is gone
        deadline = time.time() + 30
        while alive(pid) and time.time() < deadline:
            time.sleep(0.2)
    assert not [pid for pid in family if alive(pid)]
    rerun = subprocess.run(list(map(str, args)), capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["shards_skipped"] == done_at_kill and summary["rows"] == 180
    assert f"{6 - done_at_kill} of 6 shard(s) to embed" in rerun.stderr
    assert_same_vectors(tmp_path / "out", texts, real_fp32, 0.9999)
    other = subprocess.run(list(map(str, args + ["--quant", "nf4"])), capture_output=True, text=True, env=env,
                           timeout=300)
    assert other.returncode == 2 and "config.quant ('fp32' -> 'nf4')" in other.stderr and "--restart" in other.stderr
