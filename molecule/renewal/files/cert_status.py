#!/usr/bin/python3
"""Print, as JSON, what this node's ztproxy reports about its certificates: the admin endpoint's
renewal view (per identity: remaining lifetime, renewals, failures, last result) and the certificate
metrics. Run inside the proxy namespace: ip netns exec ztproxy python3 cert_status.py"""

import json
import re
import urllib.request

dump = json.load(urllib.request.urlopen("http://127.0.0.1:15000/config_dump", timeout=5))
# The metrics listener as the settings say (an address of the proxy namespace, or every address).
host, _, port = dump["settings"]["listen"]["metrics"].rpartition(":")
host = "127.0.0.1" if host in ("0.0.0.0", "") else host.strip("[]")
metrics = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
samples = {}
for line in metrics.splitlines():
    match = re.match(r'^(istio_agent_\w+|ztproxy_cert_\w+)(\{[^}]*\})? (\S+)$', line)
    if match:
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
print(json.dumps({"renewal": dump["renewal"], "metrics": samples}))
