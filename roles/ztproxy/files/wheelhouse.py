#!/usr/bin/env python3
"""Build the ztmesh node runtime on the controller: the ztmesh wheel, its dependencies, and from them the
site-packages tree the node's own Python runs ztproxy and the ztmesh modules with.

Nodes need neither pip, nor venv support, nor internet: the runtime tree is built here for the node's
Python version and architecture (``pip install --target`` with ``--platform``/``--python-version``/
``--only-binary``: dependencies with compiled code, cryptography, uvloop, PyYAML, protobuf, come as
manylinux wheels for the node's Python, which may differ from the controller's), and the role unpacks
it on the node under ``lib/pythonX.Y/site-packages`` of a virtual environment it lays out itself
(pyvenv.cfg and a bin/python link to the node's Python). The versions are pinned by a constraints file
(``constraints.txt`` next to this script), which is part of the cache key with the ztmesh sources.

One wheelhouse per (digest of sources, constraints and this builder; node Python version; node
architecture); an existing complete one is reused, so a second run changes nothing. Next to each
wheelhouse directory a tar archive of its runtime tree is kept, so the role copies one file per node.
Prints one JSON object:
changed, path, archive, digest, project_wheel, wheels, site_packages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import List

COMPLETE_MARK = ".complete"
# The sources that make up the ztmesh wheel: a change in any of them is a new wheelhouse.
SOURCE_FILES = ("pyproject.toml", "README.md", "setup.cfg", "setup.py")
SOURCE_DIRS = ("ztproxy",)
# glibc baseline of the dependency wheels: manylinux2014 covers RHEL/Rocky 8+, Debian 10+, Ubuntu 18.04+.
PLATFORMS = ("manylinux_2_28_{arch}", "manylinux_2_17_{arch}", "manylinux2014_{arch}", "linux_{arch}")


RUNTIME_DIR = "runtime"


def source_paths(source: Path) -> List[Path]:
    """The files the ztmesh wheel is built from (and its digest made of), sorted."""
    paths: List[Path] = [source / name for name in SOURCE_FILES if (source / name).is_file()]
    for directory in SOURCE_DIRS:
        for path in sorted((source / directory).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so"):
                paths.append(path)
    return sorted(paths)


def source_digest(source: Path, constraints: Path) -> str:
    digest = hashlib.sha256()
    # The pinned versions are part of the key: a changed pin is a new wheelhouse (and runtime).
    digest.update(b"constraints\0" + constraints.read_bytes() + b"\0")
    # So is this builder: a change in how the runtime is made is a new runtime.
    digest.update(b"builder\0" + Path(__file__).read_bytes() + b"\0")
    for path in source_paths(source):
        digest.update(str(path.relative_to(source)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def run(argv: List[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(json.dumps({
            "failed": True,
            "msg": f"{' '.join(argv)} failed (rc={proc.returncode}): {proc.stderr.strip()[-2000:]}",
        }))


def site_packages(python_version: str) -> str:
    """Where the runtime tree keeps its libraries, relative to the virtual environment's root."""
    return f"lib/python{python_version}/site-packages"


def constraints_for(constraints: Path, python_version: str, dest: Path) -> Path:
    """The pins that apply to the node's Python, without their markers, as a file pip reads.

    pip evaluates the markers of a constraints file against the Python that runs pip (the
    controller's), not against ``--python-version``: the node's are evaluated here instead.
    """
    from packaging.requirements import Requirement  # ansible-core's dependency, on every controller

    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0"}
    lines = []
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            requirement.marker = None
            lines.append(str(requirement))
    dest.write_text("".join(f"{line}\n" for line in lines))
    return dest


def build(source: Path, target: Path, python_version: str, arch: str, constraints: Path) -> None:
    major_minor = "".join(python_version.split(".")[:2])
    # Kept in the wheelhouse: the pins this wheelhouse was built with.
    constraints = constraints_for(constraints, python_version, target / "constraints.txt")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # The ztmesh wheel itself is pure Python: built once, with the controller's setuptools (no build
    # isolation: no download needed for the build backend), from a clean copy of exactly the sources
    # the digest covers. Built in the checkout, setuptools would reuse its build/ directory and ship
    # modules that were deleted or moved since (a stale ztproxy/wiring.py did).
    with tempfile.TemporaryDirectory(prefix="ztmesh-wheel-src.") as scratch:
        clean = Path(scratch)
        for path in source_paths(source):
            destination = clean / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
        run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(target), str(clean)])
    project = next(target.glob("ztmesh-*.whl"))
    platform_args: List[str] = []
    for platform in PLATFORMS:
        platform_args += ["--platform", platform.format(arch=arch)]
    target_args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
                   "--abi", f"cp{major_minor}", "--abi", "abi3", "--abi", "none"] + platform_args
    run(pip + ["download", "--dest", str(target), "--constraint", str(constraints)] + target_args
        + [str(project)])
    # The node's runtime tree, from these wheels only: what the node imports is exactly the wheelhouse.
    site = target / RUNTIME_DIR / site_packages(python_version)
    run(pip + ["install", "--no-index", "--find-links", str(target), "--constraint", str(constraints),
               "--target", str(site), "--no-compile", "--no-warn-script-location"] + target_args
        + [str(project)])
    # Console scripts carry the controller's interpreter in their first line: the role writes the
    # node's own bin/ztproxy instead.
    shutil.rmtree(site / "bin", ignore_errors=True)


def write_archive(directory: Path, archive: Path) -> None:
    """The runtime tree as one compressed tar file (written aside, then renamed: never half an archive).

    Owners are root and times fixed, so the archive of one wheelhouse is the same on every controller.
    """

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        return info

    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for item in sorted(directory.iterdir()):
            tar.add(item, arcname=item.name, filter=normalize)
    os.rename(partial, archive)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, type=Path, help="the ztmesh source tree (pyproject.toml)")
    parser.add_argument("--cache", required=True, type=Path, help="controller directory for wheelhouses")
    parser.add_argument("--python-version", required=True, help="the node's Python, e.g. 3.11")
    parser.add_argument("--arch", required=True, help="the node's machine architecture, e.g. x86_64")
    parser.add_argument("--constraints", type=Path,
                        default=Path(__file__).resolve().with_name("constraints.txt"),
                        help="pip constraints file pinning the dependencies (default: constraints.txt here)")
    args = parser.parse_args()

    digest = source_digest(args.source, args.constraints)
    major_minor = ".".join(args.python_version.split(".")[:2])
    path = args.cache / f"{digest}-cp{major_minor.replace('.', '')}-{args.arch}"
    changed = False
    if not (path / COMPLETE_MARK).is_file():
        args.cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=args.cache))
        try:
            build(args.source, staging, major_minor, args.arch, args.constraints)
            (staging / COMPLETE_MARK).write_text(digest + "\n")
            if path.exists():
                shutil.rmtree(path)
            os.rename(staging, path)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        changed = True
    archive = args.cache / f"{path.name}-runtime.tar.gz"
    if path.is_dir() and not archive.is_file():
        write_archive(path / RUNTIME_DIR, archive)
        changed = True
    wheels = sorted(p.name for p in path.glob("*.whl")) if path.is_dir() else []
    project = [w for w in wheels if w.startswith("ztmesh-")]
    print(json.dumps({"changed": changed, "path": str(path), "archive": str(archive), "digest": digest,
                      "project_wheel": project[0] if project else "", "wheels": wheels,
                      "site_packages": site_packages(major_minor)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
