"""Pre-quantised checkpoints: a model quantised once (bitsandbytes int8 / 4-bit, or GPTQ) and saved with
`save_pretrained`, so that later loads read the small weights and skip the full-precision pass.

The folder holds the model's own files, its tokenizer, and `lowmem_e5_checkpoint.json`: the quantisation settings it
was made with, the source model's fingerprint (references and drift runs of the source apply to it) and the sha256
of every weight file, checked at load: a missing or changed file is refused, as is a `--quant` that contradicts the
stored one. Written into a temporary sibling folder and renamed into place: an interrupted `quantize` leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelSourceError, OutputError
from ..hashing import file_sha256
from .config import RuntimeConfig

CHECKPOINT_FILE = "lowmem_e5_checkpoint.json"
QUANT_FIELDS = ("quant", "double_quant", "group_size")  # what the stored weights are; int8_threshold is a runtime knob
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
SAVABLE = ("int8", "nf4", "fp4", "gptq4")


def weight_files(folder: Path) -> list[Path]:
    return sorted({p for pat in WEIGHT_PATTERNS for p in folder.glob(pat)})


def read_checkpoint(folder: str | Path) -> dict | None:
    """The checkpoint record of a pre-quantised folder, or None for an ordinary model folder."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{path} is not valid JSON ({exc}); expected the record `quantize` writes") from None


def verify_checkpoint(folder: str | Path, record: dict, config: RuntimeConfig) -> None:
    """Refuse a contradicting --quant, and missing, extra or changed weight files."""
    folder = Path(folder)
    stored = record["quantization"]
    asked = {k: getattr(config, k) for k in QUANT_FIELDS}
    wrong = [f"{k}={asked[k]!r} (stored: {stored[k]!r})" for k in QUANT_FIELDS
             if asked[k] != stored[k] and not (k == "group_size" and stored["quant"] != "gptq4")]
    if wrong:
        raise ModelSourceError(f"model folder {str(folder)!r} is a pre-quantised {stored['quant']} checkpoint; "
                               f"{', '.join(wrong)} contradicts it: load it with --quant {stored['quant']}"
                               + (" --double-quant" if stored["double_quant"] else "")
                               + (f" --group-size {stored['group_size']}" if stored["quant"] == "gptq4" else ""))
    stored_threshold = record["runtime_config"].get("int8_threshold")
    if stored["quant"] == "int8" and config.int8_threshold != stored_threshold:  # kept in the saved quantization_config
        raise ModelSourceError(f"model folder {str(folder)!r} is an int8 checkpoint saved with int8_threshold="
                               f"{stored_threshold}; int8_threshold={config.int8_threshold} contradicts it: pass "
                               f"--int8-threshold {stored_threshold}, or quantise again with the one you want")
    expected = record["weights_sha256"]
    present = {p.name for p in weight_files(folder)}
    for name in sorted(set(expected) - present):
        raise ModelSourceError(f"model folder {str(folder)!r}: weight file {name!r} is missing; the checkpoint is "
                               "incomplete, run `lowmem-e5 quantize` again")
    for name in sorted(present - set(expected)):
        raise ModelSourceError(f"model folder {str(folder)!r}: weight file {name!r} is not part of the checkpoint")
    for name, sha in expected.items():
        if file_sha256(folder / name) != sha:
            raise ModelSourceError(f"model folder {str(folder)!r}: weight file {name!r} does not match its sha256 in "
                                   f"{CHECKPOINT_FILE} (corrupted or replaced); run `lowmem-e5 quantize` again")


def save_quantized(loaded, output: str | Path, source_fingerprint: dict) -> Path:
    """Save a loaded quantised model with its tokenizer and record, atomically (temp sibling, then rename)."""
    config: RuntimeConfig = loaded.config
    if config.quant not in SAVABLE:
        raise OutputError(f"quant={config.quant!r} is not a quantised mode; expected one of: {', '.join(SAVABLE)}")
    if config.overrides:
        raise OutputError("a checkpoint with per-module overrides is not supported; quantise without --overrides")
    output = Path(output)
    if output.exists():
        raise OutputError(f"output {str(output)!r} exists; expected a new folder name")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder's parent {str(parent)!r} does not exist; create it first")
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        record = {
            "quantization": {k: getattr(config, k) for k in QUANT_FIELDS},
            "runtime_config": config.to_dict(),
            "source": loaded.source,
            "source_fingerprint": source_fingerprint,
            "weight_bytes": loaded.weight_bytes.to_dict(),
            "weights_sha256": {p.name: file_sha256(p) for p in weight_files(tmp)},
        }
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
