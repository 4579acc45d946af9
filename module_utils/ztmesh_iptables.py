"""iptables: owned chains and their jumps, rendered for ``iptables-restore --noflush`` and compared in
the form the kernel prints them back.

Ownership model
- An *owned chain* is a user chain listed by the task: ztmesh writes its whole rule list. In a
  ``--noflush`` restore, declaring ``:CHAIN - [0:0]`` creates the chain or, when it exists, flushes it,
  and the ``-A`` lines after it refill it, all in the one transaction of ``COMMIT`` (checked on both the
  legacy and the nft backend): packets never see a half-written chain.
- A *jump* from a built-in chain is ztmesh's when its target is an owned chain and it carries the
  comment ``"<tag>: jump to <chain>"``. Every rule written carries a ``<tag>`` comment. Rules and chains
  that are not ztmesh's are never named in a restore file, so they stay byte-for-byte identical.

Comparison (why it is exact): the desired rules are loaded, with the same iptables binary, into a
throwaway network namespace and read back with ``iptables-save`` (see ``ztmesh_scratch``); those lines
are what the live namespace prints once they are applied, whatever normalisation the iptables version
does (``--set-xmark``, ``-m tcp``, ``/32``, option order, comment quoting, TPROXY's ``--on-ip``).
The same load validates the rules before the live namespace is touched.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_scratch import run_in_scratch_netns

BUILTIN_CHAINS: Dict[str, Tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
ALL_BUILTINS = frozenset(c for chains in BUILTIN_CHAINS.values() for c in chains)
RESERVED_TARGETS = frozenset(
    (
        "ACCEPT",
        "DROP",
        "RETURN",
        "QUEUE",
        "REJECT",
        "MARK",
        "CONNMARK",
        "TPROXY",
        "SNAT",
        "DNAT",
        "MASQUERADE",
        "REDIRECT",
        "LOG",
        "NOTRACK",
        "CT",
    )
)
MAX_CHAIN_LEN = 28  # XT_EXTENSION_MAXNAMELEN (29) minus the terminating NUL
MAX_COMMENT_LEN = 256
_CHAIN_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_TAG_RE = re.compile(r'^[^"\\\n\r\'`$]{1,64}$')
# Words that are iptables *commands*: a rule spec is only matches and a target, never a command.
_COMMAND_WORDS = frozenset(
    (
        "-A",
        "--append",
        "-I",
        "--insert",
        "-D",
        "--delete",
        "-R",
        "--replace",
        "-N",
        "--new-chain",
        "-X",
        "--delete-chain",
        "-F",
        "--flush",
        "-P",
        "--policy",
        "-E",
        "--rename-chain",
        "-Z",
        "--zero",
        "-t",
        "--table",
        "-L",
        "--list",
        "-S",
        "--list-rules",
    )
)
_SET_OPTIONS = frozenset(("--match-set", "--add-set", "--del-set", "--map-set"))
TOOL_TIMEOUT = 60


class IptablesError(Exception):
    """Invalid desired state or a failed iptables command; the message tells the operator what to do."""


@dataclass
class ChainSpec:
    name: str
    rules: List[str] = field(default_factory=list)
    jump_from: Optional[str] = None


# ---------------------------------------------------------------------------------------------------
# Validation and rendering (pure)


def validate_tag(tag: str) -> None:
    if not _TAG_RE.match(tag or ""):
        raise IptablesError(
            f"comment_tag {tag!r} is invalid: use 1..64 characters without quotes, backslashes, $ or newlines"
        )


def validate_rule(chain: str, index: int, rule) -> str:
    where = f"chain {chain} rule {index + 1}"
    if not isinstance(rule, str) or not rule.strip():
        raise IptablesError(f"{where} is empty or not a string; write it like '-i istioin -j RETURN'")
    if any(c in rule for c in "\n\r\0"):
        raise IptablesError(f"{where} contains a newline; write one rule per list item")
    try:
        words = shlex.split(rule)
    except ValueError as exc:
        raise IptablesError(f"{where} ({rule!r}) has unbalanced quotes: {exc}") from None
    commands = [w for w in words if w in _COMMAND_WORDS]
    if commands:
        raise IptablesError(
            f"{where} ({rule!r}) contains the iptables command {commands[0]!r}; write the rule without "
            f"-A CHAIN or -t TABLE (the module adds them), e.g. '-i istioin -j RETURN'"
        )
    return rule.strip()


def validate_chains(table: str, chains: Sequence[dict], tag: str) -> List[ChainSpec]:
    if table not in BUILTIN_CHAINS:
        raise IptablesError(f"table must be one of {', '.join(BUILTIN_CHAINS)}, not {table!r}")
    validate_tag(tag)
    specs: List[ChainSpec] = []
    seen = set()
    for item in chains:
        name = item.get("name")
        if not name or len(name) > MAX_CHAIN_LEN or not _CHAIN_RE.match(name):
            raise IptablesError(
                f"chain name {name!r} is invalid: use 1..{MAX_CHAIN_LEN} characters from letters, digits "
                f"and _ . + - (not starting with - or .)"
            )
        if name in ALL_BUILTINS or name in RESERVED_TARGETS:
            raise IptablesError(
                f"chain {name!r} is a built-in chain or target name; ztmesh owns user chains only (for "
                f"rules at the top of {name}, put them in an owned chain with jump_from: {name})"
            )
        if name in seen:
            raise IptablesError(f"chain {name} is listed twice; list each owned chain once")
        seen.add(name)
        jump_from = item.get("jump_from")
        if jump_from is not None and jump_from not in BUILTIN_CHAINS[table]:
            raise IptablesError(
                f"chain {name}: jump_from {jump_from!r} is not a built-in chain of the {table} table "
                f"(one of {', '.join(BUILTIN_CHAINS[table])})"
            )
        if len(jump_comment(tag, name)) > MAX_COMMENT_LEN:
            raise IptablesError(f"comment_tag is too long for chain {name} (comments are at most 256 bytes)")
        rules = [validate_rule(name, i, r) for i, r in enumerate(item.get("rules") or [])]
        specs.append(ChainSpec(name=name, rules=rules, jump_from=jump_from))
    return specs


def jump_comment(tag: str, chain: str) -> str:
    return f"{tag}: jump to {chain}"


def restore_quote(word: str) -> str:
    """Quote one word for iptables-restore, which knows double quotes (with backslash escapes) only."""
    if word and not any(c.isspace() or c in "\"'\\" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_rule(chain: str, rule: str, tag: str) -> str:
    # Operators write rules shell-style (single or double quotes); re-quote every word the way
    # iptables-restore parses it, so both forms load the same rule.
    words = " ".join(restore_quote(w) for w in shlex.split(rule))
    return f'-A {chain} -m comment --comment "{tag}" {words}'


def render_jump(builtin: str, chain: str, tag: str, insert: bool) -> str:
    where = f"-I {builtin} 1" if insert else f"-A {builtin}"
    return f'{where} -m comment --comment "{jump_comment(tag, chain)}" -j {chain}'


def referenced_sets(specs: Sequence[ChainSpec]) -> List[str]:
    names: List[str] = []
    for spec in specs:
        for rule in spec.rules:
            words = shlex.split(rule)
            for i, word in enumerate(words[:-1]):
                if word in _SET_OPTIONS and words[i + 1] not in names:
                    names.append(words[i + 1])
    return names


# ---------------------------------------------------------------------------------------------------
# iptables-save parsing (pure)


@dataclass
class TableDump:
    """One table of an ``iptables-save`` dump: chains in declaration order with their ``-A`` lines.

    ``exists`` says whether the dump listed the table at all (absent tables still get their built-in
    chains, empty, so callers need not special-case them); ``policies`` maps the chains of the dump to
    their policy (``-`` for user chains).
    """

    chains: Dict[str, List[str]] = field(default_factory=dict)
    exists: bool = False
    policies: Dict[str, str] = field(default_factory=dict)


def parse_save(text: str, table: str) -> TableDump:
    dump = TableDump()
    inside = False
    for line in text.splitlines():
        if line.startswith("*"):
            inside = line[1:].strip() == table
            dump.exists = dump.exists or inside
            continue
        if not inside:
            continue
        if line.startswith("COMMIT"):
            inside = False
        elif line.startswith(":"):
            words = line[1:].split()
            dump.chains.setdefault(words[0], [])
            dump.policies[words[0]] = words[1] if len(words) > 1 else "-"
        elif line.startswith("-A "):
            chain = line.split(" ", 2)[1]
            dump.chains.setdefault(chain, []).append(line)
    if table in BUILTIN_CHAINS:
        for builtin in BUILTIN_CHAINS[table]:
            dump.chains.setdefault(builtin, [])
    return dump


def _words(line: str) -> List[str]:
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def rule_target(line: str) -> Optional[str]:
    """The ``-j``/``-g`` target of a printed rule (the last one: a comment cannot fool it)."""
    words = _words(line)
    target = None
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "-g", "--jump", "--goto"):
            target = words[i + 1]
    return target


def rule_comments(line: str) -> List[str]:
    words = _words(line)
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--comment"]


def is_tagged_jump(line: str, tag: str, chains: Sequence[str]) -> bool:
    if rule_target(line) not in chains:
        return False
    return any(c == tag or c.startswith(f"{tag}:") for c in rule_comments(line))


def delete_line(line: str) -> str:
    """``-A CHAIN spec`` as printed by iptables-save -> ``-D CHAIN spec`` (delete by exact spec)."""
    return "-D " + line[3:]


# ---------------------------------------------------------------------------------------------------
# Planning (pure)


@dataclass
class IptablesPlan:
    lines: List[str]  # restore lines between *table and COMMIT; empty: nothing to do
    before: Dict[str, List[str]]
    after: Dict[str, List[str]]


def owned_view(dump: TableDump, table: str, names: Sequence[str], tag: str) -> Dict[str, List[str]]:
    """What ztmesh owns in a dump: the owned chains' rules and the tagged jumps in built-in chains."""
    view: Dict[str, List[str]] = {}
    for builtin in BUILTIN_CHAINS[table]:
        jumps = [line for line in dump.chains.get(builtin, []) if is_tagged_jump(line, tag, names)]
        if jumps:
            view[builtin] = jumps
    for name in names:
        if name in dump.chains:
            view[name] = list(dump.chains[name])
    return view


