#!/usr/bin/env bash
# Second half of the demo (scripts/demo.sh): real traffic across the onboarded demo fleet, and the
# evidence that it went through the mesh. Every step prints what it ran and what came back; a step
# that fails stops the demo with its output.
#   node3 (workload demo/client) -> node1:8080 (workload demo/web): allowed by the ALLOW policy
#   node2 (workload demo/web)    -> node1:8080: denied (only demo/client may reach web)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INVENTORY="${1:-$REPO/.cache/demo/inventory.yml}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$REPO/podman/containers.conf}"

say() { printf '\n==> %s\n' "$*"; }
on() { local node="$1"; shift; podman exec "ztmesh-$node" "$@"; }
address_of() { on "$1" sh -c "ip -4 -o addr show dev eth0 | awk '{print \$4}' | cut -d/ -f1"; }

# The node image is a ztmesh node baseline: the demo's client (curl) is demo tooling, installed here
# from the Debian mirror when missing; ztmesh itself brings everything it needs.
for node in node1 node2 node3; do
    on "$node" sh -c 'command -v curl >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends curl; }' >/dev/null
done

node1="$(address_of node1)"
say "node1 (workload demo/web, $node1) serves HTTP on 8080 (python3 -m http.server, a transient unit)"
on node1 sh -c 'mkdir -p /srv/demo && echo "hello from node1 through the mesh" > /srv/demo/index.html'
on node1 systemctl stop ztmesh-demo-web.service >/dev/null 2>&1 || true
on node1 systemd-run --unit ztmesh-demo-web --working-directory /srv/demo python3 -m http.server 8080 >/dev/null
for _ in $(seq 1 50); do
    on node1 sh -c 'exec 3<>/dev/tcp/127.0.0.1/8080' 2>/dev/null && break
    sleep 0.2
done

say "node3 (workload demo/client) -> http://$node1:8080/   (curl, unmodified)"
on node3 curl -sS --max-time 10 "http://$node1:8080/index.html"

say "node2 (workload demo/web) -> http://$node1:8080/   (must be refused: only demo/client may reach web)"
if on node2 curl -sS --max-time 10 "http://$node1:8080/index.html"; then
    echo "UNEXPECTED: node2 reached node1; the authorization policy did not apply" >&2
    exit 1
fi
echo "refused, as the policy says"

say "ztproxy access log on node3 (source side) and node1 (destination side)"
on node3 journalctl -u ztproxy --no-pager -o cat | grep -i "spiffe" | tail -n 2
on node1 journalctl -u ztproxy --no-pager -o cat | grep -i "spiffe" | tail -n 3

say "node1's metrics (istio_tcp_connections_opened_total, reporter=destination)"
on node1 ip netns exec ztproxy curl -sS --max-time 5 http://127.0.0.1:15020/metrics \
    | grep '^istio_tcp_connections_opened_total' | head -n 3 || true

say "done: the fleet is still running; explore with 'podman exec -it ztmesh-node1 bash', remove it with './scripts/demo.sh down'"
