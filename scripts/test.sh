#!/usr/bin/env bash
# The README's test command: set up this machine, then run every test tier it supports
# (unit, netns, molecule, vm) and the linters. A tier that cannot run is skipped with its reason
# printed in the summary. Extra arguments go to pytest (e.g. -m unit, -k tunnel).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=scripts/setup.sh
source "$REPO/scripts/setup.sh"

export ANSIBLE_CONFIG="$REPO/ansible.cfg"
export PYTHONDONTWRITEBYTECODE=1
ulimit -n 20000 2>/dev/null || true

echo "[test] pytest: all tiers (unit, netns, molecule, vm); skipped tiers are listed with their reason"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