def plan_present(
    table: str, specs: Sequence[ChainSpec], tag: str, live: TableDump, desired: TableDump
) -> IptablesPlan:
    """``desired`` is the scratch namespace's dump: owned chains and, in built-ins, only our jumps."""
    names = [s.name for s in specs]
    declare: List[str] = []
    fill: List[str] = []
    for spec in specs:
        want = desired.chains.get(spec.name, [])
        if live.chains.get(spec.name) != want or spec.name not in live.chains:
            declare.append(f":{spec.name} - [0:0]")
            fill.extend(want)
    deletes: List[str] = []
    inserts: List[str] = []
    for builtin in BUILTIN_CHAINS[table]:
        want = desired.chains.get(builtin, [])
        have = live.chains.get(builtin, [])
        ours = [line for line in have if is_tagged_jump(line, tag, names)]
        if have[: len(want)] == want and len(ours) == len(want):
            continue
        deletes.extend(delete_line(line) for line in ours)
        # Inserting at position 1 in reverse order leaves the jumps at the top, in the listed order.
        inserts.extend("-I " + line[3:].replace(f"{builtin} ", f"{builtin} 1 ", 1) for line in reversed(want))
    lines = declare + fill + deletes + inserts
    before = owned_view(live, table, names, tag)
    after = owned_view(desired, table, names, tag)
    return IptablesPlan(lines=lines, before=before, after=after)


