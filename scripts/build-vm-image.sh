#!/usr/bin/env bash
# Build the virtual machine of the vm test tier: a Debian 12 root file system with the cloud kernel,
# as kernel + initrd + ext4 image under .cache/vm/<recipe-hash>/. Cached: rebuilt only when this
# script or images/vm/packages.txt changes. Prints the directory it built (or found) on its last line.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PACKAGES_FILE="$REPO/images/vm/packages.txt"
hash="$(cat "$0" "$PACKAGES_FILE" | sha256sum | cut -c1-12)"
OUT="$REPO/.cache/vm/$hash"

if [ -f "$OUT/done" ]; then
    echo "[vm-image] cached: $OUT" >&2
    echo "$OUT"
    exit 0
fi

# Same Debian mirror as this machine's apt configuration.
MIRROR="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
if [ -z "$MIRROR" ]; then
    MIRROR="$(awk '$1 == "deb" && $3 ~ /bookworm$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
fi
if [ -z "$MIRROR" ]; then
    echo "[vm-image] cannot find a Debian mirror in /etc/apt/sources.list(.d)" >&2
    exit 1
fi

start=$(date +%s)
work="$(mktemp -d /var/tmp/ztmesh-vm.XXXXXX)"
trap 'umount -lf "$work/root/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
root="$work/root"
packages="$(grep -v '^#' "$PACKAGES_FILE" | grep -v '^$' | paste -sd, -)"
echo "[vm-image] debootstrap bookworm from $MIRROR with: $packages" >&2
debootstrap --variant=minbase --include="$packages" bookworm "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
}

mkdir -p "$OUT.tmp"
rm -f "$OUT.tmp"/*
ssh-keygen -q -t ed25519 -N "" -C "ztmesh-vm-tier" -f "$OUT.tmp/id_ed25519"
install -d -m 0700 "$root/root/.ssh"
install -m 0600 "$OUT.tmp/id_ed25519.pub" "$root/root/.ssh/authorized_keys"

echo "ztmesh-vm" > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 ztmesh-vm\n' > "$root/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$root/etc/fstab"
# qemu's user-mode network: DHCP on the first NIC (static files, since the kernel's ip= argument is
# not applied for a local root).
install -d "$root/etc/systemd/network"
printf '[Match]\nName=en*\n\n[Network]\nDHCP=ipv4\n' > "$root/etc/systemd/network/10-uplink.network"
chroot "$root" systemctl enable systemd-networkd ssh >/dev/null 2>&1
# Root logs in with the key only; no password exists.
sed -i 's/^#\?PermitRootLogin.*/PermitRootLogin prohibit-password/' "$root/etc/ssh/sshd_config"
# A fixed machine-id is harmless for a throwaway test VM and avoids first-boot work.
chroot "$root" systemd-machine-id-setup >/dev/null 2>&1 || true
# Nothing in the test needs these; they slow the boot under software emulation.
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service \
    systemd-timesyncd.service >/dev/null 2>&1 || true

cp "$root"/boot/vmlinuz-* "$OUT.tmp/vmlinuz"
cp "$root"/boot/initrd.img-* "$OUT.tmp/initrd.img"
chmod 0644 "$OUT.tmp/vmlinuz" "$OUT.tmp/initrd.img"
rm -rf "$root"/var/cache/apt/archives/*.deb
mke2fs -q -t ext4 -d "$root" -L ztmesh-vm "$OUT.tmp/root.img" 2G
touch "$OUT.tmp/done"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
echo "[vm-image] built $OUT in $(( $(date +%s) - start )) s" >&2
echo "$OUT"
