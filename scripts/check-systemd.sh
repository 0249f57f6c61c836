#!/usr/bin/env bash
# Checks the systemd files in systemd/ offline, without a running systemd (CI, containers):
#
#   bash scripts/check-systemd.sh [PATH-TO-BUILT-BINARY]     (default: target/debug/mailqueue)
#
#  1. installs Debian's `systemd` package if `systemd-analyze` is missing (it only installs the
#     tools; nothing boots or starts systemd);
#  2. the unit: a temporary copy whose ExecStartPre=/ExecStart=/ExecReload= run the given binary
#     (systemd-analyze verify insists that commands exist), then
#       - `systemd-analyze verify`: fails on a non-zero status or on any message about the unit
#         (unknown or misspelled settings are only warnings there, so they are caught by text);
#       - `systemd-analyze security --offline=yes`: prints the table and the exposure, fails
#         above MAX_EXPOSURE (2.0; lower is better);
#       - the binary really has the subcommands the unit runs;
#  3. the sysusers and tmpfiles snippets: applied to a throwaway root directory
#     (`systemd-sysusers --root`, `systemd-tmpfiles --create --root`), then the resulting
#     owners and modes are checked. The host's users and files are not touched.
#
# Builds nothing. Exit 0 when everything passes, 1 otherwise, 64 on a usage error.
set -euo pipefail

MAX_EXPOSURE=2.0
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
UNIT="$ROOT/systemd/mailqueue.service"
SYSUSERS="$ROOT/systemd/mailqueue.sysusers"
TMPFILES="$ROOT/systemd/mailqueue.tmpfiles"

fail=0
note() { printf '%s\n' "$*"; }
bad() { printf 'FAIL: %s\n' "$*" >&2; fail=1; }

# --- the binary --------------------------------------------------------------------------------
bin=${1:-target/debug/mailqueue}
if [ "$#" -gt 1 ]; then
    echo "usage: $0 [PATH-TO-BUILT-BINARY]" >&2
    exit 64
fi
# Relative paths are taken from where the script was called, the default from the repository.
if [ "$#" -eq 1 ] && [ "${bin#/}" = "$bin" ]; then
    bin="$OLDPWD/$bin"
fi
if [ ! -x "$bin" ] || [ -d "$bin" ]; then
    echo "error: $bin is not an executable file; build it first (cargo build)" >&2
    exit 64
fi
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
case "$bin" in
*[[:space:]\\\$%]*)
    echo "error: the binary's path must not contain spaces, \\, \$ or %: $bin" >&2
    exit 64
    ;;
esac

# --- the tools ---------------------------------------------------------------------------------
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "error: need root (or sudo) to install packages" >&2
        return 1
    fi
}

install_systemd_tools() {
    note "systemd-analyze not found: installing Debian's systemd package (tools only, nothing is booted)"
    if ! command -v apt-get >/dev/null; then
        echo "error: no systemd-analyze and no apt-get; install systemd's tools by hand" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Update the package lists only when there are none, or the install fails with stale ones.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        as_root apt-get update -qq
    fi
    if ! as_root apt-get install -y -qq --no-install-recommends systemd; then
        as_root apt-get update -qq
        as_root apt-get install -y -qq --no-install-recommends systemd
    fi
}

for tool in systemd-analyze systemd-sysusers systemd-tmpfiles; do
    if ! command -v "$tool" >/dev/null; then
        install_systemd_tools
        break
    fi
done
note "using $(systemd-analyze --version | head -n1)"

work=$(mktemp -d "${TMPDIR:-/tmp}/check-systemd.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- the unit ----------------------------------------------------------------------------------
note ""
note "== unit: $UNIT (commands pointed at $bin)"
mkdir "$work/units"
copy="$work/units/mailqueue.service"
# Only the command of Exec*= lines, after any prefix such as "-", "@", "+", "!", ":".
sed -E "s#^(Exec[A-Za-z]*=[-@+!:]*)/usr/bin/mailqueue( |\$)#\\1$bin\\2#" "$UNIT" >"$copy"
pointed=$(grep -cF "$bin" "$copy" || true)
wanted=$(grep -cE '^Exec[A-Za-z]*=[-@+!:]*/usr/bin/mailqueue( |$)' "$UNIT" || true)
if [ "$pointed" -ne "$wanted" ] || [ "$wanted" -lt 3 ]; then
    bad "expected ExecStartPre=, ExecStart= and ExecReload= to run /usr/bin/mailqueue (found $wanted, rewrote $pointed)"
fi

# Every subcommand the unit runs must exist in this binary (clap exits 2 on an unknown one).
while read -r sub; do
    if ! "$bin" "$sub" --help >/dev/null 2>&1; then
        bad "the unit runs 'mailqueue $sub' but $bin has no such subcommand"
    fi
done < <(sed -nE 's#^Exec[A-Za-z]*=[-@+!:]*/usr/bin/mailqueue ([a-z-]+).*#\1#p' "$UNIT" | sort -u)

note "-- systemd-analyze verify"
set +e
verify_out=$(cd "$work/units" && systemd-analyze verify --no-pager ./mailqueue.service 2>&1)
verify_rc=$?
set -e
[ -n "$verify_out" ] && printf '%s\n' "$verify_out"
if [ "$verify_rc" -ne 0 ]; then
    bad "systemd-analyze verify exited $verify_rc"
elif grep -q 'mailqueue' <<<"$verify_out"; then
    bad "systemd-analyze verify reported problems with the unit (see above)"
else
    note "verify: OK"
fi

note "-- systemd-analyze security --offline=yes"
set +e
# --threshold is in tenths (the table's 0-100 scale); the number is also checked below.
sec_out=$(cd "$work/units" && systemd-analyze security --offline=yes --no-pager \
    --threshold="$(awk -v m="$MAX_EXPOSURE" 'BEGIN { printf "%d", m * 10 }')" \
    ./mailqueue.service 2>&1)
sec_rc=$?
set -e
printf '%s\n' "$sec_out"
exposure=$(sed -nE 's/.*Overall exposure level for mailqueue\.service: ([0-9]+(\.[0-9]+)?).*/\1/p' <<<"$sec_out" | tail -n1)
if [ -z "$exposure" ]; then
    bad "no exposure level in the output of systemd-analyze security (exit $sec_rc)"
elif awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e > m) }'; then
    bad "exposure $exposure is above $MAX_EXPOSURE"
