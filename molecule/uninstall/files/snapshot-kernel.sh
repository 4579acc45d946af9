#!/bin/sh
# The firewall, the sets and the net.* sysctls of one node, read on the HOST with the host's own
# iptables, nft, ipset and sysctl inside the node's network namespace (nsenter -n): a baseline node
# has none of these tools before ztmesh installs them and after uninstall purges them, and empty
# tables left behind would be invisible to the node itself. Part of molecule/uninstall/snapshot.yml.
# Usage: snapshot-kernel.sh PID (the node's PID 1 as the host sees it). Needs root, nsenter, and the
# host's iptables (both backends), nft and ipset (scripts/setup.sh installs them).
set -u
LC_ALL=C
export LC_ALL
pid="$1"
in_node() { nsenter --target "$pid" --net -- "$@"; }
section() { printf '\n#### %s\n' "$1"; }

for tool in iptables-legacy iptables-nft ip6tables-legacy ip6tables-nft; do
    section "$tool-save"
    # Drop comments (they carry a timestamp) and zero the packet/byte counters.
    in_node "$tool-save" 2>&1 | grep -v '^#' | sed -e 's/\[[0-9]*:[0-9]*\]/[0:0]/'
done
# Every nftables table, also an empty one that iptables-nft-save does not print.
section "nft list tables";         in_node nft list tables 2>&1 | sort
# The random hash seed of a set is masked.
section "ipset";                   in_node ipset save 2>&1 | sed -e 's/ initval 0x[0-9a-f]*//'
section "sysctl net.*"
# nf_conntrack_count is the number of tracked connections at this instant. /proc/sys/net shows the
# network namespace of the reading process.
in_node sysctl -a 2>/dev/null | grep '^net\.' | grep -v -e 'nf_conntrack_count' | sort
