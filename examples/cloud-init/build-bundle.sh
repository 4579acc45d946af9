#!/usr/bin/env bash
# Build the bundle that a VM onboarding itself with cloud-init (examples/cloud-init/user-data.yaml)
# downloads from the controller at first boot: everything mesh.yml needs on the VM, so that the VM
# fetches nothing from the internet or a package mirror (docs/user-guide.md, "Onboarding at first boot
# with cloud-init"). Its contents:
#
#   ztmesh/         this repository's files as they are checked out here (playbooks, roles, modules)
#   ztmesh/.cache/wheelhouse/<digest>-cpXY-ARCH*
#                   the ztmesh runtime for the VM's Python, built here as mesh.yml builds it
#                   (roles/ztproxy/files/wheelhouse.py), so the VM's run finds it complete
#   ansible/        ansible-core (this controller's version) for the VM's Python, and run-playbook,
#                   which runs ansible-playbook from there without touching the VM's system Python
#   packages/       the air-gapped package repository for the data plane tools
#                   (scripts/fetch-node-packages.sh; the VM's run uses ztmesh_package_source controller)
#   inventory.yml   the mesh inventory the VM converges with (--inventory)
#
# Usage: examples/cloud-init/build-bundle.sh --inventory FILE [--packages DIR] [--python-version X.Y]
#                                            [--arch ARCH] OUTDIR
#   --packages        an existing package repository (default: made with scripts/fetch-node-packages.sh,
#                     which needs a controller of the VMs' distribution release)
#   --python-version  the VMs' python3 (default 3.11, Debian 12), --arch their machine (default x86_64)
# Writes OUTDIR/ztmesh-bundle.tar.gz and OUTDIR/ztmesh-bundle.tar.gz.sha256 and prints the SHA-256
# (for ZTMESH_BUNDLE_SHA256 in the user-data) on its last line. Building needs PyPI (or the mirror pip is
# configured with) on the controller, as mesh.yml's own runtime build does; serving it needs only a
# static web server the VMs reach, e.g. `python3 -m http.server --directory OUTDIR --bind ADDRESS 8080`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
inventory=""
packages=""
pyver=3.11
arch=x86_64
while [ $# -gt 1 ]; do
    case "$1" in
        --inventory) inventory="$2"; shift 2 ;;
        --packages) packages="$2"; shift 2 ;;
        --python-version) pyver="$2"; shift 2 ;;
        --arch) arch="$2"; shift 2 ;;
        *) break ;;
    esac
done
[ $# -eq 1 ] && [ -n "$inventory" ] || {
    echo "usage: $0 --inventory FILE [--packages DIR] [--python-version X.Y] [--arch ARCH] OUTDIR" >&2
    exit 2
}
out="$(mkdir -p "$1" && cd "$1" && pwd)"
[ -f "$inventory" ] || { echo "[bundle] no inventory $inventory" >&2; exit 1; }
python="${ZTMESH_CONTROLLER_PYTHON:-$REPO/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
ansible_version="$("$python" -c 'import ansible.release; print(ansible.release.__version__)')"

work="$(mktemp -d "${TMPDIR:-/tmp}/ztmesh-bundle.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bundle/ztmesh" "$work/bundle/packages"

# The repository's files (tracked and new, as checked out; nothing ignored, so no caches or secrets).
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) \
    | tar -C "$REPO" --null -T - -cf - | tar -C "$work/bundle/ztmesh" -xf -

# The ztmesh runtime for the VM's Python, with the same builder and cache mesh.yml uses.
runtime="$("$python" "$REPO/roles/ztproxy/files/wheelhouse.py" --source "$REPO" \
    --cache "$REPO/.cache/wheelhouse" --constraints "$REPO/roles/ztproxy/files/constraints.txt" \
    --python-version "$pyver" --arch "$arch")"
mkdir -p "$work/bundle/ztmesh/.cache/wheelhouse"
for path in $("$python" -c 'import json, sys; r = json.loads(sys.argv[1]); print(r["path"], r["archive"])' "$runtime"); do
    cp -a "$path" "$work/bundle/ztmesh/.cache/wheelhouse/"
done

# ansible-core for the VM's Python (cached per version, Python and architecture).
ansible_cache="$REPO/.cache/cloud-init-bundle/ansible-core-$ansible_version-cp${pyver/./}-$arch"
if [ ! -f "$ansible_cache/.complete" ]; then
    rm -rf "$ansible_cache"
    "$python" -m pip install --quiet --disable-pip-version-check --no-compile --target "$ansible_cache" \
        --implementation cp --python-version "$pyver" --only-binary=:all: \
        --platform "manylinux2014_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux_2_28_$arch" \
        "ansible-core==$ansible_version"
    rm -rf "$ansible_cache/bin" "$ansible_cache/ansible_test"
    touch "$ansible_cache/.complete"
fi
cp -a "$ansible_cache" "$work/bundle/ansible"
rm -f "$work/bundle/ansible/.complete"
cat > "$work/bundle/ansible/run-playbook" <<'EOF'
#!/usr/bin/env python3
"""ansible-playbook from this directory (the bundle's ansible-core), for the node's python3."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
from ansible.cli.playbook import main  # noqa: E402

sys.argv[0] = "ansible-playbook"
main()
EOF
chmod 0755 "$work/bundle/ansible/run-playbook"

# The package repository of the air-gapped mode.
if [ -z "$packages" ]; then
    packages="$("$REPO/scripts/fetch-node-packages.sh" | tail -n 1)"
fi
[ -s "$packages/Packages" ] || { echo "[bundle] $packages is no package repository (no Packages index)" >&2; exit 1; }
cp -a "$packages/." "$work/bundle/packages/"

cp "$inventory" "$work/bundle/inventory.yml"
tar -C "$work/bundle" -czf "$out/ztmesh-bundle.tar.gz.new" .
mv "$out/ztmesh-bundle.tar.gz.new" "$out/ztmesh-bundle.tar.gz"
digest="$(sha256sum "$out/ztmesh-bundle.tar.gz" | cut -d' ' -f1)"
echo "$digest  ztmesh-bundle.tar.gz" > "$out/ztmesh-bundle.tar.gz.sha256"
echo "[bundle] $out/ztmesh-bundle.tar.gz ($(du -h "$out/ztmesh-bundle.tar.gz" | cut -f1)): ansible-core $ansible_version, runtime for Python $pyver $arch" >&2
echo "$digest"
