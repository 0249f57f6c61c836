#!/usr/bin/env bash
# End-to-end benchmark of the daemon (issue 6): throughput against Postfix's smtp-sink beside
# smtp-source and Postfix itself, pacing accuracy, INSERT-to-accepted latency, idle cost and
# memory, and the cost of a large table. Everything on loopback; writes docs/BENCHMARKS.md.
#
#   bash benches/e2e.sh                      # the full run, about 12 minutes (plus the build)
#   N=2000 ROUNDS=1 IDLE_S=10 SCALE_BIG=100000 MQ_BUDGET_S=5 PF_BUDGET_S=5 \
#     OUT=/tmp/BENCHMARKS.md bash benches/e2e.sh          # a quick run (about 3 minutes)
#
# As root on Debian (like scripts/test-setup.sh, which it calls: Postfix's smtp-sink,
# smtp-source and postfix itself, and target/test-venv with aiosmtpd); installs util-linux for
# taskset if missing. Knobs (environment):
#   N=20000          mails queued for the throughput runs (and smtp-source's -m)
#   ROUNDS=3         interleaved rounds; the page shows medians
#   MQ_BUDGET_S=15   a mailqueue run that has not delivered N by then is stopped (SIGTERM) and
#                    its rate taken over the time it ran
#   PF_N=$N PF_BUDGET_S=15   mails in Postfix's queue, and the same stop for its drain
#   DIAG=1           also run the daemon with an LD_PRELOAD shim forcing TCP_NODELAY
#                    (benches/e2e/nodelay.c; needs cc), DIAG_BUDGET_S=8 per run
#   SKIP_POSTFIX=1   no Postfix drain
#   PACE_N=300 PACE_MS=100   pacing run
#   LAT_N=200        latency run
#   IDLE_S=60        idle measurement window
#   SCALE_SMALL=1000 SCALE_BIG=1000000 SCALE_N=2000   table-size runs
#   KEEP_TMP=1       keep the temp dir;  OUT=path of the page
#   RENDER_ONLY=1    measure nothing: write the page again from the last run's raw figures
#                    (target/bench/e2e-results.json), e.g. after changing its wording
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The exact command, with the knobs that were set, for the page.
cmd="bash benches/e2e.sh"
for v in N ROUNDS MQ_BUDGET_S PF_N PF_BUDGET_S DIAG_BUDGET_S PACE_N PACE_MS LAT_N IDLE_S \
         SCALE_SMALL SCALE_BIG SCALE_N SKIP_POSTFIX DIAG KEEP_TMP OUT; do
    if [ -n "${!v:-}" ]; then cmd="$v=${!v} $cmd"; fi
done
export BENCH_COMMAND="$cmd"

if [ -n "${RENDER_ONLY:-}" ]; then
    exec python3 benches/e2e/bench.py
fi

echo "== setup"
bash scripts/test-setup.sh
if ! command -v taskset >/dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=600 -q install -y util-linux >/dev/null
    echo "util-linux: installed (taskset)"
fi
for tool in smtp-sink smtp-source postfix postconf taskset; do
    command -v "$tool" >/dev/null 2>&1 || { echo "missing: $tool" >&2; exit 1; }
done
if [ -n "${DIAG:-}" ] && ! command -v cc >/dev/null 2>&1; then
    echo "no C compiler: the TCP_NODELAY diagnostic (DIAG=1) is skipped"
fi

echo "== build"
cargo build --release --locked
# What was built: the commit and the uncommitted source files as cargo saw them just now (others
# may commit while the measurements run).
BENCH_GIT_COMMIT="$(git rev-parse --short HEAD)"
BENCH_GIT_DIRTY="$(git status --porcelain -- src Cargo.toml Cargo.lock build.rs | cut -c4- | tr '\n' ' ')"
export BENCH_GIT_COMMIT BENCH_GIT_DIRTY

echo "== measure (progress on stderr, results on stdout)"
exec target/test-venv/bin/python benches/e2e/bench.py
