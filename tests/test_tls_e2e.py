"""A whole fleet over TLS: etcd, a control plane with mutual TLS, a node that joined with a join token and
serves the real SmolLM2 model, and an edge that speaks HTTPS to the official `openai` client (which trusts
the fleet CA and has no certificate of its own) and mutual TLS to the control plane and the node (checking
that the node answering is the node the routing table names)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from cryptography import x509

from edge.node_multiplex import NodeLink
from fleetlm.controlplane.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    node_pb2,
    registry_pb2,
    registry_pb2_grpc,
    routing_pb2,
    routing_pb2_grpc,
)
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc, multiplex_pb2_grpc
from mesh.channels import CHANNEL_OPTIONS
from mesh.fleet_ca import node_dns_name
from mesh.tls import TlsFiles, secure_channel
from tests.cluster import MODEL, START_TIMEOUT, Cluster, smollm_entry, wait_for
from tests.test_join import join_token, node_ids

pytestmark = [pytest.mark.cluster]

ROTATION_BOUND = 30  # the edge re-reads its files every 2 s; generous for a busy machine


class Fleet:
    def __init__(self, cluster: Cluster, http: str, grpc_address: str) -> None:
        self.cluster = cluster
        self.http = http
        self.grpc = grpc_address


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    cluster = Cluster(tmp_path_factory.mktemp("tls-e2e"), tls=True)
    try:
        cluster.start_etcd()
        cluster.start_controlplane(lease_ttl=3)
        token, pin, _ = join_token(cluster, "--ttl", "600")
        cluster.start_node(
            "tls-node",
            [smollm_entry()],
            extra=(
                "--state-dir",
                str(cluster.dir / "state-tls-node"),
                "--join-token",
                token,
                "--ca-fingerprint",
                pin,
                "--join-address",
                cluster.join_address,
            ),
        )
        wait_for(lambda: "tls-node" in node_ids(cluster), START_TIMEOUT, "the node to register")
        _, http, grpc_address = cluster.start_edge()
        yield Fleet(cluster, http, grpc_address)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def _client(fleet: Fleet) -> openai.OpenAI:
    trust = ssl.create_default_context(cafile=str(fleet.cluster.ca_dir / "ca.crt"))
    return openai.OpenAI(
        base_url=f"{fleet.http}/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(verify=trust, timeout=120),
    )


def test_the_openai_client_chats_over_https_through_mutual_tls_links(fleet: Fleet) -> None:
    assert fleet.http.startswith("https://")
    client = _client(fleet)
    # Ready, not only listed: while the replica loads a request is a 503.
    fleet.cluster.wait_model_state(fleet.http, MODEL, timeout=START_TIMEOUT)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens > 0
    # Plaintext HTTP to the HTTPS port gets no answer in HTTP.
    with pytest.raises(httpx.HTTPError):
        httpx.get(fleet.http.replace("https://", "http://") + "/health", timeout=10)
    # A client that does not trust the fleet CA refuses the edge.
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=f"{fleet.http}/v1", api_key="unused", max_retries=0).models.list()


def test_the_edges_grpc_needs_no_client_certificate_and_refuses_plaintext(fleet: Fleet) -> None:
    ca = (fleet.cluster.ca_dir / "ca.crt").read_bytes()
    request = inference_pb2.GenerateRequest(model=MODEL, prompt="The sky is")
    request.sampling.max_tokens = 4
    with grpc.secure_channel(fleet.grpc, grpc.ssl_channel_credentials(ca)) as channel:
        texts = [r.delta.text for r in inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=120)]
    assert "".join(texts)
    with grpc.insecure_channel(fleet.grpc) as channel, pytest.raises(grpc.RpcError) as plaintext:
        list(inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=10))
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE


def _https_serial(http: str, ca: str) -> int:
    host, port = http.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_the_edges_https_certificate_rotates_without_a_restart(fleet: Fleet) -> None:
    ca = str(fleet.cluster.ca_dir / "ca.crt")
    before = _https_serial(fleet.http, ca)
    port = fleet.http.rsplit(":", 1)[1]
    fleet.cluster.issue(f"edge-{port}", f"edge/{port}", days=7)
    new = x509.load_pem_x509_certificate((fleet.cluster.dir / f"edge-{port}.crt").read_bytes()).serial_number
    assert new != before
    deadline = time.monotonic() + ROTATION_BOUND
    while _https_serial(fleet.http, ca) != new and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _https_serial(fleet.http, ca) == new
    assert _client(fleet).models.list().data  # still serving, same process


def test_with_tls_only_an_operator_certificate_may_call_admin_service(fleet: Fleet) -> None:
    """No admin token here: with TLS, the client certificate is the credential. An operator's (admin)
    certificate may call every AdminService RPC; a node's or an edge's is a fleet member's, authenticated but
    not allowed (PERMISSION_DENIED), except the edge's own two RPCs (WatchApiKeys, AcquireQuota)."""
    cluster = fleet.cluster
    cluster.issue("intruder-node", "node/intruder")
    cluster.issue("some-edge", "edge/some-edge")
    listing = admin_pb2.ListNodesRequest()
    with cluster.channel(cluster.controlplane, "admin") as channel:
        nodes = admin_pb2_grpc.AdminServiceStub(channel).ListNodes(listing, timeout=30)
        assert "tls-node" in [n.node_id for n in nodes.nodes]
    for name, kind in (("intruder-node", "node"), ("some-edge", "edge")):
        with cluster.channel(cluster.controlplane, name) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            for method, request in (
                (stub.ListNodes, listing),
                (stub.CreateJoinToken, admin_pb2.CreateJoinTokenRequest()),
                (stub.CordonNode, admin_pb2.CordonNodeRequest(node_id="tls-node")),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    method(request, timeout=30)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value
                assert f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}'s" in (refused.value.details() or "")
    with cluster.channel(cluster.controlplane, "some-edge") as channel:
        # the edge's own RPC is not refused for who it is (it follows the key table: the first reply arrives)
        watch = admin_pb2_grpc.AdminServiceStub(channel).WatchApiKeys(admin_pb2.WatchApiKeysRequest(), timeout=10)
        try:
            next(iter(watch))
        except grpc.RpcError as error:
            assert error.code() not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), error
        finally:
            watch.cancel()
    with cluster.channel(cluster.controlplane, "admin") as channel:  # nothing was cordoned by the refused calls
        nodes = admin_pb2_grpc.AdminServiceStub(channel).ListNodes(listing, timeout=30)
        node = next(n for n in nodes.nodes if n.node_id == "tls-node")
        assert node.scheduling != node_pb2.SCHEDULING_CORDONED


