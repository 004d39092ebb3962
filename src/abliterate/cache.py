"""On-disk cache of residuals, directions and baselines, keyed by a hash of their inputs.

`TensorCache` keeps one file per (name, key): `{name}-{key}.safetensors`, so switching between
inputs (say a one-off evaluate with other prompts) and back reuses what was computed before. A
cache file that cannot be read is ignored with one warning and recomputed. Writes are atomic: a
temp file beside the target, renamed into place.
"""

import hashlib
import json
import logging
import os
import re
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from abliterate.errors import first_line
from abliterate.rundir import stale_temps, temp_sibling

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
    """Write tensors with their cache key in the metadata; atomic via a temp file, removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, "tmp")
    metadata = {"key": key, **(info or {})}
    try:
        # Serialised here and written under our own temp name: safetensors' save_file would write
        # through a random .tmpXXXX of its own, which a kill leaves behind under a name we can't own.
        data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
        with open(tmp, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


def load_tensors(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors when the file exists, is readable and was written for `key`, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                log.info("cache %s is stale (inputs changed); recomputing", path.name)
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        log.warning("ignoring unreadable cache file %s (%s); recomputing", path, first_line(err))
        return None


_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")
_KEY = re.compile(r"[A-Za-z0-9_]+")


class TensorCache:
    """Tensors in `directory`, one file per name and content key; the `keep` latest used per name survive."""

    def __init__(self, directory: Path, keep: int = 4) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def path(self, name: str, key: str) -> Path:
        if not _NAME.fullmatch(name) or not _KEY.fullmatch(key):
            raise ValueError(f"cache name {name!r} / key {key!r}: use letters, digits and _ (and . - in names)")
        return self.directory / f"{name}-{key}.safetensors"

    def load(self, name: str, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved for (name, key), or None when there are none or they cannot be read."""
        path = self.path(name, key)
        tensors = load_tensors(path, key)
        if tensors is not None:
            with suppress(OSError):
                os.utime(path)  # recently used: pruned last
        return tensors

    def save(self, name: str, key: str, tensors: dict[str, torch.Tensor], info: dict[str, str] | None = None) -> Path:
        """Store tensors for (name, key), then drop the least recently used slots of `name` beyond `keep`."""
        path = self.path(name, key)
        for stale, _ in stale_temps(self.directory):  # left by a writer that was killed mid-write
            log.warning("removing %s, left by a cache write whose process is gone", stale)
            with suppress(OSError):
                stale.unlink()
        save_tensors(path, tensors, key, info)
        self._prune(name)
        return path

    def _prune(self, name: str) -> None:
        slot = re.compile(re.escape(name) + r"-[A-Za-z0-9_]+\.safetensors")
        slots = []
        for path in self.directory.iterdir():
            if slot.fullmatch(path.name):
                with suppress(OSError):
                    slots.append((path.stat().st_mtime, path))
        for _, path in sorted(slots, reverse=True)[self.keep :]:
            log.info("dropping the least recently used cache file %s", path.name)
            with suppress(OSError):
                path.unlink()


def model_stamp(model_id: str | None, revision: str | None = None) -> str:
    """What identifies the model's weights for cache keys: a local dir's file sizes and mtimes (a model
    rewritten in place invalidates caches), or a hub model's resolved commit (a moved branch does)."""
    path = Path(model_id or "")
    if not model_id:
        return str(model_id)
    if path.is_dir():
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
        return f"{model_id}:{fingerprint(files)}"
    commit = hub_commit(model_id, revision)
    return f"{model_id}@{commit}" if commit else f"{model_id}@{revision or 'main'}"


def hub_commit(model_id: str, revision: str | None) -> str | None:
    """The commit a hub revision points at: the revision itself when it is a commit, else the local
    HF cache's ref (what an offline load uses), else the hub's answer; None when nobody knows."""
    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}" / "refs" / revision
    if ref.is_file():
        return ref.read_text().strip()
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(model_id, revision=revision).sha
    except Exception:  # unreachable or unknown: the load itself will say why
        return None
