"""`ztproxy cert show`: every identity installed on this node, with expiry, serial, issuer and status."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from .pki import (
    CHAIN_FILE,
    DEFAULT_RENEW_FRACTION,
    KEY_FILE,
    IdentityError,
    key_matches_cert,
    load_cert_file,
    load_key_file,
    summarize,
    utcnow,
    verify_chain,
)


def inspect(certs_dir: str, trust_bundle: Optional[str]) -> Dict[str, object]:
    """A report of ``certs_dir``: one entry per ``<namespace>/<service-account>/cert-chain.pem``."""
    now = utcnow()
    roots = []
    bundle_error = None
    if trust_bundle:
        try:
            roots = load_cert_file(trust_bundle)
        except IdentityError as exc:
            bundle_error = str(exc)
    entries: List[Dict[str, object]] = []
    if os.path.isdir(certs_dir):
        for namespace in sorted(os.listdir(certs_dir)):
            ns_dir = os.path.join(certs_dir, namespace)
            if not os.path.isdir(ns_dir):
                continue
            for account in sorted(os.listdir(ns_dir)):
                directory = os.path.join(ns_dir, account)
                if os.path.isfile(os.path.join(directory, CHAIN_FILE)):
                    entries.append(_entry(directory, roots, now))
    return {
        "certs_dir": certs_dir,
        "trust_bundle": trust_bundle,
        "trust_bundle_error": bundle_error,
        "roots": [summarize(r).as_dict(now) | {"subject": r.subject.rfc4514_string()} for r in roots],
        "identities": entries,
    }


def _entry(directory: str, roots, now) -> Dict[str, object]:
    entry: Dict[str, object] = {"path": directory}
    try:
        certs = load_cert_file(os.path.join(directory, CHAIN_FILE))
    except IdentityError as exc:
        entry.update(status="unreadable", problem=str(exc))
        return entry
    summary = summarize(certs[0])
    entry.update(summary.as_dict(now))
    entry["renew_at"] = summary.renew_at(DEFAULT_RENEW_FRACTION).isoformat()
    problem = None
    try:
        if not key_matches_cert(load_key_file(os.path.join(directory, KEY_FILE)), certs[0]):
            problem = "key.pem does not match the certificate"
    except IdentityError as exc:
        problem = str(exc)
    if problem is None and roots:
        try:
            verify_chain(certs[0], certs[1:], roots, now)
        except IdentityError as exc:
            problem = str(exc)
    if summary.remaining(now) <= 0:
        status = "expired"
    elif problem:
        status = "invalid"
    elif now >= summary.renew_at(DEFAULT_RENEW_FRACTION):
        status = "renewal-due"
    else:
        status = "valid"
    entry["status"] = status
    if problem:
        entry["problem"] = problem
    return entry


def _duration(seconds: float) -> str:
    sign = "-" if seconds < 0 else ""
    seconds = abs(int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d{hours}h"
    if hours:
        return f"{sign}{hours}h{minutes:02d}m"
    return f"{sign}{minutes}m{secs:02d}s"


def render(report: Dict[str, object], as_json: bool) -> str:
    if as_json:
        return json.dumps(report, indent=2, sort_keys=True)
    lines = []
    if report.get("trust_bundle_error"):
        lines.append(f"trust bundle: {report['trust_bundle_error']}")
    for root in report["roots"]:  # type: ignore[union-attr]
        lines.append(f"trust root: {root['subject']}  serial {root['serial']}  expires {root['not_after']}")
    identities = report["identities"]
    if not identities:
        lines.append(f"no identity installed under {report['certs_dir']}")
        return "\n".join(lines)
    header = ("IDENTITY", "STATUS", "EXPIRES (UTC)", "REMAINING", "LIFETIME", "SERIAL", "ISSUER")
    rows = [header]
    for entry in identities:  # type: ignore[union-attr]
        if "serial" not in entry:
            rows.append((entry["path"], entry["status"], "-", "-", "-", "-", "-"))
            continue
        rows.append(
            (
                entry["identity"] or f"(no SPIFFE ID) {entry['path']}",
                entry["status"],
                str(entry["not_after"])[:19].replace("T", " "),
                _duration(entry["remaining_seconds"]),
                _duration(entry["lifetime_seconds"]),
                entry["serial"],
                entry["issuer"],
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    for entry in identities:  # type: ignore[union-attr]
        if entry.get("problem"):
            lines.append(f"{entry.get('identity') or entry['path']}: {entry['problem']}")
    return "\n".join(lines)
