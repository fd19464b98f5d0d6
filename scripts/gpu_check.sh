#!/usr/bin/env bash
# One prepared run for a session that is lent the GPU machine (under 8 minutes): install, check, measure.
#   bash scripts/gpu_check.sh            -> calibration/results/gpu_check.json and a table on stdout
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .venv-gpu ]; then
  python3 -m venv .venv-gpu
  . .venv-gpu/bin/activate
  pip install --quiet --upgrade pip
  pip install --quiet torch            # the CUDA build on the GPU machine
  pip install --quiet -e .
else
  . .venv-gpu/bin/activate
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -m lowmem_e5 env | head -40
timeout 420 python scripts/gpu_check.py --budgets 4096,16384,65536 --repeats 3
