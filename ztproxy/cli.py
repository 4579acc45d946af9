"""``ztproxy run --config FILE`` and ``ztproxy check --config FILE``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import List, Optional

from ztproxy import __version__
from ztproxy.certs import CertError, IdentityFiles, load_trust_bundle, validate_identity
from ztproxy.config import ConfigError, Settings, load_settings
from ztproxy.state import MeshStateError, load_mesh_state

EXIT_OK = 0
EXIT_STARTUP = 1
EXIT_CONFIG = 2


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    formatter.converter = time.gmtime  # type: ignore[attr-defined]
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # h2/hpack log every frame and header at debug: far too much even for debugging the proxy.
    for noisy in ("h2", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def raise_open_files_limit() -> None:
    """One proxied connection holds two sockets: use the whole hard limit of open files."""
    try:
        import resource
    except ImportError:  # pragma: no cover
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def check(settings: Settings) -> List[str]:
    """Every problem that would stop ztproxy from serving: mesh state, trust bundle, certificates."""
    problems: List[str] = []
    try:
        state = load_mesh_state(settings.mesh_state, settings.trust_domain)
    except MeshStateError as exc:
        return [str(exc)]
    for warning in state.warnings:
        print(f"warning: mesh state: {warning}")
    try:
        roots = load_trust_bundle(settings.trust_bundle)
        print(f"trust bundle {settings.trust_bundle}: {len(roots)} root(s)")
    except CertError as exc:
        return [str(exc)]
    local = state.local_workloads(settings.node_name)
    print(f"mesh state {settings.mesh_state}: {len(state.workloads)} workload(s), {len(state.services)} "
          f"service(s), {len(state.policies)} policies; {len(local)} workload(s) on node "
          f"{settings.node_name}")
    for workload in local:
        if workload.trust_domain != settings.trust_domain:
            problems.append(f"workload {workload.uid}: trust domain {workload.trust_domain!r} differs from "
                            f"the proxy's {settings.trust_domain!r}")
    for identity in sorted({w.identity for w in local}):
        workload = next(w for w in local if w.identity == identity)
        files = IdentityFiles.under(settings.certs_dir, workload.namespace, workload.service_account)
        try:
            expires = validate_identity(files, settings.trust_bundle, identity)
        except CertError as exc:
            problems.append(f"identity {identity}: {exc}")
            continue
        print(f"identity {identity}: certificate valid until {expires.isoformat()}")
    return problems


def _run(settings: Settings) -> int:
    from ztproxy.app import App, StartupError

    setup_logging(settings)
    raise_open_files_limit()
    log = logging.getLogger("ztproxy")
    app = App(settings)
    uvloop = None
    if os.environ.get("ZTPROXY_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop  # type: ignore[import-not-found, no-redef]
        except ImportError:
            uvloop = None
    try:
        if uvloop is not None and hasattr(uvloop, "run"):
            clean = uvloop.run(app.serve())
        else:
            clean = asyncio.run(app.serve())
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_STARTUP
    log.info("stopped (%s)", "clean drain" if clean else "drain deadline reached")
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ztproxy",
                                     description="ztmesh node proxy (HBONE, ztunnel-compatible)")
    parser.add_argument("--version", action="version", version=f"ztproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the proxy"), ("check", "validate settings, mesh state and certificates")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", "-c", required=True, help="proxy settings file (YAML)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"ztproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        problems = check(settings)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            return EXIT_CONFIG
        print("ok")
        return EXIT_OK
    return _run(settings)
