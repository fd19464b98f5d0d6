"""Stored vector formats on the command line: `calibrate-vectors`, and `encode`'s `--vectors` / `--ranges`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import LowmemError
from .shared import add_runtime_args, log, runtime_config


def add_encode_vector_args(parser: argparse.ArgumentParser) -> None:
    from ..runtime.vector_formats import FORMATS

    g = parser.add_argument_group("stored vector format (docs/index-memory.md)")
    g.add_argument("--vectors", default="float32", help=f"write codes instead of float32 vectors: {', '.join(FORMATS)}"
                   ", binary:centred or ubinary:centred (int8, uint8 and the centred ones need --ranges)")
    g.add_argument("--ranges", type=Path, help="the index's calibration file (`lowmem-e5 calibrate-vectors`): "
                   "int8/uint8 ranges and the binary centre, the same for every call that writes this index")


def vector_settings(args: argparse.Namespace):
    """(format, calibration or None) of --vectors and --ranges: checked before any model is loaded."""
    from ..runtime.vector_formats import VectorCalibration, VectorFormat

    fmt = VectorFormat.parse(args.vectors)
    if args.ranges is None:
        if fmt.needs_calibration:
            raise LowmemError(f"--vectors {fmt} needs --ranges FILE: the index's per-dimension ranges, made once with "
                              "`lowmem-e5 calibrate-vectors --input DOCS --output FILE` (same model, mode and adapter)")
        return fmt, None
    return fmt, VectorCalibration.read(args.ranges)


def check_ranges(args: argparse.Namespace, calibration, source: str, config, adapter: Path | None) -> None:
    """Refuse a calibration made with another model, mode or adapter than these vectors'."""
    from ..runtime.vector_formats import index_identity

    if calibration is not None:
        calibration.check(index_identity(source, config, adapter), where=f"--ranges {args.ranges}")


def cmd_calibrate_vectors(args: argparse.Namespace) -> int:
    from ..jobs.atomic import write_json_atomic
    from ..jobs.inputs import check_output_path
    from ..jobs.vector_calibration import calibrate
    from ..runtime.encoder import Embedder
    from ..runtime.loading import load_model

    output = check_output_path(args.output, suffix=".json")
    config = runtime_config(args)
    log(f"loading {config.model} as {config.quant} ...")
    t0 = time.perf_counter()
    embedder = Embedder(load_model(config))
    adapter = str(args.adapter.resolve()) if args.adapter else None
    calibration = calibrate(embedder, args.input, field=args.field, rows=args.sample, adapter=adapter,
                            progress=not args.quiet)
    write_json_atomic(output, calibration.to_dict())
    print(json.dumps({"output": str(output), "rows": calibration.sample["rows"],
                      "of_rows": calibration.sample["of_rows"], "dimensions": calibration.dimensions,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from ..jobs.vector_calibration import DEFAULT_SAMPLE

    c = sub.add_parser("calibrate-vectors", help="an index's int8/uint8 ranges and binary centre from a sample of its "
                       "documents, for `encode --vectors ... --ranges FILE`")
    c.add_argument("--input", required=True, type=Path, help="the documents (as `encode` reads them): .txt, .jsonl, "
                   ".parquet, or a folder of shards")
    c.add_argument("--output", required=True, type=Path, help="the calibration file (.json)")
    c.add_argument("--field", default="text", help="JSONL field / Parquet column holding the text (default: text)")
    c.add_argument("--sample", type=int, default=DEFAULT_SAMPLE,
                   help=f"documents drawn at random (seed 0) to embed (default {DEFAULT_SAMPLE})")
    c.add_argument("--adapter", type=Path, help="the LoRA adapter the index's documents are embedded with")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    add_runtime_args(c)
    c.set_defaults(func=cmd_calibrate_vectors)
