#!/usr/bin/python
"""Ansible module ztmesh_ipset: one ipset and its members, kept exactly (or at least) as listed."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ztmesh_ipset
short_description: Manage one ipset (type, family, options) and its members
description:
  - Creates, updates or removes one ipset in the current (or the given) network namespace.
  - With C(members_mode=exact) the members are made exactly equal to O(members) in one atomic step
    a temporary set is filled and swapped in with C(ipset swap), so a packet never sees a half-updated
    set.
  - A set whose type, family or options differ is rebuilt the same way (swap) when ipset allows it
    (same type and family); otherwise it is destroyed and recreated, which is refused while iptables
    rules still use the set.
  - Desired members are validated for the set type and family, and loaded into a throwaway network
    namespace first, so a bad member fails the task before the live set is touched.
version_added: "0.1.0"
attributes:
  check_mode:
    description: Can run in check mode and return the changed status it predicts without changing the target.
    support: full
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when in diff mode.
    support: full
    details: Shows the set's type, options and members before and after.
  platform:
    description: Target operating systems the module works on.
    support: full
    platforms: linux
options:
  name:
    description: Set name, at most 31 characters.
    type: str
    required: true
  type:
    description: ipset type.
    type: str
    default: hash:ip
    choices:
      - "hash:ip"
      - "hash:net"
      - "hash:ip,port"
      - "hash:net,port"
      - "hash:ip,port,ip"
      - "hash:ip,port,net"
      - "hash:net,net"
      - "hash:net,port,net"
      - "hash:net,iface"
      - "hash:ip,mac"
      - "hash:mac"
  family:
    description: Address family of the set.
    type: str
    default: inet
    choices: [inet, inet6]
  options:
    description: Creation options of the set; a change rebuilds the set.
    type: dict
    default: {}
    suboptions:
      hashsize:
        description:
          - Initial hash size. The kernel grows the hash as the set fills, so a live hash at least this
            big counts as matching.
        type: int
      maxelem:
        description: Maximal number of members.
        type: int
      timeout:
        description: Default timeout of members in seconds (0 = permanent); enables the timeout extension.
        type: int
      comment:
        description:
          - Enables the comment extension and puts this comment on every member the module adds
            (for example V(ztmesh)), so operators see who manages them.
        type: str
  members:
    description:
      - Members in the form the set type takes (C(10.0.0.1) for hash:ip, C(10.0.0.0/24) for hash:net,
        C(10.0.0.1,tcp:80) for hash:ip,port).
    type: list
    elements: str
    default: []
  members_mode:
    description:
      - V(exact) adds the missing members and removes the others, atomically (temporary set and swap).
      - V(merge) only adds the missing members and never removes any.
    type: str
    default: exact
    choices: [exact, merge]
  state:
    description: V(absent) destroys the set (refused while iptables rules use it).
    type: str
    default: present
    choices: [present, absent]
  netns:
    description: Named network namespace (C(/run/netns/NAME)) to act in; default the current one.
    type: str
notes:
  - Needs the C(ipset) command and C(unshare) (util-linux) on the node, and root. Removal on a node without
    the command reads the sets over netlink (pyroute2), and a set that is not there is reported unchanged.
  - Supports check mode and diff mode.
author:
  - ztmesh contributors (@ztmesh)
"""

EXAMPLES = r"""
- name: Mesh-enrolled workload addresses of this node
  ztmesh_ipset:
    name: ztunnel-pods-ips
    type: hash:ip
    members: "{{ ztmesh_workload_ips }}"

- name: Networks excluded from capture, marked as managed by ztmesh
  ztmesh_ipset:
    name: ztmesh-exclude
    type: hash:net
    options:
      comment: ztmesh
    members: [10.0.0.0/8, 192.168.10.0/24]

- name: Add (never remove) one member
  ztmesh_ipset:
    name: ztunnel-pods-ips
    members: [172.17.0.48]
    members_mode: merge

- name: Remove the set (after the iptables rules that use it)
  ztmesh_ipset:
    name: ztunnel-pods-ips
    state: absent
"""

