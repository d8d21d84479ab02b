"""API keys at the edge: who may call, which models, and how much (fleet-wide limits).

One EdgeAuth per edge, shared by HTTP and gRPC. A request is admitted in three steps, all in memory in the
steady state:
1. the key: HMAC of the presented key, looked up in the key table (edge.key_table) -> 401 invalid_api_key;
2. the model: not in the key's list -> 403 model_not_allowed;
3. the limits, against allowance leased from the leader (controlplane.quota) -> 429 rate_limit_exceeded.

Requests per minute: the edge holds a chunk of requests granted by the leader and asks for the next chunk
when half of it is used, in the background; only when it holds none does a request wait for the lease (one
round trip). Tokens per minute: charged after the reply, reported with the next lease; when the fleet's window
has no tokens left, requests are refused until it turns. Concurrency: this edge's in-flight requests of the
key plus the other edges' as the leader last reported them.

When no control plane answers a lease, the edge limits the key on its own to limit / N (N = the edges that
shared the key at the last answer, 1 if none did), in a local minute window, until a lease succeeds again.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import time
import weakref
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from controlplane.quota import WINDOW_SECONDS, chunk_size
from edge import access_log
from edge.key_table import KeyFeed, KeyTable
from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc
from mesh.auth import bearer, edge_credential
from mesh.errors import ErrorCode, FleetError

log = logging.getLogger(__name__)

LEASE_TIMEOUT_SECONDS = 3.0
REPORT_INTERVAL_SECONDS = 0.5  # tokens and in-flight counts go to the leader at most this often per key


def _reset_text(seconds: float) -> str:
    """OpenAI's duration format for x-ratelimit-reset-*: '1s', '6m0s', '0.5s'."""
    seconds = max(0.0, seconds)
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60)}s"
    return f"{round(seconds, 1):g}s"


@dataclass
class _KeyQuota:
    """This edge's state of one key's limits."""

    allowance: int = 0  # requests granted by the leader and not yet admitted
    window_ends: float = 0.0  # monotonic time the leader's window turns (grants expire with it)
    fleet_requests_left: int = 0
    fleet_tokens_left: int = 0
    others_in_flight: int = 0
    edges: int = 1
    in_flight: int = 0
    unreported_tokens: int = 0
    reported_at: float = 0.0
    local: bool = False  # no control plane answered: counting on our own
    local_requests: int = 0
    local_tokens: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    refilling: asyncio.Task[None] | None = None


@dataclass
class Admission:
    """An admitted request: the headers its response carries, and what to charge when it ends."""

    auth: EdgeAuth | None
    key: admin_pb2.ApiKey | None
    headers: dict[str, str]
    tokens: int = 0  # charged so far, to the key when the request ends
    _done: bool = False

    def charge(self, tokens: int) -> None:
        """Tokens the request used: at its end with the rest, or at once when it has ended (a stream cut
        before its result, whose prompt is counted after it)."""
        if self.auth is None or self.key is None or tokens <= 0:
            return
        if self._done:
            self.auth.charge(self.key, tokens)
        else:
            self.tokens += tokens

    def counts_tokens(self) -> bool:
        """Whether the key has a limit on tokens (the only use of a count that costs a call to make)."""
        return self.key is not None and bool(self.key.limits.tokens_per_minute)

    def finish(self) -> None:
        """The request ended: it leaves the key's requests at once, and its tokens are charged."""
        if self._done or self.auth is None or self.key is None:
            return
        self._done = True
        self.auth.finish(self.key, self.tokens)


OPEN = Admission(None, None, {})
current: contextvars.ContextVar[Admission] = contextvars.ContextVar("fleetlm_admission", default=OPEN)


