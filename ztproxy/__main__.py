"""``python -m ztproxy`` is the same as the ``ztproxy`` console script."""

from __future__ import annotations

import sys

from ztproxy.cli import main

sys.exit(main())
