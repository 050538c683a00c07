#!/usr/bin/env bash
# Install what tests need when it is missing: chromium for the browser tests and
# libfaketime for the chaos suite's skewed-clock worker (from Debian), and axe-core
# for the accessibility test (from npm, pinned, into .agentloop/node, which git
# ignores). `playwright install` downloads browsers from a CDN, which is not
# possible here; Playwright drives the distribution's build through
# executable_path instead.
set -u

AXE_VERSION=4.14.1
AXE_DIR="$(cd "$(dirname "$0")/.." && pwd)/.agentloop/node"
ensure_axe() {
  local installed="$AXE_DIR/node_modules/axe-core/package.json"
  if [ -e "$installed" ] && grep -q "\"version\": \"$AXE_VERSION\"" "$installed"; then
    return 0
  fi
  if ! command -v npm >/dev/null; then
    echo "npm is missing: axe-core $AXE_VERSION is not installed; the accessibility test will not run" >&2
    return 0
  fi
  echo "installing axe-core $AXE_VERSION for the accessibility test (npm)"
  mkdir -p "$AXE_DIR"
  npm install --silent --no-audit --no-fund --no-save --prefix "$AXE_DIR" "axe-core@$AXE_VERSION" >/dev/null \
    || echo "could not install axe-core $AXE_VERSION; the accessibility test will fail" >&2
}
ensure_axe

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
