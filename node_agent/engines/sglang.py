"""SGLang on NVIDIA GPUs: the command line the agent runs for an HF or AWQ replica.

The agent starts `python -m sglang.launch_server` as a supervised child (launched.LaunchedServerEngine)
and talks to its OpenAI-compatible API. What it passes, from the deployment and the placement:

  --model-path PATH --served-model-name NAME --host 127.0.0.1 --port FREE_PORT
  --context-length N                 the deployment's context_size
  --max-running-requests 3           the deployment's max_running_requests (the old system's 3 by default)
  --mem-fraction-static F            the placement's memory budget over the GPU's memory (weights + KV)
  --tp-size K                        when the replica spans K > 1 GPUs
  --quantization awq                 for AWQ weights
  CUDA_VISIBLE_DEVICES=i,j           the GPUs the placement assigned

The KV token pool is left elastic: SGLang sizes it from --mem-fraction-static (no --max-total-tokens).
Every flag can be overridden or dropped, and any other flag added, with the deployment's engine_args.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleetlm.controlplane.v1 import node_pb2
from mesh.catalog import running_limit
from node_agent.engines.launched import Launch

STARTUP_TIMEOUT_SECONDS = 600.0  # downloading nothing, but loading and capturing CUDA graphs takes minutes
MEM_FRACTION_BOUNDS = (0.05, 0.95)


@dataclass(frozen=True)
class GpuShare:
    """What the placement gave a replica: which GPUs, and how many bytes of them in all."""

    indices: Sequence[int]
    memory_bytes: int  # the placement's budget for weights + KV cache, over all the GPUs; 0: unknown
    gpu_total_bytes: Mapping[int, int]  # each GPU's memory, from the node's inventory


def mem_fraction(share: GpuShare) -> float | None:
    """The share of each GPU's memory SGLang may take for weights and KV cache, or None if unknown."""
    totals = [share.gpu_total_bytes.get(i, 0) for i in share.indices]
    if not share.memory_bytes or not totals or min(totals) <= 0:
        return None
    per_gpu = share.memory_bytes / len(share.indices)
    low, high = MEM_FRACTION_BOUNDS
    return round(min(high, max(low, per_gpu / min(totals))), 3)


def apply_engine_args(defaults: dict[str, str], overrides: Mapping[str, str]) -> list[str]:
    """Flags as argv: the defaults, each replaced by an override of the same name ("false" drops it),
    then the other overrides in name order. A value of "" is a flag without a value."""
    flags = dict(defaults)
    for name in sorted(overrides):
        key = name.lstrip("-")
        if overrides[name].lower() == "false":
            flags.pop(key, None)
        else:
            flags[key] = overrides[name]
    argv: list[str] = []
    for key, value in flags.items():
        argv.append(f"--{key}")
        if value != "":
            argv.append(value)
    return argv


def sglang_launch(
    spec: node_pb2.ModelSpec,
    share: GpuShare,
    port: int,
    python: str = sys.executable,
    base_env: Mapping[str, str] | None = None,
) -> Launch:
    """The SGLang server for one replica: argv, environment and readiness."""
    defaults = {
        "model-path": spec.path,
        "served-model-name": spec.name,
        "host": "127.0.0.1",
        "port": str(port),
        # Its own Prometheus /metrics (sglang:*), which the node links by replica (engine_server_info):
        # on by default; `enable-metrics: false` in engine_args turns it off.
        "enable-metrics": "",
    }
    if spec.context_size:
        defaults["context-length"] = str(spec.context_size)
    defaults["max-running-requests"] = str(running_limit(spec))
    fraction = mem_fraction(share)
    if fraction is not None:
        defaults["mem-fraction-static"] = f"{fraction:g}"
    if len(share.indices) > 1:
        defaults["tp-size"] = str(len(share.indices))
    if spec.format == "awq":
        defaults["quantization"] = "awq"
    # The agent talks to the server on this host and port: they are not the deployment's to change.
    overrides = {k: v for k, v in spec.engine_args.items() if k.lstrip("-") not in ("host", "port")}
    env = dict(os.environ if base_env is None else base_env)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in share.indices)
    timeout = spec.startup_timeout.ToTimedelta().total_seconds() if spec.HasField("startup_timeout") else 0
    return Launch(
        name=f"SGLang ({spec.name})",
        argv=[python, "-m", "sglang.launch_server", *apply_engine_args(defaults, overrides)],
        port=port,
        env=env,
        ready_path="/health",
        startup_timeout=timeout or STARTUP_TIMEOUT_SECONDS,
    )
