#!/bin/sh
# Install Debian's chromium for the browser test (tests/test_browser.py, marker "browser").
# Idempotent: does nothing when /usr/bin/chromium already exists. CI runs this as root.
# Playwright drives this system browser (executable_path=/usr/bin/chromium); never run
# `playwright install`, which downloads its own browsers.
set -eu

if [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -n "$0" "$@"
    fi
    echo "install-chromium.sh: needs root (apt-get) and sudo is not available" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version
