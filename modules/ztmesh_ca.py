#!/usr/bin/python
"""Ansible module ztmesh_ca: the mesh CA on the controller (create or check it, sign CSRs, trust bundle)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ztmesh_ca
short_description: Create or validate the ztmesh CA, sign workload CSRs and build the trust bundle
description:
  - Run on the Ansible controller (C(delegate_to=localhost), C(run_once)) where the CA material lives.
  - The CA directory is in Istio's plug-in layout (C(ca-cert.pem), C(ca-key.pem), C(root-cert.pem),
    C(cert-chain.pem)). With O(create=true) and no CA there, the module creates a root CA and a signing
    intermediate (keys 0600, directory 0700; the root key is kept as C(root-key.pem)). With
    O(create=false) the directory must hold an existing CA, for example the C(cacerts) of an Istio mesh,
    so that VMs get certificates its ztunnel and Envoy accept.
  - The CA is validated on every run; a key that does not belong to its certificate, a certificate that is
    not a CA, an expired CA or a chain that does not lead to C(root-cert.pem) fails the task with the reason.
  - O(sign) signs CSRs made on the nodes by C(ztmesh_cert). Signing changes nothing on the controller, so
    it does not report a change; the nodes report theirs when they install the certificates.
version_added: "0.1.0"
author:
  - ztmesh contributors (@ztmesh)
requirements:
  - cryptography >= 3.4 on the controller
attributes:
  check_mode:
    description: Can run in check mode and return the changed status it predicts without changing the target.
    support: full
    details: Reports whether the CA would be created or certificates signed, and writes nothing.
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when in diff mode.
    support: none
  platform:
    description: Target operating systems the module works on.
    support: full
    platforms: posix
options:
  ca_dir:
    description: Directory of the CA material.
    type: path
    required: true
  create:
    description: Create a new root and intermediate when O(ca_dir) holds no CA.
    type: bool
    default: true
  organization:
    description: Organization name of a created CA.
    type: str
    default: ztmesh
  root_days:
    description: Lifetime of a created root, in days.
    type: int
    default: 3650
  intermediate_days:
    description: Lifetime of a created intermediate, in days.
    type: int
    default: 365
  trust_domain:
    description: Trust domain every signed identity must belong to.
    type: str
    default: cluster.local
  sign:
    description: CSRs to sign; entries without a CSR are skipped.
    type: list
    elements: dict
    default: []
    suboptions:
      identity:
        description: SPIFFE ID to sign (C(spiffe://<td>/ns/<ns>/sa/<sa>)).
        type: str
        required: true
      csr:
        description: PEM CSR from C(ztmesh_cert).
        type: str
  cert_ttl:
    description: Lifetime of signed certificates, in seconds (capped by the CA's own expiry).
    type: int
    default: 86400
  extra_roots:
    description:
      - PEM files whose roots are added to RV(trust_bundle), for example the other CA's C(root-cert.pem)
        while the CA is rolled (both roots trusted at once).
    type: list
    elements: path
    default: []
"""

EXAMPLES = r"""
- name: Make sure the mesh CA exists
  ztmesh_ca:
    ca_dir: /etc/ztmesh/ca
  delegate_to: localhost
  run_once: true
  register: mesh_ca

- name: Use the CA of an existing Istio mesh instead (kubectl get secret cacerts -n istio-system)
  ztmesh_ca:
    ca_dir: /etc/ztmesh/istio-cacerts
    create: false
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
ca:
  description: Summary of the signing CA (subject, serial, expiry, root).
  returned: success
  type: dict
created:
  description: Whether the CA was created by this run.
  returned: success
  type: bool
signing_cert:
  description: PEM of the signing CA certificate (for ztmesh_cert's expected_issuer).
  returned: success
  type: str
trust_bundle:
  description: PEM of every root to trust (root-cert.pem plus O(extra_roots)), without duplicates.
  returned: success
  type: str
certificates:
  description: One entry per signed CSR, with identity, cert_chain (PEM, leaf first), serial and not_after.
  returned: success
  type: list
  elements: dict
"""

import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_identity import (
        CaError,
        IdentityError,
        SpiffeId,
        ca_exists,
        cert_pem,
        certs_pem,
        check_trust_domain,
        create_ca,
        is_self_signed,
        load_ca,
        load_cert_file,
        not_after,
        serial_hex,
        sign_csr,
    )
except ImportError:  # cryptography is missing on this host: main() says so
    IDENTITY_IMPORT_ERROR = traceback.format_exc()
else:
    IDENTITY_IMPORT_ERROR = None


def trust_bundle(ca, extra_paths):
    roots, seen = [], set()
    for cert in list(ca.roots) + [c for path in extra_paths for c in load_cert_file(path)]:
        pem = cert_pem(cert)
        if pem not in seen and is_self_signed(cert):
            seen.add(pem)
            roots.append(cert)
    return certs_pem(roots)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            ca_dir=dict(type="path", required=True),
            create=dict(type="bool", default=True),
            organization=dict(type="str", default="ztmesh"),
            root_days=dict(type="int", default=3650),
            intermediate_days=dict(type="int", default=365),
            trust_domain=dict(type="str", default="cluster.local"),
            sign=dict(
                type="list",
                elements="dict",
                default=[],
                options=dict(identity=dict(type="str", required=True), csr=dict(type="str")),
            ),
            cert_ttl=dict(type="int", default=86400),
            extra_roots=dict(type="list", elements="path", default=[]),
        ),
        supports_check_mode=True,
    )
    if IDENTITY_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("cryptography"), exception=IDENTITY_IMPORT_ERROR)
    params = module.params
    ca_dir = params["ca_dir"]
    result = {"changed": False, "created": False, "certificates": []}
    try:
        check_trust_domain(params["trust_domain"])
        if params["cert_ttl"] < 60:
            raise IdentityError(
                "cert_ttl below 60 seconds cannot be renewed in time: give seconds, e.g. 86400"
            )
        if not ca_exists(ca_dir):
            if not params["create"]:
                raise CaError(
                    f"{ca_dir} holds no CA and create=false: put the CA there in Istio's plug-in "
                    "layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem)"
                )
            result.update(changed=True, created=True)
            if module.check_mode:
                module.exit_json(msg=f"would create a CA in {ca_dir}", **result)
            create_ca(ca_dir, params["organization"], params["root_days"], params["intermediate_days"])
        ca = load_ca(ca_dir)
        result.update(
            ca=ca.summary(),
            signing_cert=cert_pem(ca.signing_cert),
            trust_bundle=trust_bundle(ca, params["extra_roots"]),
        )
        for entry in params["sign"]:
            if not entry.get("csr"):
                continue
            identity = SpiffeId.parse(entry["identity"])
            if identity.trust_domain != params["trust_domain"]:
                raise IdentityError(f"{identity} is not in trust domain {params['trust_domain']}")
            leaf = sign_csr(ca, entry["csr"], identity, params["cert_ttl"])
            chain = [leaf] + [c for c in ca.chain if not is_self_signed(c)]
            result["certificates"].append(
                {
                    "identity": str(identity),
                    "cert_chain": certs_pem(chain),
                    "serial": serial_hex(leaf),
                    "not_after": not_after(leaf).isoformat(),
                }
            )
    except IdentityError as exc:
        module.fail_json(msg=str(exc), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
