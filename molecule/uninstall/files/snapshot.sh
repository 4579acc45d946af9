#!/bin/sh
# Everything on a node that ztmesh could change, in a stable text form: before onboarding and after
# uninstalling, the two snapshots must be identical (molecule/uninstall). Counters, timestamps and
# other values that change by themselves are left out; nothing else is.
# The node is a baseline node without iptables, ipset, nft or sysctl (ztmesh installs them and purges
# them again): the firewall, the sets and the net.* sysctls are read from the host, with the host's
# tools inside the node's network namespace (snapshot.yml), so they are seen whatever the node has.
set -u
LC_ALL=C
export LC_ALL

section() { printf '\n#### %s\n' "$1"; }

# Values the kernel picks by itself when a link is (re)created are masked: the random MAC of a
# tunnel link, the IPv6 link-local address and route derived from it, the random hash seed of a set.
mask() { sed -e 's/fe80::[0-9a-f:]*/fe80::<from-mac>/g' -e 's/link\/ether [0-9a-f:]*/link\/ether <mac>/g' \
             -e 's/ initval 0x[0-9a-f]*//'; }

section "ip rule";                 ip rule show
section "ip -6 rule";              ip -6 rule show
section "ip route show table all"; ip route show table all | mask | sort
section "ip -6 route show table all"; ip -6 route show table all | mask | sort
# Interface indexes are left out: a link that was deleted and rebuilt is the same link to its users.
section "links";                   ip -d -o link show | sed -e 's/^[0-9]*: //' -e 's/ link-netnsid [0-9]*//' | mask | sort
section "addresses";               ip -o addr show | sed -e 's/^[0-9]*: //' -e 's/ valid_lft .*//' | mask | sort
section "network namespaces";      ip netns list; ls -la /run/netns 2>&1 | sed -e '1d' | awk '{print $1, $3, $4, $NF}'
section "systemd unit files";      systemctl list-unit-files --no-legend --no-pager | sort
section "systemd units"
# Loaded units and their states. Left out: transient scopes of `podman exec` sessions, which come and
# go, and the active state of targets: a target is a synchronization point that becomes active when a
# unit ordered against it runs (network-pre.target on a node without a network manager) and holds no
# configuration; a reboot resets it. Nor the run state of the node's own timers and the services they
# start (systemd-tmpfiles-clean fires 15 minutes after boot, in the middle of a slow run): those change
# by themselves; they are listed with their load state, and the unit files are compared in full.
# Services, mounts, sockets and unit files are compared.
timers="$(systemctl list-units --all --no-legend --no-pager --plain --type=timer | awk '{print $1}' \
    | sed -e 's/\.timer$//' | paste -sd' ')"
systemctl list-units --all --no-legend --no-pager --plain | grep -v -e '\.scope ' -e '\.target ' \
    | awk -v timers="$timers" '
        BEGIN { n = split(timers, t, " "); for (i = 1; i <= n; i++) timed[t[i]] = 1 }
        { base = $1; sub(/\.(service|timer)$/, "", base)
          if (base in timed) print $1, $2; else print $1, $2, $3, $4 }' | sort

section "installed packages"
dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Version}\n' | sort
section "runtimes staged under /tmp by a ztmesh run (none may be left)"
ls -d /tmp/ztmesh-runtime.* 2>/dev/null

section "users and groups"
cat /etc/passwd /etc/group
# Password-change dates of other accounts do not move; the lines themselves must match.
cut -d: -f1,2 /etc/shadow /etc/gshadow

section "files"
# Owner, mode, size and content hash of every file outside pseudo and volatile file systems, logs,
# caches, systemd's own bookkeeping and Ansible's working directory. /etc/passwd- and its siblings are
# the backups useradd/userdel always rewrite, and /var/lib/dpkg/status-old the one dpkg rewrites on
# every run (/var/lib/dpkg/status itself is compared): listed, their size and content not compared.
# apt's own state (/var/lib/apt: package lists, auto-installed marks) is compared like any file:
# ztmesh's package installs keep theirs in a scratch directory of the run.
PRUNE='-path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp -o -path /var/tmp
       -o -path /var/log -o -path /var/cache -o -path /var/lib/systemd -o -path /root/.ansible'
BACKUPS='-path /etc/passwd- -o -path /etc/group- -o -path /etc/shadow- -o -path /etc/gshadow-
         -o -path /etc/subuid- -o -path /etc/subgid- -o -path /var/lib/dpkg/status-old'
# shellcheck disable=SC2086
# The size of a directory is the file system's bookkeeping (a directory copied up into the
# container's writable layer by a package install shrinks to 4096 after the package is removed), so
# directories are listed without it; their entries are listed one by one.
find / -xdev \( $PRUNE \) -prune -o \( $BACKUPS \) -printf '%p (backup)\n' \
    -o -type d -printf '%p %y %m %u:%g\n' -o -printf '%p %y %m %u:%g %s %l\n' | sort
section "file contents"
# shellcheck disable=SC2086
find / -xdev \( $PRUNE \) -prune -o \( $BACKUPS \) -prune -o -type f -print0 | xargs -0 sha256sum | sort -k2
