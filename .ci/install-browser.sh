#!/usr/bin/env bash
# Install headless Debian Chromium and the Playwright Python package for the fastif.report browser test.
# Idempotent: skips apt-get when /usr/bin/chromium exists and pip when playwright imports.
# Uses the system chromium on purpose; never runs `playwright install` (its browser downloads fail here).
# Run as root (or with sudo) from the repository root, with the project's virtual environment active.
set -euo pipefail

PYTHON="${PYTHON:-python}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ ! -x /usr/bin/chromium ]; then
    # Refresh the package lists only when chromium is unknown to apt (lists never fetched or stale).
    if ! apt-cache show chromium >/dev/null 2>&1; then
        $SUDO apt-get update
    fi
    # A stale package list can name files the mirror no longer has: refresh once and retry.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium \
        || { $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium; }
fi

if ! "$PYTHON" -c "import playwright" >/dev/null 2>&1; then
    "$PYTHON" -m pip install "playwright>=1.40"
fi

/usr/bin/chromium --version
"$PYTHON" -c "import playwright, importlib.metadata as m; print('playwright', m.version('playwright'))"
