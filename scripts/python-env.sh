#!/usr/bin/env bash
# Creates (once) and prints the Python interpreter of the virtual environment that holds the
# real clients the tests check xpm against: torch, transformers, peft, mergekit, safetensors,
# numpy (tests/python/requirements.txt).
#
#   scripts/python-env.sh          # prints the interpreter's path on its last line
#
# The environment lives in $XPM_PYENV (default ${XDG_CACHE_HOME:-~/.cache}/xpm-pyenv) and is
# reused while tests/python/requirements.txt is unchanged (its sha256 is kept in the
# environment). The first install downloads about 3 GB (torch and its NVIDIA libraries; 7.4 GB
# on disk) and takes about 2 minutes on the reference machine. Exits non-zero, saying why, when
# python3 or the install fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/tests/python/requirements.txt"
ENV_DIR="${XPM_PYENV:-${XDG_CACHE_HOME:-$HOME/.cache}/xpm-pyenv}"
PY="$ENV_DIR/bin/python"
STAMP="$ENV_DIR/.xpm-requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
    && "$PY" -c "import torch, transformers, peft, mergekit, safetensors, numpy" 2> /dev/null; then
    echo "$PY"
    exit 0
fi
command -v python3 > /dev/null || {
    echo "python-env.sh: python3 not found; install Python 3.10+ with venv and pip" >&2
    exit 1
}
echo "python-env.sh: installing the Python test clients into $ENV_DIR (once; ~3 GB download)" >&2
rm -rf "$ENV_DIR"
python3 -m venv "$ENV_DIR" || {
    echo "python-env.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
    exit 1
}
if ! "$PY" -m pip install --quiet --disable-pip-version-check -r "$REQ" >&2; then
    echo "python-env.sh: pip could not install tests/python/requirements.txt into $ENV_DIR" >&2
    echo "python-env.sh: check that PyPI is reachable and that there is ~8 GB of free disk" >&2
    rm -rf "$ENV_DIR"
    exit 1
fi
echo "$want" > "$STAMP"
echo "$PY"
