"""The fuzzing tier: Hypothesis feeds generated inputs to the real parsers and to a running ztproxy.

``ZTMESH_FUZZ_EXAMPLES`` sets how many inputs each fuzz test generates: 200 by default (the CI run, the
whole tier in about a minute), 100000 for the long run (docs/testing.md). Every test also checks that
the proxy or parser still serves a normal request afterwards, and that memory stayed bounded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXAMPLES = int(os.environ.get("ZTMESH_FUZZ_EXAMPLES", "200"))

settings.register_profile(
    "ztmesh-fuzz",
    max_examples=EXAMPLES,
    deadline=None,  # the machine is shared: time per input is not what is tested
    database=None,  # nothing written into the work tree; a failure prints its reproducing input
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile("ztmesh-fuzz")


def rss_bytes() -> int:
    """Resident memory of this process (the in-process proxy and parsers run here)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
