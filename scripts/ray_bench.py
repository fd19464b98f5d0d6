"""Scale-out on this machine: `lowmem-e5 encode` into Parquet shards in one process, and with `--ray` on a local
cluster with 1 and 2 workers, on the same corpus, side by side in one run (rotating order, repeated).

    python scripts/ray_bench.py [--quant nf4] [--copies 6] [--shards 8] [--repeats 2]
                                [--out calibration/results/ray_scaleout.json]

The corpus: the calibration set's 132 texts (real prose and code this project did not write), each repeated
--copies times with its copy number appended so that ids differ, cut into --shards JSONL shards. Every command is a
fresh subprocess, as a user runs it; timed from start to exit (imports, cluster start, model loads, embedding,
Parquet), and each reports its own summary (embedding seconds, Ray start, model load per worker). All three outputs
are checked to hold the same ids with the same vectors (cosine >= 0.9999) before anything is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_corpus(folder: Path, copies: int, shards: int) -> int:
    rows = [json.loads(line) for line in (ROOT / "calibration" / "set_v1.jsonl").read_text().splitlines()]
    records = [{"id": f"{r['id']}-{c}", "text": f"{r['text']} ({c})"} for c in range(copies) for r in rows]
    folder.mkdir(parents=True)
    per = -(-len(records) // shards)
    for s in range(shards):
        part = records[s * per:(s + 1) * per]
        (folder / f"part-{s:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return len(records)


def run(args: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lowmem_e5", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr[-4000:]}")
    return wall, json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    from lowmem_e5.jobs.vector_shards import read_vectors
    from lowmem_e5.results import result_record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "calibration" / "results" / "ray_scaleout.json")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ray_bench_"))
    try:
        n = build_corpus(work / "in", a.copies, a.shards)
        common = ["encode", "--input", str(work / "in"), "--quant", a.quant, "--max-length", "512", "--quiet"]
        engines = {
            "single_process": [],
            "ray_1_worker": ["--ray", "--workers", "1", "--local-cpus", "2"],
            "ray_2_workers": ["--ray", "--workers", "2", "--local-cpus", "2"],
        }
        runs: dict[str, list[dict]] = {k: [] for k in engines}
        for rep in range(a.repeats):
            order = list(engines)[rep % 3:] + list(engines)[:rep % 3]
            for name in order:
                out = work / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                wall, summary = run(common + ["--output", str(out)] + engines[name])
                runs[name].append({"wall_s": round(wall, 3), "summary": summary})
                print(f"{name}: {wall:.1f} s wall, {summary['seconds']:.1f} s embedding", file=sys.stderr)
        ref_ids, ref_vecs, _ = read_vectors(work / "out-single_process")
        ref = dict(zip(ref_ids, ref_vecs))
        for name in engines:
            ids, vecs, _ = read_vectors(work / f"out-{name}")
            assert sorted(ids) == sorted(ref_ids) and len(set(ids)) == n, name
            worst = min(float(v @ ref[i]) for i, v in zip(ids, vecs))
            assert worst >= 0.9999, f"{name}: cosine {worst}"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(name: str, key) -> float:
        return statistics.median(key(r) for r in runs[name])

    speed = {}
    base_wall = median("single_process", lambda r: r["wall_s"])
    base_embed = median("single_process", lambda r: r["summary"]["seconds"])
    for name in engines:
        wall = median(name, lambda r: r["wall_s"])
        embed = median(name, lambda r: r["summary"]["seconds"])
        speed[name] = {
            "wall_s": wall, "rows_per_s_wall": round(n / wall, 2), "embed_s": embed,
            "rows_per_s_embed": round(n / embed, 2),
            "wall_speedup_vs_single": round(base_wall / wall, 3), "embed_speedup_vs_single": round(base_embed / embed, 3),
        }
        if name != "single_process":
            speed[name]["ray_start_s"] = median(name, lambda r: r["summary"]["ray_start_s"])
            speed[name]["model_load_s_per_worker"] = [r["summary"]["model_load_s"] for r in runs[name]]
    record = result_record(
        run={"what": "encode into Parquet shards: one process vs Ray Data with 1 and 2 local workers",
             "command": "python " + " ".join(sys.argv), "rows": n, "shards": a.shards, "quant": a.quant,
             "model": "default (SmolLM2-135M in MistralModel; a general LM, not a trained embedder)",
             "note": "embed_s of a Ray run spans its pipeline, model loads in the workers included; wall_s spans "
                     "the whole command (imports, cluster start, model load, Parquet)"},
        speed={"engines": speed, "runs": runs})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(speed, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
