#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine for ztmesh: Debian packages and the project virtualenv.
# Sourced or run by scripts/test.sh and scripts/demo.sh; safe to run again (does only what is missing).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"

# What the tests, the demo and the benchmarks use. Debian names; all from the Debian archive.
APT_PACKAGES=(
    python3 python3-venv python3-dev gcc make
    iproute2 iptables nftables ipset kmod procps util-linux
    podman runc uidmap slirp4netns fuse-overlayfs
    debootstrap qemu-system-x86 e2fsprogs dpkg-dev
    stunnel4 haproxy iperf3 tcpdump dnsutils socat netcat-openbsd curl openssl ca-certificates
    openssh-client
)

log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/setup.sh must run as root (it installs Debian packages; the tests create network namespaces)" >&2
    exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
else
    log "Debian packages: all present"
fi

# The controller's Python is Debian's python3 (3.11 on Debian 12); ansible-core 2.19 is the newest for it.
PYTHON=/usr/bin/python3
stamp="$VENV/.ztmesh-installed"
want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing ztmesh[test] into $VENV (pyproject.toml changed or first run)"
    "$VENV/bin/pip" install -q --upgrade pip wheel
    "$VENV/bin/pip" install -q -e "$REPO[test]"
    echo "$want" > "$stamp"
else
    log "virtualenv: up to date"
fi

export CONTAINERS_CONF="$REPO/podman/containers.conf"
export PATH="$VENV/bin:$PATH"
