"""The vm tier's fixtures (the code they use is in vmtier.py, whose docstring describes the tier)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmtier import (
    FLEET,
    LOGS,
    ORDER,
    TIMINGS,
    VM,
    Fleet,
    Network,
    boot,
    build_image,
    fetch_node_packages,
    make_vm,
    snapshot_all,
    timed,
    write_inventory,
)


def pytest_collection_modifyitems(config, items):
    """Run the tier's files in ORDER (they share one fleet); other items keep their places."""
    positions = [i for i, item in enumerate(items) if Path(str(item.fspath)).parent == Path(__file__).parent]
    ours = [items[i] for i in positions]
    ours.sort(key=lambda item: ORDER.index(Path(str(item.fspath)).name)
              if Path(str(item.fspath)).name in ORDER else len(ORDER))
    for i, item in zip(positions, ours):
        items[i] = item


@pytest.fixture(scope="session")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    if LOGS.exists():
        shutil.rmtree(LOGS)
    LOGS.mkdir(parents=True)
    TIMINGS.clear()
    image = build_image("base")
    plan = json.loads((image / "network.json").read_text())
    workdir = tmp_path_factory.mktemp("vm-fleet")
    package_dir = fetch_node_packages()
    network = Network(plan)
    vms: dict[str, VM] = {}
    state: Fleet | None = None
    try:
        macs = list(plan["vms"].items())
        for index, name in enumerate(FLEET):
            mac, address = macs[index]
            vms[name] = make_vm(name, index + 1, image, network, mac, address)
        with timed("boot 3 VMs in parallel"):
            boot(list(vms.values()))
        inventory = write_inventory(workdir / "inventory.json", vms, workdir / "ca", package_dir)
        state = Fleet(image=image, network=network, vms=vms, workdir=workdir, inventory=inventory,
                      package_dir=package_dir)
        state.snapshots_before = snapshot_all(list(vms.values()), "before")
        yield state
    finally:
        for vm in [*vms.values(), *(state.extra_vms if state else [])]:
            vm.stop()
        network.close()
        (LOGS / "timings.json").write_text(json.dumps(TIMINGS, indent=1) + "\n")
