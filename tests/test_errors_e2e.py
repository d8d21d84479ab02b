"""Every error of the vocabulary, through the edge's HTTP API and through its gRPC API.

The same failure must reach both kinds of client with the same reason: HTTP in OpenAI's error shape,
gRPC as a status code plus a google.rpc.ErrorInfo whose reason is the same code.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from google.protobuf import duration_pb2  # noqa: F401 - registers well-known types for ErrorInfo

from fleetlm.controlplane.v1 import node_pb2, registry_pb2, registry_pb2_grpc
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import FleetError
from tests.cluster import free_port, smollm_entry, wait_for
from tests.conftest import MISSING_MODEL, Mesh

pytestmark = [pytest.mark.model, pytest.mark.cluster]

HELLO = [{"role": "user", "content": "hello"}]


def post(mesh: Mesh, path: str, body: Any, raw: bool = False) -> httpx.Response:
    content = body if raw else json.dumps(body)
    return httpx.post(f"{mesh.http}{path}", content=content, headers={"content-type": "application/json"}, timeout=60)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def grpc_generate(address: str, request: inference_pb2.GenerateRequest, timeout: float = 60) -> FleetError:
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request, timeout=timeout))
    return FleetError.from_rpc_error(caught.value)


def chat(model: str, **sampling: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=model,
        chat=inference_pb2.ChatConversation(messages=[inference_pb2.ChatMessage(role="user", content="hello")]),
        sampling=inference_pb2.SamplingParams(**sampling),
    )


def test_model_required(mesh: Mesh) -> None:
    response = post(mesh, "/v1/chat/completions", {"messages": HELLO})
    assert response.status_code == 400
    assert error_of(response)["code"] == "MODEL_REQUIRED"
    assert error_of(response)["param"] == "model"
    error = grpc_generate(mesh.grpc, chat(""))
    assert error.code == "MODEL_REQUIRED" and error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == error_of(response)["message"]
    # Checked first, as over gRPC, and a blank name is no name.
    for body in ({"messages": "hello", "temperature": 9}, {"model": "  ", "messages": HELLO}):
        response = post(mesh, "/v1/chat/completions", body)
        assert response.status_code == 400 and error_of(response)["code"] == "MODEL_REQUIRED", body
    assert grpc_generate(mesh.grpc, chat("  ")).code == "MODEL_REQUIRED"


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 2.5}, {"top_p": 1.5}, {"repetition_penalty": 0.0}, {"min_p": -0.5}, {"max_tokens": 0}],
)
def test_a_bound_gets_the_same_param_and_message_over_http_and_grpc(mesh: Mesh, sampling: dict[str, Any]) -> None:
    response = post(mesh, "/v1/chat/completions", {"model": mesh.model, "messages": HELLO, **sampling})
    assert response.status_code == 400, response.text
    http = error_of(response)
    error = grpc_generate(mesh.grpc, chat(mesh.model, **sampling))
    assert error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert (http["code"], http["param"], http["message"]) == (error.code, error.param, error.message)
    assert http["param"] == next(iter(sampling))


def test_a_number_too_big_for_the_proto_is_a_400_not_a_crash(mesh: Mesh) -> None:
    for name in ("max_tokens", "top_k", "seed"):
        response = post(mesh, "/v1/completions", {"model": mesh.model, "prompt": "x", name: 2**64})
        assert response.status_code == 400, response.text
        assert error_of(response)["param"] == name


def test_model_not_found_lists_available_models(mesh: Mesh) -> None:
    response = post(mesh, "/v1/chat/completions", {"model": "no-such-model", "messages": HELLO})
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "model_not_found" and error["param"] == "model"  # OpenAI's spelling over HTTP
    assert mesh.model in error["message"]
    grpc_error = grpc_generate(mesh.grpc, chat("no-such-model"))
    assert grpc_error.code == "MODEL_NOT_FOUND"
    assert mesh.model in grpc_error.metadata["available_models"].split(",")
    assert httpx.get(f"{mesh.http}/v1/models/no-such-model").status_code == 404


def test_model_unavailable_when_no_replica_is_ready(mesh: Mesh) -> None:
    # The node declares this model but its weights file does not exist: the replica failed to load.
    response = post(mesh, "/v1/chat/completions", {"model": MISSING_MODEL, "messages": HELLO})
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "MODEL_UNAVAILABLE"
    assert "not found" in error["message"]  # the load failure's reason reaches the client
    assert response.headers.get("retry-after")
    assert grpc_generate(mesh.grpc, chat(MISSING_MODEL)).code == "MODEL_UNAVAILABLE"


@pytest.fixture
def unreachable_node(mesh: Mesh) -> Iterator[str]:
    """A node registered in the real control plane whose InferenceService address answers nothing, as
    after its machine died and before its lease ran out."""
    model = "on-a-dead-node"
    with grpc.insecure_channel(mesh.controlplane) as channel:
        registry = registry_pb2_grpc.NodeRegistryServiceStub(channel)
        reply = registry.RegisterNode(
            registry_pb2.RegisterNodeRequest(
                node_id="dead-node",
                inference_address=f"127.0.0.1:{free_port()}",
                replicas=[
                    node_pb2.Replica(
                        model=node_pb2.ModelSpec(name=model, format="gguf", engine="llamacpp"),
                        state=node_pb2.REPLICA_STATE_READY,
                    )
                ],
            ),
            timeout=5,
        )
        wait_for(
            lambda: post(mesh, "/v1/completions", {"model": model, "prompt": "x"}).status_code != 404,
            30,  # a bound, not an expectation: the control plane sees it at once unless the machine is busy
            "registration",
        )
        yield model
        registry.DeregisterNode(
            registry_pb2.DeregisterNodeRequest(node_id="dead-node", lease_id=reply.lease_id), timeout=5
        )


def test_backend_unavailable_when_node_is_unreachable(mesh: Mesh, unreachable_node: str) -> None:
    response = post(mesh, "/v1/completions", {"model": unreachable_node, "prompt": "hi"})
    assert response.status_code == 503
    assert error_of(response)["code"] == "BACKEND_UNAVAILABLE"
    assert "dead-node" in error_of(response)["message"]
    request = inference_pb2.GenerateRequest(model=unreachable_node, prompt="hi")
    error = grpc_generate(mesh.grpc, request)
    assert error.code == "BACKEND_UNAVAILABLE" and error.grpc_code == grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def impatient_edge(mesh: Mesh) -> Iterator[tuple[str, str]]:
    """A second edge on the same fleet whose request timeout is far shorter than the generation asked of
    it: 1,500 greedy tokens (the model loops, it never stops early) take 12 s or more on two cores (~90
    tokens/s at best), while 3 s leaves a busy machine ample time for the first token, which the
    streamed case needs to see its stream start."""
    proc, http, grpc_address = mesh.cluster.start_edge("--request-timeout", "3")
    yield http, grpc_address
    proc.stop()


def test_backend_timeout(mesh: Mesh, impatient_edge: tuple[str, str]) -> None:
    http, grpc_address = impatient_edge
    body = {"model": mesh.model, "prompt": "Write a long story.", "max_tokens": 1500, "temperature": 0}
    response = httpx.post(f"{http}/v1/completions", json=body, timeout=60)
    assert response.status_code == 504
    assert error_of(response)["code"] == "BACKEND_TIMEOUT"
    # Once the stream has started, the timeout arrives as one error event, then [DONE].
    with httpx.stream("POST", f"{http}/v1/completions", json=body | {"stream": True}, timeout=60) as stream:
        assert stream.status_code == 200
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "BACKEND_TIMEOUT"
    request = inference_pb2.GenerateRequest(
        model=mesh.model,
        prompt="Write a long story.",
        sampling=inference_pb2.SamplingParams(max_tokens=1500, temperature=0),
    )
    error = grpc_generate(grpc_address, request)
    assert error.code == "BACKEND_TIMEOUT" and error.grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The model is free again right after: the timed-out work was cancelled on the node.
    quick = post(mesh, "/v1/completions", {"model": mesh.model, "prompt": "Hi", "max_tokens": 2})
    assert quick.status_code == 200


def test_a_clients_own_deadline_is_not_blamed_on_the_node(mesh: Mesh) -> None:
    # A gRPC deadline shorter than the edge's --request-timeout (600 s): the caller gave up, as when it
    # cancels. The edge logged and counted it as BACKEND_TIMEOUT, 504, "node ... did not finish": the alert
    # an operator has for slow nodes.
    request = inference_pb2.GenerateRequest(
        model=mesh.model,
        prompt="Write a long story.",
        sampling=inference_pb2.SamplingParams(max_tokens=1500, temperature=0),
    )
    request_id = "req-own-deadline-1"
    with grpc.insecure_channel(mesh.grpc) as channel, pytest.raises(grpc.RpcError) as caught:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        list(stub.Generate(request, timeout=1.0, metadata=(("x-request-id", request_id),)))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    edge = next(
        p for p in mesh.cluster.procs if p.name.startswith("edge-") and f"--grpc-listen {mesh.grpc}" in " ".join(p.argv)
    )

    def logged() -> list[str]:
        return [line for line in edge.log_text().splitlines() if request_id in line and "grpc Generate" in line]

    [line] = wait_for(logged, 30, "the call's access log line")
    # Said as what ended it, the client's own deadline (it said CANCELLED, as for a caller that cancels).
    assert " 504 " in line and "error=DEADLINE_EXCEEDED" in line and "BACKEND_TIMEOUT" not in line, line
    about = [x for x in edge.log_text().splitlines() if request_id in x]
    assert not [x for x in about if "did not finish" in x or " WARNING " in x], about


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "smollm2-135m", "messages": [', None),
        ("[1, 2]", None),
        ({"model": "smollm2-135m", "messages": "hello"}, "messages"),
        ({"model": "smollm2-135m", "messages": []}, "messages"),
        ({"model": "smollm2-135m", "messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
        ({"model": "smollm2-135m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "smollm2-135m", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "smollm2-135m", "messages": [{"role": "system", "content": None}, *HELLO]}, "messages[0].content"),
        ({"model": "smollm2-135m", "messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        ({"model": "smollm2-135m", "messages": HELLO, "temperature": 3}, "temperature"),
        ({"model": "smollm2-135m", "messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"model": "smollm2-135m", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": "smollm2-135m", "messages": HELLO, "top_p": 0}, "top_p"),
        ({"model": "smollm2-135m", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "smollm2-135m", "messages": HELLO, "n": 5}, "n"),  # more than the replica's 4 slots
        ({"model": "smollm2-135m", "messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"model": "smollm2-135m", "messages": HELLO, "top_logprobs": 3}, "top_logprobs"),
        ({"model": "smollm2-135m", "messages": HELLO, "max_tokens": 4000}, "max_tokens"),
        ({"model": 5, "messages": HELLO}, "model"),
    ],
)
def test_bad_chat_input_is_a_400_naming_the_param(mesh: Mesh, body: Any, param: str | None) -> None:
    response = post(mesh, "/v1/chat/completions", body, raw=isinstance(body, str))
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] in ("INVALID_REQUEST", "context_length_exceeded")


def test_an_assistant_turn_without_content_and_an_empty_message_are_accepted(mesh: Mesh) -> None:
    """As OpenAI's API: an assistant turn may come back without content (a refusal echoed in the history), and
    "" is a message, if an empty one; only a missing content of any other role is refused."""
    history = [*HELLO, {"role": "assistant", "content": None, "refusal": "I can't."}, {"role": "user", "content": ""}]
    response = post(mesh, "/v1/chat/completions", {"model": mesh.model, "messages": history, "max_tokens": 3})
    assert response.status_code == 200, response.text


def test_bad_completion_and_embedding_input(mesh: Mesh) -> None:
    cases = [
        ("/v1/completions", {"model": mesh.model, "prompt": ""}, "prompt"),
        ("/v1/completions", {"model": mesh.model, "prompt": ["a", ""]}, "prompt"),
        ("/v1/completions", {"model": mesh.model, "prompt": "x", "seed": -(2**63) - 1}, "seed"),
        ("/v1/completions", {"model": mesh.model, "prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"model": mesh.model, "prompt": "x", "logprobs": -1}, "logprobs"),
        ("/v1/embeddings", {"model": mesh.model, "input": []}, "input"),
        ("/v1/embeddings", {"model": mesh.model, "input": [""]}, "input"),
        ("/v1/embeddings", {"model": mesh.model, "input": 12}, "input"),
    ]
    for path, body, param in cases:
        response = post(mesh, path, body)
        assert response.status_code == 400, (body, response.text)
        assert error_of(response)["param"] == param, body


def test_prompt_longer_than_context(mesh: Mesh) -> None:
    long_text = "hello " * 3000
    response = post(
        mesh,
        "/v1/chat/completions",
        {"model": mesh.model, "messages": [{"role": "user", "content": long_text}]},
    )
    assert response.status_code == 400
    assert error_of(response)["code"] == "context_length_exceeded"  # what OpenAI's API says, and apps test for
    assert error_of(response)["param"] == "messages"
    assert "maximum context length is 2048 tokens" in error_of(response)["message"]
    response = post(mesh, "/v1/embeddings", {"model": mesh.model, "input": ["ok", long_text]})
    assert response.status_code == 400 and error_of(response)["param"] == "input"
    error = grpc_generate(mesh.grpc, inference_pb2.GenerateRequest(model=mesh.model, prompt=long_text))
    assert error.code == "CONTEXT_LENGTH_EXCEEDED" and error.param == "prompt"
    assert error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_grpc_input_names_the_field(mesh: Mesh) -> None:
    cases = [
        (chat(mesh.model, temperature=9), "temperature"),
        (chat(mesh.model, top_p=1.5), "top_p"),
        (chat(mesh.model, max_tokens=0), "max_tokens"),
        (chat(mesh.model, logprobs=True, top_logprobs=50), "top_logprobs"),
        (chat(mesh.model, top_logprobs=2), "top_logprobs"),
        (inference_pb2.GenerateRequest(model=mesh.model), "messages"),
        (inference_pb2.GenerateRequest(model=mesh.model, chat=inference_pb2.ChatConversation()), "messages"),
        (inference_pb2.GenerateRequest(model=mesh.model, prompt=""), "prompt"),
    ]
    for request, param in cases:
        error = grpc_generate(mesh.grpc, request)
        assert error.code == "INVALID_REQUEST" and error.param == param, (request, error)
        assert error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT


def test_an_empty_prompt_is_refused_by_the_node_too(mesh: Mesh) -> None:
    """A gRPC client may call a node directly: it checks what the edge checks (an empty prompt once failed
    the engine's whole decode step, and every request in it, with an IndexError)."""
    error = grpc_generate(mesh.node_address, inference_pb2.GenerateRequest(model=mesh.model, prompt=""))
    assert (error.code, error.param, error.grpc_code) == ("INVALID_REQUEST", "prompt", grpc.StatusCode.INVALID_ARGUMENT)


def test_unknown_route_and_method_keep_the_openai_shape(mesh: Mesh) -> None:
    assert httpx.get(f"{mesh.http}/v1/nothing").status_code == 404
    assert error_of(httpx.get(f"{mesh.http}/v1/nothing"))["type"] == "invalid_request_error"
    response = httpx.get(f"{mesh.http}/v1/chat/completions")
    assert response.status_code == 405
    error_of(response)


def test_node_killed_mid_stream_ends_the_stream_with_an_error(mesh: Mesh) -> None:
    """A node that dies while streaming: the client gets an error event and [DONE], never a hang."""
    proc, _ = mesh.cluster.start_node("doomed", [smollm_entry("doomed-model")])
    mesh.cluster.wait_model_state(mesh.http, "doomed-model")
    body = {
        "model": "doomed-model",
        "prompt": "Tell a long story.",
        "max_tokens": 1500,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", f"{mesh.http}/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "text_completion" in first
        proc.signal(signal.SIGKILL)
        rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["error"]["code"] == "BACKEND_UNAVAILABLE"


def test_embedding_limits_over_http(mesh: Mesh) -> None:
    many = post(mesh, "/v1/embeddings", {"model": mesh.model, "input": ["x"] * 2049})
    assert (
        many.status_code == 400 and error_of(many)["param"] == "input" and "at most 2048" in error_of(many)["message"]
    )
    long = post(mesh, "/v1/embeddings", {"model": mesh.model, "input": ["y" * 40_000]})
    assert long.status_code == 400 and error_of(long)["param"] == "input"


def test_the_most_inputs_an_embedding_request_may_hold_are_answered(mesh: Mesh) -> None:
    """2,048 inputs: a reply of 2,048 vectors (4.7 MB with this model's 576 dimensions) is more than gRPC's
    default 4 MiB message. The edge's channel to the node took no more, and the request was refused as if
    every replica were busy (429, retry after 1 s: a retry got the same). One text, so the node computes it
    once (its cache is keyed by the text)."""
    client = openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=300)
    reply = client.embeddings.create(model=mesh.model, input=["a b"] * 2048)
    assert len(reply.data) == 2048 and len(reply.data[-1].embedding) == len(reply.data[0].embedding) > 0
    # Over gRPC as well, to a client that takes messages that large (gRPC's default would refuse it itself).
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(mesh.grpc, options=options) as channel:
        embedded = inference_pb2_grpc.InferenceServiceStub(channel).Embed(
            inference_pb2.EmbedRequest(model=mesh.model, inputs=["a b"] * 2048), timeout=300
        )
    assert len(embedded.embeddings) == 2048


def test_more_than_256_inputs_are_embedded_in_one_request(mesh: Mesh) -> None:
    """Up to OpenAI's 2,048, as clients send them (LangChain's OpenAIEmbeddings: 1,000 a request by default;
    the node once refused more than 256), each in its place: input i's vector is the one the same text gets
    in a request of its own (from the node's cache, keyed by the text: what is checked is the order). 300
    here: 1,000 short ones take ~45 s on these 2 cores (~12,000 tokens to compute)."""
    client = openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=300)
    texts = [f"document {i}: notes on topic {i % 37}" for i in range(300)]
    reply = client.embeddings.create(model=mesh.model, input=texts)
    assert [d.index for d in reply.data] == list(range(300))
    for i in (0, 157, 299):
        alone = client.embeddings.create(model=mesh.model, input=texts[i]).data[0].embedding
        assert max(abs(a - b) for a, b in zip(alone, reply.data[i].embedding, strict=True)) < 1e-4, i


def test_an_enum_value_the_proto_does_not_name_is_refused_naming_the_field(mesh: Mesh) -> None:
    """proto3 enums are open: `delivery` 99 was taken and streamed as if unset, while `tool_choice.mode` 99
    was refused. Every enum field of a request is refused alike, by the edge and by a node called directly."""
    delivery = inference_pb2.GenerateRequest(model=mesh.model, prompt="hello", delivery=99)  # type: ignore[arg-type]
    mode = chat(mesh.model)
    mode.chat.tool_choice.mode = 99  # type: ignore[assignment]
    for address in (mesh.grpc, mesh.node_address):
        for request, param in ((delivery, "delivery"), (mode, "tool_choice")):
            error = grpc_generate(address, request)
            assert (error.code, error.param, error.grpc_code) == (
                "INVALID_REQUEST",
                param,
                grpc.StatusCode.INVALID_ARGUMENT,
            ), (address, param, error)
