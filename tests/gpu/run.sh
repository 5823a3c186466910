#!/usr/bin/env bash
# The GPU suite in one call on the lent GPU machine (its image lacks Ray and DeepSpeed; README "GPU"):
#   here:  make gpu-bundle                        (the wheels it lacks, in the git-ignored .whl/, ~37 MiB)
#   there: run(command="bash tests/gpu/run.sh", carry=[".whl"], timeout_s=540)
# installs .whl/ into /tmp/site (fails loudly), then runs tests/gpu/check.py, which writes every finished row
# to ${OUT:-.}/gpu-check.json at once. Extra arguments go to check.py: `--rerun-failed` reruns only the rows
# of that file that did not pass (on the same warm machine, or after copying the file back). Exit 77 without
# CUDA, 1 when the bundle cannot be installed or a row did not pass.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
out=${OUT:-.}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "tests/gpu/run.sh: no CUDA device here: the GPU suite needs one" >&2
  exit 77
fi
if [ -d .whl ]; then
  "$PY" tests/gpu/bundle.py install --dir .whl --target /tmp/site || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
elif ! "$PY" -c 'import ray, deepspeed' 2>/dev/null; then
  echo "tests/gpu/run.sh: ray or deepspeed missing and no .whl/ bundle: run 'make gpu-bundle' and carry .whl" >&2
  exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
state=/tmp/rayprune-gpu-check.json  # $OUT is emptied before each call; this survives on a warm machine
[ -f "$state" ] && cp "$state" "$out/gpu-check.json"
timeout 450 "$PY" tests/gpu/check.py --out "$out/gpu-check.json" --allow-skip two-ranks-one-gpu "$@"
status=$?
cp "$out/gpu-check.json" "$state" 2>/dev/null
exit $status
