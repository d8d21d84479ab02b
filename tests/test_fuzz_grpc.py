"""Generated protobuf messages, random bytes and truncated messages against every gRPC method of every
service the fleet's servers offer (found by their reflection): the edge's and the node's
InferenceService, the control plane's AdminService, RoutingService, NodeRegistryService and whatever
else it serves. No answer may be INTERNAL or UNKNOWN (an error nobody classified: a bug), and every
server must still answer its health check afterwards.

The messages come from Hypothesis strategies built from the message descriptors (hypothesis-pb pins
protobuf < 4): scalars over their whole range, enums with unknown values too, nested messages, repeated
fields, maps and oneofs. Strings are sometimes names the fleet knows (its model, its node), so that
requests reach past "not found". Each call goes through a generic channel method with bytes in and out,
so the same path sends what the generated stubs never would.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fleetlm
from tests.cluster import MODEL, Cluster, Proc, smollm_entry

GENERATED_PER_METHOD = 60
RAW_PER_METHOD = 25  # random bytes, and as many valid messages cut short
CALL_TIMEOUT = 3.0  # a streaming method that stays open ends with DEADLINE_EXCEEDED, which is fine
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
NODE_ID = "fuzz-node"
MAX_DEPTH = 3

# --- Hypothesis strategies from message descriptors -------------------------------------------------

_I32, _I64 = (-(2**31), 2**31 - 1), (-(2**63), 2**63 - 1)
_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: st.integers(*_I32),
    FieldDescriptor.TYPE_SINT32: st.integers(*_I32),
    FieldDescriptor.TYPE_SFIXED32: st.integers(*_I32),
    FieldDescriptor.TYPE_INT64: st.integers(*_I64),
    FieldDescriptor.TYPE_SINT64: st.integers(*_I64),
    FieldDescriptor.TYPE_SFIXED64: st.integers(*_I64),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
}
KNOWN_NAMES = ["", MODEL, NODE_ID, "user", "assistant", "127.0.0.1:1"]


def _strings() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(KNOWN_NAMES), st.text(max_size=64))


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """One value of `field` (an element, for a repeated field)."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = st.sampled_from([v.number for v in field.enum_type.values])
        if field.enum_type.is_closed:
            return known
        return st.one_of(known, st.integers(*_I32))  # open enums keep unknown numbers
    if field.type == FieldDescriptor.TYPE_STRING:
        return _strings()
    return _SCALARS[field.type]


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _set(draw: Any, message: Any, field: FieldDescriptor, depth: int) -> None:
    target = getattr(message, field.name) if field.is_repeated else None
    if _is_map(field):
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        entries = draw(st.dictionaries(_value(key, depth), _value(value, depth), max_size=3))
        for k, v in entries.items():
            if value.type == FieldDescriptor.TYPE_MESSAGE:
                target[k].CopyFrom(v)  # type: ignore[index]
            else:
                target[k] = v  # type: ignore[index]
    elif target is not None:
        values = draw(st.lists(_value(field, depth), max_size=3))
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for v in values:
                target.add().CopyFrom(v)
        else:
            target.extend(values)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(draw(_value(field, depth)))
    else:
        setattr(message, field.name, draw(_value(field, depth)))


@st.composite
def messages(draw: Any, descriptor: Descriptor, depth: int = 0) -> Any:
    """A message of type `descriptor`: each field set or not; one field (or none) of each oneof."""
    message = message_factory.GetMessageClass(descriptor)()
    if depth > MAX_DEPTH:
        return message
    in_oneof = set()
    for oneof in descriptor.oneofs:
        if len(oneof.fields) > 1:  # a proto3 `optional` is a oneof of one field: drawn as any field
            in_oneof.update(f.name for f in oneof.fields)
            chosen = draw(st.sampled_from([None, *oneof.fields]))
            if chosen is not None:
                _set(draw, message, chosen, depth)
    for field in descriptor.fields:
        if field.name not in in_oneof and draw(st.booleans()):
            _set(draw, message, field, depth)
    return message


# --- the fleet and its methods -----------------------------------------------------------------------


@dataclass
class Server:
    name: str
    address: str
    proc: Proc


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """A fleet of its own (the fuzzer deploys, drains and registers nonsense): etcd, a control plane, a
    node serving SmolLM2, an edge."""
    cluster = Cluster(tmp_path_factory.mktemp("fuzz-grpc"))
    try:
        cluster.start_etcd()
        cluster.start_controlplane(lease_ttl=3)
        node, node_address = cluster.start_node(NODE_ID, [smollm_entry()])
        edge, http, edge_grpc = cluster.start_edge()
        cluster.wait_model_state(http, MODEL)
        controlplane = next(p for p in cluster.procs if p.name == "controlplane")
        yield [
            Server("edge", edge_grpc, edge),
            Server("node", node_address, node),
            Server("controlplane", cluster.controlplane, controlplane),
        ]
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


_SKIPPED_SERVICES = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def _fleetlm_descriptors() -> dict[str, Any]:
    """Every service fleetlm's generated modules define, by full name."""
    services: dict[str, Any] = {}
    for module in pkgutil.walk_packages(fleetlm.__path__, "fleetlm."):
        if module.name.endswith("_pb2"):
            for service in importlib.import_module(module.name).DESCRIPTOR.services_by_name.values():
                services[service.full_name] = service
    return services


