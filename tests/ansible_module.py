"""Run one ztmesh module for real, through Ansible itself (ad-hoc, local connection).

Tests call modules exactly as a playbook would (AnsiballZ packaging, argument_spec validation, check
and diff mode), so what passes here passes in a play.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def run_module(name: str, args: dict, check: bool = False, diff: bool = False, timeout: int = 120,
               interpreter: str = sys.executable) -> dict:
    """Return the module's result dict (``failed``/``msg`` on failure, ``changed``, ``diff``...).

    ``interpreter`` is the Python the module runs with (default: the tests' own, which has every library).
    """
    if "." not in name:  # the ztmesh modules by their short name: the collection's
        name = f"ztmesh.mesh.{name}"
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_STDOUT_CALLBACK="json",
        ANSIBLE_PYTHON_INTERPRETER=interpreter,
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
        ANSIBLE_NOCOLOR="1",
    )
    argv = [str(VENV_BIN / "ansible"), "localhost", "-i", "localhost,", "-c", "local",
            "-m", name, *(["-a", json.dumps(args)] if args else [])]
    if check:
        argv.append("--check")
    if diff:
        argv.append("--diff")
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    try:
        out = json.loads(proc.stdout)
        result = out["plays"][0]["tasks"][0]["hosts"]["localhost"]
    except (ValueError, KeyError, IndexError) as exc:
        raise AssertionError(
            f"ansible produced no result for {name}: rc={proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        ) from exc
    return result
