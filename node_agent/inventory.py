"""What this machine has: CPU, RAM, GPUs (through NVML when present), disk and model files.

Every probe is best-effort: a machine without NVIDIA's library or without a GPU reports zero GPUs, never
fails. Probes touch files and drivers, so callers run `collect` off the event loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

import psutil

from fleetlm.controlplane.v1 import node_pb2

log = logging.getLogger(__name__)

MODEL_SUFFIXES = {".gguf": "gguf", ".safetensors": "hf"}


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


def model_files(paths: Iterable[str], models_dir: Path | None) -> list[node_pb2.ModelFile]:
    """The catalog's files that exist, plus model files directly under the models directory."""
    candidates = {Path(p) for p in paths}
    if models_dir is not None and models_dir.is_dir():
        candidates |= {p for p in models_dir.iterdir() if p.suffix in MODEL_SUFFIXES}
    files = []
    for path in sorted(candidates):
        try:
            if path.is_dir():
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                fmt = "awq" if "awq" in path.name.lower() else "hf"
            else:
                size = path.stat().st_size
                fmt = MODEL_SUFFIXES.get(path.suffix, "")
        except OSError:
            continue
        files.append(node_pb2.ModelFile(path=str(path), size_bytes=size, format=fmt))
    return files


def collect(models_dir: Path | None, catalog_paths: Iterable[str]) -> node_pb2.Inventory:
    memory = psutil.virtual_memory()
    disk_free = 0
    if models_dir is not None:
        try:
            disk_free = shutil.disk_usage(models_dir).free
        except OSError:
            pass
    return node_pb2.Inventory(
        hostname=socket.gethostname(),
        cpu=node_pb2.Cpu(model=cpu_model(), cores=os.cpu_count() or 1),
        ram=node_pb2.Memory(total_bytes=memory.total, free_bytes=memory.available),
        gpus=gpus(),
        models_disk_free_bytes=disk_free,
        model_files=model_files(catalog_paths, models_dir),
    )


def ram_free_bytes() -> int:
    return int(psutil.virtual_memory().available)
