#!/usr/bin/env bash
# Fill a directory with the Debian packages ztmesh brings to a Debian 12 node whose operator wants
# nothing fetched by the node itself (the inventory's `ztmesh_package_source: controller`,
# docs/user-guide.md "Air-gapped nodes"): the data plane tools (iptables, ipset, nftables, procps)
# with every package they depend on, as a flat apt repository (the .deb files and their Packages
# index). Run it on a Debian 12 controller of the nodes' architecture; it downloads from the
# controller's own apt sources, so the nodes need none.
#
# Usage: scripts/fetch-node-packages.sh [DIR [PACKAGE...]]
#   DIR      default: .cache/node-packages/<release>-<arch>
#   PACKAGE  default: the data plane tools; the tests also make a repository of their test clients
#            (curl, iperf3, ...) this way, so test nodes fetch nothing either.
# Prints the directory on its last line. Cached: a complete directory made for the same packages is
# reused.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The packages of the data plane tools (roles/ztproxy/defaults/main.yml, ztproxy_dataplane_tools).
TOOLS_PACKAGES=(iptables ipset nftables procps)

. /etc/os-release
arch="$(dpkg --print-architecture)"
OUT="${1:-$REPO/.cache/node-packages/${ID}${VERSION_ID:-}-$arch}"
# Absolute: apt-get download runs in a subshell that changes into it.
OUT="$(realpath -m "$OUT")"
[ $# -gt 1 ] && TOOLS_PACKAGES=("${@:2}")
wanted="${TOOLS_PACKAGES[*]}"

if [ -s "$OUT/Packages" ] && [ "$(cat "$OUT/.complete" 2>/dev/null)" = "$wanted" ]; then
    echo "[node-packages] cached: $OUT" >&2
    echo "$OUT"
    exit 0
fi
for tool in apt-get apt-cache dpkg-scanpackages; do
    command -v "$tool" >/dev/null || {
        echo "[node-packages] needs $tool (apt and dpkg-dev) on this Debian controller" >&2
        exit 1
    }
done

mkdir -p "$OUT"
rm -f "$OUT/.complete" "$OUT"/*.deb
# Every package the tools depend on, transitively (alternatives and virtual packages included:
# apt on the node picks what it needs from the repository and leaves the rest).
mapfile -t closure < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances "${TOOLS_PACKAGES[@]}" | grep -v '^[ <]' | sort -u)
echo "[node-packages] downloading ${#closure[@]} packages into $OUT" >&2
# apt-get download writes into the current directory; as root it drops to the _apt user, which must
# be able to write there.
chmod 0755 "$OUT"
# Package lists older than the mirror name versions it no longer has: refresh them once and retry.
(cd "$OUT" && apt-get download -q "${closure[@]}" >/dev/null 2>"$OUT/.download-errors") \
    || { apt-get update -qq && (cd "$OUT" && apt-get download -q "${closure[@]}" >/dev/null 2>"$OUT/.download-errors"); } || {
    # A virtual package that no real one provides under its own name cannot be downloaded; the rest
    # must be there.
    echo "[node-packages] apt-get download reported:" >&2
    cat "$OUT/.download-errors" >&2
}
for pkg in "${TOOLS_PACKAGES[@]}"; do
    compgen -G "$OUT/${pkg}_*.deb" >/dev/null || {
        echo "[node-packages] $pkg was not downloaded; see the messages above" >&2
        exit 1
    }
done
(cd "$OUT" && dpkg-scanpackages --multiversion . /dev/null >Packages 2>/dev/null)
rm -f "$OUT/.download-errors"
echo "$wanted" >"$OUT/.complete"
echo "[node-packages] $(find "$OUT" -name '*.deb' | wc -l) packages, $(du -sh "$OUT" | cut -f1)" >&2
echo "$OUT"
