"""The ``ztproxy`` command.

``ztproxy run --config FILE`` serves the whole node proxy (ztproxy.app.App: data plane, policy,
telemetry, DNS, admin/metrics/readiness, online renewal); ``ztproxy check --config FILE`` validates the
settings, the mesh state with its policies, the revocation files and the certificates without starting
anything. ``ztproxy ca ...`` and ``ztproxy cert ...`` are the identity commands (ztproxy.identity.cli).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any, List, Optional

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
          f"service(s), {len(state.policy_index)} valid authorization policies; {len(local)} workload(s) "
          f"on node {settings.node_name}")
    if settings.ca.addresses:
        try:
            import ztproxy.identity.renewer  # noqa: F401 (can online renewal run here?)
            print(f"online renewal from {len(settings.ca.addresses)} CA address(es)")
        except ImportError as exc:
            problems.append(f"ca.addresses is set but online renewal cannot run: {exc}")
    if settings.revocation.enabled:
        from ztproxy.proxy import StartupError, load_revocation

        try:
            load_revocation(settings, state)
            print(f"revocation: deny list {settings.revocation.deny_list or '(none)'}, "
                  f"{len(settings.revocation.crls)} CRL(s)")
        except StartupError as exc:
            problems.append(str(exc))
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
    from ztproxy.app import App
    from ztproxy.proxy import StartupError

    setup_logging(settings)
    raise_open_files_limit()
    log = logging.getLogger("ztproxy")
    node = App(settings)
    uvloop = None
    if os.environ.get("ZTPROXY_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop  # type: ignore[import-not-found, no-redef]
        except ImportError:
            uvloop = None
    try:
        if uvloop is not None and hasattr(uvloop, "run"):
            clean = uvloop.run(node.serve())
        else:
            clean = asyncio.run(node.serve())
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_STARTUP
    log.info("stopped (%s)", "clean drain" if clean else "drain deadline reached")
    return EXIT_OK


def _add_identity_commands(commands: Any) -> None:
    """``ca`` and ``cert`` from ztproxy.identity. They need the gRPC wire stack (protobuf); a node
    without it still runs the proxy, and the two commands say what is missing."""
    try:
        from ztproxy.identity.cli import add_subcommands
    except ImportError as exc:
        for name in ("ca", "cert"):
            sub = commands.add_parser(name, help=f"unavailable here: {exc}")
            sub.add_argument("arguments", nargs=argparse.REMAINDER)
            sub.set_defaults(unavailable=f"'ztproxy {name}' needs a missing Python package: {exc}")
        return
    add_subcommands(commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ztproxy",
                                     description="ztmesh node proxy (HBONE, ztunnel-compatible)")
    parser.add_argument("--version", action="version", version=f"ztproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the proxy"),
                       ("check", "validate settings, mesh state, policies and certificates")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", "-c", required=True, help="proxy settings file (YAML)")
    _add_identity_commands(commands)  # ca ..., cert ...
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("run", "check"):
        if getattr(args, "unavailable", None):
            print(f"ztproxy: {args.unavailable}", file=sys.stderr)
            return EXIT_STARTUP
        from ztproxy.identity.cli import run as run_identity_command

        return run_identity_command(args)
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
