"""Command line of the identity subsystem: `ztproxy ca ...` and `ztproxy cert ...`.

``add_subcommands(subparsers)`` plugs ``ca`` and ``cert`` into ztproxy's own parser; ``main(argv)`` runs
them standalone (``python -m ztproxy.identity ca init --ca-dir ...``). Every command returns an exit
code: 0 done, 1 refused (the message says why and what to do), 2 usage error (argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import List, Optional, Sequence

from ..config import DEFAULT_CERTS_DIR, DEFAULT_MESH_STATE, DEFAULT_TRUST_BUNDLE
from ..state import MeshStateError
from . import pki
from .client import parse_address
from .meshstate import MeshState
from .revocation import make_crl
from .show import inspect, render


def _add_ca(subparsers) -> None:
    ca = subparsers.add_parser(
        "ca", help="mesh CA: create or check CA material, sign CSRs, run the signing service"
    )
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="COMMAND")
    ca_sub.required = True

    init = ca_sub.add_parser(
        "init", help="create a root CA and a signing intermediate (Istio plug-in layout)"
    )
    init.add_argument("--ca-dir", required=True, help="directory to create; keys are written 0600")
    init.add_argument("--organization", default=pki.DEFAULT_CA_ORGANIZATION)
    init.add_argument("--root-days", type=int, default=pki.DEFAULT_ROOT_TTL_DAYS)
    init.add_argument("--intermediate-days", type=int, default=pki.DEFAULT_INTERMEDIATE_TTL_DAYS)
    init.add_argument("--json", action="store_true", help="print the CA summary as JSON")
    init.set_defaults(handler=_ca_init)

    check = ca_sub.add_parser("check", help="validate CA material (ztmesh's or an Istio plug-in CA)")
    check.add_argument("--ca-dir", required=True)
    check.add_argument("--json", action="store_true")
    check.set_defaults(handler=_ca_check)

    sign = ca_sub.add_parser("sign", help="sign one CSR for one identity; prints cert-chain.pem")
    sign.add_argument("--ca-dir", required=True)
    sign.add_argument("--identity", required=True, help="spiffe://<td>/ns/<ns>/sa/<sa>")
    sign.add_argument("--csr", required=True, help="PEM CSR file, '-' for standard input")
    sign.add_argument("--ttl", type=int, default=pki.DEFAULT_CERT_TTL, help="lifetime in seconds")
    sign.set_defaults(handler=_ca_sign)

    crl = ca_sub.add_parser("crl", help="write a CRL signed by the CA revoking the given serials")
    crl.add_argument("--ca-dir", required=True)
    crl.add_argument("--serial", action="append", default=[], help="hex serial (repeat)")
    crl.add_argument("--days", type=int, default=7, help="CRL validity (next update) in days")
    crl.add_argument("--out", required=True)
    crl.set_defaults(handler=_ca_crl)

    serve = ca_sub.add_parser("serve", help="run the signing service (Istio CreateCertificate over gRPC)")
    serve.add_argument("--ca-dir", required=True)
    serve.add_argument("--mesh-state", default=DEFAULT_MESH_STATE, help="who runs which identity where")
    serve.add_argument("--trust-domain", default=pki.DEFAULT_TRUST_DOMAIN)
    serve.add_argument("--trust-bundle", help="roots accepted from clients (default: <ca-dir>/root-cert.pem)")
    serve.add_argument(
        "--listen",
        action="append",
        default=[],
        help=f"host:port to listen on (repeat; default 0.0.0.0:{pki.DEFAULT_CA_PORT})",
    )
    serve.add_argument("--deny-list", help="YAML deny list (serials, spiffeIds, nodes)")
    serve.add_argument("--crl", action="append", default=[], help="CRL file (repeat)")
    serve.add_argument(
        "--server-name", action="append", default=[], help="DNS name for the server certificate"
    )
    serve.add_argument(
        "--cert-ttl",
        type=int,
        default=pki.DEFAULT_CERT_TTL,
        help="lifetime when the request asks for none (seconds)",
    )
    serve.add_argument("--max-cert-ttl", type=int, default=pki.MAX_CERT_TTL)
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(handler=_ca_serve)


def _add_cert(subparsers) -> None:
    cert = subparsers.add_parser("cert", help="this node's workload certificates")
    cert_sub = cert.add_subparsers(dest="cert_command", metavar="COMMAND")
    cert_sub.required = True

    show = cert_sub.add_parser("show", help="each identity with expiry, serial, issuer, remaining lifetime")
    show.add_argument("--certs-dir", default=DEFAULT_CERTS_DIR)
    show.add_argument("--trust-bundle", default=DEFAULT_TRUST_BUNDLE)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_cert_show)

    renew = cert_sub.add_parser(
        "renew", help="renew this node's certificates from the CA (online, at half-life)"
    )
    renew.add_argument("--certs-dir", default=DEFAULT_CERTS_DIR)
    renew.add_argument("--trust-bundle", default=DEFAULT_TRUST_BUNDLE)
    renew.add_argument("--ca-address", action="append", required=True, help="host:port of a CA (repeat)")
    renew.add_argument("--node-name", required=True)
    renew.add_argument("--mesh-state", default=DEFAULT_MESH_STATE)
    renew.add_argument("--trust-domain", default=pki.DEFAULT_TRUST_DOMAIN)
    renew.add_argument("--cert-ttl", type=int, default=pki.DEFAULT_CERT_TTL)
    renew.add_argument(
        "--ca-server-name", help="verify the CA by this DNS name (istiod) instead of SPIFFE ID"
    )
    renew.add_argument("--token-file", help="bearer token sent to the CA (istiod)")
    renew.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    renew.set_defaults(handler=_cert_renew)


def add_subcommands(subparsers) -> None:
    """Add ``ca`` and ``cert`` to an argparse subparsers object (ztproxy's CLI)."""
    _add_ca(subparsers)
    _add_cert(subparsers)


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return
    cert = summary["signing_cert"]
    print(f"CA directory: {summary['directory']}")
    print(f"signing CA:   {summary['subject']} (serial {cert['serial']}, expires {cert['not_after']})")
    print(
        f"root:         {summary['root_subject']} (serial {summary['root_serial']}); "
        f"{summary['roots']} root(s) in root-cert.pem"
    )


def _ca_init(args) -> int:
    ca = pki.create_ca(args.ca_dir, args.organization, args.root_days, args.intermediate_days)
    _print_summary(ca.summary(), args.json)
    return 0


def _ca_check(args) -> int:
    _print_summary(pki.load_ca(args.ca_dir).summary(), args.json)
    return 0


def _ca_sign(args) -> int:
    ca = pki.load_ca(args.ca_dir)
    if args.csr == "-":
        csr = sys.stdin.read()
    else:
        with open(args.csr, encoding="utf-8") as handle:
            csr = handle.read()
    leaf = pki.sign_csr(ca, csr, pki.SpiffeId.parse(args.identity), args.ttl)
    sys.stdout.write(pki.certs_pem([leaf] + [c for c in ca.chain if not pki.is_self_signed(c)]))
    return 0


def _ca_crl(args) -> int:
    ca = pki.load_ca(args.ca_dir)
    pki.write_file(
        args.out, make_crl(ca, [int(s.replace(":", ""), 16) for s in args.serial], args.days), pki.CERT_MODE
    )
    return 0


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def _until_signal(coro_factory) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await coro_factory(stop)


def _ca_serve(args) -> int:
    from .signer import SignerSettings, serve

    _logging(args.log_level)
    settings = SignerSettings(
        ca_dir=args.ca_dir,
        mesh_state=args.mesh_state,
        trust_domain=pki.check_trust_domain(args.trust_domain),
        trust_bundle=args.trust_bundle,
        listen=[parse_address(a, "listen address", allow_port_zero=True) for a in args.listen]
        or [("0.0.0.0", pki.DEFAULT_CA_PORT)],
        default_ttl=args.cert_ttl,
        max_ttl=args.max_cert_ttl,
        deny_list=args.deny_list,
        crls=args.crl,
        server_names=args.server_name or ["ztmesh-ca"],
    )
    asyncio.run(_until_signal(lambda stop: serve(settings, stop)))
    return 0


def _cert_show(args) -> int:
    report = inspect(args.certs_dir, args.trust_bundle if os.path.exists(args.trust_bundle) else None)
    print(render(report, args.json))
    bad = [e for e in report["identities"] if e.get("status") in ("expired", "invalid", "unreadable")]
    return 1 if bad else 0


def _cert_renew(args) -> int:
    from .renewer import RenewerSettings, run_renewer

    _logging(args.log_level)
    settings = RenewerSettings(
        certs_dir=args.certs_dir,
        trust_bundle=args.trust_bundle,
        ca_addresses=[parse_address(a) for a in args.ca_address],
        node_name=args.node_name,
        trust_domain=pki.check_trust_domain(args.trust_domain),
        cert_ttl=args.cert_ttl,
        ca_server_name=args.ca_server_name,
        token_path=args.token_file,
    )
    state = MeshState(args.mesh_state, settings.trust_domain)
    asyncio.run(
        _until_signal(lambda stop: run_renewer(settings, lambda: state.identities_on(args.node_name), stop))
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ztproxy", description="ztmesh identities: CA and certificates")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_subcommands(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run parsed ``ca``/``cert`` arguments; refusals become one clear line on stderr and exit code 1."""
    try:
        return args.handler(args)
    except (pki.IdentityError, MeshStateError) as exc:
        print(f"ztproxy: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ztproxy: {exc}", file=sys.stderr)
        return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    return run(args)


__all__: List[str] = ["add_subcommands", "build_parser", "main", "run"]
