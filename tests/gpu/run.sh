#!/usr/bin/env bash
# The GPU suite, one call on a GPU machine (< 8 minutes on one H200): the gpu-marked tests, then the
# check table (tests/gpu/check.py) written to ${OUT:-.}/gpu-check.json. Skips (exit 0) without CUDA.
#
# Packages the machine lacks (Ray, DeepSpeed, ...) are installed from wheels in ./.whl when that
# folder exists (see the README's GPU section); the project itself is put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
out=${OUT:-.}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "tests/gpu/run.sh: no CUDA device here: GPU suite skipped"
  exit 0
fi
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
timeout 240 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider || status=1
timeout 300 "$PY" tests/gpu/check.py --out "$out/gpu-check.json" || status=1
exit $status
