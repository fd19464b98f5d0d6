"""Full-size check on a GPU: the folder `lowmem-e5 build-full-size-model` makes (E5-Mistral-7B's config and real
tokenizer, random fp16 weights: bytes and FLOPs do not depend on the values), loaded in each mode through the real
`load_model` path as users load it, measured beside the planner's prediction.

    python scripts/gpu_check.py                      # on the GPU machine (scripts/gpu_check.sh wraps it)
    python scripts/gpu_check.py --tiny --device cpu  # the same code on the tiny folder, for CI

Records per mode: exact weight bytes (and the planner's), peak memory for a 512-token and a 4096-token batch
(and the planner's activation estimate), tokens/s at a few token budgets, and the query prefix cache's speedup
(64 queries of 12 tokens after a 24-token instruction, whole rows vs the cached prefix), and for --serve-modes the
real server's texts/s under 32 concurrent clients, with cross-request batching and one request at a time. One JSON.

gptq4 (when the [gptq] extra's packages are there): the first --gptq-layers decoder layers at full size, quantised
with optimum's GPTQQuantizer on gptqmodel (group size 128, random calibration tokens: GPTQ's cost and its layers'
bytes and speed do not depend on the values), measured beside nf4 on the same layers: exact bytes against the
planner, tokens/s and their ratio. A failure there is recorded in the JSON, not fatal to the other measurements.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowmem_e5.jobs.atomic import write_json_atomic  # noqa: E402
from lowmem_e5.quality.planner import activation_bytes_per_token, meta_model, plan_weights  # noqa: E402
from lowmem_e5.results import environment  # noqa: E402
from lowmem_e5.runtime.memory import quantized_linear_count, weight_bytes  # noqa: E402
from lowmem_e5.runtime.overrides import to_int8_linear  # noqa: E402
from lowmem_e5.runtime.pooling import l2_normalize, last_token_pool, rowwise_cosine  # noqa: E402
from lowmem_e5.runtime.prefix_cache import RowPrefixes, compute_prefix_state, reading_cache  # noqa: E402
from lowmem_e5.runtime.tokenization import pad_rows  # noqa: E402

MODES = [("fp16", False), ("int8", False), ("nf4", False), ("nf4", True)]


def to_4bit_linear(linear: torch.nn.Linear, quant_type: str, double_quant: bool, dtype, device) -> torch.nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                          compress_statistics=double_quant, quant_type=quant_type)
    q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu", dtype), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=double_quant)
    return q.to(device)  # quantised on the move, as transformers does


def build(config, quant: str, double_quant: bool, device: str, dtype) -> torch.nn.Module:
    from transformers import MistralModel

    torch.manual_seed(0)
    with torch.device(device if quant == "fp16" else "cpu"):
        model = MistralModel(config).to(dtype)  # random weights
    if quant != "fp16":
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear):
                    new = (to_int8_linear(child, device) if quant == "int8"
                           else to_4bit_linear(child, quant, double_quant, dtype, device))
                    setattr(module, child_name, new)
        model = model.to(device)
    if device == "cpu":
        from lowmem_e5.runtime.loading import keep_4bit_layout_stable

        keep_4bit_layout_stable(model)
    return model.eval()


def build_gptq(config, group_size: int, device: str, dtype, rows: int = 8, seq_len: int = 512):
    """A MistralModel of `config` with random weights, GPTQ-quantised in place on `device` (optimum's GPTQQuantizer on
    the gptqmodel backend, as transformers' GPTQConfig runs it), from `rows` random calibration rows."""
    from optimum.gptq import GPTQQuantizer
    from transformers import MistralModel

    from lowmem_e5.runtime.gptq import require_gptq

    require_gptq()
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralModel(config).to(dtype)
    g = torch.Generator().manual_seed(1)
    dataset = [{"input_ids": [[1] + torch.randint(3, config.vocab_size, (seq_len - 2,), generator=g).tolist() + [2]],
                "attention_mask": [[1] * seq_len]} for _ in range(rows)]
    quantizer = GPTQQuantizer(bits=4, group_size=group_size, desc_act=False, sym=True, dataset=dataset,
                              block_name_to_quantize="layers", model_seqlen=seq_len)
    quantizer.quantize_model(model, tokenizer=None)
    return model.eval()


def gptq_beside_nf4(config, layers: int, group_size: int, device: str, dtype, dtype_name: str, budgets: list[int],
                    repeats: int) -> dict:
    """gptq4 and nf4 on the first `layers` decoder layers of `config`: bytes (measured and planned), tokens/s."""
    few = config.__class__(**{**config.to_dict(), "num_hidden_layers": layers})
    meta = meta_model(few)
    result: dict = {"layers": layers, "group_size": group_size}
    try:
        t0 = time.perf_counter()
        gptq = build_gptq(few, group_size, device, dtype)
        result["quantize_seconds"] = time.perf_counter() - t0
    except Exception as exc:  # a GPU image without the extra's packages, or a kernel gptqmodel cannot build there
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return result
    nf4 = build(few, "nf4", False, device, dtype)
    for label, model in (("gptq4", gptq), ("nf4", nf4)):
        quant = "gptq4" if label == "gptq4" else "nf4"
        result[label] = {"weight_bytes": weight_bytes(model).total,
                         "planned_weight_bytes": plan_weights(meta, quant, False, dtype_name,
                                                              group_size=group_size).total,
                         "layers_by_type": quantized_linear_count(model),
                         "tokens_per_second": {str(b): tokens_per_second(model, b, 512, device, repeats)
                                               for b in budgets}}
    result["gptq4_over_nf4_tokens_per_second"] = {
        b: result["gptq4"]["tokens_per_second"][b] / result["nf4"]["tokens_per_second"][b]
        for b in result["gptq4"]["tokens_per_second"]}
    return result


def forward(model, batch_rows: int, seq_len: int, device: str) -> None:
    rows = [[1] + [5 + (i * 7 + j) % 900 for j in range(seq_len - 2)] + [2] for i in range(batch_rows)]
    ids, mask, pos = pad_rows(rows, 2, "right")
    with torch.inference_mode():
        model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=False)


