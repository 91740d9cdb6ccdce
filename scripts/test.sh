#!/usr/bin/env bash
# Runs xpm's whole test suite. Installs what the tests need first:
#   - Python's `safetensors` and `numpy`, to check that unpacked experts load in Python
#     (skipped with a note when python3/pip are missing, unless XPM_REQUIRE_PYTHON=1).
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v python3 >/dev/null 2>&1; then
  if ! python3 -c "import safetensors, numpy" >/dev/null 2>&1; then
    echo "scripts/test.sh: installing Python test dependencies (safetensors, numpy)" >&2
    python3 -m pip install --quiet --disable-pip-version-check safetensors numpy \
      || python3 -m pip install --quiet --disable-pip-version-check --user safetensors numpy \
      || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages safetensors numpy
  fi
  if python3 -c "import safetensors, numpy" >/dev/null 2>&1; then
    export XPM_REQUIRE_PYTHON=1
  fi
else
  echo "scripts/test.sh: python3 not found; the Python interoperability test will be skipped" >&2
fi

exec cargo test --workspace "$@"
