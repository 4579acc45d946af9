"""Shared code of the vm tier (tests/vm/conftest.py has the fixtures): the VM image, the network,
the VMs, Ansible runs, snapshots, the fleet's inventory.

The vm tier: Debian 12 VMs with the distribution's cloud kernel under qemu (software emulation),
on a private virtual network, reached by Ansible over SSH.

What containers cannot show is proven here on real kernels: Geneve (the default tunnel kind, which
the host kernel lacks), a real reboot, the whole bring-along of mesh.yml onto baseline nodes
(scripts/build-vm-image.sh) in its air-gapped mode, and a VM that onboards itself with cloud-init.

Network: one host bridge with one tap device per VM, created here under names unique to the session
and always removed. The bridge has an address (the controller's side: SSH, the capture, the files
served to the cloud-init VM) and nothing else: no NAT, and the VMs have no gateway, so they reach
only each other and the bridge address. Each VM's address follows from its MAC (systemd-networkd
files in the image). VMs boot with ``-snapshot``: the image is never modified.

The tests share one fleet (the ``fleet`` fixture) and run in the order of ``ORDER`` below: the fleet
(mesh.yml, traffic, DENY, reboot), the tunnel module on the fleet's runtime, the cloud-init VM joining
the mesh, then uninstall and the snapshot comparison. A step that needs an earlier one fails at once,
naming it, when that one did not pass. Everything a run produced (console logs, playbook output,
captures, snapshots, timings) is kept in ``.cache/vm-logs/``.
"""

from __future__ import annotations

import concurrent.futures
import io
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOGS = REPO / ".cache" / "vm-logs"
ORDER = ("test_vm_fleet.py", "test_vm_geneve.py", "test_vm_cloud_init.py", "test_vm_uninstall.py")
# Generous: under software emulation on a 2-core machine shared with other jobs a boot takes 30 s when
# idle and several minutes under load.
BOOT_TIMEOUT = int(os.environ.get("ZTMESH_VM_BOOT_TIMEOUT", "600"))
PLAYBOOK_TIMEOUT = int(os.environ.get("ZTMESH_VM_PLAYBOOK_TIMEOUT", "2400"))
MEMORY_MB = 960
FLEET = ("vm1", "vm2", "vm3")


# ---------------------------------------------------------------------------------------------------
# Timings: every step of the tier is timed and written to .cache/vm-logs/timings.json.

TIMINGS: dict[str, float] = {}


class timed:
    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> timed:
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        TIMINGS[self.what] = round(time.monotonic() - self.start, 1)
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / "timings.json").write_text(json.dumps(TIMINGS, indent=1) + "\n")


def run(argv: list[str], timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                             f"\n{proc.stderr[-2000:]}")
    return proc


# ---------------------------------------------------------------------------------------------------
# The image and the network.

