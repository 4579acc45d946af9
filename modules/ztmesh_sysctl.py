#!/usr/bin/python
"""Ansible module ztmesh_sysctl: a set of kernel parameters, applied now and optionally persisted."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ztmesh_sysctl
short_description: Set the kernel parameters of the ztmesh node data plane, report what they were
description:
  - Applies a set of sysctls at once (C(net.ipv4.ip_forward), per-interface keys such as
    C(net.ipv4.conf.istioin.rp_filter)) by writing C(/proc/sys), and optionally keeps them in one
    file under C(/etc/sysctl.d/) that ztmesh owns entirely.
  - Returns the values found before the run (RV(previous)), which is what an uninstall gives back with
    O(state=absent).
  - Values are compared after normalising whitespace (C(/proc/sys) separates multi-value entries with
    tabs), and read back after writing. If the kernel refuses one value, those already written are
    restored and the task fails.
  - With O(netns), C(/proc/sys/net) is the namespace's own. Keys outside C(net.) are global to the
    host, so they are refused together with O(netns).
version_added: "0.1.0"
author:
  - ztmesh contributors (@ztmesh)
requirements:
  - root
attributes:
  check_mode:
    description: Can run in check mode and return the changed status it predicts without changing the target.
    support: full
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when in diff mode.
    support: full
    details: Shows each parameter's value before and after.
  platform:
    description: Target operating systems the module works on.
    support: full
    platforms: linux
options:
  sysctls:
    description:
      - Mapping of dotted key to value. Booleans are written as 1 and 0.
      - Interface names that contain a dot cannot be addressed (keys must not contain C(/)).
    type: dict
    required: true
  persist:
    description:
      - Path of a file directly in C(/etc/sysctl.d/), ending in C(.conf), that holds exactly O(sysctls)
        (O(state=present)) or is removed (O(state=absent)). Omit to change only the running values.
      - Not allowed together with O(netns) (a boot-time file configures the host namespace only).
    type: path
  state:
    description:
      - C(present) applies O(sysctls) and writes the O(persist) file.
      - C(absent) removes the O(persist) file and applies O(sysctls) as the values to restore
        (typically RV(previous) of the run that installed them).
    type: str
    choices: [present, absent]
    default: present
  ignore_missing:
    description:
      - Skip keys that do not exist (for example per-interface keys of an interface that is gone)
        instead of failing. In the O(persist) file such lines carry the C(-) prefix, so a missing
        key does not fail systemd-sysctl at boot.
    type: bool
    default: false
  netns:
    description:
      - Named network namespace (C(/run/netns/<name>)) whose C(net.*) values are set.
    type: str
notes:
  - Supports check mode and diff mode.
"""

EXAMPLES = r"""
- name: Forwarding and loose reverse-path filtering on the tunnels
  ztmesh_sysctl:
    sysctls:
      net.ipv4.ip_forward: 1
      net.ipv4.conf.istioin.rp_filter: 0
      net.ipv4.conf.istioin.accept_local: 1
    persist: /etc/sysctl.d/90-ztmesh.conf
  register: ztmesh_sysctl_result

- name: Uninstall, restore what was there before
  ztmesh_sysctl:
    sysctls: "{{ ztmesh_sysctl_result.previous }}"
    persist: /etc/sysctl.d/90-ztmesh.conf
    ignore_missing: true
    state: absent

- name: The proxy namespace's own sysctls
  ztmesh_sysctl:
    sysctls:
      net.ipv4.conf.all.rp_filter: 0
    netns: ztproxy
"""

RETURN = r"""
previous:
  description: Value of each existing key before the run (what an uninstall restores).
  returned: always
  type: dict
  sample: {net.ipv4.ip_forward: "0", net.ipv4.conf.istioin.rp_filter: "2"}
current:
  description: Value of each existing key after the run (in check mode, as it would be).
  returned: always
  type: dict
  sample: {net.ipv4.ip_forward: "1", net.ipv4.conf.istioin.rp_filter: "0"}
changed_keys:
  description: Keys whose value changed (in check mode, would change).
  returned: always
  type: list
  elements: str
  sample: [net.ipv4.ip_forward]
missing_keys:
  description: Keys skipped because they do not exist (only with O(ignore_missing=true)).
  returned: always
  type: list
  elements: str
  sample: [net.ipv4.conf.istioout.rp_filter]
persist_changed:
  description: Whether the O(persist) file was (or would be) written or removed.
  returned: always
  type: bool
"""

