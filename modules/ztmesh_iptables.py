#!/usr/bin/python
"""Ansible module ztmesh_iptables: ztmesh's own chains of one table and the jumps to them."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ztmesh_iptables
short_description: Manage owned iptables chains, their rules and the jumps to them, atomically
description:
  - Writes the complete rule list of each listed (owned) user chain of one table, and a jump to it at
    the top of a built-in chain, in one C(iptables-restore --noflush) transaction.
  - >-
    Every rule written carries a C(-m comment --comment "<comment_tag>") match; jumps carry
    C("<comment_tag>: jump to <chain>"), which is how the module recognises its own rules in built-in
    chains. Other chains and other rules of built-in chains are never touched.
  - Desired rules are first loaded into a throwaway network namespace with the same iptables binary and
    read back, which validates them and gives the exact form C(iptables-save) prints; the live table is
    compared with that form, so a second run reports no change.
version_added: "0.1.0"
attributes:
  check_mode:
    description: Can run in check mode and return the changed status it predicts without changing the target.
    support: full
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when in diff mode.
    support: full
    details: Shows the owned chains and jumps before and after, in iptables-save form.
  platform:
    description: Target operating systems the module works on.
    support: full
    platforms: linux
options:
  table:
    description: Table holding the chains.
    type: str
    required: true
    choices: [mangle, nat, raw, filter]
  chains:
    description: Owned user chains of the table.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Name of the owned user chain (at most 28 characters).
        type: str
        required: true
      rules:
        description:
          - Complete rule list of the chain, in order, each a rule spec without C(-A CHAIN), for example
            C(-i istioin -j MARK --set-mark 0x200/0x200).
        type: list
        elements: str
        default: []
      jump_from:
        description: Built-in chain of the table that jumps to this chain from its top; none when omitted.
        type: str
  comment_tag:
    description: 'Comment put on every rule written (jumps get C("<tag>: jump to <chain>")).'
    type: str
    default: ztmesh
  backend:
    description:
      - iptables backend. V(auto) uses the one the host already uses (see C(module_utils/ztmesh_backend.py));
        the module never writes to both.
    type: str
    default: auto
    choices: [auto, legacy, nft]
  ip_version:
    description: V(4) for iptables, V(6) for ip6tables.
    type: int
    default: 4
    choices: [4, 6]
  state:
    description: V(absent) removes the listed chains and the tagged jumps to them, nothing else.
    type: str
    default: present
    choices: [present, absent]
  remove_empty_table:
    description:
      - With O(state=absent), also delete the table itself when nothing else is left in it (no other
        user chain, no rule in a built-in chain, every built-in chain with policy ACCEPT). Such a table
        filters nothing; deleting it puts back a host on which the table did not exist.
      - Set it only for a table ztmesh created (the ztmesh_node role records which tables existed before
        its first run). Needs the C(nft) command (nftables package) with the nft backend. The legacy
        backend cannot delete a table (the kernel keeps it, empty, until its module is unloaded), so
        the module then leaves it and warns.
    type: bool
    default: false
  netns:
    description: Named network namespace (C(/run/netns/NAME)) to act in; default the current one.
    type: str
notes:
  - Needs root, the iptables tools of the backend and C(unshare) (util-linux) on the node.
  - Supports check mode and diff mode (the diff shows the owned chains and jumps in iptables-save form).
author:
  - ztmesh contributors (@ztmesh)
"""

EXAMPLES = r"""
- name: Node nat chains (docs/dataplane.md, node rule sets)
  ztmesh_iptables:
    table: nat
    chains:
      - name: ztunnel-PREROUTING
        jump_from: PREROUTING
        rules:
          - -m mark --mark 0x100/0x100 -j ACCEPT
      - name: ztunnel-POSTROUTING
        jump_from: POSTROUTING
        rules:
          - -m mark --mark 0x100/0x100 -j ACCEPT

- name: Proxy-namespace TPROXY capture (docs/dataplane.md, proxy namespace rule sets)
  ztmesh_iptables:
    netns: ztproxy
    table: mangle
    chains:
      - name: ztunnel-PREROUTING
        jump_from: PREROUTING
        rules:
          - -i pistioin -p tcp --dport 15008 -j TPROXY --on-port 15008 --tproxy-mark 0x400/0xfff
          - -i pistioout -p tcp -j TPROXY --on-port 15001 --tproxy-mark 0x400/0xfff
          - -i pistioin -p tcp -j TPROXY --on-port 15006 --tproxy-mark 0x400/0xfff

- name: Remove the nat chains and their jumps
  ztmesh_iptables:
    table: nat
    chains:
      - name: ztunnel-PREROUTING
      - name: ztunnel-POSTROUTING
    state: absent
"""

