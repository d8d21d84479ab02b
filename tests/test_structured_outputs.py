"""Structured outputs (OpenAI's `response_format`) through the edge, with the official openai client and
over gRPC, answered by SmolLM2 on the llama.cpp engine: every reply validates against its schema, and a
response_format that is malformed or cannot be enforced is a 400 (INVALID_ARGUMENT) naming it."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any, Literal

import grpc
import httpx
import jsonschema_rs
import openai
import pytest
from google.protobuf import duration_pb2  # noqa: F401 - registers well-known types for ErrorInfo
from pydantic import BaseModel, Field

from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import FleetError
from tests.conftest import Mesh

pytestmark = [pytest.mark.model, pytest.mark.cluster]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "color", "hobbies"],
    "additionalProperties": False,
}
AS_PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
ASK = [{"role": "user", "content": "Describe a fictional person: name, age, favourite color and hobbies, as JSON."}]
# Enough for any document PERSON allows (40 + 3 x 30 characters of strings, the rest is structure):
# every reply must end by the grammar, never by max_tokens.
ROOM = 400


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=120)


def test_ten_json_schema_replies_all_validate(client: openai.OpenAI, mesh: Mesh) -> None:
    validator = jsonschema_rs.validator_for(PERSON)

    def ask(_: int) -> tuple[str, str]:
        reply = client.chat.completions.create(
            model=mesh.model,
            messages=ASK,
            response_format=AS_PERSON,
            temperature=0.8,
            max_tokens=ROOM,  # type: ignore[arg-type]
        )
        return reply.choices[0].message.content or "", reply.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(10)))
    for text, finish in replies:
        assert finish == "stop", text
        validator.validate(json.loads(text))
    assert len({text for text, _ in replies}) >= 5  # sampled at 0.8: different documents, all valid


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=20)


class Household(BaseModel):
    city: str = Field(max_length=30)
    members: int
    pets: list[Pet] = Field(max_length=3)


def test_the_clients_parse_helper_gets_a_parsed_object(client: openai.OpenAI, mesh: Mesh) -> None:
    """openai's own `parse`: a pydantic model (nested objects, an enum, arrays) sent as a strict schema."""
    ask = [{"role": "user", "content": "Describe a household with its city, members and pets, as JSON."}]
    for _ in range(3):
        reply = client.chat.completions.parse(
            model=mesh.model,
            messages=ask,
            response_format=Household,
            temperature=1.0,
            max_tokens=ROOM,  # type: ignore[arg-type]
        )
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(reply.choices[0].message.parsed, Household)


def test_json_object_replies_parse(client: openai.OpenAI, mesh: Mesh) -> None:
    ask = [{"role": "user", "content": "Return a JSON object with the keys city and country for Paris."}]
    # Every complete reply parses; one cut by max_tokens ("length": this small model sometimes repeats a list
    # until then) need not, as with OpenAI. Sampled: of 4 tries, at least 2 must complete.
    finished = []
    for _ in range(4):  # bounded
        reply = client.chat.completions.create(
            model=mesh.model,
            messages=ask,
            response_format={"type": "json_object"},
            temperature=0.7,
            max_tokens=400,  # type: ignore[arg-type]
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        if reply.choices[0].finish_reason == "stop":
            finished.append(json.loads(reply.choices[0].message.content or ""))
    assert len(finished) >= 2 and all(isinstance(document, dict) for document in finished), finished


def test_a_streamed_json_schema_reply_concatenates_to_a_valid_document(client: openai.OpenAI, mesh: Mesh) -> None:
    stream = client.chat.completions.create(
        model=mesh.model,
        messages=ASK,
        response_format=AS_PERSON,
        temperature=0.8,
        max_tokens=ROOM,
        stream=True,  # type: ignore[arg-type]
    )
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len([p for p in parts if p]) > 5, "not streamed"
    assert finish == "stop"
    jsonschema_rs.validator_for(PERSON).validate(json.loads("".join(parts)))


def test_completions_take_response_format(client: openai.OpenAI, mesh: Mesh) -> None:
    reply = client.completions.create(
        model=mesh.model,
        prompt="A person described as JSON:",
        max_tokens=ROOM,
        temperature=0.8,
        extra_body={"response_format": AS_PERSON},  # vLLM's and llama-server's extension of completions
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema_rs.validator_for(PERSON).validate(json.loads(reply.choices[0].text))


def post(mesh: Mesh, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{mesh.http}{path}", json=body, timeout=60)


def json_schema(schema: Any, name: str = "s") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


MALFORMED: list[Any] = [
    "json",
    {"type": "xml"},
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"name": "x"}},
    json_schema([1, 2]),
    json_schema({"type": "object"}, name="has spaces"),
    json_schema({"type": "object"}, name="n" * 65),
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
]
# Well formed, but the llama.cpp engine's grammar cannot enforce them: refused by the node, not ignored.
UNENFORCEABLE: list[Any] = [
    json_schema({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}, "required": ["n"]}),
    json_schema({"oneOf": [{"type": "string"}, {"type": "integer"}]}),
    json_schema({"type": "object", "properties": {"mail": {"type": "string", "format": "email"}}}),
]


