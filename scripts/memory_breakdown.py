"""Where an encode process's memory goes beyond the weights, stage by stage, in one process:

    python scripts/memory_breakdown.py --quant nf4            # the default model
    python scripts/memory_breakdown.py --quant int8 --model FOLDER

Prints (and with --out writes) anonymous memory (RssAnon: what the process itself holds, not page cache of mmapped
files) and RSS after each stage: interpreter, torch, transformers + bitsandbytes (+ what transformers imports with
them), the loaded model (weights, tokenizer, the transient fp32 copy made while quantising), encoding the sample
file (activations, allocator caches), and after handing freed heap back to the OS (glibc malloc_trim).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def status() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--input", type=Path, default=ROOT / "tests/data/sample_docs.txt")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    stages = [("interpreter", status())]
    import torch  # noqa: F401

    stages.append(("import torch", status()))
    import bitsandbytes  # noqa: F401
    import transformers.quantizers  # noqa: F401  (imports torchao when it is installed)

    stages.append(("import transformers + bitsandbytes", status()))
    from lowmem_e5 import Embedder, RuntimeConfig, load_model
    from lowmem_e5.runtime.memory import release_freed_memory

    stages.append(("import lowmem_e5", status()))
    t0 = time.perf_counter()
    loaded = load_model(RuntimeConfig(model=args.model, quant=args.quant))
    stages.append((f"load_model ({args.quant}, {loaded.weight_bytes.total:,} weight bytes, "
                   f"{time.perf_counter() - t0:.1f} s)", status()))
    e = Embedder(loaded)
    texts = [line for line in args.input.read_text().splitlines() if line.strip()]
    e.encode_documents(texts)  # noqa: the vectors are not the point here
    stages.append((f"encode {len(texts)} texts", status()))
    release_freed_memory()
    stages.append(("after malloc_trim", status()))
    rows = [{"stage": name, **values} for name, values in stages]
    print(f"{'stage':<60} {'RssAnon MB':>10} {'RSS MB':>8} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['stage']:<60} {r['RssAnon'] / 1e6:>10.0f} {r['VmRSS'] / 1e6:>8.0f} {r['VmHWM'] / 1e6:>11.0f}")
    if args.out:
        from lowmem_e5.jobs.atomic import write_json_atomic
        from lowmem_e5.results import environment

        write_json_atomic(args.out, {"command": "python " + " ".join(sys.argv), "weight_bytes":
                                     loaded.weight_bytes.total, "stages": rows, "environment": environment()})


if __name__ == "__main__":
    main()
