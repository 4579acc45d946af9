"""ipset: desired-state model, validation, and the ``ipset`` command-line tool as the kernel interface.

Why the ``ipset`` tool and not pyroute2's IPSet: ``ipset save``/``ipset restore`` are the format every
distribution's tooling and operators already read, the tool speaks the protocol revision of the
installed kernel, and its printer is the canonical form of members (``10.1.0.1/32`` in ``hash:net``
prints as ``10.1.0.1``, ``10.0.0.1,80`` as ``10.0.0.1,tcp:80``). Desired members are canonicalised by
loading them into a set of the same type in a throwaway namespace (``ztmesh_scratch``) and reading
them back, so comparing with the live set is exact for every set type, not just the ones a Python
parser would know.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_backend import which
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_scratch import run_in_scratch_netns

MAX_NAME_LEN = 31  # IPSET_MAXNAMELEN (32) minus the terminating NUL
TEMP_SUFFIX = "-ztmp"
SET_TYPES = (
    "hash:ip",
    "hash:net",
    "hash:ip,port",
    "hash:net,port",
    "hash:ip,port,ip",
    "hash:ip,port,net",
    "hash:net,net",
    "hash:net,port,net",
    "hash:net,iface",
    "hash:ip,mac",
    "hash:mac",
)
FAMILIES = ("inet", "inet6")
OPTION_KEYS = ("hashsize", "maxelem", "timeout", "comment")
# Header fields that do not describe the set the operator asked for: the hash seed, the bucket size
# the kernel picked, and the hash size (which the kernel grows on its own as the set fills).
_IGNORED_HEADER = ("initval", "bucketsize", "hashsize")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:+-]+$")
_COMMENT_RE = re.compile(r'^[^"\\\n\r]{1,255}$')
TOOL_TIMEOUT = 120


class IpsetError(Exception):
    """Invalid desired state or a failed ipset command; the message tells the operator what to do."""


@dataclass
class SetSpec:
    name: str
    type: str = "hash:ip"
    family: str = "inet"
    hashsize: Optional[int] = None
    maxelem: Optional[int] = None
    timeout: Optional[int] = None
    comment: Optional[str] = None
    members: List[str] = field(default_factory=list)


@dataclass
class SetState:
    """A set as ``ipset save`` prints it."""

    name: str
    type: str
    header: Dict[str, Optional[str]]
    members: Dict[str, Optional[str]]  # element -> its comment (None without the comment extension)

    @property
    def family(self) -> str:
        return self.header.get("family") or "inet"


# ---------------------------------------------------------------------------------------------------
# Validation (pure)


def validate_name(name: str, what: str = "name") -> None:
    if not name or len(name) > MAX_NAME_LEN or not _NAME_RE.match(name):
        raise IpsetError(
            f"ipset {what} {name!r} is invalid: use 1..{MAX_NAME_LEN} characters from letters, digits "
            f"and _ . : + -"
        )


def _address_kinds(set_type: str) -> List[Optional[str]]:
    """Per comma-separated dimension of a member: 'ip', 'net', or None (port, mac, iface: tool-checked)."""
    dims = set_type.split(":", 1)[1].split(",")
    return [d if d in ("ip", "net") else None for d in dims]


def _validate_address(value: str, kind: str, family: str, member: str, set_type: str) -> None:
    version = 4 if family == "inet" else 6
    label = "IPv4" if version == 4 else "IPv6"
    if kind == "ip":
        if "/" in value or "-" in value:
            raise IpsetError(
                f"member {member!r}: a {set_type} set holds single addresses, not {value!r}; list the "
                f"addresses one by one, or use a hash:net type for networks"
            )
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise IpsetError(f"member {member!r}: {value!r} is not an IP address") from None
        if addr.version != version:
            raise IpsetError(
                f"member {member!r}: {value} is not an {label} address, but the set's family is {family}; "
                f"put IPv{addr.version} addresses in a set with family "
                f"{'inet' if addr.version == 4 else 'inet6'}"
            )
        return
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.ip_network(value, strict=False)
            raise IpsetError(
                f"member {member!r}: {value} has host bits set; write the network as {fixed}"
            ) from None
        raise IpsetError(f"member {member!r}: {value!r} is not an IP network in CIDR form") from None
    if net.version != version:
        raise IpsetError(
            f"member {member!r}: {value} is not an {label} network, but the set's family is {family}"
        )
    if net.prefixlen == 0:
        raise IpsetError(f"member {member!r}: ipset hash:net types cannot hold a /0 network")


def validate_member(member: str, spec: SetSpec) -> None:
    if not isinstance(member, str) or not member.strip() or any(c.isspace() for c in member):
        raise IpsetError(f"member {member!r} is invalid: members are non-empty strings without spaces")
    if spec.type == "hash:mac":
        return
    kinds = _address_kinds(spec.type)
    parts = member.split(",")
    if len(parts) != len(kinds):
        raise IpsetError(
            f"member {member!r} does not fit a {spec.type} set: it needs {len(kinds)} comma-separated "
            f"part(s) ({spec.type.split(':', 1)[1]})"
        )
    for value, kind in zip(parts, kinds):
        if kind:
            _validate_address(value, kind, spec.family, member, spec.type)


def validate_spec(spec: SetSpec) -> None:
    validate_name(spec.name)
    if spec.type not in SET_TYPES:
        raise IpsetError(f"ipset type {spec.type!r} is not supported; use one of: {', '.join(SET_TYPES)}")
    if spec.family not in FAMILIES:
        raise IpsetError(f"family must be inet or inet6, not {spec.family!r}")
    for key in ("hashsize", "maxelem"):
        value = getattr(spec, key)
        if value is not None and value < 1:
            raise IpsetError(f"options.{key} must be a positive integer, not {value}")
    if spec.timeout is not None and not 0 <= spec.timeout <= 2147483:
        raise IpsetError(f"options.timeout must be 0..2147483 seconds, not {spec.timeout}")
    if spec.comment is not None and not _COMMENT_RE.match(spec.comment):
        raise IpsetError("options.comment must be 1..255 characters without quotes, backslashes or newlines")
    seen = set()
    for member in spec.members:
        validate_member(member, spec)
        if member in seen:
            raise IpsetError(f"member {member!r} is listed twice; list each member once")
        seen.add(member)


def spec_from_params(params: dict) -> SetSpec:
    options = dict(params.get("options") or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise IpsetError(f"unknown ipset option(s) {', '.join(unknown)}; supported: {', '.join(OPTION_KEYS)}")

    def as_int(key: str) -> Optional[int]:
        value = options.get(key)
        if value is None:
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise IpsetError(f"options.{key} must be an integer, not {value!r}") from None

    comment = options.get("comment")
    spec = SetSpec(
        name=params["name"],
        type=params.get("type") or "hash:ip",
        family=params.get("family") or "inet",
        hashsize=as_int("hashsize"),
        maxelem=as_int("maxelem"),
        timeout=as_int("timeout"),
        comment=None if comment is None else str(comment),
        members=[str(m).strip() if isinstance(m, (str, int)) else m for m in (params.get("members") or [])],
    )
    validate_spec(spec)
    return spec


# ---------------------------------------------------------------------------------------------------
# Rendering and parsing of the ipset save/restore format (pure)


def create_line(spec: SetSpec, name: str, hashsize: Optional[int] = None) -> str:
    words = ["create", name, spec.type]
    if spec.type != "hash:mac":
        words += ["family", spec.family]
    size = hashsize if hashsize is not None else spec.hashsize
    if size is not None:
        words += ["hashsize", str(size)]
    if spec.maxelem is not None:
        words += ["maxelem", str(spec.maxelem)]
    if spec.timeout is not None:
        words += ["timeout", str(spec.timeout)]
    if spec.comment is not None:
        words.append("comment")
    return " ".join(words)


def add_line(name: str, element: str, comment: Optional[str]) -> str:
    line = f"add {name} {element}"
    if comment is not None:
        line += f' comment "{comment}"'
    return line


def parse_save(text: str) -> Dict[str, SetState]:
    """Parse ``ipset save`` output into sets (members keep their comment; timeouts are dropped)."""
    sets: Dict[str, SetState] = {}
    for raw in text.splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        words = shlex.split(raw)
        if words[0] == "create" and len(words) >= 3:
            header: Dict[str, Optional[str]] = {}
            rest = words[3:]
            i = 0
            while i < len(rest):
                key = rest[i]
                # Flags (comment, counters, skbinfo, forceadd) have no value; the others have one.
                if key in ("comment", "counters", "skbinfo", "forceadd") or i + 1 >= len(rest):
                    header[key] = None
                    i += 1
                else:
                    header[key] = rest[i + 1]
                    i += 2
            sets[words[1]] = SetState(name=words[1], type=words[2], header=header, members={})
        elif words[0] == "add" and len(words) >= 3 and words[1] in sets:
            comment = None
            if "comment" in words[3:]:
                idx = words.index("comment", 3)
                comment = words[idx + 1] if idx + 1 < len(words) else ""
            sets[words[1]].members[words[2]] = comment
    return sets


def comparable_header(state: SetState) -> Dict[str, Optional[str]]:
    return {k: v for k, v in state.header.items() if k not in _IGNORED_HEADER}


def swap_compatible(a: SetState, b: SetState) -> bool:
    """``ipset swap`` needs the same type and family (extensions and sizes may differ)."""
    return a.type == b.type and a.family == b.family


def member_sort_key(element: str) -> Tuple:
    first = element.split(",", 1)[0]
    try:
        net = ipaddress.ip_network(first, strict=False)
        return (0, net.version, int(net.network_address), net.prefixlen, element)
    except ValueError:
        return (1, 0, 0, 0, element)


def sorted_members(members) -> List[str]:
    return sorted(members, key=member_sort_key)


# ---------------------------------------------------------------------------------------------------
# The ipset tool


def ipset_command() -> str:
    path = which("ipset")
    if not path:
        raise IpsetError("the 'ipset' command is not installed on this node; install the ipset package")
    return path


def ipset_tool_present() -> bool:
    return bool(which("ipset"))


def set_names_over_netlink() -> List[str]:
    """The sets of the current network namespace, read over netlink with pyroute2, without the tool.

    For removal on a node whose ipset command is gone (a rolled-back onboarding, or a second
    uninstall, purged the packages ztmesh had brought): a set that is not there needs no tool to be
    "removed". pyroute2 is imported here only: no other path of the module needs it.
    """
    try:
        from pyroute2.ipset import IPSet
    except ImportError as exc:
        raise IpsetError(f"the 'ipset' command is not installed and pyroute2 cannot list sets either "
                         f"({exc}); run the module with the ztmesh runtime") from None
    sets = IPSet()
    try:
        return [str(msg.get_attr("IPSET_ATTR_SETNAME")) for msg in sets.list()]
    except Exception as exc:  # noqa: BLE001 - any netlink failure is reported, with its cause
        raise IpsetError(f"cannot list the ipsets over netlink: {exc}") from None
    finally:
        sets.close()


def run_ipset(args: List[str], stdin: Optional[str] = None) -> Tuple[int, str, str]:
    try:
        proc = subprocess.run(
            [ipset_command(), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise IpsetError(f"'ipset {' '.join(args)}' did not finish in {TOOL_TIMEOUT}s") from None
    return proc.returncode, proc.stdout, proc.stderr


def read_set(name: str) -> Optional[SetState]:
    """The live set, or None when it does not exist."""
    rc, out, err = run_ipset(["save", name])
    if rc != 0:
        if "does not exist" in err:
            return None
        raise IpsetError(f"'ipset save {name}' failed: {err.strip()}")
    return parse_save(out).get(name)


def set_names() -> List[str]:
    rc, out, err = run_ipset(["list", "-n"])
    if rc != 0:
        raise IpsetError(f"'ipset list -n' failed: {err.strip()}")
    return [line.strip() for line in out.splitlines() if line.strip()]


def references(name: str) -> int:
    """How many kernel objects (iptables rules, list:set sets) use the set."""
    rc, out, err = run_ipset(["list", "-t", name])
    if rc != 0:
        raise IpsetError(f"'ipset list -t {name}' failed: {err.strip()}")
    match = re.search(r"^References:\s*(\d+)", out, re.MULTILINE)
    return int(match.group(1)) if match else 0


def restore_error(stderr: str, lines: List[str], first_line: int = 1) -> str:
    """Turn ``ipset restore`` stderr into a message naming the offending input line."""
    msg = stderr.strip().replace("\n", " ")
    match = re.search(r"Error in line (\d+)", stderr)
    if match:
        idx = int(match.group(1)) - first_line
        if 0 <= idx < len(lines):
            msg += f" (input: {lines[idx]!r})"
    return msg


def canonical_set(spec: SetSpec, members: List[str]) -> SetState:
    """Load the set into a throwaway namespace and read it back: kernel-validated canonical form."""
    lines = [create_line(spec, spec.name)] + [add_line(spec.name, m, spec.comment) for m in members]
    ipset = ipset_command()
    results = run_in_scratch_netns(
        [([ipset, "restore"], "\n".join(lines) + "\n"), ([ipset, "save", spec.name], None)]
    )
    last = results[-1]
    if last.rc != 0:
        detail = restore_error(last.stderr, lines)
        raise IpsetError(f"set {spec.name} ({spec.type}, {spec.family}) rejects the desired state: {detail}")
    state = parse_save(last.stdout).get(spec.name)
    if state is None:
        raise IpsetError(f"ipset save printed no set {spec.name} after loading it (unexpected tool output)")
    return state


# ---------------------------------------------------------------------------------------------------
# Planning (pure): what to run to get from the live set to the desired one


@dataclass
class IpsetPlan:
    lines: List[str]  # one ``ipset restore`` batch; empty: nothing to do
    added: List[str]
    removed: List[str]
    after: Optional[SetState]
    temp_name: Optional[str] = None
    reason: str = ""


def header_matches(live: SetState, desired: SetState, hashsize_requested: bool) -> bool:
    if live.type != desired.type or comparable_header(live) != comparable_header(desired):
        return False
    if hashsize_requested:
        # The kernel grows a hash on its own as it fills: a bigger live hash is what was asked for.
        return int(live.header.get("hashsize") or 0) >= int(desired.header.get("hashsize") or 0)
    return True


def pick_temp_name(name: str, existing: List[str]) -> str:
    for n in range(100):
        suffix = TEMP_SUFFIX + (str(n) if n else "")
        candidate = name[: MAX_NAME_LEN - len(suffix)] + suffix
        if candidate not in existing:
            return candidate
    raise IpsetError(f"no free temporary set name for {name}: remove the stale {name}{TEMP_SUFFIX}* sets")


def _fill(temp: str, spec: SetSpec, members: Dict[str, Optional[str]]) -> List[str]:
    return [create_line(spec, temp)] + [add_line(temp, m, c) for m, c in members.items()]


def plan_present(
    spec: SetSpec,
    mode: str,
    live: Optional[SetState],
    desired: SetState,
    temp_name: str,
    live_references: int,
) -> IpsetPlan:
    """``desired`` is the canonical set (from the scratch namespace) holding the members to have."""
    after = SetState(spec.name, desired.type, desired.header, dict(desired.members))
    if live is None:
        lines = _fill(temp_name, spec, desired.members) + [f"rename {temp_name} {spec.name}"]
        return IpsetPlan(lines, sorted_members(desired.members), [], after, temp_name, "create")
    same_header = header_matches(live, desired, spec.hashsize is not None)
    if same_header:
        after.header = dict(live.header)
    if mode == "merge":
        missing = {m: c for m, c in desired.members.items() if m not in live.members}
        after.members = dict(live.members)
        after.members.update(missing)
        if same_header:
            lines = [add_line(spec.name, m, c) for m, c in missing.items()]
            return IpsetPlan(lines, sorted_members(missing), [], after, None, "add missing members")
        target = after.members
    else:
        target = desired.members
        if same_header and live.members == desired.members:
            return IpsetPlan([], [], [], after)
    added = sorted_members(m for m in target if m not in live.members)
    removed = sorted_members(m for m in live.members if m not in target)
    lines = _fill(temp_name, spec, target)
    if same_header or swap_compatible(live, desired):
        lines += [f"swap {spec.name} {temp_name}", f"destroy {temp_name}"]
        reason = "replace members atomically" if same_header else "recreate with new options (swap)"
        return IpsetPlan(lines, added, removed, after, temp_name, reason)
    if live_references:
        raise IpsetError(
            f"set {spec.name} is {live.type} family {live.family} but {desired.type} family "
            f"{desired.family} is wanted; ipset cannot swap sets of different type or family, and the "
            f"set is in use by {live_references} kernel object(s) (iptables rules or list:set sets), so "
            f"it cannot be destroyed and recreated: remove the rules that match it (ztmesh_iptables "
            f"state=absent), rerun this task, then re-apply the rules"
        )
    lines += [f"destroy {spec.name}", f"rename {temp_name} {spec.name}"]
    return IpsetPlan(lines, added, removed, after, temp_name, "recreate with new type/family")


def state_dict(state: Optional[SetState]) -> dict:
    """The set as shown in diff and results (no hash seed, members sorted)."""
    if state is None:
        return {}
    return {
        "name": state.name,
        "type": state.type,
        "header": comparable_header(state),
        "members": [
            m if c is None else f"{m} comment {c!r}"
            for m, c in ((m, state.members[m]) for m in sorted_members(state.members))
        ],
    }


def apply_batch(lines: List[str], temp_name: Optional[str], exist: bool = False) -> None:
    """Run one ``ipset restore`` batch; on failure remove the temporary set so nothing is left over."""
    if not lines:
        return
    rc, _out, err = run_ipset(["restore"] + (["-exist"] if exist else []), "\n".join(lines) + "\n")
    if rc != 0:
        if temp_name:
            run_ipset(["destroy", temp_name])
        raise IpsetError(f"ipset restore failed: {restore_error(err, lines)}")
