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
# llama.cpp as an independent GGUF reader (tests/test_export_llamacpp.py): node-llama-cpp with its prebuilt CPU
# binary, pinned in tests/llamacpp/package.json and its lock (npm install, not npm ci: ci refuses a lock without
# the other platforms' optional builds). Optional packages (CUDA/Vulkan builds, ~700 MB) are left out and the
# postinstall step (which may try to build) is not run: nothing is compiled. 85 MB, about 15 s.
if ! command -v node >/dev/null 2>&1; then
    echo "test-tools: installing nodejs and npm"
    apt_install nodejs npm
fi
LLAMACPP=tests/llamacpp/node_modules
if [ ! -d "$LLAMACPP/@node-llama-cpp/linux-x64" ] || [ ! -d "$LLAMACPP/node-llama-cpp/dist" ]; then
    echo "test-tools: installing node-llama-cpp (llama.cpp prebuilt for the CPU)"
    (cd tests/llamacpp && npm install --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
fi

echo "test-tools: ready (chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}'), node $(node --version)," \
     "node-llama-cpp $(node -p "require('./tests/llamacpp/node_modules/node-llama-cpp/package.json').version"))"
