#!/usr/bin/env bash
# Install stagewise with its test tools, then headless Chromium + ChromeDriver for the browser
# test of `stagewise serve` (tests/test_serve.py).
#
# Chromium comes from Debian's packages (chromium, chromium-driver): installed with apt-get when
# this runs as root or with password-less sudo. Elsewhere (no apt-get, no root) the Python part
# is still installed, this script says so, and the browser test is skipped with that reason.
# In CI (CI=true) a missing browser is an error, so the browser test cannot be skipped unnoticed.
set -euo pipefail
cd "$(dirname "$0")"

python3 -m pip install -e ".[test]"

have_browser() { command -v chromedriver >/dev/null 2>&1 && { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; }

if have_browser; then
  echo "install.sh: Chromium and ChromeDriver are installed ($(command -v chromium || command -v chromium-browser), $(command -v chromedriver))"
  exit 0
fi

sudo_cmd=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo_cmd="sudo -n"; fi
fi
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$sudo_cmd" ]; }; then
  echo "install.sh: installing Chromium and ChromeDriver with apt-get (for the browser test)"
  if $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -q \
      && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; then
    have_browser && exit 0
  fi
  echo "install.sh: apt-get could not install chromium and chromium-driver." >&2
else
  echo "install.sh: Chromium/ChromeDriver are not installed and cannot be installed here (that needs apt-get, as root or with sudo)." >&2
fi
echo "install.sh: stagewise is installed; the browser test will be SKIPPED. To run it, install Debian's chromium and chromium-driver (or set STAGEWISE_CHROMIUM and STAGEWISE_CHROMEDRIVER to a Chromium and its matching driver)." >&2
if [ "${CI:-}" = "true" ]; then
  echo "install.sh: CI must run the browser test: failing." >&2
  exit 1
fi
