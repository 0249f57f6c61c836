#!/usr/bin/env bash
# Installs what the integration tests need, idempotently (fresh Debian 12 machine or CI, as root):
#   - Postfix's smtp-sink / smtp-source binaries (Postfix itself is left stopped),
#   - a Python venv at target/test-venv with aiosmtpd (tests/servers/smtp_server.py runs in it).
# Prints one line per step. Re-running it is cheap.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # smtp-sink and postfix live in /usr/sbin

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/target/test-venv"
PYTHON="${PYTHON:-python3}"
AIOSMTPD_SPEC="aiosmtpd==1.4.6"
# Wait for a dpkg lock held by another apt run instead of failing at once.
APT=(apt-get -o DPkg::Lock::Timeout=600 -q)

# --- Postfix (only for smtp-sink / smtp-source) -------------------------------------------
if command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ]; then
    echo "postfix: smtp-sink already installed ($(command -v smtp-sink || echo /usr/sbin/smtp-sink))"
else
    if ! apt-cache show postfix >/dev/null 2>&1; then
        "${APT[@]}" update >/dev/null
        echo "apt: package lists updated"
    fi
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y --no-install-recommends postfix >/dev/null
    echo "postfix: installed (for smtp-sink/smtp-source)"
fi
# We only want the binaries: make sure no Postfix mail system is left running (with "No
# configuration" the package does not start it, but a machine may have had it configured before).
if postfix status >/dev/null 2>&1; then
    postfix stop >/dev/null 2>&1 || true
    echo "postfix: stopped the running mail system"
else
    echo "postfix: not running (good)"
fi

# --- Python venv with aiosmtpd ------------------------------------------------------------
if [ -e "$VENV" ] && ! "$VENV/bin/python" -c "" >/dev/null 2>&1; then
    rm -rf "$VENV"   # broken venv (e.g. its base python moved): make it anew
    echo "venv: removed a broken $VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    echo "venv: created $VENV"
else
    echo "venv: exists at $VENV"
fi
if "$VENV/bin/python" -c "import aiosmtpd" >/dev/null 2>&1; then
    echo "aiosmtpd: already installed ($("$VENV/bin/python" -c 'import aiosmtpd; print(aiosmtpd.__version__)'))"
else
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$AIOSMTPD_SPEC"
    echo "aiosmtpd: installed $AIOSMTPD_SPEC into $VENV"
fi
