#!/usr/bin/env python3
"""Build the offline wheelhouse of ztproxy on the controller: the ztmesh wheel plus its dependencies.

Nodes install from these files with ``pip install --no-index``, so they need no internet. One wheelhouse
per (source digest, node Python version, node architecture): dependencies with compiled code
(cryptography, uvloop, PyYAML) are fetched as manylinux wheels for the node's Python, which may differ
from the controller's. An existing complete wheelhouse is reused, so a second run changes nothing.

Next to each wheelhouse directory a tar archive of it is kept, so the role copies one file per node
instead of one per wheel. Prints one JSON object: changed, path, archive, digest, project_wheel, wheels.
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


def source_digest(source: Path) -> str:
    digest = hashlib.sha256()
    paths: List[Path] = [source / name for name in SOURCE_FILES if (source / name).is_file()]
    for directory in SOURCE_DIRS:
        for path in sorted((source / directory).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so"):
                paths.append(path)
    for path in sorted(paths):
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


def build(source: Path, target: Path, python_version: str, arch: str) -> None:
    major_minor = "".join(python_version.split(".")[:2])
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # The ztmesh wheel itself is pure Python: built once, from the source tree, with the controller's
    # setuptools (no build isolation: no download needed for the build backend).
    run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(target), str(source)])
    project = next(target.glob("ztmesh-*.whl"))
    platform_args: List[str] = []
    for platform in PLATFORMS:
        platform_args += ["--platform", platform.format(arch=arch)]
    run(pip + ["download", "--only-binary=:all:", "--dest", str(target),
               "--python-version", python_version, "--implementation", "cp", "--abi", f"cp{major_minor}"]
        + platform_args + [str(project)])


def write_archive(directory: Path, archive: Path) -> None:
    """The wheelhouse as one tar file (written aside, then renamed: never half an archive)."""
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w") as tar:
        for item in sorted(directory.iterdir()):
            tar.add(item, arcname=item.name)
    os.rename(partial, archive)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, type=Path, help="the ztmesh source tree (pyproject.toml)")
    parser.add_argument("--cache", required=True, type=Path, help="controller directory for wheelhouses")
    parser.add_argument("--python-version", required=True, help="the node's Python, e.g. 3.11")
    parser.add_argument("--arch", required=True, help="the node's machine architecture, e.g. x86_64")
    args = parser.parse_args()

    digest = source_digest(args.source)
    major_minor = ".".join(args.python_version.split(".")[:2])
    path = args.cache / f"{digest}-cp{major_minor.replace('.', '')}-{args.arch}"
    changed = False
    if not (path / COMPLETE_MARK).is_file():
        args.cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=args.cache))
        try:
            build(args.source, staging, major_minor, args.arch)
            (staging / COMPLETE_MARK).write_text(digest + "\n")
            if path.exists():
                shutil.rmtree(path)
            os.rename(staging, path)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        changed = True
    archive = args.cache / f"{path.name}.tar"
    if path.is_dir() and not archive.is_file():
        write_archive(path, archive)
        changed = True
    wheels = sorted(p.name for p in path.glob("*.whl")) if path.is_dir() else []
    project = [w for w in wheels if w.startswith("ztmesh-")]
    print(json.dumps({"changed": changed, "path": str(path), "archive": str(archive), "digest": digest,
                      "project_wheel": project[0] if project else "", "wheels": wheels}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