def test_a_node_serves_edges_and_operators_only_and_the_routing_table_goes_to_no_node(fleet: Fleet) -> None:
    """A node's certificate (another node's, or a revoked node's: the registry refuses those, the node's port
    would not) is no ticket to inference past the edge's API keys and limits: a node takes Generate and
    Multiplex calls from edges and operators only, and the control plane sends the routing table (every
    node's address) to edges, operators and control planes, not to a node."""
    cluster = fleet.cluster
    cluster.issue("other-node", "node/other-node")
    cluster.issue("an-edge", "edge/an-edge")
    with cluster.channel(cluster.controlplane, "admin") as channel:
        nodes = admin_pb2_grpc.AdminServiceStub(channel).ListNodes(admin_pb2.ListNodesRequest(), timeout=30)
    address = next(n.inference_address for n in nodes.nodes if n.node_id == "tls-node")
    request = inference_pb2.GenerateRequest(model=MODEL, prompt="The sky is")
    request.sampling.max_tokens = 2
    by_name = (("grpc.ssl_target_name_override", node_dns_name("tls-node")),)

    def outcome(call: Any) -> tuple[grpc.StatusCode, str]:
        try:
            for _ in call:
                pass
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            return error.code(), error.details() or ""

    generated, multiplexed, routes = {}, {}, {}
    for name in ("other-node", "an-edge", "admin"):
        with grpc.secure_channel(address, cluster.credentials(name), by_name) as channel:  # type: ignore[arg-type]
            generated[name] = outcome(inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=120))
            stream = multiplex_pb2_grpc.MultiplexServiceStub(channel).Multiplex(iter([]), timeout=30)
            multiplexed[name] = outcome(stream)[0]
        with cluster.channel(cluster.controlplane, name) as channel:
            watch = routing_pb2_grpc.RoutingServiceStub(channel).WatchRoutes(
                routing_pb2.WatchRoutesRequest(), timeout=30
            )
            try:
                first = next(iter(watch))
                routes[name] = grpc.StatusCode.OK if first.snapshot else grpc.StatusCode.UNKNOWN
            except grpc.RpcError as error:
                routes[name] = error.code()
            finally:
                watch.cancel()
    assert {name: code for name, (code, _) in generated.items()} == {
        "other-node": grpc.StatusCode.PERMISSION_DENIED,
        "an-edge": grpc.StatusCode.OK,
        "admin": grpc.StatusCode.OK,
    }
    assert generated["other-node"][1] == (
        "InferenceService on a node takes calls from admin and edge certificates only; the client certificate is a"
        " node's"
    )
    assert multiplexed == {
        "other-node": grpc.StatusCode.PERMISSION_DENIED,
        "an-edge": grpc.StatusCode.OK,
        "admin": grpc.StatusCode.OK,
    }
    assert routes == {
        "other-node": grpc.StatusCode.PERMISSION_DENIED,
        "an-edge": grpc.StatusCode.OK,
        "admin": grpc.StatusCode.OK,
    }


