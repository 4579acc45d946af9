"""ztmesh identities: SPIFFE certificates for the workloads of a node, the mesh CA and its signing service.

* ``pki``: identities, keys, CSRs, certificate checks, CA material (shared with the Ansible modules).
* ``signer``: the signing service (`ztproxy ca serve`), Istio's CreateCertificate over gRPC.
* ``renewer``: ``run_renewer()``, the online renewal loop the data plane runs.
* ``revocation``: ``RevocationList.is_revoked()``, called by the HBONE handshake.
* ``cli``: `ztproxy ca ...` and `ztproxy cert ...`.

See docs/identity.md. ``run_renewer`` and ``RenewerSettings`` are imported on first use so that the
data plane can use ``pki`` and ``revocation`` without loading the gRPC stack (protobuf).
"""

from __future__ import annotations

from typing import Any

from .pki import DEFAULT_TRUST_DOMAIN, CertSummary, IdentityError, SpiffeId, node_identity
from .revocation import RevocationList

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "CertSummary",
    "IdentityError",
    "RenewerSettings",
    "RevocationList",
    "SpiffeId",
    "node_identity",
    "run_renewer",
]


def __getattr__(name: str) -> Any:
    if name in ("run_renewer", "RenewerSettings"):
        from . import renewer

        return getattr(renewer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
