"""Weight bytes and encode time of every mode on the default small model, measured side by side in one run.

    python scripts/measure_modes.py [--repeats 3] [--out calibration/results/modes_small_model.json]

All models are loaded first, then timed in interleaved rounds (mode order rotates each round) so that
machine noise hits every mode alike; times are reported as ratios to fp32's median.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowmem_e5 import Embedder, RuntimeConfig, __version__, load_model  # noqa: E402
from lowmem_e5.environment import package_versions  # noqa: E402
from lowmem_e5.jobs.atomic import write_json_atomic  # noqa: E402
from lowmem_e5.results import mode_label  # noqa: E402
from lowmem_e5.runtime.pooling import rowwise_cosine  # noqa: E402
from lowmem_e5.timing import alternate  # noqa: E402

MODES = [("fp32", False), ("fp16", False), ("bf16", False), ("int8", False), ("nf4", False), ("nf4", True),
         ("fp4", False), ("fp4", True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--copies", type=int, default=4, help="times the sample file is repeated")
    ap.add_argument("--out", type=Path, default=ROOT / "calibration/results/modes_small_model.json")
    args = ap.parse_args()

    texts = (ROOT / "tests/data/sample_docs.txt").read_text().splitlines() * args.copies
    embedders = {mode_label(m, dq): Embedder(load_model(RuntimeConfig(quant=m, double_quant=dq, max_length=512)))
                 for m, dq in MODES}
    vectors = {}
    for k, e in embedders.items():  # warm-up, and the vectors for a quick cosine to fp32
        vectors[k] = e.encode(texts)[0]
    times = alternate({k: (lambda e=e: e.encode(texts)) for k, e in embedders.items()}, args.repeats)
    base_time = statistics.median(times["fp32"])
    base_bytes = embedders["fp32"].loaded.weight_bytes.total
    rows = []
    for k, e in embedders.items():
        wb = e.loaded.weight_bytes
        cos = rowwise_cosine(vectors[k], vectors["fp32"])
        rows.append({
            "mode": k, "weight_bytes": wb.to_dict(), "bytes_ratio_to_fp32": wb.total / base_bytes,
            "encode_seconds_median": statistics.median(times[k]), "encode_seconds": times[k],
            "time_ratio_to_fp32": statistics.median(times[k]) / base_time,
            "cosine_to_fp32_mean": float(cos.mean()), "cosine_to_fp32_min": float(cos.min()),
        })
    result = {
        "run": {"script": "scripts/measure_modes.py", "argv": sys.argv[1:], "texts": len(texts),
                "max_length": 512, "model": str(embedders["fp32"].loaded.source), "lowmem_e5": __version__},
        "modes": rows,
        "environment": {"python": platform.python_version(), "threads": torch.get_num_threads(),
                        "packages": package_versions(), "machine": platform.machine()},
    }
    write_json_atomic(args.out, result)
    print("| mode | weight bytes | vs fp32 | encode time vs fp32 | cosine to fp32 (mean / min) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['weight_bytes']['total']:,} | {row['bytes_ratio_to_fp32']:.3f} | "
              f"{row['time_ratio_to_fp32']:.2f}x | {row['cosine_to_fp32_mean']:.4f} / {row['cosine_to_fp32_min']:.4f} |")


if __name__ == "__main__":
    main()
