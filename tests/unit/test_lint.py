"""The linters are part of the tests: ruff on all Python, ansible-lint (production profile) on the
Ansible content. A lint finding fails the run like any other test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), NO_COLOR="1")
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_ruff_clean() -> None:
    proc = _run([str(BIN / "ruff"), "check", "--no-cache", "."], timeout=120)
    assert proc.returncode == 0, f"ruff found problems:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.timeout(600)
def test_ansible_lint_production_profile() -> None:
    # Every directory with Ansible content: the product (playbooks, roles), the molecule scenarios and
    # the test playbooks, so that what the tests run is held to the same bar.
    targets = [p for p in ("playbooks", "roles", "molecule", "tests") if any((REPO / p).rglob("*.yml"))]
    if not targets:
        pytest.skip("no Ansible content yet (playbooks/ and roles/ hold no YAML)")
    proc = _run([str(BIN / "ansible-lint"), "--offline", "--profile", "production", "--nocolor", *targets],
                timeout=600)
    assert proc.returncode == 0, f"ansible-lint found problems:\n{proc.stdout[-8000:]}\n{proc.stderr[-8000:]}"
