"""Online renewal: keep every identity of this node (and the node identity itself) renewed at half-life.

For each identity a task sleeps until the installed certificate reaches ``renew_fraction`` of its
lifetime, then makes a fresh P-256 key, sends a CSR to the CA (as the node, impersonating the workload
like ztunnel), checks the answer (right identity, key matches, chains to this node's trust bundle) and
writes ``key.pem`` then ``cert-chain.pem`` atomically. The data plane notices the new files and uses
them for new connections; established ones keep their session. Failures are retried with exponential
backoff and full jitter, and the old certificate stays in place (and in use) while it is valid.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

from .client import CaClient
from .pki import (
    CERT_MODE,
    CHAIN_FILE,
    DEFAULT_CERT_TTL,
    DEFAULT_RENEW_FRACTION,
    DEFAULT_TRUST_DOMAIN,
    KEY_FILE,
    KEY_MODE,
    CertSummary,
    IdentityError,
    SpiffeId,
    ca_service_identity,
    certs_pem,
    generate_key,
    identity_dir,
    identity_of,
    key_matches_cert,
    key_pem,
    load_cert_file,
    make_csr,
    node_identity,
    read_identity,
    split_response_chain,
    summarize,
    utcnow,
    verify_chain,
    write_file,
)

log = logging.getLogger("ztproxy.identity.renewer")


@dataclass
class RenewerSettings:
    certs_dir: str
    trust_bundle: str
    ca_addresses: Sequence[Tuple[str, int]]
    node_name: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cert_ttl: int = DEFAULT_CERT_TTL
    renew_fraction: float = DEFAULT_RENEW_FRACTION
    ca_identity: Optional[str] = None  # default: spiffe://<td>/ns/ztmesh-system/sa/ztmesh-ca
    ca_server_name: Optional[str] = None  # verify the CA by DNS name instead (istiod)
    token_path: Optional[str] = None
    request_timeout: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    # How often the set of identities (the mesh state) is looked at again.
    reconcile_interval: float = 5.0
    # Failed attempts are logged at INFO while the certificate in use still has more than this part of
    # its lifetime left, then as WARNING: renewal starts at ``renew_fraction`` (half-life), so by default
    # a warning means renewal has failed for a quarter of the lifetime and a quarter is left.
    warn_remaining_fraction: float = 0.25
    owner: Optional[int] = None
    group: Optional[int] = None

    @property
    def node(self) -> SpiffeId:
        return node_identity(self.trust_domain, self.node_name)


def backoff_delay(
    attempt: int, initial: float, maximum: float, rng: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with full jitter (AWS architecture blog): uniform in [0, min(max, initial*2^n)],
    never below a tenth of ``initial`` so a failing CA is not hammered."""
    ceiling = min(maximum, initial * (2 ** max(0, attempt - 1)))
    return max(initial / 10, ceiling * rng())


def retry_delay(backoff: float, remaining: float) -> float:
    """The backoff, but never so long that the certificate in use expires before the next attempt: at
    most an eighth of what is left (and at least 0.5 s), so short lifetimes get several tries."""
    if remaining <= 0:
        return backoff
    return min(backoff, max(0.5, remaining / 8))


@dataclass
class RenewalStatus:
    """What the proxy reports about the renewal of one identity (metrics, admin endpoint)."""

    renewals: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_result: Optional[str] = None  # "success" or "failure"; None before the first attempt
    last_attempt: Optional[float] = None  # wall-clock seconds
    last_success: Optional[float] = None
    failing_since: Optional[float] = None
    last_error: Optional[str] = None
    warned: bool = False

    def as_dict(self) -> Dict[str, object]:
        return {
            "renewals": self.renewals,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "last_result": self.last_result,
            "last_attempt": self.last_attempt,
            "last_success": self.last_success,
            "failing_since": self.failing_since,
            "last_error": self.last_error,
        }


