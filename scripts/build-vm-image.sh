#!/usr/bin/env bash
# Build the virtual machine image of the vm test tier: a Debian 12 root file system with the
# distribution's cloud kernel, as kernel + initrd + ext4 image under .cache/vm/<variant>-<recipe-hash>/.
#
#   scripts/build-vm-image.sh [--variant base|cloud-init] [--force]
#
# base        images/vm/packages.txt: a ztmesh node baseline as a cloud image has it (systemd, python3,
#             openssh-server, iproute2, apt), nothing ztmesh brings itself.
# cloud-init  the same plus images/vm/packages-cloud-init.txt (cloud-init, as a cloud image has it).
#
# Cached: rebuilt only when this script or the package lists change. Prints the directory it built (or
# found) on its last line. The directory holds vmlinuz, initrd.img, root.img, the SSH key that logs in
# as root (id_ed25519) and network.json (the VM network the image is configured for, below).
#
# Network: every VM of the tier has one virtio NIC on a private host bridge. The image carries one
# systemd-networkd file per test MAC address (52:54:00:21:37:0N -> 10.213.77.1N/24, N = 1..8), so each
# VM gets its fixed address from its MAC alone, without a kernel argument and without DHCP; no gateway,
# so a VM reaches nothing but the bridge. MAC ...:09 has no file: it is left to cloud-init's
# network-config (the cloud-init VM). Any other NIC (qemu's user-mode network) uses DHCP.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
variant=base
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --variant) variant="$2"; shift 2 ;;
        --force) force=1; shift ;;
        *) echo "usage: $0 [--variant base|cloud-init] [--force]" >&2; exit 2 ;;
    esac
done
lists=("$REPO/images/vm/packages.txt")
case "$variant" in
    base) ;;
    cloud-init) lists+=("$REPO/images/vm/packages-cloud-init.txt") ;;
    *) echo "[vm-image] unknown variant $variant (base, cloud-init)" >&2; exit 2 ;;
esac

SUBNET=10.213.77
MAC_PREFIX=52:54:00:21:37
hash="$(cat "$0" "${lists[@]}" | sha256sum | cut -c1-12)"
OUT="$REPO/.cache/vm/$variant-$hash"
DEBS="$REPO/.cache/vm-build/debs"

if [ -f "$OUT/done" ] && [ "$force" = 0 ]; then
    echo "[vm-image] cached: $OUT" >&2
    echo "$OUT"
    exit 0
fi
for tool in debootstrap mke2fs ssh-keygen; do
    command -v "$tool" >/dev/null || { echo "[vm-image] $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done

# Same Debian mirror as this machine's apt configuration (override: ZTMESH_DEBIAN_MIRROR).
MIRROR="${ZTMESH_DEBIAN_MIRROR:-}"
if [ -z "$MIRROR" ]; then
    MIRROR="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
fi
if [ -z "$MIRROR" ]; then
    MIRROR="$(awk '$1 == "deb" && $3 ~ /bookworm$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
fi
if [ -z "$MIRROR" ]; then
    echo "[vm-image] cannot find a Debian mirror in /etc/apt/sources.list(.d); set ZTMESH_DEBIAN_MIRROR" >&2
    exit 1
fi

start=$(date +%s)
mkdir -p "$DEBS" "$REPO/.cache/vm"
work="$(mktemp -d /var/tmp/ztmesh-vm.XXXXXX)"
trap 'umount -lf "$work/root/proc" 2>/dev/null || true; rm -rf "$work" "$OUT.tmp"' EXIT
root="$work/root"
packages="$(cat "${lists[@]}" | sed -e 's/#.*//' -e 's/[[:space:]]//g' | grep -v '^$' | paste -sd, -)"
echo "[vm-image] debootstrap bookworm ($variant) from $MIRROR with: $packages" >&2
debootstrap --variant=minbase --cache-dir="$DEBS" --include="$packages" bookworm "$root" "$MIRROR" \
    >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    cp "$work/debootstrap.log" "$REPO/.cache/vm-build/debootstrap-$variant.log" || true
    exit 1
}

rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
ssh-keygen -q -t ed25519 -N "" -C "ztmesh-vm-tier" -f "$OUT.tmp/id_ed25519"
install -d -m 0700 "$root/root/.ssh"
install -m 0600 "$OUT.tmp/id_ed25519.pub" "$root/root/.ssh/authorized_keys"

# The hostname of each VM comes from the kernel command line (systemd.hostname=), or from cloud-init.
echo "ztmesh-vm" > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 ztmesh-vm\n' > "$root/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$root/etc/fstab"

install -d "$root/etc/systemd/network"
for n in 1 2 3 4 5 6 7 8; do
    cat > "$root/etc/systemd/network/10-ztmesh-vm$n.network" <<EOF
# VM $n of the vm test tier (scripts/build-vm-image.sh): fixed address by MAC, no gateway.
[Match]
MACAddress=$MAC_PREFIX:0$n

[Network]
Address=$SUBNET.1$n/24
LinkLocalAddressing=no
IPv6AcceptRA=no
EOF
done
cat > "$root/etc/systemd/network/90-dhcp.network" <<'EOF'
# Any other NIC (qemu's user-mode network): DHCP. The kernel's ip= argument is not applied for a local
# root, hence a file.
[Match]
Name=en*
MACAddress=!52:54:00:21:37:09

[Network]
DHCP=ipv4
EOF
chroot "$root" systemctl enable systemd-networkd ssh >/dev/null 2>&1
# Root logs in with the key only; no password exists.
sed -i 's/^#\?PermitRootLogin.*/PermitRootLogin prohibit-password/' "$root/etc/ssh/sshd_config"
# A fixed machine-id is harmless for a throwaway test VM and avoids first-boot work (presets).
chroot "$root" systemd-machine-id-setup >/dev/null 2>&1 || true
# Nothing in the tier needs these; under software emulation they slow the boot or run at random times
# (a background apt run would change the package list between two snapshots).
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service \
    e2scrub_all.timer fstrim.timer systemd-timesyncd.service >/dev/null 2>&1 || true
if [ "$variant" = cloud-init ]; then
    # Only the NoCloud seed of the tier (a disk labelled cidata): no probing of cloud metadata servers.
    # Its locale is the one the image has (C.UTF-8, as Debian's cloud images set it): without the
    # locales package cloud-init's default (en_US.UTF-8) cannot be generated.
    printf 'datasource_list: [NoCloud, None]\nlocale: C.UTF-8\n' > "$root/etc/cloud/cloud.cfg.d/90-ztmesh-vm-tier.cfg"
    printf 'LANG=C.UTF-8\n' > "$root/etc/default/locale"
fi

cat > "$OUT.tmp/network.json" <<EOF
{"subnet": "$SUBNET.0/24", "host_address": "$SUBNET.1", "prefix": 24,
 "vms": {$(for n in 1 2 3 4 5 6 7 8; do printf '"%s": "%s"%s' "$MAC_PREFIX:0$n" "$SUBNET.1$n" "$([ $n = 8 ] || echo ', ')"; done)},
 "cloud_init_mac": "$MAC_PREFIX:09", "cloud_init_address": "$SUBNET.19"}
EOF
cp "$root"/boot/vmlinuz-* "$OUT.tmp/vmlinuz"
cp "$root"/boot/initrd.img-* "$OUT.tmp/initrd.img"
chmod 0644 "$OUT.tmp/vmlinuz" "$OUT.tmp/initrd.img"
chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' | sort > "$OUT.tmp/packages.list"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*_Packages
mke2fs -q -t ext4 -d "$root" -L ztmesh-vm "$OUT.tmp/root.img" 2G
touch "$OUT.tmp/done"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
# Older builds of this variant are removed (a running test keeps its files open).
for old in "$REPO/.cache/vm/$variant"-*; do
    [ "$old" = "$OUT" ] || rm -rf "$old"
done
echo "[vm-image] built $OUT in $(( $(date +%s) - start )) s" >&2
echo "$OUT"
