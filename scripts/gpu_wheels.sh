#!/usr/bin/env bash
# Here (with the network), before a GPU session: the wheels the GPU machine lacks, into .whl/ (git-ignored, ~62 MB).
# The GPU image (python 3.12, torch 2.11 cu130, transformers 5.17, peft, accelerate) has no bitsandbytes, and
# nothing can be fetched there; transformers is carried too so both machines run the same 5.24 API, and the
# server's stack (FastAPI, uvicorn, httpx, pydantic, prometheus_client) for gpu_check's server throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl bitsandbytes==0.50.2 transformers==5.24.0 \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11 httpx==0.28.1 httpcore anyio sniffio idna certifi \
  pydantic==2.14.4 pydantic-core typing-inspection annotated-types annotated-doc typing-extensions click opentelemetry-api prometheus_client
ls -la .whl
