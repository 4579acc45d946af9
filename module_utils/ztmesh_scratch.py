"""Run netfilter tools inside a throwaway network namespace ("scratch") to learn the kernel's view.

Why: iptables and ipset print objects back in a canonical form that differs from what an operator
writes (``--set-mark 0x200/0x200`` comes back as ``--set-xmark 0x200/0x200``, ``-p tcp --dport 80`` as
``-p tcp -m tcp --dport 80``, ``-s 10.0.0.1`` as ``-s 10.0.0.1/32``, TPROXY gains ``--on-ip 0.0.0.0``,
``hash:net`` member ``10.1.0.1/32`` comes back as ``10.1.0.1``...). Re-implementing those printers in
Python is a moving target across iptables/ipset versions. Instead, the desired objects are loaded into
a brand-new, empty network namespace with the *same* tools the module will use for real, and read
back: what comes out is exactly what the live namespace will print once they are applied, so the
comparison is byte-for-byte and a second run is reliably ``changed=false``. Loading them there also
validates them (a bad rule or member fails in the scratch namespace, before the live one is touched),
and nothing is ever written to the live namespace in check mode.

The scratch namespace is made with util-linux ``unshare --net`` (root with CAP_SYS_ADMIN); where that
is refused (a container holding only CAP_NET_ADMIN), an unprivileged user namespace owning a fresh
network namespace (``unshare --user --map-root-user --net``) is tried. The namespace disappears when
the process exits: nothing to clean up, even on a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_backend import which

SCRATCH_TIMEOUT = 60

# Runs inside the scratch namespace: each step is (argv, stdin); stops at the first failure and
# reports every step's (rc, stdout, stderr) as JSON on stdout.
_RUNNER = r"""
import json, subprocess, sys
steps = json.loads(sys.stdin.read())
results = []
for argv, data in steps:
    try:
        p = subprocess.run(argv, input=data, capture_output=True, text=True, timeout=50)
        results.append([p.returncode, p.stdout, p.stderr])
    except OSError as exc:
        results.append([127, "", str(exc)])
    if results[-1][0] != 0:
        break
sys.stdout.write(json.dumps(results))
"""

_UNSHARE_VARIANTS = (("--net",), ("--user", "--map-root-user", "--net"))


class ScratchError(Exception):
    """No throwaway network namespace could be made."""


@dataclass
class StepResult:
    argv: List[str]
    rc: int
    stdout: str
    stderr: str


def run_in_scratch_netns(steps: Sequence[Tuple[List[str], Optional[str]]]) -> List[StepResult]:
    """Run ``steps`` (argv, stdin text) in one fresh empty network namespace; stop at the first failure.

    Returns the results of the steps that ran (the last one failed if it has rc != 0).
    Raises ScratchError when no namespace can be created at all.
    """
    unshare = which("unshare")
    if not unshare:
        raise ScratchError("the 'unshare' command (util-linux) is missing; install util-linux")
    payload = json.dumps([[list(argv), data] for argv, data in steps])
    env = dict(os.environ)
    # The legacy backend serialises writers with a lock file shared by every namespace; the scratch
    # namespace is private, so it takes its own lock and never waits for (or blocks) real writers.
    env["XTABLES_LOCKFILE"] = os.path.join("/tmp", f"ztmesh-scratch-{os.getpid()}.lock")
    errors = []
    try:
        for variant in _UNSHARE_VARIANTS:
            argv = [unshare, *variant, "--", sys.executable, "-c", _RUNNER]
            try:
                proc = subprocess.run(
                    argv,
                    input=payload,
                    capture_output=True,
                    text=True,
                    timeout=SCRATCH_TIMEOUT,
                    env=env,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(f"{' '.join(variant)}: {exc}")
                continue
            try:
                raw = json.loads(proc.stdout)
            except ValueError:
                errors.append(f"unshare {' '.join(variant)}: {proc.stderr.strip() or 'no output'}")
                continue
            return [StepResult(list(step[0]), rc, out, err) for step, (rc, out, err) in zip(steps, raw)]
    finally:
        with contextlib.suppress(OSError):
            os.unlink(env["XTABLES_LOCKFILE"])
    raise ScratchError(
        "cannot create a throwaway network namespace to validate the objects before applying them ("
        + "; ".join(errors)
        + "); the module needs root with CAP_SYS_ADMIN (a privileged container), or user namespaces enabled"
    )
