#!/usr/bin/env bash
# Prepares, on a machine with Rust and network access, what scripts/gpu-check.sh
# needs on a GPU machine that has neither: dist/gpu-bundle/ with the abi3 wheel,
# the Rust GPU test executables, and wheels of the test and benchmark
# dependencies for an offline install (Python 3.12, Linux x86-64; override with
# GPU_PYTHON_VERSION). Copy the checkout with dist/ to the GPU machine and run
# `bash scripts/gpu-check.sh` there.
set -euo pipefail
source "$(dirname "$0")/setup.sh"

BUNDLE=dist/gpu-bundle
PYVER="${GPU_PYTHON_VERSION:-3.12}"
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/rust-tests" "$BUNDLE/wheels"

echo "==> the moe-offload wheel"
cp dist/moe_offload-*.whl "$BUNDLE/"

echo "==> the Rust GPU tests (release build)"
cargo test --release --no-run --message-format=json \
    -p moe-offload-cuda --test gpu -p moe-offload-core --test cuda_cache 2>/dev/null |
    "$VENV/bin/python" -c '
import json, shutil, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and message["target"]["kind"] == ["test"]:
        shutil.copy(message["executable"], sys.argv[1] + "/" + message["target"]["name"])
        print("   ", message["target"]["name"])
' "$BUNDLE/rust-tests"

# Pure wheels or manylinux ones for the GPU machine's Python, without their
# dependencies (torch and transformers are there already; the rest is listed).
echo "==> wheels of the test and benchmark dependencies for Python $PYVER"
"$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$PYVER" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --implementation cp -d "$BUNDLE/wheels" \
    pytest iniconfig pluggy packaging pygments pytest-benchmark py-cpuinfo hypothesis sortedcontainers \
    attrs accelerate psutil pyyaml matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing \
    python-dateutil six
du -sh "$BUNDLE"
