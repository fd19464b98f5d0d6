"""A model folder shaped exactly like `intfloat/e5-mistral-7b-instruct`, with random weights.

What memory, bytes and time are measured on where the hub cannot be reached: E5-Mistral's published config
(`planner.e5_mistral_config`), its real tokenizer (Mistral-7B-v0.1's sentencepiece model, shipped by the PyPI package
`mistral-common`) with E5's `tokenizer_config.json` and the hub's BOS-only post-processor (the EOS trap included:
the config says add_eos_token, the fast tokenizer adds only `<s>`), and fp16 weights, normal with std 0.02 and norms
1, as sharded safetensors with `model.safetensors.index.json`. Shards are written one at a time, so building never
holds more than one shard in memory. Values decide vectors, not bytes or speed: quality stays the small model's job.

`tiny=True` gives the same folder with a 2-layer, 64-wide config and the real 32,000-token vocabulary: the test
fixture for the real tokenizer's path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from ..default_model import cache_dir
from ..errors import LowmemError
from .planner import e5_mistral_config, meta_model

FULL_SIZE_EXTRA = "pip install 'lowmem-e5[full-size]'"
TOKENIZER_MEMBER = "data/tokenizer.model.v1"  # inside the mistral_common package
TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
FOLDER_VERSION = 1
SHARD_BYTES = 5 * 10**9  # at most one shard is in memory while building
INIT_STD = 0.02

# E5-Mistral's tokenizer_config.json (the fields that change behaviour): BOS and EOS asked for, pad = EOS.
E5_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": True,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "</s>",
    "unk_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "legacy": True,
    "model_max_length": 1000000000000000019884624838656,
    "sp_model_kwargs": {},
    "spaces_between_special_tokens": False,
    "tokenizer_class": "LlamaTokenizer",
    "use_default_system_prompt": False,
}

PostProcessor = Literal["bos", "bos+eos"]


def folder_name(tiny: bool) -> str:
    return f"e5-mistral-{'tiny' if tiny else '7b'}-random-v{FOLDER_VERSION}"


def default_folder(tiny: bool = False) -> Path:
    return cache_dir() / folder_name(tiny)


def tiny_e5_config():
    """E5-Mistral's config at 2 layers and 64 wide; vocabulary, grouped KV heads, ids and rope as the real one."""
    config = e5_mistral_config()
    for key, value in dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1).items():
        setattr(config, key, value)
    return config


