"""Join tokens and the JoinService: how a node gets its fleet certificate.

A join token is `fljt_<id>.<secret>`: the id names the token (list, revoke), the secret (256 random bits) is
shown once and stored only as its SHA-256 in etcd (`<prefix>/join-tokens/<id>`). An unsalted hash is
enough for a secret of 256 random bits: no dictionary reaches it, and a hash read from etcd lets no one
join. A token expires (`ttl`), can be revoked, and may be used by any number of nodes until then (a
bootstrap token for a batch of boxes, as Kubernetes' are).

Join signs the node's CSR for `spiffe://fleetlm/node/<node_id>` with DNS name `<node_id>.node.fleetlm`
(what the edge verifies when it dials the node); the identity comes from the request's node_id, never
from the CSR. Every bad token gets the same UNAUTHENTICATED answer, so a caller learns nothing about which
check failed; the control plane's log says which, by the token's id only.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from google.protobuf import timestamp_pb2

from controlplane.etcd_store import EtcdStore
from fleetlm.controlplane.v1 import admin_pb2, identity_pb2, identity_pb2_grpc
from mesh import durations
from mesh.errors import ErrorCode, FleetError, invalid, required
from mesh.fleet_ca import LEAF_DAYS, FleetCA, check_identity_name, identity_uri, node_dns_name
from mesh.tls import peer_identities

log = logging.getLogger(__name__)

TOKEN_PREFIX = "fljt_"
DIRECTORY = "join-tokens"
IDENTITIES = "node-identities"
# How stale the registry's copy of the revoked nodes may be: a revocation refuses the node's next call
# within this (and its lease then lapses, taking it out of routing).
REVOCATION_REFRESH_SECONDS = 2.0


@dataclass
class JoinToken:
    id: str
    sha256: str
    created_at: float
    expires_at: float
    revoked: bool = False
    description: str = ""

    def state(self, now: float) -> str:
        return "revoked" if self.revoked else "expired" if now >= self.expires_at else "valid"


def _parse(token: str) -> tuple[str, str] | None:
    if not token.startswith(TOKEN_PREFIX) or "." not in token:
        return None
    token_id, _, secret = token.removeprefix(TOKEN_PREFIX).partition(".")
    if not token_id.isalnum() or not secret:
        return None
    return token_id, secret


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class JoinTokens:
    """The join tokens in etcd: create (the secret is returned once), list, revoke, check."""

    def __init__(self, store: EtcdStore) -> None:
        self._store = store

    async def create(self, ttl_seconds: float, description: str = "") -> tuple[str, JoinToken]:
        now = time.time()
        if not ttl_seconds > 0:  # NaN too
            raise ValueError("ttl must be a positive number of seconds")
        if not now + ttl_seconds <= durations.LAST_TIMESTAMP_SECONDS:  # its expiry could not be a Timestamp
            raise ValueError("ttl must end before the year 10000")
        token_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
        record = JoinToken(token_id, _digest(secret), now, now + ttl_seconds, False, description)
        await self._store.put_value(f"{DIRECTORY}/{token_id}", json.dumps(asdict(record)).encode())
        return f"{TOKEN_PREFIX}{token_id}.{secret}", record

    async def get(self, token_id: str) -> JoinToken | None:
        raw = await self._store.get_value(f"{DIRECTORY}/{token_id}")
        return None if raw is None else JoinToken(**json.loads(raw))

    async def list(self) -> list[JoinToken]:
        return sorted(
            (JoinToken(**json.loads(raw)) for raw in await self._store.list_values(DIRECTORY)),
            key=lambda t: t.created_at,
        )

    async def revoke(self, token_id: str) -> bool:
        record = await self.get(token_id)
        if record is None:
            return False
        record.revoked = True
        await self._store.put_value(f"{DIRECTORY}/{token_id}", json.dumps(asdict(record)).encode())
        return True

    async def check(self, token: str) -> str:
        """The token's id if it may join now, else raises PermissionError (with the reason for the log)."""
        parsed = _parse(token)
        if parsed is None:
            raise PermissionError("malformed join token")
        token_id, secret = parsed
        record = await self.get(token_id)
        if record is None or not hmac.compare_digest(record.sha256, _digest(secret)):
            raise PermissionError(f"unknown join token {token_id}")
        state = record.state(time.time())
        if state != "valid":
            raise PermissionError(f"join token {token_id} is {state}")
        return token_id


