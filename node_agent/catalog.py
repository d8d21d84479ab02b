"""The models a node serves, declared in a YAML catalog.

    models:
      - name: smollm2-135m
        path: /models/SmolLM2-135M-Instruct.Q4_1.gguf   # relative paths are relative to this file
        format: gguf          # gguf | hf | awq
        engine: llamacpp      # llamacpp | sglang | openai
        device: cpu           # cpu | gpu | any
        context_size: 2048

The old system's keys are accepted too (model_path, backend, execution_mode), so its models.yaml loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from fleetlm.controlplane.v1 import node_pb2


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    path: str = Field(validation_alias=AliasChoices("path", "model_path", "source"))
    format: Literal["gguf", "hf", "awq"] = "gguf"
    engine: Literal["llamacpp", "sglang", "openai"] = Field(
        "llamacpp", validation_alias=AliasChoices("engine", "backend")
    )
    device: Literal["cpu", "gpu", "any"] = Field(
        "any", validation_alias=AliasChoices("device", "execution_mode")
    )
    context_size: int = Field(2048, ge=64, le=1_048_576)

    def spec(self) -> node_pb2.ModelSpec:
        return node_pb2.ModelSpec(
            name=self.name,
            path=self.path,
            format=self.format,
            engine=self.engine,
            context_size=self.context_size,
            device=self.device,
        )


class Catalog(BaseModel):
    models: list[ModelEntry]


class CatalogError(ValueError):
    pass


def load_catalog(path: Path) -> list[ModelEntry]:
    """Parse and validate a catalog; errors name the file and the bad entry."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(f"cannot read model catalog {path}: {exc}") from exc
    try:
        catalog = Catalog.model_validate(raw if isinstance(raw, dict) else {"models": raw})
    except ValidationError as exc:
        raise CatalogError(f"invalid model catalog {path}:\n{exc}") from exc
    names = [m.name for m in catalog.models]
    if len(set(names)) != len(names):
        raise CatalogError(f"model catalog {path} declares a name twice: {names}")
    base = path.resolve().parent
    return [
        m.model_copy(update={"path": str((base / m.path).resolve())}) if m.engine != "openai" else m
        for m in catalog.models
    ]
