#!/usr/bin/env python3
"""Print the sum of a Prometheus counter over the series whose labels match, read from ztproxy's
metrics port inside the proxy namespace (run with `ip netns exec ztproxy`).

usage: metric_sum.py NAME [label=value ...]
"""

from __future__ import annotations

import re
import sys
import urllib.request

SERIES = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>.*)\})?\s+(?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def main() -> int:
    name, wanted = sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:])
    text = urllib.request.urlopen("http://127.0.0.1:15020/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        match = SERIES.match(line)
        if not match or match.group("name") != name:
            continue
        labels = dict(LABEL.findall(match.group("labels") or ""))
        if all(labels.get(k) == v for k, v in wanted.items()):
            total += float(match.group("value"))
    print(int(total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
