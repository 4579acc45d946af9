#!/usr/bin/env bash
# The demo fleet: three ztmesh nodes as podman containers on their own network.
#
# Usage: scripts/fleet.sh up|down|status
#   up      build the node image if needed, create the network ztmesh-demo (10.89.77.0/24) and the
#           nodes ztmesh-node1..3 (10.89.77.11-13; systemd as PID 1, privileged), wait until
#           systemd runs in each, authorize the demo's SSH key for root on each, and write the
#           Ansible inventory .cache/demo/inventory.yml with the nodes' SSH host keys.
#           Running nodes are kept as they are: `up` is safe to repeat.
#   down    remove the nodes, the network, the inventory and the demo's SSH key
#   status  show each node's state, address and systemd state
#
# Then: ansible-playbook -i .cache/demo/inventory.yml playbooks/mesh.yml
# The nodes are reached over SSH, as real nodes are: root with the key .cache/demo/ssh/id_ed25519,
# host keys pinned in .cache/demo/ssh/known_hosts (read from each node through podman, not from the
# network, so the first connection is verified too).
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
SSH_DIR="$REPO/.cache/demo/ssh"
SSH_KEY="$SSH_DIR/id_ed25519"
KNOWN_HOSTS="$SSH_DIR/known_hosts"
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
        # Over SSH, as real nodes: the demo's key, the host keys scripts/fleet.sh read from the nodes.
        ansible_user: root
        ansible_ssh_private_key_file: $SSH_KEY
        ansible_ssh_common_args: -o UserKnownHostsFile=$KNOWN_HOSTS -o StrictHostKeyChecking=yes
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
          ansible_host: ${NODE_ADDRESS[node1]}
          ztmesh_workloads:
            - name: web
              kind: host
              addresses: [${NODE_ADDRESS[node1]}]
              namespace: demo
              service_account: web
              ports: [8080]
        node2:
          ansible_host: ${NODE_ADDRESS[node2]}
          ztmesh_workloads:
            - name: web
              kind: host
              addresses: [${NODE_ADDRESS[node2]}]
              namespace: demo
              service_account: web
              ports: [8080]
        node3:
          ansible_host: ${NODE_ADDRESS[node3]}
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

# Authorize the demo's key for root on a node and pin the node's host key. The host key is read
# through podman (a channel the demo trusts), so SSH verifies even the first connection. sshd makes
# its host keys at its first start (scripts/build-image.sh): wait until it has.
authorize_ssh() {
    local node="$1" container key="" deadline=$((SECONDS + BOOT_TIMEOUT))
    container="$(container_of "$node")"
    podman exec -i "$container" sh -c 'umask 077 && mkdir -p /root/.ssh && cat > /root/.ssh/authorized_keys' \
        <"$SSH_KEY.pub"
    while ((SECONDS < deadline)); do
        key="$(podman exec "$container" cat /etc/ssh/ssh_host_ed25519_key.pub 2>/dev/null || true)"
        [[ -n "$key" ]] && podman exec "$container" systemctl is-active --quiet ssh.service && break
        key=""
        sleep 1
    done
    [[ -n "$key" ]] || die "$container: sshd is not running after ${BOOT_TIMEOUT} s (podman exec $container systemctl status ssh)"
    printf '%s %s\n' "${NODE_ADDRESS[$node]}" "$(cut -d' ' -f1,2 <<<"$key")" >>"$KNOWN_HOSTS.tmp"
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
    command -v ssh >/dev/null || die "the ssh client is missing: apt-get install openssh-client"
    mkdir -p "$SSH_DIR" && chmod 700 "$SSH_DIR"
    [[ -f "$SSH_KEY" ]] || ssh-keygen -q -t ed25519 -N '' -C "ztmesh demo" -f "$SSH_KEY"
    rm -f "$KNOWN_HOSTS.tmp"
    for node in "${NODES[@]}"; do
        authorize_ssh "$node"
    done
    mv "$KNOWN_HOSTS.tmp" "$KNOWN_HOSTS"
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
    rm -rf "$SSH_DIR"
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
