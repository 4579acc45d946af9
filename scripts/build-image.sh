#!/usr/bin/env bash
# Build the ztmesh test node image, localhost/ztmesh-node:<recipe-hash> (also tagged :latest).
#
# The image is a Debian bookworm minbase root file system made by debootstrap from the Debian
# mirror this machine's apt already uses, plus images/node/packages.txt, imported with
# `podman import` (no container registry is needed or contacted). It boots systemd as PID 1
# (`podman run --privileged --systemd=always IMAGE`), so the roles install real units into it.
#
# The tag is a hash of the recipe (this script and packages.txt): when an image with that tag exists
# nothing is built. Every new build is booted once and must reach `systemctl is-system-running` =
# running, otherwise the image is removed and the script fails.
#
# Usage: scripts/build-image.sh [--force] [--print-tag]
#   --force      rebuild even when the image for this recipe exists
#   --print-tag  print the image reference for the current recipe and exit
# Environment:
#   CONTAINERS_CONF       podman configuration (default: the repo's podman/containers.conf)
#   ZTMESH_DEBIAN_MIRROR  Debian mirror URL (default: the first bookworm mirror in /etc/apt/sources*)
# Needs root, debootstrap and podman (scripts/setup.sh installs them).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$REPO/scripts/build-image.sh"
PACKAGES_FILE="$REPO/images/node/packages.txt"
IMAGE_NAME="localhost/ztmesh-node"
SUITE="bookworm"
WORK_DIR="$REPO/.cache/image-build"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$REPO/podman/containers.conf}"

# Units masked in the image. Without them the node already boots to "running"; they are masked
# because a privileged container shares the host kernel, and these would act on the HOST:
MASKED_UNITS=(
    # Registers /usr/lib/binfmt.d/python3.11.conf in the host kernel's binfmt_misc, and its
    # ExecStop (`systemd-binfmt --unregister`) removes every handler the host has registered.
    systemd-binfmt.service
    proc-sys-fs-binfmt_misc.automount
    proc-sys-fs-binfmt_misc.mount
    # Would load kernel modules into the host kernel.
    systemd-modules-load.service
    # Would set the host's clock (not installed today; masked in case a package pulls it in).
    systemd-timesyncd.service
    # Would scrub or trim the host's block devices and file systems (visible when privileged).
    e2scrub_all.timer
    e2scrub_reap.service
    fstrim.timer
    # Background apt runs: network traffic from test nodes and a held dpkg lock that would make a
    # role's package task fail at random.
    apt-daily.timer
    apt-daily-upgrade.timer
)

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() { sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'; }

recipe_tag() {
    # The recipe is this script plus the package list; the tag changes when either does.
    cat "$SCRIPT" "$PACKAGES_FILE" | sha256sum | cut -c1-12
}

read_packages() {
    # One package per line; comments and blank lines ignored. Prints a comma-separated list.
    sed -e 's/#.*//' -e 's/[[:space:]]//g' "$PACKAGES_FILE" | grep -v '^$' | paste -sd, -
}

debian_mirror() {
    # The first enabled "deb" source for $SUITE in apt's configuration, in apt's reading order:
    # sources.list, then sources.list.d/*.list and *.sources (one-line and deb822 formats).
    if [[ -n "${ZTMESH_DEBIAN_MIRROR:-}" ]]; then
        printf '%s\n' "$ZTMESH_DEBIAN_MIRROR"
        return
    fi
    local file url
    local -a files=()
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for file in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "$file" ]] && files+=("$file")
    done
    for file in "${files[@]}"; do
        if [[ "$file" == *.sources ]]; then
            url="$(awk -v suite="$SUITE" -f - "$file" <<'AWK'
