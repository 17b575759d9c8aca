#!/usr/bin/env bash
# Set up what is missing, and nothing else: a virtual environment in .venv,
# PyTorch (the build this project is tested with), and the app with its dev
# extras. Idempotent: a second run with nothing changed takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PY="$VENV/bin/python"

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  case "$(uname -m)" in
    aarch64|arm64) "$PY" -m pip install --quiet torch==2.9.1 torchvision==0.24.1 ;;
    *)             "$PY" -m pip install --quiet torch==2.14.1 torchvision==0.29.1 ;;
  esac
fi

# Reinstall the app only when its dependency declaration changed.
stamp="$VENV/.afl-flwr-installed"
digest=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] \
   || ! "$PY" -c "import afl_flwr, flwr, pytest" 2>/dev/null; then
  "$PY" -m pip install --quiet -e ".[dev]"
  echo "$digest" > "$stamp"
fi
