"""Command line: `lowmem-e5 encode | reference | drift | scan | compare | repair | retrieval | finetune | plan |
quantize | serve | env | tasks | build-default-model`. Each command group registers its own subcommands; `main`
maps errors to exit codes."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import LowmemError
from ..terminal import configure_cli_output
from . import encode, finetune, plan, quality, quantize, retrieval, serve, vectors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowmem-e5", description="E5-Mistral embeddings in 8-bit or 4-bit.")
    parser.add_argument("--version", action="version", version=f"lowmem-e5 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_commands in (encode.add_commands, vectors.add_commands, quality.add_commands, retrieval.add_commands,
                         finetune.add_commands, plan.add_commands, quantize.add_commands, serve.add_commands,
                         encode.add_environment_commands):
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_cli_output()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LowmemError, ValueError) as exc:
        print(f"lowmem-e5: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowmem-e5: interrupted; finished chunks are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
