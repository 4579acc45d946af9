"""The ztproxy role's offline installation path, for real: roles/ztproxy/files/wheelhouse.py builds the
wheelhouse on the "controller" (from this repository, dependencies as manylinux wheels for the target
Python), and a fresh virtualenv made by the system's python3 installs ztproxy from it with
`pip --no-index` (no index, no configured find-links: the wheelhouse is the only source), exactly as
the role does on a node; the installed command then runs. A second build reuses the cache."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILDER = REPO / "roles" / "ztproxy" / "files" / "wheelhouse.py"
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin")


def build(cache: Path) -> dict:
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    proc = subprocess.run([sys.executable, str(BUILDER), "--source", str(REPO), "--cache", str(cache),
                           "--python-version", version, "--arch", platform.machine()],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.timeout(900)
def test_wheelhouse_installs_ztproxy_offline(tmp_path: Path) -> None:
    if SYSTEM_PYTHON is None:
        pytest.fail("/usr/bin/python3 is needed (the node's Python in this test)")
    cache = tmp_path / "cache"
    first = build(cache)
    assert first["changed"] is True
    wheels = first["wheels"]
    assert first["project_wheel"].startswith("ztmesh-") and first["project_wheel"] in wheels
    for dependency in ("cryptography", "h2", "PyYAML", "pyroute2"):
        assert any(w.lower().startswith(dependency.lower().replace("-", "_")) for w in wheels), wheels
    assert Path(first["archive"]).is_file()

    again = build(cache)
    assert again["changed"] is False and again["path"] == first["path"]

    venv = tmp_path / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, timeout=300)
    env = dict(os.environ, PIP_CONFIG_FILE="/dev/null", PIP_NO_CACHE_DIR="1")
    env.pop("PIP_FIND_LINKS", None)
    env.pop("PIP_INDEX_URL", None)
    env.pop("PIP_EXTRA_INDEX_URL", None)
    proc = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--disable-pip-version-check",
                           "--no-index", "--find-links", first["path"],
                           str(Path(first["path"]) / first["project_wheel"])],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    version = subprocess.run([str(venv / "bin/ztproxy"), "--version"], capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("ztproxy "), version.stdout + version.stderr
    # Every module of the package imports with only the wheelhouse's dependencies installed (a
    # dependency missing from pyproject.toml shows here, as it would on a node).
    imports = subprocess.run([str(venv / "bin/python"), "-c",
                              "import pkgutil, importlib, ztproxy\n"
                              "for m in pkgutil.walk_packages(ztproxy.__path__, 'ztproxy.'):\n"
                              "    if not m.name.endswith('__main__'):\n"
                              "        importlib.import_module(m.name)\n"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert imports.returncode == 0, imports.stderr
