"""On-disk cache of residuals, directions and baselines, keyed by a hash of their inputs."""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("abliterate.cache")


def fingerprint(*parts: Any) -> str:
    """A stable short hash of JSON-serialisable parts (dataclasses via their __dict__)."""

    def default(obj: Any) -> Any:
        if hasattr(obj, "__dataclass_fields__"):
            return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(f"cannot fingerprint {type(obj).__name__}")

    text = json.dumps(parts, sort_keys=True, default=default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], key: str, info: dict[str, str] | None = None) -> None:
    """Write tensors with their cache key in the metadata; atomic via a temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    metadata = {"key": key, **(info or {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors when the file exists and was written for `key`, else None."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            log.info("cache %s is stale (inputs changed); recomputing", path.name)
            return None
        return {name: f.get_tensor(name) for name in f.keys()}
