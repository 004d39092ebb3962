"""reproduce.json: what an export's edit was derived from, and the check that re-derives it.

Every export written by `run`, `export` or `demo` (merged, adapter or both) carries `reproduce.json`:
the package versions, the base model (id, resolved hub commit, dtype), a sha256 of each prompt set
(its texts and its token ids), every option of the run (the resolved config, as config.yaml holds
it), the chosen trial's number, parameters and the study's seed, the sha256 of the refusal
directions the trial used, and the sha256 of every tensor the edit changed (the writers' weights
and biases as edited, by state-dict name: for a merged export, the exported tensors that differ
from the base).

`abliterate reproduce --export_dir DIR` loads the base, collects the residuals with the recorded
prompts and settings, rebuilds the trial's plan from its parameters (no search), computes its
directions and applies its edit, then compares. On CPU, for a record made on CPU, the hashes must
match bit for bit. Elsewhere (a GPU on either side) bits are not expected to match: each tensor's
max abs diff against the export's own tensor is reported instead, and it passes when that diff is
at most `TOLERANCE` of the edit's size there (max |W' - W|). Exit codes: 0 reproduced, 1 it
differs (a finding, with the tensors named), 2 bad input (no record, base model not found).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

from abliterate.errors import AbliterateError, first_line
from abliterate.options import LoadOptions, SearchSpace

RECORD = "reproduce.json"
FORMAT = 1
TOLERANCE = 0.05  # off-CPU: a tensor's max abs diff, as a share of the edit's max abs change there
RESIDUAL_ROLES = ("harmful", "harmless", "unhelpful")  # the roles the directions come from
PACKAGES = ("abliterate", "torch", "transformers", "optuna", "peft", "lightning", "safetensors", "huggingface_hub")


# ---- hashing ---------------------------------------------------------------------------------------


def tensor_sha256(tensor: Tensor) -> str:
    """sha256 of a tensor's bytes (row-major, its own dtype), wherever it lives."""
    flat = tensor.detach().contiguous().view(-1).cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def json_sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass  # peft is optional
    return found


def prompt_hashes(datamodule, roles) -> dict[str, dict]:
    """Per role: the prompt count and the sha256 of its texts and of its token ids (as the model saw them)."""
    found = {}
    for role in roles:
        if datamodule.sources.get(role) is None:
            continue
        try:
            texts = datamodule.prompts(role)
            tokens = datamodule.dataset(role).input_ids
            found[role] = {
                "count": len(texts),
                "texts_sha256": json_sha256(texts),
                "tokens_sha256": json_sha256(tokens),
            }
        except Exception as err:  # e.g. a streamed set, offline: the record says so instead of failing the export
            found[role] = {"error": first_line(err)}
    return found


# ---- the record, as exports write it -----------------------------------------------------------------


def make_record(pipe, config: dict, trial, study_name: str, stamp: str) -> dict:
    """Everything but the edit's own hashes (`edit_record` adds those when the export is written)."""
    module, datamodule = pipe.module, pipe.datamodule
    model_id = str(module.model_id)
    commit = stamp.split("@", 1)[1] if stamp.startswith(f"{model_id}@") else None
    return {
        "format": FORMAT,
        "check": "abliterate reproduce --export_dir DIR",
        "versions": versions(),
        "model": {
            "id": model_id,
            "revision": module.load_options.revision,
            "commit": commit,
            "stamp": stamp,
            "dtype": str(module.model.dtype).removeprefix("torch."),
        },
        "device": pipe.trainer.strategy.root_device.type,
        "world_size": pipe.trainer.world_size,
        "threads": torch.get_num_threads(),
        "prompts": prompt_hashes(datamodule, list(datamodule.sources)),
        "config": config,
        "trial": {
            "number": trial.number,
            "params": trial.params,
            "study": study_name,
            "seed": (config.get("study") or {}).get("seed"),
        },
    }


def edited_tensors(model, editor, params, directions: Tensor, visit: Callable[[str, Tensor, Tensor], None]) -> bool:
    """Apply the edit, call visit(name, edited, original) for every tensor it changed, and restore the weights.

    False (and no visit) when the editor cannot edit weights in place (forward hooks on 4-bit or
    offloaded writers): there is no edited tensor in memory to hash.
    """
    from abliterate.ablation import WeightEditor, not_editable

    if not isinstance(editor, WeightEditor):  # forward hooks by choice (edit_mode): editable all the same
        if any(not_editable(ref) for layer in editor.writers for refs in layer.values() for ref in refs):
            return False
        editor = WeightEditor(editor.writers, gains=editor.gains)
    names = {id(m): name for name, m in model.named_modules()}
    with editor.applied(params, directions):
        for key in sorted(editor.edited):
            layer, component, i = key
            ref = editor.writers[layer][component][i]
            for attr, original in zip((ref.name, ref.bias_name), editor.originals[key], strict=True):
                if attr is None or original is None:
                    continue
                now = getattr(ref.module, attr).detach()
                if not torch.equal(now, original.to(now.device)):
                    visit(f"{names[id(ref.module)]}.{attr}", now, original)
    return True


