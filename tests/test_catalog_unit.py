from __future__ import annotations

from pathlib import Path

import pytest

from mesh.catalog import CatalogError, load_catalog


def test_relative_paths_and_the_old_systems_keys(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(
        """
models:
  - name: qwen-coder-1.5b
    type: llm
    execution_mode: gpu
    backend: sglang
    model_path: weights/qwen-awq
    format: awq
    gpu_id: 0
    port: 30003
    idle_timeout: 600
    cpu_offload_model: qwen-coder-1.5b-cpu
  - name: small
    path: small.gguf
"""
    )
    qwen, small = load_catalog(tmp_path / "models.yaml")
    assert (qwen.engine, qwen.device, qwen.format) == ("sglang", "gpu", "awq")
    assert qwen.path == str(tmp_path / "weights" / "qwen-awq")
    assert (small.engine, small.format, small.context_size) == ("llamacpp", "gguf", 2048)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("models: [{name: a}]", "path"),
        ("models: [{name: a, path: x, format: onnx}]", "format"),
        ("models: [{name: a, path: x}, {name: a, path: y}]", "twice"),
        ("models: [{name: 'bad name', path: x}]", "name"),
        ("models: [", "cannot read"),
    ],
)
def test_bad_catalogs_are_refused_with_the_reason(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(CatalogError, match=needle):
        load_catalog(tmp_path / "m.yaml")
