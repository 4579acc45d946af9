"""The fuzzing tier: Hypothesis feeds generated inputs to the real parsers and to a running ztproxy.

``ZTMESH_FUZZ_EXAMPLES`` sets how many inputs each fuzz test generates: 200 by default (the CI run, the
whole tier in about a minute), 100000 for the long run (docs/testing.md). Every test also checks that
the proxy or parser still serves a normal request afterwards, and that memory stayed bounded.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path
from typing import Any, Callable, Deque, Tuple

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


class Replay:
    """The last inputs of a fuzz run, fed once more to the code under test, without Hypothesis, to
    measure its memory.

    Hypothesis's own bookkeeping grows with every example it generates (about 6 MiB per 1,000 queries
    of the DNS run, 207 MiB over the first long run's 59,505), so the resident size across a run says
    nothing about the code under test once the run is long; a run of 100,000 inputs failed every
    memory check on that alone. Replaying inputs with Hypothesis idle does: what the code keeps per
    input, it keeps again. (What it allocates once, such as a metric series per label value, is not
    counted; those are bounded by their labels.)"""

    def __init__(self, limit: int) -> None:
        self.inputs: Deque[Tuple[Any, ...]] = collections.deque(maxlen=limit)

    def add(self, *args: Any) -> None:
        self.inputs.append(args)

    def growth(self, feed: Callable[..., Any]) -> Tuple[int, int]:
        """Resident bytes gained while ``feed(*input)`` runs for each kept input; and their number."""
        inputs = list(self.inputs)
        before = rss_bytes()
        for args in inputs:
            feed(*args)
        return rss_bytes() - before, len(inputs)
