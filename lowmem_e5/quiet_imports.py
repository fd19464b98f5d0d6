"""Imports that would change the process: done only when needed, with the process left as it was.

gptqmodel's import repoints HF_HOME and the hub caches at a folder of its own (/tmp/tokenicer_hf_home), sets
allocator variables, lowers the root logger to INFO, and prints a banner and WARN/INFO lines on stdout and stderr.
peft imports it whenever it builds LoRA layers, if it is installed; `import_peft` makes peft import it only where a
model can hold gptqmodel's layers, that is once it has been imported (by runtime.gptq, through
`import_keeping_environment`). Its own module: default_model and the wings call it, and it imports neither.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys

from .terminal import verbose


def import_keeping_environment(*modules: str) -> None:
    """Import modules with the environment and the root logger's level as they were, and what they print on import
    kept off the terminal (shown with LOWMEM_E5_VERBOSE=1). ImportError propagates."""
    env, root_level = dict(os.environ), logging.getLogger().level
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            for name in modules:
                importlib.import_module(name)
    finally:
        os.environ.clear()
        os.environ.update(env)
        logging.getLogger().setLevel(root_level)
        if verbose():
            sys.stderr.write(printed.getvalue())
        elif "gptqmodel" in sys.modules:
            logging.getLogger("logbar").setLevel(logging.ERROR)  # gptqmodel's INFO/WARN lines while it quantises


def import_peft() -> None:
    """Import peft with its gptqmodel check answering "imported" rather than "installed".

    A model holds gptqmodel's layers only once gptqmodel is imported, so the answer is the same for every model
    peft can see, and an adapter on an nf4 or int8 base no longer imports gptqmodel (and torchao, its banner, and its
    changes to the environment) for nothing. peft's modules bind the check by name, so each binding is replaced."""
    import peft  # noqa: F401  (imports the tuners and utils that bind the check)
    import peft.import_utils

    original = peft.import_utils.is_gptqmodel_available
    if getattr(original, "lowmem_e5_patched", False):
        return

    def is_gptqmodel_imported() -> bool:
        return "gptqmodel" in sys.modules and original()

    is_gptqmodel_imported.lowmem_e5_patched = True
    for name, module in list(sys.modules.items()):
        if (name == "peft" or name.startswith("peft.")) and getattr(module, "is_gptqmodel_available", None) is original:
            module.is_gptqmodel_available = is_gptqmodel_imported