def test_a_node_that_says_it_holds_an_assigned_replica_is_not_routed_for_it(fleet: Fleet) -> None:
    """A fleet certificate of a node that was never placed anything registers saying it holds a ready replica
    assigned to it: the control plane's routes (what edges route on) leave that replica out, since no
    assignment of it stands (before, its word was taken and the edge sent it requests, prompts and all)."""
    cluster = fleet.cluster
    cluster.issue("liar", "node/liar")
    claimed = node_pb2.Replica(
        model=node_pb2.ModelSpec(name=MODEL, format="gguf"), state=node_pb2.REPLICA_STATE_READY, assigned=True
    )
    with cluster.channel(cluster.controlplane, "liar") as channel:
        registry = registry_pb2_grpc.NodeRegistryServiceStub(channel)
        registry.RegisterNode(
            registry_pb2.RegisterNodeRequest(node_id="liar", inference_address="127.0.0.1:9", replicas=[claimed]),
            timeout=30,
        )
    with cluster.channel(cluster.controlplane, "admin") as channel:
        watch = routing_pb2_grpc.RoutingServiceStub(channel).WatchRoutes(routing_pb2.WatchRoutesRequest(), timeout=30)
        try:
            table = next(iter(watch))
        finally:
            watch.cancel()
    routes = {n.node_id: [r.model for r in n.replicas] for n in table.nodes}
    assert routes.get("liar") == [], routes  # registered (its lease is live), routed for nothing
    assert routes.get("tls-node") == [MODEL], routes


async def test_a_rotated_edge_certificate_moves_the_node_stream_without_cutting_a_call(fleet: Fleet) -> None:
    """The edge carries its Generate calls to a node on one stream (edge.node_multiplex) over a channel that
    follows its certificate files. After a rotation the next call goes on a new stream, on the new
    certificate; a call in flight on the old stream ends with all its text, and the replaced channel is
    closed as soon as that call has ended. Left open, the old stream would have been cut, with whatever it
    carried then, when the replaced channel's grace (660 s) ran out."""
    cluster = fleet.cluster
    cluster.issue("edge-mux", "edge/mux", days=7)
    files = TlsFiles(cluster.dir / "edge-mux.crt", cluster.dir / "edge-mux.key", cluster.ca_dir / "ca.crt")
    with cluster.channel(cluster.controlplane, "admin") as admin:
        nodes = admin_pb2_grpc.AdminServiceStub(admin).ListNodes(admin_pb2.ListNodesRequest(), timeout=30)
    address = next(n.inference_address for n in nodes.nodes if n.node_id == "tls-node")

    def request(prompt: str, max_tokens: int) -> inference_pb2.GenerateRequest:
        sampling = inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0)
        return inference_pb2.GenerateRequest(model=MODEL, prompt=prompt, sampling=sampling)

    async def collect(call: Any) -> tuple[str, int]:
        text, tokens = "", 0
        while (response := await call.read()) is not grpc.aio.EOF:
            text += response.delta.text if response.HasField("delta") else ""
            tokens = response.result.usage.completion_tokens if response.HasField("result") else tokens
        return text, tokens

    channel = secure_channel(address, files, CHANNEL_OPTIONS, node_dns_name("tls-node"))
    link = NodeLink(channel, inference_pb2_grpc.InferenceServiceStub(channel), "tls-node")
    try:
        assert await collect(link.generate(request("The capital of France is", 4), 60, ())) != ("", 0)
        long_ = link.generate(request("Write a very long story.", 96), 120, ())
        first = await asyncio.wait_for(long_.read(), 60)
        assert first is not grpc.aio.EOF
        cluster.issue("edge-mux", "edge/mux", days=7)  # rotated: the same files, rewritten
        after = await collect(link.generate(request("The capital of France is", 4), 60, ()))
        replaced = set(channel._closing)  # type: ignore[attr-defined]
        assert len(replaced) == 1, "the call after the rotation did not move to a channel with the new certificate"
        text, tokens = await collect(long_)
        # The replaced channel's close waits for the calls on it: the old stream, ended with its last call.
        done, _ = await asyncio.wait(replaced, timeout=20)
    finally:
        await link.close()
        await channel.close()
    assert after[0] and after[1] >= 1, "the call after the rotation"
    assert text and tokens >= 1, "the call in flight across the rotation"  # a cut would have raised
    assert done == replaced, "the old stream outlived its last call: the replaced channel is still open"
