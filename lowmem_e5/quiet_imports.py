"""Imports that would change the process: done once, with the process left as it was.

gptqmodel's import repoints HF_HOME and the hub caches at a folder of its own (/tmp/tokenicer_hf_home), sets
allocator variables, lowers the root logger to INFO and prints a banner on stdout; peft imports it whenever it builds
LoRA layers, so after loading an adapter a hub model would be looked for in the wrong cache, and a command's JSON on
stdout would start with the banner. Its own module: default_model and the wings call it, and it imports neither.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys


def import_keeping_environment(*modules: str) -> None:
    """Import modules with the environment, the root logger's level and stdout as they were (what they print goes
    to stderr). ImportError propagates."""
    env, root_level = dict(os.environ), logging.getLogger().level
    try:
        with contextlib.redirect_stdout(sys.stderr):
            for name in modules:
                importlib.import_module(name)
    finally:
        os.environ.clear()
        os.environ.update(env)
        logging.getLogger().setLevel(root_level)


def import_gptqmodel_quietly() -> None:
    """Before anything peft does: import gptqmodel, if installed, keeping the process as it was."""
    if "gptqmodel" not in sys.modules and importlib.util.find_spec("gptqmodel") is not None:
        import_keeping_environment("gptqmodel")
