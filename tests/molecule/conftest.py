"""Molecule tier: start the selected scenarios in the background at collection (scenario_runs.py)."""

from __future__ import annotations

import pytest
from scenario_runs import BackgroundScenarios, stop_running

_background: BackgroundScenarios | None = None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Put the molecule tests last, and start their scenarios now, in the background."""
    global _background
    molecule_items = [item for item in items if item.get_closest_marker("molecule")]
    if not molecule_items:
        return
    items[:] = [item for item in items if item not in molecule_items] + molecule_items
    if config.option.collectonly:
        return
    scenarios = [item.callspec.params["scenario"] for item in molecule_items
                 if hasattr(item, "callspec") and not item.get_closest_marker("skip")]
    if scenarios:
        _background = BackgroundScenarios(scenarios)
        _background.start()


@pytest.fixture(scope="session")
def molecule_runs() -> BackgroundScenarios:
    assert _background is not None, "the molecule scenarios were not started at collection"
    return _background


def pytest_sessionfinish(session, exitstatus):
    """A session that ends before its molecule tests (interrupt, -x) kills the runs still under way."""
    stop_running()
