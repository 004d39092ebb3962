"""Write an ablated model as a normal HF checkpoint, atomically, and never over a user's files.

An export is a directory holding exactly the files that `save_checkpoint` wrote there: what
`model.save_pretrained` and `tokenizer.save_pretrained` write, README.md, and abliterate.json,
whose "export_files" lists every one of those files but itself. `--overwrite true` may replace
such a directory and nothing else: not the run dir, the current directory or one containing
either, nor a directory that holds anything not in that list.
"""

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path, PurePosixPath

from abliterate.errors import AbliterateError, first_line
from abliterate.rundir import stale_temps, temp_sibling

log = logging.getLogger("abliterate.export")

MANIFEST = "abliterate.json"
FILES_KEY = "export_files"
RECORD_KEY = "reproduce"  # the card's reproduce record, written to reproduce.json (not into abliterate.json)


def _raise(err: OSError) -> None:
    raise err


def _contents(path: Path) -> tuple[set[str], set[str]] | None:
    """(files, subdirs) under `path` as relative posix paths; None if it holds a link or a special file."""
    files: set[str] = set()
    dirs: set[str] = set()
    for root, dirnames, filenames in os.walk(path, onerror=_raise):
        rel = Path(root).relative_to(path)
        for name in dirnames:
            if (Path(root) / name).is_symlink():
                return None
            dirs.add((rel / name).as_posix())
        for name in filenames:
            full = Path(root) / name
            if full.is_symlink() or not full.is_file():
                return None
            files.add((rel / name).as_posix())
    return files, dirs


def export_files(path: Path) -> set[str] | None:
    """The files of the export at `path`, abliterate.json included; None when `path` is not exactly an export."""
    try:
        card = json.loads((path / MANIFEST).read_text())
        contents = _contents(path)
    except (OSError, ValueError):
        return None
    listed = card.get(FILES_KEY) if isinstance(card, dict) else None
    if contents is None or not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
        return None
    names = {PurePosixPath(f) for f in listed} | {PurePosixPath(MANIFEST)}
    if any(n.is_absolute() or ".." in n.parts or n == PurePosixPath(".") for n in names):
        return None
    files = {n.as_posix() for n in names}
    parents = {p.as_posix() for n in names for p in n.parents if p != PurePosixPath(".")}
    return files if contents == (files, parents) else None


def _remove_export(path: Path) -> bool:
    """Delete an export's own files and dirs; anything else found there stays, with a warning."""
    files = export_files(path)
    if files is None:
        log.warning("left %s in place: it holds files abliterate did not write", path)
        return False
    try:
        for name in files:
            (path / name).unlink()
        for name in sorted({p for f in files for p in PurePosixPath(f).parents}, key=lambda p: -len(p.parts)):
            (path / name).rmdir()  # the export's own subdirs, deepest first, then `path` itself
    except OSError as err:  # something appeared in it meanwhile
        log.warning("left %s in place (%s)", path, first_line(err))
        return False
    return True


def clean_stale_temps(target: Path) -> None:
    """Remove what killed writers of `target` left beside it: `.NAME.tmp-PID` / `.NAME.old-PID` of dead pids."""
    for path, kind in stale_temps(target.parent, target.name):
        if kind == "old" and path.is_dir() and not path.is_symlink():
            if not _remove_export(path):  # a replaced export: only its own files
                continue
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)  # a half-written export: all ours
        else:
            path.unlink(missing_ok=True)
        log.warning("removed %s, left by an export whose process is gone", path)


def _not_export(target: Path, entries: list[str]) -> str:
    """What makes the non-empty dir `target` not an export, for an error message."""
    try:
        listed = json.loads((target / MANIFEST).read_text()).get(FILES_KEY)
    except (OSError, ValueError, AttributeError):
        listed = None
    if (target / MANIFEST).is_file() and not isinstance(listed, list):
        return "an export without a file list (older abliterate)"
    ours = {PurePosixPath(str(f)).parts[0] for f in listed or [] if str(f)} | {MANIFEST}
    foreign = [e for e in entries if e not in ours] or entries
    return f"files abliterate did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"


def _refuse(target: Path, why: str) -> AbliterateError:
    return AbliterateError(f"--export_dir {target} {why}")


def check_export_target(target: Path, overwrite: bool, run_dir: Path | None = None) -> None:
    """Fail before any work when the export could not be written, or would replace anything but an export.

    Passing checks make this process the writer of `target`: it then removes the temp dirs that
    killed writers of `target` left beside it.
    """
    _check(target, overwrite, run_dir)
    clean_stale_temps(target)


