#!/usr/bin/python
"""Ansible module ztmesh_cert: one workload identity's key, certificate and the trust bundle on a node."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ztmesh_cert
short_description: Enroll a ztmesh workload identity on a node (key on the node, CSR out, certificate in)
description:
  - Manages C(<certs_dir>/<namespace>/<service-account>/key.pem) and C(cert-chain.pem), the files ztproxy
    loads for one SPIFFE identity, and the trust bundle file.
  - The private key (ECDSA P-256) is generated on the node and never leaves it; the module returns only a
    CSR. Enrollment is two calls around a signing step on the controller (C(ztmesh_ca) with
    C(delegate_to=localhost), or C(ztproxy ca sign)).
  - O(state=csr) decides whether a certificate is needed (missing, for another identity, not matching the
    key, expired, less than O(renew_threshold) of its lifetime left, not issued by O(expected_issuer), or
    O(force)). When one is needed it creates a pending key (C(key.pem.pending), mode 0600) if none exists
    yet and returns its CSR; otherwise nothing changes.
  - O(state=present) installs O(cert_chain) (leaf first) after checking that it names the identity, that
    it matches the pending or current key, and that it chains to the trust bundle; then the pending key
    becomes C(key.pem). With O(trust_bundle_content) it also writes the trust bundle (roots only; several
    roots during a CA roll). Without an identity it only manages the trust bundle.
  - Files are written atomically (temporary file, fsync, rename) so a running ztproxy never reads half a
    file. Keys are 0600, certificates 0644, owned by O(owner)/O(group).
version_added: "0.1.0"
author:
  - ztmesh contributors (@ztmesh)
requirements:
  - cryptography >= 3.4 on the managed node
attributes:
  check_mode:
    description: Can run in check mode and return the changed status it predicts without changing the target.
    support: full
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when in diff mode.
    support: full
    details: Shows which of the identity's files (key, certificate, trust bundle) change.
  platform:
    description: Target operating systems the module works on.
    support: full
    platforms: posix
options:
  identity:
    description:
      - Full SPIFFE ID C(spiffe://<td>/ns/<ns>/sa/<sa>).
      - Alternative to O(namespace)+O(service_account) or O(node_name).
    type: str
  namespace:
    description: Namespace of the identity (with O(service_account)).
    type: str
  service_account:
    description: Service account of the identity (with O(namespace)).
    type: str
  node_name:
    description:
      - Manage the node identity C(spiffe://<td>/ns/ztmesh-system/sa/node-<node_name>), which
        authenticates online renewals.
    type: str
  trust_domain:
    description: Trust domain for O(namespace)/O(service_account) and O(node_name).
    type: str
    default: cluster.local
  state:
    description:
      - C(csr) reports whether a certificate is needed and returns a CSR.
      - C(present) installs O(cert_chain) and/or O(trust_bundle_content).
      - C(absent) removes the identity's files.
    type: str
    choices: [csr, present, absent]
    default: present
  certs_dir:
    description: Directory of the per-identity subdirectories.
    type: path
    default: /var/lib/ztproxy/certs
  trust_bundle:
    description: Path of the trust bundle file (PEM roots). Default C(<certs_dir>/root-cert.pem).
    type: path
  cert_chain:
    description: PEM certificate chain from the CA, leaf first (O(state=present)).
    type: str
  trust_bundle_content:
    description: PEM roots to write to O(trust_bundle) (O(state=present)). Omit to leave the file alone.
    type: str
  expected_issuer:
    description:
      - PEM of the CA certificate that must have issued the current certificate (CA roll); a
        certificate from another issuer needs replacing.
    type: str
  renew_threshold:
    description:
      - With O(state=csr), a certificate with less than this fraction of its lifetime left is replaced.
    type: float
    default: 0.25
  force:
    description: With O(state=csr), always ask for a new certificate (and key).
    type: bool
    default: false
  owner:
    description:
      - Owner of the files and directories (the ztproxy user). Default is the user running the module.
    type: str
  group:
    description: Group of the files and directories.
    type: str
notes:
  - Check mode generates no key, so O(state=csr) returns C(csr=null) with C(changed=true) when a
    certificate is needed.
  - No secret ever passes through Ansible; the key stays on the node and the CA key on the controller.
"""

