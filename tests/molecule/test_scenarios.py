"""Molecule tier: every scenario directory under molecule/ runs as `molecule test -s NAME`.

Scenarios are discovered, so a new directory is picked up without touching this file. Every directory
except molecule/shared is a scenario; one without a molecule.yml fails (it is broken, not optional).
They run in the background while the other tiers run (scenario_runs.py): the node image and the package
repositories are made first, then the scenarios, ZTMESH_MOLECULE_PARALLEL at a time. Molecule's whole
output goes to .cache/molecule-logs/NAME.log; a failure shows its tail.
"""

from __future__ import annotations

import pytest
from scenario_runs import MOLECULE_DIR, SCENARIO_TIMEOUT, VENV_BIN, BackgroundScenarios, tail

# Directories under molecule/ that hold shared pieces, not scenarios.
NOT_SCENARIOS = {"shared"}
# Run first: when the node platform itself is broken, no role scenario can pass.
FIRST = ("platform",)


def discover_scenarios() -> list[str]:
    names = sorted(
        path.name
        for path in MOLECULE_DIR.iterdir()
        if path.is_dir() and not path.name.startswith(".") and path.name not in NOT_SCENARIOS
    )
    return [name for name in FIRST if name in names] + [name for name in names if name not in FIRST]


@pytest.mark.parametrize("scenario", discover_scenarios())
def test_molecule_scenario(scenario: str, molecule_runs: BackgroundScenarios) -> None:
    scenario_dir = MOLECULE_DIR / scenario
    assert (scenario_dir / "molecule.yml").is_file(), (
        f"{scenario_dir} is not a molecule scenario (no molecule.yml); shared files belong in molecule/shared"
    )
    assert (VENV_BIN / "molecule").is_file(), f"{VENV_BIN / 'molecule'} is missing: run scripts/setup.sh"
    result = molecule_runs.wait(scenario)
    if result.rc != 0:
        outcome = f"timed out after {SCENARIO_TIMEOUT} s" if result.rc is None else f"exit {result.rc}"
        pytest.fail(f"molecule scenario '{scenario}' failed ({outcome}, {result.elapsed:.0f} s); "
                    f"log: {result.log}\n{tail(result.log)}", pytrace=False)
