"""Placing a deployment's replica on a node: a chain of filters, then scorers, over a fleet snapshot.

Pure functions, no I/O. Each filter returns why it rejects a node (or None), so every node that does
not get the replica carries a reason; `place` classifies the failure as FORMAT_NOT_SUPPORTED (no node
could ever run this format on this device) or NO_CAPACITY (some could, but not now).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from controlplane import metrics
from fleetlm.controlplane.v1 import node_pb2
from mesh.catalog import ENGINE_FORMATS, running_limit
from mesh.errors import ErrorCode, FleetError

GiB = 1024**3

# Which engine runs which weights format, and on what.
ENGINE_FOR_FORMAT = {"gguf": "llamacpp", "hf": "sglang", "awq": "sglang"}
GPU_ONLY_ENGINES = {"sglang"}


@dataclass(frozen=True)
class PlacementPolicy:
    strategy: Literal["binpack", "spread"] = "spread"
    ram_reserve_bytes: int = 2 * GiB  # left for the OS and the agent itself
    vram_reserve_bytes: int = GiB // 2  # CUDA context, fragmentation


@dataclass(frozen=True)
class NodeSnapshot:
    node: node_pb2.Node
    scheduling: int = node_pb2.SCHEDULING_ACTIVE
    assignments: tuple[node_pb2.Assignment, ...] = ()


@dataclass
class Fit:
    """A node the replica fits on, and how it would run there."""

    device: str
    gpu_indices: list[int] = field(default_factory=list)
    memory_bytes: int = 0
    capacity_bytes: int = 0
    used_bytes: int = 0  # already assigned on that device, before this replica
    sharing: int = 0  # replicas already assigned on that device (the CPU, or any of those GPUs)


@dataclass
class Verdict:
    node_id: str
    fit: Fit | None
    reason: str
    category: str = ""  # "format" or "capacity" for rejections
    score: float = 0.0


def engine_of(spec: node_pb2.ModelSpec) -> str:
    return spec.engine or ENGINE_FOR_FORMAT.get(spec.format, "llamacpp")


def check_format(spec: node_pb2.ModelSpec) -> str | None:
    """Why a spec can never run anywhere, or None."""
    engine = engine_of(spec)
    if engine not in ENGINE_FORMATS:
        return f"unknown engine '{engine}'"
    if spec.format not in ENGINE_FORMATS[engine]:
        return f"engine '{engine}' cannot run '{spec.format}' weights"
    if engine in GPU_ONLY_ENGINES and spec.device == "cpu":
        return f"engine '{engine}' runs on NVIDIA GPUs only, but the deployment asks for a CPU"
    return None


def model_file(node: node_pb2.Node, path: str) -> node_pb2.ModelFile | None:
    return next((f for f in node.inventory.model_files if f.path == path), None)


def memory_estimate(spec: node_pb2.ModelSpec, file: node_pb2.ModelFile | None) -> int:
    """Weights (the file's size) plus the KV cache (f16) for the whole context of every sequence the
    engine decodes at once."""
    weights = file.size_bytes if file else 0
    per_token = file.kv_bytes_per_token if file and file.kv_bytes_per_token else 0
    if not per_token:
        per_token = 64 * 1024  # unknown architecture: a typical 1-3B model with grouped-query attention
    return weights + per_token * max(spec.context_size, 1) * running_limit(spec)


# --- filters: (need, snapshot, file) -> (category, reason) or None -------------------------------------
# A decision runs every filter over every node (1,000 nodes: 4,000 calls), so what depends on the spec
# alone is worked out once, in `_Need`, and the node's file of the weights once per node; and a decision
# allocates little per node, because its garbage collections are what its slowest runs wait for.

Reject = tuple[str, str]  # (category, reason)
_CORDONED: Reject = ("capacity", "node is cordoned")
_DRAINING: Reject = ("capacity", "node is draining")
_HOSTING: Reject = ("capacity", "already runs a replica of this model")
_PINNED: Reject = ("capacity", "its own catalog pins a model of this name")
_NO_GPU: Reject = ("format", "deployment needs a GPU; node has none")


@dataclass(frozen=True)
class _Need:
    """What a spec asks of every node."""

    spec: node_pb2.ModelSpec
    name: str
    path: str
    gpu_only: bool  # its engine runs on NVIDIA GPUs only
    attached: bool  # a server that already runs elsewhere: nothing to load, costs the node nothing
    wants_gpu: bool
    cpu_only: bool
    gpu_count: int
    kv_tokens: int  # context tokens the KV cache holds: context size times sequences decoded at once

    @classmethod
    def of(cls, spec: node_pb2.ModelSpec) -> _Need:
        engine = engine_of(spec)
        return cls(
            spec=spec,
            name=spec.name,
            path=spec.path,
            gpu_only=engine in GPU_ONLY_ENGINES,
            attached=engine == "openai" and not spec.command,
            wants_gpu=spec.device == "gpu" or engine in GPU_ONLY_ENGINES,
            cpu_only=spec.device == "cpu",
            gpu_count=spec.gpu_count if spec.HasField("gpu_count") else 1,
            kv_tokens=max(spec.context_size, 1) * running_limit(spec),
        )

    def memory(self, file: node_pb2.ModelFile | None) -> int:
        """memory_estimate, with the spec's part worked out already."""
        if self.attached:
            return 0
        weights = file.size_bytes if file else 0
        per_token = (file.kv_bytes_per_token if file else 0) or 64 * 1024  # see memory_estimate
        return weights + per_token * self.kv_tokens


def _schedulable(need: _Need, snap: NodeSnapshot, file: node_pb2.ModelFile | None) -> Reject | None:
    if snap.scheduling == node_pb2.SCHEDULING_CORDONED:
        return _CORDONED
    if snap.scheduling == node_pb2.SCHEDULING_DRAINING:
        return _DRAINING
    return None


def _not_hosting(need: _Need, snap: NodeSnapshot, file: node_pb2.ModelFile | None) -> Reject | None:
    for assignment in snap.assignments:
        if assignment.model.name == need.name:
            return _HOSTING
    # A model of that name pinned by the node's own catalog (--catalog): the node serves one model per name,
    # and its catalog's would stand in for the deployment's (other weights, another context).
    for replica in snap.node.replicas:
        if replica.model.name == need.name and not replica.assigned:
            return _PINNED
    return None


def _device(need: _Need, snap: NodeSnapshot, file: node_pb2.ModelFile | None) -> Reject | None:
    if need.gpu_only and not any(g.vendor == "nvidia" for g in snap.node.inventory.gpus):
        return "format", f"{need.spec.format} models run on SGLang, which needs an NVIDIA GPU; node has none"
    if need.spec.device == "gpu" and not snap.node.inventory.gpus:
        return _NO_GPU
    return None


def _file_present(need: _Need, snap: NodeSnapshot, file: node_pb2.ModelFile | None) -> Reject | None:
    if need.attached:
        return None  # a server that is already running: nothing to load from disk
    if file is None:
        return "capacity", f"model file not present on the node: {need.path}"
    return None


FILTERS: tuple[Callable[[_Need, NodeSnapshot, node_pb2.ModelFile | None], Reject | None], ...] = (
    _schedulable,
    _not_hosting,
    _device,
    _file_present,
)


def _gpu_fit(need: _Need, snap: NodeSnapshot, mem: int, policy: PlacementPolicy) -> Fit | Reject | None:
    """The GPUs the replica fits on; a rejection if it must have a GPU; None to try the CPU."""
    gpus = snap.node.inventory.gpus
    assignments = [a for a in snap.assignments if a.device == "gpu"]
    count = need.gpu_count
    share = mem / max(count, 1)  # a tensor-parallel replica splits weights and KV cache over its GPUs
    free: list[tuple[int, float, int]] = []
    for g in gpus:
        index = g.index
        used = 0.0
        for a in assignments:  # an assignment's memory is spread evenly over its GPUs
            if index in a.gpu_indices:
                used += a.memory_bytes / len(a.gpu_indices)
        free.append((max(0, g.memory.total_bytes - policy.vram_reserve_bytes), used, index))
    free.sort(key=lambda entry: (entry[1] - entry[0], entry[2]))  # most free memory first
    chosen = [entry for entry in free[:count] if entry[1] + share <= entry[0]]
    if len(chosen) == count:
        gpu_capacity, gpu_used = sum(e[0] for e in chosen), sum(e[1] for e in chosen)
        indices = sorted(e[2] for e in chosen)
        sharing = sum(1 for a in assignments if set(a.gpu_indices) & set(indices))
        return Fit("gpu", indices, mem, gpu_capacity, int(gpu_used), sharing)
    if need.wants_gpu:
        if count > len(gpus):
            return "capacity", f"needs {count} GPUs; node has {len(gpus)}"
        return "capacity", f"needs {share / GiB:.2f} GiB of GPU memory on {count} GPU(s); no GPU has that much free"
    return None


def _memory_fit(
    need: _Need, snap: NodeSnapshot, file: node_pb2.ModelFile | None, policy: PlacementPolicy
) -> Fit | Reject:
    mem = need.memory(file)
    inventory = snap.node.inventory
    if not need.cpu_only and inventory.gpus:
        on_gpu = _gpu_fit(need, snap, mem, policy)
        if on_gpu is not None:
            return on_gpu
    used = sharing = 0
    for a in snap.assignments:
        if a.device == "cpu":
            used += a.memory_bytes
            sharing += 1
    capacity = max(0, inventory.ram.total_bytes - policy.ram_reserve_bytes)
    if used + mem > capacity:
        return "capacity", (f"needs {mem / GiB:.2f} GiB of RAM; {max(0, capacity - used) / GiB:.2f} GiB is unassigned")
    return Fit("cpu", [], mem, capacity, used, sharing)


def _judge(need: _Need, snap: NodeSnapshot, policy: PlacementPolicy) -> Fit | Reject:
    """The filters in order, then the memory fit: the first rejection, or how the replica fits."""
    file = None
    path = need.path
    for candidate in snap.node.inventory.model_files:  # model_file(), inline: this runs per node
        if candidate.path == path:
            file = candidate
            break
    for check in FILTERS:
        rejected = check(need, snap, file)
        if rejected is not None:
            return rejected
    return _memory_fit(need, snap, file, policy)


@dataclass(frozen=True)
class Overcommit:
    """A node whose assigned replicas need more memory than it has now: those beyond what fits, and why."""

    excess: tuple[node_pb2.Assignment, ...]
    reason: str


def overcommitted(
    node: node_pb2.Node, assignments: Iterable[node_pb2.Assignment], policy: PlacementPolicy
) -> Overcommit | None:
    """Whether the replicas assigned to `node` still fit it (None), as placement counts memory: a node that
    came back with less RAM, or fewer or smaller GPUs, than it had when they were placed holds more than fits.
    The replicas placed first are the ones kept; the excess is the rest, the last placed first."""
    ram_capacity = max(0, node.inventory.ram.total_bytes - policy.ram_reserve_bytes)
    gpu_capacity = {g.index: max(0, g.memory.total_bytes - policy.vram_reserve_bytes) for g in node.inventory.gpus}
    ram_used, ram_needed = 0, 0
    gpu_used = dict.fromkeys(gpu_capacity, 0.0)
    excess: list[node_pb2.Assignment] = []
    for a in sorted(assignments, key=lambda a: (a.assigned_at.ToNanoseconds(), a.model.name)):
        if a.device == "gpu":
            share = a.memory_bytes / max(1, len(a.gpu_indices))
            if all(i in gpu_capacity and gpu_used[i] + share <= gpu_capacity[i] for i in a.gpu_indices):
                for i in a.gpu_indices:
                    gpu_used[i] += share
                continue
        else:
            ram_needed += a.memory_bytes
            if ram_used + a.memory_bytes <= ram_capacity:
                ram_used += a.memory_bytes
                continue
        excess.append(a)
    if not excess:
        return None
    excess.reverse()
    why = []
    if any(a.device != "gpu" for a in excess):
        why.append(
            f"its replicas on the CPU need {ram_needed / GiB:.2f} GiB of RAM; it has {ram_capacity / GiB:.2f} GiB"
            f" for them ({node.inventory.ram.total_bytes / GiB:.2f} GiB less the"
            f" {policy.ram_reserve_bytes / GiB:.2f} GiB reserve)"
        )
    if any(a.device == "gpu" for a in excess):
        why.append("its replicas on GPUs need more GPU memory than its GPUs have now, or GPUs it no longer has")
    names = ", ".join(a.model.name for a in excess)
    return Overcommit(tuple(excess), f"{'; '.join(why)}: more than fits ({names})")


# --- scorers: higher is better ------------------------------------------------------------------------


def _policy_score(fit: Fit, policy: PlacementPolicy) -> float:
    """binpack: the fuller the device after, the better. spread: the emptier, divided among the replicas that
    would share the device: replicas share its compute (a CPU's cores, a GPU's SMs) however little memory
    they take, so a node with small replicas is not as free as its memory says (seven replicas of a small
    model went to one node while another stood empty)."""
    after = (fit.used_bytes + fit.memory_bytes) / fit.capacity_bytes if fit.capacity_bytes else 1.0
    return after if policy.strategy == "binpack" else (1.0 - after) / (1 + fit.sharing)


def _locality_score(need: _Need, snap: NodeSnapshot) -> float:
    # Another replica on the node reads the same weights file: its pages are likely cached already.
    path = need.path
    same_file = any(r.model.path == path for r in snap.node.replicas) or any(
        a.model.path == path for a in snap.assignments
    )
    return 0.25 if same_file else 0.0


def _score(need: _Need, snap: NodeSnapshot, fit: Fit, policy: PlacementPolicy) -> float:
    return _policy_score(fit, policy) + _locality_score(need, snap)


def _verdict(need: _Need, snap: NodeSnapshot, policy: PlacementPolicy, judged: Fit | Reject) -> Verdict:
    node_id = snap.node.node_id
    if not isinstance(judged, Fit):
        return Verdict(node_id, None, judged[1], category=judged[0])
    score = _score(need, snap, judged, policy)
    return Verdict(node_id, judged, f"fits on {judged.device} ({policy.strategy} {score:.3f})", score=score)


def _rank(verdict: Verdict) -> tuple[bool, float, str]:
    return (verdict.fit is None, -verdict.score, verdict.node_id)


def evaluate(spec: node_pb2.ModelSpec, snapshots: Iterable[NodeSnapshot], policy: PlacementPolicy) -> list[Verdict]:
    """Every node's verdict, those that fit first, best score first."""
    need = _Need.of(spec)
    verdicts = [_verdict(need, snap, policy, _judge(need, snap, policy)) for snap in snapshots]
    verdicts.sort(key=_rank)
    return verdicts


def place(spec: node_pb2.ModelSpec, snapshots: Iterable[NodeSnapshot], policy: PlacementPolicy) -> Verdict:
    """The best node for one more replica, or a FleetError that lists every node's reason. Timed, and a
    failure counted by its reason, for the control plane's metrics (the only thing here that is not pure)."""
    snapshots = list(snapshots)
    started = time.perf_counter()
    try:
        return _place(spec, snapshots, policy)
    except FleetError as error:
        reason = "format" if error.code == ErrorCode.FORMAT_NOT_SUPPORTED else "capacity"
        metrics.PLACEMENT_FAILURES.labels(reason if snapshots else "no_nodes").inc()
        raise
    finally:
        metrics.PLACEMENT_SECONDS.observe(time.perf_counter() - started)


def _place(spec: node_pb2.ModelSpec, snapshots: list[NodeSnapshot], policy: PlacementPolicy) -> Verdict:
    never = check_format(spec)
    if never:
        raise FleetError(ErrorCode.FORMAT_NOT_SUPPORTED, f"model '{spec.name}': {never}", param="format")
    # evaluate()'s first verdict, found in one pass that keeps only the best so far: placing a replica
    # needs no verdict for the nodes that lose, unless every node does.
    need = _Need.of(spec)
    best: tuple[float, str, NodeSnapshot, Fit] | None = None
    for snap in snapshots:
        judged = _judge(need, snap, policy)
        if isinstance(judged, Fit):
            score = _score(need, snap, judged, policy)
            node_id = snap.node.node_id
            if best is None or score > best[0] or (score == best[0] and node_id < best[1]):
                best = (score, node_id, snap, judged)
    if best is not None:
        return _verdict(need, best[2], policy, best[3])
    verdicts = evaluate(spec, snapshots, policy)
    if not verdicts:
        # Not a busy fleet (429) but one that cannot serve now: no node is registered (none started yet, or
        # every lease lapsed at once and the nodes are registering again). A 503 that says when to retry.
        raise FleetError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"model '{spec.name}' cannot be placed: no live nodes",
            retry_after_seconds=1,
        )
    reasons = "; ".join(f"{v.node_id}: {v.reason}" for v in verdicts)
    code = ErrorCode.FORMAT_NOT_SUPPORTED if all(v.category == "format" for v in verdicts) else ErrorCode.NO_CAPACITY
    raise FleetError(code, f"model '{spec.name}' fits on no node ({reasons})", retry_after_seconds=10)
