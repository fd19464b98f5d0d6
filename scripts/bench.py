"""lowmem_e5 against sentence-transformers on the same model, texts and quantisation, timed side by side.

    python scripts/bench.py [--modes fp32,fp16,bf16,int8,nf4,nf4+dq] [--repeats 2]
                            [--out calibration/results/bench_vs_sentence_transformers.json]

Both engines are loaded in one process (same torch threads) and timed in alternating order; speed is reported as
ratios of medians. sentence-transformers is set up the way its users set up E5-Mistral: a Transformer module with
the quantisation in `model_kwargs`, last-token pooling, normalisation, the EOS appended to every text (its
tokenizer drops it), batch_size 32, queries through `prompt=`. The stand-in's tokenizer adds no BOS where E5's
adds `<s>`, so the BOS is written into the text as well: both engines then see the same token ids. The stand-in's
chat template is not used (E5's tokenizer has none).

Workloads come from the calibration set: its documents that fit 512 tokens (mixed lengths, what an index build
sees), its queries (short, instructed, several tasks), and a skewed mix for the batching comparison: the short
texts, some of those documents and two long documents (cut to 512 tokens). Peak RSS is measured per engine in a child process that loads the model
and encodes the documents once.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowmem_e5 import Embedder, RuntimeConfig, __version__, load_model
from lowmem_e5.environment import cpu, package_versions
from lowmem_e5.jobs.atomic import write_json_atomic
from lowmem_e5.runtime.batching import fixed_size_batches, padded_tokens, plan_batches
from lowmem_e5.runtime.calibration_set import load_calibration_set
from lowmem_e5.runtime.instructions import query_prefix, task_instruction
from lowmem_e5.runtime.pooling import rowwise_cosine
from lowmem_e5.runtime.quantization import load_plan
from lowmem_e5.timing import alternate, timed

MODES = {"fp32": ("fp32", False), "fp16": ("fp16", False), "bf16": ("bf16", False), "int8": ("int8", False),
         "nf4": ("nf4", False), "nf4+dq": ("nf4", True), "fp4": ("fp4", False)}
MAX_LENGTH = 512  # the official evaluation's length; every benchmark text fits it, so nobody truncates
ST_BATCH_SIZE = 32  # sentence-transformers' default
QUERY_COPIES = 3  # the set's 36 queries are too few to time reliably


# --- workloads ---------------------------------------------------------------------------------------------
def workloads(tokenizer) -> dict:
    rows = load_calibration_set().rows
    docs = [r.text for r in rows if r.kind == "document"]
    n_tokens = [len(ids) + 2 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    fitting = [d for d, n in zip(docs, n_tokens) if n <= MAX_LENGTH][::2]  # every other one: 45 texts, 25-470 tokens
    long_docs = sorted((n, d) for d, n in zip(docs, n_tokens) if n > MAX_LENGTH)[:2]
    queries = [(r.text, r.task) for r in rows if r.kind == "query"]
    short = [q for q, _ in queries]
    return {"documents": fitting, "queries": queries * QUERY_COPIES,
            "skewed": short + fitting[: len(short) // 2] + [d for _, d in long_docs]}


# --- engines -----------------------------------------------------------------------------------------------
def runtime_config(mode: str, **changes) -> RuntimeConfig:
    quant, dq = MODES[mode]
    return RuntimeConfig(quant=quant, double_quant=dq, max_length=MAX_LENGTH, **changes)


def by_task(queries: list[tuple[str, str]]) -> list[tuple[str, list[int]]]:
    """(task, indices of its queries), tasks sorted: both engines encode one task per call, like their users."""
    return [(task, [i for i, (_, t) in enumerate(queries) if t == task]) for task in sorted({t for _, t in queries})]


class Ours:
    name = "lowmem_e5"

    def __init__(self, mode: str) -> None:
        self.embedder = Embedder(load_model(runtime_config(mode)))

    def documents(self, texts):
        return self.embedder.encode(texts)

    def queries(self, queries, cache: bool = True):
        e = self.embedder
        e.config = e.config.replace(cache_query_prefix=cache)
        out = np.empty((len(queries), e.dim), dtype=np.float32)
        for task, idx in by_task(queries):
            out[idx] = e.encode([queries[i][0] for i in idx], task=task)[0]
        return out


class SentenceTransformers:
    name = "sentence-transformers"

    def __init__(self, mode: str) -> None:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules.normalize import Normalize
        from sentence_transformers.base.modules.transformer import Transformer
        from sentence_transformers.sentence_transformer.modules.pooling import Pooling

        from lowmem_e5.runtime.sources import resolve_model_source

        config = runtime_config(mode)
        source, _ = resolve_model_source(config.model)
        plan = load_plan(config)
        model_kwargs = {"dtype": plan.dtype}
        if plan.quantization_config is not None:
            model_kwargs["quantization_config"] = plan.quantization_config
        transformer = Transformer(
            source, model_kwargs=model_kwargs, max_seq_length=MAX_LENGTH,
            modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
            module_output_name="token_embeddings",
        )
        dim = transformer.auto_model.config.hidden_size
        self.model = SentenceTransformer(modules=[transformer, Pooling(dim, pooling_mode="lasttoken"), Normalize()],
                                         device="cpu")
        tok = transformer.tokenizer
        self.bos, self.eos = tok.bos_token or "", tok.eos_token
        self.tokenizer = tok

    def token_ids(self, texts, prompt: str = "") -> list[list[int]]:
        """The ids sentence-transformers' own preprocessing feeds the model, padding stripped."""
        features = self.model.preprocess([self.bos + prompt + t + self.eos for t in texts])
        return [ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"])]

    def documents(self, texts):
        return self.model.encode([self.bos + t + self.eos for t in texts], batch_size=ST_BATCH_SIZE)

    def queries(self, queries):
        out = np.empty((len(queries), self.model.get_embedding_dimension()), dtype=np.float32)
        for task, idx in by_task(queries):
            out[idx] = self.model.encode([queries[i][0] + self.eos for i in idx], batch_size=ST_BATCH_SIZE,
                                         prompt=self.bos + query_prefix(task_instruction(task)))
        return out


def st_padded_tokens(st: SentenceTransformers, texts: list[str]) -> int:
    """Padded tokens of sentence-transformers' batches: sorted by characters, 32 per batch."""
    ids = st.token_ids(texts)
    order = np.argsort([-len(st.bos + t + st.eos) for t in texts], kind="stable")
    return sum(len(b) * max(len(ids[i]) for i in b)
               for b in (order[s:s + ST_BATCH_SIZE] for s in range(0, len(texts), ST_BATCH_SIZE)))


def bench_mode(mode: str, work: dict, repeats: int) -> dict:
    ours, st = Ours(mode), SentenceTransformers(mode)
    docs, queries = work["documents"], work["queries"]
    doc_tokens = sum(ours.embedder.tokenize(docs).lengths)
    query_tokens = sum(sum(ours.embedder.tokenize([q], task=t).lengths) for q, t in queries)
    # Same token ids on both sides, then warm-up (first calls allocate and, for bitsandbytes, set up kernels).
    assert st.token_ids(docs[:5]) == ours.embedder.tokenize(docs[:5]).rows, "engines would embed different tokens"
    ours.documents(docs[:4]), st.documents(docs[:4])
    ours_q, st_q, uncached_q = ours.queries(queries), st.queries(queries), ours.queries(queries, cache=False)
    (ours_docs, stats), st_docs = ours.documents(docs), st.documents(docs)  # untimed: vectors and padding
    times = alternate({
        "ours_docs": lambda: ours.documents(docs), "st_docs": lambda: st.documents(docs),
        "ours_queries": lambda: ours.queries(queries), "st_queries": lambda: st.queries(queries),
        "ours_queries_no_prefix_cache": lambda: ours.queries(queries, cache=False),
    }, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "mode": mode,
        "documents": {
            "n": len(docs), "real_tokens": doc_tokens,
            "seconds": {"lowmem_e5": med["ours_docs"], "sentence_transformers": med["st_docs"]},
            "speedup_vs_sentence_transformers": med["st_docs"] / med["ours_docs"],
            "tokens_per_s": {"lowmem_e5": doc_tokens / med["ours_docs"],
                             "sentence_transformers": doc_tokens / med["st_docs"]},
            "texts_per_s": {"lowmem_e5": len(docs) / med["ours_docs"],
                            "sentence_transformers": len(docs) / med["st_docs"]},
            "padding_waste": {"lowmem_e5": stats.padded_tokens / stats.real_tokens,
                              "sentence_transformers": st_padded_tokens(st, docs) / doc_tokens},
            "cosine_to_sentence_transformers": {"min": float(rowwise_cosine(ours_docs, st_docs).min()),
                                                "mean": float(rowwise_cosine(ours_docs, st_docs).mean())},
        },
        "queries": {
            "n": len(queries), "real_tokens": query_tokens, "tasks": len({t for _, t in queries}),
            "seconds": {"lowmem_e5": med["ours_queries"], "sentence_transformers": med["st_queries"],
                        "lowmem_e5_no_prefix_cache": med["ours_queries_no_prefix_cache"]},
            "speedup_vs_sentence_transformers": med["st_queries"] / med["ours_queries"],
            "prefix_cache_speedup": med["ours_queries_no_prefix_cache"] / med["ours_queries"],
            "texts_per_s": {"lowmem_e5": len(queries) / med["ours_queries"],
                            "sentence_transformers": len(queries) / med["st_queries"]},
            "cosine_to_sentence_transformers": {"min": float(rowwise_cosine(ours_q, st_q).min()),
                                                "mean": float(rowwise_cosine(ours_q, st_q).mean())},
            "cosine_prefix_cache_to_whole_rows": float(rowwise_cosine(ours_q, uncached_q).min()),
        },
        "times_s": times,
    }


def bench_batching(work: dict, repeats: int) -> dict:
    """Token-budget batching (cheapest cut), greedy budget filling, and fixed 32-row batches, on a skewed mix."""
    e = Embedder(load_model(runtime_config("fp32")))
    texts = work["skewed"]
    lengths = e.tokenize(texts).lengths
    planners = {
        "token_budget": plan_batches,
        "greedy_fill": lambda ls, budget: plan_batches(ls, budget, batch_cost=10**9),  # fill up to the budget
        "fixed_32_sorted": lambda ls, budget: fixed_size_batches(ls, ST_BATCH_SIZE),
    }

    def run(planner):
        e.plan = planner
        return e.encode(texts)

    padded = {}
    for name, planner in planners.items():
        padded[name] = sum(padded_tokens(b, lengths) for b in planner(lengths, e.token_budget))
    run(plan_batches)  # warm-up
    times = alternate({name: (lambda p=p: run(p)) for name, p in planners.items()}, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "n": len(texts), "real_tokens": sum(lengths), "max_tokens": max(lengths), "min_tokens": min(lengths),
        "token_budget": e.token_budget,
        "padding_waste": {k: v / sum(lengths) for k, v in padded.items()},
        "seconds": med,
        "speedup_of_token_budget": {k: med[k] / med["token_budget"] for k in med if k != "token_budget"},
        "times_s": times,
    }


def forward_fixed_cost() -> dict:
    """What one forward call costs beyond its tokens, in tokens (the batch planner's per-batch cost)."""
    e = Embedder(load_model(runtime_config("fp32")))
    out = {}
    def seconds(rows: int, width: int) -> float:
        ids = [[1] + [100 + i % 50 for i in range(width - 2)] + [2]] * rows
        e._forward(ids)
        return statistics.median(timed(lambda: e._forward(ids))[1] for _ in range(5))

    for width in (16, 64):
        one, eight, many = seconds(1, width), seconds(8, width), seconds(32, width)
        per_token = (many - eight) / (24 * width)
        out[f"width_{width}"] = {"seconds_1_row": one, "seconds_per_token": per_token,
                                 "fixed_cost_tokens": (one - width * per_token) / per_token}
    return out


# --- peak memory, one engine per child process ---------------------------------------------------------------
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(engine: str, mode: str) -> None:
    """Load one engine, then encode the documents once; print resident memory after loading and at the peak."""
    engine_obj = Ours(mode) if engine == "lowmem_e5" else SentenceTransformers(mode)
    tokenizer = engine_obj.embedder.loaded.tokenizer if engine == "lowmem_e5" else engine_obj.tokenizer
    docs = workloads(tokenizer)["documents"]
    after_load, load_peak = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to the current RSS
    engine_obj.documents(docs)
    print(json.dumps({"rss_after_load": after_load, "peak_rss_encoding": _status_bytes("VmHWM"),
                      "peak_rss_loading": load_peak}))


def peak_rss(engine: str, mode: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", engine, "--modes", mode], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    header = ("| mode | documents: speedup | tokens/s ours / s-t | padding waste ours / s-t | queries: speedup "
              "| prefix cache | peak RSS encoding ours / s-t (MB) | cosine min docs / queries |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in results["modes"]:
        d, q, m = r["documents"], r["queries"], r["peak_rss_bytes"]
        lines.append(
            f"| {r['mode']} | {d['speedup_vs_sentence_transformers']:.2f}x "
            f"| {d['tokens_per_s']['lowmem_e5']:.0f} / {d['tokens_per_s']['sentence_transformers']:.0f} "
            f"| {d['padding_waste']['lowmem_e5']:.3f} / {d['padding_waste']['sentence_transformers']:.3f} "
            f"| {q['speedup_vs_sentence_transformers']:.2f}x | {q['prefix_cache_speedup']:.2f}x "
            f"| {m['lowmem_e5']['peak_rss_encoding'] / 1e6:.0f} / {m['sentence_transformers']['peak_rss_encoding'] / 1e6:.0f} "
            f"| {d['cosine_to_sentence_transformers']['min']:.4f} / {q['cosine_to_sentence_transformers']['min']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="fp32,fp16,bf16,int8,nf4,nf4+dq")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "calibration/results/bench_vs_sentence_transformers.json")
    ap.add_argument("--skip-batching", action="store_true")
    ap.add_argument("--child", choices=["lowmem_e5", "sentence-transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            sys.exit(f"--modes: unknown mode {m!r}; expected some of: {', '.join(MODES)}")
    if args.child:
        child(args.child, modes[0])
        return

    probe = Embedder(load_model(runtime_config("fp32")))
    work = workloads(probe.loaded.tokenizer)
    del probe
    results = {"command": "python " + " ".join(sys.argv), "lowmem_e5": __version__,
               "machine": {"platform": platform.platform(), "cpu": cpu(), "torch_threads": torch.get_num_threads()},
               "versions": {**package_versions(), "sentence-transformers": version("sentence-transformers")}, "repeats": args.repeats,
               "max_length": MAX_LENGTH, "modes": []}
    for mode in modes:
        t0 = time.perf_counter()
        r = bench_mode(mode, work, args.repeats)
        r["peak_rss_bytes"] = {"lowmem_e5": peak_rss("lowmem_e5", mode),
                               "sentence_transformers": peak_rss("sentence-transformers", mode)}
        results["modes"].append(r)
        print(f"{mode}: documents {r['documents']['speedup_vs_sentence_transformers']:.2f}x, "
              f"queries {r['queries']['speedup_vs_sentence_transformers']:.2f}x "
              f"(prefix cache {r['queries']['prefix_cache_speedup']:.2f}x) [{time.perf_counter() - t0:.0f} s]",
              flush=True)
        write_json_atomic(args.out, results)  # partial results survive an interrupted run
    if not args.skip_batching:
        results["batching"] = bench_batching(work, args.repeats)
        results["forward_fixed_cost"] = forward_fixed_cost()
        b = results["batching"]
        print("batching on the skewed mix: token budget vs " + ", ".join(
            f"{k} {v:.2f}x" for k, v in b["speedup_of_token_budget"].items()), flush=True)
    results["table"] = table(results)
    write_json_atomic(args.out, results)
    print(results["table"])


if __name__ == "__main__":
    main()
