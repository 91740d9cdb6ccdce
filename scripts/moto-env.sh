#!/usr/bin/env bash
# Creates (once) and prints the `moto_server` executable the S3 registry tests run: moto is a
# real S3 server (it enforces `If-None-Match: *` and `If-Match` on PUT) that runs in-process on
# 127.0.0.1, so tests/registry_s3.rs needs no cloud account.
#
#   scripts/moto-env.sh          # prints moto_server's path on its last line
#
# The environment lives in $XPM_MOTO_ENV (default ${XDG_CACHE_HOME:-~/.cache}/xpm-moto) and is
# reused while the pinned version below is unchanged. The install downloads about 15 MB and
# takes about 30 s. Exits non-zero, saying why, when python3 or the install fails.
set -euo pipefail
SPEC='moto[s3,server]==5.2.6'
ENV_DIR="${XPM_MOTO_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/xpm-moto}"
BIN="$ENV_DIR/bin/moto_server"
STAMP="$ENV_DIR/.xpm-moto-spec"

if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$SPEC" ]]; then
    echo "$BIN"
    exit 0
fi
command -v python3 > /dev/null || {
    echo "moto-env.sh: python3 not found; install Python 3.9+ with venv and pip" >&2
    exit 1
}
echo "moto-env.sh: installing $SPEC into $ENV_DIR (once; ~15 MB download)" >&2
rm -rf "$ENV_DIR"
python3 -m venv "$ENV_DIR" || {
    echo "moto-env.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
    exit 1
}
if ! "$ENV_DIR/bin/pip" install --quiet --disable-pip-version-check "$SPEC" >&2; then
    echo "moto-env.sh: pip could not install $SPEC into $ENV_DIR; check that PyPI is reachable" >&2
    rm -rf "$ENV_DIR"
    exit 1
fi
echo "$SPEC" > "$STAMP"
echo "$BIN"
