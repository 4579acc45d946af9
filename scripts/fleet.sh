#!/usr/bin/env bash
# The demo fleet: three ztmesh nodes as podman containers on their own network.
#
# Usage: scripts/fleet.sh up|down|status
#   up      build the node image if needed, create the network ztmesh-demo (10.89.77.0/24) and the
#           nodes ztmesh-node1..3 (10.89.77.11-13; systemd as PID 1, privileged), wait until
#           systemd runs in each, and write the Ansible inventory .cache/demo/inventory.yml.
#           Running nodes are kept as they are: `up` is safe to repeat.
#   down    remove the nodes, the network and the inventory
#   status  show each node's state, address and systemd state
#
# Then: ansible-playbook -i .cache/demo/inventory.yml playbooks/mesh.yml
# The nodes are reached with podman (connection containers.podman.podman), not SSH.
# Environment: CONTAINERS_CONF (default: the repo's podman/containers.conf). Needs root and podman.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$REPO/podman/containers.conf}"

IMAGE="localhost/ztmesh-node:latest"
NETWORK="ztmesh-demo"
# Only used by this podman network on this machine; the nodes' addresses are fixed so that the
# inventory (and the demo's policies) can name them.
SUBNET="10.89.77.0/24"
GATEWAY="10.89.77.1"
NODES=(node1 node2 node3)
declare -A NODE_ADDRESS=([node1]=10.89.77.11 [node2]=10.89.77.12 [node3]=10.89.77.13)
CONTAINER_PREFIX="ztmesh-"
INVENTORY="$REPO/.cache/demo/inventory.yml"
BOOT_TIMEOUT=90