elif [ "$sec_rc" -ne 0 ]; then
    bad "systemd-analyze security exited $sec_rc"
else
    note "exposure: $exposure (limit $MAX_EXPOSURE, lower is better)"
fi
if grep -q 'mailqueue\.service:[0-9]' <<<"$sec_out"; then
    bad "systemd-analyze security reported problems parsing the unit (see above)"
fi

# --- sysusers and tmpfiles, applied to a throwaway root ------------------------------------------
note ""
note "== sysusers and tmpfiles, applied to the throwaway root $work/root"
mkdir -p "$work/root/etc"
# A minimal user database with root, as on any system.
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$work/root/etc/passwd"
printf 'root:x:0:\n' >"$work/root/etc/group"

run_tool() { # name, command...: runs it, shows its output, fails on an error or a warning
    local name=$1 out rc
    shift
    set +e
    out=$("$@" 2>&1)
    rc=$?
    set -e
    [ -n "$out" ] && printf '%s\n' "$out"
    if [ "$rc" -ne 0 ]; then
        bad "$name exited $rc"
    elif grep -qiE 'warn|fail|invalid|unknown|ignoring' <<<"$out"; then
        bad "$name complained (see above)"
    fi
}
run_tool systemd-sysusers systemd-sysusers --root="$work/root" "$SYSUSERS"
run_tool systemd-tmpfiles systemd-tmpfiles --create --root="$work/root" "$TMPFILES"
# Again, as at every boot: existing paths must be accepted as they are.
run_tool "systemd-tmpfiles (second run)" systemd-tmpfiles --create --root="$work/root" "$TMPFILES"

uid=$(awk -F: '$1 == "mailqueue" { print $3 }' "$work/root/etc/passwd")
gid=$(awk -F: '$1 == "mailqueue" { print $3 }' "$work/root/etc/group")
if [ -z "$uid" ] || [ -z "$gid" ]; then
    bad "sysusers did not create the user and group mailqueue"
else
    note "sysusers: user mailqueue ($uid), group mailqueue ($gid)"
    expect() { # path, mode, uid, gid
        local got
        got=$(stat -c '%a %u %g' "$work/root$1" 2>/dev/null || echo missing)
        if [ "$got" = "$2 $3 $4" ]; then
            note "tmpfiles: $1 $got"
        else
            bad "tmpfiles: $1 is '$got', expected '$2 $3 $4'"
        fi
    }
    expect /etc/mailqueue 750 0 "$gid"
    expect /etc/mailqueue/smtp-password 600 0 0
    expect /etc/mailqueue/pop-password 600 0 0
    expect /var/lib/mailqueue 2770 "$uid" "$gid"
    expect /var/lib/mailqueue/queue.db 660 "$uid" "$gid"
fi

# The unit's StateDirectoryMode= must agree with the tmpfiles line, or each start undoes it.
unit_mode=$(sed -nE 's/^StateDirectoryMode=([0-7]+)$/\1/p' "$UNIT")
tmp_mode=$(awk '$1 == "d" && $2 == "/var/lib/mailqueue" { print $3 }' "$TMPFILES")
if [ "$((8#${unit_mode:-0}))" -ne "$((8#${tmp_mode:-1}))" ]; then
    bad "StateDirectoryMode=$unit_mode in the unit differs from $tmp_mode in the tmpfiles snippet"
fi

note ""
if [ "$fail" -ne 0 ]; then
    note "check-systemd: FAILED"
    exit 1
fi
note "check-systemd: OK (exposure $exposure)"
