#!/usr/bin/env bash
# Tools the tests need that PyPI does not give (pip installs the rest: bash install.sh).
# Idempotent and quiet: a tool already in place is left alone. Tests that need a missing tool skip, unless
# DESKTUNE_REQUIRE_TOOLS=1 (as .ci/run sets), where they fail and point here.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

apt_install() {  # apt_install PACKAGE...: install, refreshing the package lists only if the first try fails
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -qq -y --no-install-recommends -o Dpkg::Use-Pty=0)
    if ! $SUDO "${apt[@]}" install "$@" >/dev/null 2>&1; then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq update >/dev/null
        $SUDO "${apt[@]}" install "$@" >/dev/null
    fi
}

# --- system packages (Debian) -----------------------------------------------------------------------------
# chromium: tests/test_report.py renders the HTML report headless (DOM dump and screenshot)
if [ ! -x /usr/bin/chromium ]; then
    echo "test-tools: installing chromium"
    apt_install chromium
fi

# --- node packages ----------------------------------------------------------------------------------------
# (none yet) Node tools the tests need go here: check whether each is present first, install only what is
# missing, pin exact versions, and keep the output quiet like the section above.

echo "test-tools: ready (chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}'))"
