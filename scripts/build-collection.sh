#!/usr/bin/env bash
# Build the collection ztmesh.mesh (ztmesh-mesh-<version>.tar.gz) from this checkout:
#   scripts/build-collection.sh [OUTPUT_DIR]        (default: dist/)
#   ansible-galaxy collection install dist/ztmesh-mesh-*.tar.gz [-p COLLECTIONS_DIR]
# ansible_collections/ztmesh/mesh is the collection as a view of the top-level directories (symbolic
# links); ansible-galaxy skips symbolic links to directories outside the collection, so the view is
# copied into a real tree first (links followed) and that tree is built. ansible-galaxy is taken from
# PATH, else from the repository's .venv.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$REPO/dist}" && cd "${1:-$REPO/dist}" && pwd)"
GALAXY="$(command -v ansible-galaxy || echo "$REPO/.venv/bin/ansible-galaxy")"
[[ -x "$GALAXY" ]] || { echo "build-collection: ansible-galaxy not found (PATH or $REPO/.venv)" >&2; exit 1; }

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
cp -rL "$REPO/ansible_collections/ztmesh/mesh" "$STAGE/mesh"
# Caches and bytecode of the checkout are not part of the collection.
find "$STAGE/mesh" \( -name __pycache__ -o -name '.*cache' -o -name .ansible -o -name '*.egg-info' \) -prune -exec rm -rf {} +
"$GALAXY" collection build "$STAGE/mesh" --output-path "$OUT" --force
