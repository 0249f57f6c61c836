#!/usr/bin/env bash
# The kill -9 soak (issue 5.1), full size: 3000 queued mails, the daemon SIGKILLed at random
# moments (at least 50 times) and aborted by the crash-in-claim / crash-after-reply failpoints,
# restarted until the queue is drained; then nothing may be lost, every duplicate must be covered
# by an in_doubt attempt, and PRAGMA integrity_check must say ok. The logic is tests/soak.rs; this
# runs it in release mode and lets it rewrite the soak section of docs/reliability.md.
#
#   bash scripts/soak.sh          # full run, rewrites docs/reliability.md (a few minutes)
#   bash scripts/soak.sh fast     # the CI-sized run (as in `cargo test`), asserts only
#
# MAILQUEUE_SOAK_SEED=N replays a schedule (printed at the start). Needs the test servers
# (scripts/test-setup.sh). On a failure the work directory is kept and its path printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode="${1:-full}"
case "$mode" in
    full | fast) ;;
    *) echo "usage: $0 [full|fast]" >&2; exit 2 ;;
esac
cmd=(cargo test --locked --release --features failpoints --test soak -- --nocapture)
export MAILQUEUE_SOAK="$mode"
export MAILQUEUE_SOAK_COMMAND="bash scripts/soak.sh $mode  # = MAILQUEUE_SOAK=$mode ${cmd[*]}"
exec "${cmd[@]}"