def methods_of(server: Server) -> list[MethodDescriptor]:
    """Every method of every service the server offers (its reflection says which), health and
    reflection aside."""
    known = _fleetlm_descriptors()
    with grpc.insecure_channel(server.address) as channel:
        offered = set(ProtoReflectionDescriptorDatabase(channel).get_services()) - _SKIPPED_SERVICES
    unknown = offered - set(known)
    assert not unknown, f"{server.name} offers services with no descriptor here: {unknown}"
    return [method for name in sorted(offered) for method in known[name].methods]


def call(channel: grpc.Channel, method: MethodDescriptor, payload: bytes) -> grpc.StatusCode:
    """Send `payload` as the request of `method` (one message on a client stream); the status, after at most
    one response of a server stream."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    raw = {"request_serializer": None, "response_deserializer": None}
    try:
        if method.client_streaming and method.server_streaming:
            responses = channel.stream_stream(path, **raw)(iter([payload]), timeout=CALL_TIMEOUT)
        elif method.server_streaming:
            responses = channel.unary_stream(path, **raw)(payload, timeout=CALL_TIMEOUT)
        elif method.client_streaming:
            channel.stream_unary(path, **raw)(iter([payload]), timeout=CALL_TIMEOUT)
            return grpc.StatusCode.OK
        else:
            channel.unary_unary(path, **raw)(payload, timeout=CALL_TIMEOUT)
            return grpc.StatusCode.OK
        next(responses, None)  # the first answer or the status; a watch stream then waits for changes
        responses.cancel()
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]


def _run(strategy: st.SearchStrategy[Any], examples: int, body: Callable[[Any], None]) -> None:
    """`body` on `examples` values of `strategy` (no deadline: calls to a busy fleet vary in time)."""

    @given(strategy)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def one(value: Any) -> None:
        body(value)

    one()


def _still_serving(server: Server) -> None:
    assert server.proc.popen.poll() is None, f"{server.name} exited:\n{server.proc.log_text()}"
    # An exception nobody classified may also be answered with a classified status (an engine failure is
    # UNAVAILABLE): none may have been logged with its traceback either.
    log = server.proc.log_path.read_text(errors="replace")
    assert "Traceback" not in log, f"{server.name} logged an exception:\n{log[log.index('Traceback') - 300 :][:3000]}"
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _report(title: str, counts: Counter[str], statuses: Counter[str], bad: list[str], took: float) -> None:
    print(f"\n{title}: {sum(counts.values())} calls in {took:.0f} s; statuses {dict(statuses.most_common())}")
    for key, count in sorted(counts.items()):
        print(f"  {key}: {count}")
    assert not bad, "INTERNAL/UNKNOWN answers:\n" + "\n".join(bad[:20])


@pytest.mark.cluster
@pytest.mark.model
@pytest.mark.parametrize("which", ["edge", "node", "controlplane"])
def test_generated_messages_get_no_internal_error(
    fleet: list[Server], which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    server = next(s for s in fleet if s.name == which)
    counts: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    bad: list[str] = []
    started = time.monotonic()
    with grpc.insecure_channel(server.address) as channel:
        for method in methods_of(server):

            def send(request: Any, method: MethodDescriptor = method) -> None:
                code = call(channel, method, request.SerializeToString())
                counts[f"{method.containing_service.name}/{method.name}"] += 1
                statuses[code.name] += 1
                if code in BAD:
                    bad.append(f"{method.full_name} {code.name}: {request}")

            _run(messages(method.input_type), GENERATED_PER_METHOD, send)
    with capsys.disabled():
        _report(f"generated messages to the {which}", counts, statuses, bad, time.monotonic() - started)
    _still_serving(server)
    assert len(counts) >= {"edge": 4, "node": 4, "controlplane": 20}[which]


@pytest.mark.cluster
@pytest.mark.model
def test_random_and_truncated_bytes_get_no_internal_error(
    fleet: list[Server], capsys: pytest.CaptureFixture[str]
) -> None:
    counts: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    bad: list[str] = []
    started = time.monotonic()
    for server in fleet:
        with grpc.insecure_channel(server.address) as channel:
            for method in methods_of(server):
                random = st.binary(min_size=1, max_size=256).map(lambda b: ("random", b))
                truncated = st.tuples(messages(method.input_type), st.floats(0, 1)).map(
                    lambda m: ("truncated", m[0].SerializeToString()[: int(m[0].ByteSize() * m[1])])
                )

                def send(case: tuple[str, bytes], method: MethodDescriptor = method, server: Server = server) -> None:
                    kind, payload = case
                    code = call(channel, method, payload)
                    counts[f"{server.name} {kind}"] += 1
                    statuses[code.name] += 1
                    if code in BAD:
                        bad.append(f"{server.name} {method.full_name} {code.name}: {payload!r}")

                _run(st.one_of(random, truncated), 2 * RAW_PER_METHOD, send)
    with capsys.disabled():
        _report("random and truncated bytes", counts, statuses, bad, time.monotonic() - started)
    for server in fleet:
        _still_serving(server)
