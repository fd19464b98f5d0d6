"""bitsandbytes' log lines that are expected here and not actionable by a user, filtered before it is first imported.

Imported by the package's `__init__`, so that every entry point (CLI, library, scripts) installs the filters before
transformers, peft or our own code imports bitsandbytes. Filters sit on bitsandbytes' named loggers; other messages
of those loggers still pass.
"""

from __future__ import annotations

import logging


class _DropMessagesStartingWith(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# Every int8 matmul logs that fp32 inputs are cast to fp16: expected, not actionable.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    _DropMessagesStartingWith("MatMul8bitLt: inputs will be cast"))
# On AVX512-BF16 CPUs, importing bitsandbytes tries the optional `kernels` package (which fetches code from the hub
# at run time) and logs that it is missing; its built-in fallback kernel is the one we want.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessagesStartingWith("Failed to load CPU gemm_4bit_forward from kernels-community"))
