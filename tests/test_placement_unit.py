"""Replica placement arithmetic: filters with reasons, memory fit, binpack/spread, locality."""

from __future__ import annotations

import pytest

from controlplane import placement
from fleetlm.controlplane.v1 import node_pb2
from mesh.errors import ErrorCode, FleetError

GiB = placement.GiB
GGUF = "/models/small.gguf"


def node(
    node_id: str, ram_gib: float = 16, gpus: list[float] | None = None, files: list[str] | None = None
) -> node_pb2.Node:
    inventory = node_pb2.Inventory(
        ram=node_pb2.Memory(total_bytes=int(ram_gib * GiB)),
        gpus=[
            node_pb2.Gpu(index=i, vendor="nvidia", memory=node_pb2.Memory(total_bytes=int(g * GiB)))
            for i, g in enumerate(gpus or [])
        ],
        model_files=[node_pb2.ModelFile(path=p, size_bytes=GiB, kv_bytes_per_token=100_000) for p in (files or [GGUF])],
    )
    return node_pb2.Node(node_id=node_id, inventory=inventory)


def spec(**kw: object) -> node_pb2.ModelSpec:
    base: dict[str, object] = {
        "name": "m",
        "path": GGUF,
        "format": "gguf",
        "engine": "llamacpp",
        "context_size": 4096,
        "max_running_requests": 1,
    }
    return node_pb2.ModelSpec(**(base | kw))  # type: ignore[arg-type]


def snap(
    n: node_pb2.Node, scheduling: int = node_pb2.SCHEDULING_ACTIVE, *assigned: node_pb2.Assignment
) -> placement.NodeSnapshot:
    return placement.NodeSnapshot(n, scheduling, tuple(assigned))


