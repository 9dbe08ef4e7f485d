# Shared by demo.sh and test.sh: a virtual environment with the runtime and
# test dependencies, and moe-offload itself installed from the abi3 wheel
# that `maturin build --release` produces (what `pip install` users get).
# Prints a line per step on stderr: the first run downloads several GB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { echo "setup: $*" >&2; }
fail() {
    echo "setup: $*" >&2
    exit 1
}

VENV="${MOE_OFFLOAD_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    command -v python3 >/dev/null || fail "python3 not found: install Python 3.10 or newer"
    python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
        fail "$(python3 -V 2>&1) cannot create a virtual environment: install Python 3.10 or newer with venv (Debian/Ubuntu: apt install python3-venv)"
    step "creating $VENV"
    python3 -m venv "$VENV"
fi
command -v cargo >/dev/null || fail "cargo not found: install a Rust toolchain (https://rustup.rs) to build the wheel"
PY="$VENV/bin/python"

step "updating pip"
"$PY" -m pip install --quiet --upgrade pip
# PyPI serves torch's CUDA build, with NVIDIA's libraries.
step "installing torch, transformers, safetensors, numpy, accelerate, matplotlib and the test tools" \
    "(about 3 GB to download and 6 GB on disk the first time; later runs only check them)"
"$PY" -m pip install --quiet "torch>=2.4" "transformers>=5.0" "safetensors>=0.4" "numpy>=1.24" \
    "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6" "accelerate>=0.30" "matplotlib>=3.5" "maturin>=1.7,<2" "ruff>=0.6" \
    "fastapi>=0.115" "uvicorn>=0.30" "openai>=1.0" "httpx>=0.27" "ray[serve]>=2.10"

step "building the wheel (cargo, release build; a few minutes the first time)"
rm -rf dist
"$VENV/bin/maturin" build --release --quiet --out dist --interpreter "$PY"
step "installing the wheel into $VENV"
"$PY" -m pip install --quiet --force-reinstall --no-deps dist/moe_offload-*.whl
step "done"
