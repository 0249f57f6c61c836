#!/usr/bin/env bash
# The test command (README): installs the real servers the integration tests talk to, then runs
# every test. Safe to run again; the installs are skipped when already done.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/test-setup.sh
if [ -f scripts/dovecot-test.sh ]; then
    bash scripts/dovecot-test.sh
fi
# failpoints: test-only fault injection (a frozen scheduler, a planted secret leak) that some
# tests need; release builds never have it.
cargo test --locked --all-targets --features failpoints "$@"
