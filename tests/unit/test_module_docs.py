"""Every ztmesh module documents exactly what it accepts.

Three independent checks, for every ``modules/ztmesh_*.py``:

1. DOCUMENTATION, EXAMPLES and RETURN are YAML; DOCUMENTATION's options equal the module's real
   argument_spec (names, types, defaults, choices, required, elements, aliases, suboptions). The spec is
   captured the way Ansible's own validate-modules does it: run ``main()`` with ``AnsibleModule``
   replaced by a recorder, so whatever the module builds is what is compared.
2. ``ansible-doc`` renders each module.
3. ansible-test's ``validate-modules`` sanity test (the real tool) on a collection tree copied from
   modules/ and module_utils/. ansible-test builds its own virtualenv from PyPI; its pip bootstrap
   script comes from ci-files.testing.ansible.com, which this network cannot reach, so a stand-in that
   installs the same pinned pip from PyPI is placed in its cache. A known-bad copy of a module is also
   checked, to prove the tool really ran.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MODULES = sorted((REPO / "modules").glob("ztmesh_*.py"))
VENV_BIN = Path(sys.executable).parent
# ansible-test keeps its sanity virtualenvs under $HOME/.ansible/test: keep them in the repo's cache.
ANSIBLE_TEST_HOME = REPO / ".cache" / "ansible-test-home"
COLLECTION = ("ztmesh", "mesh")
# ztmesh is Apache-2.0; validate-modules expects the GPLv3 header of ansible's own modules.
IGNORED_CHECKS = ("missing-gplv3-license",)


def module_ids(paths):
    return [p.stem for p in paths]


def doc_strings(path: Path) -> dict:
    """DOCUMENTATION/EXAMPLES/RETURN as written in the file (read without importing it)."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("DOCUMENTATION", "EXAMPLES", "RETURN") and isinstance(node.value, ast.Constant):
                found[name] = node.value.value
    return found


class _Captured(Exception):
    def __init__(self, kwargs: dict) -> None:
        super().__init__("captured")
        self.kwargs = kwargs


def captured_argument_spec(path: Path) -> dict:
    """The keyword arguments the module passes to AnsibleModule (argument_spec, supports_check_mode...)."""
    # The modules import their utilities as ansible_collections.ztmesh.mesh.plugins.module_utils.*: the
    # checkout's collection view, on sys.path through tests/conftest.py.
    import ansible.module_utils.basic as basic

    spec = importlib.util.spec_from_file_location(f"_ztmesh_doccheck_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def record(*args, **kwargs):
        raise _Captured(kwargs)

    original = basic.AnsibleModule
    try:
        module.AnsibleModule = record  # the name the module calls in main()
        basic.AnsibleModule = record
        with pytest.raises(_Captured) as captured:
            module.main()
    finally:
        basic.AnsibleModule = original
    return captured.value.kwargs


def _normalized_spec(options: dict, from_docs: bool) -> dict:
    """One comparable shape for an argument_spec or DOCUMENTATION options (recursively)."""
    result = {}
    for name, opt in (options or {}).items():
        opt = opt or {}
        sub = opt.get("suboptions") if from_docs else opt.get("options")
        result[name] = {
            "type": opt.get("type", "str"),
            "required": bool(opt.get("required", False)),
            "default": opt.get("default"),
            "choices": list(opt["choices"]) if opt.get("choices") is not None else None,
            "elements": opt.get("elements"),
            "aliases": sorted(opt.get("aliases") or []),
            "suboptions": _normalized_spec(sub, from_docs) if sub else None,
        }
    return result


@pytest.mark.parametrize("path", MODULES, ids=module_ids(MODULES))
def test_docs_are_yaml_and_examples_use_the_module(path):
    docs = doc_strings(path)
    assert set(docs) == {"DOCUMENTATION", "EXAMPLES", "RETURN"}, f"{path.name} lacks doc blocks"
    documentation = yaml.safe_load(docs["DOCUMENTATION"])
    assert documentation["module"] == path.stem
    assert documentation.get("short_description") and documentation.get("description")
    examples = yaml.safe_load(docs["EXAMPLES"])
    assert isinstance(examples, list) and examples
    names = (path.stem, f"ztmesh.mesh.{path.stem}")
    assert any(key in task for task in examples for key in names), f"{path.name}: no example uses it"
    returns = yaml.safe_load(docs["RETURN"])
    assert isinstance(returns, dict) and returns


@pytest.mark.parametrize("path", MODULES, ids=module_ids(MODULES))
def test_docs_declare_the_attributes(path):
    """check_mode, diff_mode and platform, as current collections declare them; diff support must match
    what the module returns."""
    attributes = yaml.safe_load(doc_strings(path)["DOCUMENTATION"]).get("attributes") or {}
    assert {"check_mode", "diff_mode", "platform"} <= set(attributes), f"{path.name}: attributes missing"
    for attribute in attributes.values():
        assert attribute.get("description") and attribute.get("support") in ("full", "partial", "none", "N/A")
    assert attributes["check_mode"]["support"] == "full"
    assert attributes["platform"].get("platforms")
    source = path.read_text()
    returns_diff = '"diff"' in source or "diff=" in source
    assert (attributes["diff_mode"]["support"] != "none") == returns_diff, f"{path.name}: diff_mode support"


@pytest.mark.parametrize("path", MODULES, ids=module_ids(MODULES))
def test_documented_options_match_argument_spec(path):
    kwargs = captured_argument_spec(path)
    assert kwargs.get("supports_check_mode") is True, f"{path.name} must support check mode"
    documented = yaml.safe_load(doc_strings(path)["DOCUMENTATION"]).get("options") or {}
    spec = _normalized_spec(kwargs["argument_spec"], from_docs=False)
    docs = _normalized_spec(documented, from_docs=True)
    assert sorted(docs) == sorted(spec), f"{path.name}: documented options differ from argument_spec"
    for name in spec:
        assert docs[name] == spec[name], f"{path.name}: option {name!r} differs (docs vs argument_spec)"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", MODULES, ids=module_ids(MODULES))
def test_ansible_doc_renders(path):
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-doc"), "-M", str(REPO / "modules"), "-t", "module", "--json", path.stem],
        capture_output=True, text=True, cwd=REPO, timeout=110,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")},
    )
    assert proc.returncode == 0, proc.stderr
    rendered = json.loads(proc.stdout)[path.stem]
    assert rendered["doc"]["module"] == path.stem
    text = subprocess.run([str(VENV_BIN / "ansible-doc"), "-M", str(REPO / "modules"), path.stem],
                          capture_output=True, text=True, cwd=REPO, timeout=110).stdout
    assert path.stem in text and "OPTIONS" in text


