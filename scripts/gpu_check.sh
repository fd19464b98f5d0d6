#!/usr/bin/env bash
# One prepared run for a session that is lent the GPU machine (under 8 minutes), where nothing can be fetched.
#   here:        bash scripts/gpu_wheels.sh                       (once: .whl/ with bitsandbytes + transformers)
#   device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#   -> $OUT/gpu_check.json (or calibration/results/gpu_check.json without $OUT) and a table on stdout
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
  for sdist in .whl/sdist/*.tar.gz; do  # gptqmodel's C dependency: built here; gptq4 is skipped if it fails
    [ -e "$sdist" ] || continue
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site "$sdist" \
      || echo "could not build $sdist: gptq4 will report the import error"
  done
else
  export PYTHONPATH="$PWD"  # a machine that already has the packages (pip install -e . there)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'cuda', torch.cuda.is_available())"
out_dir="${OUT:-calibration/results}"
# the full-size folder is built on the GPU machine's disk (14.2 GB, about a minute) and loaded per mode as users do
timeout 450 python3 scripts/gpu_check.py --budgets 4096,16384,65536 --repeats 3 --out "$out_dir/gpu_check.json" \
  --folder /tmp/e5-mistral-7b-random --tokenizer-from .whl/e5-tokenizer