POLICY = placement.PlacementPolicy(ram_reserve_bytes=GiB, vram_reserve_bytes=GiB // 2)


def test_memory_estimate_is_weights_plus_kv_cache() -> None:
    file = node_pb2.ModelFile(path=GGUF, size_bytes=GiB, kv_bytes_per_token=100_000)
    assert placement.memory_estimate(spec(context_size=4096), file) == GiB + 409_600_000
    # Every sequence the engine decodes at once has its own context's worth of KV cache.
    assert placement.memory_estimate(spec(max_running_requests=4), file) == GiB + 4 * 409_600_000


def test_every_rejected_node_carries_a_reason() -> None:
    nodes = [
        snap(node("cordoned"), node_pb2.SCHEDULING_CORDONED),
        snap(node("draining"), node_pb2.SCHEDULING_DRAINING),
        snap(node("tiny", ram_gib=2)),
        snap(node("nofile", files=["/other.gguf"])),
        snap(node("good")),
    ]
    verdicts = {v.node_id: v for v in placement.evaluate(spec(), nodes, POLICY)}
    assert verdicts["good"].fit is not None and verdicts["good"].fit.device == "cpu"
    assert verdicts["cordoned"].reason == "node is cordoned"
    assert verdicts["draining"].reason == "node is draining"
    assert "GiB of RAM" in verdicts["tiny"].reason
    assert "not present" in verdicts["nofile"].reason
    assert placement.place(spec(), nodes, POLICY).node_id == "good"


def test_assigned_memory_counts_against_the_node() -> None:
    n = node("n", ram_gib=4)  # 3 GiB after the reserve; each replica needs ~1.4 GiB
    first = node_pb2.Assignment(node_id="n", model=spec(name="a"), device="cpu", memory_bytes=int(1.4 * GiB))
    assert placement.evaluate(spec(), [snap(n, node_pb2.SCHEDULING_ACTIVE, first)], POLICY)[0].fit is not None
    second = node_pb2.Assignment(node_id="n", model=spec(name="b"), device="cpu", memory_bytes=int(1.4 * GiB))
    verdict = placement.evaluate(spec(), [snap(n, node_pb2.SCHEDULING_ACTIVE, first, second)], POLICY)[0]
    assert verdict.fit is None and "unassigned" in verdict.reason


def test_gguf_prefers_a_gpu_and_falls_back_to_cpu() -> None:
    assert placement.evaluate(spec(device="any"), [snap(node("g", gpus=[24]))], POLICY)[0].fit.device == "gpu"  # type: ignore[union-attr]
    small_gpu = placement.evaluate(spec(device="any"), [snap(node("g", gpus=[1]))], POLICY)[0]
    assert small_gpu.fit is not None and small_gpu.fit.device == "cpu"
    gpu_only = placement.evaluate(spec(device="gpu"), [snap(node("g", gpus=[1]))], POLICY)[0]
    assert gpu_only.fit is None and "GPU memory" in gpu_only.reason


def test_format_engine_device_compatibility() -> None:
    awq = spec(format="awq", engine="sglang", path="/models/qwen-awq")
    cpu_box = snap(node("cpu", files=["/models/qwen-awq"]))
    gpu_box = snap(node("gpu", gpus=[24], files=["/models/qwen-awq"]))
    assert [v.node_id for v in placement.evaluate(awq, [cpu_box, gpu_box], POLICY) if v.fit] == ["gpu"]
    with pytest.raises(FleetError) as caught:
        placement.place(awq, [cpu_box], POLICY)
    assert caught.value.code == ErrorCode.FORMAT_NOT_SUPPORTED
    assert "NVIDIA GPU" in caught.value.message
    with pytest.raises(FleetError) as caught:
        placement.place(spec(engine="sglang"), [gpu_box], POLICY)
    assert caught.value.code == ErrorCode.FORMAT_NOT_SUPPORTED
    with pytest.raises(FleetError) as caught:
        placement.place(spec(), [snap(node("tiny", ram_gib=1))], POLICY)
    assert caught.value.code == ErrorCode.NO_CAPACITY and "tiny:" in caught.value.message


def test_binpack_and_spread() -> None:
    busy = node_pb2.Assignment(node_id="busy", model=spec(name="x"), device="cpu", memory_bytes=8 * GiB)
    nodes = [snap(node("busy"), node_pb2.SCHEDULING_ACTIVE, busy), snap(node("empty"))]
    spread = placement.PlacementPolicy("spread", GiB, GiB)
    binpack = placement.PlacementPolicy("binpack", GiB, GiB)
    assert placement.place(spec(), nodes, spread).node_id == "empty"
    assert placement.place(spec(), nodes, binpack).node_id == "busy"


def test_locality_breaks_ties_toward_the_node_that_already_reads_the_file() -> None:
    warm = node("warm")
    warm.replicas.append(node_pb2.Replica(model=spec(name="other-name-same-file")))
    assert placement.place(spec(), [snap(node("cold")), snap(warm)], POLICY).node_id == "warm"


def test_one_replica_per_node() -> None:
    mine = node_pb2.Assignment(node_id="n", model=spec(), device="cpu", memory_bytes=GiB)
    verdict = placement.evaluate(spec(), [snap(node("n"), node_pb2.SCHEDULING_ACTIVE, mine)], POLICY)[0]
    assert verdict.fit is None and verdict.reason == "already runs a replica of this model"


def test_thousand_nodes() -> None:
    nodes = [snap(node(f"n{i:04d}", ram_gib=8 + i % 5)) for i in range(1000)]
    verdicts = placement.evaluate(spec(), nodes, POLICY)
    assert len(verdicts) == 1000 and verdicts[0].node_id.startswith("n")


def test_a_tensor_parallel_replica_takes_the_gpus_with_the_most_free_memory() -> None:
    hf = spec(name="big", path="/models/hf", format="hf", engine="sglang", device="gpu", gpu_count=2)
    box = node("quad", gpus=[24, 24, 24, 24], files=["/models/hf"])
    # GPU 0 already holds 20 GiB of another replica; 1 holds 4 GiB (half of an 8 GiB two-GPU replica).
    busy = [
        node_pb2.Assignment(node_id="quad", model=spec(name="a"), device="gpu", gpu_indices=[0], memory_bytes=20 * GiB),
        node_pb2.Assignment(
            node_id="quad", model=spec(name="b"), device="gpu", gpu_indices=[1, 3], memory_bytes=8 * GiB
        ),
    ]
    verdict = placement.place(hf, [snap(box, node_pb2.SCHEDULING_ACTIVE, *busy)], POLICY)
    assert verdict.fit is not None and verdict.fit.device == "gpu"
    assert verdict.fit.gpu_indices == [1, 2]  # 2 is empty; 1 and 3 tie with 4 GiB used, 1 first
    # Three GPUs wanted on a node with two: refused with the reason.
    verdicts = placement.evaluate(spec(name="huge", path="/models/hf", format="hf", engine="sglang", gpu_count=3),
                                  [snap(node("duo", gpus=[24, 24], files=["/models/hf"]))], POLICY)  # fmt: skip
    assert verdicts[0].fit is None and verdicts[0].reason == "needs 3 GPUs; node has 2"


def test_an_attached_server_needs_nothing_from_the_node_but_a_launched_one_needs_its_weights() -> None:
    bare = snap(node("bare", files=["/models/other.gguf"]))
    attached = spec(name="remote", path="http://10.0.0.7:8000/v1", engine="openai")
    assert placement.place(attached, [bare], POLICY).fit is not None
    launched = spec(name="local", path=GGUF, engine="openai", command=["llama-server", "-m", "{path}"])
    verdicts = placement.evaluate(launched, [bare, snap(node("has-it"))], POLICY)
    assert [v.node_id for v in verdicts if v.fit] == ["has-it"]
    assert next(v for v in verdicts if v.node_id == "bare").reason == f"model file not present on the node: {GGUF}"
