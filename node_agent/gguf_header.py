"""Reading a GGUF file's metadata header, without its tensors: enough to size a model's KV cache.

The `gguf` package parses every tensor descriptor too (seconds for a small model); the inventory needs
a handful of integers from the key-value header, so this reads only that, stopping early.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Architectures whose keys are looked for; others report 0 (the placement then uses a default).
_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "starcoder2", "falcon")


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack("<" + fmt, data)[0]


def _string(f: BinaryIO) -> str:
    return f.read(_read(f, "Q")).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, keep: bool) -> Any:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        if not keep:
            f.seek(_read(f, "Q"), 1)
            return None
        return _string(f)
    if kind == _ARRAY:
        item, count = _read(f, "I"), _read(f, "Q")
        if item in _SCALARS and not keep:
            f.seek(struct.calcsize("<" + _SCALARS[item]) * count, 1)
            return None
        return [_value(f, item, keep) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {kind}")


def read_metadata(path: Path, wanted: set[str] | None = None) -> dict[str, Any]:
    """Header key-values (only `wanted` ones kept, if given)."""
    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = _read(f, "I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        _read(f, "Q")  # tensor count
        for _ in range(_read(f, "Q")):
            key = _string(f)
            keep = wanted is None or key in wanted or key == "general.architecture"
            value = _value(f, _read(f, "I"), keep)
            if keep:
                out[key] = value
    return out


def kv_bytes_per_token(path: Path) -> int:
    """Bytes of f16 K and V cache per token of context, or 0 if the header does not say."""
    suffixes = (
        "block_count",
        "embedding_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
    )
    meta = read_metadata(path, wanted={f"{arch}.{s}" for arch in _ARCHS for s in suffixes})
    arch = meta.get("general.architecture", "")

    def get(name: str) -> int:
        value = meta.get(f"{arch}.{name}")
        return int(value) if isinstance(value, int) else 0

    layers, embd, heads = get("block_count"), get("embedding_length"), get("attention.head_count")
    kv_heads = get("attention.head_count_kv") or heads
    head_dim = get("attention.key_length") or (embd // heads if heads else 0)
    return 2 * layers * kv_heads * head_dim * 2
