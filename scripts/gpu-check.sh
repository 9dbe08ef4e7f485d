#!/usr/bin/env bash
# The first run on a CUDA GPU: the GPU tests (Rust and Python), the copy
# microbenchmark against a plain pinned copy, and the end-to-end benchmark on
# the DeepSeek-V2-Lite shape (8 of its MoE layers, bf16, real routing when the
# traces are at hand), then again with int8 and int4 experts. Prints each step; stops at the first failure with a line
# naming it. Results go under OUT (default benches/results) as gpu-*.
#
# Needs Python with torch (CUDA) and transformers, and dist/gpu-bundle/ from
# scripts/gpu-bundle.sh (no Rust toolchain or network needed here). Usage:
#   bash scripts/gpu-check.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="$(mkdir -p "${1:-benches/results}" && cd "${1:-benches/results}" && pwd)"
BUNDLE=dist/gpu-bundle
VENV=.venv-gpu
STARTED=$SECONDS
CURRENT="setting up"
trap 'echo "gpu-check: FAILED at: $CURRENT (after $((SECONDS - STARTED)) s)" >&2' ERR

step() {
    CURRENT="$1"
    echo
    echo "==> [$((SECONDS - STARTED)) s] $CURRENT"
}

step "checking for a CUDA device"
[ -d "$BUNDLE" ] || { echo "no $BUNDLE: run scripts/gpu-bundle.sh on a machine with Rust first" >&2; false; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'

step "installing moe-offload and the test dependencies offline into $VENV (torch and transformers from the system)"
python3 -m venv --system-site-packages "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --no-index --find-links "$BUNDLE/wheels" \
    pytest pytest-benchmark hypothesis accelerate matplotlib
"$PY" -m pip install --quiet --no-index --no-deps --force-reinstall "$BUNDLE"/moe_offload-*.whl
"$PY" -c 'import moe_offload, transformers; print("moe-offload", moe_offload.__version__, "transformers", transformers.__version__)'

for test in "$BUNDLE"/rust-tests/*; do
    step "Rust GPU tests: $(basename "$test") --ignored"
    "$test" --ignored --test-threads 1
done

step "Python GPU tests (pytest -m gpu)"
# Run from tests/ so the checkout's python/ cannot shadow the installed wheel.
(cd tests && "../$PY" -m pytest -q -m gpu -p no:cacheprovider .)

step "copy microbenchmark: the engine against a plain pinned cudaMemcpyAsync"
"$PY" -m pytest -q -p no:cacheprovider benches/bench_copy.py --benchmark-only \
    --benchmark-json "$OUT/gpu-micro-copy.json"

TRACES="${MOE_OFFLOAD_TRACES:-../shared/traces}"
TRACE_ARGS=()
if [ -d "$TRACES/deepseek-v2-lite/puffin_prompts_0001-1000" ]; then
    TRACE_ARGS=(--trace "$TRACES/deepseek-v2-lite/puffin_prompts_0001-1000")
else
    echo "(no routing traces at $TRACES: the benchmark's routers choose for themselves)"
fi
step "end-to-end benchmark, DeepSeek-V2-Lite shape (8 MoE layers, bf16)"
"$VENV/bin/moe-offload" bench --model deepseek-v2-lite --device cuda --dtype bfloat16 --layers 8 \
    --requests 2 --warmup-requests 2 --new-tokens 16 --sweep 0.25 1.0 "${TRACE_ARGS[@]}" \
    --out "$OUT/gpu-e2e-deepseek-v2-lite"

step "end-to-end benchmark, quantized experts (int8, int4) at a quarter of the bf16 expert bytes"
"$VENV/bin/moe-offload" bench --model deepseek-v2-lite --device cuda --dtype bfloat16 --layers 8 \
    --requests 2 --warmup-requests 2 --new-tokens 16 --sweep 0.25 --quantize int8 int4 \
    --skip-accelerate "${TRACE_ARGS[@]}" --out "$OUT/gpu-e2e-quantized-deepseek-v2-lite"

CURRENT="done"
echo
echo "gpu-check: all steps passed in $((SECONDS - STARTED)) s; results in $OUT/gpu-*"