class EdgeAuth:
    def __init__(
        self, fleet_secret: bytes, channels: Sequence[grpc.aio.Channel], edge_id: str, required: bool = True
    ) -> None:
        self.required = required
        self.table = KeyTable(fleet_secret)
        credential = edge_credential(fleet_secret)
        self.feed = KeyFeed(self.table, channels, edge_id, credential)
        self._channels = list(channels)
        self._edge_id = edge_id
        self._metadata = (("authorization", f"Bearer {credential}"),)
        self._quotas: dict[str, _KeyQuota] = {}
        self._turn = 0

    # --- the check -----------------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None, model: str | None) -> admin_pb2.ApiKey:
        """Steps 1 and 2: the key (401) and the model (403). `authorization` is the header's value."""
        key = self.table.check(bearer((("authorization", authorization),)) if authorization else None)
        if model is not None and key.models and model not in key.models:
            raise FleetError(
                ErrorCode.MODEL_NOT_ALLOWED,
                f"this API key may not use model '{model}'",
                param="model",
            )
        return key

    def may_use(self, key: admin_pb2.ApiKey | None, model: str) -> bool:
        return key is None or not key.models or model in key.models

    async def admit(self, authorization: str | None, model: str | None) -> Admission:
        """The whole check, or the FleetError to answer with (a 429 carries the x-ratelimit headers)."""
        if not self.required:
            return OPEN
        return await self.admit_key(self.authenticate(authorization, model))

    async def admit_key(self, key: admin_pb2.ApiKey) -> Admission:
        """Step 3, for an authenticated key: its limits."""
        limits = key.limits
        if not (limits.requests_per_minute or limits.tokens_per_minute or limits.max_concurrent_requests):
            return Admission(self, key, {})  # no limits: nothing to count
        q = self._quotas.setdefault(key.id, _KeyQuota())
        now = time.monotonic()
        if now >= q.window_ends:
            q.allowance = 0  # a grant is good only in the window it came from
        if limits.max_concurrent_requests and q.in_flight + q.others_in_flight >= limits.max_concurrent_requests:
            raise self._refused(key, q, "concurrent requests", 1)
        if limits.tokens_per_minute and self._tokens_left(key, q) <= 0:
            raise self._refused(key, q, "tokens per minute", q.window_ends - now)
        if limits.requests_per_minute:
            if q.allowance <= 0:
                async with q.lock:
                    if q.allowance <= 0:
                        await self._lease(key, q)
            if q.allowance <= 0:
                raise self._refused(key, q, "requests per minute", q.window_ends - time.monotonic())
            q.allowance -= 1
            if q.local:
                q.local_requests += 1
            if q.allowance <= chunk_size(limits.requests_per_minute) // 2:
                self._refill_soon(key, q)
        elif now - q.reported_at > REPORT_INTERVAL_SECONDS:
            self._refill_soon(key, q)  # only a report: tokens and concurrency
        q.in_flight += 1
        return Admission(self, key, self._headers(key, q))

    def finish(self, key: admin_pb2.ApiKey, tokens: int) -> None:
        q = self._quotas.get(key.id)
        if q is None:
            return
        q.in_flight = max(0, q.in_flight - 1)
        self._charged(key, q, tokens)
        # A concurrency limit: the others must hear that this request ended, or they would count it until
        # this edge's next lease.
        if key.limits.max_concurrent_requests or time.monotonic() - q.reported_at > REPORT_INTERVAL_SECONDS:
            self._refill_soon(key, q)

    def charge(self, key: admin_pb2.ApiKey, tokens: int) -> None:
        """Tokens of a request that has ended (finish), counted after it."""
        q = self._quotas.get(key.id)
        if q is not None:
            self._charged(key, q, tokens)

    def _charged(self, key: admin_pb2.ApiKey, q: _KeyQuota, tokens: int) -> None:
        q.unreported_tokens += max(0, tokens)
        if q.local:
            q.local_tokens += max(0, tokens)
        if key.limits.tokens_per_minute:
            q.fleet_tokens_left = max(0, q.fleet_tokens_left - max(0, tokens))

    # --- limits --------------------------------------------------------------------------------------------

    def _tokens_left(self, key: admin_pb2.ApiKey, q: _KeyQuota) -> int:
        tpm = key.limits.tokens_per_minute
        if q.window_ends == 0.0:
            return tpm  # nothing known yet: the first request goes, its tokens are charged after
        if time.monotonic() >= q.window_ends:
            return tpm if q.local else max(q.fleet_tokens_left, 1)  # a new window: let the lease say
        if q.local:
            return tpm // max(1, q.edges) - q.local_tokens
        return q.fleet_tokens_left

    def _refill_soon(self, key: admin_pb2.ApiKey, q: _KeyQuota) -> None:
        if q.refilling is None or q.refilling.done():
            q.refilling = asyncio.get_running_loop().create_task(self._refill(key, q))

    async def _refill(self, key: admin_pb2.ApiKey, q: _KeyQuota) -> None:
        async with q.lock:
            try:
                await self._lease(key, q)
            except Exception:  # a background refill never fails a request; the next one tries again
                log.exception("API key %s: quota refill failed", key.id)

    async def _lease(self, key: admin_pb2.ApiKey, q: _KeyQuota) -> None:
        """One AcquireQuota: a chunk of requests, reporting tokens and in-flight; on no answer, local limits."""
        rpm = key.limits.requests_per_minute
        want = chunk_size(rpm) if rpm else 0
        request = admin_pb2.AcquireQuotaRequest(
            edge_id=self._edge_id,
            key_id=key.id,
            requests=max(0, want - q.allowance) if rpm else 0,
            tokens_used=q.unreported_tokens,
            in_flight=q.in_flight,
        )
        reply = await self._ask(request)
        now = time.monotonic()
        q.reported_at = now
        if reply is None:
            self._local(key, q, now)
            return
        q.unreported_tokens -= request.tokens_used
        q.local = False
        if now >= q.window_ends or reply.reset_seconds > q.window_ends - now + 1:
            q.allowance = 0  # the leader's window turned: older grants are void
        q.allowance += reply.requests_granted
        q.window_ends = now + reply.reset_seconds
        q.fleet_requests_left = reply.requests_remaining
        q.fleet_tokens_left = reply.tokens_remaining - q.unreported_tokens if key.limits.tokens_per_minute else 0
        q.others_in_flight = reply.others_in_flight
        q.edges = max(1, reply.edges)

    def _local(self, key: admin_pb2.ApiKey, q: _KeyQuota, now: float) -> None:
        """No control plane: this edge's share, limit / N, in a minute window of its own."""
        if not q.local or now >= q.window_ends:
            q.local, q.window_ends, q.local_requests, q.local_tokens = True, now + WINDOW_SECONDS, 0, 0
        rpm = key.limits.requests_per_minute
        share = max(1, rpm // max(1, q.edges)) if rpm else 0
        q.allowance = max(0, share - q.local_requests)
        q.others_in_flight = 0

    async def _ask(self, request: admin_pb2.AcquireQuotaRequest) -> admin_pb2.AcquireQuotaResponse | None:
        for i in range(len(self._channels)):
            turn = (self._turn + i) % len(self._channels)
            stub = admin_pb2_grpc.AdminServiceStub(self._channels[turn])
            try:
                reply = await stub.AcquireQuota(request, timeout=LEASE_TIMEOUT_SECONDS, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                sent = FleetError.sent_by_peer(exc)
                if sent is not None and sent.code == ErrorCode.API_KEY_NOT_FOUND:
                    return None  # that control plane has not seen the key yet: ask the next
                continue
            self._turn = turn
            return reply  # type: ignore[no-any-return]
        return None

    def _headers(self, key: admin_pb2.ApiKey, q: _KeyQuota) -> dict[str, str]:
        limits = key.limits
        reset = _reset_text(q.window_ends - time.monotonic()) if q.window_ends else _reset_text(WINDOW_SECONDS)
        headers: dict[str, str] = {}
        if limits.requests_per_minute:
            left = q.allowance + (0 if q.local else q.fleet_requests_left)
            headers["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
            headers["x-ratelimit-remaining-requests"] = str(min(limits.requests_per_minute, max(0, left)))
            headers["x-ratelimit-reset-requests"] = reset
        if limits.tokens_per_minute:
            headers["x-ratelimit-limit-tokens"] = str(limits.tokens_per_minute)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, self._tokens_left(key, q)))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers

    def _refused(self, key: admin_pb2.ApiKey, q: _KeyQuota, what: str, retry_after: float) -> FleetError:
        headers = self._headers(key, q)
        return FleetError(
            ErrorCode.RATE_LIMIT_EXCEEDED,
            f"Rate limit reached for this API key on {what}; retry after {_reset_text(retry_after)}.",
            metadata=headers,
            retry_after_seconds=max(1, math.ceil(retry_after)),
        )


def authorization_header(scope: MutableMapping[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return bytes(value).decode("latin-1")
    return None


# Each gateway's EdgeAuth and the task of its key feed (held here: a task nobody references may be collected),
# kept beside the gateway rather than in attributes of its own.
_BY_GATEWAY: weakref.WeakKeyDictionary[Any, tuple[EdgeAuth | None, asyncio.Task[None] | None]] = (
    weakref.WeakKeyDictionary()
)


def for_gateway(gateway: Any) -> EdgeAuth | None:
    """The edge's one EdgeAuth, shared by its HTTP app and its gRPC service, made on first call from
    EdgeSettings (FLEETLM_EDGE_REQUIRE_API_KEY, FLEETLM_EDGE_AUTH_SECRET_FILE), its key feed started on the
    running loop. None when keys are not required. Interim: edge.server should make it from its settings
    and run the feed in its task group."""
    if gateway in _BY_GATEWAY:
        return _BY_GATEWAY[gateway][0]
    from edge.settings import EdgeSettings
    from mesh.auth import read_secret_file

    settings = EdgeSettings(**{})  # from the environment alone
    auth, task = None, None
    if settings.require_api_key:
        if settings.auth_secret_file is None:
            raise SystemExit("fleetlm edge: --require-api-key needs --auth-secret-file")
        secret = read_secret_file(settings.auth_secret_file, "auth secret")
        auth = EdgeAuth(secret, gateway.controlplane_channels, gateway.feed.edge_id)
        task = asyncio.get_running_loop().create_task(auth.feed.run())
    _BY_GATEWAY[gateway] = (auth, task)
    return auth


# --- HTTP ------------------------------------------------------------------------------------------------------


@dataclass
class _HttpCall:
    """One HTTP request's auth state, shared by the middleware and the route that serves it."""

    auth: EdgeAuth
    key: admin_pb2.ApiKey
    headers: dict[str, str] = field(default_factory=dict)
    admission: Admission | None = None


_http_call: contextvars.ContextVar[_HttpCall | None] = contextvars.ContextVar("fleetlm_http_call", default=None)


async def admit_model(model: str) -> None:
    """Steps 2 and 3 for an HTTP route once it knows the model; no-op when keys are not required. A refusal
    is raised as FleetError, its x-ratelimit headers put on the response by ApiKeyMiddleware."""
    call = _http_call.get()
    if call is None:
        return
    if not call.auth.may_use(call.key, model):
        raise FleetError(ErrorCode.MODEL_NOT_ALLOWED, f"this API key may not use model '{model}'", param="model")
    try:
        call.admission = await call.auth.admit_key(call.key)
    except FleetError as error:
        call.headers.update({k: v for k, v in error.metadata.items() if k.startswith("x-ratelimit-")})
        raise
    call.headers.update(call.admission.headers)


def concurrency_limit() -> int:
    """The current HTTP request's key's limit on requests at once; 0 when it has none or keys are off. A
    request of several prompts (edge.prompt_batch) runs at most that many of them at a time: it is one
    request to the limit, but it must not hold more of the fleet at once than the key's requests may."""
    call = _http_call.get()
    return 0 if call is None or call.key is None else int(call.key.limits.max_concurrent_requests)


def admission() -> Admission:
    """The current request's admission, over either transport (OPEN when keys are off or it was not admitted):
    HTTP's from ApiKeyMiddleware's call, gRPC's from admit_grpc."""
    call = _http_call.get()
    if call is not None:
        return call.admission or OPEN
    return current.get()


def charge(tokens: int) -> None:
    """Tokens the current request used (its usage, or what a stream cut before its result was sent), charged
    to its key."""
    admission().charge(tokens)


def visible_models(names: list[str]) -> list[str]:
    """The models the request's key may use (all of them when keys are not required)."""
    call = _http_call.get()
    return names if call is None else [n for n in names if call.auth.may_use(call.key, n)]


# Routes about a model outside /v1: vLLM's and SGLang's tokenizer routes.
KEYED_PATHS = frozenset({"/tokenize", "/detokenize"})


def needs_key(path: str) -> bool:
    """Whether an HTTP path needs an API key (when the edge requires keys): the routes that use a model."""
    return path.startswith("/v1/") or path in KEYED_PATHS


class ApiKeyMiddleware:
    """ASGI: every /v1 request (and /tokenize, /detokenize) needs a valid key (401 in OpenAI's shape
    otherwise); the route admits it for its model (admit_model) and charges its tokens (charge). Other
    paths (/health, /docs) stay open."""

    def __init__(self, app: Any, auth: EdgeAuth | None) -> None:
        self._app = app
        self._auth = auth

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        auth = self._auth
        if auth is None or scope["type"] != "http" or not needs_key(scope["path"]):
            await self._app(scope, receive, send)
            return
        try:
            key = auth.authenticate(authorization_header(scope), None)
        except FleetError as error:
            access_log.note_error(error.code)
            body = json.dumps(error.openai_body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers.append((b"www-authenticate", b"Bearer"))
            await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        call = _http_call_new(auth, key)
        token = _http_call.set(call)

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start" and call.headers:
                extra = [(k.encode(), v.encode()) for k, v in call.headers.items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self._app(scope, receive, send_with_headers)
        finally:
            _http_call.reset(token)
            if call.admission is not None:
                call.admission.finish()


def _http_call_new(auth: EdgeAuth, key: admin_pb2.ApiKey) -> _HttpCall:
    return _HttpCall(auth, key)


# --- gRPC ------------------------------------------------------------------------------------------------------


async def admit_grpc(auth: EdgeAuth | None, context: Any, model: str) -> Admission:
    """The whole check for a gRPC call (`authorization: Bearer <key>` metadata); OPEN when not required."""
    if auth is None:
        return OPEN
    metadata = context.invocation_metadata() or ()
    value = next((v for k, v in metadata if k == "authorization"), None)
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    admission = await auth.admit(text, model)
    current.set(admission)  # the handler's context: Generation charges a cut stream's tokens to it (charge)
    return admission
