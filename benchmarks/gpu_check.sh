#!/usr/bin/env bash
# The first run on a GPU: what --precision auto picks there, the precision guard's verdict and
# PSNR against fp32 for fp16 and bf16, the guard's cost per batch, and GPEN-BFR-256/512 faces/s
# per batch size and peak memory in fp32/fp16/bf16. Under 8 minutes on one GPU.
#
#     bash benchmarks/gpu_check.sh            # from the repository root, in gpen-video's venv
#     bash benchmarks/gpu_check.sh --quick    # 256 only, fewer batch sizes: about a minute
#
# Without CUDA it says so and exits 0 after the CPU-safe part (the auto choice).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1

step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "device and what --precision auto picks"
"$PYTHON" - <<'EOF'
import torch
from gpen_video.device import device_name, has_native_bf16, resolve_device, resolve_dtype, safe_dtype
device = resolve_device("auto")
print(f"torch {torch.__version__}, device {device}: {device_name(device)}")
print(f"native bf16: {has_native_bf16(device)}; auto -> {resolve_dtype('auto', device)}; "
      f"fallback when half precision fails its check -> {safe_dtype(device)}")
EOF

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device: the GPU parts are skipped"
    exit 0
fi
"$PYTHON" - <<'EOF'
import torch
print(torch.cuda.get_device_name(0), "sm_%d%d" % torch.cuda.get_device_capability(0),
      "%.1f GiB" % (torch.cuda.get_device_properties(0).total_memory / 2**30))
EOF

if (( QUICK )); then PRESETS=GPEN-BFR-256; BATCHES=1,16; else PRESETS=GPEN-BFR-256,GPEN-BFR-512; BATCHES=1,4,16,64; fi

step "precision guard: verdict, PSNR against fp32, load cost, per-batch cost, faces/s, peak memory"
timeout 150 "$PYTHON" benchmarks/bench_precision.py --device cuda --presets "$PRESETS" --precisions fp16,bf16 \
    --batches "$BATCHES" --iters 10 || echo "bench_precision: exit $? (1: the guard took >= 1 % of a batch)"

step "GPEN forward faces/s per batch size, fp32/fp16/bf16, NCHW and channels-last, share of the matmul peak"
timeout 200 "$PYTHON" benchmarks/bench_model.py --device cuda --presets "$PRESETS" --precision fp32,fp16,bf16 \
    --batches "$BATCHES" --iters 10 --warmup 2 --no-grouped || echo "bench_model: exit $?"

step "the precision tests on this machine"
timeout 90 "$PYTHON" -m pytest -q -x tests/test_precision.py -p no:cacheprovider || echo "tests: exit $?"
step "done"
