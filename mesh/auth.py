"""Credentials shared by the fleet's components: the fleet secret, the admin token, and the check of a
bearer credential on AdminService.

- The fleet secret (`--auth-secret-file`, at least 32 random bytes) is given to control planes and edges.
  API keys are stored as HMAC-SHA256(fleet secret, key), and edges prove themselves to the control plane with
  a credential derived from it (`edge_credential`), so an edge needs no file of its own beyond the secret.
- The admin token (`--admin-token-file`) is what an operator sends as `authorization: Bearer <token>` on
  every AdminService RPC.

Credentials are compared as HMACs of what was sent, with hmac.compare_digest: the time a comparison takes
says nothing about how much of a guess was right. No credential is ever logged or put in an error.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from mesh.errors import ErrorCode, FleetError
from mesh.fleet_ca import TRUST_DOMAIN
from mesh.tls import peer_identities

MIN_SECRET_BYTES = 32
ADMIN_SERVICE = "/fleetlm.controlplane.v1.AdminService/"
# AdminService RPCs an edge calls with its edge credential (the key table and the quota leases).
EDGE_METHODS = frozenset({ADMIN_SERVICE + "WatchApiKeys", ADMIN_SERVICE + "AcquireQuota"})
_EDGE_LABEL = b"fleetlm edge credential v1"
_EDGE_PREFIX = "fle-"


def create_secret_file(path: Path) -> None:
    """A new secret file (32 random bytes, base64url, mode 0600); refuses to overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(MIN_SECRET_BYTES) + "\n")