def peak_for(model, batch_rows, seq_len, device) -> int | None:
    if device == "cpu":
        forward(model, batch_rows, seq_len, device)
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward(model, batch_rows, seq_len, device)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _synced(fn, device: str, repeats: int):
    """(mean seconds per call after one warm-up call, the last call's result), GPU work included."""
    out = fn()  # warm-up
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats, out


def tokens_per_second(model, budget: int, seq_len: int, device: str, repeats: int) -> float:
    rows = max(1, budget // seq_len)
    seconds, _ = _synced(lambda: forward(model, rows, seq_len, device), device, repeats)
    return rows * seq_len / seconds


def prefix_cache_speedup(model, device: str, repeats: int, queries: int = 64, prefix_len: int = 24,
                         query_len: int = 12) -> dict:
    """Whole instructed rows against the same rows run after the cached instruction prefix."""
    prefix = tuple([1] + [7 + j % 900 for j in range(prefix_len - 1)])
    suffixes = [[11 + (i * 13 + j) % 900 for j in range(query_len - 1)] + [2] for i in range(queries)]
    ids, mask, pos = pad_rows([list(prefix) + s for s in suffixes], 2, "right")
    s_ids, s_mask, s_pos = pad_rows(suffixes, 2, "right")
    prefixes = RowPrefixes.of_rows([compute_prefix_state(model, prefix, device)] * queries)
    full_mask, s_pos = prefixes.batch_inputs(s_mask, s_pos)

    def whole():
        with torch.inference_mode():
            h = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                      use_cache=False).last_hidden_state
        return l2_normalize(last_token_pool(h, mask))

    def cached():
        with torch.inference_mode():
            h = model(input_ids=s_ids.to(device), attention_mask=full_mask.to(device), position_ids=s_pos.to(device),
                      cache=reading_cache(prefixes), use_cache=True).last_hidden_state
        return l2_normalize(last_token_pool(h, s_mask))

    t_whole, a = _synced(whole, device, repeats)
    t_cached, b = _synced(cached, device, repeats)
    return {"queries": queries, "prefix_tokens": prefix_len, "query_tokens": query_len,
            "seconds_whole": t_whole, "seconds_cached": t_cached, "speedup": t_whole / t_cached,
            "cosine_min": float(rowwise_cosine(a.cpu().numpy(), b.cpu().numpy()).min())}