import os
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_common import (
    NETNS_ARGUMENT_SPEC, enter_netns_or_fail, exit_with_result,
)
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_sysctl import (
    SysctlError,
    apply,
    key_error,
    key_path,
    normalize,
    persist_path_error,
    read,
    read_file,
    render_persist,
    value_error,
    writable,
)


def argument_spec() -> dict:
    spec = {
        "sysctls": {"type": "dict", "required": True},
        "persist": {"type": "path"},
        "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
        "ignore_missing": {"type": "bool", "default": False},
    }
    spec.update(NETNS_ARGUMENT_SPEC)
    return spec


def validate(params: dict) -> dict:
    """key -> normalised value, in the given order; raises SysctlError with what to fix."""
    sysctls = params["sysctls"]
    if not sysctls:
        raise SysctlError("sysctls is empty: give at least one key")
    errors = [e for e in (key_error(k) or value_error(k, v) for k, v in sysctls.items()) if e]
    if params["netns"]:
        global_keys = [key for key in sysctls if not key.startswith("net.")]
        if global_keys:
            errors.append(f"{', '.join(global_keys)} are not per-namespace (only net.* keys are); with netns "
                          f"they would change the whole host. Set them in a task without netns")
    if params["persist"] is not None:
        errors.append(persist_path_error(params["persist"]))
        if params["netns"]:
            errors.append("persist cannot be combined with netns: files in /etc/sysctl.d configure the "
                          "host namespace at boot, not a named namespace; drop one of them")
    errors = [e for e in errors if e]
    if errors:
        raise SysctlError("; ".join(errors))
    return {key: normalize(value) for key, value in sysctls.items()}


def write_persist(module, path: str, content: str) -> None:
    """Replace the file atomically (readers never see half of it), mode 0644 like the rest of sysctl.d."""
    handle, tmp = tempfile.mkstemp(prefix=".ztmesh-", dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(content)
        os.chmod(tmp, 0o644)
        module.atomic_move(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run(module) -> dict:
    params = module.params
    try:
        wanted = validate(params)
    except SysctlError as exc:
        module.fail_json(msg=f"{exc}; nothing was changed")
    previous = {key: read(key) for key in wanted}
    missing = [key for key, value in previous.items() if value is None]
    if missing and not params["ignore_missing"]:
        module.fail_json(
            msg=f"sysctl keys do not exist: {', '.join(f'{k} ({key_path(k)})' for k in missing)}. Check "
                f"the spelling, or create the interface they name first; set ignore_missing: true to skip "
                f"them. Nothing was changed",
            missing_keys=missing,
        )
    previous = {key: value for key, value in previous.items() if value is not None}
    changes = [(key, wanted[key]) for key in previous if previous[key] != wanted[key]]
    read_only = [key for key, _ in changes if not writable(key)]
    if read_only:
        module.fail_json(
            msg=f"sysctl keys are read-only here: {', '.join(read_only)} (some net.* keys are writable "
                f"only in the host's namespace, and modules need root). Nothing was changed"
        )

    persist = params["persist"]
    file_before = read_file(persist) if persist else None
    if persist and params["state"] == "present":
        file_after = render_persist(wanted, params["ignore_missing"])
    else:
        file_after = None
    persist_changed = bool(persist) and file_before != file_after

    if not module.check_mode:
        try:
            apply(changes, previous)
        except SysctlError as exc:
            module.fail_json(msg=str(exc), previous=previous)
        if persist_changed and file_after is None:
            os.unlink(persist)
        elif persist_changed:
            write_persist(module, persist, file_after)
        current = {key: read(key) for key in previous}
    else:
        current = {key: wanted[key] for key in previous}
    return {
        "changed": bool(changes) or persist_changed,
        "previous": previous,
        "current": current,
        "changed_keys": [key for key, _ in changes],
        "missing_keys": missing,
        "persist_changed": persist_changed,
        "diff": {
            "before": {"sysctls": previous, "persist": {"path": persist, "content": file_before}},
            "after": {"sysctls": current, "persist": {"path": persist, "content": file_after}},
        },
    }


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    enter_netns_or_fail(module)
    result = run(module)
    exit_with_result(module, result)


if __name__ == "__main__":
    main()