@pytest.mark.parametrize("response_format", MALFORMED + UNENFORCEABLE)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_bad_response_format_is_a_400_naming_it(mesh: Mesh, path: str, response_format: Any) -> None:
    body: dict[str, Any] = {"model": mesh.model, "max_tokens": 8, "response_format": response_format}
    body.update({"messages": ASK} if "chat" in path else {"prompt": "hello"})
    response = post(mesh, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "response_format" and error["type"] == "invalid_request_error", error
    assert "Traceback" not in error["message"]


def grpc_stub(mesh: Mesh) -> tuple[grpc.Channel, inference_pb2_grpc.InferenceServiceStub]:
    channel = grpc.insecure_channel(mesh.grpc)
    return channel, inference_pb2_grpc.InferenceServiceStub(channel)


def grpc_request(mesh: Mesh, response_format: inference_pb2.ResponseFormat) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=mesh.model,
        chat=inference_pb2.ChatConversation(messages=[inference_pb2.ChatMessage(**m) for m in ASK]),
        sampling=inference_pb2.SamplingParams(max_tokens=ROOM, temperature=0.8, response_format=response_format),
    )


def schema_format(schema: str, name: str = "person") -> inference_pb2.ResponseFormat:
    return inference_pb2.ResponseFormat(
        json_schema=inference_pb2.JsonSchemaFormat(name=name, schema=schema, strict=True)
    )


def test_grpc_json_schema_through_the_edge(mesh: Mesh) -> None:
    channel, stub = grpc_stub(mesh)
    with channel:
        for _ in range(3):
            events = list(stub.Generate(grpc_request(mesh, schema_format(json.dumps(PERSON))), timeout=120))
            text = "".join(e.delta.text for e in events if e.HasField("delta"))
            assert events[-1].result.finish_reason == inference_pb2.FINISH_REASON_STOP
            jsonschema_rs.validator_for(PERSON).validate(json.loads(text))
        mode = inference_pb2.ResponseFormat(json_object=inference_pb2.JsonObjectFormat())
        ask = inference_pb2.ChatConversation(
            messages=[
                inference_pb2.ChatMessage(
                    role="user", content="Return a JSON object with the keys city and country for Paris."
                )
            ]
        )
        request = inference_pb2.GenerateRequest(
            model=mesh.model,
            chat=ask,
            sampling=inference_pb2.SamplingParams(max_tokens=400, temperature=0.7, response_format=mode),
        )
        # A complete document parses; one cut by max_tokens (this small model sometimes repeats a list until
        # then) ends with LENGTH and need not (OpenAI's contract too). Sampled, so a few tries: every complete
        # one must parse, and at least one must complete.
        finished = []
        for _ in range(4):  # bounded
            events = list(stub.Generate(request, timeout=120))
            reason = events[-1].result.finish_reason
            assert reason in (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH), events[-1]
            if reason == inference_pb2.FINISH_REASON_STOP:
                finished.append(json.loads("".join(e.delta.text for e in events if e.HasField("delta"))))
        assert finished and all(isinstance(document, dict) for document in finished), finished


def test_grpc_bad_response_format_is_invalid_argument_naming_it(mesh: Mesh) -> None:
    cases = [
        inference_pb2.ResponseFormat(),  # no kind set
        schema_format("{not json"),
        schema_format("[1, 2]"),
        schema_format(json.dumps(PERSON), name=""),
        schema_format(json.dumps({"type": "integer", "minimum": 0})),  # refused by the node's engine
    ]
    channel, stub = grpc_stub(mesh)
    with channel:
        for response_format in cases:
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(grpc_request(mesh, response_format), timeout=60))
            error = FleetError.from_rpc_error(caught.value)
            assert error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT, (response_format, error)
            assert error.code == "INVALID_REQUEST" and error.param == "response_format", (response_format, error)
