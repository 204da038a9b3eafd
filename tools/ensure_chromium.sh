#!/usr/bin/env bash
# The browser tests need Debian's chromium at /usr/bin/chromium (never a Playwright download). Install it when this
# machine can (root with apt-get); otherwise say in one line what to do and exit 2, before any test runs.
set -uo pipefail
CHROMIUM=${TRANSFERKIT_CHROMIUM:-/usr/bin/chromium}  # overridable for its own test
[ -x "$CHROMIUM" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: the browser tests need $CHROMIUM and this machine has no apt-get: install Chromium there, then rerun" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "error: the browser tests need $CHROMIUM: run 'apt-get install -y chromium' as root, then rerun" >&2
  exit 2
fi
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo -n")
echo "installing Debian's chromium for the browser tests (apt-get)..." >&2
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium; } >/tmp/transferkit-chromium.log 2>&1; then
  echo "error: could not install chromium with apt-get (log: /tmp/transferkit-chromium.log): install it, then rerun" >&2
  exit 2
fi
[ -x "$CHROMIUM" ] || { echo "error: apt-get installed chromium but $CHROMIUM is missing" >&2; exit 2; }