def tokenizer_model_file() -> Path:
    """Mistral-7B-v0.1's sentencepiece model from the installed mistral-common, checked by sha256."""
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise LowmemError(f"the E5-Mistral tokenizer comes from the package mistral-common; install the extra: "
                          f"{FULL_SIZE_EXTRA}")
    path = Path(next(iter(spec.submodule_search_locations))) / TOKENIZER_MEMBER
    if not path.is_file():
        raise LowmemError(f"{path} is missing from mistral-common; expected Mistral-7B-v0.1's tokenizer there "
                          "(mistral-common 1.13 ships it)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != TOKENIZER_SHA256:
        raise LowmemError(f"{path} has sha256 {digest}, expected {TOKENIZER_SHA256} (Mistral-7B-v0.1's tokenizer)")
    return path


def write_tokenizer(folder: Path, post_processor: PostProcessor = "bos") -> None:
    """tokenizer.model, E5's tokenizer_config.json, and the fast tokenizer.json transformers converts from them, with
    the hub's post-processor (`bos`: `<s>` only) or one that also appends `</s>` (`bos+eos`)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    if post_processor not in ("bos", "bos+eos"):
        raise ValueError(f"post_processor={post_processor!r} is not valid; expected 'bos' or 'bos+eos'")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_model_file(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(E5_TOKENIZER_CONFIG, indent=2) + "\n")
    fast = AutoTokenizer.from_pretrained(str(folder))  # sentencepiece -> fast tokenizer (needs sentencepiece)
    end = " </s>" if post_processor == "bos+eos" else ""
    special = [("<s>", 1)] + ([("</s>", 2)] if end else [])
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"<s> $A{end}", pair=f"<s> $A{end} <s> $B{end}", special_tokens=special)
    fast.backend_tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")


def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every saved tensor of a MistralModel with this config, in state_dict order."""
    return [(name, tuple(t.shape)) for name, t in meta_model(config).state_dict().items()]


def shards(shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int, itemsize: int = 2
           ) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped so that each group stays under shard_bytes (a larger tensor goes alone)."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = itemsize * int(torch.Size(shape).numel())
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    return groups


def random_tensor(name: str, shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """Norms are ones (as initialised); everything else normal(0, 0.02), each tensor from its own seed, so the
    values do not depend on the shard layout."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.float16)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(INIT_STD).to(torch.float16)


def write_weights(folder: Path, config, seed: int = 0, shard_bytes: int = SHARD_BYTES,
                  progress: bool = True) -> dict:
    """fp16 safetensors shards and model.safetensors.index.json; returns the index."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    shapes = tensor_shapes(config)
    groups = shards(shapes, shard_bytes)
    total = sum(2 * int(torch.Size(s).numel()) for _, s in shapes)
    weight_map: dict[str, str] = {}
    index = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="weights", disable=not progress) as bar:
        for i, group in enumerate(groups, start=1):
            file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            tensors = {}
            for name, shape in group:  # one shard in memory at a time
                tensors[name] = random_tensor(name, shape, seed, index)
                index += 1
                weight_map[name] = file
                bar.update(tensors[name].numel() * 2)
            save_file(tensors, str(folder / file), metadata={"format": "pt"})
            del tensors
    result = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def write_config(folder: Path, config) -> None:
    config.architectures = ["MistralModel"]
    config.dtype = "float16"
    config.use_cache = False
    config.tie_word_embeddings = False
    config.save_pretrained(str(folder))


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_e5_shaped_folder(target: Path | None = None, tiny: bool = False, seed: int = 0,
                           post_processor: PostProcessor = "bos", shard_bytes: int = SHARD_BYTES,
                           progress: bool = True, tokenizer_from: Path | None = None) -> Path:
    """Build the folder (atomically: a temporary sibling, renamed); an existing complete one is returned as it is.
    tokenizer_from: copy the tokenizer files of an earlier folder instead of converting mistral-common's (for a
    machine without mistral-common and sentencepiece, such as the offline GPU machine)."""
    target = Path(target) if target is not None else default_folder(tiny)
    if (target / "model.safetensors.index.json").is_file():
        return target
    config = tiny_e5_config() if tiny else e5_mistral_config()
    need = 2 * sum(int(torch.Size(s).numel()) for _, s in tensor_shapes(config))
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < need * 1.05:
        raise LowmemError(f"{target.parent} has {free:,} bytes free; the folder needs {need:,} (fp16 weights)")
    if tokenizer_from is None:
        tokenizer_model_file()  # fail before writing gigabytes
    elif missing := [f for f in TOKENIZER_FILES if not (Path(tokenizer_from) / f).is_file()]:
        raise LowmemError(f"tokenizer folder {str(tokenizer_from)!r} lacks {', '.join(missing)}; expected a folder "
                          "made by build-full-size-model")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        write_config(out, config)
        if tokenizer_from is None:
            write_tokenizer(out, post_processor)
        else:
            for name in TOKENIZER_FILES:
                shutil.copyfile(Path(tokenizer_from) / name, out / name)
        write_weights(out, config, seed=seed, shard_bytes=shard_bytes, progress=progress)
        (out / "SOURCE.txt").write_text(
            "Shaped like intfloat/e5-mistral-7b-instruct: its config, Mistral-7B-v0.1's tokenizer (mistral-common "
            f"{TOKENIZER_MEMBER}, sha256 {TOKENIZER_SHA256}) with E5's tokenizer_config.json and a '{post_processor}' "
            f"post-processor, random fp16 weights (normal std {INIT_STD}, norms 1, seed {seed}). Not a trained model.\n")
        if target.exists():  # another process finished first
            return target
        os.replace(out, target)
    return target

