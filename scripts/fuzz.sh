#!/usr/bin/env bash
# Fuzzes mailqueue's parsers for a bounded time and records the figures.
#
#   scripts/fuzz.sh [SECONDS]        # default 60 seconds per target
#
# Targets (fuzz/fuzz_targets/, bodies in fuzz/src/lib.rs):
#   compose     the row -> mail builder (message::compose, parse_list) with every column fuzzed
#   pop3_reply  the POP3 reply parser (pop3::parse_status_line, apop_timestamp)
#   config      the config loader (config::parse)
#
# For each target: runs libFuzzer for SECONDS on fuzz/corpus/<target> plus the hand-written
# fuzz/seeds/<target>, merges the new inputs that add coverage into fuzz/corpus/<target>
# (minimised with `cargo fuzz cmin` once it holds more than $MAX_CORPUS files), and keeps any
# crashing input in fuzz/artifacts/<target>/. Then it writes date, commit, command and the
# figures into docs/reliability.md between <!-- BEGIN fuzz --> and <!-- END fuzz -->.
# Exits 1 if any target crashed.
#
# Needs cargo-fuzz (installed here if missing) and nightly flags: on a stable toolchain they are
# enabled with RUSTC_BOOTSTRAP=1. The corpora are replayed on stable by
# tests/fuzz_corpus_replay.rs (`cargo test --test fuzz_corpus_replay`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SECS="${1:-60}"
case "$SECS" in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
TARGETS=(compose pop3_reply config)
MAX_CORPUS="${MAX_CORPUS:-300}" # files per corpus before it is minimised
MAX_LEN=2048                    # bytes per input: keeps the corpora small

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if ! rustc -V | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1 # cargo-fuzz passes -Z flags (sanitizer, coverage) to rustc
fi

echo "== building the fuzz targets"
cargo fuzz build # release, debug assertions and overflow checks on, AddressSanitizer
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
BIN_DIR="fuzz/target/$TRIPLE/release"

