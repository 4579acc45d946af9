#!/usr/bin/python
"""Ansible module ztmesh_routing: ip rules of an owned priority range and routes of owned tables."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ztmesh_routing
short_description: Manage policy routing (ip rules and routes) owned by ztmesh, through netlink
description:
  - Makes the IPv4 rules whose priority lies in O(rule_priorities) exactly O(rules), and the IPv4 routes of
    the owned O(tables) exactly the O(routes) listed for them. Routes listed for tables that are not owned
    (such as main) are added or replaced, never swept.
  - Can move the kernel's C(lookup local) rule from priority 0 to O(local_rule_priority), so that mark
    rules placed before it can capture traffic addressed to the host's own addresses. The new rule is
    added before the old one is deleted (and on removal the priority-0 rule comes back first), so local
    delivery never has a gap.
  - Validates everything (devices exist, gateways reachable, marks with masks) before the first change.
  - Uses pyroute2 (netlink); IPv6 rules and routes are never touched.
version_added: "0.1.0"
attributes:
  check_mode:
    description: Can run in check mode and return the changed status it predicts without changing the target.
    support: full
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when in diff mode.
    support: full
    details: Shows the owned rules and routes before and after.
  platform:
    description: Target operating systems the module works on.
    support: full
    platforms: linux
options:
  rules:
    description: Rules of the owned priority range.
    type: list
    elements: dict
    default: []
    suboptions:
      priority:
        description: Rule priority (preference).
        type: int
        required: true
      fwmark:
        description: Firewall mark to match, integer or hex string (C(0x200)); needs O(rules[].fwmask).
        type: raw
      fwmask:
        description: Mask of the mark match, integer or hex string; needs O(rules[].fwmark).
        type: raw
      table:
        description: Table to look up, a number or main, local, default; exclusive with O(rules[].goto).
        type: raw
      goto:
        description: Priority to jump to (a later rule); exclusive with O(rules[].table).
        type: int
      from:
        description: Source prefix (CIDR).
        type: str
      to:
        description: Destination prefix (CIDR).
        type: str
      iif:
        description: Incoming interface name (need not exist yet).
        type: str
      oif:
        description: Outgoing interface name (need not exist yet).
        type: str
  rule_priorities:
    description:
      - First and last priority of the range owned exclusively; rules in it that are not in O(rules) are
        removed. Defaults to the lowest and highest priority of O(rules). Must not cover 0, 32766 or 32767.
    type: list
    elements: int
  routes:
    description: Routes to have.
    type: list
    elements: dict
    default: []
    suboptions:
      table:
        description: Table of the route, a number or main, local, default.
        type: raw
        required: true
      dst:
        description: Destination prefix (CIDR) or V(default).
        type: str
        required: true
      type:
        description: Route type.
        type: str
        default: unicast
        choices: [unicast, local]
      gateway:
        description: Next-hop address.
        type: str
      dev:
        description: Output device; must exist.
        type: str
      scope:
        description: Route scope; default host for local routes, link without gateway, global with one.
        type: str
        choices: [global, link, host]
      onlink:
        description: Use the gateway even if no route makes it reachable on O(routes[].dev).
        type: bool
        default: false
      src:
        description: Preferred source address.
        type: str
      metric:
        description: Route metric (priority).
        type: int
        default: 0
  tables:
    description:
      - Tables owned exclusively; routes in them that are not listed are removed. Defaults to the tables
        named in O(routes) other than main, local and default, which can never be owned.
    type: list
    elements: raw
  local_rule_priority:
    description:
      - Move the C(from all lookup local) rule from priority 0 to this priority; with O(state=absent) it is
        put back at 0.
    type: int
  state:
    description: V(absent) removes the owned rules, flushes the owned tables and deletes the listed routes.
    type: str
    default: present
    choices: [present, absent]
  netns:
    description: Named network namespace (C(/run/netns/NAME)) to act in; default the current one.
    type: str
notes:
  - Needs root and pyroute2 on the node.
  - Supports check mode and diff mode.
author:
  - ztmesh contributors (@ztmesh)
"""

