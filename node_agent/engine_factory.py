"""From a replica's spec and placement to an engine that can run it: which engine, on which device,
with which limits. Building starts nothing (the host starts the engine); a spec this node can never run
is refused here with a PermanentEngineError that says why, so the host does not retry it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from fleetlm.controlplane.v1 import node_pb2
from mesh.catalog import ENGINE_FORMATS, running_limit
from mesh.lifecycle import free_port
from node_agent.engines.base import Engine, PermanentEngineError
from node_agent.engines.launched import LaunchedServerEngine, command_launch
from node_agent.engines.openai_server import OpenAIServerConfig, OpenAIServerEngine
from node_agent.engines.sglang import GpuShare, sglang_launch
from node_agent.settings import NodeSettings


@dataclass(frozen=True)
class Placement:
    """Where the control plane put a replica (a catalog model has the defaults)."""

    device: str = ""  # "cpu" | "gpu"; "": the engine decides from the spec and the node's GPUs
    gpu_indices: tuple[int, ...] = ()
    memory_bytes: int = 0  # the placement's budget for weights and KV cache; 0: unknown


@dataclass(frozen=True)
class BuiltEngine:
    engine: Engine
    device: str  # where it runs: "cpu" | "gpu"


def api_key(spec: node_pb2.ModelSpec) -> str:
    """The key an OpenAI-compatible server asks for: engine_args `api-key` (or `api_key`)."""
    for name, value in spec.engine_args.items():
        if name.lstrip("-").replace("_", "-").lower() == "api-key" and value.lower() != "false":
            return value
    return ""


class EngineFactory:
    def __init__(self, settings: NodeSettings, gpus: Sequence[node_pb2.Gpu] = ()) -> None:
        self._settings = settings
        self._gpus = list(gpus)

    def build(self, spec: node_pb2.ModelSpec, placement: Placement) -> BuiltEngine:
        if spec.format not in ENGINE_FORMATS.get(spec.engine, set()):
            raise PermanentEngineError(f"engine '{spec.engine}' cannot run '{spec.format}' weights")
        if spec.engine == "llamacpp":
            return self._llamacpp(spec, placement)
        if spec.engine == "sglang":
            return self._sglang(spec, placement)
        if spec.engine == "openai":
            return self._openai(spec, placement)
        raise PermanentEngineError(f"engine '{spec.engine}' is not supported by this node agent")

    def _llamacpp(self, spec: node_pb2.ModelSpec, placement: Placement) -> BuiltEngine:
        from node_agent.engines.llamacpp import LlamaCppConfig, LlamaCppEngine  # imports llama_cpp: only when used

        has_gpu = bool(self._gpus)
        use_gpu = has_gpu and (placement.device == "gpu" or (not placement.device and spec.device != "cpu"))
        config = LlamaCppConfig(
            path=spec.path,
            context_size=spec.context_size or 2048,
            threads=self._settings.threads,
            gpu_layers=-1 if use_gpu else 0,
            slots=running_limit(spec),
            unified_kv=self._settings.unified_kv,
            nice=self._settings.engine_nice,
            idle_priority=self._settings.engine_idle,
        )
        return BuiltEngine(LlamaCppEngine(config), "gpu" if use_gpu else "cpu")

    def _client_config(self, spec: node_pb2.ModelSpec, base_url: str) -> OpenAIServerConfig:
        return OpenAIServerConfig(
            base_url=base_url,
            name=spec.name,
            context_size=spec.context_size,
            slots=running_limit(spec),
            # A server that requires a key gets it as a flag when the agent starts it (engine_args), and
            # as the bearer token of every call.
            api_key=api_key(spec),
            health_interval=self._settings.engine_health_seconds,
        )

    def _sglang(self, spec: node_pb2.ModelSpec, placement: Placement) -> BuiltEngine:
        nvidia = [g for g in self._gpus if g.vendor == "nvidia"]
        if not nvidia:
            raise PermanentEngineError(
                f"model '{spec.name}' ({spec.format}) runs on SGLang, which needs an NVIDIA GPU; this node has none"
            )
        wanted = spec.gpu_count if spec.HasField("gpu_count") else 1
        indices = list(placement.gpu_indices) or [g.index for g in nvidia[:wanted]]
        if len(indices) < wanted:
            raise PermanentEngineError(f"model '{spec.name}' needs {wanted} GPUs; this node has {len(nvidia)}")
        share = GpuShare(indices, placement.memory_bytes, {g.index: g.memory.total_bytes for g in nvidia})
        port = free_port()
        launch = sglang_launch(spec, share, port, self._settings.sglang_python)
        config = self._client_config(spec, f"http://127.0.0.1:{port}")
        # SGLang serves the model under --served-model-name, the deployment's name.
        return BuiltEngine(LaunchedServerEngine(launch, replace(config, upstream_model=spec.name)), "gpu")

    def _openai(self, spec: node_pb2.ModelSpec, placement: Placement) -> BuiltEngine:
        device = placement.device or "cpu"  # the server's own business; what the placement counted on
        if spec.command:
            port = free_port()
            engine = LaunchedServerEngine(
                command_launch(spec, port), self._client_config(spec, f"http://127.0.0.1:{port}")
            )
            return BuiltEngine(engine, device)
        if not spec.path.startswith(("http://", "https://")):
            raise PermanentEngineError(
                f"model '{spec.name}': engine 'openai' needs the server's URL as its path, or a command"
            )
        return BuiltEngine(OpenAIServerEngine(self._client_config(spec, spec.path)), device)
