"""A copy of a lowmem_e5 model folder that infinity-emb 0.0.78 serves with E5's vectors, and its command line.

infinity pins transformers < 5 and numpy < 2, so it runs from its own venv:
    python3 -m venv .venv-infinity && .venv-infinity/bin/pip install torch==2.13.0 \
        && .venv-infinity/bin/pip install 'infinity-emb[server,torch]==0.0.78'
It has no last-token pooling option and no instructions, and reads the folder with transformers 4.x. The copy
differs from the original in three ways (each checked by serve_bench's vector check before timing):
- config.json states `rope_theta` at the top level (transformers 4.x otherwise uses 10000 and every vector drifts);
- the tokenizer's post-processor writes BOS + text + EOS (without the EOS, last-token pooling reads a content token);
- sentence-transformers files select last-token pooling and normalisation.
Queries are sent already formatted (`Instruct: ...\\nQuery: ...`), as infinity's users do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

MAX_LENGTH = 512


def convert(model_dir: Path, out_dir: Path) -> Path:
    """Write the converted copy atomically (a temp folder renamed); reuse it when present."""
    if (out_dir / "modules.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".infinity-"))
    try:
        for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
            shutil.copy2(model_dir / name, tmp / name)
        config = json.loads((tmp / "config.json").read_text())
        config["rope_theta"] = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok_config = json.loads((tmp / "tokenizer_config.json").read_text())
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 4.x knows no TokenizersBackend
        tok_config["model_max_length"] = MAX_LENGTH
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        tokenizer = json.loads((tmp / "tokenizer.json").read_text())
        bos, eos = tok_config["bos_token"], tok_config["eos_token"]
        ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
        tokenizer["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": eos, "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": eos, "type_id": 0}}],
            "special_tokens": {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in (bos, eos)},
        }
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer))
        (tmp / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_LENGTH,
                                                                   "do_lower_case": False}))
        (tmp / "1_Pooling").mkdir()
        (tmp / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": config["hidden_size"], "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True, "include_prompt": True}))
        (tmp / "2_Normalize").mkdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def infinity_command(venv: Path, model_dir: Path) -> list[str]:
    folder = convert(model_dir, model_dir.parent / f"{model_dir.name}-infinity")
    return [str(venv / "bin" / "infinity_emb"), "v2", "--model-id", str(folder), "--served-model-name", "e5",
            "--engine", "torch", "--device", "cpu", "--dtype", "float32", "--batch-size", "32",
            "--no-bettertransformer", "--url-prefix", "/v1", "--host", "127.0.0.1", "--log-level", "warning"]
