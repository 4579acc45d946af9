#!/usr/bin/env python3
"""ztproxy benchmark: plain TCP, ztproxy HBONE, stunnel and HAProxy side by side, loopback only.

    sudo .venv/bin/python bench/run.py            # full run (about 4 minutes on 2 cores)
    sudo .venv/bin/python bench/run.py --quick    # short run (about 1 minute): does everything work?

Everything runs in a throwaway network namespace (its loopback), created and deleted by this script;
the host's own network is never touched. Results: bench/results/<timestamp>.json and .md (a table, with
ztproxy's ratios to the other systems). See docs/performance.md for the method and the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402
from systems import (  # noqa: E402
    SYSTEMS,
    Backends,
    BenchError,
    Namespace,
    Pki,
    System,
    Ztproxy,
    raise_open_files,
    require_tools,
)

RESULTS = Path(__file__).resolve().parent / "results"
TOOLS = ("ip", "iptables", "iperf3", "wrk", "nginx", "stunnel4", "haproxy")

# Seconds per test: (full, quick).
DURATIONS = {"throughput": (10, 2), "latency": (5, 2), "conn_rate": (5, 2), "concurrent": (8, 3)}
CONN_RATE_CLIENTS = 32
CONCURRENT = 1000


class Deadline(Exception):
    pass


def _version(argv: List[str], word: str = "") -> str:
    """The first output line of ``argv`` that mentions ``word`` (e.g. stunnel prints a preamble)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if word.lower() in line.lower()]
    return lines[0].strip() if lines else "unknown"