def plan_absent(table: str, names: Sequence[str], tag: str, live: TableDump) -> IptablesPlan:
    existing = [n for n in names if n in live.chains]
    deletes: List[str] = []
    for builtin in BUILTIN_CHAINS[table]:
        deletes.extend(
            delete_line(line) for line in live.chains.get(builtin, []) if is_tagged_jump(line, tag, names)
        )
    tagged = {
        line
        for builtin in BUILTIN_CHAINS[table]
        for line in live.chains.get(builtin, [])
        if is_tagged_jump(line, tag, names)
    }
    for chain, rules in live.chains.items():
        if chain in existing:
            continue
        for line in rules:
            if line not in tagged and rule_target(line) in existing:
                raise IptablesError(
                    f"chain {rule_target(line)} cannot be removed: the rule '{line}' (not written by "
                    f"ztmesh, no '{tag}:' comment) jumps to it; remove that rule first, then rerun"
                )
    lines = [f":{n} - [0:0]" for n in existing] + deletes + [f"-X {n}" for n in existing]
    return IptablesPlan(lines=lines, before=owned_view(live, table, names, tag), after={})


def empty_after_absent(table: str, names: Sequence[str], tag: str, live: TableDump) -> bool:
    """Will the table hold nothing once the owned chains and their tagged jumps are gone?

    Nothing means: no user chain of anyone else, no rule in any built-in chain, every built-in chain
    with policy ACCEPT. Such a table filters nothing; deleting it changes no packet's fate.
    """
    if not live.exists:
        return False
    for chain, rules in live.chains.items():
        if chain in names:
            continue
        if chain not in BUILTIN_CHAINS[table]:
            return False
        if live.policies.get(chain, "ACCEPT") != "ACCEPT":
            return False
        if any(not is_tagged_jump(line, tag, names) for line in rules):
            return False
    return True


def render_view(view: Dict[str, List[str]]) -> str:
    """Diff text: owned chains and jumps in iptables-save form."""
    out: List[str] = []
    for chain, lines in view.items():
        out.append(f":{chain}")
        out.extend(lines)
    return "\n".join(out) + ("\n" if out else "")


def error_line_number(stderr: str) -> Optional[int]:
    match = re.search(r"(?:line:\s*|line\s+)(\d+)", stderr)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------
# Scratch-namespace rendering (desired canonical form)


@dataclass
class ScratchInput:
    text: str
    origin: Dict[int, str]  # restore line number -> "chain X rule N: 'spec'"


