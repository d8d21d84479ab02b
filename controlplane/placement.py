"""Placing a deployment's replica on a node: a chain of filters, then scorers, over a fleet snapshot.

Pure functions, no I/O. Each filter returns why it rejects a node (or None), so every node that does
not get the replica carries a reason; `place` classifies the failure as FORMAT_NOT_SUPPORTED (no node
could ever run this format on this device) or NO_CAPACITY (some could, but not now).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

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


# --- filters: (spec, snapshot, policy) -> reason or None; the last one returns the fit --------------

Reject = tuple[str, str]  # (category, reason)


def _schedulable(spec: node_pb2.ModelSpec, snap: NodeSnapshot) -> Reject | None:
    if snap.scheduling == node_pb2.SCHEDULING_CORDONED:
        return "capacity", "node is cordoned"
    if snap.scheduling == node_pb2.SCHEDULING_DRAINING:
        return "capacity", "node is draining"
    return None


def _not_hosting(spec: node_pb2.ModelSpec, snap: NodeSnapshot) -> Reject | None:
    if any(a.model.name == spec.name for a in snap.assignments):
        return "capacity", "already runs a replica of this model"
    return None


def _device(spec: node_pb2.ModelSpec, snap: NodeSnapshot) -> Reject | None:
    gpus = snap.node.inventory.gpus
    engine = engine_of(spec)
    if engine in GPU_ONLY_ENGINES and not any(g.vendor == "nvidia" for g in gpus):
        return "format", f"{spec.format} models run on SGLang, which needs an NVIDIA GPU; node has none"
    if spec.device == "gpu" and not gpus:
        return "format", "deployment needs a GPU; node has none"
    return None


def _file_present(spec: node_pb2.ModelSpec, snap: NodeSnapshot) -> Reject | None:
    if engine_of(spec) == "openai" and not spec.command:
        return None  # a server that is already running: nothing to load from disk
    if model_file(snap.node, spec.path) is None:
        return "capacity", f"model file not present on the node: {spec.path}"
    return None


FILTERS: tuple[Callable[[node_pb2.ModelSpec, NodeSnapshot], Reject | None], ...] = (
    _schedulable,
    _not_hosting,
    _device,
    _file_present,
)


def _memory_fit(spec: node_pb2.ModelSpec, snap: NodeSnapshot, policy: PlacementPolicy) -> Fit | Reject:
    attached = engine_of(spec) == "openai" and not spec.command  # runs elsewhere: costs this node nothing
    need = 0 if attached else memory_estimate(spec, model_file(snap.node, spec.path))
    gpus = snap.node.inventory.gpus
    wants_gpu = spec.device == "gpu" or engine_of(spec) in GPU_ONLY_ENGINES
    if gpus and spec.device != "cpu":
        count = spec.gpu_count if spec.HasField("gpu_count") else 1
        share = need / max(count, 1)  # a tensor-parallel replica splits weights and KV cache over its GPUs

        def used_on(index: int) -> float:
            return sum(  # an assignment's memory is spread evenly over its GPUs
                a.memory_bytes / len(a.gpu_indices)
                for a in snap.assignments
                if a.device == "gpu" and index in a.gpu_indices
            )

        free: list[tuple[int, float, int]] = sorted(
            ((max(0, g.memory.total_bytes - policy.vram_reserve_bytes), used_on(g.index), g.index) for g in gpus),
            key=lambda entry: (entry[1] - entry[0], entry[2]),  # most free memory first
        )
        chosen = [entry for entry in free[:count] if entry[1] + share <= entry[0]]
        if len(chosen) == count:
            gpu_capacity, gpu_used = sum(e[0] for e in chosen), sum(e[1] for e in chosen)
            return Fit("gpu", sorted(e[2] for e in chosen), need, gpu_capacity, int(gpu_used))
        if wants_gpu:
            if count > len(gpus):
                return "capacity", f"needs {count} GPUs; node has {len(gpus)}"
            return "capacity", f"needs {share / GiB:.2f} GiB of GPU memory on {count} GPU(s); no GPU has that much free"
    used = sum(a.memory_bytes for a in snap.assignments if a.device == "cpu")
    capacity = max(0, snap.node.inventory.ram.total_bytes - policy.ram_reserve_bytes)
    if used + need > capacity:
        return "capacity", (f"needs {need / GiB:.2f} GiB of RAM; {max(0, capacity - used) / GiB:.2f} GiB is unassigned")
    return Fit("cpu", [], need, capacity, used)


# --- scorers: higher is better ------------------------------------------------------------------------


def _policy_score(fit: Fit, policy: PlacementPolicy) -> float:
    after = (fit.used_bytes + fit.memory_bytes) / fit.capacity_bytes if fit.capacity_bytes else 1.0
    return after if policy.strategy == "binpack" else 1.0 - after


def _locality_score(spec: node_pb2.ModelSpec, snap: NodeSnapshot) -> float:
    # Another replica on the node reads the same weights file: its pages are likely cached already.
    same_file = any(r.model.path == spec.path for r in snap.node.replicas) or any(
        a.model.path == spec.path for a in snap.assignments
    )
    return 0.25 if same_file else 0.0


def evaluate(spec: node_pb2.ModelSpec, snapshots: Iterable[NodeSnapshot], policy: PlacementPolicy) -> list[Verdict]:
    """Every node's verdict, those that fit first, best score first."""
    verdicts = []
    for snap in snapshots:
        node_id = snap.node.node_id
        rejected = next((r for r in (f(spec, snap) for f in FILTERS) if r is not None), None)
        if rejected is None:
            fit_or_reject = _memory_fit(spec, snap, policy)
            if isinstance(fit_or_reject, Fit):
                fit = fit_or_reject
                score = _policy_score(fit, policy) + _locality_score(spec, snap)
                reason = f"fits on {fit.device} ({policy.strategy} {score:.3f})"
                verdicts.append(Verdict(node_id, fit, reason, score=score))
                continue
            rejected = fit_or_reject
        verdicts.append(Verdict(node_id, None, rejected[1], category=rejected[0]))
    verdicts.sort(key=lambda v: (v.fit is None, -v.score, v.node_id))
    return verdicts


def place(spec: node_pb2.ModelSpec, snapshots: Iterable[NodeSnapshot], policy: PlacementPolicy) -> Verdict:
    """The best node for one more replica, or a FleetError that lists every node's reason."""
    never = check_format(spec)
    if never:
        raise FleetError(ErrorCode.FORMAT_NOT_SUPPORTED, f"model '{spec.name}': {never}", param="format")
    verdicts = evaluate(spec, snapshots, policy)
    if verdicts and verdicts[0].fit is not None:
        return verdicts[0]
    if not verdicts:
        raise FleetError(ErrorCode.NO_CAPACITY, f"model '{spec.name}' cannot be placed: no live nodes")
    reasons = "; ".join(f"{v.node_id}: {v.reason}" for v in verdicts)
    code = ErrorCode.FORMAT_NOT_SUPPORTED if all(v.category == "format" for v in verdicts) else ErrorCode.NO_CAPACITY
    raise FleetError(code, f"model '{spec.name}' fits on no node ({reasons})", retry_after_seconds=10)
