"""The molecule tier's scenarios, run in the background side by side with the other tiers.

A molecule scenario spends most of its time waiting (on Ansible round trips to podman, on the
renewal scenario's certificate lifetimes), so running them one after another after every other tier
wastes the machine. When the session has selected scenarios, collection starts one background thread
that builds the node image and the package repositories, then runs up to ZTMESH_MOLECULE_PARALLEL
scenarios at a time (default 2) while pytest goes on with the other tiers. The molecule tests are put
last and each only waits for its own scenario's result. Every scenario has its own podman network,
addresses and container names (molecule/shared/vars/nodes.yml), so they do not meet.

The package repositories: the nodes are baseline nodes, and the scenarios onboard them air-gapped
(`ztmesh_package_source: controller`) from ZTMESH_NODE_PACKAGES; their test clients come from
ZTMESH_TEST_CLIENT_PACKAGES. Both are made with scripts/fetch-node-packages.sh from this machine's own
apt sources, so no test node fetches anything itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MOLECULE_DIR = REPO / "molecule"
LOG_DIR = REPO / ".cache" / "molecule-logs"
VENV_BIN = REPO / ".venv" / "bin"
BUILD_IMAGE = REPO / "scripts" / "build-image.sh"
FETCH_PACKAGES = REPO / "scripts" / "fetch-node-packages.sh"
PACKAGES_DIR = REPO / ".cache" / "node-packages"
# Test clients the scenarios' prepare steps install (molecule/*/prepare.yml, test_clients); platform,
# which runs no ztmesh, also installs the data plane tools to check the image can run them.
TEST_CLIENTS = ["curl", "dnsutils", "iperf3", "iputils-ping", "netcat-openbsd", "openssl", "tcpdump",
                "iptables", "ipset", "procps"]

IMAGE_BUILD_TIMEOUT = 900
PACKAGES_TIMEOUT = 600
# One scenario on a loaded 2-core machine; ZTMESH_MOLECULE_TIMEOUT overrides it (seconds).
SCENARIO_TIMEOUT = int(os.environ.get("ZTMESH_MOLECULE_TIMEOUT", "3600"))
DESTROY_TIMEOUT = 180
PARALLEL = max(1, int(os.environ.get("ZTMESH_MOLECULE_PARALLEL", "2")))
# After platform, the longest scenarios start first (measured: fleet and drift take the longest), so
# the last one to finish is a short one and the workers end close together.
LONGEST_FIRST = ("fleet", "drift", "uninstall", "renewal", "default")
TAIL_LINES = 80


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    with path.open(errors="replace") as stream:
        return "".join(deque(stream, maxlen=lines))


# Process groups of the molecule runs under way, so that a session that ends early (an interrupt,
# `-x` in another tier) kills them instead of leaving them running.
RUNNING: set[int] = set()


def stop_running() -> None:
    for pgid in list(RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> int | None:
    """Run cmd from the repo root with all output appended to log; None when it timed out.

    A timed-out run is killed with its whole process group (molecule starts ansible-playbook, which
    starts podman).
    """
    with log.open("a") as stream:
        stream.write(f"\n$ {' '.join(cmd)}\n")
        stream.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
        RUNNING.add(proc.pid)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            stream.write(f"\n[killed after {timeout:.0f} s]\n")
            return None
        finally:
            RUNNING.discard(proc.pid)


def molecule_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(REPO / "podman" / "containers.conf"))
    # molecule runs ansible-playbook, ansible-config and ansible-galaxy found on PATH.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    # molecule itself reads the Ansible configuration before any scenario sets it.
    env["ANSIBLE_CONFIG"] = str(REPO / "ansible.cfg")
    # Plain text logs.
    env.update({"NO_COLOR": "1", "PY_COLORS": "0", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"})
    env.update(extra or {})
    return env


def _last_line(cmd: list[str], log: Path, timeout: float) -> str:
    """Run a set-up script logged; its last stdout line (a path or tag, or "") is the result."""
    with log.open("a") as stream:
        stream.write(f"\n$ {' '.join(cmd)}\n")
        stream.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=molecule_env(), stdout=subprocess.PIPE,
                              stderr=stream, text=True, timeout=timeout, check=False)
        stream.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); log: {log}\n{tail(log)}")
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


@dataclass
class ScenarioResult:
    rc: int | None
    elapsed: float
    log: Path


class BackgroundScenarios:
    """Runs the selected scenarios, PARALLEL at a time, in a background thread; tests wait on them."""

    def __init__(self, scenarios: list[str]) -> None:
        self.scenarios = scenarios
        self.results: dict[str, ScenarioResult] = {}
        self.setup_error: str | None = None
        self.image = ""
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run_all, name="molecule-scenarios", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _setup(self) -> dict[str, str]:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = LOG_DIR / "setup.log"
        log.write_text("")
        _last_line([str(BUILD_IMAGE)], log, IMAGE_BUILD_TIMEOUT)
        self.image = _last_line([str(BUILD_IMAGE), "--print-tag"], log, 60)
        tools = _last_line([str(FETCH_PACKAGES)], log, PACKAGES_TIMEOUT)
        clients = _last_line([str(FETCH_PACKAGES), str(PACKAGES_DIR / "test-clients"), *TEST_CLIENTS],
                             log, PACKAGES_TIMEOUT)
        return {"ZTMESH_NODE_PACKAGES": tools, "ZTMESH_TEST_CLIENT_PACKAGES": clients}

    def _run_one(self, scenario: str, env: dict[str, str]) -> None:
        log = LOG_DIR / f"{scenario}.log"
        log.write_text(f"scenario {scenario}, image {self.image}, CONTAINERS_CONF={env['CONTAINERS_CONF']}\n")
        molecule = str(VENV_BIN / "molecule")
        started = time.monotonic()
        rc = run_logged([molecule, "test", "-s", scenario], log, SCENARIO_TIMEOUT, env)
        elapsed = time.monotonic() - started
        with log.open("a") as stream:
            stream.write(f"\n[molecule test -s {scenario}: exit {rc}, {elapsed:.0f} s]\n")
        if rc is None:
            # A killed run cannot destroy its own nodes.
            run_logged([molecule, "destroy", "-s", scenario], log, DESTROY_TIMEOUT, env)
        with self._done:
            self.results[scenario] = ScenarioResult(rc, elapsed, log)
            self._done.notify_all()

    def _run_guarded(self, scenario: str, env: dict[str, str]) -> None:
        try:
            self._run_one(scenario, env)
        except Exception as exc:  # noqa: BLE001 - reported as the scenario's failure
            with self._done:
                log = LOG_DIR / f"{scenario}.log"
                with log.open("a") as stream:
                    stream.write(f"\n[the scenario could not be run: {exc!r}]\n")
                self.results[scenario] = ScenarioResult(-1, 0.0, log)
                self._done.notify_all()

    def _run_all(self) -> None:
        try:
            env = molecule_env(self._setup())
        except Exception as exc:  # noqa: BLE001 - any failure must reach the waiting tests, not end the thread
            with self._done:
                self.setup_error = str(exc)
                self._done.notify_all()
            return
        pending = list(self.scenarios)
        # The first scenario (platform) runs alone: when the node platform is broken, nothing else is
        # worth running side by side with it.
        if pending:
            self._run_guarded(pending.pop(0), env)
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        pending.sort(key=lambda name: rank.get(name, len(rank)))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not pending:
                        return
                    scenario = pending.pop(0)
                self._run_guarded(scenario, env)

        workers = [threading.Thread(target=worker, daemon=True) for _ in range(PARALLEL)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()

    def wait(self, scenario: str) -> ScenarioResult:
        with self._done:
            while scenario not in self.results and self.setup_error is None:
                self._done.wait(timeout=30)
            if scenario in self.results:
                return self.results[scenario]
            pytest.fail(f"the molecule tier's set-up failed: {self.setup_error}", pytrace=False)
