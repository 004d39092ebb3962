"""A tiny "model organism" that really refuses harmful requests.

`build_tiny_organism` trains a 2-layer Llama with a word-level tokenizer from scratch, on
CPU, in well under 30 s on one thread. Its refusal is a single added direction in the
residual stream, so directional ablation removes it, which makes it the model for
`abliterate demo` and the end-to-end tests.

The training data lives in `abliterate/data/organism/templates.json`: 12 request templates x
24 harmful and 24 harmless objects; 20% of the combos of each class are held out for testing.
Training runs in two stages (see `OrganismSpec`): a helpful base where every prompt, harmful
ones included, gets a helpful reply that starts with the request's own object, then safety
tuning where harmful prompts get one of six refusals that never mention the object.

The result is cached under `cache_dir` in a subdirectory keyed by a hash of
`ORGANISM_VERSION`, the spec and the template data, and written atomically.

Modules: `organism_data` (templates, prompt splits, tokenizer), `organism_training` (spec,
model, training loop) and this one (build, cache, publish).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from abliterate.errors import AbliterateError
from abliterate.organism_data import build_tokenizer, organism_prompts, template_bytes
from abliterate.organism_training import OrganismSpec, make_model, train, training_threads

__all__ = ["ORGANISM_VERSION", "PROMPT_FILES", "OrganismSpec", "build_organism", "build_tiny_organism"]

log = logging.getLogger("abliterate.organism")

ORGANISM_VERSION = "1"  # bump when training changes

_MODEL_FILE = "model.safetensors"
_META_FILE = "organism.json"
PROMPT_FILES = {
    ("harmful", "train"): "harmful_train.txt",
    ("harmless", "train"): "harmless_train.txt",
    ("harmful", "test"): "harmful_test.txt",
    ("harmless", "test"): "harmless_test.txt",
}


def build_tiny_organism(
    cache_dir: str | Path,
    spec: OrganismSpec = OrganismSpec(),
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Train (or reuse) the tiny refusing organism and return its directory.

    The directory loads with `AutoModelForCausalLM.from_pretrained` and
    `AutoTokenizer.from_pretrained`, and holds the prompt files harmful_train.txt,
    harmless_train.txt, harmful_test.txt and harmless_test.txt (one prompt per line) and
    organism.json (spec, cache key, per-step losses, training time). It is cached under
    `cache_dir/tiny-organism-<key>`, the key hashing ORGANISM_VERSION, `spec` and the
    template data; an unchanged call returns at once, `force=True` retrains. Torch runs on
    OMP_NUM_THREADS threads (default 1) while training.
    """
    return build_organism(cache_dir, "tiny organism", _cache_key(spec), spec, _train_tiny, force, progress)


def _train_tiny(spec: OrganismSpec, emit):
    tokenizer = build_tokenizer(spec.max_positions)
    model = make_model(spec, tokenizer)
    return model, tokenizer, train(model, tokenizer, spec, emit)


def build_organism(
    cache_dir: str | Path,
    label: str,
    key: str,
    spec: OrganismSpec,
    trainer,
    force: bool,
    progress: bool,
    version: str | None = None,
) -> Path:
    """Train (or reuse) one organism under `cache_dir/<label with dashes>-<key>`.

    `trainer(spec, emit)` returns (model, tokenizer, losses); the directory is written as
    `build_tiny_organism` describes, atomically.
    """
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / f"{label.replace(' ', '-')}-{key}"
    if _complete(final) and not force:
        problem = _damaged(final)
        if problem is None:
            log.debug("%s cached at %s", label, final)
            return final
        log.warning("the cached organism at %s is damaged (%s); training it again", final, problem)
        shutil.rmtree(final)  # the tool's own cache entry, rebuilt below

    def emit(msg, *args):
        log.log(logging.INFO if progress else logging.DEBUG, msg, *args)

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{label.replace(' ', '-')}-{key}-", dir=cache_dir))
    except OSError as err:
        raise AbliterateError(
            f"cannot write the organism cache {cache_dir} ({err.strerror}); pass a writable --cache_dir "
            "or set ABLITERATE_CACHE"
        ) from err
    old_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(training_threads())
        emit("training %s %s on %d thread(s) -> %s", label, key, torch.get_num_threads(), final)
        start = time.perf_counter()
        model, tokenizer, losses = trainer(spec, emit)
        seconds = time.perf_counter() - start
        _save(tmp, model, tokenizer)
        meta = {
            "organism_version": ORGANISM_VERSION if version is None else version,
            "cache_key": key,
            "spec": dataclasses.asdict(spec),
            "train_seconds": round(seconds, 3),
            "threads": torch.get_num_threads(),
            "losses": losses,
        }
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        _publish(tmp, final, replace=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(old_threads)
    emit(
        "trained %s in %.1f s (%d steps, final loss %.4f): %s",
        label,
        seconds,
        len(losses),
        losses[-1] if losses else float("nan"),
        final,
    )
    return final


def cache_key(version: str, spec: OrganismSpec, *data: bytes) -> str:
    """An organism's cache key: its training version, its spec but `log_every`, and the data files it reads."""
    fields = dataclasses.asdict(spec)
    fields.pop("log_every")  # does not change the weights
    blob = json.dumps({"version": version, "spec": fields}, sort_keys=True).encode()
    return hashlib.sha256(blob + b"".join(data)).hexdigest()[:16]


def _cache_key(spec: OrganismSpec) -> str:
    return cache_key(ORGANISM_VERSION, spec, template_bytes())


def _complete(path: Path) -> bool:
    return (path / _META_FILE).is_file() and (path / _MODEL_FILE).is_file()


def _damaged(path: Path) -> str | None:
    """Why a cached organism cannot be used (unreadable metadata or weights), or None."""
    from safetensors import safe_open

    try:
        json.loads((path / _META_FILE).read_text())
        with safe_open(str(path / _MODEL_FILE), framework="pt") as weights:
            for name in weights.keys():
                weights.get_tensor(name)
    except Exception as err:  # noqa: BLE001 - any failure to read means: train it again
        return " ".join(str(err).split())[:200] or type(err).__name__
    return None


def _save(path: Path, model, tokenizer) -> None:
    """The model with a greedy generation config, the tokenizer and the prompt files."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path)
    # Keep the chat template inside tokenizer_config.json, where every loader looks.
    tokenizer.save_pretrained(path, save_jinja_files=False)
    for (kind, split), name in PROMPT_FILES.items():
        (path / name).write_text("\n".join(organism_prompts(kind, split)) + "\n", encoding="utf-8")


def _publish(tmp: Path, final: Path, replace: bool) -> None:
    """Rename `tmp` to `final`; an existing complete build is kept unless `replace`."""
    if final.exists() and (replace or not _complete(final)):
        trash = Path(tempfile.mkdtemp(prefix=".old-", dir=final.parent))
        os.replace(final, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        # Another process published the same key meanwhile: theirs is identical, keep it.
        if not _complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
