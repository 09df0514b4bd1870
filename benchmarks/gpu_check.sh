#!/usr/bin/env bash
# The lent GPU's whole check in one command (docs/performance.md, "GPU check"). From this
# session's machine, with the wheels prepared by benchmarks/gpu_wheels.sh:
#   device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 480
# There: Python 3.12 with the image's jax 0.11 + CUDA, no internet. The carried wheels (if any)
# go first on the path; the repository is imported from the working tree (no install). The
# report lands in $OUT (the device tool brings it back), else in ./gpu_check_out.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version \
  --format=csv >"$out/nvidia-smi.csv" 2>&1 || true
# Stopped here a little before the device call's limit, so that tee still writes the log.
timeout "${GPU_CHECK_TIMEOUT_S:-450}" python3 benchmarks/gpu_check.py --out "$out" "$@" 2>&1 |
  tee "$out/gpu_check.log"
