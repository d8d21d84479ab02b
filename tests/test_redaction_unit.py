"""Redaction of secrets in specs and in the messages that show them: pure functions, no servers."""

from __future__ import annotations

from fleetlm.controlplane.v1 import admin_pb2, node_pb2
from mesh.redaction import (
    REDACTED,
    is_secret_flag,
    redact_argv,
    redact_message,
    redact_spec,
    redacted_fields,
    secret_values,
)

KEY = "sk-live-0123456789abcdef"
TOKEN = "hf_abcdefghijklmnop"


def spec(**fields: object) -> node_pb2.ModelSpec:
    defaults = {"name": "m", "path": "/models/m.gguf", "format": "gguf", "engine": "openai"}
    return node_pb2.ModelSpec(**(defaults | fields))  # type: ignore[arg-type]


def test_secret_flags_are_whole_words() -> None:
    for name in ("api-key", "api_key", "--api-key", "API-KEY", "hf-token", "client-secret", "db-password", "apikey"):
        assert is_secret_flag(name), name
    for name in ("max-total-tokens", "tokenizer-path", "keyword", "monkey", "context-length", "is-embedding"):
        assert not is_secret_flag(name), name


def test_engine_args_api_key_and_hf_token_are_redacted_the_rest_kept() -> None:
    args = {"api-key": KEY, "hf-token": TOKEN, "max-total-tokens": "65536", "tokenizer-path": "/tok"}
    original = spec(engine_args=args)
    shown = redact_spec(original)
    assert dict(shown.engine_args) == {
        "api-key": REDACTED,
        "hf-token": REDACTED,
        "max-total-tokens": "65536",
        "tokenizer-path": "/tok",
    }
    assert original.engine_args["api-key"] == KEY  # a copy: the spec the node gets keeps its key
    assert secret_values(original) == {KEY, TOKEN}


def test_secret_flags_in_a_command_both_forms() -> None:
    argv = ["python", "-m", "srv", "--api-key", KEY, f"--hf-token={TOKEN}", "--max-total-tokens", "65536",
            "--tokenizer-path=/tok", "--port", "{port}"]  # fmt: skip
    shown_argv = ["python", "-m", "srv", "--api-key", REDACTED, f"--hf-token={REDACTED}",
                  "--max-total-tokens", "65536", "--tokenizer-path=/tok", "--port", "{port}"]  # fmt: skip
    assert redact_argv(argv) == shown_argv
    shown = redact_spec(spec(command=argv))
    assert list(shown.command) == redact_argv(argv)
    assert secret_values(spec(command=argv)) == {KEY, TOKEN}


def test_a_spec_with_nothing_secret_is_returned_as_it_is() -> None:
    plain = spec(engine_args={"max-total-tokens": "65536"}, command=["srv", "--tokenizer-path", "/tok"])
    assert redact_spec(plain) is plain
    assert secret_values(plain) == set()


def test_flag_values_that_are_not_secrets_are_not_collected() -> None:
    # `api-key: true` turns a flag on; it is redacted in the spec but is no value to cut out of text.
    assert secret_values(spec(engine_args={"api-key": "true"})) == set()
    assert redact_spec(spec(engine_args={"api-key": "true"})).engine_args["api-key"] == REDACTED


def test_every_spec_in_a_reply_is_redacted_and_its_secrets_cut_from_text() -> None:
    keyed = spec(engine_args={"api-key": KEY}, command=["srv", f"--hf-token={TOKEN}"])
    reply = admin_pb2.ListDeploymentsResponse(
        deployments=[
            admin_pb2.DeploymentStatus(
                deployment=node_pb2.Deployment(spec=keyed, min_replicas=1),
                assignments=[node_pb2.Assignment(node_id="n1", model=keyed)],
                replicas=[admin_pb2.ModelReplica(node_id="n1", error=f"server exited; last output: key={KEY}")],
            )
        ]
    )
    shown = redact_message(reply)
    text = str(shown)
    assert KEY not in text and TOKEN not in text
    status = shown.deployments[0]
    assert status.deployment.spec.engine_args["api-key"] == REDACTED
    assert list(status.assignments[0].model.command) == ["srv", f"--hf-token={REDACTED}"]
    assert status.replicas[0].error == f"server exited; last output: key={REDACTED}"
    assert KEY in str(reply)  # the message itself is left alone


def test_given_secrets_are_cut_from_messages_that_hold_no_spec() -> None:
    verdict = admin_pb2.NodeVerdict(node_id="n1", reason=f"model file not present: http://user:{KEY}@host/v1")
    assert redact_message(verdict, [KEY]).reason == f"model file not present: http://user:{REDACTED}@host/v1"
    # Too short to cut out of text without mangling it (it is still hidden where a spec names it).
    assert redact_message(verdict, ["n1"]).node_id == "n1"


def test_a_node_report_is_redacted_replica_by_replica() -> None:
    node = node_pb2.Node(
        node_id="n1",
        replicas=[
            node_pb2.Replica(model=spec(engine_args={"api_key": KEY}), error=f"401 for key {KEY}"),
            node_pb2.Replica(model=spec(name="plain", engine_args={"max-total-tokens": "64"})),
        ],
    )
    shown = redact_message(node)
    assert shown.replicas[0].model.engine_args["api_key"] == REDACTED
    assert shown.replicas[0].error == f"401 for key {REDACTED}"
    assert shown.replicas[1] == node.replicas[1]


def test_the_placeholder_sent_back_is_named() -> None:
    assert redacted_fields(redact_spec(spec(engine_args={"api-key": KEY, "x": "1"}))) == ["engine_args.api-key"]
    assert redacted_fields(redact_spec(spec(command=["srv", "--api-key", KEY]))) == ["command"]
    assert redacted_fields(redact_spec(spec(command=["srv", f"--api-key={KEY}"]))) == ["command"]
    assert redacted_fields(spec(engine_args={"api-key": KEY})) == []


def test_any_message_shape_is_walked_maps_and_recursive_types_included() -> None:
    from google.protobuf import struct_pb2

    value = struct_pb2.Struct()
    value.update({"log": f"started with --api-key {KEY}", "nested": {"lines": ["ok", f"key {KEY}"]}})
    shown = redact_message(value, [KEY])
    assert KEY not in str(shown)
    assert shown["nested"]["lines"][1] == f"key {REDACTED}" and shown["log"] == f"started with --api-key {REDACTED}"


def test_every_secret_arg_is_redacted_however_many() -> None:
    # Many keys, so that a walk that skips entries of the map (writing to it while iterating) shows.
    many = spec(engine_args={f"api-key-{i}": f"secret-value-{i}" for i in range(20)} | {"max-total-tokens": "64"})
    shown = redact_spec(many)
    assert {v for k, v in shown.engine_args.items() if k != "max-total-tokens"} == {REDACTED}
    assert shown.engine_args["max-total-tokens"] == "64"
    reply = redact_message(admin_pb2.ModelStatus(spec=many))
    assert not any(f"secret-value-{i}" in str(reply) for i in range(20))
