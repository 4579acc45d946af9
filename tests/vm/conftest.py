"""The vm tier: a real Debian 12 kernel under qemu (software emulation), reached by Ansible over SSH.

The host kernel has no Geneve, so the `geneve` tunnel kind is proven here. The VM uses qemu's
user-mode network: its SSH port is forwarded to a loopback port of this machine, so the tier needs no
bridge or tap device and changes nothing in the host's network namespace. The VM boots with
``-snapshot``: its disk image is never modified and every session starts from the same state.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 240  # seconds; a boot under TCG takes ~30 s on an idle 2-core machine


@dataclass
class VM:
    port: int
    key: Path
    console_log: Path

    def ssh(self, command: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
        argv = ["ssh", *self.ssh_options(), "-p", str(self.port), "root@127.0.0.1", command]
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)

    def ssh_options(self) -> list[str]:
        return ["-q", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-i", str(self.key)]

    def inventory(self, path: Path) -> Path:
        path.write_text(
            "all:\n  hosts:\n    vm1:\n"
            "      ansible_host: 127.0.0.1\n"
            f"      ansible_port: {self.port}\n"
            "      ansible_user: root\n"
            f"      ansible_ssh_private_key_file: {self.key}\n"
            "      ansible_ssh_common_args: -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null\n"
            "      ansible_python_interpreter: /usr/bin/python3\n"
        )
        return path

    def playbook(self, playbook: Path, inventory: Path, *extra: str, timeout: int = 900, json: bool = False
                 ) -> subprocess.CompletedProcess:
        """Run a playbook against the VM; with json=True its output is the json callback's report."""
        env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_HOST_KEY_CHECKING="False")
        if json:
            env.update(ANSIBLE_STDOUT_CALLBACK="json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(playbook),
                *extra]
        return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def vm_image() -> Path:
    proc = subprocess.run([str(REPO / "scripts" / "build-vm-image.sh")], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"building the VM image failed:\n{proc.stderr[-4000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def vm(vm_image: Path, tmp_path_factory) -> Iterator[VM]:
    port = _free_port()
    logdir = tmp_path_factory.mktemp("vm")
    console = logdir / "console.log"
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "2", "-nographic", "-snapshot",
        "-kernel", str(vm_image / "vmlinuz"), "-initrd", str(vm_image / "initrd.img"),
        "-append", "root=/dev/vda rw console=ttyS0 quiet",
        "-drive", f"file={vm_image / 'root.img'},format=raw,if=virtio",
        # User-mode network: only the VM's SSH port, forwarded to loopback.
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22", "-device", "virtio-net-pci,netdev=n0",
    ]
    with console.open("w") as out:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    machine = VM(port=port, key=vm_image / "id_ed25519", console_log=console)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            if qemu.poll() is not None:
                pytest.fail(f"qemu exited with {qemu.returncode}:\n{console.read_text()[-3000:]}")
            if machine.ssh("true", check=False, timeout=15).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the VM did not answer SSH within {BOOT_TIMEOUT} s:\n"
                            f"{console.read_text()[-3000:]}")
            time.sleep(2)
        yield machine
    finally:
        qemu.terminate()
        try:
            qemu.wait(timeout=20)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()