READMITTED = "readmitted"  # the serial of a readmitted node's record: no certificate has it


class NodeIdentities:
    """Which node certificates stand: Join records the serial it signed for a node (the last one wins, so a
    node that joins again invalidates its older certificates), and an operator may revoke a node. A renewal
    records the new serial and keeps the one it replaced standing (until it expires), so the calls a node
    has in flight on connections made with it are not refused. The registry asks `refusal` on every call of
    a node; the records are re-read at most every REVOCATION_REFRESH_SECONDS, so heartbeats cost etcd nothing
    more, and once more before a certificate is refused as superseded (another control plane may have renewed
    it a moment ago)."""

    def __init__(self, store: EtcdStore) -> None:
        self._store = store
        self._cache: dict[str, dict[str, object]] = {}
        self._read_at = -1e9
        self._lock = asyncio.Lock()

    async def _stored(self, node_id: str) -> dict[str, Any] | None:
        """The node's record as etcd holds it now, or None."""
        raw = await self._store.get_value(f"{IDENTITIES}/{node_id}")
        return json.loads(raw) if raw is not None else None

    async def _store_record(self, node_id: str, value: dict[str, Any]) -> None:
        await self._store.put_value(f"{IDENTITIES}/{node_id}", json.dumps(value).encode())
        self._cache[node_id] = value

    async def record(self, node_id: str, serial: int, token_id: str, previous: int | None = None) -> None:
        value: dict[str, Any] = {"node_id": node_id, "serial": str(serial), "token_id": token_id, "revoked": False}
        if previous is not None:
            value["previous"] = str(previous)
        await self._store_record(node_id, value)

    async def renewed(self, node_id: str, serial: int, previous: int) -> None:
        """The node's certificate `previous` was renewed as `serial` (the join token it came with is kept)."""
        stored = await self._stored(node_id)
        await self.record(node_id, serial, str(stored.get("token_id", "")) if stored else "", previous)

    async def revoke(self, node_id: str) -> bool:
        stored = await self._stored(node_id)
        await self._store_record(node_id, {**(stored or {"node_id": node_id, "serial": "", "token_id": ""}),
                                           "revoked": True})  # fmt: skip
        return stored is not None

    async def revoked(self, node_id: str) -> bool:
        """Whether an operator has revoked the node (read from etcd: Join asks before it signs)."""
        stored = await self._stored(node_id)
        return stored is not None and bool(stored.get("revoked"))

    async def readmit(self, node_id: str) -> bool:
        """Lift a revocation: the node may join again with a token. No certificate it held before stands
        again (the record names no serial), so a stolen one stays refused. False if it was not revoked."""
        if not await self.revoked(node_id):
            return False
        await self._store_record(node_id, {"node_id": node_id, "serial": READMITTED, "token_id": "", "revoked": False})
        return True

    async def refusal(self, node_id: str, serial: int) -> str:
        """Why this node's certificate is refused now, or "" when it stands. A node with no record (its
        certificate came from `fleetlm ca issue`, not from Join) stands unless revoked."""
        async with self._lock:
            if time.monotonic() - self._read_at > REVOCATION_REFRESH_SECONDS:
                values = [json.loads(raw) for raw in await self._store.list_values(IDENTITIES)]
                self._cache = {str(v["node_id"]): v for v in values}
                self._read_at = time.monotonic()
        reason = self._judge(node_id, serial)
        if reason and not reason.endswith("is revoked"):  # superseded, as the cache has it: ask etcd itself
            if (stored := await self._stored(node_id)) is not None:
                self._cache[node_id] = stored
            reason = self._judge(node_id, serial)
        return reason

    def _judge(self, node_id: str, serial: int) -> str:
        value = self._cache.get(node_id)
        if value is None:
            return ""
        if value.get("revoked"):
            return f"node {node_id} is revoked"
        if value.get("serial") and str(serial) not in (value["serial"], value.get("previous")):
            return f"node {node_id} has joined again or renewed its certificate since this one was issued"
        return ""


