"""TLS for every fleetlm link, from certificate files: grpc server credentials that re-read their files when
they change (rotation without a restart), channel credentials that present the component's certificate,
the verified identity of a gRPC peer, and the pinned first contact of a joining node.

Client channels follow their files too (`secure_channel`): a channel made from TlsFiles checks them before
each call and, when they have changed, makes its calls on a new channel with the new certificate from then
on (grpc's channel credentials are read once, at creation). That is how a node's renewed certificate, or an
operator's rotated one, reaches the connections a component opens, without a restart.

Mutual TLS between fleet components: a server given a CA requires a client certificate signed by it
(grpc's REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY); servers for the public (clients of the OpenAI
API, joining nodes, operators with a token) ask for none.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from mesh.fleet_ca import uri_identities

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """A component's certificate, its key, and the CA it trusts (the fleet CA)."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def of(cls, cert: Path | str | None, key: Path | str | None, ca: Path | str | None) -> TlsFiles | None:
        """None when no file is given; all three or a clear error (never a half-TLS start)."""
        given = [x for x in (cert, key, ca) if x]
        if not given:
            return None
        if len(given) != 3:
            raise ValueError("TLS needs --tls-cert, --tls-key and --tls-ca together")
        files = cls(Path(str(cert)), Path(str(key)), Path(str(ca)))
        for path in (files.cert, files.key, files.ca):
            if not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return files

    def _mtimes(self) -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in (self.cert, self.key, self.ca))

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(key, certificate, CA) as PEM, checked: the key is the certificate's. Raises ValueError otherwise,
        as it does while a renewal is replacing the files one after the other, so no reader ever takes a key
        and a certificate of two different generations."""
        key, cert, ca = self.key.read_bytes(), self.cert.read_bytes(), self.ca.read_bytes()
        try:
            private = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # cryptography's words hold no key material
            raise ValueError(f"the TLS key {self.key} is not a PEM private key without a password: {exc}") from None
        try:
            certificate = x509.load_pem_x509_certificate(cert)
        except ValueError as exc:
            raise ValueError(f"the TLS certificate {self.cert} is not a PEM certificate: {exc}") from None
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if private.public_key().public_bytes(serialization.Encoding.DER, spki) != certificate.public_key().public_bytes(
            serialization.Encoding.DER, spki
        ):
            raise ValueError(f"the key {self.key} is not the key of {self.cert}")
        try:
            x509.load_pem_x509_certificates(ca)  # peers are verified with it: a key or garbage there fails later
        except ValueError as exc:
            raise ValueError(f"the TLS CA {self.ca} is not a PEM certificate: {exc}") from None
        return key, cert, ca


class _Reloader:
    """The fetcher of grpc's dynamic server credentials: grpc calls it before each new handshake; it returns
    a new configuration when a file's mtime changed, else None (keep the current one). A half-written
    or broken set of files keeps the last good configuration (logged without the key's contents)."""

    def __init__(self, files: TlsFiles, require_client_cert: bool) -> None:
        self._files = files
        self._require = require_client_cert
        self._lock = threading.Lock()  # grpc may call the fetcher from several of its threads
        self._seen = files._mtimes()
        self.initial = self._config()

    def _config(self) -> grpc.ServerCertificateConfiguration:
        key, cert, ca = self._files.read()  # a broken or mismatched pair fails here, not in a handshake
        # The chain sent ends with the CA, so a joining node can find the certificate it pinned.
        chain = cert if ca.strip() in cert else cert.rstrip(b"\n") + b"\n" + ca
        return grpc.ssl_server_certificate_configuration(
            [(key, chain)], root_certificates=ca if self._require else None
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                mtimes = self._files._mtimes()
                if mtimes == self._seen:
                    return None
                config = self._config()
            except Exception as exc:  # a rotation in progress must not break serving
                log.warning("TLS files %s not reloaded: %s", self._files.cert, type(exc).__name__)
                return None
            self._seen = mtimes
            log.info("TLS certificate %s reloaded", self._files.cert)
            return config


def server_credentials(files: TlsFiles, require_client_cert: bool) -> grpc.ServerCredentials:
    reloader = _Reloader(files, require_client_cert)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial, reloader, require_client_authentication=require_client_cert
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Trust the fleet CA and present this component's certificate (mutual TLS), as the files are now."""
    key, cert, ca = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# How long a channel replaced by a newer certificate keeps the calls it carries. Longer than any request the
# edge lets run (600 s), so no generation is cut; only endless streams (routing table, assignments, load,
# keys) are, and they open again at once, on the new certificate.
REPLACED_CHANNEL_GRACE_SECONDS = 660.0


class _Rotating:
    """A multicallable that makes each call on the channel's current underlying channel."""

    def __init__(self, owner: _FollowingChannel, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._owner = owner
        self._kind = kind
        self._args = args
        self._kwargs = kwargs
        self._made: tuple[grpc.aio.Channel, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        if self._made is None or self._made[0] is not channel:
            self._made = (channel, getattr(channel, self._kind)(*self._args, **self._kwargs))
        return self._made[1](*args, **kwargs)


class _FollowingChannel(grpc.aio.Channel):
    """A mutual-TLS channel that follows its certificate files: before each call it compares their mtimes
    (three stat calls) and, when they changed and hold a matching key and certificate, opens a new channel
    with them for this call and every later one. The replaced channel stops taking calls and is closed once
    the calls it carries end (REPLACED_CHANNEL_GRACE_SECONDS at most)."""

    def __init__(self, target: str, files: TlsFiles, options: list[tuple[str, Any]]) -> None:
        self._target = target
        self._files = files
        self._options = options
        self._seen = files._mtimes()
        self._failed: tuple[int, ...] = ()  # the files' mtimes when they last failed to load (logged once)
        self._channel = grpc.aio.secure_channel(target, channel_credentials(files), options=options)
        self._closing: set[asyncio.Task[None]] = set()

    def current(self) -> grpc.aio.Channel:
        mtimes = self._seen
        try:
            mtimes = self._files._mtimes()
            if mtimes != self._seen:
                credentials = channel_credentials(self._files)
                self._seen = mtimes
                old, self._channel = self._channel, grpc.aio.secure_channel(self._target, credentials, self._options)
                task = asyncio.get_running_loop().create_task(old.close(REPLACED_CHANNEL_GRACE_SECONDS))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                log.info("TLS certificate %s reloaded for calls to %s", self._files.cert, self._target)
        except (OSError, ValueError) as exc:  # files being replaced: the last good channel, and look again
            if mtimes != self._failed:
                self._failed = mtimes
                log.warning("TLS files %s not reloaded: %s", self._files.cert, type(exc).__name__)
        return self._channel

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Rotating(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Rotating(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Rotating(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Rotating(self, "stream_stream", args, kwargs)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    async def close(self, grace: float | None = None) -> None:
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        await self._channel.close(grace)

    async def __aenter__(self) -> _FollowingChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)


def secure_channel(
    target: str, files: TlsFiles | None, options: Sequence[tuple[str, Any]], server_name: str | None = None
) -> grpc.aio.Channel:
    """A channel to a fleet component: mutual TLS when `files` are given (following them when they change),
    else plaintext. `server_name` is the name the server's certificate must carry (a node's
    `<id>.node.fleetlm`, the control planes' `controlplane.fleetlm`), when it is not the target's."""
    if files is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    extra = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return _FollowingChannel(target, files, [*options, *extra])


def current_channel(channel: grpc.aio.Channel) -> grpc.aio.Channel:
    """The channel a call made on `channel` now would go out on: for one that follows its certificate files
    (`secure_channel`), the channel opened with the files as they are now; any other channel is itself. A
    long-lived stream opened on the one it returns can tell, by comparing, that a rotation replaced it."""
    return channel.current() if isinstance(channel, _FollowingChannel) else channel


def peer_certificate(context: grpc.aio.ServicerContext) -> x509.Certificate | None:
    """The peer's verified certificate; None over plaintext or with no client certificate."""
    pems = context.auth_context().get("x509_pem_cert") or []
    return x509.load_pem_x509_certificate(pems[0]) if pems else None


def peer_identities(context: grpc.aio.ServicerContext) -> list[str]:
    """The spiffe identities in the peer's verified certificate; [] over plaintext or with no client
    certificate. Read from the certificate itself (grpc only exposes its PEM), not from a name the peer
    claims in its request."""
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return []
    return uri_identities(x509.load_pem_x509_certificate(pems[0]))


async def keep_ssl_context_current(context: ssl.SSLContext, files: TlsFiles, period: float = 2.0) -> None:
    """Load the certificate files into `context` again whenever they change (until cancelled): an SSLContext
    uses the chain loaded last for every new handshake, so uvicorn's HTTPS rotates without a restart."""
    seen = files._mtimes()
    while True:
        await asyncio.sleep(period)
        try:
            mtimes = files._mtimes()
            if mtimes != seen:
                context.load_cert_chain(files.cert, files.key)
                seen = mtimes
                log.info("TLS certificate %s reloaded", files.cert)
        except (OSError, ssl.SSLError) as exc:  # half-written files: try again next period
            log.warning("TLS files %s not reloaded: %s", files.cert, type(exc).__name__)


def is_loopback(address: str) -> bool:
    """Whether host:port names only this machine (127.0.0.0/8, ::1, or a name that resolves only there).
    A wildcard (0.0.0.0, [::], empty) is every interface: not loopback."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return False
    return bool(resolved) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in resolved)


def refuse_exposed_plaintext(component: str, addresses: Sequence[str], tls: bool, insecure: bool) -> None:
    """Safe by default: a component that listens beyond this machine speaks TLS, unless its operator asked
    for plaintext by name (--insecure-plaintext). On loopback, plaintext stays the one-command default."""
    exposed = [a for a in addresses if a and not is_loopback(a)]
    if exposed and not tls and not insecure:
        raise ValueError(
            f"{component} listens on {', '.join(exposed)}, beyond this machine, without TLS: give --tls-cert,"
            " --tls-key and --tls-ca (fleetlm ca issue), or --insecure-plaintext to serve plaintext anyway"
        )


def fetch_pinned_ca(address: str, pin: str, timeout: float = 10.0) -> bytes:
    """The CA certificate (PEM) of the TLS server at host:port whose SHA-256 fingerprint is `pin`.

    The first contact of a joining node: it has no CA to verify the server with yet, only the fingerprint the
    operator gave it. The server sends its chain (leaf and CA) in the handshake; the node takes the chain
    without verifying it, keeps the certificate whose fingerprint matches the pin, and refuses otherwise.
    The caller then verifies the server against that CA with grpc before it sends its join token, so an
    interceptor without the CA's key never sees the token."""
    want = pin.lower().removeprefix("sha256:").replace(":", "")
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing is trusted from this connection but the pinned certificate
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=None) as tls,
    ):
        # Public since Python 3.13; the same method of the underlying _ssl object before.
        chain_of = getattr(tls, "get_unverified_chain", None) or tls._sslobj.get_unverified_chain  # type: ignore[attr-defined]
        chain = chain_of() or []
    for cert in chain:
        der = cert if isinstance(cert, bytes) else cert.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
        if hashlib.sha256(der).hexdigest() == want:
            return ssl.DER_cert_to_PEM_cert(der).encode()
    raise PermissionError(
        f"the server at {address} does not present the pinned CA {pin} (wrong fingerprint, or not this fleet)"
    )
