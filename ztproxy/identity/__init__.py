"""ztmesh identities: SPIFFE certificates for the workloads of a node, the mesh CA and its signing service.

* ``pki``: identities, keys, CSRs, certificate checks, CA material (shared with the Ansible modules).
* ``signer``: the signing service (`ztproxy ca serve`), Istio's CreateCertificate over gRPC.
* ``renewer``: ``run_renewer()``, the online renewal loop the data plane runs.
* ``revocation``: ``RevocationList.is_revoked()``, called by the HBONE handshake.
* ``cli``: `ztproxy ca ...` and `ztproxy cert ...`.

See docs/identity.md.
"""

from __future__ import annotations

from .pki import DEFAULT_TRUST_DOMAIN, CertSummary, IdentityError, SpiffeId, node_identity
from .renewer import RenewerSettings, run_renewer
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