# ----------------------------------------------------------------- ansible-test validate-modules

def _pip_bootstrap_stand_in() -> None:
    """Give ansible-test a pip bootstrap that works with PyPI alone (see the module docstring)."""
    try:
        from ansible_test._internal.python_requirements import get_venv_packages

        pip_version = get_venv_packages(type("P", (), {"version": "3.11"})())["pip"]
    except Exception:  # internal API moved: the cached script name below is then a guess
        pip_version = "24.2"
    cache = ANSIBLE_TEST_HOME / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    script = cache / f"get_pip_{pip_version.replace('.', '_')}.py"
    script.write_text(
        '"""ztmesh stand-in for get-pip.py: install the requested pins with the outer pip."""\n'
        "import subprocess, sys\n"
        "args = [a for a in sys.argv[1:] if a not in ('--no-setuptools', '--no-wheel')]\n"
        f"sys.exit(subprocess.call([{sys.executable!r}, '-m', 'pip', '--python', sys.executable,"
        " 'install', *args]))\n"
    )


def _collection(tmp_path: Path, modules: list) -> Path:
    """A collection tree with the modules and all module_utils (copies: links followed)."""
    import ansible.release

    root = tmp_path.joinpath("ansible_collections", *COLLECTION)
    (root / "plugins" / "modules").mkdir(parents=True)
    (root / "meta").mkdir()
    (root / "tests" / "sanity").mkdir(parents=True)
    shutil.copytree(REPO / "module_utils", root / "plugins" / "module_utils",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in modules:
        (root / "plugins" / "modules" / name).write_text(text)
    (root / "galaxy.yml").write_text(f"namespace: {COLLECTION[0]}\nname: {COLLECTION[1]}\nversion: 0.1.0\n"
                                     "readme: README.md\nauthors: [ztmesh contributors]\n")
    (root / "README.md").write_text("generated for validate-modules\n")
    (root / "meta" / "runtime.yml").write_text('requires_ansible: ">=2.15"\n')
    core = ".".join(ansible.release.__version__.split(".")[:2])
    ignores = [f"plugins/modules/{name} validate-modules:{check}\n"
               for name, _ in modules for check in IGNORED_CHECKS]
    (root / "tests" / "sanity" / f"ignore-{core}.txt").write_text("".join(ignores))
    return root


def _validate_modules(root: Path) -> subprocess.CompletedProcess:
    _pip_bootstrap_stand_in()
    env = {**os.environ, "HOME": str(ANSIBLE_TEST_HOME),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(VENV_BIN / "ansible-test"), "sanity", "--test", "validate-modules",
                           "--python", f"{sys.version_info[0]}.{sys.version_info[1]}", "--color", "no"],
                          capture_output=True, text=True, cwd=root, env=env, timeout=580)
    output = proc.stdout + proc.stderr
    if "does not have pip available" in output or "Could not find a version" in output or \
            "No matching distribution" in output:
        pytest.skip(f"ansible-test could not build its virtualenv (PyPI unreachable?):\n{output[-2000:]}")
    return proc


@pytest.mark.timeout(600)
def test_ansible_test_validate_modules(tmp_path):
    root = _collection(tmp_path, [(p.name, p.read_text()) for p in MODULES])
    proc = _validate_modules(root)
    assert proc.returncode == 0, f"validate-modules found problems:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.timeout(600)
def test_validate_modules_catches_a_mismatch(tmp_path):
    """Negative control: a default documented wrongly must make the real tool fail."""
    source = (REPO / "modules" / "ztmesh_tunnel.py").read_text()
    broken = source.replace('"force": {"type": "bool", "default": True}',
                            '"force": {"type": "bool", "default": False}')
    assert broken != source, "control edit no longer applies to ztmesh_tunnel.py: update this test"
    root = _collection(tmp_path, [("ztmesh_tunnel.py", broken)])
    proc = _validate_modules(root)
    assert proc.returncode != 0
    assert "doc-default-does-not-match-spec" in proc.stdout + proc.stderr