def edit_record(model, editor, params, directions: Tensor) -> dict:
    """The directions' sha256 and the sha256 of each tensor the edit changes (None: not editable in place)."""
    hashes: dict[str, str] = {}
    done = edited_tensors(
        model, editor, params, directions, lambda name, now, _: hashes.__setitem__(name, tensor_sha256(now))
    )
    return {
        "directions": {"sha256": tensor_sha256(directions.float()), "shape": list(directions.shape)},
        "edited_tensors": hashes if done else None,
    }


# ---- reading a record back -----------------------------------------------------------------------------


def load_record(where: str) -> tuple[dict, Path | None]:
    """The record of the export at `where` (a dir, or a hub repo id) and the dir holding its files (None: hub)."""
    path = Path(where).expanduser()
    if not str(where).strip():
        raise AbliterateError("give the export to check: abliterate reproduce --export_dir DIR")
    if path.is_dir():
        file, local = path / RECORD, path
    else:
        from abliterate.export import hub_id

        repo = hub_id(str(where))
        if repo is None or path.exists() or str(where).startswith((".", "/", "~")):
            raise AbliterateError(
                f"--export_dir {where} is not a directory; give an export's directory or a hub repo id"
            )
        try:
            from huggingface_hub import hf_hub_download

            file, local = Path(hf_hub_download(repo, RECORD)), None
        except Exception as err:  # offline, unreachable, no such repo or file
            raise AbliterateError(
                f"cannot fetch {RECORD} of the hub repo {repo} ({first_line(err)}); if the hub is not reachable from "
                f"here, download the export (hf download {repo} --local-dir DIR) elsewhere and pass --export_dir DIR"
            ) from None
    try:
        record = json.loads(file.read_text())
    except FileNotFoundError:
        raise AbliterateError(
            f"{where} has no {RECORD}: it was not exported by abliterate (or by a version before records); "
            "export it again with `abliterate export`"
        ) from None
    except (OSError, ValueError) as err:
        raise AbliterateError(f"{file} cannot be read as JSON ({first_line(err)}); export the model again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise AbliterateError(
            f"{file} is not a reproduce record this abliterate reads (format {FORMAT}); update abliterate"
        )
    for keys in (("model", "id"), ("model", "dtype"), ("config", "space"), ("trial", "params"), ("trial", "number")):
        _section(record, *keys)
    return record, local


def _section(record: dict, *keys: str):
    value = record
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise AbliterateError(f"{RECORD} has no {'.'.join(keys)}; the record is incomplete: export the model again")
        value = value[key]
    return value


def load_options(record: dict, trust_remote_code: bool) -> LoadOptions:
    """The recorded load options at the recorded dtype (and hub commit); remote code: the caller's say, never the record's."""
    options = dict(_section(record, "config", "module", "load"))
    options["dtypes"] = [_section(record, "model", "dtype")]
    options["trust_remote_code"] = trust_remote_code
    if record["model"].get("commit"):
        options["revision"] = record["model"]["commit"]
    try:
        return LoadOptions(**options)
    except TypeError as err:
        raise AbliterateError(
            f"{RECORD} has load options this abliterate does not know ({err}); update abliterate"
        ) from None


def residual_positions(record: dict) -> int:
    """The recorded module.residual_positions (1 in records made before it existed)."""
    return int((_section(record, "config", "module") or {}).get("residual_positions", 1))


def data_options(record: dict) -> dict:
    """PromptDataModule keyword arguments for the recorded prompts and settings."""
    from abliterate.prompts import PromptSource

    data = dict(_section(record, "config", "data"))
    try:
        for role, source in data.items():
            if isinstance(source, dict):
                data[role] = PromptSource(**source)
        return data
    except TypeError as err:
        raise AbliterateError(
            f"{RECORD} has prompt settings this abliterate does not know ({err}); update abliterate"
        ) from None


def plan_of(record: dict, n_layers: int):
    """The recorded trial's plan, rebuilt from its parameters in the recorded search space (no search)."""
    import warnings

    from optuna.trial import FixedTrial

    from abliterate.plans import sample_plan

    space = SearchSpace(**_section(record, "config", "space"))
    trial = FixedTrial(_section(record, "trial", "params"), _section(record, "trial", "number"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a value outside the recorded range is the record's, not an error
            return sample_plan(trial, space, n_layers)
    except ValueError as err:
        raise AbliterateError(
            f"the parameters in {RECORD} do not make a plan ({first_line(err)}); export it again"
        ) from None


# ---- the check ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differs

    def text(self) -> str:
        verdict = "reproduced" if self.ok else f"NOT reproduced: {'; '.join(self.differs)}"
        return "\n".join([*self.lines, verdict])


def _export_tensors(where: Path | None) -> Callable[[str], Tensor | None]:
    """name -> the tensor of that name in the export's top-level safetensors files (a merged export), or None."""
    from safetensors import safe_open

    files = {}
    for file in sorted(where.glob("*.safetensors")) if where is not None else []:
        with safe_open(str(file), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), file))

    def get(name: str) -> Tensor | None:
        if name not in files:
            return None
        with safe_open(str(files[name]), framework="pt") as f:
            return f.get_tensor(name)

    return get