def build_image(variant: str) -> Path:
    with timed(f"image {variant} (build or cache)"):
        proc = subprocess.run([str(REPO / "scripts" / "build-vm-image.sh"), "--variant", variant],
                              capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, f"building the {variant} VM image failed:\n{proc.stderr[-4000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])


class Network:
    """A host bridge (with the controller's address) and tap devices, all named uniquely and removed."""

    def __init__(self, plan: dict) -> None:
        self.plan = plan
        self.tag = secrets.token_hex(2)
        self.bridge = f"ztvm{self.tag}br"
        self.host_address = plan["host_address"]
        self.taps: list[str] = []
        subnet = ipaddress.ip_network(plan["subnet"])
        routes = run(["ip", "-o", "-4", "route", "show", "table", "all"]).stdout
        for line in routes.splitlines():
            dst = line.split()[0] if line.split()[0] != "local" else line.split()[1]
            if dst in ("default", "broadcast", "unreachable", "blackhole", "prohibit"):
                continue
            try:
                net = ipaddress.ip_network(dst, strict=False)
            except ValueError:
                continue
            if net.prefixlen > 0 and net.overlaps(subnet):
                pytest.fail(f"the VM network {subnet} (scripts/build-vm-image.sh) is already in use on this "
                            f"machine ({line.strip()}): another vm tier run? `ip link show type bridge` "
                            f"lists its ztvm*br bridge")
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{self.host_address}/{plan['prefix']}", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])

    def tap(self, index: int) -> str:
        name = f"ztvm{self.tag}t{index}"
        run(["ip", "tuntap", "add", name, "mode", "tap"])
        self.taps.append(name)
        run(["ip", "link", "set", name, "master", self.bridge])
        run(["ip", "link", "set", name, "up"])
        return name

    def close(self) -> None:
        for name in self.taps:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


# ---------------------------------------------------------------------------------------------------
# Virtual machines.

@dataclass
class VM:
    name: str
    address: str
    mac: str
    key: Path
    console_log: Path
    argv: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0

    def ssh_options(self) -> list[str]:
        return ["-q", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
                "-o", "ServerAliveInterval=10", "-i", str(self.key)]

    def ssh(self, command: str, check: bool = True, timeout: float = 180, input: str | None = None
            ) -> subprocess.CompletedProcess:
        argv = ["ssh", *self.ssh_options(), f"root@{self.address}", command]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.name}: `{command}` failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def put_tar(self, data: bytes, directory: str) -> None:
        argv = ["ssh", *self.ssh_options(), f"root@{self.address}",
                f"mkdir -p {directory} && tar -C {directory} -xzf -"]
        proc = subprocess.run(argv, input=data, capture_output=True, timeout=180)
        assert proc.returncode == 0, f"{self.name}: copying to {directory} failed: {proc.stderr!r}"

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return f"--- last {lines} lines of {self.console_log} ---\n" + "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        self.console_log.parent.mkdir(parents=True, exist_ok=True)
        with self.console_log.open("w") as out:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def boot_id(self) -> str | None:
        try:
            proc = self.ssh("cat /proc/sys/kernel/random/boot_id", check=False, timeout=30)
        except subprocess.TimeoutExpired:
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    def wait_ssh(self, timeout: float = BOOT_TIMEOUT, not_boot: str | None = None) -> float:
        """Wait until the VM answers SSH (with another boot than not_boot); seconds waited."""
        start = time.monotonic()
        while True:
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"{self.name}: qemu exited with {self.process.returncode}\n{self.console_tail()}")
            boot = self.boot_id()
            if boot and boot != not_boot:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                pytest.fail(f"{self.name} ({self.address}) did not answer SSH within {timeout:.0f} s\n"
                            f"{self.console_tail()}")
            time.sleep(3)

    def wait_running(self, timeout: float = 300) -> str:
        """systemctl is-system-running --wait: 'running' or what it is instead (with the failed units)."""
        proc = self.ssh(f"timeout {int(timeout)} systemctl is-system-running --wait", check=False,
                        timeout=timeout + 30)
        state = proc.stdout.strip()
        if state != "running":
            failed = self.ssh("systemctl --failed --no-legend --plain", check=False).stdout
            return f"{state or proc.stderr.strip()}; failed units: {failed.strip()}"
        return state

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def make_vm(name: str, index: int, image: Path, network: Network, mac: str, address: str,
            extra: list[str] | None = None, hostname: bool = True) -> VM:
    tap = network.tap(index)
    # The journal's notices, warnings and errors also go to the console log: when a VM does not come
    # back (no SSH), its console tail is all the test can show.
    append = ("root=/dev/vda rw console=ttyS0 quiet systemd.journald.forward_to_console=1 "
              "systemd.journald.max_level_console=notice" + (f" systemd.hostname={name}" if hostname else ""))
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-smp", "1", "-m", str(MEMORY_MB), "-nographic",
        "-snapshot", "-name", f"ztmesh-vm-tier-{name}",
        "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"), "-append", append,
        "-drive", f"file={image / 'root.img'},format=raw,if=virtio",
        "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile=",
        *(extra or []),
    ]
    return VM(name=name, address=address, mac=mac, key=image / "id_ed25519",
              console_log=LOGS / f"console-{name}.log", argv=argv)


def boot(vms: list[VM]) -> None:
    """Start the VMs together and wait for all of them (SSH and systemd running)."""
    for vm in vms:
        vm.start()
    with concurrent.futures.ThreadPoolExecutor(len(vms)) as pool:
        waited = list(pool.map(lambda vm: vm.wait_ssh(), vms))
        states = list(pool.map(lambda vm: vm.wait_running(), vms))
    for vm, seconds, state in zip(vms, waited, states):
        TIMINGS[f"boot {vm.name} (to SSH)"] = round(seconds, 1)
        assert state == "running", f"{vm.name} booted to {state}\n{vm.console_tail()}"


# ---------------------------------------------------------------------------------------------------
# Ansible.

RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def recap(output: str) -> dict[str, dict[str, int]]:
    return {m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3)), "unreachable": int(m.group(4)),
                         "failed": int(m.group(5))} for m in RECAP.finditer(output)}


def playbook(name: str, inventory: Path, playbook_path: Path, *extra: str,
             timeout: float = PLAYBOOK_TIMEOUT) -> subprocess.CompletedProcess:
    """ansible-playbook from the repository's venv with the repository's ansible.cfg; the output is
    kept in .cache/vm-logs/<name>.log and the wall time in timings.json."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORKS="10", ANSIBLE_HOST_KEY_CHECKING="False",
               # The slowest tasks at the end of each log (where the tier's time goes).
               ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks", PROFILE_TASKS_TASK_OUTPUT_LIMIT="25")
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(playbook_path),
            *extra]
    with timed(f"ansible {name}"):
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


def playbook_failure(proc: subprocess.CompletedProcess, name: str) -> str:
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("fatal:", "failed:"))]
    return (f"{name} exited {proc.returncode} (full output: .cache/vm-logs/{name}.log)\n"
            + "\n".join(failed[-10:])[-6000:] + "\n...\n" + proc.stdout[-4000:] + proc.stderr[-2000:])


# ---------------------------------------------------------------------------------------------------
# Snapshots: molecule/uninstall/files/snapshot.sh inside the VM (files, packages, units, users,
# routing, links), molecule/uninstall/files/snapshot-kernel.sh inside the VM as well, but with the
# HOST's iptables (both backends), nft, ipset and sysctl, copied into /tmp for the call (the baseline
# VM has none of them before mesh.yml and after uninstall.yml; /tmp is outside what snapshot.sh reads,
# and /run is mounted noexec).

SNAPSHOT_TOOLS = ("xtables-legacy-multi", "xtables-nft-multi", "nft", "ipset", "sysctl")
SNAPSHOT_LINKS = {name: "xtables-legacy-multi" for name in ("iptables-legacy-save", "ip6tables-legacy-save")}
SNAPSHOT_LINKS.update({name: "xtables-nft-multi" for name in ("iptables-nft-save", "ip6tables-nft-save")})
SNAPSHOT_DIR = "/tmp/ztmesh-vm-snapshot"
_snapshot_tar: bytes | None = None


def snapshot_tools_tar() -> bytes:
    global _snapshot_tar
    if _snapshot_tar is not None:
        return _snapshot_tar
    buf = io.BytesIO()
    libs: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for tool in SNAPSHOT_TOOLS:
            path = shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
            assert path, f"the vm tier's snapshot needs the host's {tool} (scripts/setup.sh installs it)"
            real = os.path.realpath(path)
            tar.add(real, arcname=f"bin/{tool}")
            for line in run(["ldd", real]).stdout.splitlines():
                match = re.search(r"=> (/\S+)", line)
                if match and not re.search(r"/(libc|libm|ld-linux[^/]*)\.so", match.group(1)):
                    libs.add(match.group(1))
        xtables = Path("/usr/lib/x86_64-linux-gnu/xtables")
        for lib in sorted(libs):
            tar.add(os.path.realpath(lib), arcname=f"lib/{Path(lib).name}")
        tar.add(str(xtables), arcname="xtables")
        for name, target in SNAPSHOT_LINKS.items():
            info = tarfile.TarInfo(f"bin/{name}")
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
        for script in ("snapshot.sh", "snapshot-kernel.sh"):
            tar.add(str(REPO / "molecule" / "uninstall" / "files" / script), arcname=script)
    _snapshot_tar = buf.getvalue()
    return _snapshot_tar


def snapshot(vm: VM) -> str:
    vm.put_tar(snapshot_tools_tar(), SNAPSHOT_DIR)
    kernel = vm.ssh(f"cd {SNAPSHOT_DIR} && PATH={SNAPSHOT_DIR}/bin:$PATH LD_LIBRARY_PATH={SNAPSHOT_DIR}/lib "
                    f"XTABLES_LIBDIR={SNAPSHOT_DIR}/xtables sh snapshot-kernel.sh 1").stdout
    node = vm.ssh(f"sh {SNAPSHOT_DIR}/snapshot.sh", timeout=600).stdout
    # The kernel modules loaded: ztmesh loads what its data plane needs and uninstall does not unload
    # them (section compared separately, see test_vm_uninstall.py).
    modules = vm.ssh("cut -d' ' -f1 /proc/modules | sort").stdout
    vm.ssh(f"rm -rf {SNAPSHOT_DIR}")
    return kernel + "\n" + node + "\n#### kernel modules\n" + modules


def snapshot_all(vms: list[VM], label: str) -> dict[str, str]:
    """Snapshots of the VMs, taken side by side, kept as .cache/vm-logs/snapshot-<vm>-<label>.txt."""
    with timed(f"snapshot {label} ({len(vms)} VMs)"), concurrent.futures.ThreadPoolExecutor(len(vms)) as pool:
        texts = dict(zip((vm.name for vm in vms), pool.map(snapshot, vms)))
    for name, text in texts.items():
        (LOGS / f"snapshot-{name}-{label}.txt").write_text(text)
    return texts


# ---------------------------------------------------------------------------------------------------
# The fleet.

@dataclass
class Fleet:
    image: Path
    network: Network
    vms: dict[str, VM]
    workdir: Path
    inventory: Path
    package_dir: Path
    passed: set[str] = field(default_factory=set)
    snapshots_before: dict[str, str] = field(default_factory=dict)
    extra_vms: list[VM] = field(default_factory=list)

    def require(self, *steps: str) -> None:
        missing = [step for step in steps if step not in self.passed]
        if missing:
            pytest.fail(f"needs the earlier step(s) {', '.join(missing)}, which did not pass")

    def playbook(self, name: str, path: str, *extra: str, inventory: Path | None = None
                 ) -> subprocess.CompletedProcess:
        return playbook(name, inventory or self.inventory, REPO / path, *extra)


WORKLOADS = {
    # vm1's host workload is the client of the traffic tests, vm2's and vm3's serve on port 8080;
    # client -> db (vm3) is denied by the DENY policy below, client -> web (vm2) allowed.
    "vm1": {"name": "client", "sa": "client", "ports": []},
    "vm2": {"name": "web", "sa": "web", "ports": [8080]},
    "vm3": {"name": "db", "sa": "db", "ports": [8080]},
}


def write_inventory(path: Path, vms: dict[str, VM], ca_dir: Path, package_dir: Path) -> Path:
    """The fleet's inventory: ztmesh's defaults (so the Geneve tunnel kind), the air-gapped package
    source, the hosts' SSH settings, and one host workload per VM. The VMs have no default route
    (they reach nothing but the bridge), so the signing services' address is given per host."""
    hosts = {}
    for name, vm in vms.items():
        workload = WORKLOADS.get(name, {"name": f"app-{name}", "sa": f"app-{name}", "ports": [8080]})
        hosts[name] = {
            "ansible_host": vm.address,
            "ztmesh_ca_server_address": vm.address,
            "ztmesh_workloads": [{"name": workload["name"], "kind": "host", "addresses": [vm.address],
                                  "namespace": "shop", "service_account": workload["sa"],
                                  "ports": workload["ports"]}],
        }
    first = next(iter(vms.values()))
    inventory = {"all": {"children": {"ztmesh_nodes": {
        "vars": {
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(first.key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            "ansible_python_interpreter": "/usr/bin/python3",
            "ztmesh_ca_dir": str(ca_dir),
            "ztmesh_package_source": "controller",
            "ztmesh_package_dir": str(package_dir),
            "ztmesh_policies": [{
                "name": "no-client-to-db", "namespace": "shop", "scope": "workload",
                "workloads": ["vm3/db"], "action": "DENY",
                "rules": [{"clauses": [{"matches": [{"principals": ["cluster.local/ns/shop/sa/client"]}]}]}],
            }],
        },
        "hosts": hosts,
    }}}}
    path.write_text(json.dumps(inventory, indent=1) + "\n")
    return path


def fetch_node_packages() -> Path:
    """The package repository of the air-gapped mode (ztmesh_package_source: controller): the data
    plane tools with their dependencies, made on this machine by scripts/fetch-node-packages.sh
    (cached; shared with the molecule tier), or ZTMESH_NODE_PACKAGES when that names one already."""
    if os.environ.get("ZTMESH_NODE_PACKAGES"):
        return Path(os.environ["ZTMESH_NODE_PACKAGES"])
    script = REPO / "scripts" / "fetch-node-packages.sh"
    with timed("node package repository (fetch or cache)"):
        proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, \
        f"scripts/fetch-node-packages.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])
