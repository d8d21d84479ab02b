"""What this machine has: CPU, RAM, GPUs (through NVML when present), disk and model files.

Every probe is best-effort: a machine without NVIDIA's library or without a GPU reports zero GPUs, never
fails. Probes touch files and drivers, so callers run `collect` off the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

import psutil
import yaml

from fleetlm.controlplane.v1 import node_pb2
from node_agent import gguf_header

log = logging.getLogger(__name__)

MODEL_SUFFIXES = {".gguf": "gguf", ".safetensors": "hf"}
GiB = 1024**3


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def gpus() -> list[node_pb2.Gpu]:
    """NVIDIA GPUs through NVML; [] when the library, the driver or a GPU is missing."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        log.debug("NVML not available: %s", exc)
        return []
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            found.append(
                node_pb2.Gpu(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else name,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                    memory=node_pb2.Memory(total_bytes=memory.total, free_bytes=memory.free),
                    vendor="nvidia",
                )
            )
        return found
    except Exception as exc:
        log.warning("NVML query failed, reporting no GPUs: %s", exc)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _kv_bytes_per_token(path: Path) -> int:
    try:
        if path.suffix == ".gguf":
            return gguf_header.kv_bytes_per_token(path)
        config = path / "config.json"
        if config.is_file():
            c = json.loads(config.read_text())
            heads = int(c.get("num_attention_heads") or 0)
            head_dim = int(c.get("head_dim") or (int(c.get("hidden_size", 0)) // heads if heads else 0))
            kv_heads = int(c.get("num_key_value_heads") or heads)
            return 2 * int(c.get("num_hidden_layers", 0)) * kv_heads * head_dim * 2
    except (OSError, ValueError) as exc:
        log.debug("no KV size for %s: %s", path, exc)
    return 0


class ModelFiles:
    """The catalog's files that exist, plus model files and HF model folders in the models directories,
    listed again as often as asked at the cost of a directory listing and a stat per file: a file's KV size
    (its header or config.json, read) is kept while its size and modification time stay the same."""

    def __init__(self, paths: Iterable[str], models_dirs: Iterable[Path]) -> None:
        self._paths = {Path(p) for p in paths}
        self._dirs = list(models_dirs)
        self._kv: dict[Path, tuple[tuple[int, int], int]] = {}  # path -> ((size, mtime_ns), kv bytes per token)

    def scan(self) -> list[node_pb2.ModelFile]:
        candidates = set(self._paths)
        for directory in self._dirs:
            directory = directory.absolute()  # named as deployments name them: absolute, links not followed
            try:
                for p in directory.iterdir():
                    if p.suffix in MODEL_SUFFIXES or (p / "config.json").is_file():
                        candidates.add(p)
            except OSError:
                continue  # not there (yet), or not a directory
        files = []
        kv: dict[Path, tuple[tuple[int, int], int]] = {}
        for path in sorted(candidates):
            try:
                if path.is_dir():
                    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                    fmt = "awq" if "awq" in path.name.lower() else "hf"
                    changed = (path / "config.json").stat().st_mtime_ns if (path / "config.json").is_file() else 0
                else:
                    stat = path.stat()
                    size, changed = stat.st_size, stat.st_mtime_ns
                    fmt = MODEL_SUFFIXES.get(path.suffix, "")
            except OSError:
                continue
            known = self._kv.get(path)
            per_token = known[1] if known is not None and known[0] == (size, changed) else _kv_bytes_per_token(path)
            kv[path] = ((size, changed), per_token)
            files.append(node_pb2.ModelFile(path=str(path), size_bytes=size, format=fmt, kv_bytes_per_token=per_token))
        self._kv = kv  # files gone are forgotten
        return files


def model_files(paths: Iterable[str], models_dirs: Iterable[Path]) -> list[node_pb2.ModelFile]:
    """The catalog's files that exist, plus model files and HF model folders in the models directories."""
    return ModelFiles(paths, models_dirs).scan()


def collect(
    models_dirs: list[Path],
    catalog_paths: Iterable[str],
    override: Path | None = None,
    files: ModelFiles | None = None,
) -> node_pb2.Inventory:
    """`files`: the scanner to list the model files with (one the agent keeps, whose header reads are kept)."""
    memory = psutil.virtual_memory()
    disk_free = 0
    for directory in models_dirs[:1]:
        try:
            disk_free = shutil.disk_usage(directory).free
        except OSError:
            pass
    inventory = node_pb2.Inventory(
        hostname=socket.gethostname(),
        cpu=node_pb2.Cpu(model=cpu_model(), cores=os.cpu_count() or 1),
        ram=node_pb2.Memory(total_bytes=memory.total, free_bytes=memory.available),
        gpus=gpus(),
        models_disk_free_bytes=disk_free,
        model_files=(files or ModelFiles(catalog_paths, models_dirs)).scan(),
    )
    if override is not None:
        apply_override(inventory, override)
    return inventory


def apply_override(inventory: node_pb2.Inventory, path: Path) -> None:
    """Replace parts of the measured inventory with declared ones, for placement tests and for
    operators who want to hide capacity. YAML keys: ram_total_gib, cpu_cores, gpus (a list of
    {name, memory_gib, vendor})."""
    data = yaml.safe_load(path.read_text()) or {}
    if "ram_total_gib" in data:
        inventory.ram.total_bytes = int(float(data["ram_total_gib"]) * GiB)
        inventory.ram.free_bytes = min(inventory.ram.free_bytes, inventory.ram.total_bytes)
    if "cpu_cores" in data:
        inventory.cpu.cores = int(data["cpu_cores"])
    if "gpus" in data:
        del inventory.gpus[:]
        for index, gpu in enumerate(data["gpus"] or []):
            total = int(float(gpu.get("memory_gib", 0)) * GiB)
            inventory.gpus.append(
                node_pb2.Gpu(
                    index=index,
                    name=str(gpu.get("name", "declared GPU")),
                    uuid=f"declared-{index}",
                    memory=node_pb2.Memory(total_bytes=total, free_bytes=total),
                    vendor=str(gpu.get("vendor", "nvidia")),
                )
            )


def ram_free_bytes() -> int:
    return int(psutil.virtual_memory().available)
