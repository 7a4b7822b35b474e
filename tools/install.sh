#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install megakto into it.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGAKTO_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==${MEGAKTO_TORCH:-2.13.0}"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
echo "megakto installed in $VENV"
