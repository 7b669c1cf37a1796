"""A test CA for in-process servers and channels: every test talks TLS like the real swarm.

    pki = TestPki(tmp_path)
    server_sec = pki.node("a" * 32)           # a node's TlsSecurity (certificate swarm://node/aaa...)
    client_sec = pki.coordinator()            # the coordinator's (swarm://coordinator)
    port = bind(server, "127.0.0.1", 0, security=server_sec)
    with data_channel(f"127.0.0.1:{port}", security=client_sec, node_id="a" * 32) as ch: ...
"""

from __future__ import annotations

import time
from pathlib import Path

from swarm import certs
from swarm.transport.channels import control_channel
from swarm.transport.tls import TlsSecurity


class TestPki:
    __test__ = False  # not a pytest test class

    def __init__(self, state_dir: Path) -> None:
        from coordinator.ca import CoordinatorCA

        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self.ca = CoordinatorCA(Path(state_dir), now_s=time.time())

    @property
    def ca_pem(self) -> bytes:
        return self.ca.ca_pem

    def node(self, node_id: str, *, lifetime_s: float = 3600.0) -> TlsSecurity:
        key = certs.new_key()
        cert = self.ca.issue_node(node_id, certs.public_key_der(key), now_s=time.time(), lifetime_s=lifetime_s)
        return TlsSecurity(ca_pem=self.ca_pem, key_pem=certs.key_pem(key), cert_pem=cert)

    def coordinator(self) -> TlsSecurity:
        key_pem, chain = self.ca.issue_server([], now_s=time.time())
        return TlsSecurity(ca_pem=self.ca_pem, key_pem=key_pem, cert_pem=chain)

    def client(self) -> TlsSecurity:
        """A user's: trusts the CA, has no certificate."""
        return TlsSecurity(ca_pem=self.ca_pem)


def app_channel(app):
    """A TLS channel to an in-process CoordinatorApp's gRPC port (as a user: no certificate)."""
    return control_channel(f"127.0.0.1:{app.grpc_port}", security=TlsSecurity(ca_pem=app.ca.ca_pem))


def app_node_security(app, node_id: str = "e" * 32) -> TlsSecurity:
    """TLS material of a (test) node ``node_id`` certified by an in-process app's CA."""
    key = certs.new_key()
    cert = app.ca.issue_node(node_id, certs.public_key_der(key), now_s=time.time(), lifetime_s=3600)
    return TlsSecurity(ca_pem=app.ca.ca_pem, key_pem=certs.key_pem(key), cert_pem=cert)


def security_from_state_dir(state_dir: Path, node_id: str | None = None) -> TlsSecurity:
    """TLS material certified by the CA in a coordinator's ``state_dir``: a certificate for node
    ``node_id`` (what that node holds after registering), or the coordinator's own (``None``)."""
    ca_pem, key_pem, cert_pem = material_from_state_dir(state_dir, node_id)
    return TlsSecurity(ca_pem=ca_pem, key_pem=key_pem, cert_pem=cert_pem)


def material_from_state_dir(state_dir: Path, node_id: str | None = None) -> tuple[bytes, bytes, bytes]:
    """(CA PEM, key PEM, certificate chain PEM) as :func:`security_from_state_dir` makes them, for
    clients outside grpc (a raw ``ssl`` socket)."""
    from coordinator.ca import CoordinatorCA

    ca = CoordinatorCA(Path(state_dir), now_s=time.time())
    if node_id is None:
        key_pem, chain = ca.issue_server([], now_s=time.time(), write=False)
        return ca.ca_pem, key_pem, chain
    key = certs.new_key()
    cert = ca.issue_node(node_id, certs.public_key_der(key), now_s=time.time(), lifetime_s=3600)
    return ca.ca_pem, certs.key_pem(key), cert