def read_secret_file(path: Path | str, what: str = "secret") -> bytes:
    """The secret in a file (surrounding whitespace dropped). ValueError, naming the file but never its
    content, when it is shorter than 32 bytes; an OSError of the same type, naming what the file is, when
    it cannot be read."""
    try:
        value = Path(path).read_bytes().strip()
    except OSError as exc:
        raise type(exc)(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
    if len(value) < MIN_SECRET_BYTES:
        raise ValueError(f"{what} file {path} holds {len(value)} bytes; it needs at least {MIN_SECRET_BYTES}")
    return value


def read_admin_token(path: Path | str) -> str:
    """The admin token in a file, as read_secret_file reads it. It travels as gRPC metadata
    (`authorization: Bearer <token>`), so it must be printable ASCII with no spaces: ValueError naming the
    file (never its content) otherwise, as for a file of random bytes."""
    value = read_secret_file(path, "admin token")
    if not all(0x21 <= byte <= 0x7E for byte in value):
        raise ValueError(
            f"admin token file {path} is not printable ASCII text without spaces (it is sent as gRPC metadata);"
            " make one with: fleetlm keys new-secret FILE"
        )
    return value.decode("ascii")


def edge_credential(fleet_secret: bytes) -> str:
    """The bearer credential an edge presents to the control plane: derived from the fleet secret, so it
    cannot be used to recover the secret or to forge API keys."""
    return _EDGE_PREFIX + hmac.new(fleet_secret, _EDGE_LABEL, hashlib.sha256).hexdigest()


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The credential in `authorization: Bearer <credential>` metadata, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            scheme, _, credential = text.strip().partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
    return None


class _Matcher:
    """Compares a presented credential with one known one, in constant time (HMAC of both under a per-process
    random key, so the lengths of the two do not show either)."""

    def __init__(self, credential: str) -> None:
        self._key = secrets.token_bytes(32)
        self._digest = self._mac(credential)

    def _mac(self, value: str) -> bytes:
        return hmac.new(self._key, value.encode(), hashlib.sha256).digest()

    def matches(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(self._mac(presented), self._digest)


def identity_kinds(identities: Iterable[str]) -> set[str]:
    """The kinds (node, controlplane, edge, admin) of `spiffe://fleetlm/<kind>[/<name>]` identities."""
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    return {i.removeprefix(prefix).split("/", 1)[0] for i in identities if i.startswith(prefix)}


class CallerKinds:
    """Which kinds of fleet certificate may call which gRPC service of a server that requires one (mutual
    TLS): a check for GrpcServer's `check_caller`. A node serves only edges (and operators): another node's
    certificate, valid or revoked, is no ticket to inference that skips the edge's API keys and limits; the
    routing table goes to edges, operators and control planes only. Services it does not name (health,
    reflection, the registry, which checks the node itself) are left alone."""

    def __init__(self, component: str, allowed: Mapping[str, Iterable[str]]) -> None:
        self._component = component
        self._allowed = {service: frozenset(kinds) for service, kinds in allowed.items()}
        self._kinds_of: dict[bytes, frozenset[str]] = {}  # a peer certificate (PEM) -> its identities' kinds

    def __call__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        service = method.split("/")[1] if method.count("/") >= 2 else ""
        allowed = self._allowed.get(service)
        if allowed is None:
            return
        pems = context.auth_context().get("x509_pem_cert") or [b""]
        kinds = self._kinds_of.get(pems[0])
        if kinds is None:
            if len(self._kinds_of) >= 256:  # a bounded cache: the fleet's certificates, renewed now and then
                self._kinds_of.clear()
            kinds = self._kinds_of[pems[0]] = frozenset(identity_kinds(peer_identities(context)))
        if kinds & allowed:
            return
        holder = (
            f"the client certificate is {' or '.join(_a(k) for k in sorted(kinds))}'s" if kinds else "no fleet identity"
        )
        raise FleetError(
            ErrorCode.PERMISSION_DENIED,
            f"{service.rsplit('.', 1)[-1]} on {_a(self._component)} takes calls from"
            f" {' and '.join(sorted(allowed))} certificates only; {holder}",
        )


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


class AdminGuard:
    """Who may call which AdminService RPC.

    A call passes with the admin token, or (with TLS) with a client certificate whose fleet identity is an
    operator's (`admin`) or another control plane's (a follower forwarding a write whose caller it checked).
    The edge's credential, or an edge's certificate, also passes WatchApiKeys and AcquireQuota. Any other
    fleet certificate (a node's, say) is authenticated but not allowed: PERMISSION_DENIED. With no admin
    token and no TLS, every call is let through (auth off, as on 127.0.0.1 by default)."""

    def __init__(self, admin_token: str | None, fleet_secret: bytes | None = None, tls: bool = False) -> None:
        self._admin = _Matcher(admin_token) if admin_token else None
        self._edge = _Matcher(edge_credential(fleet_secret)) if fleet_secret else None
        self._tls = tls

    @property
    def enabled(self) -> bool:
        return self._admin is not None or self._tls

    def check(self, method: str, metadata: Iterable[tuple[str, Any]] | None, identities: Iterable[str] = ()) -> None:
        """Raises UNAUTHENTICATED unless the call carries a credential good for `method` (PERMISSION_DENIED
        for a fleet certificate of a kind that may not call it, and for an edge whose fleet secret is not
        this control plane's)."""
        metadata = tuple(metadata or ())
        presented = bearer(metadata)
        if self._admin is not None and self._admin.matches(presented):
            return
        edge_method = method in EDGE_METHODS
        # An edge credential derived from another secret: the edge would refuse every API key (its hashes of
        # presented keys would match none), whatever else lets it call. Said to it, and refused.
        edge_credential_of_another_secret = (
            edge_method
            and self._edge is not None
            and presented is not None
            and presented.startswith(_EDGE_PREFIX)
            and not self._edge.matches(presented)
        )
        if edge_credential_of_another_secret:
            raise FleetError(
                ErrorCode.PERMISSION_DENIED,
                "this edge's fleet secret (--auth-secret-file) is not the control plane's: it would refuse"
                " every API key; give both the same file",
            )
        if not self.enabled:
            return
        if edge_method and self._edge is not None and self._edge.matches(presented):
            return
        kinds = identity_kinds(identities) if self._tls else set()
        if kinds & {"admin", "controlplane"} or (edge_method and "edge" in kinds):
            return
        name = method.rsplit("/", 1)[-1]
        if kinds:
            raise FleetError(
                ErrorCode.PERMISSION_DENIED,
                f"{name} needs an operator's credential: the admin token or an admin certificate; the"
                f" client certificate is {' or '.join(_a(k) for k in sorted(kinds))}'s",
            )
        if presented is not None:
            why = "the credential sent is not valid"
        elif any(key == "authorization" for key, _ in metadata or ()):
            why = "the 'authorization' metadata sent is not 'Bearer <token>'"
        else:
            why = "no credential was sent"
        wanted = "'authorization: Bearer <admin token>' metadata"
        if self._tls:
            wanted += " or a client certificate with an admin identity"
        raise FleetError(ErrorCode.UNAUTHENTICATED, f"{name} needs {wanted}; {why}")


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks AdminService calls with an AdminGuard before they reach the servicer; every other service
    (reflection, grpc.health.v1, the node and routing services) is left alone. Put it before the error
    interceptor so its refusal carries the ErrorInfo like any other error."""

    def __init__(self, guard: AdminGuard) -> None:
        self._guard = guard

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if not method.startswith(ADMIN_SERVICE):
            return await continuation(details)
        try:
            self._guard.check(method, details.invocation_metadata)
        except FleetError as error:
            return _refusal(error, await continuation(details))
        return await continuation(details)


def _refusal(error: FleetError, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    if handler is None:
        return None

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(error.grpc_code, error.message, trailing_metadata=error.grpc_trailing_metadata())

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(request, context)
        yield  # pragma: no cover - never reached: abort raises

    options = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **options)
    return grpc.unary_unary_rpc_method_handler(abort, **options)
