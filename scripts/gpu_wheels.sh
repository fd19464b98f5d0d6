#!/usr/bin/env bash
# Here (with the network), before a GPU session: the wheels the GPU machine lacks, into .whl/ (git-ignored, ~62 MB).
# The GPU image (python 3.12, torch 2.11 cu130, transformers 5.17, peft, accelerate) has no bitsandbytes, and
# nothing can be fetched there; transformers is carried too so both machines run the same 5.24 API, and the
# server's stack (FastAPI, uvicorn, httpx, pydantic, prometheus_client) for gpu_check's server throughput, and the
# [gptq] extra's packages the image lacks (optimum, gptqmodel and its small dependencies; the image has pyarrow and
# threadpoolctl). gptqmodel 7.6.0 and four of its dependencies are sdists: built here into pure-Python wheels; pypcre
# compiles C, so its sdist travels and is built there (the image has cmake, ninja, setuptools and a compiler).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl bitsandbytes==0.50.2 transformers==5.24.0 \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11 httpx==0.28.1 httpcore anyio sniffio idna certifi \
  pydantic==2.14.4 pydantic-core typing-inspection annotated-types annotated-doc typing-extensions click opentelemetry-api prometheus_client \
  optimum==2.3.0 dill==0.4.1
python3 -m pip wheel --quiet --no-deps -w .whl gptqmodel==7.6.0 tokenicer==0.0.14 device-smi==0.5.7 logbar==0.4.15 \
  defuser==0.0.28
mkdir -p .whl/sdist
python3 - <<'PY'  # the sdist itself (pip download would build its metadata, compiling cmake from source here)
import json, urllib.parse, urllib.request
index = "https://pypi.org/pypi/pypcre/json"
project = json.load(urllib.request.urlopen(index))
sdist = next(u for u in project["releases"]["0.6.4"] if u["packagetype"] == "sdist")
urllib.request.urlretrieve(urllib.parse.urljoin(index, sdist["url"]), ".whl/sdist/" + sdist["filename"])
PY
# E5-Mistral's real tokenizer, converted here (the GPU machine has neither mistral-common nor sentencepiece):
# gpu_check.py builds the full-size folder there with --tokenizer-from .whl/e5-tokenizer
rm -rf .whl/e5-tiny .whl/e5-tokenizer
python3 -m lowmem_e5 build-full-size-model --tiny --output .whl/e5-tiny
mkdir -p .whl/e5-tokenizer
cp .whl/e5-tiny/tokenizer.model .whl/e5-tiny/tokenizer.json .whl/e5-tiny/tokenizer_config.json \
  .whl/e5-tiny/special_tokens_map.json .whl/e5-tokenizer/
rm -rf .whl/e5-tiny
ls -la .whl .whl/sdist
du -sb .whl  # carried with the working tree: under 64 MiB in all
