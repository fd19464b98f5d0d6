#!/usr/bin/env bash
# Here (with the network), before a GPU session: the wheels the GPU machine lacks, into .whl/ (git-ignored, ~57 MB).
# The GPU image (python 3.12, torch 2.11 cu130, transformers 5.17, peft, accelerate) has no bitsandbytes, and
# nothing can be fetched there; transformers is carried too so both machines run the same 5.24 API.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl bitsandbytes==0.50.2 transformers==5.24.0
ls -la .whl