EXAMPLES = r"""
- name: Ask for a certificate when one is needed
  ztmesh_cert:
    namespace: shop
    service_account: cart
    state: csr
  register: cart_csr

- name: Sign it on the controller
  ztmesh_ca:
    ca_dir: /etc/ztmesh/ca
    sign:
      - identity: "{{ cart_csr.identity }}"
        csr: "{{ cart_csr.csr }}"
  delegate_to: localhost
  register: signed
  when: cart_csr.csr

- name: Install certificate and trust bundle
  ztmesh_cert:
    namespace: shop
    service_account: cart
    cert_chain: "{{ signed.certificates[0].cert_chain if cart_csr.csr else omit }}"
    trust_bundle_content: "{{ signed.trust_bundle | default(omit) }}"
    owner: ztproxy
    group: ztproxy
"""

RETURN = r"""
identity:
  description: The SPIFFE ID handled.
  returned: when an identity was given
  type: str
needs_certificate:
  description: Whether a new certificate must be signed (O(state=csr)).
  returned: state is csr
  type: bool
reason:
  description: Why a certificate is (or is not) needed.
  returned: state is csr
  type: str
csr:
  description: PEM CSR of the pending key, null when no certificate is needed or in check mode.
  returned: state is csr
  type: str
certificate:
  description:
    - The installed certificate (identity, serial, issuer, not_before, not_after, lifetime_seconds,
      remaining_seconds), or null.
  returned: always
  type: dict
trust_roots:
  description: Serial and subject of each root in the trust bundle after the run.
  returned: state is present
  type: list
"""

import grp
import os
import pwd
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_identity import (
        CERT_MODE,
        CHAIN_FILE,
        KEY_FILE,
        KEY_MODE,
        IdentityError,
        SpiffeId,
        cert_pem,
        certs_pem,
        generate_key,
        identity_dir,
        identity_of,
        is_ca,
        is_self_signed,
        key_matches_cert,
        key_pem,
        load_cert_file,
        load_certs,
        load_key,
        load_key_file,
        make_csr,
        node_identity,
        serial_hex,
        signed_by,
        summarize,
        verify_chain,
        write_file,
    )
except ImportError:  # cryptography is missing on this host: main() says so
    IDENTITY_IMPORT_ERROR = traceback.format_exc()
else:
    IDENTITY_IMPORT_ERROR = None

PENDING_KEY = "key.pem.pending"  # next to key.pem until its certificate is installed


def _identity(params) -> SpiffeId | None:
    if params["identity"]:
        return SpiffeId.parse(params["identity"])
    if params["node_name"]:
        return node_identity(params["trust_domain"], params["node_name"])
    if params["namespace"] or params["service_account"]:
        if not (params["namespace"] and params["service_account"]):
            raise IdentityError(
                "namespace and service_account go together: give both, or identity, or node_name"
            )
        return SpiffeId.of(params["trust_domain"], params["namespace"], params["service_account"])
    return None


def _ids(params):
    uid = gid = None
    try:
        if params["owner"]:
            uid = pwd.getpwnam(params["owner"]).pw_uid
        if params["group"]:
            gid = grp.getgrnam(params["group"]).gr_gid
    except KeyError as exc:
        raise IdentityError(
            f"unknown user or group {exc}: create the ztproxy user first (or fix owner/group)"
        ) from exc
    return uid, gid


def _read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


class CertFiles:
    """The files of one identity, and the changes made to them (for `changed` and diff)."""

    def __init__(self, module, certs_dir, identity, uid, gid):
        self.module = module
        self.dir = identity_dir(certs_dir, identity)
        self.identity = identity
        self.uid, self.gid = uid, gid
        self.changed = False

    def path(self, name):
        return os.path.join(self.dir, name)

    def current(self):
        """(key, [certs]) installed, or (None, None)."""
        try:
            certs = load_cert_file(self.path(CHAIN_FILE))
            key = load_key_file(self.path(KEY_FILE))
        except IdentityError:
            return None, None
        return key, certs

    def ensure_dir(self):
        for directory in (os.path.dirname(self.dir), self.dir):
            if not os.path.isdir(directory):
                self.changed = True
                if not self.module.check_mode:
                    os.makedirs(directory, mode=0o755, exist_ok=True)
            if not self.module.check_mode:
                self.fix_attrs(directory, 0o755)

    def fix_attrs(self, path, mode):
        st = os.stat(path)
        if (st.st_mode & 0o7777) != mode:
            self.changed = True
            if not self.module.check_mode:
                os.chmod(path, mode)
        want_uid = st.st_uid if self.uid is None else self.uid
        want_gid = st.st_gid if self.gid is None else self.gid
        if (st.st_uid, st.st_gid) != (want_uid, want_gid):
            self.changed = True
            if not self.module.check_mode:
                os.chown(path, want_uid, want_gid)

    def write(self, path, content: bytes, mode):
        if _read(path) == content:
            self.fix_attrs(path, mode)
            return
        self.changed = True
        if not self.module.check_mode:
            write_file(path, content, mode, self.uid, self.gid)


