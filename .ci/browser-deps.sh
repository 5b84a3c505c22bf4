#!/usr/bin/env bash
# Headless Chromium for the Space's browser test (tests/publish/test_space_app.py), from Debian.
# Idempotent: does nothing when /usr/bin/chromium is already there. Playwright drives this
# binary (executable_path); it never downloads a browser of its own.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium
/usr/bin/chromium --version
