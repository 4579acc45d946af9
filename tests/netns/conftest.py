"""Fixtures of the netns tier: throwaway network namespaces, removed even when a test fails."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator

import pytest

_counter = itertools.count()


def _run(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


@pytest.fixture
def make_netns() -> Iterator:
    """Factory: ``make_netns()`` returns the name of a fresh namespace with loopback up."""
    created: list[str] = []

    def factory(prefix: str = "zt") -> str:
        name = f"{prefix}-{os.getpid()}-{next(_counter)}"
        _run("ip", "netns", "add", name)
        created.append(name)
        _run("ip", "link", "set", "lo", "up", netns=name)
        return name

    yield factory
    for name in reversed(created):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def netns(make_netns) -> str:
    """One fresh network namespace, deleted after the test."""
    return make_netns()


@pytest.fixture
def sh():
    """Run a command (optionally in a namespace) and return CompletedProcess; raises on failure."""
    return _run
