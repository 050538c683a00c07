#!/usr/bin/env bash
# Install what tests need from Debian when it is missing: chromium for the browser
# tests, libfaketime for the chaos suite's skewed-clock worker.
# `playwright install` downloads browsers from a CDN, which is not possible here;
# Playwright drives the distribution's build through executable_path instead.
set -u

BROWSER=/usr/bin/chromium
FAKETIME=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1
[ -x "$BROWSER" ] && [ -e "$FAKETIME" ] && exit 0

if ! command -v apt-get >/dev/null; then
  echo "chromium is missing and apt-get is not available; browser tests will not run" >&2
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then
    SUDO="sudo -n"
  else
    echo "chromium is missing and installing it needs root; browser tests will not run" >&2
    exit 0
  fi
fi

echo "installing chromium and libfaketime for the tests (apt-get)"
$SUDO apt-get update -qq || echo "apt-get update failed; trying the cached package lists" >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  chromium fonts-dejavu-core libfaketime >/dev/null \
  || echo "could not install chromium and libfaketime; their tests will fail" >&2
exit 0
