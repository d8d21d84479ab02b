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
        ("models: [{name: 'org//m', path: x}]", "none of them empty"),
        ("models: [{name: '../m', path: x}]", "none of them empty"),
        # a misspelt key was ignored; max below min was stored as min = max
        ("models: [{name: a, path: x, min_replica: 2}]", r"models\[0\]\.min_replica: unknown field \(a typo\?\)"),
        ("models: [{name: a, path: x, min_replicas: 3, max_replicas: 1}]", "must be at least min_replicas"),
        ("models: [", "is not valid YAML at line 1, column 10: expected the node content"),
        ("", "is empty: it needs `models:`"),
    ],
)
def test_bad_catalogs_are_refused_with_the_reason(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(CatalogError, match=needle) as refused:
        load_catalog(tmp_path / "m.yaml")
    # One line naming the file (a YAML error said "<unicode string>", a validation error took four lines).
    assert "\n" not in str(refused.value) and str(tmp_path / "m.yaml") in str(refused.value)


def test_a_model_linked_into_the_models_directory_is_named_as_the_node_reports_it(tmp_path: Path) -> None:
    """A deployments file naming a weights file through a symlink (a model linked into --models-dir), and the
    node's inventory of that directory, give the same path: placement matches paths as they are. The file's
    path was resolved to the link's target, which no node reported, and the deployment was never placed."""
    from node_agent.inventory import model_files

    store = tmp_path / "store"
    store.mkdir()
    (store / "weights-v3.gguf").write_bytes(b"GGUF" + bytes(60))
    models = tmp_path / "models"
    models.mkdir()
    (models / "smol.gguf").symlink_to(store / "weights-v3.gguf")
    catalog = tmp_path / "deployments.yaml"
    catalog.write_text("models:\n  - {name: smol, path: models/smol.gguf, format: gguf}\n")
    [entry] = load_catalog(catalog)
    assert entry.path == str(models / "smol.gguf")
    reported = [f.path for f in model_files([], [models])]
    assert reported == [entry.path]
    # A models directory given as a relative path is reported absolute, as deployments name files.
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert [f.path for f in model_files([], [Path("models")])] == [entry.path]
    finally:
        os.chdir(cwd)


def test_a_hugging_face_id_is_a_name_as_deploy_model_takes_it(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "models: [{name: Qwen/Qwen2.5-0.5B-Instruct, path: x.gguf}, {name: 'llama3.1:8b', path: y.gguf}]"
    )
    assert [m.name for m in load_catalog(tmp_path / "m.yaml")] == ["Qwen/Qwen2.5-0.5B-Instruct", "llama3.1:8b"]
