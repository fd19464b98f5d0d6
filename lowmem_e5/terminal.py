"""What reaches the user's terminal: our own lines and progress bars.

Other packages' notices that a user cannot act on are filtered by message at package import, for every entry point
(CLI, library, scripts), before transformers, peft or our own code imports the packages that log them: bitsandbytes'
cast notice and its missing optional kernel package, torchao's CUDA libraries that cannot load on a CPU (transformers
imports torchao whenever it is installed, as the `[gptq]` extra installs it), torch's deprecation of torchao's enum
registration. Other messages of those loggers still pass.

The CLI goes further (`configure_cli_output`): our lines carry the `lowmem-e5:` prefix, other packages' log records
reach the terminal only at ERROR, their Python warnings and transformers' loading bars are off.
`LOWMEM_E5_VERBOSE=1` shows them all again, for a bug report.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "LOWMEM_E5_VERBOSE"
PREFIX = "lowmem-e5: "


class DropMessagesStartingWith(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


class DropMessagesContaining(logging.Filter):
    def __init__(self, part: str) -> None:
        super().__init__()
        self.part = part

    def filter(self, record: logging.LogRecord) -> bool:
        return self.part not in str(record.msg)


KNOWN_NOTICES: dict[str, logging.Filter] = {
    # Every int8 matmul logs that fp32 inputs are cast to fp16: expected, not actionable.
    "bitsandbytes.autograd._functions": DropMessagesStartingWith("MatMul8bitLt: inputs will be cast"),
    # On AVX512-BF16 CPUs, importing bitsandbytes tries the optional `kernels` package (which fetches code from the
    # hub at run time) and logs that it is missing; its built-in fallback kernel is the one we want.
    "bitsandbytes.backends.cpu.ops": DropMessagesStartingWith(
        "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # torchao's CUDA extensions (mxfp8, cutlass) cannot load without CUDA; nothing of ours uses them.
    "torchao": DropMessagesStartingWith("Failed to load "),
    "torchao.kernel.intmm": DropMessagesStartingWith("Warning: Detected no triton"),
    # torchao registers enums with torch's pytree, which torch 2.13 deprecates (torchao's to change, not the user's).
    "torch.utils._pytree": DropMessagesContaining("Calling register_constant() on Enum subclasses is deprecated"),
}


def install_notice_filters() -> None:
    for name, notice_filter in KNOWN_NOTICES.items():
        logger = logging.getLogger(name)
        if notice_filter not in logger.filters:
            logger.addFilter(notice_filter)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _ForeignRecords(logging.Filter):
    """Other packages' records reach the terminal at ERROR and above (prefixed with their logger), ours at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "lowmem_e5" or record.name.startswith("lowmem_e5."):
            return True
        record.msg = f"[{record.name}] {record.msg}"
        return record.levelno >= logging.ERROR or verbose()


def configure_cli_output() -> None:
    """Called once by the CLI's main, before any command imports the heavy packages."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
    handler.addFilter(_ForeignRecords())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("lowmem_e5").setLevel(logging.INFO)
    if verbose():
        return
    # Python warnings of other packages (deprecations in transformers' own calls, for example): not the user's to fix.
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"lowmem_e5(\.|$)")
    # torch logs through handlers of its own ("W1206 ... file.py:630] ..."), not through the root logger.
    logging.getLogger("torch").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers' "Loading weights" bar: our "loading ..." line stands before the load and "loaded ..." after it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        quiet_transformers()


def quiet_transformers() -> None:
    """transformers' logging and its loading bars, once transformers is imported (its env variables are read at
    import; this covers the case where it was imported first)."""
    if verbose() or os.environ.get("TRANSFORMERS_VERBOSITY") != "error":
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