RETURN = r"""
backend:
  description: iptables backend written to (legacy or nft) and why it was chosen.
  returned: always
  type: dict
  sample:
    backend: nft
    version: 1.8.9
    reason: "no rules in either backend; iptables 1.8.9 defaults to nft"
chains:
  description: >-
    Owned chains after the run, with their rules as iptables-save prints them (without C(-A CHAIN)).
  returned: always
  type: list
  elements: dict
  sample: [{"name": "ztunnel-POSTROUTING", "jump_from": "POSTROUTING",
            "rules": ["-m mark --mark 0x100/0x100 -m comment --comment ztmesh -j ACCEPT"]}]
table_removed:
  description: Whether the (empty) table was deleted, or would be in check mode (O(remove_empty_table)).
  returned: always
  type: bool
  sample: false
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_backend import (
    BACKENDS, backend_commands, detect_iptables_backend, which,
)
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_common import (
    NETNS_ARGUMENT_SPEC, enter_netns_or_fail, exit_with_result,
)
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_iptables import (
    BUILTIN_CHAINS,
    IptablesError,
    apply_live,
    canonical_dump,
    delete_empty_nft_table,
    empty_after_absent,
    parse_save,
    plan_absent,
    plan_present,
    read_live,
    referenced_sets,
    render_view,
    run_tool,
    validate_chains,
)
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_scratch import ScratchError


def argument_spec() -> dict:
    spec = {
        "table": {"type": "str", "required": True, "choices": ["mangle", "nat", "raw", "filter"]},
        "chains": {
            "type": "list",
            "elements": "dict",
            "default": [],
            "options": {
                "name": {"type": "str", "required": True},
                "rules": {"type": "list", "elements": "str", "default": []},
                "jump_from": {"type": "str"},
            },
        },
        "comment_tag": {"type": "str", "default": "ztmesh"},
        "backend": {"type": "str", "default": "auto", "choices": ["auto", "legacy", "nft"]},
        "ip_version": {"type": "int", "default": 4, "choices": [4, 6]},
        "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
        "remove_empty_table": {"type": "bool", "default": False},
    }
    spec.update(NETNS_ARGUMENT_SPEC)
    return spec


def choose_backend(params: dict):
    try:
        if params["backend"] == "auto":
            chosen = detect_iptables_backend(params["ip_version"])
        else:
            chosen = backend_commands(params["backend"], params["ip_version"])
    except ValueError as exc:
        raise IptablesError(str(exc)) from None
    if chosen.backend == "none" or not chosen.save or not chosen.restore:
        raise IptablesError(f"no usable iptables backend: {chosen.reason}; install the iptables package")
    return chosen


def refuse_mixing(chosen, table: str, names) -> None:
    """Owned chains already living in the *other* backend: writing here would split ztmesh in two."""
    for other in BACKENDS:
        if other == chosen.backend:
            continue
        try:
            commands = backend_commands(other, chosen.ip_version)
        except ValueError:
            continue
        rc, out, _err = run_tool([commands.save])
        if rc != 0:
            continue
        found = [n for n in names if n in parse_save(out, table).chains]
        if found:
            raise IptablesError(
                f"chain(s) {', '.join(found)} of the {table} table already exist in the {other} iptables "
                f"backend, but this task writes to {chosen.backend} ({chosen.reason}); ztmesh never mixes "
                f"backends: remove them from {other} (ztmesh_iptables backend={other} state=absent) or set "
                f"backend: {other}"
            )


def set_create_lines(set_names) -> list:
    """``create`` lines of the live ipsets the rules match, so the scratch namespace can load them."""
    if not set_names:
        return []
    ipset = which("ipset")
    if not ipset:
        raise IptablesError("the rules match ipsets but the 'ipset' command is not installed")
    lines = []
    for name in set_names:
        rc, out, err = run_tool([ipset, "save", name])
        if rc != 0:
            raise IptablesError(
                f"the rules match ipset {name!r}, which does not exist here ({err.strip()}); create it "
                f"first (ztmesh_ipset) in a task before this one"
            )
        lines.extend(line for line in out.splitlines() if line.startswith("create "))
    return lines


def chains_result(specs, after) -> list:
    return [
        {
            "name": s.name,
            "jump_from": s.jump_from,
            "rules": [line.split(" ", 2)[2] for line in after.get(s.name, [])],
        }
        for s in specs
    ]


def table_removal(params: dict, chosen, names, live, warnings: list) -> bool:
    """Whether this absent run deletes the table too (remove_empty_table); explains when it cannot."""
    table = params["table"]
    if not params["remove_empty_table"] or not empty_after_absent(table, names, params["comment_tag"], live):
        return False
    if chosen.backend != "nft":
        warnings.append(
            f"the {table} table is empty but stays: the {chosen.backend} backend cannot delete a table "
            f"(the kernel keeps it until the iptable_{table} module is unloaded); it filters nothing"
        )
        return False
    if not which("nft"):
        warnings.append(
            f"the {table} table is empty but stays: deleting it needs the nft command; install the "
            f"nftables package and rerun; it filters nothing meanwhile"
        )
        return False
    return True


def run(params: dict, check_mode: bool) -> dict:
    table = params["table"]
    tag = params["comment_tag"]
    specs = validate_chains(table, params["chains"] or [], tag)
    names = [s.name for s in specs]
    chosen = choose_backend(params)
    backend_info = {"backend": chosen.backend, "version": chosen.version, "reason": chosen.reason}
    live = read_live(chosen.save, table)
    warnings: list = []
    drop_table = False

    if params["remove_empty_table"] and params["state"] != "absent":
        raise IptablesError("remove_empty_table applies to state=absent only; nothing was changed")
    if params["state"] == "absent":
        plan = plan_absent(table, names, tag, live)
        drop_table = table_removal(params, chosen, names, live, warnings)
    else:
        refuse_mixing(chosen, table, names)
        foreign = [c for c in live.chains if c not in names and c not in BUILTIN_CHAINS[table]]
        sets = referenced_sets(specs)
        desired = canonical_dump(
            table, specs, tag, foreign, chosen.restore, chosen.save, which("ipset"), set_create_lines(sets)
        )
        plan = plan_present(table, specs, tag, live, desired)

    if plan.lines and not check_mode:
        apply_live(chosen.restore, table, plan.lines)
        # Read back: the live table must now be exactly the plan's result.
        now = read_live(chosen.save, table)
        if params["state"] == "absent":
            left = plan_absent(table, names, tag, now).before
        else:
            left = plan_present(table, specs, tag, now, desired).lines
        if left:
            raise IptablesError(
                f"iptables-restore succeeded but the {table} table does not read back as written "
                f"(left: {left}); another process may be writing the same chains at the same time"
            )
    if drop_table and not check_mode:
        # Read again right before deleting: only a table that is still empty goes.
        now = read_live(chosen.save, table)
        if empty_after_absent(table, [], tag, now):
            delete_empty_nft_table(which("nft"), chosen.ip_version, table)
        else:
            drop_table = False
            warnings.append(f"the {table} table gained content while ztmesh removed its chains: left as is")
    before_view = render_view(plan.before)
    if drop_table:
        before_view = f"*{table} (empty: deleted)\n" + before_view
    return {
        "changed": bool(plan.lines) or drop_table,
        "table_removed": drop_table,
        "warnings": warnings,
        "backend": backend_info,
        "chains": chains_result(specs, plan.after) if params["state"] == "present" else [],
        "diff": {"before": before_view, "after": render_view(plan.after)},
    }


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    enter_netns_or_fail(module)
    try:
        result = run(module.params, module.check_mode)
    except (IptablesError, ScratchError) as exc:
        module.fail_json(msg=str(exc))
    for warning in result.pop("warnings"):
        module.warn(warning)
    exit_with_result(module, result)


if __name__ == "__main__":
    main()
