"""The node's fleet identity: its key and certificate (spiffe://fleetlm/node/<id>) and the fleet CA.

Either the operator gives the three files (--tls-cert/--tls-key/--tls-ca), or the node joins with a join
token: it makes its own key (which never leaves the node), learns the fleet CA from the control plane's
join address and keeps it only if its SHA-256 fingerprint is the one pinned with --ca-fingerprint, then
sends its token and a CSR over TLS verified against that CA, and keeps what comes back in its state
directory. On later starts (with the token or without it) the kept certificate is used as it is, or renewed
(over mutual TLS, with the certificate itself as the credential) once less than a third of its lifetime is
left; a certificate that has expired needs a join token again.

While the node runs, `keep_renewed` renews the certificate at two thirds of its life (as Kubernetes' kubelet
does), so the control plane may sign short-lived certificates: a new key each time, the key and the
certificate each replaced by a rename. Everything picks the new pair up by itself, checking that key and
certificate match before using them: the gRPC server at its next handshake (mesh.tls's dynamic
credentials), the channels to the control plane at their next call (mesh.tls.secure_channel).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetlm.controlplane.v1 import identity_pb2, identity_pb2_grpc
from mesh.channels import CHANNEL_OPTIONS
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
from mesh.tls import TlsFiles, fetch_pinned_ca, secure_channel
from node_agent.settings import NodeSettings

log = logging.getLogger(__name__)

RENEW_FRACTION = 1 / 3  # renew when less than this share of the certificate's lifetime is left
# After a failed renewal, try again after a tenth of the time the certificate has left, within these bounds.
RETRY_SECONDS = (1.0, 60.0)


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


def _checked_reply(reply: identity_pb2.RenewResponse, key: bytes, node_id: str, ca_pem: bytes) -> None:
    """Refuse a renewal reply that would break the node's files: another key, identity or CA."""
    cert = x509.load_pem_x509_certificate(reply.certificate_pem)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    own = serialization.load_pem_private_key(key, password=None).public_key()
    if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != own.public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise ValueError("the renewed certificate is not for the key the node sent")
    if identity_uri("node", node_id) not in uri_identities(cert):
        raise ValueError("the renewed certificate is not this node's")
    if fingerprint(reply.ca_certificate_pem) != fingerprint(ca_pem):
        raise ValueError("the renewed certificate comes with another CA than the node's")


async def _renew(settings: NodeSettings, files: TlsFiles, target: str, server_name: str | None = None) -> None:
    key = new_key()
    async with secure_channel(target, files, CHANNEL_OPTIONS, server_name) as channel:
        reply = await identity_pb2_grpc.JoinServiceStub(channel).Renew(
            identity_pb2.RenewRequest(csr_pem=make_csr(key, settings.node_id)), timeout=settings.rpc_timeout_seconds
        )
    pem = key_pem(key)
    _checked_reply(reply, pem, settings.node_id, files.ca.read_bytes())
    _store(files, reply, pem)
    serial = x509.load_pem_x509_certificate(reply.certificate_pem).serial_number
    log.info("node %s renewed its certificate (serial %x, until %s)", settings.node_id, serial,
             reply.not_after.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ"))  # fmt: skip


def _validity(files: TlsFiles) -> tuple[datetime.datetime, datetime.datetime]:
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    return cert.not_valid_before_utc, cert.not_valid_after_utc


async def keep_renewed(settings: NodeSettings, files: TlsFiles, target: str, server_name: str | None = None) -> None:
    """Renew the node's certificate at two thirds of its life, for as long as the node runs (until cancelled).
    A failed renewal is tried again (sooner as the expiry nears); the certificate in use goes on meanwhile."""
    failed = False
    while True:
        start, end = _validity(files)
        now = datetime.datetime.now(datetime.UTC)
        if failed:
            left = (end - now).total_seconds()
            wait = min(max(left / 10, RETRY_SECONDS[0]), RETRY_SECONDS[1])
        else:
            wait = (end - (end - start) * RENEW_FRACTION - now).total_seconds()
        await asyncio.sleep(max(0.0, wait))
        try:
            await _renew(settings, files, target, server_name)
            failed = False
        except grpc.aio.AioRpcError as exc:
            failed = True
            expired = datetime.datetime.now(datetime.UTC) >= end
            log.log(
                logging.ERROR if expired else logging.WARNING,
                "renewing the node certificate was refused or failed (%s: %s); %s",
                exc.code().name,
                exc.details(),
                "it has expired: the node needs a join token again" if expired else f"it expires at {end:%H:%M:%S}Z",
            )
        except (OSError, ValueError) as exc:
            failed = True
            log.warning("renewing the node certificate failed: %s", exc)


def renews(settings: NodeSettings) -> bool:
    """Whether this node's identity is its own to renew: it joined with a token, now or on an earlier start
    (operator files are not)."""
    given = TlsFiles.of(settings.tls_cert, settings.tls_key, settings.tls_ca)
    return given is None and _files(settings.state_dir / "identity").cert.is_file()


async def node_identity(
    settings: NodeSettings, controlplane_target: str, server_name: str | None = None
) -> TlsFiles | None:
    """The TLS files this node serves and calls with; None when it runs without TLS."""
    given = TlsFiles.of(settings.tls_cert, settings.tls_key, settings.tls_ca)
    if given is not None:
        return given
    files = _files(settings.state_dir / "identity")
    usable, renew = _usable(files, settings.node_id)
    if settings.join_token is None:
        # A node that joined on an earlier start keeps its identity without the token: a token is for joining.
        if not files.cert.is_file():
            return None
        if not usable:
            raise JoinError(
                f"the node certificate kept in {files.cert.parent} has expired or is not node {settings.node_id}'s:"
                " join again with a join token (FLEETLM_NODE_JOIN_TOKEN or --join-token)"
            )
        log.info("node %s uses the certificate it was given when it joined (%s)", settings.node_id, files.cert)
    if not usable:
        await _join(settings, files)
    elif renew:
        try:
            await _renew(settings, files, controlplane_target, server_name)
        except grpc.aio.AioRpcError as exc:  # the kept certificate still works; keep_renewed tries again
            log.warning("renewing the node certificate failed: %s", exc.code().name)
        except ValueError as exc:
            log.warning("renewing the node certificate failed: %s", exc)
    return files
