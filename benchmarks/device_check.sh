#!/usr/bin/env bash
# The prepared run for the day a CUDA GPU is lent: every Triton kernel's bit-exactness test compiled for the GPU,
# then the two benchmarks. Results go to $OUT (default benchmarks/results/cuda), with the device named in each
# JSON; each step has its own time limit, cut to what is left of DEVICE_CHECK_SECONDS (default 420) so that the
# whole script ends on its own inside a caller's limit: a run killed from outside may return nothing at all. A
# failed or stopped step is recorded and the next still runs (the device time is not spent twice).
#
#     bash benchmarks/device_check.sh            # in a checkout with the package and triton installed
#     REHEARSAL=1 bash benchmarks/device_check.sh   # first, on any machine: every step started on the CPU for 25 s
#
# A rehearsal's steps should all end "exit 124" (stopped at their limit) or 0: one that ends sooner with an error
# has a wrong argument or a missing package, found before the GPU's time is spent (the CPU paths only: a
# rehearsal hides any GPU).
set -uo pipefail
[ "${REHEARSAL:-0}" = 1 ] && REHEARSAL=1 || REHEARSAL=""
DEADLINE=$((SECONDS + ${DEVICE_CHECK_SECONDS:-420}))
cd "$(dirname "$0")/.." || exit 1
if [ -n "$REHEARSAL" ]; then OUT="${OUT:-benchmarks/results/rehearsal}"; else OUT="${OUT:-benchmarks/results/cuda}"; fi
mkdir -p "$OUT" || exit 1
export PYTHONUNBUFFERED=1
if [ -n "$REHEARSAL" ]; then
    export CUDA_VISIBLE_DEVICES=""
    : > "$OUT/device.txt"
else
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a GPU')" || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
fi
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
step() {  # step SECONDS NAME COMMAND...: run it for at most SECONDS (and not past the deadline), say how it ended
    local limit=$1 name=$2; shift 2
    local start=$SECONDS left=$((DEADLINE - SECONDS))
    if [ -n "$REHEARSAL" ]; then limit=25; fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then echo "== $name: skipped, the deadline has passed" | tee -a "$OUT/device.txt"; return; fi
    timeout -k 10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/device.txt"
}
# the kernels against the PyTorch reference, bit for bit, on CUDA (tests/conftest.py sets the interpreter only
# without a GPU; the compiled engine is a CPU engine, tested by CI); then a short QAT run per family on either
# backend. pytest-xdist, where installed, compiles the kernels on several CPU cores at once.
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
step 150 "kernel tests" python -m pytest -q tests/kernels -p no:cacheprovider $workers \
    --ignore=tests/kernels/test_compiled_engine.py > "$OUT/kernel_tests.txt" 2>&1
tail -5 "$OUT/kernel_tests.txt"
# every family and file type on the SmolLM2-135M shape (the ggml types' per-weight passes are Triton kernels on
# CUDA), the kernels' throughput, then the mixture of experts on its grouped GEMMs (most wanted first)
step 120 "step_overhead smollm2-135m" python benchmarks/step_overhead.py --model smollm2-135m --all-formats \
    --iters 10 --out "$OUT/step_overhead.json"
step 60 "kernel_speed lsq" python benchmarks/kernel_speed.py --shapes real --dtype bf16 --family lsq --iters 30 \
    --out "$OUT/kernels_lsq.json"
step 45 "step_overhead qwen3-moe-gpu" python benchmarks/step_overhead.py --model qwen3-moe-gpu --experts grouped_mm \
    --all-formats --modes "w4 QAT" "mxfp4 QAT" "nvfp4 QAT" "q4_k_m file" --iters 10 --out "$OUT/step_overhead_moe.json"
for family in mxfp4 nvfp4; do
    step 45 "kernel_speed $family" python benchmarks/kernel_speed.py --shapes real --dtype bf16 --family "$family" \
        --iters 30 --out "$OUT/kernels_$family.json"
done
