"""Quantise at every load against loading a checkpoint saved by `lowmem-e5 quantize`: load seconds, peak RSS and disk
bytes, on the default small model, side by side in one run (each load a fresh process, order rotated, repeated).

    python scripts/checkpoint_load.py [--modes nf4,int8] [--repeats 3] [--out calibration/results/checkpoint_load.json]

A load is `load_model` in a new Python process that has already imported torch and transformers (import time is not
the load's); its peak RSS is VmHWM after the load, reset to the current RSS just before it (/proc/self/clear_refs). The saved checkpoints are checked to give the same
vectors as quantising at load, bit for bit, before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOAD = r"""
import json, sys, time
import torch, transformers
import lowmem_e5
from lowmem_e5 import RuntimeConfig, load_model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: imports are not the load's
t0 = time.perf_counter()
loaded = load_model(RuntimeConfig(model=sys.argv[1], quant=sys.argv[2]))
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_bytes": status("VmHWM"), "rss_before_bytes": before,
                  "rss_after_bytes": status("VmRSS"), "weight_bytes": loaded.weight_bytes.total}))
"""


def load_once(model: str, quant: str) -> dict:
    r = subprocess.run([sys.executable, "-c", LOAD, model, quant], capture_output=True, text=True,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    import numpy as np

    from lowmem_e5 import Embedder, RuntimeConfig, load_model
    from lowmem_e5.results import result_record
    from lowmem_e5.runtime.checkpoints import save_quantized, weight_files
    from lowmem_e5.runtime.fingerprint import model_fingerprint
    from lowmem_e5.runtime.sources import resolve_model_source

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="nf4,int8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "calibration" / "results" / "checkpoint_load.json")
    a = ap.parse_args()
    modes = a.modes.split(",")
    source, _ = resolve_model_source("default")
    work = Path(tempfile.mkdtemp(prefix="ckload_"))
    texts = ["Paris is the capital of France.", "Instruct: Given a question, retrieve passages\nQuery: capital?"]
    try:
        disk = {"source_fp32": sum(p.stat().st_size for p in weight_files(Path(source)))}
        for quant in modes:
            loaded = load_model(RuntimeConfig(model=source, quant=quant))
            save_quantized(loaded, work / quant, model_fingerprint(source))
            again = Embedder(load_model(RuntimeConfig(model=str(work / quant), quant=quant)))
            assert np.array_equal(Embedder(loaded).encode(texts)[0], again.encode(texts)[0]), quant
            disk[quant] = sum(p.stat().st_size for p in weight_files(work / quant))
        runs: dict[str, list[dict]] = {}
        cases = [(f"{q}_quantise_at_load", source, q) for q in modes] + [(f"{q}_saved", str(work / q), q) for q in modes]
        for rep in range(a.repeats):
            for name, model, quant in cases[rep % len(cases):] + cases[:rep % len(cases)]:
                runs.setdefault(name, []).append(load_once(model, quant))
                print(name, runs[name][-1], file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for name, rs in runs.items():
        summary[name] = {"load_s": round(statistics.median(r["seconds"] for r in rs), 3),
                         "peak_rss_bytes": int(statistics.median(r["peak_rss_bytes"] for r in rs)),
                         "load_peak_rss_bytes": int(statistics.median(r["peak_rss_bytes"] - r["rss_before_bytes"]
                                                                      for r in rs)),
                         "weight_bytes": rs[0]["weight_bytes"]}
    for q in modes:
        summary[f"{q}_saved"]["load_speedup"] = round(summary[f"{q}_quantise_at_load"]["load_s"]
                                                      / summary[f"{q}_saved"]["load_s"], 2)
    record = result_record(run={"what": "quantise at load vs load a saved checkpoint", "command": "python "
                                + " ".join(sys.argv), "model": "default (SmolLM2-135M in MistralModel)",
                                "modes": modes, "repeats": a.repeats},
                           memory={"disk_bytes": disk}, speed={"loads": summary, "runs": runs})
    a.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"disk_bytes": disk, "loads": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
