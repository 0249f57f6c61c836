#!/usr/bin/env bash
# Installs Dovecot's POP3 server for tests/pop3_dovecot.rs, idempotently (Debian 12 or CI, as root).
#   - packages dovecot-core and dovecot-pop3d (no recommends),
#   - the system's own Dovecot service is left stopped: the tests start their own Dovecot with a
#     throwaway config (`dovecot -F -c FILE`) under a temp dir and never use /etc/dovecot.
# Prints one line per step. Re-running it is cheap.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # dovecot lives in /usr/sbin

# Wait for a dpkg lock held by another apt run instead of failing at once.
APT=(apt-get -o DPkg::Lock::Timeout=600 -q)
PKGS=(dovecot-core dovecot-pop3d)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for p in "${PKGS[@]}"; do
    installed "$p" || missing+=("$p")
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "dovecot: already installed ($(dovecot --version 2>/dev/null || echo '?'))"
else
    # Only refresh the package lists when apt does not know a package yet.
    need_update=no
    for p in "${missing[@]}"; do
        apt-cache show "$p" >/dev/null 2>&1 || need_update=yes
    done
    if [ "$need_update" = yes ]; then
        "${APT[@]}" update >/dev/null
        echo "apt: package lists updated"
    fi
    # policy-rc.d exit 101 keeps invoke-rc.d from starting the service during the install (on
    # machines with a service manager); it is removed again right after, and only if ours.
    POLICY=/usr/sbin/policy-rc.d
    ours_policy=no
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$POLICY"
        chmod 755 "$POLICY"
        ours_policy=yes
    fi
    trap '[ "$ours_policy" = yes ] && rm -f "$POLICY" || true' EXIT
    DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null
    echo "dovecot: installed ${missing[*]} ($(dovecot --version 2>/dev/null || echo '?'))"
fi

# --- make sure the system Dovecot is not running ---------------------------------------------
# Only the instance configured by /etc/dovecot (its pid file is under /run/dovecot) is stopped;
# test instances have their own base_dir and are not touched.
stopped=no
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet dovecot 2>/dev/null; then
    systemctl stop dovecot >/dev/null 2>&1 || true
    systemctl disable dovecot >/dev/null 2>&1 || true
    stopped=yes
fi
if [ -s /run/dovecot/master.pid ] && kill -0 "$(cat /run/dovecot/master.pid)" 2>/dev/null; then
    doveadm -c /etc/dovecot/dovecot.conf stop >/dev/null 2>&1 \
        || kill "$(cat /run/dovecot/master.pid)" 2>/dev/null || true
    stopped=yes
fi
if [ "$stopped" = yes ]; then
    echo "dovecot: stopped the system service"
else
    echo "dovecot: system service not running (good)"
fi
