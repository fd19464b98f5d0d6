"""One result record per run, the same shape everywhere: run / quality / memory / speed / environment."""

from __future__ import annotations

import platform
import re
import sys
import time

import torch

from .environment import cpu, package_versions


def mode_label(quant: str, double_quant: bool = False, plan: str | None = None,
               group_size: int | None = None) -> str:
    label = f"{quant}+dq" if double_quant else f"{quant}-g{group_size}" if group_size else quant
    return f"{label}:{plan}" if plan else label


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def environment() -> dict:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpu": cpu(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "packages": package_versions()}


def result_record(*, run: dict, quality: dict | None = None, memory: dict | None = None,
                  speed: dict | None = None) -> dict:
    return {"run": {**run, "argv": sys.argv, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "quality": quality or {}, "memory": memory or {}, "speed": speed or {}, "environment": environment()}