function flush() {
    if (!found && uris != "" && (" " types " ") ~ / deb / && enabled != "no" \
        && (" " suites " ") ~ (" " suite " ")) {
        n = split(uris, u, " ")
        for (i = 1; i <= n; i++) if (u[i] != "") { print u[i]; found = 1; break }
    }
    types = uris = suites = enabled = last = ""
}
{ gsub(/\t/, " ") }
/^ *#/ { next }
/^ *$/ { flush(); next }
/^ / {  # continuation of a multi-line field
    if (last == "uris") uris = uris " " $0
    else if (last == "suites") suites = suites " " $0
    else if (last == "types") types = types " " $0
    next
}
{
    colon = index($0, ":")
    key = tolower(substr($0, 1, colon - 1)); value = substr($0, colon + 1); last = key
    if (key == "types") types = value
    else if (key == "uris") uris = value
    else if (key == "suites") suites = value
    else if (key == "enabled") { enabled = tolower(value); gsub(/ /, "", enabled) }
}
END { flush() }
AWK
)"
        else
            url="$(awk -v suite="$SUITE" '
                { sub(/#.*/, ""); gsub(/\[[^]]*\]/, ""); sub(/^[ \t]+/, "") }
                $1 == "deb" && $3 == suite { print $2; exit }' "$file")"
        fi
        if [[ "$url" =~ ^(https?|file):// ]]; then
            printf '%s\n' "$url"
            return
        fi
    done
    die "no enabled 'deb' source for $SUITE in /etc/apt/sources.list(.d); set ZTMESH_DEBIAN_MIRROR to a Debian mirror URL"
}

use_apt_proxy() {
    # debootstrap does not read apt's configuration: pass on a configured apt proxy.
    local http_proxy_apt="" https_proxy_apt=""
    eval "$(apt-config shell http_proxy_apt Acquire::http::Proxy https_proxy_apt Acquire::https::Proxy)"
    if [[ -z "${http_proxy:-}" && -n "$http_proxy_apt" && "$http_proxy_apt" != DIRECT ]]; then
        export http_proxy="$http_proxy_apt"
        log "using apt's HTTP proxy $http_proxy"
    fi
    if [[ -z "${https_proxy:-}" && -n "$https_proxy_apt" && "$https_proxy_apt" != DIRECT ]]; then
        export https_proxy="$https_proxy_apt"
    fi
}

ROOTFS=""
CHECK_CONTAINER=""
cleanup() {
    # Runs on every exit, also after an error: must not stop half-way.
    set +e
    if [[ -n "$CHECK_CONTAINER" ]]; then
        podman rm --force --time 0 "$CHECK_CONTAINER" >/dev/null 2>&1 || true
    fi
    if [[ -n "$ROOTFS" && -d "$ROOTFS" ]]; then
        # debootstrap mounts /proc and /sys inside the target; a failed run can leave them mounted,
        # and rm must never descend into them.
        findmnt --list --noheadings --output TARGET | grep -F "$ROOTFS/" | sort -r \
            | while read -r mountpoint; do umount --lazy "$mountpoint"; done
        rm -rf --one-file-system "$ROOTFS"
    fi
}

customize_rootfs() {
    local root="$1" unit
    # An empty machine-id gives every container its own (transient) ID at boot, without
    # systemd's first-boot setup.
    : >"$root/etc/machine-id"
    rm -f "$root/var/lib/dbus/machine-id"
    ln -s /etc/machine-id "$root/var/lib/dbus/machine-id"
    # debootstrap copies the build host's names and resolver; podman provides its own at run time.
    echo ztmesh-node >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    : >"$root/etc/resolv.conf"

    ln -sf /lib/systemd/system/multi-user.target "$root/etc/systemd/system/default.target"
    for unit in "${MASKED_UNITS[@]}"; do
        ln -sf /dev/null "$root/etc/systemd/system/$unit"
    done
    # systemd-sysctl stays: it re-applies the net.* keys ztmesh persists in /etc/sysctl.d when a node
    # restarts (those are per network namespace). The distribution's defaults are disabled (a link to
    # /dev/null in /etc/sysctl.d overrides the file of the same name): they set keys such as
    # fs.protected_regular that are not namespaced, so a privileged container would write them to the
    # host kernel.
    local conf
    for conf in "$root"/usr/lib/sysctl.d/*.conf; do
        if [[ -e "$conf" ]]; then
            ln -sf /dev/null "$root/etc/sysctl.d/$(basename "$conf")"
        fi
    done

    # No SSH host keys in the image (every node would share them): made at the first start of ssh.
    rm -f "$root"/etc/ssh/ssh_host_*
    mkdir -p "$root/etc/systemd/system/ssh.service.d"
    cat >"$root/etc/systemd/system/ssh.service.d/ztmesh-host-keys.conf" <<'UNIT'
# Added by ztmesh's scripts/build-image.sh: host keys are generated per container.
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
UNIT

    # Smaller image: no package caches or lists (as cloud images ship), no logs. The documentation stays:
    # dpkg knows those files, and a later package removal rewrites the file lists of every package
    # whose files were deleted behind its back, which the uninstall scenario would see as a change.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
        "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/log/apt/*
}

SYSTEMD_STATE=""
wait_for_systemd() {
    # Sets SYSTEMD_STATE to the container's `systemctl is-system-running` once boot has finished
    # (running, degraded, ...), or to "" after the timeout. Until PID 1 has its bus socket up,
    # systemctl cannot even connect, so it is retried.
    local container="$1" deadline=$((SECONDS + $2))
    SYSTEMD_STATE=""
    while ((SECONDS < deadline)); do
        SYSTEMD_STATE="$(podman exec "$container" timeout $((deadline - SECONDS + 1)) \
            systemctl is-system-running --wait 2>/dev/null || true)"
        case "$SYSTEMD_STATE" in
            "" | offline | initializing | starting) sleep 1 ;;
            *) return 0 ;;
        esac
    done
    SYSTEMD_STATE=""
}

boot_check() {
    # Boot the new image the way molecule and scripts/fleet.sh do and require a clean systemd.
    local image="$1" state
    CHECK_CONTAINER="ztmesh-image-check-$$"
    podman run --detach --name "$CHECK_CONTAINER" --privileged --systemd=always --network none \
        "$image" >/dev/null
    wait_for_systemd "$CHECK_CONTAINER" 90
    state="$SYSTEMD_STATE"
    if [[ "$state" != running ]]; then
        log "systemd in the new image is '${state:-unreachable}', not 'running'; failed units:"
        podman exec "$CHECK_CONTAINER" systemctl --failed --no-legend >&2 || true
        return 1
    fi
    log "boot check: systemd reached '$state'"
    podman rm --force --time 0 "$CHECK_CONTAINER" >/dev/null
    CHECK_CONTAINER=""
}

main() {
    local force=0 print_tag=0
    while (($#)); do
        case "$1" in
            --force) force=1 ;;
            --print-tag) print_tag=1 ;;
            -h | --help) usage; exit 0 ;;
            *) die "unknown argument '$1' (see --help)" ;;
        esac
        shift
    done

    local tag image
    tag="$(recipe_tag)"
    image="$IMAGE_NAME:$tag"
    if ((print_tag)); then
        printf '%s\n' "$image"
        exit 0
    fi

    [[ $EUID -eq 0 ]] || die "must run as root (debootstrap and privileged podman)"
    local tool
    for tool in debootstrap podman flock findmnt; do
        command -v "$tool" >/dev/null || die "'$tool' not found; install it: apt-get install debootstrap podman runc util-linux"
    done

    mkdir -p "$WORK_DIR/debs"
    # One build at a time (the molecule tier and fleet.sh may both ask for the image).
    exec 9>"$WORK_DIR/build.lock"
    flock 9

    if ((!force)) && podman image exists "$image"; then
        podman tag "$image" "$IMAGE_NAME:latest"
        log "cached: $image exists for this recipe (tagged $IMAGE_NAME:latest); nothing built"
        exit 0
    fi

    local mirror packages started
    mirror="$(debian_mirror)"
    packages="$(read_packages)"
    [[ -n "$packages" ]] || die "$PACKAGES_FILE lists no packages"
    use_apt_proxy
    started=$SECONDS

    trap cleanup EXIT
    rm -f "$WORK_DIR"/debootstrap*.log
    ROOTFS="$(mktemp -d "$WORK_DIR/rootfs.XXXXXX")"
    log "building $image: debootstrap --variant=minbase $SUITE from $mirror"
    log "packages: $packages"
    if ! debootstrap --variant=minbase --include="$packages" --cache-dir="$WORK_DIR/debs" \
        "$SUITE" "$ROOTFS" "$mirror" >"$WORK_DIR/debootstrap.log" 2>&1; then
        # The target's own log says which package failed to configure, and why.
        cp "$ROOTFS/debootstrap/debootstrap.log" "$WORK_DIR/debootstrap-target.log" 2>/dev/null || true
        tail -n 30 "$WORK_DIR/debootstrap-target.log" "$WORK_DIR/debootstrap.log" >&2 2>/dev/null || true
        die "debootstrap failed (logs: $WORK_DIR/debootstrap.log, $WORK_DIR/debootstrap-target.log)"
    fi
    log "debootstrap done after $((SECONDS - started)) s"
    customize_rootfs "$ROOTFS"

    tar --numeric-owner -C "$ROOTFS" -cf - . | podman import \
        --change 'CMD ["/sbin/init"]' \
        --change 'STOPSIGNAL=SIGRTMIN+3' \
        --change "LABEL=org.ztmesh.recipe=$tag" \
        --message "ztmesh node image, recipe $tag" --quiet \
        - "$image" >/dev/null
    if ! boot_check "$image"; then
        podman rmi --force "$image" >/dev/null 2>&1 || true
        die "the image does not boot cleanly; fix the recipe (MASKED_UNITS or packages.txt)"
    fi
    podman tag "$image" "$IMAGE_NAME:latest"
    log "built $image (tagged $IMAGE_NAME:latest) in $((SECONDS - started)) s"
    remove_old_images "$tag"
}

remove_old_images() {
    # Older recipes' images are removed unless a container still uses them.
    local keep="$1" ref
    podman images --format '{{.Repository}}:{{.Tag}}' --filter "reference=$IMAGE_NAME" \
        | while read -r ref; do
            case "$ref" in
                "$IMAGE_NAME:$keep" | "$IMAGE_NAME:latest") ;;
                *)
                    if podman rmi "$ref" >/dev/null 2>&1; then
                        log "removed old image $ref"
                    else
                        log "kept old image $ref (in use)"
                    fi
                    ;;
            esac
        done
}

main "$@"
