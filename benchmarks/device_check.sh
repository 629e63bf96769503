#!/usr/bin/env bash
# The prepared run for the day a CUDA GPU is lent (about 8 minutes on an H100/H200): every Triton kernel's
# bit-exactness test compiled for the GPU, then the two benchmarks. Results go to $OUT (default
# benchmarks/results/cuda), with the device named in each JSON.
#
#     bash benchmarks/device_check.sh            # in a checkout with the package and triton installed
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/cuda}"
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
# the kernels against the PyTorch reference, bit for bit, on CUDA (tests/conftest.py sets the interpreter
# only without a GPU; the compiled engine is a CPU engine, tested by CI); then a short QAT run per family on
# either backend
# (a failure is recorded and the benchmarks still run: the device time is not spent twice)
timeout 240 python -m pytest -q tests/kernels -p no:cacheprovider --ignore=tests/kernels/test_compiled_engine.py > "$OUT/kernel_tests.txt" 2>&1 || echo "kernel tests FAILED: $OUT/kernel_tests.txt"
tail -3 "$OUT/kernel_tests.txt"
timeout 120 python benchmarks/kernel_speed.py --shapes real --dtype bf16 --out "$OUT/kernels.json" || echo "kernel_speed.py failed"
# every family and file type, the ggml ones included (their per-weight passes are Triton kernels on CUDA)
timeout 150 python benchmarks/step_overhead.py --model qwen3-moe-gpu --all-formats --out "$OUT/step_overhead.json" || echo "step_overhead.py failed"
