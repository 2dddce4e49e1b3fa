#!/usr/bin/env bash
# The first run on a GPU, every figure the README lacks, in under 8 minutes on one GPU:
#   1. what --precision auto picks there;
#   2. the precision guard: verdict and PSNR against fp32 for fp16 and bf16, its cost per batch;
#   3. GPEN-BFR-256/512 forward faces/s per batch size, peak memory and share of the matmul peak, fp32/fp16/bf16;
#   4. end to end at 1080p with one and four faces (benchmarks/run.py: fps, faces/s, peak memory);
#   5. the upscaler networks' frames/s on SD frames, per precision, and their peak memory;
#   6. the precision tests on that machine.
#
#     bash benchmarks/gpu_check.sh              # from the repository root, in gpen-video's venv
#     bash benchmarks/gpu_check.sh --quick      # 256 only, fewer batch sizes, no 1080p rows: a minute or two
#     bash benchmarks/gpu_check.sh --cpu-smoke  # every step on the CPU at toy sizes: proves the commands work
#
# Without CUDA (and without --cpu-smoke) it says so and exits 0 after step 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MODE=${1:-full}

step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "device and what --precision auto picks"
"$PYTHON" - <<'PY'
import torch
from gpen_video.device import device_name, has_native_bf16, resolve_device, resolve_dtype, safe_dtype
device = resolve_device("auto")
print(f"torch {torch.__version__}, device {device}: {device_name(device)}")
print(f"native bf16: {has_native_bf16(device)}; auto -> {resolve_dtype('auto', device)}; "
      f"fallback when half precision fails its check -> {safe_dtype(device)}")
PY

DEVICE=cuda
case "$MODE" in
    full)  PRESETS=GPEN-BFR-256,GPEN-BFR-512; BATCHES=1,4,16,64; HALF=fp16,bf16; PRECISIONS=fp32,fp16,bf16
           E2E=(--size 1920x1080 --seconds 4 --faces 1,4); UPSCALE=(--size 720x576 --frames 16) ;;
    --quick) PRESETS=GPEN-BFR-256; BATCHES=1,16; HALF=fp16,bf16; PRECISIONS=fp32,fp16,bf16
           E2E=(); UPSCALE=(--size 720x576 --frames 8) ;;
    --cpu-smoke) DEVICE=cpu; PRESETS=GPEN-BFR-256; BATCHES=1; HALF=bf16; PRECISIONS=bf16
           E2E=(--size 192x128 --seconds 0.4 --faces 1 --preset ultrafast)
           UPSCALE=(--size 48x32 --frames 1 --precisions bf16 --upscalers realesr-animevideov3) ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--quick | --cpu-smoke]" >&2; exit 2 ;;
esac

if [[ "$DEVICE" == cuda ]]; then
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "no CUDA device: the GPU parts are skipped"
        exit 0
    fi
    "$PYTHON" - <<'PY'
import torch
print(torch.cuda.get_device_name(0), "sm_%d%d" % torch.cuda.get_device_capability(0),
      "%.1f GiB" % (torch.cuda.get_device_properties(0).total_memory / 2**30))
PY
fi

step "precision guard: verdict, PSNR against fp32, load cost, per-batch cost, faces/s, peak memory"
timeout 100 "$PYTHON" benchmarks/bench_precision.py --device "$DEVICE" --presets "$PRESETS" --precisions "$HALF" \
    --batches "$BATCHES" --iters 10 || echo "bench_precision: exit $? (1: the guard took >= 1 % of a batch)"

step "GPEN forward faces/s per batch size, fp32/fp16/bf16, NCHW and channels-last, share of the matmul peak"
timeout 120 "$PYTHON" benchmarks/bench_model.py --device "$DEVICE" --presets "$PRESETS" --precision "$PRECISIONS" \
    --batches "$BATCHES" --iters 10 --warmup 2 --no-grouped || echo "bench_model: exit $?"

if (( ${#E2E[@]} )); then
    step "end to end: I/O, model, no faces, one and four faces (fps, faces/s, e2e/(model+io), peak memory)"
    timeout 150 "$PYTHON" benchmarks/run.py --part pipeline --device "$DEVICE" "${E2E[@]}" --long-seconds 0 \
        || echo "run.py: exit $?"
fi

step "upscaler networks: frames/s per precision, peak memory"
timeout 60 "$PYTHON" benchmarks/bench_upscale_speed.py --device "$DEVICE" "${UPSCALE[@]}" \
    || echo "bench_upscale_speed: exit $?"

if [[ "$DEVICE" == cuda ]]; then
    step "the precision tests on this machine"
    timeout 60 "$PYTHON" -m pytest -q -x tests/test_precision.py -p no:cacheprovider || echo "tests: exit $?"
fi
step "done"
