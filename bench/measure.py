"""Measurements: iperf3 throughput, wrk latency and connection rate, proxy RSS and CPU, machine load.

Clients are independent, standard tools (iperf3, wrk) run inside the benchmark namespace.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from typing import Dict, List, Optional, Sequence

from systems import Namespace, System

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pids: Sequence[int]) -> int:
    """Resident memory of the processes, summed (KiB)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time the processes (all their threads) have used so far."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLOCK_TICKS


class MachineLoad:
    """The whole machine's CPU busy fraction between start() and stop() (from /proc/stat)."""

    @staticmethod
    def _snapshot() -> List[int]:
        with open("/proc/stat") as stat:
            return [int(v) for v in stat.readline().split()[1:]]

    def __enter__(self) -> MachineLoad:
        self.before = self._snapshot()
        self.busy = 0.0
        return self

    def __exit__(self, *exc) -> None:
        after = self._snapshot()
        delta = [a - b for a, b in zip(after, self.before)]
        idle = delta[3] + delta[4]  # idle + iowait
        total = sum(delta) or 1
        self.busy = round(1 - idle / total, 3)


class RssSampler:
    """Peak summed RSS of the proxies while a test runs."""

    def __init__(self, pids: Sequence[int], interval: float = 0.2) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib(self.pids))


def iperf3(ns: Namespace, system: System, seconds: float) -> Dict:
    """One TCP stream, client -> server, through the system: Gbit/s, plus the proxies' CPU time."""
    host, port = system.address(5201)
    cpu_before = cpu_seconds(system.pids())
    with MachineLoad() as load:
        proc = subprocess.run(ns.cmd(["iperf3", "-c", host, "-p", str(port), "-t", f"{seconds:g}", "-J",
                                      "--connect-timeout", "5000"]),
                              capture_output=True, text=True, timeout=seconds + 60)
    cpu = cpu_seconds(system.pids()) - cpu_before
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        return {"error": f"iperf3 output unreadable: {proc.stderr.strip() or proc.stdout[:300]}"}
    if "error" in report:
        return {"error": f"iperf3: {report['error']}"}
    received = report["end"]["sum_received"]
    gbits = received["bits_per_second"] / 1e9
    result = {"gbit_s": round(gbits, 3), "bytes": received["bytes"],
              "seconds": round(received["seconds"], 2), "machine_busy": load.busy}
    if system.pids():
        # CPU both proxies used per GB carried: what the bytes cost, independent of machine load.
        result["proxy_cpu_s"] = round(cpu, 2)
        result["proxy_cpu_s_per_gb"] = round(cpu / (received["bytes"] / 1e9), 3)
    return result


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> Dict:
    result: Dict = {}
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", output, re.MULTILINE)
        if match:
            result[f"p{pct}_ms"] = round(_ms(match.group(1)), 4)
    match = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if match:
        result["rps"] = round(float(match.group(1)), 1)
    match = re.search(r"(\d+) requests in", output)
    if match:
        result["requests"] = int(match.group(1))
    errors = 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if match:
        errors += sum(int(g) for g in match.groups())
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if match:
        errors += int(match.group(1))
    result["errors"] = errors
    return result


def wrk(ns: Namespace, system: System, seconds: float, connections: int, threads: int,
        close: bool = False, pids_for_rss: Optional[Sequence[int]] = None) -> Dict:
    host, port = system.address(8080)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{host}:{port}/")
    sampler = RssSampler(pids_for_rss or [])
    cpu_before = cpu_seconds(system.pids())
    with MachineLoad() as load, sampler:
        proc = subprocess.run(ns.cmd(argv), capture_output=True, text=True, timeout=seconds + 60)
    cpu = cpu_seconds(system.pids()) - cpu_before
    if proc.returncode != 0:
        return {"error": f"wrk failed: {proc.stderr.strip() or proc.stdout[-300:]}"}
    result = parse_wrk(proc.stdout)
    result["machine_busy"] = load.busy
    if system.pids() and result.get("requests"):
        # CPU the proxies spent per request (per connection with ``close``): independent of load.
        result["proxy_cpu_us_per_request"] = round(cpu / result["requests"] * 1e6, 1)
    if pids_for_rss:
        result["proxy_rss_peak_kib"] = sampler.peak
    return result


def settle(seconds: float = 0.5) -> None:
    time.sleep(seconds)
