"""Replica placement arithmetic: filters with reasons, memory fit, binpack/spread, locality."""

from __future__ import annotations

import random

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


def test_spread_counts_the_replicas_that_would_share_a_node_not_only_its_memory() -> None:
    """Small replicas of one weights file (several deployments of it) went to one 8 GiB node while another
    stood empty: their memory left the first nearly as free, and the locality bonus did the rest. Replicas
    share a node's cores: spread sends the next one to the empty node, binpack still packs."""
    first = node_pb2.Assignment(node_id="busy", model=spec(name="a"), device="cpu", memory_bytes=GiB // 5)
    second = node_pb2.Assignment(node_id="busy", model=spec(name="b"), device="cpu", memory_bytes=GiB // 5)
    nodes = [snap(node("busy"), node_pb2.SCHEDULING_ACTIVE, first, second), snap(node("empty"))]
    assert placement.place(spec(), nodes, placement.PlacementPolicy("spread", GiB, GiB)).node_id == "empty"
    assert placement.place(spec(), nodes, placement.PlacementPolicy("binpack", GiB, GiB)).node_id == "busy"


def test_locality_breaks_ties_toward_the_node_that_already_reads_the_file() -> None:
    warm = node("warm")
    warm.replicas.append(node_pb2.Replica(model=spec(name="other-name-same-file")))
    assert placement.place(spec(), [snap(node("cold")), snap(warm)], POLICY).node_id == "warm"


def test_one_replica_per_node() -> None:
    mine = node_pb2.Assignment(node_id="n", model=spec(), device="cpu", memory_bytes=GiB)
    verdict = placement.evaluate(spec(), [snap(node("n"), node_pb2.SCHEDULING_ACTIVE, mine)], POLICY)[0]
    assert verdict.fit is None and verdict.reason == "already runs a replica of this model"


def test_a_node_whose_catalog_pins_the_name_takes_no_replica_of_it() -> None:
    # The node serves one model per name: its catalog's (other weights) would stand in for the deployment's.
    pinning = node("pinning")
    pinning.replicas.append(node_pb2.Replica(model=spec(path="/models/other.gguf"), assigned=False))
    verdicts = {v.node_id: v for v in placement.evaluate(spec(), [snap(pinning), snap(node("free"))], POLICY)}
    assert verdicts["pinning"].fit is None and verdicts["pinning"].reason == "its own catalog pins a model of this name"
    assert verdicts["free"].fit is not None
    # Its own assigned replica of the deployment is the assignment's business (one per node), not a pin.
    assigned = node("assigned")
    assigned.replicas.append(node_pb2.Replica(model=spec(), assigned=True))
    assert placement.evaluate(spec(), [snap(assigned)], POLICY)[0].fit is not None


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


def _assigned(name: str, gib: float, at: int, device: str = "cpu", gpus: tuple[int, ...] = ()) -> node_pb2.Assignment:
    a = node_pb2.Assignment(node_id="box", model=spec(name=name), device=device, memory_bytes=int(gib * GiB))
    a.gpu_indices.extend(gpus)
    a.assigned_at.FromSeconds(at)
    return a


def test_a_node_that_came_back_with_less_memory_is_over_committed_by_its_last_placed_replicas() -> None:
    first, second, third = _assigned("first", 2, at=10), _assigned("second", 2, at=20), _assigned("third", 2, at=30)
    held = [third, first, second]
    assert placement.overcommitted(node("box", ram_gib=8), held, POLICY) is None  # 6 GiB fits in 8 - 1
    over = placement.overcommitted(node("box", ram_gib=4), held, POLICY)  # 3 GiB for them: one fits
    assert over is not None and [a.model.name for a in over.excess] == ["third", "second"]
    assert over.reason == (
        "its replicas on the CPU need 6.00 GiB of RAM; it has 3.00 GiB for them (4.00 GiB less the 1.00 GiB"
        " reserve): more than fits (third, second)"
    )
    # A GPU it no longer has, or one smaller than its replicas need.
    on_gpus = [_assigned("a", 10, 1, "gpu", (0,)), _assigned("b", 10, 2, "gpu", (1,))]
    assert placement.overcommitted(node("box", gpus=[24, 24]), on_gpus, POLICY) is None
    over = placement.overcommitted(node("box", gpus=[24]), on_gpus, POLICY)
    assert over is not None and [a.model.name for a in over.excess] == ["b"]
    assert "GPUs it no longer has" in over.reason


# --- decisions unchanged: a random fleet against a straightforward reference -------------------------
# placement.py is written for speed (the spec's facts worked out once per decision, few allocations per
# node, place() keeping only the best); this reference is the same rules written plainly, node by node,
# with every verdict sorted. The two must agree on every verdict, reason and score, and on every place().


def _reference_evaluate(
    spec: node_pb2.ModelSpec, snaps: list[placement.NodeSnapshot], policy: placement.PlacementPolicy
) -> list[tuple[object, ...]]:
    engine = placement.engine_of(spec)
    out = []
    for s in snaps:
        n = s.node
        gpus = list(n.inventory.gpus)
        file = next((f for f in n.inventory.model_files if f.path == spec.path), None)
        attached = engine == "openai" and not spec.command
        reject: tuple[str, str] | None = None
        if s.scheduling == node_pb2.SCHEDULING_CORDONED:
            reject = ("capacity", "node is cordoned")
        elif s.scheduling == node_pb2.SCHEDULING_DRAINING:
            reject = ("capacity", "node is draining")
        elif any(a.model.name == spec.name for a in s.assignments):
            reject = ("capacity", "already runs a replica of this model")
        elif engine in placement.GPU_ONLY_ENGINES and not any(g.vendor == "nvidia" for g in gpus):
            reject = ("format", f"{spec.format} models run on SGLang, which needs an NVIDIA GPU; node has none")
        elif spec.device == "gpu" and not gpus:
            reject = ("format", "deployment needs a GPU; node has none")
        elif not attached and file is None:
            reject = ("capacity", f"model file not present on the node: {spec.path}")
        if reject is not None:
            out.append((True, 0.0, n.node_id, None, reject[1], reject[0]))
            continue
        need = 0 if attached else placement.memory_estimate(spec, file)
        fit: tuple[object, ...] | None = None
        if gpus and spec.device != "cpu":
            count = spec.gpu_count if spec.HasField("gpu_count") else 1
            share = need / count
            free = []
            for g in gpus:
                used = sum(
                    a.memory_bytes / len(a.gpu_indices)
                    for a in s.assignments
                    if a.device == "gpu" and g.index in a.gpu_indices
                )
                free.append((max(0, g.memory.total_bytes - policy.vram_reserve_bytes), used, g.index))
            free.sort(key=lambda e: (e[1] - e[0], e[2]))
            chosen = [e for e in free[:count] if e[1] + share <= e[0]]
            if len(chosen) == count:
                indices = sorted(e[2] for e in chosen)
                fit = (
                    "gpu",
                    indices,
                    need,
                    sum(e[0] for e in chosen),
                    int(sum(e[1] for e in chosen)),
                    sum(1 for a in s.assignments if a.device == "gpu" and set(a.gpu_indices) & set(indices)),
                )
            elif spec.device == "gpu" or engine in placement.GPU_ONLY_ENGINES:
                reason = (
                    f"needs {count} GPUs; node has {len(gpus)}"
                    if count > len(gpus)
                    else f"needs {share / GiB:.2f} GiB of GPU memory on {count} GPU(s); no GPU has that much free"
                )
                out.append((True, 0.0, n.node_id, None, reason, "capacity"))
                continue
        if fit is None:
            used_cpu = sum(a.memory_bytes for a in s.assignments if a.device == "cpu")
            capacity = max(0, n.inventory.ram.total_bytes - policy.ram_reserve_bytes)
            if used_cpu + need > capacity:
                reason = f"needs {need / GiB:.2f} GiB of RAM; {max(0, capacity - used_cpu) / GiB:.2f} GiB is unassigned"
                out.append((True, 0.0, n.node_id, None, reason, "capacity"))
                continue
            fit = ("cpu", [], need, capacity, used_cpu, sum(1 for a in s.assignments if a.device == "cpu"))
        after = (fit[4] + fit[2]) / fit[3] if fit[3] else 1.0  # type: ignore[operator]
        score = after if policy.strategy == "binpack" else (1.0 - after) / (1 + fit[5])  # type: ignore[operator]
        if any(r.model.path == spec.path for r in n.replicas) or any(a.model.path == spec.path for a in s.assignments):
            score += 0.25
        out.append((False, -score, n.node_id, fit, f"fits on {fit[0]} ({policy.strategy} {score:.3f})", ""))
    out.sort(key=lambda v: (v[0], v[1], v[2]))
    return out


def _random_fleet(rng: random.Random, size: int) -> list[placement.NodeSnapshot]:
    paths = [GGUF, "/models/hf", "/models/other.gguf"]
    snaps = []
    for _ in range(size):
        gpus = [
            node_pb2.Gpu(
                index=g,
                vendor=rng.choice(["nvidia", "nvidia", "amd"]),
                memory=node_pb2.Memory(total_bytes=int(rng.choice([0.5, 8, 16, 24, 80]) * GiB)),
            )
            for g in range(rng.choice([0, 0, 1, 2, 4]))
        ]
        files = [
            node_pb2.ModelFile(
                path=p, size_bytes=int(rng.uniform(0.1, 6) * GiB), kv_bytes_per_token=rng.choice([0, 50_000, 131_072])
            )
            for p in paths
            if rng.random() < 0.6
        ]
        n = node_pb2.Node(
            node_id=f"r{rng.randrange(size * 2):04d}",  # some ids repeat: ties break on the id
            inventory=node_pb2.Inventory(
                ram=node_pb2.Memory(total_bytes=rng.choice([2, 8, 16, 64]) * GiB), gpus=gpus, model_files=files
            ),
        )
        if rng.random() < 0.3:
            n.replicas.append(node_pb2.Replica(model=spec(name="warm", path=rng.choice(paths))))
        assignments = []
        for k in range(rng.choice([0, 0, 1, 2, 3])):
            on_gpu = bool(gpus) and rng.random() < 0.5
            indices = sorted(rng.sample([g.index for g in gpus], rng.randint(1, len(gpus)))) if on_gpu else []
            model = spec(name=rng.choice(["m", f"a{k}", f"b{k}"]), path=rng.choice(paths))
            assignments.append(
                node_pb2.Assignment(
                    node_id=n.node_id,
                    model=model,
                    device="gpu" if on_gpu else "cpu",
                    gpu_indices=indices,
                    memory_bytes=int(rng.uniform(0.5, 20) * GiB),
                )
            )
        scheduling = rng.choice(
            [node_pb2.SCHEDULING_ACTIVE] * 6 + [node_pb2.SCHEDULING_CORDONED, node_pb2.SCHEDULING_DRAINING]
        )
        snaps.append(snap(n, scheduling, *assignments))
    return snaps


def _random_spec(rng: random.Random) -> node_pb2.ModelSpec:
    kind = rng.choice(["gguf", "gguf", "hf", "attached", "launched"])
    if kind == "gguf":
        return spec(device=rng.choice(["any", "cpu", "gpu", ""]), context_size=rng.choice([512, 4096, 32768]),
                    max_running_requests=rng.choice([1, 4]))  # fmt: skip
    if kind == "hf":
        return spec(
            name="m", path="/models/hf", format="hf", engine="sglang", device="gpu", gpu_count=rng.choice([1, 2, 3])
        )
    if kind == "attached":
        return spec(path="http://10.0.0.7:8000/v1", engine="openai")
    return spec(engine="openai", command=["llama-server", "-m", "{path}"])


def _fit_fields(fit: placement.Fit | None) -> tuple[object, ...] | None:
    if fit is None:
        return None
    return (fit.device, fit.gpu_indices, fit.memory_bytes, fit.capacity_bytes, fit.used_bytes, fit.sharing)


@pytest.mark.parametrize("seed", range(8))
def test_decisions_match_a_straightforward_reference_on_a_random_fleet(seed: int) -> None:
    rng = random.Random(seed)
    snaps = _random_fleet(rng, 300)
    outcomes: set[object] = set()
    for _ in range(24):
        model = _random_spec(rng)
        policy = placement.PlacementPolicy(rng.choice(["spread", "binpack"]), rng.choice([0, GiB, 2 * GiB]), GiB // 2)
        expected = _reference_evaluate(model, snaps, policy)
        got = [
            (v.fit is None, -v.score, v.node_id, _fit_fields(v.fit), v.reason, v.category)
            for v in placement.evaluate(model, snaps, policy)
        ]
        assert got == expected
        outcomes.update(v[5] or v[3][0] for v in expected)  # type: ignore[index]
        try:
            chosen = placement.place(model, snaps, policy)
        except FleetError as error:
            assert placement.check_format(model) or not any(not e[0] for e in expected), error.message
            continue
        best = next(v for v in placement.evaluate(model, snaps, policy))
        assert (chosen.node_id, chosen.reason, chosen.score, chosen.fit) == (
            best.node_id,
            best.reason,
            best.score,
            best.fit,
        )
    assert outcomes == {"cpu", "gpu", "capacity", "format"}  # the fleet exercises every kind of verdict


def test_no_live_node_is_a_retryable_503_not_a_busy_fleet() -> None:
    # Every lease can lapse at once (etcd frozen, then back) while the nodes register again: a request
    # placed meanwhile hears "come back in a second" (503 with Retry-After), not that the fleet is full (429).
    with pytest.raises(FleetError) as caught:
        placement.place(spec(), [], placement.PlacementPolicy())
    error = caught.value
    assert error.code == ErrorCode.MODEL_UNAVAILABLE and error.http_status == 503
    assert error.retry_after == 1 and "no live nodes" in error.message
