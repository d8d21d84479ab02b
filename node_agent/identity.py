"""The node's fleet identity: its key and certificate (spiffe://fleetlm/node/<id>) and the fleet CA.

Either the operator gives the three files (--tls-cert/--tls-key/--tls-ca), or the node joins with a join
token: it makes its own key (which never leaves the node), learns the fleet CA from the control plane's
join address and keeps it only if its SHA-256 fingerprint is the one pinned with --ca-fingerprint, then
sends its token and a CSR over TLS verified against that CA, and keeps what comes back in its state
directory. On later starts the kept certificate is used as it is, or renewed (over mutual TLS, with the
certificate itself as the credential) once less than a third of its lifetime is left; a certificate that
has expired needs a join token again.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from pathlib import Path

import grpc
from cryptography import x509

from fleetlm.controlplane.v1 import identity_pb2, identity_pb2_grpc
from mesh.fleet_ca import (
    fingerprint,
    identity_uri,
    key_pem,
    make_csr,
    new_key,
    uri_identities,
    write_private,
    write_public,
)
from mesh.tls import TlsFiles, channel_credentials, fetch_pinned_ca
from node_agent.settings import NodeSettings

log = logging.getLogger(__name__)

RENEW_FRACTION = 1 / 3  # renew when less than this share of the certificate's lifetime is left


class JoinError(Exception):
    """The node could not get its identity; the message is safe to show (it never holds the token)."""


def _files(state_dir: Path) -> TlsFiles:
    return TlsFiles(state_dir / "node.crt", state_dir / "node.key", state_dir / "ca.crt")


def _usable(files: TlsFiles, node_id: str) -> tuple[bool, bool]:
    """(the kept certificate is this node's and valid now, it should be renewed)."""
    if not all(p.is_file() for p in (files.cert, files.key, files.ca)):
        return False, False
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    if identity_uri("node", node_id) not in uri_identities(cert):
        return False, False
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return False, False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return True, cert.not_valid_after_utc - now < lifetime * RENEW_FRACTION


def _store(files: TlsFiles, reply: identity_pb2.JoinResponse | identity_pb2.RenewResponse, key: bytes) -> None:
    write_public(files.ca, reply.ca_certificate_pem)
    write_private(files.key, key)
    write_public(files.cert, reply.certificate_pem)


async def _join(settings: NodeSettings, files: TlsFiles) -> None:
    if not settings.ca_fingerprint:
        raise JoinError("--join-token needs --ca-fingerprint (printed by `fleetlm join-token create`)")
    address = settings.join_address
    if not address:
        raise JoinError("--join-token needs --join-address (the control plane's --join-listen)")
    try:
        ca_pem = await asyncio.to_thread(fetch_pinned_ca, address, settings.ca_fingerprint)
    except PermissionError as exc:
        raise JoinError(str(exc)) from None
    except OSError as exc:
        raise JoinError(f"cannot reach the join address {address}: {exc}") from None
    key = new_key()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(address, credentials) as channel:
        try:
            reply = await identity_pb2_grpc.JoinServiceStub(channel).Join(
                identity_pb2.JoinRequest(
                    token=settings.join_token.get_secret_value() if settings.join_token else "",
                    node_id=settings.node_id,
                    csr_pem=make_csr(key, settings.node_id),
                ),
                timeout=settings.rpc_timeout_seconds * 2,
            )
        except grpc.aio.AioRpcError as exc:
            raise JoinError(f"the control plane refused to join: {exc.code().name}: {exc.details()}") from None
    if fingerprint(reply.ca_certificate_pem) != fingerprint(ca_pem):
        raise JoinError("the control plane signed with another CA than the pinned one")
    _store(files, reply, key_pem(key))
    log.info("node %s joined the fleet (CA %s)", settings.node_id, settings.ca_fingerprint)


async def _renew(settings: NodeSettings, files: TlsFiles, target: str) -> None:
    key = new_key()
    async with grpc.aio.secure_channel(target, channel_credentials(files)) as channel:
        reply = await identity_pb2_grpc.JoinServiceStub(channel).Renew(
            identity_pb2.RenewRequest(csr_pem=make_csr(key, settings.node_id)), timeout=settings.rpc_timeout_seconds
        )
    _store(files, reply, key_pem(key))
    log.info("node %s renewed its certificate", settings.node_id)


async def node_identity(settings: NodeSettings, controlplane_target: str) -> TlsFiles | None:
    """The TLS files this node serves and calls with; None when it runs without TLS."""
    given = TlsFiles.of(settings.tls_cert, settings.tls_key, settings.tls_ca)
    if given is not None:
        return given
    if settings.join_token is None:
        return None
    files = _files(settings.state_dir / "identity")
    usable, renew = _usable(files, settings.node_id)
    if not usable:
        await _join(settings, files)
    elif renew:
        try:
            await _renew(settings, files, controlplane_target)
        except grpc.aio.AioRpcError as exc:  # the kept certificate still works: renew at the next start
            log.warning("renewing the node certificate failed: %s", exc.code().name)
    return files
