"""Models declared in YAML: a node's own catalog (`fleetlm node --catalog`) and the control plane's
deployments (`fleetlm controlplane --deployments`) share this format.

    models:
      - name: smollm2-135m
        path: /models/SmolLM2-135M-Instruct.Q4_1.gguf   # relative paths are relative to this file
        format: gguf          # gguf | hf | awq
        engine: llamacpp      # llamacpp | sglang | openai
        device: cpu           # cpu | gpu | any
        context_size: 2048
        # deployment keys (control plane only)
        min_replicas: 0       # 0: scale from zero on the first request
        max_replicas: 2
        idle_timeout: 600     # seconds without requests before a replica is unloaded; 0: never
        cpu_offload_model: smollm2-135m-cpu
        continue_on_failure: true  # a stream cut by a failed node goes on on another replica
        max_running_requests: 3
        max_queued_requests: 16
        # engines that run as a process (SGLang, a launched openai server)
        gpu_count: 2          # GPUs per replica (SGLang: tensor parallel)
        startup_timeout: 600  # seconds to become ready
        engine_args: {mem-fraction-static: 0.8, enable-metrics: true}   # flags added or overridden
        command: [vllm, serve, "{path}", --port, "{port}"]            # engine openai: start this server

The old system's keys are accepted too (model_path, backend, execution_mode; type, gpu_id and port are
taken and unused), so its models.yaml loads. Any other key is refused by name: a misspelt one is a mistake.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleetlm.controlplane.v1 import node_pb2

# Which engine runs which weights format: the one table the control plane and node agents share.
ENGINE_FORMATS = {"llamacpp": {"gguf"}, "sglang": {"hf", "awq"}, "openai": {"gguf", "hf", "awq"}}
# A replica's limits when its spec leaves them unset: sequences decoded together, requests waiting.
# SGLang's 3 is the old system's enforced limit; an attached server's own capacity is unknown.
DEFAULT_SLOTS = {"llamacpp": 4, "sglang": 3, "openai": 4}
DEFAULT_MAX_QUEUED = 16


# A model's name is the id clients send: "smollm2-135m", "llama3.1:8b", or a Hugging Face id such as
# "Qwen/Qwen2.5-7B-Instruct" (what vLLM and SGLang serve by default). One rule for catalogs and DeployModel.
MAX_MODEL_NAME = 256


def model_name_problem(name: str) -> str:
    """What is wrong with a model's name, or "" when nothing is: 1 to MAX_MODEL_NAME printable characters
    without spaces; with "/", parts that are neither empty nor "." or ".." (a path, as in a URL)."""
    if not 0 < len(name) <= MAX_MODEL_NAME or any(c.isspace() or not c.isprintable() for c in name):
        return f"a model's name is 1 to {MAX_MODEL_NAME} characters without spaces or control characters"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return (
            "a model's name may hold '/' between parts (as in 'Qwen/Qwen2.5-7B-Instruct'), none of them empty,"
            " '.' or '..'"
        )
    return ""


def running_limit(spec: node_pb2.ModelSpec) -> int:
    """Requests a replica generates at once (its engine's sequence slots)."""
    if spec.HasField("max_running_requests"):
        return max(1, spec.max_running_requests)
    return DEFAULT_SLOTS.get(spec.engine, 1)


def queue_limit(spec: node_pb2.ModelSpec) -> int:
    """Requests a replica holds waiting before it refuses more."""
    return spec.max_queued_requests if spec.HasField("max_queued_requests") else DEFAULT_MAX_QUEUED


def _flag_value(value: str | int | float | bool | None) -> str:
    """YAML's `true`/empty means a flag without a value, `false` drops the flag; the rest is text."""
    if value is None or value is True:
        return ""
    if value is False:
        return "false"
    return str(value)


class ModelEntry(BaseModel):
    # A key it does not know is a mistake to say (a misspelt `min_replica` was ignored), not to pass over.
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    path: str = Field(validation_alias=AliasChoices("path", "model_path", "source"))
    format: Literal["gguf", "hf", "awq"] = "gguf"
    engine: Literal["llamacpp", "sglang", "openai"] = Field(
        "llamacpp", validation_alias=AliasChoices("engine", "backend")
    )
    device: Literal["cpu", "gpu", "any"] = Field("any", validation_alias=AliasChoices("device", "execution_mode"))
    context_size: int = Field(2048, ge=64, le=1_048_576)
    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(1, ge=1, le=1000)
    idle_timeout: float = Field(0, ge=0)
    cpu_offload_model: str = ""
    continue_on_failure: bool = False
    max_running_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = Field(None, ge=0)
    gpu_count: int | None = Field(None, ge=1, le=64)
    startup_timeout: float | None = Field(None, gt=0)
    engine_args: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    command: list[str] = Field(default_factory=list)
    # The old system's keys that fleetlm has no use for: taken, so that its models.yaml loads, and unused
    # (a GPU is chosen by placement, a port by the agent).
    type: str | None = None
    gpu_id: int | None = None
    port: int | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        problem = model_name_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    @model_validator(mode="after")
    def _replicas(self) -> ModelEntry:
        if self.max_replicas < self.min_replicas:  # as DeployModel refuses it (it was stored as min = max)
            raise ValueError(f"max_replicas ({self.max_replicas}) must be at least min_replicas ({self.min_replicas})")
        return self

    def spec(self) -> node_pb2.ModelSpec:
        spec = node_pb2.ModelSpec(
            name=self.name,
            path=self.path,
            format=self.format,
            engine=self.engine,
            context_size=self.context_size,
            device=self.device,
        )
        if self.max_running_requests is not None:
            spec.max_running_requests = self.max_running_requests
        if self.max_queued_requests is not None:
            spec.max_queued_requests = self.max_queued_requests
        if self.gpu_count is not None:
            spec.gpu_count = self.gpu_count
        if self.startup_timeout is not None:
            spec.startup_timeout.FromNanoseconds(int(self.startup_timeout * 1e9))
        spec.engine_args.update({flag: _flag_value(value) for flag, value in self.engine_args.items()})
        spec.command.extend(self.command)
        return spec

    def deployment(self) -> node_pb2.Deployment:
        deployment = node_pb2.Deployment(
            spec=self.spec(),
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            replicas=self.min_replicas,
            cpu_offload_model=self.cpu_offload_model,
            continue_on_failure=self.continue_on_failure,
        )
        deployment.idle_timeout.FromNanoseconds(int(self.idle_timeout * 1e9))
        return deployment


class Catalog(BaseModel):
    models: list[ModelEntry]


class CatalogError(ValueError):
    pass


def _first_problem(exc: ValidationError) -> str:
    """A catalog's validation errors in one line, each named by where it is (models[0].name: ...)."""
    problems = []
    for error in exc.errors():
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
        message = "unknown field (a typo?)" if error["type"] == "extra_forbidden" else error["msg"]
        problems.append(f"{where}: {message}" if where else message)
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def load_catalog(path: Path) -> list[ModelEntry]:
    """Parse and validate a catalog; errors name the file and the bad entry."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CatalogError(f"cannot read model catalog {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise CatalogError(f"model catalog {path} is not valid YAML{where}: {problem}") from exc
    if raw is None:
        raise CatalogError(f"model catalog {path} is empty: it needs `models:`, a list of models")
    try:
        catalog = Catalog.model_validate(raw if isinstance(raw, dict) else {"models": raw})
    except ValidationError as exc:
        raise CatalogError(f"invalid model catalog {path}: {_first_problem(exc)}") from exc
    names = [m.name for m in catalog.models]
    if len(set(names)) != len(names):
        raise CatalogError(f"model catalog {path} declares a name twice: {names}")
    base = path.absolute().parent
    # Paths are files, relative to the catalog, except an attached server's URL. Made absolute, with no symlink
    # followed: a node reports the files of its models directory by the names they have there, and a
    # deployment of a model linked into it must name it the same way to be placed.
    return [
        m.model_copy(update={"path": os.path.normpath(base / m.path)})
        if m.path and (m.engine != "openai" or m.command)
        else m
        for m in catalog.models
    ]