log() { printf 'fleet: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
container_of() { printf '%s%s\n' "$CONTAINER_PREFIX" "$1"; }

# --- inventory --------------------------------------------------------------------------------
# The one place that knows the inventory schema (docs/inventory.md, playbooks/inventory/example.yml):
# align it here when the schema changes.
write_inventory() {
    mkdir -p "$(dirname "$INVENTORY")"
    local tmp="$INVENTORY.tmp"
    cat >"$tmp" <<EOF
# Written by scripts/fleet.sh up: the demo fleet (podman containers on network $NETWORK, $SUBNET).
# Regenerated on every 'up'; edit scripts/fleet.sh (write_inventory), not this file.
all:
  children:
    ztmesh_nodes:
      vars:
        # Nodes are containers: Ansible talks to them through podman, not SSH.
        ansible_connection: containers.podman.podman
        ansible_python_interpreter: /usr/bin/python3
        ztmesh_trust_domain: cluster.local
        # The host kernel (shared by the containers) has no Geneve.
        ztmesh_tunnel_kind: vxlan
        ztmesh_services:
          - name: web
            namespace: demo
            ports: [{port: 80, target_port: 8080}]
            endpoints: [web]
        ztmesh_policies:
          - name: web-from-client-only
            namespace: demo
            scope: workload
            workloads: [web]
            action: ALLOW
            rules:
              - clauses:
                  - matches:
                      - service_accounts: [demo/client]
                        destination_ports: [8080]
      hosts:
        node1:
          ansible_host: $(container_of node1)
          ztmesh_workloads:
            - name: web
              kind: host
              addresses: [${NODE_ADDRESS[node1]}]
              namespace: demo
              service_account: web
              ports: [8080]
        node2:
          ansible_host: $(container_of node2)
          ztmesh_workloads:
            - name: web
              kind: host
              addresses: [${NODE_ADDRESS[node2]}]
              namespace: demo
              service_account: web
              ports: [8080]
        node3:
          ansible_host: $(container_of node3)
          ztmesh_workloads:
            - name: client
              kind: host
              addresses: [${NODE_ADDRESS[node3]}]
              namespace: demo
              service_account: client
EOF
    mv "$tmp" "$INVENTORY"
    log "inventory: $INVENTORY"
}
# --- end of inventory -------------------------------------------------------------------------

require_root_and_podman() {
    [[ $EUID -eq 0 ]] || die "must run as root (privileged containers)"
    command -v podman >/dev/null || die "podman not found; install it: apt-get install podman runc"
}

ensure_network() {
    if podman network exists "$NETWORK"; then
        local subnet
        subnet="$(podman network inspect "$NETWORK" --format '{{range .Subnets}}{{.Subnet}} {{end}}')"
        [[ " $subnet " == *" $SUBNET "* ]] \
            || die "network $NETWORK exists with subnet '$subnet', not $SUBNET; run '$0 down' first"
        return
    fi
    # podman refuses a subnet that another podman network uses; a route of the host into it would
    # make the demo's addresses ambiguous, so refuse that too.
    if ip -4 route show to match "${SUBNET%/*}" | grep -qv '^default'; then
        die "the host already routes $SUBNET ($(ip -4 route show to match "${SUBNET%/*}" | grep -v '^default' | head -n1)); edit SUBNET in $0"
    fi
    podman network create --subnet "$SUBNET" --gateway "$GATEWAY" \
        --label org.ztmesh.demo=1 "$NETWORK" >/dev/null
    log "network $NETWORK ($SUBNET) created"
}

start_node() {
    local node="$1" container state
    container="$(container_of "$node")"
    if podman container exists "$container"; then
        state="$(podman container inspect "$container" --format '{{.State.Status}}')"
        if [[ "$state" == running ]]; then
            log "$container already running"
            return
        fi
        podman start "$container" >/dev/null
        log "$container started again (was $state)"
        return
    fi
    # The same settings as the molecule nodes (molecule/shared/vars/nodes.yml).
    podman run --detach --name "$container" --hostname "$node" \
        --privileged --systemd=always \
        --network "$NETWORK" --ip "${NODE_ADDRESS[$node]}" \
        --label org.ztmesh.demo=1 \
        "$IMAGE" /sbin/init >/dev/null
    log "$container created (${NODE_ADDRESS[$node]})"
}

systemd_state() {
    # `systemctl is-system-running` once boot has finished; empty while PID 1 is not reachable.
    podman exec "$1" timeout 10 systemctl is-system-running --wait 2>/dev/null || true
}

wait_for_boot() {
    local container="$1" deadline=$((SECONDS + BOOT_TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state="$(systemd_state "$container")"
        case "$state" in
            "" | offline | initializing | starting) sleep 1 ;;
            *) break ;;
        esac
    done
    if [[ "$state" != running ]]; then
        log "$container: systemd is '${state:-unreachable}' after ${BOOT_TIMEOUT} s; failed units:"
        podman exec "$container" systemctl --failed --no-legend >&2 || true
        die "$container did not boot cleanly"
    fi
}

cmd_up() {
    require_root_and_podman
    "$REPO/scripts/build-image.sh"
    ensure_network
    local node
    for node in "${NODES[@]}"; do
        start_node "$node"
    done
    for node in "${NODES[@]}"; do
        wait_for_boot "$(container_of "$node")"
    done
    write_inventory
    cmd_status
}

cmd_down() {
    require_root_and_podman
    local node container
    for node in "${NODES[@]}"; do
        container="$(container_of "$node")"
        if podman container exists "$container"; then
            # SIGRTMIN+3 (the image's stop signal) lets systemd shut down cleanly.
            podman rm --force --time 20 "$container" >/dev/null
            log "$container removed"
        fi
    done
    if podman network exists "$NETWORK"; then
        podman network rm "$NETWORK" >/dev/null
        log "network $NETWORK removed"
    fi
    rm -f "$INVENTORY"
}

cmd_status() {
    require_root_and_podman
    local node container state address systemd
    printf '%-14s %-10s %-14s %s\n' CONTAINER STATE ADDRESS SYSTEMD
    for node in "${NODES[@]}"; do
        container="$(container_of "$node")"
        if ! podman container exists "$container"; then
            printf '%-14s %-10s %-14s %s\n' "$container" absent - -
            continue
        fi
        state="$(podman container inspect "$container" --format '{{.State.Status}}')"
        address="$(podman container inspect "$container" \
            --format "{{(index .NetworkSettings.Networks \"$NETWORK\").IPAddress}}" 2>/dev/null || echo -)"
        systemd=-
        [[ "$state" == running ]] && systemd="$(podman exec "$container" systemctl is-system-running 2>/dev/null || true)"
        printf '%-14s %-10s %-14s %s\n' "$container" "$state" "${address:--}" "${systemd:-unreachable}"
    done
    if [[ -f "$INVENTORY" ]]; then
        printf 'inventory: %s\n' "$INVENTORY"
    else
        printf 'inventory: none (run: %s up)\n' "$0"
    fi
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    -h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) die "usage: $0 up|down|status" ;;
esac
