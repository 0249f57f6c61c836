#!/usr/bin/env bash
# Where the daemon's CPU goes while it drains a backlog (issue 6: "profile, fix, and record"):
# `perf record` of `mailqueue run --once` delivering N queued mails over one connection to
# Postfix's smtp-sink, both pinned to CPU 0 as in benches/e2e.sh, then the samples grouped by
# what they are (SQLite, file writes, thread wakeups, TCP, lettre, ...). Writes docs/PROFILE.md.
#
#   bash benches/profile.sh            # N=20000, about a minute after the build
#   BIN=/path/to/old/mailqueue PROFILE_COMMIT=abc1234 python3 benches/profile/profile.py
#                                      # profile another build (an older commit: before/after)
#
# Each run adds a row to the page's "Runs" table, keeping the earlier rows.
#
# As root on Debian: installs linux-perf if missing (and the test servers, via
# scripts/test-setup.sh). perf's own overhead lowers the rate; the shares are what count.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/test-setup.sh >/dev/null
if ! command -v perf >/dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=600 -q install -y linux-perf >/dev/null
fi
cargo build --release --locked
export PROFILE_COMMIT="$(git rev-parse --short HEAD)"
export PROFILE_DIRTY="$(git status --porcelain -- src Cargo.toml Cargo.lock | cut -c4- | tr '\n' ' ')"
exec python3 benches/profile/profile.py
