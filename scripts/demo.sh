#!/usr/bin/env bash
# The README's demo command: a local fleet of three nodes (podman containers from a locally built
# image), onboarded with playbooks/mesh.yml, then a workload on node1 talks to a workload on node2
# through the mesh, and the demo shows the evidence (both proxies' access logs with SPIFFE
# identities, the metrics). It says plainly what it did and stops at the first thing that fails.
#   ./scripts/demo.sh          build and run the demo (the fleet is left running to explore)
#   ./scripts/demo.sh down     remove the demo fleet
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=scripts/setup.sh
source "$REPO/scripts/setup.sh"
export ANSIBLE_CONFIG="$REPO/ansible.cfg"

say() { printf '\n==> %s\n' "$*"; }

if [ "${1:-}" = "down" ]; then
    "$REPO/scripts/fleet.sh" down
    exit 0
fi

say "building the local node image (cached by recipe hash)"
"$REPO/scripts/build-image.sh"

say "starting the demo fleet: three node containers"
"$REPO/scripts/fleet.sh" up
INVENTORY="$REPO/.cache/demo/inventory.yml"

say "onboarding the fleet: ansible-playbook -i $INVENTORY playbooks/mesh.yml"
ansible-playbook -i "$INVENTORY" playbooks/mesh.yml

say "second run: must change nothing"
ansible-playbook -i "$INVENTORY" playbooks/mesh.yml | tee "$REPO/.cache/demo/second-run.log" | tail -n 6

"$REPO/scripts/demo-traffic.sh" "$INVENTORY"
