"""The end-to-end benchmark, as a script: the same as `moe-offload bench`.

.venv/bin/python benches/e2e.py --model deepseek-v2-lite --trace TRACES/deepseek-v2-lite/... --out DIR
"""

from __future__ import annotations

import sys

from moe_offload.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
