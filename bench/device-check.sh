#!/usr/bin/env bash
# The GPU check in ONE device call (under 8 minutes): bench/device_check.py, one JSON under $OUT.
#   On the device machine, from the repository root, with the wheels of bench/gpu.md in .whl/ (carry: [".whl"]):
#     bash bench/device-check.sh
# Without CUDA it stops at once with exit 3 and one line saying why (tests/test_device_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-${1:-bench/results}}"
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null || {
  echo "device-check: no CUDA GPU visible to torch here: run it on a lent GPU machine (bench/gpu.md); nothing was run" >&2
  exit 3
}
if compgen -G ".whl/*.whl" >/dev/null; then  # the packages the device image lacks (trl, bitsandbytes, unsloth, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
timeout 470 python3 bench/device_check.py "$out"
