#!/usr/bin/env bash
# Installs everything and runs the demo: a small random Mixtral-style model,
# offloaded with a device budget of a quarter of its experts.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
echo "running the demo (moe-offload demo --help lists its options)" >&2
"$VENV/bin/moe-offload" demo "$@"