def machine() -> Dict:
    import ssl

    import h2
    info = {
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "openssl_python": ssl.OPENSSL_VERSION, "h2": h2.__version__,
        "stunnel": _version(["stunnel4", "-version"], "stunnel "), "haproxy": _version(["haproxy", "-v"]),
        "iperf3": _version(["iperf3", "--version"]), "wrk": _version(["wrk", "--version"]),
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        import uvloop
        info["uvloop"] = uvloop.__version__
    except ImportError:
        info["uvloop"] = None
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info


def measure_system(ns: Namespace, system: System, quick: bool, tests: List[str],
                   profile_dir: Optional[Path]) -> Dict:
    pick = 1 if quick else 0
    secs = {k: v[pick] for k, v in DURATIONS.items()}
    result: Dict = {"describe": system.describe()}
    system.start()
    try:
        pids = system.pids()
        measure.settle(1.0)
        result["rss_idle_kib"] = measure.rss_kib(pids)
        if "throughput" in tests:
            profiler = None
            if profile_dir is not None and isinstance(system, Ztproxy):
                profiler = _start_profiler(pids, profile_dir, secs["throughput"], system.name)
            result["throughput"] = measure.iperf3(ns, system, secs["throughput"])
            if profiler is not None:
                for proc in profiler:
                    proc.wait(60)
            measure.settle()
        if "latency" in tests:
            result["latency"] = measure.wrk(ns, system, secs["latency"], connections=1, threads=1)
            measure.settle()
        if "conn_rate" in tests:
            result["conn_rate"] = measure.wrk(ns, system, secs["conn_rate"], connections=CONN_RATE_CLIENTS,
                                              threads=2, close=True)
            measure.settle()
        if "concurrent" in tests:
            result["concurrent"] = measure.wrk(ns, system, secs["concurrent"], connections=CONCURRENT,
                                               threads=2, pids_for_rss=pids)
            measure.settle(1.0)
        result["rss_after_kib"] = measure.rss_kib(pids)
    finally:
        system.stop()
    return result


def _start_profiler(pids: List[int], directory: Path, seconds: float, label: str) -> List[subprocess.Popen]:
    """py-spy (pip install py-spy) on each ztproxy process during the throughput test."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        raise BenchError("--profile needs py-spy: `.venv/bin/pip install py-spy`")
    directory.mkdir(parents=True, exist_ok=True)
    procs = []
    for index, pid in enumerate(pids):
        out = directory / f"{label}-node-{'ab'[index]}.txt"
        procs.append(subprocess.Popen([str(spy), "record", "-p", str(pid), "-d", str(int(seconds)),
                                       "-r", "200", "-f", "raw", "-o", str(out), "--nonblocking"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.5)
    return procs


def _median(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def summarize(rounds: List[Dict[str, Dict]]) -> Dict[str, Dict]:
    """Per system, the median over rounds of each headline figure."""
    summary: Dict[str, Dict] = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds if name in r]

        def pick(path: str, runs=runs):
            values = []
            for run_ in runs:
                value = run_
                for part in path.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                values.append(value)
            return _median(values)

        summary[name] = {
            "throughput_gbit_s": pick("throughput.gbit_s"),
            "proxy_cpu_s_per_gb": pick("throughput.proxy_cpu_s_per_gb"),
            "latency_p50_ms": pick("latency.p50_ms"),
            "latency_p99_ms": pick("latency.p99_ms"),
            "proxy_cpu_us_per_request": pick("latency.proxy_cpu_us_per_request"),
            "conn_per_s": pick("conn_rate.rps"),
            "proxy_cpu_us_per_conn": pick("conn_rate.proxy_cpu_us_per_request"),
            "conn_rate_errors": pick("conn_rate.errors"),
            "rps_1000_conns": pick("concurrent.rps"),
            "errors_1000_conns": pick("concurrent.errors"),
            "rss_idle_mib": _mib(pick("rss_idle_kib")),
            "rss_1000_conns_mib": _mib(pick("concurrent.proxy_rss_peak_kib")),
        }
    return summary


def _mib(kib: Optional[float]) -> Optional[float]:
    return round(kib / 1024, 1) if kib is not None else None


COLUMNS = [
    ("throughput_gbit_s", "1 stream Gbit/s"),
    ("proxy_cpu_s_per_gb", "proxy CPU s/GB"),
    ("latency_p50_ms", "p50 ms"),
    ("latency_p99_ms", "p99 ms"),
    ("proxy_cpu_us_per_request", "proxy CPU us/req"),
    ("conn_per_s", "conn/s"),
    ("proxy_cpu_us_per_conn", "proxy CPU us/conn"),
    ("rps_1000_conns", "req/s @1000 conns"),
    ("rss_idle_mib", "RSS idle MiB"),
    ("rss_1000_conns_mib", "RSS @1000 MiB"),
]


def table(summary: Dict[str, Dict]) -> str:
    head = "| system | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, row in summary.items():
        lines.append(f"| {name} | " + " | ".join("-" if row[c] is None else f"{row[c]:g}" for c, _ in COLUMNS)
                     + " |")
    if "ztproxy" in summary:
        z = summary["ztproxy"]
        lines.append("")
        lines.append("ztproxy relative to each system (>1 = ztproxy has more of it):")
        lines.append("")
        lines.append("| versus | " + " | ".join(c[1] for c in COLUMNS) + " |")
        lines.append("|" + " --- |" * (len(COLUMNS) + 1))
        for name, row in summary.items():
            if name == "ztproxy":
                continue
            cells = []
            for c, _ in COLUMNS:
                if z[c] is None or not row[c]:
                    cells.append("-")
                else:
                    cells.append(f"{z[c] / row[c]:.2f}x")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short tests, one round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all systems (default 2, "
                        "quick 1); the summary is the median")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    parser.add_argument("--tests", default=",".join(DURATIONS),
                        help=f"comma-separated subset of {', '.join(DURATIONS)}")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="ztproxy's event loop (ZTPROXY_EVENT_LOOP)")
    parser.add_argument("--compare-src", type=Path, default=None, metavar="DIR",
                        help="also run the ztproxy package found in DIR (e.g. an older checkout) as "
                             "system 'ztproxy-compare', for before/after figures in one run")
    parser.add_argument("--profile", action="store_true",
                        help="record py-spy profiles of both ztproxy processes during the throughput test")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop after this long (default 900)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.compare_src is not None:
        if not (args.compare_src / "ztproxy" / "__main__.py").is_file():
            parser.error(f"--compare-src {args.compare_src}: no ztproxy package in that directory")
        names.insert(names.index("ztproxy") + 1 if "ztproxy" in names else 0, "ztproxy-compare")
    tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    if any(t not in DURATIONS for t in tests):
        parser.error(f"--tests: choose from {', '.join(DURATIONS)}")
    rounds_n = args.rounds or (1 if args.quick else 2)
    try:
        require_tools(TOOLS)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    def on_alarm(signum, frame):
        raise Deadline(f"the benchmark exceeded --max-seconds {args.max_seconds:g}")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(1))
    signal.alarm(int(args.max_seconds))
    raise_open_files()
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S") + ("-quick" if args.quick else "")
    workdir = Path(tempfile.mkdtemp(prefix="ztbench-"))
    ns = Namespace(f"ztbench-{os.getpid()}")
    info = machine()
    rounds: List[Dict[str, Dict]] = []
    backends = None
    started = time.monotonic()
    try:
        ns.create()
        pki = Pki(workdir)
        backends = Backends(ns, workdir)
        backends.start()
        for index in range(rounds_n):
            results: Dict[str, Dict] = {}
            for name in names:
                if name == "ztproxy-compare":
                    system = Ztproxy(ns, workdir, pki, args.event_loop, src=args.compare_src, name=name)
                elif SYSTEMS[name] is Ztproxy:
                    system = Ztproxy(ns, workdir, pki, args.event_loop)
                else:
                    system = SYSTEMS[name](ns, workdir, pki)
                print(f"round {index + 1}/{rounds_n}: {name} ...", file=sys.stderr, flush=True)
                profile_dir = args.out / f"{stamp}-profile" if args.profile and index == 0 else None
                results[name] = measure_system(ns, system, args.quick, tests, profile_dir)
                failed = [t for t, r in results[name].items() if isinstance(r, dict) and "error" in r]
                if failed:
                    keep = args.out / f"{stamp}-logs" / f"round{index + 1}-{name}"
                    shutil.copytree(system.dir, keep, dirs_exist_ok=True)
                    print(f"  {name}: {', '.join(failed)} failed; logs kept in {keep}", file=sys.stderr)
            rounds.append(results)
    except (BenchError, Deadline) as exc:
        print(f"bench: {exc}\n(work files kept in {workdir})", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        if backends is not None:
            backends.stop()
        ns.delete()
    info["loadavg_end"] = list(os.getloadavg())
    info["wall_seconds"] = round(time.monotonic() - started, 1)
    summary = summarize(rounds)
    report = {"timestamp": stamp, "quick": args.quick, "rounds": rounds, "summary": summary, "machine": info,
              "settings": {"durations_s": {k: v[1 if args.quick else 0] for k, v in DURATIONS.items()},
                           "conn_rate_clients": CONN_RATE_CLIENTS, "concurrent_connections": CONCURRENT,
                           "ztproxy_event_loop": args.event_loop}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(summary)
    load = (f"load average {info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at end, "
            f"{info['cpus']} CPUs ({info.get('cpu_model', '?')})")
    (args.out / f"{stamp}.md").write_text(f"# Benchmark {stamp}\n\n{load}\n\n{text}\n")
    print(text)
    print(f"\n{load}\nresults: {args.out / (stamp + '.json')}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