def _check(target: Path, overwrite: bool, run_dir: Path | None) -> None:
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise _refuse(target, "is the current directory or contains it; choose a new directory to export to")
    if run_dir is not None:
        run = run_dir.resolve()
        if resolved == run or resolved in run.parents:
            raise _refuse(
                target,
                f"is the run dir {run_dir} or contains it (study.db, cache/); choose another --export_dir, "
                f"e.g. {run_dir / 'model'}",
            )
    if target.is_symlink():
        raise _refuse(target, "is a symlink; pass a real directory as --export_dir")
    if target.exists():
        if not target.is_dir():
            raise _refuse(target, "exists and is not a directory; choose another --export_dir")
        try:
            entries = sorted(p.name for p in target.iterdir())
        except OSError as err:
            raise _refuse(target, f"cannot be read ({first_line(err)}); choose another --export_dir") from err
        if entries:
            if export_files(target) is None:
                why = f"already exists and holds {_not_export(target, entries)}"
                fix = "--overwrite only replaces an export abliterate wrote: choose another --export_dir"
                raise _refuse(target, f"{why}; {fix}")
            if not overwrite:
                raise _refuse(target, "holds an earlier export; pass --overwrite true to replace it")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AbliterateError(f"cannot create {parent}: {err.strerror}; choose a writable --output_dir") from err
    if not os.access(parent, os.W_OK):
        raise AbliterateError(f"{parent} is not writable; choose a writable --output_dir")


def hub_id(model: str) -> str | None:
    """The hub id a model name stands for: itself when it is one, the repo of an HF cache snapshot
    path (…/models--org--name/snapshots/…), else None (a plain local dir)."""
    match = re.search(r"models--([^/]+?)--([^/]+?)(?:/|$)", model)
    if match:
        return f"{match[1]}/{match[2]}"
    looks_local = model.startswith((".", "/", "~")) or Path(model).exists()
    return None if looks_local or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model) else model


def model_card(base_model: str, card: dict) -> str:
    """README.md of an export: front matter (base_model only when it is a hub id), metrics, parameters, and
    with a reproduce record, how it was made and how to check it."""
    from abliterate.hub import card_sections

    repo = hub_id(base_model)
    names = list(card.get("after", {})) or ["refusal rate", "kl"]
    before = card.get("before", {"refusal rate": card.get("refusal_before"), "kl": 0})
    after = card.get("after", {"refusal rate": card.get("refusal_after"), "kl": card.get("kl")})
    fmt = card.get("format", "merged")
    lines = [
        "---",
        *([f"base_model: {repo}"] if repo else []),
        f"library_name: {'peft' if fmt == 'adapter' else 'transformers'}",
        "tags: [abliterated, abliterate]",
        "---",
        f"# {repo or Path(base_model).name} (abliterated)",
        "",
        f"Refusal directions were ablated from `{repo or base_model}` with "
        "[abliterate](https://pypi.org/project/abliterate/): directional ablation of the "
        "residual-stream writers (attention out-projections and MLP down-projections), with "
        "parameters chosen by an Optuna search that co-minimises refusals and KL divergence.",
        "",
        "## Metrics (first objective: refusal rate on harmful prompts; the others on harmless ones)",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| original | " + " | ".join(str(before.get(n, "n/a")) for n in names) + " |",
        "| this model | " + " | ".join(str(after.get(n, "n/a")) for n in names) + " |",
        "",
        "## Parameters",
        "",
        "```json",
        json.dumps(card.get("params", {}), indent=2, sort_keys=True),
        "```",
        "",
        *card_sections(card),
    ]
    if fmt != "merged":
        where = "." if fmt == "adapter" else "./adapter"
        lines += [
            "## As a LoRA adapter",
            "",
            f"`{where}` holds the ablation as a PEFT LoRA adapter (rank = directions ablated per writer), exact "
            "for the full-precision base model:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{repo or base_model}")',
            f'model = PeftModel.from_pretrained(base, "{where}")  # or .merge_and_unload() for plain weights',
            "```",
            "",
        ]
    from abliterate.benchmark import BENCHMARKS_KEY, benchmarks_section  # the section `abliterate benchmark` adds

    return "\n".join(lines + benchmarks_section(card.get(BENCHMARKS_KEY)))