count_files() { find "$1" -maxdepth 1 -type f 2>/dev/null | wc -l | tr -d ' '; }
dir_bytes() { find "$1" -maxdepth 1 -type f -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}'; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
ROWS=()
CRASHED=()
for t in "${TARGETS[@]}"; do
    corpus="fuzz/corpus/$t"
    seeds="fuzz/seeds/$t"
    artifacts="fuzz/artifacts/$t"
    new="$WORK/$t-new"
    mkdir -p "$corpus" "$seeds" "$artifacts" "$new"
    before="$(count_files "$corpus")"
    artifacts_before="$(count_files "$artifacts")"
    dict=()
    [ -f "fuzz/dict/$t.dict" ] && dict=("-dict=fuzz/dict/$t.dict")
    echo "== fuzzing $t for ${SECS}s (corpus: $before files)"
    log="$WORK/$t.log"
    start="$(date +%s)"
    # New inputs go into the first directory ($new); the corpus and seeds are only read.
    # Equivalent to `cargo fuzz run $t $new $corpus $seeds -- ...` without a second build.
    set +e
    "$BIN_DIR/$t" -max_total_time="$SECS" -max_len="$MAX_LEN" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "${dict[@]}" "$new" "$corpus" "$seeds" >"$log" 2>&1
    rc=$?
    set -e
    elapsed=$(($(date +%s) - start))
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    [ -n "$execs" ] || execs="$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -1)"
    [ -n "$execs" ] || execs="$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')"
    [ -n "$execs" ] || execs=0
    crashes=$(($(count_files "$artifacts") - artifacts_before))
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes=1; fi
    if [ "$crashes" -gt 0 ]; then
        CRASHED+=("$t")
        echo "!! $t crashed (exit $rc); input(s) in $artifacts/, log:"
        grep -A30 -m1 -E "panicked|ERROR: libFuzzer|ERROR: AddressSanitizer|deadly signal" "$log" || tail -40 "$log"
    fi
    # Keep what adds coverage: merge the new inputs (and seeds) into the corpus.
    "$BIN_DIR/$t" -merge=1 -max_len="$MAX_LEN" -timeout=10 "$corpus" "$new" "$seeds" >"$WORK/$t.merge.log" 2>&1 ||
        { echo "!! merge for $t failed:"; tail -20 "$WORK/$t.merge.log"; }
    if [ "$(count_files "$corpus")" -gt "$MAX_CORPUS" ]; then
        # What `cargo fuzz cmin` does (merge the corpus into an empty directory, keep that),
        # with the binary built above (cmin would rebuild with other flags), and by edge
        # coverage only (-use_counters=0): keeping every hit-count variant keeps well over a
        # thousand files per target.
        echo "== minimising $t ($(count_files "$corpus") files)"
        min="$WORK/$t-min"
        mkdir -p "$min"
        if "$BIN_DIR/$t" -merge=1 -use_counters=0 -max_len="$MAX_LEN" -timeout=10 "$min" "$corpus" \
            >"$WORK/$t.cmin.log" 2>&1 && [ "$(count_files "$min")" -gt 0 ]; then
            find "$corpus" -maxdepth 1 -type f -delete
            cp "$min"/* "$corpus"/
        else
            echo "!! minimising $t failed:"
            tail -20 "$WORK/$t.cmin.log"
        fi
    fi
    after="$(count_files "$corpus")"
    bytes="$(dir_bytes "$corpus")"
    echo "   $t: ${elapsed}s, $execs executions, corpus $before -> $after files ($bytes bytes), crashes: $crashes"
    ROWS+=("| \`$t\` | $elapsed | $execs | $((execs / (elapsed > 0 ? elapsed : 1))) | $before → $after ($bytes bytes) | $crashes |")
done

commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="$commit (working tree with uncommitted changes)"; fi
section="$WORK/section.md"
{
    echo "Written by \`scripts/fuzz.sh\`; do not edit by hand."
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: $commit"
    echo "- command: \`scripts/fuzz.sh $SECS\` ($(cargo fuzz --version 2>/dev/null | head -1), $(rustc -V)$( [ -n "${RUSTC_BOOTSTRAP:-}" ] && echo ", RUSTC_BOOTSTRAP=1"); libFuzzer with AddressSanitizer, debug assertions and overflow checks; inputs up to $MAX_LEN bytes)"
    echo
    echo "| target | seconds | executions | exec/s | corpus files | crashes |"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Targets (bodies and checks in \`fuzz/src/lib.rs\`): \`compose\` builds a queue row whose"
    echo "columns, \`headers\` column and attachment row are fuzzed (fields split at byte 0xFF) as the"
    echo "scheduler does (\`compose_full\`, UTF-8 and ISO-2022-JP) and checks that the header block"
    echo "holds only our fields and the extra ones the row asked for, with CRLF line ends, that the"
    echo "envelope holds only clean addresses from the row, and that errors are one line;"
    echo "\`pop3_reply\` parses status lines and APOP timestamps; \`config\` loads and validates"
    echo "config text. A panic or a failed check counts as a crash."
    known="$(sed -n 's/^pub fn \(known_defect_[a-z_]*\).*/\1/p' fuzz/src/lib.rs | paste -sd, - | sed 's/,/, /g')"
    if [ -n "$known" ]; then
        echo
        echo "Known defects, reported and pinned by ignored tests, are left out of the checks until"
        echo "they are fixed (so the fuzzer looks for everything else): $known in \`fuzz/src/lib.rs\`."
    fi
    if [ "${#CRASHED[@]}" -gt 0 ]; then
        echo
        echo "**Crashes in: ${CRASHED[*]}** — inputs in \`fuzz/artifacts/<target>/\`;"
        echo "reproduce with \`RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>\`."
    else
        echo
        echo "No crashes. \`cargo test --test fuzz_corpus_replay\` replays every corpus on stable."
    fi
} >"$section"
doc=docs/reliability.md
awk -v section="$section" '
    /<!-- BEGIN fuzz -->/ { print; while ((getline line < section) > 0) print line; skip = 1; next }
    /<!-- END fuzz -->/ { skip = 0 }
    !skip { print }
' "$doc" >"$WORK/reliability.md"
grep -q '<!-- END fuzz -->' "$WORK/reliability.md" || { echo "no fuzz markers in $doc" >&2; exit 1; }
cat "$WORK/reliability.md" >"$doc"
echo "== wrote the fuzz section of $doc"
sed -n '/<!-- BEGIN fuzz -->/,/<!-- END fuzz -->/p' "$doc"

if [ "${#CRASHED[@]}" -gt 0 ]; then
    echo "!! crashes in: ${CRASHED[*]}" >&2
    exit 1
fi
