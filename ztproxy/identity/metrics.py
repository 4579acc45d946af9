"""Certificate lifetimes and renewal results as Prometheus metrics, read at scrape time.

Names follow Istio's node agent (pilot-agent), whose role ztproxy's renewer plays:

* ``istio_agent_cert_expiry_seconds{resource_name}``: seconds until the certificate held for the
  identity ``resource_name`` expires (negative once expired), for the node identity and every identity
  the mesh state places on this node. Read from the files, so it is right whoever renewed them
  (the renewer or an Ansible run).
* ``istio_agent_num_outgoing_requests_total{request_type="csr"}`` and
  ``istio_agent_num_failed_outgoing_requests_total{request_type="csr"}``: renewal requests sent to the
  signing services, and those that failed.
* ``ztproxy_cert_renewal_last_success{resource_name}``: 1 when the last renewal attempt of that identity
  succeeded, 0 when it failed (absent before the first attempt).
* ``ztproxy_cert_renewal_consecutive_failures{resource_name}`` and
  ``ztproxy_cert_renewal_last_success_timestamp_seconds{resource_name}``.

An alert on ``istio_agent_cert_expiry_seconds < <a quarter of the lifetime>`` catches every way renewal
can stop (signers down, node revoked, renewer not configured), which the renewal counters alone cannot.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .pki import SpiffeId, read_identity, summarize
from .renewer import Renewer

IdentitiesProvider = Callable[[], Iterable[SpiffeId]]


class CertificateMetrics:
    """A collector (``registry.register(CertificateMetrics(...))``) over the identities a proxy holds."""

    def __init__(
        self,
        certs_dir: str,
        identities: IdentitiesProvider,
        renewer: Optional[Callable[[], Optional[Renewer]]] = None,
    ) -> None:
        self.certs_dir = certs_dir
        self.identities = identities
        self.renewer = renewer or (lambda: None)

    def describe(self) -> Iterator[Metric]:
        # Families only: describing must not read certificate files at registration.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "istio_agent_cert_expiry_seconds",
            "The time remaining, in seconds, before the certificate chain will expire",
            labels=["resource_name"],
        )
        for identity in sorted(set(self.identities()), key=str):
            installed = read_identity(self.certs_dir, identity)
            if installed is not None:
                expiry.add_metric([str(identity)], summarize(installed[1]).remaining())
        yield expiry

        renewer = self.renewer()
        requests = CounterMetricFamily(
            "istio_agent_num_outgoing_requests",
            "Number of certificate signing requests sent to the signing services",
            labels=["request_type"],
        )
        failed = CounterMetricFamily(
            "istio_agent_num_failed_outgoing_requests",
            "Number of certificate signing requests that failed",
            labels=["request_type"],
        )
        last = GaugeMetricFamily(
            "ztproxy_cert_renewal_last_success",
            "1 when the last renewal attempt of the identity succeeded, 0 when it failed",
            labels=["resource_name"],
        )
        streak = GaugeMetricFamily(
            "ztproxy_cert_renewal_consecutive_failures",
            "Renewal attempts of the identity that failed in a row",
            labels=["resource_name"],
        )
        when = GaugeMetricFamily(
            "ztproxy_cert_renewal_last_success_timestamp_seconds",
            "Unix time of the last successful renewal of the identity",
            labels=["resource_name"],
        )
        statuses = dict(renewer.status) if renewer is not None else {}
        total = sum(s.renewals + s.failures for s in statuses.values())
        failures = sum(s.failures for s in statuses.values())
        requests.add_metric(["csr"], total)
        failed.add_metric(["csr"], failures)
        for identity in sorted(statuses, key=str):
            status = statuses[identity]
            if status.last_result is not None:
                last.add_metric([str(identity)], 1.0 if status.last_result == "success" else 0.0)
            streak.add_metric([str(identity)], status.consecutive_failures)
            if status.last_success is not None:
                when.add_metric([str(identity)], status.last_success)
        yield requests
        yield failed
        yield last
        yield streak
        yield when