def save_checkpoint(model, tokenizer, target: Path, overwrite: bool, card: dict, run_dir: Path | None = None) -> Path:
    """save_pretrained (sharded safetensors) into a temp dir beside `target`, then rename it into place.

    abliterate.json holds `card` plus the list of files written. An earlier export at `target` is
    moved aside and removed only after the new one is in place.
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size="4GB")
        tokenizer.save_pretrained(tmp)

    return write_export(target, overwrite, card, write, run_dir)


def write_export(target: Path, overwrite: bool, card: dict, write, run_dir: Path | None = None) -> Path:
    """`write(tmp)` into a temp dir beside `target`, then README.md and abliterate.json, then rename it into place."""
    check_export_target(target, overwrite, run_dir)
    start = time.perf_counter()
    tmp, old = temp_sibling(target, "tmp"), temp_sibling(target, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    moved = False
    try:
        tmp.mkdir()
        write(tmp)
        if card.get(RECORD_KEY) is not None:  # reproduce.json: what `abliterate reproduce` re-derives the edit from
            (tmp / "reproduce.json").write_text(json.dumps(card[RECORD_KEY], indent=2, sort_keys=True, default=str))
        (tmp / "README.md").write_text(model_card(str(card.get("base_model", "model")), card))
        contents = _contents(tmp)
        if contents is None:
            raise AbliterateError(f"the model's save_pretrained wrote links into {tmp}; export cannot list its files")
        manifest = {**{k: v for k, v in card.items() if k != RECORD_KEY}, FILES_KEY: sorted(contents[0])}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        _check(target, overwrite, run_dir)  # again: the save can take long
        if target.exists() and any(target.iterdir()):
            os.replace(target, old)
            moved = True
        os.replace(tmp, target)  # rename(2) also replaces an empty dir
        if moved:
            moved = False
            _remove_export(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved and not target.exists():
            os.replace(old, target)  # put the earlier export back
        raise
    log.info("exported to %s in %.1fs", target, time.perf_counter() - start)
    return target


# ---- the export formats ------------------------------------------------------------------------

FORMATS = ("merged", "adapter", "both")
ADAPTER_DIR = "adapter"  # where `both` puts the adapter: an adapter_config.json beside config.json would
# make transformers load the directory as an adapter on its base instead of as the merged model


def check_export_format(fmt: str, norm_preserving: list[bool] | tuple[bool, ...] = ()) -> None:
    """Before any work: a known format, peft installed when it writes an adapter, and no search space
    (`norm_preserving` choices) that could pick a trial an adapter cannot express."""
    if fmt not in FORMATS:
        raise AbliterateError(f"--export_format {fmt}: use one of {', '.join(FORMATS)}")
    if fmt != "merged" and True in norm_preserving:
        raise AbliterateError(
            f"--export_format {fmt} cannot express norm_preserving trials exactly (a LoRA adapter cannot rescale "
            "weight columns): set --space.norm_preserving [false] or use --export_format merged"
        )
    if fmt != "merged":
        try:
            import peft  # noqa: F401
        except ImportError as err:
            raise AbliterateError(
                f"--export_format {fmt} needs peft: pip install 'abliterate[adapter]', or use --export_format merged"
            ) from err


def save_export(
    model,
    tokenizer,
    editor,
    params,
    directions,
    target: Path,
    overwrite: bool,
    card: dict,
    fmt: str = "merged",
    run_dir: Path | None = None,
    revision: str | None = None,
) -> Path:
    """The ablation `params` written as `fmt`: merged (a full checkpoint), adapter (PEFT LoRA) or both.

    `editor` is the model's WeightEditor or HookEditor. merged: with a WeightEditor, the edit applied
    and `save_pretrained`; with a HookEditor (weights not editable in place), the base checkpoint
    (`card["base_model"]`) rewritten shard by shard. adapter: `adapters.build_adapter` from the
    full-precision base weights. Everything that could refuse is checked before anything is written.
    """
    from abliterate.ablation import WeightEditor, not_editable
    from abliterate.adapters import BaseWeights, adapter_size, build_adapter, merge_checkpoint
    from abliterate.hooks import HookEditor

    check_export_format(fmt)
    check_export_target(target, overwrite, run_dir)
    editor.reset()  # the base weights, as loaded
    weights = BaseWeights(model, card.get("base_model"), revision)
    hooked = isinstance(editor, HookEditor)
    adapter = None
    if fmt != "merged":
        adapter = build_adapter(editor.writers, params, directions, weights, editor.gains, card.get("base_model"))
        adapter.config()  # peft is installed
    if fmt != "adapter" and hooked:
        if all(not_editable(ref) is None for layer in editor.writers for refs in layer.values() for ref in refs):
            editor = WeightEditor(editor.writers, gains=editor.gains)  # hooks by choice: the weights can be edited
            hooked = False
        else:
            weights.checkpoint  # noqa: B018 - the base files exist (raises one line if not)
    if card.get(RECORD_KEY) is not None:  # the directions' and the edited tensors' sha256
        from abliterate.reproduce import edit_record

        record = {**card[RECORD_KEY], "export_format": fmt, **edit_record(model, editor, params, directions)}
        card = {**card, RECORD_KEY: record}

    def write(tmp: Path) -> None:
        if fmt != "adapter":
            if hooked:  # 4-bit or offloaded: merged into the full-precision base files
                merge_checkpoint(editor.writers, params, directions, weights, tmp, editor.gains)
            else:
                with editor.applied(params, directions):
                    model.save_pretrained(tmp, max_shard_size="4GB")
            tokenizer.save_pretrained(tmp)
        if adapter is not None:
            where = tmp if fmt == "adapter" else tmp / ADAPTER_DIR
            adapter.save(where)
            log.info("adapter: rank %d, %d targets, %d bytes", adapter.rank, len(adapter.targets), adapter_size(where))

    return write_export(target, overwrite, card if fmt == "merged" else {**card, "format": fmt}, write, run_dir)
