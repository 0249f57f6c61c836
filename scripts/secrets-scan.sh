#!/usr/bin/env bash
# Issue 5.7: the whole integration suite once more, with every mailqueue process also logging
# at trace level into target/trace-scan/<pid>.log (MAILQUEUE_TEST_TRACE_DIR, a failpoints-only
# switch), then a scan of those logs for every password the tests use, its base64, and the
# base64 of the AUTH PLAIN string. Then the same scan is shown to catch a planted leak.
# (The queue files and the commands' stdout are checked by the targeted tests in
# tests/service.rs and tests/pop_before_smtp.rs.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir="$PWD/target/trace-scan"
scan() {
    python3 - "$1" <<'PY'
import base64, glob, sys
d = sys.argv[1]
users = ["crm", "crm@example.com", "alice", "u"]
secrets = ["Tr4ce-Secret-9f2", "Wr0ng-Tr4ce-Secret", "Open sesame 1", "hunter2-xyz", "wrong-password", "hunter2-secret"]
# [smtp.oauth2] (tests/oauth2.rs): the client secret, every refresh token, every access token
# (and the base64 XOAUTH2 string carrying it).
oauth = ["cl1ent-S3cret-0auth", "refresh-T0ken", "1//some-other-token", "ya29.access-"]
needles = set()
for s in secrets:
    needles.add(s)
    needles.add(base64.b64encode(s.encode()).decode())
    for u in users:
        needles.add(base64.b64encode(f"\0{u}\0{s}".encode()).decode())
for s in oauth:
    needles.add(s)
for n in range(1, 10):
    for u in users:
        needles.add(base64.b64encode(f"user={u}\x01auth=Bearer ya29.access-{n}\x01\x01".encode()).decode()[:40])
files = glob.glob(f"{d}/*.log")
total = sum(len(open(f, "rb").read()) for f in files)
if not files or total == 0:
    print(f"secrets-scan: no trace logs in {d}"); sys.exit(2)
found = []
for f in files:
    data = open(f, "rb").read().decode("utf-8", "replace")
    found += [(f, n) for n in needles if n in data]
print(f"secrets-scan: {len(files)} logs, {total} bytes at trace level, {len(found)} leaks")
for f, n in found[:10]:
    print(f"  LEAK {n!r} in {f}")
sys.exit(1 if found else 0)
PY
}
rm -rf "$dir" && mkdir -p "$dir"
suite=0
MAILQUEUE_TEST_TRACE_DIR="$dir" cargo test --locked --features failpoints --tests --no-fail-fast -- \
    --skip the_secret_check_catches_a_planted_leak --skip kill_9_soak >"$dir/../trace-scan-suite.txt" 2>&1 || suite=$?
if [ "$suite" != 0 ]; then
    echo "secrets-scan: the suite itself failed at trace level (see target/trace-scan-suite.txt):"
    grep -E "^test .* FAILED|panicked" "$dir/../trace-scan-suite.txt" | head -20
fi
scan "$dir"
# The scan must catch a leak: plant one (failpoint leak-secret logs the AUTH PLAIN string).
planted="$PWD/target/trace-scan-planted"
rm -rf "$planted" && mkdir -p "$planted"
MAILQUEUE_TEST_TRACE_DIR="$planted" cargo test --locked --features failpoints --test service \
    the_secret_check_catches_a_planted_leak >/dev/null
if scan "$planted" >/dev/null; then
    echo "secrets-scan: the planted leak was NOT found: the scan is broken"; exit 1
fi
echo "secrets-scan: the planted leak was found, as it must be"
exit "$suite"