def _csr_name(csr_pem: bytes) -> str | None:
    """The common name a CSR asks for ("" when it has none); None when it is not a CSR."""
    try:
        names = x509.load_pem_x509_csr(csr_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    return str(names[0].value) if names else ""


def _not_after(cert_pem: bytes) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc)
    return stamp


class JoinService(identity_pb2_grpc.JoinServiceServicer):
    def __init__(
        self,
        tokens: JoinTokens,
        ca: FleetCA,
        identities: NodeIdentities,
        cert_days: float = LEAF_DAYS,
        registered: Callable[[str], str | None] = lambda node_id: None,
    ) -> None:
        """`registered(node_id)`: the inference address of a node registered under that id now (its record
        is under a live lease), else None."""
        self._tokens = tokens
        self._identities = identities
        self._ca = ca
        self._days = cert_days
        self._registered = registered

    async def _sign(
        self, csr_pem: bytes, node_id: str, context: grpc.aio.ServicerContext, token_id: str, renewing: int = 0
    ) -> identity_pb2.JoinResponse:
        try:
            cert = await asyncio.to_thread(
                self._ca.sign_csr, csr_pem, identity_uri("node", node_id), [node_dns_name(node_id)], self._days
            )
        except ValueError as exc:
            raise invalid("csr_pem", f"csr_pem: {exc}") from None
        serial = x509.load_pem_x509_certificate(cert).serial_number
        if renewing:
            await self._identities.renewed(node_id, serial, renewing)
        else:
            await self._identities.record(node_id, serial, token_id)
        return identity_pb2.JoinResponse(
            certificate_pem=cert, ca_certificate_pem=self._ca.cert_pem, not_after=_not_after(cert)
        )

    async def Join(
        self, request: identity_pb2.JoinRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.JoinResponse:
        node_id = request.node_id
        try:
            check_identity_name("node", node_id)
        except ValueError as exc:
            raise invalid("node_id", f"node_id: {exc}") from None
        try:
            token_id = await self._tokens.check(request.token)
        except PermissionError as exc:
            log.warning("join refused for node %s: %s", node_id, exc)  # the token's id at most, never its secret
            raise FleetError(ErrorCode.UNAUTHENTICATED, "invalid, expired or revoked join token") from None
        # A token admits a new node, not one the operator has shut out, nor a second node under the id of one
        # that is running (two hosts of one name): its new certificate would lock the running node out.
        if await self._identities.revoked(node_id):
            log.warning("join refused for node %s: it is revoked", node_id)
            raise FleetError(
                ErrorCode.PERMISSION_DENIED,
                f"node {node_id} is revoked; an operator can let it join again: fleetlm ca readmit --node {node_id}",
            )
        address = self._registered(node_id)
        if address is not None:
            log.warning("join refused for node %s: a node registered under that id is running (%s)", node_id, address)
            raise FleetError(
                ErrorCode.NODE_ID_IN_USE,
                f"a node registered as {node_id} is running ({address}); give this one another --node-id, or stop"
                " that one (its registration lapses with its lease)",
                param="node_id",
            )
        reply = await self._sign(request.csr_pem, node_id, context, token_id)
        log.info("node %s joined with join token %s", node_id, token_id)
        return reply

    async def Renew(
        self, request: identity_pb2.RenewRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.RenewResponse:
        nodes = [i for i in peer_identities(context) if i.startswith(identity_uri("node", "x")[:-1])]
        if not nodes:
            raise FleetError(ErrorCode.UNAUTHENTICATED, "Renew needs the node's fleet certificate")
        node_id = nodes[0].rsplit("/", 1)[1]
        pems = context.auth_context().get("x509_pem_cert") or []
        serial = x509.load_pem_x509_certificate(pems[0]).serial_number if pems else 0
        reason = await self._identities.refusal(node_id, serial)
        if reason:
            log.warning("renewal refused for node %s: %s", node_id, reason)
            raise FleetError(ErrorCode.PERMISSION_DENIED, reason)
        asked = _csr_name(request.csr_pem)
        if asked is None:
            raise invalid("csr_pem", "csr_pem: not a PEM certificate signing request")
        if asked != node_id:
            log.warning("renewal refused for node %s: its CSR names %r", node_id, asked)
            raise FleetError(
                ErrorCode.PERMISSION_DENIED, f"this certificate is node {node_id}'s; the CSR asks for {asked!r}"
            )
        signed = await self._sign(request.csr_pem, node_id, context, "", renewing=serial)
        log.info("node %s renewed its certificate", node_id)
        return identity_pb2.RenewResponse(
            certificate_pem=signed.certificate_pem,
            ca_certificate_pem=signed.ca_certificate_pem,
            not_after=signed.not_after,
        )


_STATES = {
    "valid": admin_pb2.JOIN_TOKEN_STATE_VALID,
    "expired": admin_pb2.JOIN_TOKEN_STATE_EXPIRED,
    "revoked": admin_pb2.JOIN_TOKEN_STATE_REVOKED,
}


def _described(token: JoinToken) -> admin_pb2.JoinToken:
    described = admin_pb2.JoinToken(id=token.id, state=_STATES[token.state(time.time())], description=token.description)
    described.created_at.FromNanoseconds(int(token.created_at * 1e9))
    # A token stored before CreateJoinToken refused a ttl past the year 9999 still lists.
    described.expires_at.FromNanoseconds(int(min(token.expires_at, durations.LAST_TIMESTAMP_SECONDS) * 1e9))
    return described


class JoinTokenAdmin:
    """AdminService's join-token RPCs, mixed into the control plane's AdminService servicer (whatever guards
    AdminService guards them too). Any control plane may answer: a token is a record of its own in etcd, not
    placement state, so it needs no leader."""

    join_tokens: JoinTokens | None = None
    ca_fingerprint = ""

    async def _tokens(self, context: grpc.aio.ServicerContext) -> JoinTokens:
        if self.join_tokens is None or not self.ca_fingerprint:
            raise FleetError(ErrorCode.NOT_CONFIGURED, "this control plane has no fleet CA to join with (--ca-dir)")
        assert self.join_tokens is not None
        return self.join_tokens

    async def CreateJoinToken(
        self, request: admin_pb2.CreateJoinTokenRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateJoinTokenResponse:
        tokens = await self._tokens(context)
        if request.HasField("ttl") and not durations.in_range(request.ttl):  # ToTimedelta would overflow
            raise invalid("ttl", f"ttl must be at most {durations.MAX_SECONDS} s")
        ttl = request.ttl.ToTimedelta().total_seconds() if request.HasField("ttl") else 3600.0
        try:
            token, record = await tokens.create(ttl, request.description)
        except ValueError as exc:  # the ttl, checked before anything is stored
            raise invalid("ttl", str(exc)) from None
        log.info("join token %s created (expires %s)", record.id, utc(record.expires_at))
        return admin_pb2.CreateJoinTokenResponse(
            token=token, join_token=_described(record), ca_fingerprint=self.ca_fingerprint
        )

    async def ListJoinTokens(
        self, request: admin_pb2.ListJoinTokensRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListJoinTokensResponse:
        tokens = await self._tokens(context)
        return admin_pb2.ListJoinTokensResponse(join_tokens=[_described(t) for t in await tokens.list()])

    async def RevokeJoinToken(
        self, request: admin_pb2.RevokeJoinTokenRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeJoinTokenResponse:
        required(request.id, "id")
        tokens = await self._tokens(context)
        token_id = request.id.removeprefix(TOKEN_PREFIX).split(".")[0]
        if not token_id.isalnum() or not await tokens.revoke(token_id):
            raise FleetError(ErrorCode.JOIN_TOKEN_NOT_FOUND, f"no join token {token_id!r}", param="id")
        record = await tokens.get(token_id)
        assert record is not None
        log.info("join token %s revoked", token_id)
        return admin_pb2.RevokeJoinTokenResponse(join_token=_described(record))


def utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