def needs_certificate(key, certs, identity, params):
    """(needed, reason)."""
    if certs is None:
        return True, "no certificate installed"
    leaf = certs[0]
    if identity_of(leaf) != identity:
        return True, f"installed certificate is for {identity_of(leaf)}"
    if not key_matches_cert(key, leaf):
        return True, "installed certificate does not match key.pem"
    summary = summarize(leaf)
    if summary.remaining() <= 0:
        return True, "installed certificate has expired"
    if summary.remaining() < summary.lifetime * params["renew_threshold"]:
        left, total = int(summary.remaining()), int(summary.lifetime)
        return True, f"installed certificate has {left} s of {total} s left"
    if params["expected_issuer"]:
        issuer = load_certs(params["expected_issuer"], "expected_issuer")[0]
        if not signed_by(leaf, issuer):
            return True, f"installed certificate was not issued by {issuer.subject.rfc4514_string()}"
    if params["force"]:
        return True, "force is set"
    return False, f"installed certificate is valid for {int(summary.remaining())} s more"


def do_csr(module, files, result):
    key, certs = files.current()
    needed, reason = needs_certificate(key, certs, files.identity, module.params)
    result.update(needs_certificate=needed, reason=reason, csr=None)
    if not needed:
        return
    if module.check_mode:
        files.changed = True  # a key would be generated
        return
    files.ensure_dir()
    pending_path = files.path(PENDING_KEY)
    pending_key = None
    raw = _read(pending_path)
    # A pending key from an earlier run is reused (same CSR, nothing changes), unless force asks for
    # a new one.
    if raw is not None and not module.params["force"]:
        try:
            pending_key = load_key(raw, pending_path)
        except IdentityError:
            pending_key = None  # unreadable leftover: replaced below
    if pending_key is None:
        pending_key = generate_key()
        files.write(pending_path, key_pem(pending_key).encode(), KEY_MODE)
    else:
        files.fix_attrs(pending_path, KEY_MODE)
    result["csr"] = make_csr(pending_key, files.identity)


def do_present(module, files, bundle_roots, result):
    chain_pem = module.params["cert_chain"]
    if chain_pem:
        certs = load_certs(chain_pem, "cert_chain")
        leaf = certs[0]
        intermediates = [c for c in certs[1:] if not is_self_signed(c)]
        if identity_of(leaf) != files.identity:
            raise IdentityError(f"cert_chain is for {identity_of(leaf)}, not {files.identity}")
        pending = _read(files.path(PENDING_KEY))
        current = _read(files.path(KEY_FILE))
        key_bytes = None
        for candidate in (pending, current):
            if candidate is not None:
                try:
                    if key_matches_cert(load_key(candidate), leaf):
                        key_bytes = candidate
                        break
                except IdentityError:
                    continue
        if key_bytes is None:
            raise IdentityError(
                f"cert_chain for {files.identity} does not match the key generated on "
                "this node: sign the CSR returned by state=csr of this same run"
            )
        if bundle_roots is None:
            raise IdentityError(
                f"no trust bundle to check cert_chain against: give trust_bundle_content or "
                f"install {module.params['trust_bundle']} first"
            )
        verify_chain(leaf, intermediates, bundle_roots)
        files.ensure_dir()
        # Key first, then chain: ztproxy switches only when the pair matches. (In check mode the writes
        # only record that they would change something.)
        files.write(files.path(KEY_FILE), key_bytes, KEY_MODE)
        files.write(files.path(CHAIN_FILE), certs_pem([leaf] + intermediates).encode(), CERT_MODE)
        if pending is not None:
            files.changed = True
            if not module.check_mode:
                os.unlink(files.path(PENDING_KEY))
    else:
        key, certs = files.current()
        if certs is None:
            raise IdentityError(
                f"no certificate installed for {files.identity} and no cert_chain given: "
                "run state=csr, sign the CSR, then state=present with cert_chain"
            )
        if not module.check_mode:
            files.fix_attrs(files.path(KEY_FILE), KEY_MODE)
            files.fix_attrs(files.path(CHAIN_FILE), CERT_MODE)