def scratch_input(
    table: str, specs: Sequence[ChainSpec], tag: str, foreign_chains: Sequence[str]
) -> ScratchInput:
    lines = [f"*{table}"]
    origin: Dict[int, str] = {}
    # Foreign user chains exist (empty) so that owned rules may jump to them as on the live host.
    lines += [f":{c} - [0:0]" for c in foreign_chains]
    lines += [f":{s.name} - [0:0]" for s in specs]
    for spec in specs:
        for i, rule in enumerate(spec.rules):
            lines.append(render_rule(spec.name, rule, tag))
            origin[len(lines)] = f"chain {spec.name} rule {i + 1} ({rule!r})"
    for builtin in BUILTIN_CHAINS[table]:
        for spec in specs:
            if spec.jump_from == builtin:
                lines.append(render_jump(builtin, spec.name, tag, insert=False))
                origin[len(lines)] = f"the jump from {builtin} to {spec.name}"
    lines.append("COMMIT")
    return ScratchInput(text="\n".join(lines) + "\n", origin=origin)


def canonical_dump(
    table: str,
    specs: Sequence[ChainSpec],
    tag: str,
    foreign_chains: Sequence[str],
    restore_cmd: str,
    save_cmd: str,
    ipset_cmd: Optional[str],
    set_create_lines: Sequence[str],
) -> TableDump:
    """Load the desired chains into a throwaway namespace and return how iptables-save prints them."""
    scratch = scratch_input(table, specs, tag, foreign_chains)
    steps: List[Tuple[List[str], Optional[str]]] = []
    if set_create_lines and ipset_cmd:
        steps.append(([ipset_cmd, "restore"], "\n".join(set_create_lines) + "\n"))
    steps.append(([restore_cmd, "--noflush"], scratch.text))
    steps.append(([save_cmd], None))
    results = run_in_scratch_netns(steps)
    last = results[-1]
    if last.rc != 0:
        if last.argv[0] == restore_cmd:
            number = error_line_number(last.stderr)
            what = scratch.origin.get(number or -1, "the rule set")
            raise IptablesError(
                f"invalid iptables rule in the {table} table: {what} was refused by "
                f"{restore_cmd.rsplit('/', 1)[-1]}: {' '.join(last.stderr.split())}; nothing was changed"
            )
        raise IptablesError(f"'{' '.join(last.argv)}' failed in the scratch namespace: {last.stderr.strip()}")
    dump = parse_save(last.stdout, table)
    for chain in foreign_chains:
        dump.chains.pop(chain, None)
    return dump


# ---------------------------------------------------------------------------------------------------
# Live commands


def run_tool(argv: List[str], stdin: Optional[str] = None) -> Tuple[int, str, str]:
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise IptablesError(f"'{' '.join(argv)}' did not finish in {TOOL_TIMEOUT}s") from None
    except OSError as exc:
        raise IptablesError(f"cannot run {argv[0]}: {exc}") from None
    return proc.returncode, proc.stdout, proc.stderr


def read_live(save_cmd: str, table: str) -> TableDump:
    # No "-t TABLE": with the legacy backend that would instantiate an absent table just by reading.
    rc, out, err = run_tool([save_cmd])
    if rc != 0:
        raise IptablesError(f"'{save_cmd}' failed: {err.strip()}")
    return parse_save(out, table)


def apply_live(restore_cmd: str, table: str, lines: Sequence[str]) -> None:
    text = "\n".join([f"*{table}", *lines, "COMMIT"]) + "\n"
    # -w: wait for the xtables lock (legacy backend) instead of failing when another writer holds it.
    rc, _out, err = run_tool([restore_cmd, "-w", "10", "--noflush"], text)
    if rc != 0:
        number = error_line_number(err)
        all_lines = text.splitlines()
        line = all_lines[number - 1] if number and 0 < number <= len(all_lines) else None
        raise IptablesError(
            f"{restore_cmd.rsplit('/', 1)[-1]} refused the change to the {table} table"
            + (f" at line {number} ({line!r})" if line else "")
            + f": {' '.join(err.split())}; the transaction was not committed, nothing was changed"
        )


def delete_empty_nft_table(nft_cmd: str, ip_version: int, table: str) -> None:
    """Delete an iptables-nft table that holds nothing (see ``empty_after_absent``).

    nft deletes a table with whatever it holds, and this nft/kernel pair deletes a chain with its rules
    too (no "delete only if empty"): the caller reads the table again right before calling this, which
    leaves a window of one process start for another writer to add to a table nobody used.
    """
    family = "ip" if ip_version == 4 else "ip6"
    rc, _out, err = run_tool([nft_cmd, "delete", "table", family, table])
    if rc != 0:
        raise IptablesError(
            f"the {table} table was empty but 'nft delete table {family} {table}' failed: "
            f"{' '.join(err.split())}; it was left in place (rerun to retry)"
        )
