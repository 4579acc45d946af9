#!/bin/sh
# Everything on a node that ztmesh could change, in a stable text form: before onboarding and after
# uninstalling, the two snapshots must be identical (molecule/uninstall). Counters, timestamps and
# other values that change by themselves are left out; nothing else is.
set -u
LC_ALL=C
export LC_ALL

section() { printf '\n#### %s\n' "$1"; }

for tool in iptables-legacy iptables-nft ip6tables-legacy ip6tables-nft; do
    section "$tool-save"
    # Drop comments (they carry a timestamp) and zero the packet/byte counters.
    "$tool-save" 2>&1 | grep -v '^#' | sed -e 's/\[[0-9]*:[0-9]*\]/[0:0]/'
done

# Values the kernel picks by itself when a link is (re)created are masked: the random MAC of a
# tunnel link, the IPv6 link-local address and route derived from it, the random hash seed of a set.
mask() { sed -e 's/fe80::[0-9a-f:]*/fe80::<from-mac>/g' -e 's/link\/ether [0-9a-f:]*/link\/ether <mac>/g' \
             -e 's/ initval 0x[0-9a-f]*//'; }

section "ip rule";                 ip rule show
section "ip -6 rule";              ip -6 rule show
section "ip route show table all"; ip route show table all | mask | sort
section "ip -6 route show table all"; ip -6 route show table all | mask | sort
section "ipset";                   ipset save 2>&1 | mask
# Interface indexes are left out: a link that was deleted and rebuilt is the same link to its users.
section "links";                   ip -d -o link show | sed -e 's/^[0-9]*: //' -e 's/ link-netnsid [0-9]*//' | mask | sort
section "addresses";               ip -o addr show | sed -e 's/^[0-9]*: //' -e 's/ valid_lft .*//' | mask | sort
section "network namespaces";      ip netns list; ls -la /run/netns 2>&1 | sed -e '1d' | awk '{print $1, $3, $4, $NF}'
section "sysctl net.*"
# nf_conntrack_count is the number of tracked connections at this instant.
sysctl -a 2>/dev/null | grep '^net\.' | grep -v -e 'nf_conntrack_count' | sort

section "systemd unit files";      systemctl list-unit-files --no-legend --no-pager | sort
section "systemd units"
# Loaded units and their states. Left out: transient scopes of `podman exec` sessions, which come and
# go, and the active state of targets: a target is a synchronization point that becomes active when a
# unit ordered against it runs (network-pre.target on a node without a network manager) and holds no
# configuration; a reboot resets it. Services, mounts, sockets, timers and unit files are compared.
systemctl list-units --all --no-legend --no-pager --plain | grep -v -e '\.scope ' -e '\.target ' \
    | awk '{print $1, $2, $3, $4}' | sort

section "users and groups"
cat /etc/passwd /etc/group
# Password-change dates of other accounts do not move; the lines themselves must match.
cut -d: -f1,2 /etc/shadow /etc/gshadow

section "files"
# Owner, mode, size and content hash of every file outside pseudo and volatile file systems, logs,
# caches, systemd's own bookkeeping and Ansible's working directory. /etc/passwd- and its siblings are
# the backups useradd/userdel always rewrite: listed, their size and content not compared.
PRUNE='-path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp -o -path /var/tmp
       -o -path /var/log -o -path /var/cache -o -path /var/lib/systemd -o -path /root/.ansible'
BACKUPS='-path /etc/passwd- -o -path /etc/group- -o -path /etc/shadow- -o -path /etc/gshadow-
         -o -path /etc/subuid- -o -path /etc/subgid-'
# shellcheck disable=SC2086
find / -xdev \( $PRUNE \) -prune -o \( $BACKUPS \) -printf '%p (backup)\n' \
    -o -printf '%p %y %m %u:%g %s %l\n' | sort
section "file contents"
# shellcheck disable=SC2086
find / -xdev \( $PRUNE \) -prune -o \( $BACKUPS \) -prune -o -type f -print0 | xargs -0 sha256sum | sort -k2