def do_absent(module, files):
    for name in (CHAIN_FILE, KEY_FILE, PENDING_KEY):
        if os.path.exists(files.path(name)):
            files.changed = True
            if not module.check_mode:
                os.unlink(files.path(name))
    if os.path.isdir(files.dir) and not os.listdir(files.dir):
        files.changed = True
        if not module.check_mode:
            os.rmdir(files.dir)


def install_bundle(module, path, content, uid, gid):
    """Write the trust bundle (roots only); returns (roots, changed)."""
    roots = load_certs(content, "trust_bundle_content")
    for root in roots:
        if not (is_self_signed(root) and is_ca(root)):
            raise IdentityError(
                f"trust_bundle_content holds {root.subject.rfc4514_string()}, which is not a "
                "self-signed CA certificate: the bundle holds roots only"
            )
    wanted = "".join(cert_pem(r) for r in roots).encode()
    changed = False
    if _read(path) != wanted:
        changed = True
        if not module.check_mode:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            write_file(path, wanted, CERT_MODE, uid, gid)
    elif not module.check_mode:
        st = os.stat(path)
        want = (st.st_uid if uid is None else uid, st.st_gid if gid is None else gid)
        if (st.st_mode & 0o7777) != CERT_MODE or (st.st_uid, st.st_gid) != want:
            changed = True
            os.chmod(path, CERT_MODE)
            os.chown(path, *want)
    return roots, changed


def argument_spec():
    return dict(
        identity=dict(type="str"),
        namespace=dict(type="str"),
        service_account=dict(type="str"),
        node_name=dict(type="str"),
        trust_domain=dict(type="str", default="cluster.local"),
        state=dict(type="str", choices=["csr", "present", "absent"], default="present"),
        certs_dir=dict(type="path", default="/var/lib/ztproxy/certs"),
        trust_bundle=dict(type="path"),
        cert_chain=dict(type="str"),
        trust_bundle_content=dict(type="str"),
        expected_issuer=dict(type="str"),
        renew_threshold=dict(type="float", default=0.25),
        force=dict(type="bool", default=False),
        owner=dict(type="str"),
        group=dict(type="str"),
    )


def main() -> None:
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        mutually_exclusive=[
            ("identity", "namespace", "node_name"),
            ("identity", "service_account", "node_name"),
        ],
    )
    if IDENTITY_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("cryptography"), exception=IDENTITY_IMPORT_ERROR)
    params = module.params
    params["trust_bundle"] = params["trust_bundle"] or os.path.join(params["certs_dir"], "root-cert.pem")
    result = {"changed": False, "certificate": None}
    try:
        if not 0 <= params["renew_threshold"] < 1:
            raise IdentityError("renew_threshold is a fraction of the lifetime: between 0 and 1")
        identity = _identity(params)
        uid, gid = _ids(params)
        if identity is None and (params["state"] != "present" or params["cert_chain"]):
            raise IdentityError(
                f"state={params['state']} needs an identity: identity, namespace+service_account or node_name"
            )
        bundle_roots = None
        if params["state"] == "present" and params["trust_bundle_content"]:
            bundle_roots, bundle_changed = install_bundle(
                module, params["trust_bundle"], params["trust_bundle_content"], uid, gid
            )
            result["changed"] |= bundle_changed
        elif os.path.exists(params["trust_bundle"]):
            bundle_roots = load_cert_file(params["trust_bundle"])
        if bundle_roots is not None:
            result["trust_roots"] = [
                {"subject": r.subject.rfc4514_string(), "serial": serial_hex(r)} for r in bundle_roots
            ]
        if identity is not None:
            result["identity"] = str(identity)
            files = CertFiles(module, params["certs_dir"], identity, uid, gid)
            _key, before_certs = files.current()
            before = summarize(before_certs[0]).as_dict() if before_certs else None
            if params["state"] == "csr":
                do_csr(module, files, result)
            elif params["state"] == "present":
                do_present(module, files, bundle_roots, result)
            else:
                do_absent(module, files)
            _key, after_certs = files.current()
            result["certificate"] = summarize(after_certs[0]).as_dict() if after_certs else None
            result["changed"] |= files.changed
            if module._diff:
                result["diff"] = {
                    "before": {"certificate": before},
                    "after": {"certificate": result["certificate"]},
                }
    except IdentityError as exc:
        module.fail_json(msg=str(exc), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
