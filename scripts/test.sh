#!/usr/bin/env bash
# Installs everything and runs every test: lints, the Rust unit tests (no
# Python, no CUDA needed), then the Python suite against the installed wheel.
set -euo pipefail
source "$(dirname "$0")/setup.sh"

cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo clippy --workspace --all-targets --features moe-offload-core/python --quiet -- -D warnings
cargo test --workspace --quiet
"$VENV/bin/ruff" check python tests benches
"$VENV/bin/ruff" format --check python tests benches

# Run from tests/ so the source tree's python/ can never shadow the wheel.
"$VENV/bin/python" -m pytest -q "$@"
MOE_OFFLOAD_SOAK_GENERATES=300 "$VENV/bin/python" -m pytest -q -m soak tests/test_slots.py  # the soak test, longer