RETURN = r"""
members:
  description: Members of the set after the run, sorted, in the form C(ipset save) prints them.
  returned: always
  type: list
  elements: str
  sample: ["172.17.0.48", "172.17.0.66"]
added:
  description: Members added by this run.
  returned: always
  type: list
  elements: str
  sample: ["172.17.0.66"]
removed:
  description: Members removed by this run.
  returned: always
  type: list
  elements: str
  sample: []
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_common import (
    NETNS_ARGUMENT_SPEC, enter_netns_or_fail, exit_with_result,
)
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_ipset import (
    SET_TYPES,
    IpsetError,
    apply_batch,
    canonical_set,
    ipset_tool_present,
    pick_temp_name,
    plan_present,
    read_set,
    references,
    set_names,
    set_names_over_netlink,
    sorted_members,
    spec_from_params,
    state_dict,
)
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_scratch import ScratchError


def argument_spec() -> dict:
    spec = {
        "name": {"type": "str", "required": True},
        "type": {"type": "str", "default": "hash:ip", "choices": list(SET_TYPES)},
        "family": {"type": "str", "default": "inet", "choices": ["inet", "inet6"]},
        "options": {
            "type": "dict",
            "default": {},
            "options": {
                "hashsize": {"type": "int"},
                "maxelem": {"type": "int"},
                "timeout": {"type": "int"},
                "comment": {"type": "str"},
            },
        },
        "members": {"type": "list", "elements": "str", "default": []},
        "members_mode": {"type": "str", "default": "exact", "choices": ["exact", "merge"]},
        "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
    }
    spec.update(NETNS_ARGUMENT_SPEC)
    return spec


def run(params: dict, check_mode: bool) -> dict:
    spec = spec_from_params(params)
    if params["state"] == "absent" and not ipset_tool_present():
        if spec.name not in set_names_over_netlink():
            return {"changed": False, "members": [], "added": [], "removed": [],
                    "diff": {"before": {}, "after": {}}}
        raise IpsetError(f"set {spec.name} exists but the 'ipset' command is not installed on this node: "
                         "install the ipset package and rerun")
    live = read_set(spec.name)
    refs = references(spec.name) if live is not None else 0
    before = state_dict(live)
    if params["state"] == "absent":
        if live is None:
            return {
                "changed": False,
                "members": [],
                "added": [],
                "removed": [],
                "diff": {"before": {}, "after": {}},
            }
        if refs:
            raise IpsetError(
                f"set {spec.name} is in use by {refs} kernel object(s) (iptables rules or list:set sets) and "
                f"cannot be destroyed; remove the rules that match it first (ztmesh_iptables state=absent)"
            )
        if not check_mode:
            apply_batch([f"destroy {spec.name}"], None)
        removed = sorted_members(live.members)
        return {
            "changed": True,
            "members": [],
            "added": [],
            "removed": removed,
            "diff": {"before": before, "after": {}},
        }

    members = list(spec.members)
    if live is not None and params["members_mode"] == "merge":
        # Rebuilding a set in merge mode keeps what it holds: validate those members in the new form too.
        members += [m for m in live.members if m not in members]
    desired = canonical_set(spec, members if params["members_mode"] == "merge" else spec.members)
    temp = pick_temp_name(spec.name, set_names())
    plan = plan_present(spec, params["members_mode"], live, desired, temp, refs)
    if plan.lines and not check_mode:
        apply_batch(plan.lines, plan.temp_name, exist=plan.temp_name is None)
    after = state_dict(plan.after)
    return {
        "changed": bool(plan.lines),
        "members": sorted_members(plan.after.members),
        "added": plan.added,
        "removed": plan.removed,
        "diff": {"before": before, "after": after},
    }


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    enter_netns_or_fail(module)
    try:
        result = run(module.params, module.check_mode)
    except (IpsetError, ScratchError) as exc:
        module.fail_json(msg=str(exc))
    exit_with_result(module, result)


if __name__ == "__main__":
    main()