@dataclass
class Renewer:
    settings: RenewerSettings
    on_renewed: Optional[Callable[[SpiffeId, CertSummary], None]] = None
    status: Dict[SpiffeId, RenewalStatus] = field(default_factory=dict)

    @property
    def renewals(self) -> Dict[SpiffeId, int]:
        return {identity: st.renewals for identity, st in self.status.items() if st.renewals}

    @property
    def failures(self) -> Dict[SpiffeId, int]:
        return {identity: st.failures for identity, st in self.status.items() if st.failures}

    def status_of(self, identity: SpiffeId) -> RenewalStatus:
        return self.status.setdefault(identity, RenewalStatus())

    def _record_success(self, identity: SpiffeId, summary: CertSummary) -> None:
        status = self.status_of(identity)
        now = time.time()
        if status.consecutive_failures:
            log.info("renewal of %s works again after %d failed attempts over %.0f s", identity,
                     status.consecutive_failures, now - (status.failing_since or now))
        status.renewals += 1
        status.consecutive_failures = 0
        status.last_result = "success"
        status.last_attempt = status.last_success = now
        status.failing_since = None
        status.last_error = None
        status.warned = False

    def _record_failure(self, identity: SpiffeId, exc: BaseException) -> RenewalStatus:
        status = self.status_of(identity)
        now = time.time()
        status.failures += 1
        status.consecutive_failures += 1
        status.last_result = "failure"
        status.last_attempt = now
        if status.failing_since is None:
            status.failing_since = now
        status.last_error = str(exc)
        return status

    def client(self) -> CaClient:
        node_dir = identity_dir(self.settings.certs_dir, self.settings.node)
        return CaClient(
            addresses=self.settings.ca_addresses,
            trust_bundle=self.settings.trust_bundle,
            client_chain=os.path.join(node_dir, CHAIN_FILE),
            client_key=os.path.join(node_dir, KEY_FILE),
            ca_identity=self.settings.ca_identity or str(ca_service_identity(self.settings.trust_domain)),
            server_hostname=self.settings.ca_server_name,
            token_path=self.settings.token_path,
            timeout=self.settings.request_timeout,
        )

    def due_in(self, identity: SpiffeId) -> float:
        """Seconds until ``identity`` must be renewed (0 when missing, broken or past its renewal time)."""
        installed = read_identity(self.settings.certs_dir, identity)
        if installed is None:
            return 0.0
        key, leaf, _chain = installed
        if identity_of(leaf) != identity or not key_matches_cert(key, leaf):
            return 0.0
        summary = summarize(leaf)
        return max(0.0, (summary.renew_at(self.settings.renew_fraction) - utcnow()).total_seconds())

    def _check_node_credential(self) -> None:
        node = read_identity(self.settings.certs_dir, self.settings.node)
        where = identity_dir(self.settings.certs_dir, self.settings.node)
        if node is None:
            raise IdentityError(
                f"no node certificate in {where}: enroll this node with Ansible "
                "(ztmesh_cert for the node identity) before online renewal can work"
            )
        if summarize(node[1]).remaining() <= 0:
            raise IdentityError(
                f"the node certificate in {where} has expired, so the signing services refuse this "
                f"node and it cannot renew anything by itself: re-enroll it with Ansible, "
                f"`ansible-playbook -i INVENTORY playbooks/mesh.yml --limit <this node's inventory host>` "
                f"(node name {self.settings.node_name})"
            )

    async def renew(self, identity: SpiffeId) -> CertSummary:
        self._check_node_credential()
        key = generate_key()
        impersonate = None if identity == self.settings.node else str(identity)
        chain = await self.client().create_certificate(
            make_csr(key, identity), self.settings.cert_ttl, impersonate
        )
        leaf, intermediates = split_response_chain(chain)
        if identity_of(leaf) != identity:
            raise IdentityError(
                f"the CA returned a certificate for {identity_of(leaf)} instead of {identity}"
            )
        if not key_matches_cert(key, leaf):
            raise IdentityError("the CA returned a certificate for another key")
        roots = load_cert_file(self.settings.trust_bundle)
        try:
            verify_chain(leaf, intermediates, roots)
        except IdentityError as exc:
            # Installing it would make every peer refuse this node: keep the old one and say what to do.
            raise IdentityError(
                f"the new certificate for {identity} does not chain to {self.settings.trust_bundle} "
                f"({exc}); if the CA is being rolled, add its new root to the trust bundles first "
                "(playbooks/ca-rotate.yml phase 1)"
            ) from exc
        directory = identity_dir(self.settings.certs_dir, identity)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        # Key first, then chain: the data plane only switches when both files match each other.
        write_file(
            os.path.join(directory, KEY_FILE),
            key_pem(key),
            KEY_MODE,
            self.settings.owner,
            self.settings.group,
        )
        write_file(
            os.path.join(directory, CHAIN_FILE),
            certs_pem([leaf] + intermediates),
            CERT_MODE,
            self.settings.owner,
            self.settings.group,
        )
        summary = summarize(leaf)
        self._record_success(identity, summary)
        log.info(
            "renewed %s: serial %s, valid until %s", identity, summary.serial, summary.not_after.isoformat()
        )
        if self.on_renewed is not None:
            self.on_renewed(identity, summary)
        return summary

    async def maintain(self, identity: SpiffeId, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            wait = self.due_in(identity) if attempt == 0 else 0.0
            if wait > 0:
                if await _sleep_or_stop(stop, wait):
                    return
                continue
            try:
                await self.renew(identity)
                attempt = 0
                # A CA that hands out certificates already due (its own certificate about to expire) must
                # not turn this into a busy loop.
                if await _sleep_or_stop(stop, max(0.2, self.settings.backoff_initial / 10)):
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure is retried; the message says what went wrong
                attempt += 1
                status = self._record_failure(identity, exc)
                installed = read_identity(self.settings.certs_dir, identity)
                summary = summarize(installed[1]) if installed else None
                left = summary.remaining() if summary else 0.0
                delay = retry_delay(
                    backoff_delay(attempt, self.settings.backoff_initial, self.settings.backoff_max), left
                )
                if left > 0:
                    state = f"the current certificate stays in use ({int(left)} s left)"
                else:
                    state = "no valid certificate is installed"
                # Quiet while there is plenty of time (a signer restart, a short outage), loud once the
                # certificate in use is running out: that is when an operator must act.
                warn_below = summary.lifetime * self.settings.warn_remaining_fraction if summary else 0.0
                running_out = summary is None or left <= warn_below
                if running_out and not status.warned:
                    status.warned = True
                    log.warning(
                        "certificate renewal of %s has been failing for %.0f s (%d attempts, signing "
                        "services %s); %s; last error: %s",
                        identity,
                        time.time() - (status.failing_since or time.time()),
                        status.consecutive_failures,
                        ", ".join(f"{h}:{p}" for h, p in self.settings.ca_addresses),
                        state,
                        exc,
                    )
                log.log(
                    logging.WARNING if running_out else logging.INFO,
                    "renewing %s failed (attempt %d): %s; %s; retrying in %.1f s",
                    identity,
                    attempt,
                    exc,
                    state,
                    delay,
                )
                if await _sleep_or_stop(stop, delay):
                    return


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep; True when ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
        return True
    except asyncio.TimeoutError:
        return False


async def run_renewer(
    settings: RenewerSettings,
    identities: Callable[[], Iterable[SpiffeId]],
    stop: Optional[asyncio.Event] = None,
    on_renewed: Optional[Callable[[SpiffeId, CertSummary], None]] = None,
    renewer: Optional[Renewer] = None,
) -> Renewer:
    """Keep the node identity and every identity ``identities()`` returns renewed until ``stop`` is set.

    ``identities`` is called every ``settings.reconcile_interval`` seconds (the data plane passes the
    identities of this node's workloads from the mesh state); identities that disappear stop being
    renewed (their files are left for the data plane to drop). Pass ``renewer`` to read its status while
    it runs (metrics, admin endpoint). Returns the Renewer (counters) on stop.
    """
    stop = stop or asyncio.Event()
    renewer = renewer or Renewer(settings, on_renewed)
    tasks: Dict[SpiffeId, asyncio.Task] = {}
    try:
        while not stop.is_set():
            try:
                wanted = {settings.node} | set(identities())
            except Exception:  # a broken identity source must not stop the renewals already running
                log.exception("cannot list this node's identities; keeping the current set")
                wanted = set(tasks) | {settings.node}
            for identity in wanted - set(tasks):
                tasks[identity] = asyncio.ensure_future(renewer.maintain(identity, stop))
            for identity in set(tasks) - wanted:
                tasks.pop(identity).cancel()
            for identity, task in list(tasks.items()):
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.error("renewal task for %s crashed: %s; restarting it", identity, task.exception())
                    tasks[identity] = asyncio.ensure_future(renewer.maintain(identity, stop))
            if await _sleep_or_stop(stop, settings.reconcile_interval):
                break
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return renewer
