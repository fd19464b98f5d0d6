"""Does a text get the same vector alone and inside a batch of other texts? Per mode, on the default small model.

    python scripts/batch_invariance.py [--modes fp32,bf16,int8,nf4] [--n 12]
                                       [--out calibration/results/batch_invariance.json]

Retrieval needs a document's vector not to depend on what it was batched with. Each of the first n calibration
documents is encoded alone and inside one batch with all of them (padded to the longest); the table gives the
cosine between the two. LLM.int8() (bitsandbytes int8) picks its outlier columns over all tokens of the batch,
padding included, so its vectors can depend on the neighbours (int8-t0: threshold 0, no outlier columns); the
other modes only differ by float rounding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.jobs.atomic import write_json_atomic
from lowmem_e5.runtime.batching import plan_batches
from lowmem_e5.runtime.calibration_set import load_calibration_set
from lowmem_e5.runtime.pooling import rowwise_cosine

MODES = {"fp32": {"quant": "fp32"}, "bf16": {"quant": "bf16"}, "int8": {"quant": "int8"},
         "int8-t0": {"quant": "int8", "int8_threshold": 0.0}, "nf4": {"quant": "nf4"},
         "nf4+dq": {"quant": "nf4", "double_quant": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="fp32,bf16,int8,int8-t0,nf4")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "calibration/results/batch_invariance.json")
    args = ap.parse_args()
    docs = [r.text for r in load_calibration_set().rows if r.kind == "document"][: args.n]
    results = {"command": "python " + " ".join(sys.argv), "n_texts": len(docs), "modes": []}
    for mode in args.modes.split(","):
        if mode not in MODES:
            sys.exit(f"--modes: unknown mode {mode!r}; expected some of: {', '.join(MODES)}")
        e = Embedder(load_model(RuntimeConfig(**MODES[mode], max_length=512, token_budget=10**6)))
        e.plan = lambda lengths, budget: plan_batches(lengths, budget, batch_cost=10**9)  # one batch for all
        batched, stats = e.encode(docs)
        assert stats.n_batches == 1
        alone = np.concatenate([e.encode([d])[0] for d in docs])
        cos = rowwise_cosine(alone, batched)
        results["modes"].append({"mode": mode, "cosine_alone_vs_batched": {"min": float(cos.min()),
                                                                           "mean": float(cos.mean())},
                                 "padding_waste": stats.padded_tokens / stats.real_tokens})
        print(f"{mode}: cosine alone vs batched min {cos.min():.5f} mean {cos.mean():.5f}", flush=True)
    write_json_atomic(args.out, results)


if __name__ == "__main__":
    main()
