"""The ztproxy role's offline installation path, for real: roles/ztproxy/files/wheelhouse.py builds the
wheelhouse on the "controller" (from this repository, dependencies as manylinux wheels for the target
Python, pinned by roles/ztproxy/files/constraints.txt) and the runtime archive; the runtime is laid out
as the role does on a node (roles/ztproxy/tasks/runtime_layout.yml: the archive unpacked, pyvenv.cfg,
bin/python linked to the system's python3; no pip, no venv module) and ztproxy then runs from it with
only the wheelhouse's libraries. A second build reuses the cache."""

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

    # The pins of constraints.txt are what the wheelhouse holds (for this Python, when pinned for it).
    pins = {}
    for line in (BUILDER.parent / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement, _, marker = line.partition(";")
            name, _, pinned = requirement.partition("==")
            pins[name.strip().lower().replace("-", "_")] = (pinned.strip(), marker.strip())
    node_version = subprocess.run([SYSTEM_PYTHON, "-c", "import platform; print(platform.python_version())"],
                                  capture_output=True, text=True, check=True).stdout.strip()
    current = ".".join(node_version.split(".")[:2])
    for wheel in wheels:
        name, wheel_version = wheel.split("-")[:2]
        pinned, marker = pins.get(name.lower(), (None, ""))
        if pinned and marker in ("", f'python_version == "{current}"') and not name.startswith("ztmesh"):
            assert wheel_version == pinned, (wheel, pinned)

    # The runtime as the role lays it out on a node.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    shutil.unpack_archive(first["archive"], venv)
    assert (venv / first["site_packages"] / "ztproxy").is_dir()
    real_python = os.path.realpath(SYSTEM_PYTHON)
    (venv / "bin" / "python").symlink_to(real_python)
    (venv / "pyvenv.cfg").write_text(f"home = {os.path.dirname(real_python)}\n"
                                     "include-system-site-packages = false\n"
                                     f"version = {node_version}\n")
    (venv / "bin" / "ztproxy").write_text(f"#!{venv}/bin/python\nimport sys\n\n"
                                          "from ztproxy.cli import main\n\nsys.exit(main())\n")
    (venv / "bin" / "ztproxy").chmod(0o755)
    # Only the runtime's libraries: not the system's site-packages (pyvenv.cfg says so).
    paths = subprocess.run([str(venv / "bin/python"), "-c", "import sys; print(sys.path)"],
                           capture_output=True, text=True, check=True, timeout=60).stdout
    assert "dist-packages" not in paths and str(venv / first["site_packages"]) in paths, paths
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
