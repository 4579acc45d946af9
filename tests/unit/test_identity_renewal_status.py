"""What a proxy reports about its certificates: remaining lifetimes and renewal results as metrics, a
warning once renewal keeps failing into the last quarter of a lifetime, retries that never outwait the
certificate in use. The renewer here talks to a real (closed) loopback port, so failures are real."""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
from pathlib import Path
from typing import List

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from tests.pki import CA, now
from ztproxy.identity.metrics import CertificateMetrics
from ztproxy.identity.pki import SpiffeId, node_identity
from ztproxy.identity.renewer import Renewer, RenewerSettings, retry_delay

NODE = node_identity("cluster.local", "n1")
WEB = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install(certs_dir: Path, ca: CA, identity: SpiffeId, lifetime: float, age: float) -> None:
    start = now() - datetime.timedelta(seconds=age)
    leaf = ca.issue(str(identity), not_before=start, not_after=start + datetime.timedelta(seconds=lifetime))
    leaf.write(certs_dir / identity.namespace / identity.service_account)


@pytest.fixture()
def pki_dir(tmp_path: Path):
    root = CA.root()
    certs = tmp_path / "certs"
    root.write_bundle(tmp_path / "root-cert.pem")
    return root, certs, tmp_path / "root-cert.pem"


def settings(certs: Path, bundle: Path) -> RenewerSettings:
    return RenewerSettings(certs_dir=str(certs), trust_bundle=str(bundle),
                           ca_addresses=[("127.0.0.1", closed_port())], node_name="n1",
                           request_timeout=1.0, backoff_initial=0.05, backoff_max=0.1)


def test_retry_never_waits_past_an_eighth_of_what_is_left() -> None:
    assert retry_delay(60.0, 80.0) == 10.0
    assert retry_delay(60.0, 2.0) == 0.5  # never below half a second
    assert retry_delay(3.0, 3600.0) == 3.0  # plenty of time: the backoff itself
    assert retry_delay(7.0, -5.0) == 7.0  # expired: nothing to protect, plain backoff


def test_failures_are_quiet_until_a_quarter_of_the_lifetime_is_left(pki_dir, caplog) -> None:
    root, certs, bundle = pki_dir
    # Past half-life (renewal due) but more than a quarter left: failures are INFO.
    install(certs, root, NODE, lifetime=120, age=70)
    install(certs, root, WEB, lifetime=120, age=70)
    renewer = Renewer(settings(certs, bundle))

    async def attempts(identity: SpiffeId, seconds: float) -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(renewer.maintain(identity, stop))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait_for(task, 5)

    with caplog.at_level(logging.INFO, logger="ztproxy.identity.renewer"):
        asyncio.run(attempts(WEB, 1.0))
    failures = [r for r in caplog.records if "failed (attempt" in r.getMessage()]
    assert failures and all(r.levelno == logging.INFO for r in failures)
    status = renewer.status[WEB]
    assert status.last_result == "failure" and status.consecutive_failures == len(failures)
    assert status.failing_since is not None and status.last_error

    # Less than a quarter left: one summary WARNING naming the signers, then every attempt is a WARNING.
    caplog.clear()
    install(certs, root, WEB, lifetime=120, age=100)
    with caplog.at_level(logging.INFO, logger="ztproxy.identity.renewer"):
        asyncio.run(attempts(WEB, 1.0))
    warnings: List[str] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    summary = [m for m in warnings if "has been failing for" in m]
    assert len(summary) == 1, warnings
    assert f"127.0.0.1:{renewer.settings.ca_addresses[0][1]}" in summary[0]
    assert "the current certificate stays in use" in summary[0]
    assert any("failed (attempt" in m for m in warnings)


def test_expired_node_certificate_says_which_run_recovers_it(pki_dir, caplog) -> None:
    root, certs, bundle = pki_dir
    install(certs, root, NODE, lifetime=60, age=120)
    renewer = Renewer(settings(certs, bundle))

    async def one_attempt() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(renewer.maintain(NODE, stop))
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(task, 5)

    with caplog.at_level(logging.INFO, logger="ztproxy.identity.renewer"):
        asyncio.run(one_attempt())
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "has expired" in text and "playbooks/mesh.yml --limit" in text and "node name n1" in text


def test_metrics_report_remaining_lifetime_and_last_renewal_result(pki_dir) -> None:
    root, certs, bundle = pki_dir
    install(certs, root, NODE, lifetime=600, age=100)
    install(certs, root, WEB, lifetime=600, age=550)
    renewer = Renewer(settings(certs, bundle))
    renewer.status_of(WEB).last_result = "failure"
    renewer.status_of(WEB).failures = 3
    renewer.status_of(WEB).consecutive_failures = 3
    renewer.status_of(NODE).last_result = "success"
    renewer.status_of(NODE).renewals = 2
    renewer.status_of(NODE).last_success = 1_700_000_000.0

    registry = CollectorRegistry()
    registry.register(CertificateMetrics(str(certs), lambda: [NODE, WEB], lambda: renewer))
    text = generate_latest(registry).decode()

    def value(sample: str) -> float:
        return float(next(line for line in text.splitlines() if line.startswith(sample + " ")).split()[-1])

    node_left = value(f'istio_agent_cert_expiry_seconds{{resource_name="{NODE}"}}')
    web_left = value(f'istio_agent_cert_expiry_seconds{{resource_name="{WEB}"}}')
    assert 490 < node_left <= 500 and 40 < web_left <= 50
    assert value('istio_agent_num_outgoing_requests_total{request_type="csr"}') == 5
    assert value('istio_agent_num_failed_outgoing_requests_total{request_type="csr"}') == 3
    assert value(f'ztproxy_cert_renewal_last_success{{resource_name="{WEB}"}}') == 0
    assert value(f'ztproxy_cert_renewal_last_success{{resource_name="{NODE}"}}') == 1
    assert value(f'ztproxy_cert_renewal_consecutive_failures{{resource_name="{WEB}"}}') == 3
    assert value(f'ztproxy_cert_renewal_last_success_timestamp_seconds{{resource_name="{NODE}"}}') == 1.7e9


def test_metrics_without_online_renewal_still_show_lifetimes(pki_dir) -> None:
    root, certs, _ = pki_dir
    install(certs, root, WEB, lifetime=3600, age=0)
    registry = CollectorRegistry()
    registry.register(CertificateMetrics(str(certs), lambda: [NODE, WEB]))
    text = generate_latest(registry).decode()
    assert f'istio_agent_cert_expiry_seconds{{resource_name="{WEB}"}}' in text
    # The node identity has no certificate here: no sample rather than a made-up one.
    assert f'istio_agent_cert_expiry_seconds{{resource_name="{NODE}"}}' not in text
    assert 'istio_agent_num_outgoing_requests_total{request_type="csr"} 0.0' in text
