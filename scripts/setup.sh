# Shared by demo.sh and test.sh: a virtual environment with the runtime and
# test dependencies, and moe-offload itself installed from the abi3 wheel
# that `maturin build --release` produces (what `pip install` users get).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${MOE_OFFLOAD_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch>=2.4" "transformers>=5.0" "safetensors>=0.4" "numpy>=1.24" \
    "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6" "accelerate>=0.30" "matplotlib>=3.5" "maturin>=1.7,<2" "ruff>=0.6"

rm -rf dist
"$VENV/bin/maturin" build --release --quiet --out dist --interpreter "$PY"
"$PY" -m pip install --quiet --force-reinstall --no-deps dist/moe_offload-*.whl
