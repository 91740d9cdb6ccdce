#!/usr/bin/env bash
# Coverage-guided fuzzing of xpm's readers of hostile input (cargo-fuzz / libFuzzer, stable
# Rust). The targets, what they cover and the figures measured: tests/fuzz/README.md.
#
#   scripts/fuzz.sh [--ci RUNS | --smoke SECONDS | --run SECONDS] [TARGET…]
#
#   --ci N     like --smoke, but reproducible: each target runs exactly N inputs from a fixed
#              seed (-seed=1 -runs=N) instead of for a time, so the same commit fuzzes the same
#              inputs on every CI run. .ci/run uses --ci 50000.
#   --smoke S  (default, S = 20) run each target S seconds on a temporary copy of its committed
#              corpus (tests/fuzz/corpus/TARGET, left untouched), after replaying every input
#              under tests/fuzz/regressions/TARGET once. For CI.
#   --run S    run each target S seconds on the committed corpus itself (new inputs are added
#              to it; minimise it afterwards with `cargo fuzz cmin`, see the README).
#   TARGET…    default: all of artifact mask index lockfile project_toml recipe upload
#              torch_pickle.
#
# Exits non-zero if any target crashes, times out (> 10 s for one input), exceeds 2 GiB of
# RSS, or if any regression input fails. A crashing input is kept under
# $XPM_FUZZ_OUT/TARGET/ (default target/fuzz/findings/) and its path is printed.
#
# Cost on the reference machine (2 cores, 24 GiB; one fuzzer process, one build job):
#   --smoke 20, all 7 targets, warm target/fuzz (nothing to rebuild): 2m29s
#   --smoke 20, all 7 targets, cold (empty target/fuzz; cargo-fuzz installed, crates
#     downloaded): 8m31s, of which the build 6m03s. Installing cargo-fuzz adds ~1 min.
#   Each target runs ~21 s (20 s plus loading its corpus). Keep target/fuzz cached between
#   CI runs to stay near the warm figure.
#
# Environment: CARGO_TARGET_DIR for the fuzz builds defaults to target/fuzz (not the main
# target dir, so a fuzz build never waits on the workspace's build lock); CARGO_BUILD_JOBS
# defaults to 1; XPM_FUZZ_OUT as above.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FUZZ_DIR=tests/fuzz
ALL_TARGETS=(artifact mask index lockfile project_toml recipe upload torch_pickle peft_adapter)

MODE=smoke
SECONDS_PER_TARGET=20
TARGETS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --ci | --smoke | --run)
            MODE="${1#--}"
            [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || {
                echo "fuzz.sh: $1 needs a number (of runs for --ci, of seconds otherwise)" >&2
                exit 2
            }
            SECONDS_PER_TARGET="$2"
            shift 2
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "fuzz.sh: unknown option $1" >&2
            exit 2
            ;;
        *)
            if [[ ! " ${ALL_TARGETS[*]} " =~ " $1 " ]]; then
                echo "fuzz.sh: unknown target $1 (targets: ${ALL_TARGETS[*]})" >&2
                exit 2
            fi
            TARGETS+=("$1")
            shift
            ;;
    esac
done
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=("${ALL_TARGETS[@]}")

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/fuzz}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
OUT="${XPM_FUZZ_OUT:-$CARGO_TARGET_DIR/findings}"
BIN_DIR="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

# Largest input per target (artifacts are a few KiB; 64 KiB leaves room for many tensors).
max_len() {
    case "$1" in
        artifact | upload | peft_adapter) echo 65536 ;;
        mask | torch_pickle) echo 32768 ;;
        index) echo 16384 ;;
        lockfile | recipe) echo 8192 ;;
        project_toml) echo 4096 ;;
    esac
}

if ! command -v cargo-fuzz > /dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# Build (stable Rust: no sanitizer; debug assertions and overflow checks are on).
build_start=$(date +%s)
if [[ ${#TARGETS[@]} -eq ${#ALL_TARGETS[@]} ]]; then
    cargo fuzz build --fuzz-dir "$FUZZ_DIR" --sanitizer none
else
    for t in "${TARGETS[@]}"; do
        cargo fuzz build --fuzz-dir "$FUZZ_DIR" --sanitizer none "$t"
    done
fi
echo "fuzz.sh: build took $(($(date +%s) - build_start)) s" >&2

TMP="$(mktemp -d "${TMPDIR:-/tmp}/xpm-fuzz.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

failed=()
for t in "${TARGETS[@]}"; do
    bin="$BIN_DIR/$t"
    found="$OUT/$t"
    mkdir -p "$found"
    opts=(-rss_limit_mb=2048 -timeout=10 -max_len="$(max_len "$t")" -print_final_stats=1
        -artifact_prefix="$found/")
    [[ -f "$FUZZ_DIR/dicts/$t.dict" ]] && opts+=(-dict="$FUZZ_DIR/dicts/$t.dict")

    # Regression inputs: each must run cleanly once.
    regressions=()
    if [[ -d "$FUZZ_DIR/regressions/$t" ]]; then
        while IFS= read -r -d '' f; do regressions+=("$f"); done \
            < <(find "$FUZZ_DIR/regressions/$t" -type f ! -name '*.md' -print0 | sort -z)
    fi
    if [[ ${#regressions[@]} -gt 0 ]]; then
        echo "== $t: ${#regressions[@]} regression input(s)" >&2
        if ! "$bin" "${opts[@]}" -runs=1 "${regressions[@]}" > "$TMP/$t.regressions.log" 2>&1; then
            tail -n 40 "$TMP/$t.regressions.log" >&2
            echo "fuzz.sh: $t: a regression input fails (log above)" >&2
            failed+=("$t (regressions)")
        fi
    fi

    if [[ "$MODE" != run ]]; then
        corpus="$TMP/corpus-$t"
        mkdir -p "$corpus"
        if [[ -d "$FUZZ_DIR/corpus/$t" ]]; then cp -R "$FUZZ_DIR/corpus/$t/." "$corpus/"; fi
    else
        corpus="$FUZZ_DIR/corpus/$t"
        mkdir -p "$corpus"
    fi
    if [[ "$MODE" == ci ]]; then
        echo "== $t: fuzzing ${SECONDS_PER_TARGET} inputs from seed 1 (ci)" >&2
        budget=(-seed=1 -runs="$SECONDS_PER_TARGET")
    else
        echo "== $t: fuzzing for ${SECONDS_PER_TARGET} s ($MODE)" >&2
        budget=(-max_total_time="$SECONDS_PER_TARGET")
    fi
    log="$TMP/$t.log"
    if "$bin" "${opts[@]}" "${budget[@]}" "$corpus" > "$log" 2>&1; then
        grep -E '^#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units' "$log" | tail -n 2 >&2 || true
    else
        tail -n 60 "$log" >&2
        echo "fuzz.sh: $t: the fuzzer found a problem; inputs in $found/ (log above)" >&2
        failed+=("$t")
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
if [[ "$MODE" == ci ]]; then
    echo "fuzz.sh: ${#TARGETS[@]} target(s) clean (ci, ${SECONDS_PER_TARGET} inputs each)" >&2
else
    echo "fuzz.sh: ${#TARGETS[@]} target(s) clean ($MODE, ${SECONDS_PER_TARGET} s each)" >&2
fi