def serve_throughput(loaded, config, seconds: float, clients: int = 32) -> dict:
    """The real server (scheduler + FastAPI app + uvicorn on 127.0.0.1) around this model, loaded by `clients`
    threads: texts/s for short queries (one per request) and documents (four of 200 words per request), with
    cross-request batching and one request at a time."""
    import socket
    import threading

    import httpx
    import uvicorn

    from lowmem_e5 import Embedder
    from lowmem_e5.serving.config import ServeConfig
    from lowmem_e5.serving.server import build_server

    embedder = Embedder(loaded)
    rng = torch.Generator().manual_seed(0)

    def words(n: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(3, config.vocab_size, (n,), generator=rng))

    bodies = {"queries": [{"input": [words(12)], "task": "NQ"} for _ in range(256)],
              "documents": [{"input": [words(200) for _ in range(4)]} for _ in range(64)]}
    result: dict = {"clients": clients, "seconds": seconds}
    for label, most in (("batched", None), ("one_at_a_time", 1)):
        scheduler, app = build_server(lambda: embedder, ServeConfig(max_queue_requests=4096, max_queue_tokens=10**8,
                                                                    max_wait_ms=2.0, max_batch_requests=most))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        scheduler.start()
        while not server.started:
            time.sleep(0.05)
        result[label] = {}
        for workload, items in bodies.items():
            done = [0]
            lock = threading.Lock()
            deadline = time.monotonic() + seconds

            def client(i: int) -> None:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
                    k = i
                    while time.monotonic() < deadline:
                        body = items[k % len(items)]
                        k += clients
                        http.post("/v1/embeddings", json=body).raise_for_status()
                        with lock:
                            done[0] += len(body["input"])

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            result[label][workload + "_texts_per_s"] = done[0] / (time.perf_counter() - t0)
        server.should_exit = True
        thread.join()
    result["gain"] = {w: result["batched"][f"{w}_texts_per_s"] / result["one_at_a_time"][f"{w}_texts_per_s"]
                      for w in bodies}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="2-layer config (CPU smoke test)")
    ap.add_argument("--budgets", default="4096,16384,65536")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "calibration/results/gpu_check.json")
    ap.add_argument("--serve-modes", default="nf4", help="modes whose server throughput is measured ('' for none)")
    ap.add_argument("--serve-seconds", type=float, default=8.0)
    ap.add_argument("--serve-clients", type=int, default=32)
    ap.add_argument("--gptq-layers", type=int, default=2, help="full-size decoder layers quantised with GPTQ (0: skip)")
    ap.add_argument("--gptq-group-size", type=int, default=128)
    ap.add_argument("--folder", type=Path, help="an E5-Mistral-shaped folder (built there if missing; default: the "
                    "cache's, as `lowmem-e5 build-full-size-model [--tiny]` makes it)")
    ap.add_argument("--tokenizer-from", type=Path, help="copy the tokenizer files from this folder instead of "
                    "converting mistral-common's (a machine without it: gpu_wheels.sh carries them)")
    args = ap.parse_args()
    from transformers import AutoConfig

    from lowmem_e5 import RuntimeConfig, load_model
    from lowmem_e5.quality.full_size import build_e5_shaped_folder, default_folder

    t0 = time.perf_counter()
    folder = build_e5_shaped_folder(args.folder or default_folder(args.tiny), tiny=args.tiny,
                                    tokenizer_from=args.tokenizer_from)
    folder_s = time.perf_counter() - t0
    config = AutoConfig.from_pretrained(str(folder))
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    dtype_name = "float32" if args.device == "cpu" else "float16"
    budgets = [int(b) for b in args.budgets.split(",")]
    meta = meta_model(config)
    rows = []
    for quant, dq in MODES:
        label = f"{quant}+dq" if dq else quant
        t0 = time.perf_counter()
        loaded = load_model(RuntimeConfig(model=str(folder), quant=quant, double_quant=dq, device=args.device,
                                          max_length=4096))  # what users load: real tokenizer, transformers, bnb
        model = loaded.model
        build_s = time.perf_counter() - t0
        planned = plan_weights(meta, quant, dq, dtype_name)
        row = {"mode": label, "load_seconds": build_s, "weight_bytes": weight_bytes(model).total,
               "planned_weight_bytes": planned.total,
               "peak_activation_bytes": {}, "planned_activation_bytes": {}, "tokens_per_second": {}}
        for seq_len, batch_rows in ((512, 8), (4096, 1)):
            key = f"{batch_rows}x{seq_len}"
            row["peak_activation_bytes"][key] = peak_for(model, batch_rows, seq_len, args.device)
            row["planned_activation_bytes"][key] = activation_bytes_per_token(config, dtype_name) * batch_rows * seq_len
        for budget in budgets:
            row["tokens_per_second"][str(budget)] = tokens_per_second(model, budget, 512, args.device, args.repeats)
        row["prefix_cache"] = prefix_cache_speedup(model, args.device, args.repeats)
        if label in args.serve_modes.split(","):
            row["server"] = serve_throughput(loaded, config, args.serve_seconds, args.serve_clients)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, loaded
        gc.collect()
        if args.device != "cpu":
            torch.cuda.empty_cache()
    gptq = None
    if args.gptq_layers:
        gptq = gptq_beside_nf4(config, args.gptq_layers, args.gptq_group_size, args.device, dtype, dtype_name, budgets,
                               args.repeats)
        print(json.dumps({"gptq4": gptq}), flush=True)
    result = {"run": {"script": "scripts/gpu_check.py", "argv": sys.argv[1:], "config": "tiny" if args.tiny else
                      "e5-mistral-7b (random weights)", "device": args.device, "folder": str(folder),
                      "folder_build_s": folder_s},
              "modes": rows, "gptq4": gptq, "environment": environment()}
    write_json_atomic(args.out, result)
    print("| mode | weight bytes (measured) | planned | peak 8x512 | peak 1x4096 | tokens/s @ budgets "
          "| prefix cache speedup (cos min) |")
    print("|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        peaks = [r["peak_activation_bytes"][k] for k in ("8x512", "1x4096")]
        tps = ", ".join(f"{b}: {v:,.0f}" for b, v in r["tokens_per_second"].items())
        print(f"| {r['mode']} | {r['weight_bytes']:,} | {r['planned_weight_bytes']:,} | "
              + " | ".join("-" if p is None else f"{p:,}" for p in peaks) + f" | {tps} "
              + f"| {r['prefix_cache']['speedup']:.2f}x ({r['prefix_cache']['cosine_min']:.4f}) |")
    if gptq and "error" in gptq:
        print(f"gptq4: not measured, {gptq['error'][:300]}")
    elif gptq:
        print(f"gptq4 on {gptq['layers']} full-size layers (g{gptq['group_size']}, quantised in "
              f"{gptq['quantize_seconds']:.1f} s): " + "; ".join(
                  f"{m} {gptq[m]['weight_bytes']:,} bytes (planned {gptq[m]['planned_weight_bytes']:,})"
                  for m in ("gptq4", "nf4")) + "; gptq4/nf4 tokens/s " + ", ".join(
                  f"{b}: {v:.2f}x" for b, v in gptq["gptq4_over_nf4_tokens_per_second"].items()))
    for r in rows:
        if "server" in r:
            s = r["server"]
            print(f"server {r['mode']}, {s['clients']} clients: " + ", ".join(
                f"{w} {s['batched'][w + '_texts_per_s']:.1f} texts/s batched vs "
                f"{s['one_at_a_time'][w + '_texts_per_s']:.1f} one at a time ({s['gain'][w]:.2f}x)"
                for w in ("queries", "documents")))


if __name__ == "__main__":
    main()