EXAMPLES = r"""
- name: Node policy routing (docs/dataplane.md, node rule sets)
  ztmesh_routing:
    rules:
      - {priority: 100, fwmark: "0x200", fwmask: "0x200", goto: 32766}
      - {priority: 101, fwmark: "0x100", fwmask: "0x100", table: 101}
      - {priority: 102, fwmark: "0x040", fwmask: "0x040", table: 102}
      - {priority: 103, table: 100}
    routes:
      - {table: 101, dst: 192.168.200.2/32, dev: ztproxy0, scope: link}
      - {table: 101, dst: default, gateway: 192.168.127.2, dev: istioout}
      - {table: 102, dst: 192.168.200.2/32, dev: ztproxy0, scope: link}
      - {table: 102, dst: default, gateway: 192.168.200.2, dev: ztproxy0, onlink: true}
      - {table: 100, dst: 192.168.200.2/32, dev: ztproxy0, scope: link}

- name: Proxy namespace (docs/dataplane.md, proxy namespace rule sets)
  ztmesh_routing:
    netns: ztproxy
    rules:
      - {priority: 20000, fwmark: "0x400", fwmask: "0xfff", table: 100}
      - {priority: 20003, fwmark: "0x4d3", fwmask: "0xfff", table: 100}
    routes:
      - {table: 100, dst: default, type: local, dev: lo}

- name: Capture traffic to host addresses (local lookup moved behind the mark rules)
  ztmesh_routing:
    rules:
      - {priority: 100, fwmark: "0x200", fwmask: "0x200", goto: 32766}
    rule_priorities: [100, 199]
    local_rule_priority: 200

- name: Remove everything above and put the local rule back at priority 0
  ztmesh_routing:
    rule_priorities: [100, 199]
    tables: [100, 101, 102]
    local_rule_priority: 200
    state: absent
"""

RETURN = r"""
rules:
  description: >-
    Owned rules after the run (and the local rule when O(local_rule_priority) is set), as C(ip rule)
    prints them.
  returned: always
  type: list
  elements: str
  sample: ["100: from all fwmark 0x200/0x200 goto 32766", "200: from all lookup local"]
routes:
  description: Routes of the owned tables and listed routes after the run.
  returned: always
  type: list
  elements: str
  sample: ["local 0.0.0.0/0 dev lo table 100"]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_common import (
    NETNS_ARGUMENT_SPEC, enter_netns_or_fail, exit_with_result,
)
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_routing import (
    RoutingError,
    apply_steps,
    check_devices_and_gateways,
    ipr_open,
    plan_routing,
    read_state,
    render_view,
    spec_from_params,
)


def argument_spec() -> dict:
    spec = {
        "rules": {
            "type": "list",
            "elements": "dict",
            "default": [],
            "options": {
                "priority": {"type": "int", "required": True},
                "fwmark": {"type": "raw"},
                "fwmask": {"type": "raw"},
                "table": {"type": "raw"},
                "goto": {"type": "int"},
                "from": {"type": "str"},
                "to": {"type": "str"},
                "iif": {"type": "str"},
                "oif": {"type": "str"},
            },
        },
        "rule_priorities": {"type": "list", "elements": "int"},
        "routes": {
            "type": "list",
            "elements": "dict",
            "default": [],
            "options": {
                "table": {"type": "raw", "required": True},
                "dst": {"type": "str", "required": True},
                "type": {"type": "str", "default": "unicast", "choices": ["unicast", "local"]},
                "gateway": {"type": "str"},
                "dev": {"type": "str"},
                "scope": {"type": "str", "choices": ["global", "link", "host"]},
                "onlink": {"type": "bool", "default": False},
                "src": {"type": "str"},
                "metric": {"type": "int", "default": 0},
            },
        },
        "tables": {"type": "list", "elements": "raw"},
        "local_rule_priority": {"type": "int"},
        "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
    }
    spec.update(NETNS_ARGUMENT_SPEC)
    return spec


MAX_PASSES = 3


def run(params: dict, check_mode: bool) -> dict:
    spec = spec_from_params(params)
    present = params["state"] == "present"
    with ipr_open() as ipr:
        rules, routes, links, addrs = read_state(ipr)
        if present:
            check_devices_and_gateways(spec, links, addrs, routes)
        plan = plan_routing(spec, rules, routes, present)
        if plan.steps and not check_mode:
            # The kernel deletes the first rule matching the attributes given, treating absent ones as
            # wildcards: deleting a stray "103: lookup 100" can hit a wanted "103: fwmark ... lookup 100"
            # listed before it. Re-planning from what the kernel reads back converges (the wanted rule
            # is re-added after the stray, which the next delete then hits): at most a few passes.
            leftover = plan.steps
            for _attempt in range(MAX_PASSES):
                apply_steps(ipr, leftover, links)
                rules, routes, links, _addrs = read_state(ipr)
                leftover = plan_routing(spec, rules, routes, present).steps
                if not leftover:
                    break
            if leftover:
                raise RoutingError(
                    "the changes were applied but the kernel does not read back as planned; still to do: "
                    + "; ".join(s.text() for s in leftover)
                    + " (another agent, such as NetworkManager, may manage the same rules or tables)"
                )
    return {
        "changed": bool(plan.steps),
        "rules": plan.after["rules"],
        "routes": plan.after["routes"],
        "diff": {"before": render_view(plan.before), "after": render_view(plan.after)},
    }


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    enter_netns_or_fail(module)
    try:
        result = run(module.params, module.check_mode)
    except RoutingError as exc:
        module.fail_json(msg=str(exc))
    exit_with_result(module, result)


if __name__ == "__main__":
    main()
