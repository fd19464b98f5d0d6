"""E5-Mistral-7B at full size on this machine's CPU: the user path, each step a fresh process, every byte and second
measured. One command repeats it all (about an hour on 2 cores):

    python scripts/full_size_cpu.py            # -> calibration/results/full_size_cpu.json
    python scripts/full_size_cpu.py --tiny     # the same steps on the tiny folder (a minute; tests/CI)

The folder is `lowmem-e5 build-full-size-model` (E5-Mistral's config and real tokenizer, random fp16 weights).
Steps: build; per mode (nf4, nf4+dq, int8) quantise at load and encode a few texts, `quantize` to a saved
checkpoint, reload it and encode the same texts (vectors must be bit-identical); on the nf4 checkpoint, documents
and queries of the calibration set (tokens/s, prefix cache on vs off, alone vs in a batch), a rank-16 LoRA on all
seven projections loaded and switched, the planner's activation estimate beside the measured peak at two token
budgets, and `serve` answering the `openai` client.

Memory is what a user's machine feels: the peak of the process's anonymous memory (RssAnon, sampled every 10 ms
from /proc by this driver), not page cache of the mmapped safetensors files; VmHWM (peak RSS, file pages included)
is recorded beside it. A finished step is kept when the script is rerun with the same folder (--redo to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowmem_e5.jobs.atomic import write_json_atomic  # noqa: E402
from lowmem_e5.results import environment  # noqa: E402

MODES = {"nf4": ["--quant", "nf4"], "nf4+dq": ["--quant", "nf4", "--double-quant"], "int8": ["--quant", "int8"]}
PROBE = ["Paris is the capital of France.", "The quick brown fox jumps over the lazy dog.",
         "def add(a, b):\n    return a + b", "Berlin ist die Hauptstadt Deutschlands."]


def proc_status(pid: int) -> dict[str, int]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "VmHWM", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return values


class PeakSampler:
    """The peak of a process's RssAnon and VmHWM, sampled from /proc on a thread while the `with` block runs."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval = pid, interval
        self.peak = {"RssAnon": 0, "VmHWM": 0}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.done.is_set():
            s = proc_status(self.pid)
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s.get(k, 0))
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def run_measured(argv: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run a child, sampling its anonymous memory; its last stdout line is JSON."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    with PeakSampler(proc.pid) as sampler:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"{' '.join(argv[:6])} ... took over {timeout} s: {err[-1500:]}")
    peak = sampler.peak
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv[:8]))} ... failed ({proc.returncode}): {err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return {"wall_s": round(time.perf_counter() - t0, 2), "peak_anon_bytes": peak["RssAnon"],
            "peak_rss_bytes": peak["VmHWM"], **(json.loads(lines[-1]) if lines else {})}


def child(step: str, **kwargs) -> list[str]:
    return [sys.executable, __file__, "--child", step, "--child-args", json.dumps(kwargs)]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowmem_e5", *args]


# ---- children: each runs in a fresh process and prints one JSON line ----

def child_load_encode(model: str, flags: list[str], vectors: str) -> dict:
    """Quantise at load (or load a saved checkpoint), then encode the probe texts."""
    import numpy as np

    from lowmem_e5 import Embedder, load_model
    from lowmem_e5.cli.main import build_parser
    from lowmem_e5.cli.shared import runtime_config

    config = runtime_config(build_parser().parse_args(["encode", "--input", "x", "--output", "y", "--model", model,
                                                        *flags]))
    t0 = time.perf_counter()
    loaded = load_model(config)
    load_s = time.perf_counter() - t0
    anon_after_load = proc_status(os.getpid()).get("RssAnon", 0)
    e = Embedder(loaded)
    t0 = time.perf_counter()
    v = e.encode_documents(PROBE)
    np.save(vectors, v)
    return {"load_s": round(load_s, 2), "encode_probe_s": round(time.perf_counter() - t0, 2),
            "weight_bytes": loaded.weight_bytes.total, "anon_after_load_bytes": anon_after_load,
            "compute_dtype": config.resolved_compute_dtype()}


def child_encode(model: str, docs: int, queries: int, max_length: int) -> dict:
    """Documents and queries of the calibration set on the saved nf4 checkpoint: tokens/s; prefix cache on vs off;
    the same text alone and in a batch."""
    import numpy as np

    from lowmem_e5 import Embedder, RuntimeConfig, load_model
    from lowmem_e5.runtime.calibration_set import load_calibration_set
    from lowmem_e5.runtime.pooling import rowwise_cosine

    cset = load_calibration_set()
    doc_rows = [r for r in cset.rows if r.kind == "document"][:docs]
    query_rows = [r for r in cset.rows if r.kind == "query"][:queries]
    config = RuntimeConfig(model=model, quant="nf4", max_length=max_length)
    e = Embedder(load_model(config))
    t0 = time.perf_counter()
    dv, dstats = e.encode([r.text for r in doc_rows])
    doc_s = time.perf_counter() - t0
    tasks = sorted({r.task for r in query_rows})
    t0 = time.perf_counter()
    qv, qtok = {}, 0
    for task in tasks:
        texts = [r.text for r in query_rows if r.task == task]
        qv[task], stats = e.encode(texts, query=True, task=task)
        qtok += stats.real_tokens
    query_s = time.perf_counter() - t0
    nocache = Embedder(load_model(config.replace(cache_query_prefix=False)))
    t0 = time.perf_counter()
    cos = []
    for task in tasks:
        texts = [r.text for r in query_rows if r.task == task]
        whole, _ = nocache.encode(texts, query=True, task=task)
        cos.append(rowwise_cosine(whole, qv[task]))
    query_nocache_s = time.perf_counter() - t0
    alone = np.stack([e.encode_documents([r.text])[0] for r in doc_rows[:8]])
    return {"documents": len(doc_rows), "document_tokens": dstats.real_tokens, "document_s": round(doc_s, 2),
            "document_tokens_per_s": round(dstats.real_tokens / doc_s, 2),
            "queries": len(query_rows), "query_tokens": qtok, "query_s": round(query_s, 2),
            "query_s_without_prefix_cache": round(query_nocache_s, 2),
            "prefix_cache_speedup": round(query_nocache_s / query_s, 2),
            "prefix_cache_min_cosine": float(np.concatenate(cos).min()),
            "alone_vs_batch_bit_identical": bool(np.array_equal(alone, dv[:8])),
            "alone_vs_batch_min_cosine": float(rowwise_cosine(alone, dv[:8]).min()), "max_length": max_length}


def child_lora(model: str, adapter_dir: str, rank: int) -> dict:
    """A rank-16 LoRA on all seven projections (peft, random non-zero B), saved, loaded by name, switched per call."""
    import numpy as np
    import torch
    from safetensors import safe_open

    from lowmem_e5 import Embedder, RuntimeConfig, load_model
    from lowmem_e5.quiet_imports import import_peft

    import_peft()
    from peft import LoraConfig, get_peft_model

    config = RuntimeConfig(model=model, quant="nf4", max_length=64)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if not Path(adapter_dir, "adapter_model.safetensors").is_file():
        base = load_model(config).model
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        torch.manual_seed(0)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        peft_model.save_pretrained(adapter_dir)
        del peft_model, base
    file_bytes = 0
    with safe_open(str(Path(adapter_dir, "adapter_model.safetensors")), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            file_bytes += t.numel() * t.element_size()
    e = Embedder(load_model(config))
    base_v = e.encode_documents(PROBE)
    anon0 = proc_status(os.getpid()).get("RssAnon", 0)
    t0 = time.perf_counter()
    info = e.load_adapter("random16", adapter_dir)
    load_s = time.perf_counter() - t0
    anon1 = proc_status(os.getpid()).get("RssAnon", 0)
    with_v, _ = e.encode(PROBE, adapter="random16")
    again = e.encode_documents(PROBE)
    mixed, _ = e.encode(PROBE, adapter=["random16", None, "random16", None])
    from lowmem_e5.runtime.pooling import rowwise_cosine

    return {"rank": info.rank, "adapter_bytes": info.bytes, "safetensors_tensor_bytes": file_bytes,
            "bytes_exact": info.bytes == file_bytes, "load_s": round(load_s, 2),
            "anon_growth_on_load_bytes": anon1 - anon0,
            "adapter_changes_vectors_min_1_minus_cos": float(1 - rowwise_cosine(with_v, base_v).max()),
            "base_after_switch_bit_identical": bool(np.array_equal(again, base_v)),
            "mixed_batch_min_cosine": float(min(rowwise_cosine(mixed[[0, 2]], with_v[[0, 2]]).min(),
                                                rowwise_cosine(mixed[[1, 3]], base_v[[1, 3]]).min()))}


def child_activations(model: str, budgets: list[int]) -> dict:
    """Peak anonymous memory above the loaded model for one forward of `budget` padded tokens (rows of 512),
    beside the planner's estimate for the same budget (fp32 compute on a CPU)."""
    import torch

    from lowmem_e5 import RuntimeConfig, load_model
    from lowmem_e5.quality.planner import activation_bytes_per_token, plan_weights, workspace_bytes, meta_model

    loaded = load_model(RuntimeConfig(model=model, quant="nf4"))
    config = loaded.model.config
    weights = plan_weights(meta_model(config), "nf4", compute_dtype="float32")
    rows = []
    for budget in budgets:
        seq = min(512, budget)
        ids = torch.randint(3, config.vocab_size, (budget // seq, seq))
        base = proc_status(os.getpid()).get("RssAnon", 0)
        t0 = time.perf_counter()
        with PeakSampler(os.getpid(), interval=0.005) as sampler, torch.inference_mode():
            loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        seconds = time.perf_counter() - t0
        rows.append({"tokens": budget, "rows": int(ids.shape[0]), "seq_len": seq, "forward_s": round(seconds, 2),
                     "measured_peak_above_model_bytes": sampler.peak["RssAnon"] - base,
                     "planner_activation_bytes": budget * activation_bytes_per_token(config, "float32"),
                     "planner_workspace_bytes": workspace_bytes(weights, "float32")})
    return {"budgets": rows}


CHILDREN = {"load_encode": child_load_encode, "encode": child_encode, "lora": child_lora,
            "activations": child_activations}


# ---- the driver ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_step(checkpoint: Path, timeout: float) -> dict:
    """`serve` on the saved nf4 checkpoint, called with the openai client; stopped by its PID."""
    import urllib.request

    import numpy as np
    from openai import OpenAI

    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cli("serve", "--model", str(checkpoint), "--quant", "nf4", "--port", str(port)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        health = None
        while time.perf_counter() - t0 < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.loads(r.read())
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited: {proc.stderr.read()[-2000:]}")
                time.sleep(1)
        ready_s = time.perf_counter() - t0
        peak_anon = proc_status(proc.pid).get("RssAnon", 0)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600)
        name = health["served_name"]
        t1 = time.perf_counter()
        docs = client.embeddings.create(input=PROBE, model=name)
        queries = client.embeddings.create(input=["capital of france", "sort a list in python"], model=name,
                                           extra_body={"task": "MSMARCO"})
        calls_s = time.perf_counter() - t1
        d = np.array([x.embedding for x in docs.data])
        return {"ready_s": round(ready_s, 2), "health": health, "anon_when_ready_bytes": peak_anon,
                "documents": len(docs.data), "queries": len(queries.data), "dim": int(d.shape[1]),
                "document_tokens": docs.usage.prompt_tokens, "query_tokens": queries.usage.prompt_tokens,
                "calls_s": round(calls_s, 2), "unit_norm": bool(np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-4))}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dir_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(suffix))


def gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def tables(record: dict) -> str:
    """The record as the markdown tables of docs/full-size.md."""
    steps = record["steps"]
    lines = ["| mode | weight bytes (planner, float32 parts) | quantise at load: s / peak anon GB | `quantize`: s / "
             "peak anon GB / disk bytes | saved checkpoint load: s (x faster) / peak anon GB / peak RSS GB "
             "(x weights) | vectors |", "|---|---|---|---|---|---|"]
    for mode in MODES:
        load, quant, reload = (steps.get(f"{k}:{mode}", {}) for k in ("load", "quantize", "reload"))
        if "weight_bytes" not in load:
            continue
        same = "=" if load.get("bytes_equal_planner") and reload.get("bytes_equal_planner") else "!="
        lines.append(
            f"| {mode} | {load['weight_bytes']:,} ({same} planner) | {load['load_s']:.0f} / "
            f"{gb(load['peak_anon_bytes'])} | {quant.get('quantise_s', float('nan')):.0f} / "
            f"{gb(quant.get('peak_anon_bytes', 0))} / {quant.get('disk_bytes', 0):,} | "
            f"{reload.get('load_s', float('nan')):.1f} ({load['load_s'] / reload.get('load_s', float('nan')):.0f}x) / "
            f"{gb(reload.get('peak_anon_bytes', 0))} / {gb(reload.get('peak_rss_bytes', 0))} "
            f"({reload.get('peak_rss_bytes', 0) / load['weight_bytes']:.2f}x) | "
            f"{'bit-identical' if reload.get('vectors_bit_identical_to_quantise_at_load') else 'differ'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--child-args")
    ap.add_argument("--tiny", action="store_true", help="the tiny folder (2 layers, 64 wide, real tokenizer)")
    ap.add_argument("--folder", type=Path, help="default: the cache's e5-mistral-{7b,tiny}-random-v1")
    ap.add_argument("--work", type=Path, help="checkpoints and vectors (default: beside the folder)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", default="build,load,quantize,reload,encode,lora,activations,serve")
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128, help="tokens per text in the encode step")
    ap.add_argument("--budgets", default="512,2048", help="token budgets of the activations step")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--table", action="store_true", help="print the record's tables and stop")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](**json.loads(args.child_args))), flush=True)
        return

    from lowmem_e5.quality.full_size import default_folder
    from lowmem_e5.quality.planner import meta_model, plan_weights

    folder = args.folder or default_folder(args.tiny)
    work = args.work or folder.parent / f"{folder.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (ROOT / "calibration/results" / ("full_size_cpu_tiny.json" if args.tiny else "full_size_cpu.json"))
    record = json.loads(out.read_text()) if out.is_file() and not args.redo else {}
    if args.table:
        print(tables(record))
        return
    if record.get("folder") != str(folder):
        record = {}
    command = "python " + " ".join(["scripts/full_size_cpu.py", *sys.argv[1:]])
    record["commands"] = [c for c in record.get("commands", []) if c != command] + [command]
    record.update({"folder": str(folder), "environment": environment(),
                   "memory_reported": "peak RssAnon (anonymous memory, sampled every 10 ms); peak_rss_bytes is VmHWM "
                                      "(file pages of the mmapped safetensors included)"})
    steps = record.setdefault("steps", {})
    wanted = args.steps.split(",")
    modes = args.modes.split(",")

    def save() -> None:
        write_json_atomic(out, record)

    def step(key: str, fn) -> dict | None:
        if key in steps and "error" not in steps[key]:
            print(f"kept {key}", file=sys.stderr)
            return steps[key]
        print(f"running {key} ...", file=sys.stderr, flush=True)
        try:
            steps[key] = fn()
        except Exception as exc:  # recorded, and the other steps still run
            steps[key] = {"error": str(exc)[-3000:]}
        print(f"  {key}: {json.dumps(steps[key])[:400]}", file=sys.stderr, flush=True)
        save()
        return steps[key]

    if "build" in wanted or not folder.is_dir():
        build_args = ["build-full-size-model", "--output", str(folder)] + (["--tiny"] if args.tiny else [])
        built = step("build", lambda: {**run_measured(cli(*build_args), args.timeout),
                                       "disk_bytes": dir_bytes(folder)})
        if "error" in built:
            sys.exit(f"build failed: {built['error']}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    meta = meta_model(config)
    for mode in modes:
        flags = MODES[mode]
        double = "--double-quant" in flags
        quant = flags[1]
        planned = plan_weights(meta, quant, double, compute_dtype="float32").total
        ckpt = work / f"checkpoint-{mode}"
        at_load_vec, reload_vec = work / f"probe-{mode}-at-load.npy", work / f"probe-{mode}-reloaded.npy"
        if "load" in wanted:
            r = step(f"load:{mode}", lambda: run_measured(child("load_encode", model=str(folder), flags=flags,
                                                                  vectors=str(at_load_vec)), args.timeout))
            if "weight_bytes" in r:
                r["planner_bytes_float32"] = planned
                r["bytes_equal_planner"] = r["weight_bytes"] == planned
        if "quantize" in wanted:
            def quantize() -> dict:
                shutil.rmtree(ckpt, ignore_errors=True)
                r = run_measured(cli("quantize", "--model", str(folder), *flags, "--output", str(ckpt)), args.timeout)
                return {**r, "disk_bytes_all_files": sum(p.stat().st_size for p in ckpt.iterdir())}
            step(f"quantize:{mode}", quantize)
        if "reload" in wanted and ckpt.is_dir():
            def reload() -> dict:
                import numpy as np

                r = run_measured(child("load_encode", model=str(ckpt), flags=flags, vectors=str(reload_vec)),
                                 args.timeout)
                if at_load_vec.is_file():
                    r["vectors_bit_identical_to_quantise_at_load"] = bool(
                        np.array_equal(np.load(at_load_vec), np.load(reload_vec)))
                r["bytes_equal_planner"] = r["weight_bytes"] == planned
                return r
            step(f"reload:{mode}", reload)
        save()
    nf4 = work / "checkpoint-nf4"
    if "encode" in wanted and nf4.is_dir():
        step("encode:nf4", lambda: run_measured(child("encode", model=str(nf4), docs=args.docs, queries=args.queries,
                                                      max_length=args.max_length), args.timeout))
    if "lora" in wanted and nf4.is_dir():
        step("lora:nf4", lambda: run_measured(child("lora", model=str(nf4), adapter_dir=str(work / "lora-r16"),
                                                    rank=16), args.timeout))
    if "activations" in wanted and nf4.is_dir():
        budgets = [int(b) for b in args.budgets.split(",")]
        step("activations:nf4", lambda: run_measured(child("activations", model=str(nf4), budgets=budgets),
                                                     args.timeout))
    if "serve" in wanted and nf4.is_dir():
        step("serve:nf4", lambda: serve_step(nf4, args.timeout))
    save()
    print(out)


if __name__ == "__main__":
    main()