def verify(record: dict, module, datamodule, where: Path | None, device: str) -> Report:
    """Rebuild the recorded trial's edit on `module` (its residuals collected) and compare it with the record:
    prompts, directions, then every edited tensor."""
    plan = plan_of(record, module.n_layers)
    directions = module.directions_for(plan.directions)
    report = Report()
    exact = device == "cpu" and record.get("device") == "cpu"
    trial = record.get("trial", {})
    report.lines.append(
        f"trial {trial.get('number')} of study {trial.get('study')!r}: base {module.model_id} "
        f"({str(module.model.dtype).removeprefix('torch.')}) on {device}; the record was made on {record.get('device')}"
    )
    now = versions()
    changed = [f"{k} {now.get(k)} (recorded {v})" for k, v in record.get("versions", {}).items() if now.get(k) != v]
    if changed:
        report.lines.append(f"note: versions differ from the record: {', '.join(changed)}")
    if exact and record.get("threads") != torch.get_num_threads():
        report.lines.append(f"note: {torch.get_num_threads()} torch threads, {record.get('threads')} in the record")
    if record.get("world_size", 1) != 1:
        report.lines.append(f"note: the residuals were collected by {record['world_size']} processes, here by one")

    recorded_prompts = record.get("prompts", {})
    current = prompt_hashes(datamodule, [r for r in RESIDUAL_ROLES if r in recorded_prompts])
    same = []
    for role, now_hashes in current.items():
        if now_hashes == recorded_prompts[role]:
            same.append(role)
        else:
            report.differs.append(f"the {role} prompts differ from the record")
    report.lines.append(f"prompts: {', '.join(same) or 'none'} identical (texts and tokens)")

    expected = (record.get("directions") or {}).get("sha256")
    got = tensor_sha256(directions.float())
    if got == expected:
        report.lines.append(f"directions: identical (sha256 {got[:12]})")
    elif exact:
        report.lines.append(f"directions: differ (sha256 {got[:12]}, recorded {str(expected)[:12]})")
        report.differs.append("the directions differ")
    else:
        report.lines.append(f"directions: not bit-identical on {device} (sha256 {got[:12]}); the tensors decide")

    _check_tensors(record, module, plan, directions, where, exact, report)
    return report


def _check_tensors(record, module, plan, directions, where, exact: bool, report: Report) -> None:
    recorded = record.get("edited_tensors")
    if recorded is None:
        report.lines.append("tensors: not recorded (the writers were not editable in place); only directions checked")
        return
    exported = _export_tensors(where)
    rows: list[str] = []
    seen: set[str] = set()
    bad: list[str] = []

    def visit(name: str, now: Tensor, original: Tensor) -> None:
        seen.add(name)
        if name not in recorded:
            bad.append(name)
            rows.append(f"  {name}: changed by the edit now, not in the record DIFFERS")
            return
        digest = tensor_sha256(now)
        same = digest == recorded[name]
        if same and exact:
            return
        reference, measured, share = exported(name), "", 0.0
        if reference is not None:
            diff = (now.float().cpu() - reference.float()).abs().max().item()
            size = (reference.float() - original.float().cpu()).abs().max().item()
            share = diff / size if size else float("inf") if diff else 0.0
            measured = f"max abs diff {diff:.3g} vs the export ({'identical' if same else f'{share:.2%} of the edit'})"
        fine = same if exact or reference is None else share <= TOLERANCE
        hashes = "" if same or (measured and not exact) else f"sha256 {digest[:12]} != recorded {recorded[name][:12]}"
        if not fine:
            bad.append(name)
        rows.append(f"  {name}: {'; '.join(p for p in (hashes, measured) if p)}{'' if fine else ' DIFFERS'}")

    if not edited_tensors(module.model, module.weight_editor(), plan.ablation, directions, visit):
        report.differs.append("the edited tensors could not be re-derived: load the base in full precision")
        return
    for name in sorted(set(recorded) - seen):
        bad.append(name)
        rows.append(f"  {name}: in the record, but the edit leaves it unchanged now DIFFERS")
    total = len(set(recorded) | seen)
    how = "sha256, bit-exact" if exact else f"max abs diff vs the export, tolerance {TOLERANCE:.0%} of the edit"
    report.lines.append(f"tensors: {total - len(bad)} of {total} match ({how})")
    report.lines.extend(rows)
    if bad:
        report.differs.append(
            f"{len(bad)} of {total} edited tensors differ ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})"
        )


def finish(report: Report) -> None:
    """Print the report (stdout: it is the result); exit 1 when the export is not reproduced."""
    print(report.text(), flush=True)
    if not report.ok:
        sys.exit(1)
