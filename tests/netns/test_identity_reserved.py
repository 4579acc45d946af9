"""Reserved identities (issue 13, defect 7), against a running `ztproxy ca serve`.

The attack: a mesh state places, on node1, workloads in namespace ztmesh-system whose service accounts
are another node's node identity (node-node2) and the signing service's (ztmesh-ca). node1, holding
only its own node certificate, asks the signer for them by impersonation. Before the fix both were
issued (node1 could then renew node2's identity and with it obtain node2's workload identities, or
serve as the CA); now both are refused with PERMISSION_DENIED, and node1 still renews its own."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_identity_signer_service import MESH, NODE1, TD, Mesh, Signer  # noqa: E402

from ztproxy.identity import pki  # noqa: E402
from ztproxy.identity.client import CaUnavailable  # noqa: E402

NODE2 = pki.node_identity(TD, "node2")
CA_SERVICE = pki.ca_service_identity(TD)
HOSTILE = MESH + """  - {name: evil-node, namespace: ztmesh-system, serviceAccount: node-node2, node: node1,
     workloadIps: [10.0.0.9]}
  - {name: evil-ca, namespace: ztmesh-system, serviceAccount: ztmesh-ca, node: node1,
     workloadIps: [10.0.0.10]}
"""


@pytest.mark.timeout(60)
def test_a_node_cannot_obtain_reserved_identities_even_if_the_mesh_state_places_them(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path)
    mesh.mesh_state.write_text(HOSTILE)
    signer = Signer(mesh)
    try:
        def request(identity: pki.SpiffeId | None) -> list:
            csr = pki.make_csr(pki.generate_key(), identity or NODE1)
            return asyncio.run(mesh.client(signer.port).create_certificate(
                csr, 60, str(identity) if identity else None))

        for wanted in (NODE2, CA_SERVICE):
            with pytest.raises(CaUnavailable, match="reserved namespace ztmesh-system.*status 7"):
                request(wanted)
        assert signer.issued() == 0
        # The node's own node identity, with or without naming it, is still renewed.
        for wanted in (None, NODE1):
            chain = request(wanted)
            assert pki.identity_of(pki.load_certs(chain[0])[0]) == NODE1
        assert signer.issued() == 2
    finally:
        signer.stop()
