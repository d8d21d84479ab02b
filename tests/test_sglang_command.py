"""The SGLang command line the node agent builds, for several deployments and inventories.

SGLang needs an NVIDIA GPU, which these machines do not have, so the command is checked against the
flags SGLang documents for `python -m sglang.launch_server` (server arguments, v0.5): --model-path,
--served-model-name, --host, --port, --context-length, --max-running-requests, --mem-fraction-static,
--tp-size, --quantization, --max-total-tokens, --is-embedding.
"""

from __future__ import annotations

import pytest

from fleetlm.controlplane.v1 import node_pb2
from mesh.catalog import ModelEntry
from node_agent.engines.sglang import GpuShare, apply_engine_args, mem_fraction, sglang_launch

GiB = 1024**3
DOCUMENTED_FLAGS = {
    "--model-path",
    "--served-model-name",
    "--host",
    "--port",
    "--context-length",
    "--max-running-requests",
    "--mem-fraction-static",
    "--tp-size",
    "--quantization",
    "--max-total-tokens",
    "--is-embedding",
    "--enable-metrics",
    "--chunked-prefill-size",
}


def spec(**extra: object) -> node_pb2.ModelSpec:
    fields = {"name": "qwen-7b", "path": "/models/qwen-7b", "format": "hf", "engine": "sglang", "device": "gpu"}
    return ModelEntry.model_validate({**fields, "context_size": 8192, **extra}).spec()


def flags(argv: list[str]) -> dict[str, str]:
    """argv after `-m sglang.launch_server` as {flag: value} ("" for a flag without a value)."""
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    out: dict[str, str] = {}
    rest = argv[3:]
    i = 0
    while i < len(rest):
        assert rest[i].startswith("--"), rest[i]
        has_value = i + 1 < len(rest) and not rest[i + 1].startswith("--")
        out[rest[i]] = rest[i + 1] if has_value else ""
        i += 2 if has_value else 1
    return out


def test_one_gpu_hf_model() -> None:
    share = GpuShare([1], memory_bytes=12 * GiB, gpu_total_bytes={0: 24 * GiB, 1: 24 * GiB})
    launch = sglang_launch(spec(), share, port=31000, python="/opt/sglang/bin/python", base_env={"PATH": "/bin"})
    got = flags(list(launch.argv))
    assert launch.argv[0] == "/opt/sglang/bin/python"
    assert set(got) <= DOCUMENTED_FLAGS
    assert got == {
        "--model-path": "/models/qwen-7b",
        "--served-model-name": "qwen-7b",
        "--host": "127.0.0.1",
        "--port": "31000",
        "--enable-metrics": "",  # its /metrics, which the node links by replica
        "--context-length": "8192",
        "--max-running-requests": "3",  # the old system's limit, by default
        "--mem-fraction-static": "0.5",  # 12 GiB of a 24 GiB GPU
    }
    assert launch.env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "1"}
    assert launch.ready_path == "/health"
    assert launch.startup_timeout == 600


def test_two_gpus_run_tensor_parallel_and_split_the_budget() -> None:
    share = GpuShare([2, 3], memory_bytes=30 * GiB, gpu_total_bytes={2: 24 * GiB, 3: 24 * GiB})
    launch = sglang_launch(spec(gpu_count=2), share, port=31001, base_env={})
    got = flags(list(launch.argv))
    assert got["--tp-size"] == "2"
    assert got["--mem-fraction-static"] == "0.625"  # 15 GiB on each 24 GiB GPU
    assert launch.env is not None and launch.env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_awq_weights_are_quantized_awq() -> None:
    share = GpuShare([0], memory_bytes=6 * GiB, gpu_total_bytes={0: 16 * GiB})
    got = flags(list(sglang_launch(spec(format="awq"), share, port=1, base_env={}).argv))
    assert got["--quantization"] == "awq"
    assert "--tp-size" not in got


def test_budget_is_clamped_and_unknown_budget_leaves_sglang_default() -> None:
    assert mem_fraction(GpuShare([0], 40 * GiB, {0: 24 * GiB})) == 0.95
    assert mem_fraction(GpuShare([0], 1024, {0: 24 * GiB})) == 0.05
    assert mem_fraction(GpuShare([0], 0, {0: 24 * GiB})) is None  # a catalog model: no placement budget
    got = flags(list(sglang_launch(spec(), GpuShare([0], 0, {0: 24 * GiB}), port=1, base_env={}).argv))
    assert "--mem-fraction-static" not in got


def test_deployment_limits_and_engine_args_override_the_defaults() -> None:
    deployment = spec(
        max_running_requests=16,
        startup_timeout=900,
        engine_args={
            "mem-fraction-static": 0.8,  # replaces the placement's figure
            "max-total-tokens": 65536,  # caps the elastic pool
            "enable-metrics": True,  # a flag without a value
            "context-length": False,  # dropped: SGLang reads it from the model
            "port": 9,  # the agent's to choose: ignored
        },
    )
    launch = sglang_launch(deployment, GpuShare([0], 12 * GiB, {0: 24 * GiB}), port=31002, base_env={})
    got = flags(list(launch.argv))
    assert set(got) <= DOCUMENTED_FLAGS
    assert got["--max-running-requests"] == "16"
    assert got["--mem-fraction-static"] == "0.8"
    assert got["--max-total-tokens"] == "65536"
    assert got["--enable-metrics"] == ""
    assert got["--port"] == "31002"
    assert "--context-length" not in got
    assert launch.startup_timeout == 900
    off = sglang_launch(spec(engine_args={"enable-metrics": False}), GpuShare([0], 12 * GiB, {0: 24 * GiB}), 31003)
    assert "--enable-metrics" not in flags(list(off.argv))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, ["--a", "1"]),
        ({"a": "2"}, ["--a", "2"]),
        ({"--a": "false"}, []),
        ({"b": ""}, ["--a", "1", "--b"]),
    ],
)
def test_apply_engine_args(overrides: dict[str, str], expected: list[str]) -> None:
    assert apply_engine_args({"a": "1"}, overrides) == expected
