"""Defaults from data (issue #14): each search lever on and off, paired over seeds, at equal trial budget.

    OMP_NUM_THREADS=1 python scripts/bench_defaults.py --organism smollm2-refusal --trials 30 \
        --seeds 101-105 --out /tmp/bench-defaults   # 13 variants x 5 seeds: 65 cells of ~13 min on one core
    OMP_NUM_THREADS=1 python scripts/bench_defaults.py --organism tiny --trials 20 --seeds 1-5
    OMP_NUM_THREADS=1 python scripts/bench_defaults.py --organism two-styles --trials 20 --seeds 1-5 \
        --train-limit 0 --variants baseline,contrastive_pca   # where one direction is not enough

A cell is one (variant, seed): the whole `abliterate run` pipeline (bench_quality.run_ours: fresh study, fresh
process) followed by bench_quality's evaluation of its export against the original (refusal rates on every harmful
set, over-refusal, first-token and --kl-n-token KL, agreement_16). The baseline variant is the tool's defaults at
bench_quality's settings; every other variant changes one setting (VARIANTS). Each cell is written to
OUT/cells/VARIANT-sSEED-DIGEST.json when it finishes, DIGEST naming everything the cell ran with (the arguments,
and every option of our run, the tool's defaults included), and a rerun skips the cells it finds, so an
interrupted benchmark resumes (Ctrl-C or SIGTERM stops the running cells too), a changed default makes new
cells, and a cell that ran the same settings under another variant's name is reused (a lever made the default:
its cells are the baseline's). Cells are also found in --kept (default scripts/data/bench_defaults_cells, the
committed cells behind docs/benchmarks.md), read only: copy new cells there to keep them. The export and the
run's caches are deleted once evaluated (OUT/runs/VARIANT-sSEED-DIGEST keeps each study and trials.csv).

The summary gives, per variant, the mean and std over seeds of every metric, and of its difference from the
baseline on the same seed (paired: the seed fixes the sampler's start). s/trial is only comparable between cells run
one at a time (--jobs 1) on a quiet machine; --jobs N runs N cells side by side for the quality figures. It is
written as OUT/summary.json and OUT/table.md; the last stdout line is the summary as one JSON object. --report
summarises the cells OUT and --kept already hold and runs none (seeds or variants without cells are left out).

With --heretic BIN, a "heretic" variant runs heretic 1.4 (its own venv) on the same model, prompt files, budget and
seed (bench_quality.run_heretic picks from its Pareto front by our rule) and evaluates its export the same way, so
its paired row is heretic minus our defaults, seed by seed. A heretic_at_T variant (e.g. heretic_at_0.05) is
heretic's pick at selection target T from that same search: heretic re-exports it from its stored results, no
trial runs again, so each seed's heretic front is evaluated at more than one point for the price of evaluations.
"""

import argparse
import hashlib
import inspect
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_quality import (  # noqa: E402 (one pipeline and one evaluation for both benchmarks)
    SHARED,
    BenchParser,
    Evaluator,
    _set_up_process,
    add_run_arguments,
    check_run_arguments,
    our_options,
    our_parts,
    pick_by_our_rule,
    prepare_inputs,
    repick_heretic,
    run_heretic,
    run_ours,
)

VARIANTS: dict[str, dict] = {
    "baseline": {},
    "contrastive_pca": {"space": {"direction_methods": ["mean_diff", "contrastive_pca"]}},
    "norm_preserving": {"space": {"norm_preserving": [True]}},
    "not_projected": {"space": {"projected": [False]}},
    "no_winsorize": {"space": {"winsorize": [1.0]}},
    # SmolLM2's template ends a prompt with 5 tokens: <|im_end|>, newline, <|im_start|>, assistant, newline.
    "positions_5": {"module": {"residual_positions": 5}},
    "global_only": {"space": {"direction_scope": ["global"]}},
    "both_scopes": {"space": {"direction_scope": ["global", "per_layer"]}},  # the default before per-layer only
    "startup_half": {"startup_factor": 0.5},
    "startup_double": {"startup_factor": 2.0},
    "no_steer_to_target": {"study": {"steer_to_target": False}},
    "refusal_target_0.05": {"study": {"refusal_target": 0.05}},
    "refusal_target_0.01": {"study": {"refusal_target": 0.01}},
    "refusal_target_0.0": {"study": {"refusal_target": 0.0}},  # in ABSORBED
    "no_steer_margin": {"study": {"steer_margin": 0.0}},  # steered and picked at 0
    # The default before the margin: its search (steered to 0.02) is the defaults', picked at 0.02.
    "refusal_target_0.02": {"study": {"refusal_target": 0.02, "steer_margin": 0.0}},
    # The pick re-scores its candidates on 100 held-out harmful prompts (data.validation_harmful): the first rule,
    # where one refusal there rejects a candidate, and today's tolerance of one in 100.
    "validation_100": {"validation": 100, "study": {"validation_tolerance": 0.0}},
    "validation_100_tolerant": {"validation": 100},
    # The defaults before #14's table (winsorising on its own lowered KL but cost JBB refusals; with the lower
    # target the picks refused less on every set at the same KL16, docs/benchmarks.md).
    "previous_defaults": {
        "space": {"winsorize": [1.0], "direction_scope": ["global", "per_layer"]},
        "study": {"refusal_target": 0.05, "steer_margin": 0.0},
    },
}
"""Each lever against the baseline, one setting changed (a search-space choice, a study option, or how the
residuals are read (module)), and the previous defaults (three settings)."""
ABSORBED = ("refusal_target_0.0",)
"""Levers that today's defaults include, so they run as the baseline: kept for the earlier sections' commands
(which give the defaults of their day, docs/benchmarks.md)."""
KEPT = HERE / "data" / "bench_defaults_cells"
"""Cells of the figures in docs/benchmarks.md, committed: a later run (another machine, another session) reuses
them instead of running them again, and --report rebuilds the tables from them."""
PEER = "heretic"  # the peer tool as a variant: cells of its own, paired with the baseline like a lever
AT = "_at_"
"""V_at_T: another pick, at selection target T, from the search of variant V's cell (V a lever, the baseline or
heretic), re-exported, not re-run: heretic_at_0.05, or refusal_target_0.02_at_0.0 (the search steered to 0.02,
picked at 0)."""


def repick_of(variant: str) -> tuple[str, float] | None:
    """(V, T) of a repick V_at_T, else None."""
    source, at, target = variant.rpartition(AT)
    try:
        value = float(target)
    except ValueError:
        return None
    return (source, value) if at and (source in VARIANTS or source == PEER) and 0.0 <= value <= 1.0 else None


def is_peer(variant: str) -> bool:
    """heretic's cell or a repick from its search."""
    return variant == PEER or (repick_of(variant) or ("",))[0] == PEER


ADDED_LATER = {
    ("study", "steer_margin"): 0.0,
    ("study", "validation_candidates"): 4,
    ("study", "validation_tolerance"): 0.0,
    ("study", "max_kl"): None,
}
"""Options added after cells were kept, each at the value that runs what ran before it: left out of a cell's
settings at that value, so the kept cells keep their names."""

METRICS = (
    "refusal_harmful_test",
    "refusal_harmbench_standard",
    "refusal_jbb_harmful",
    "refusal_family_a_test",  # the two-styles organism's families
    "refusal_family_b_test",
    "over_refusal",
    "kl_first_token",
    "kl_n_token",
    "agreement_16",
    "seconds_per_trial",
)


def parse_seeds(text: str) -> list[int]:
    """ "101-105" or "1,3,7"."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


CELL_ARGUMENTS = (
    "organism",
    "trials",
    "startup",
    "train_limit",
    "eval_limit",
    "max_new_tokens",
    "kl_n",
    "search_kl_tokens",
    "search_batch_size",
    "eval_batch_size",
)
"""The arguments a cell's numbers depend on (besides the seed, the model, and the options of our run or the
selection target of heretic's)."""


def variant_args(variant: str, seed: int, args) -> argparse.Namespace:
    """The benchmark's arguments with one variant's change applied, as run_ours reads them."""
    change = VARIANTS[variant]
    cell_args = argparse.Namespace(**vars(args))
    cell_args.seed = seed
    cell_args.startup = max(1, round(args.startup * change.get("startup_factor", 1.0)))
    cell_args.space_overrides = change.get("space", {})
    cell_args.study_overrides = change.get("study", {})
    cell_args.module_overrides = change.get("module", {})
    cell_args.validation = change.get("validation", args.validation)
    return cell_args


def cell_settings(variant: str, seed: int, args, inputs) -> dict:
    """Everything a cell's numbers depend on but the code, as JSON values: the benchmark's arguments and, for our
    cells, every option the run resolves to, the tool's defaults included."""
    settings = {"model": str(inputs.model_dir), "seed": seed, **{name: getattr(args, name) for name in CELL_ARGUMENTS}}
    if variant == PEER:
        return {**settings, "tool": PEER, "refusal_target": args.peer_target}
    if repick_of(variant):
        source, target = repick_of(variant)
        return {**cell_settings(source, seed, args, inputs), "repick_target": target}
    from abliterate.module import AbliterationModule

    cell_args = variant_args(variant, seed, args)
    options = our_options(cell_args, inputs.tiny)
    module = {
        name: parameter.default
        for name, parameter in inspect.signature(AbliterationModule.__init__).parameters.items()
        if name not in ("self", "model_id")
    }
    module.update(options["module"])
    settings.update(module=module, space=options["space"], study=options["study"])
    if cell_args.validation:  # held-out prompts for the pick (absent at 0: the cells before it keep their names)
        settings["validation"] = cell_args.validation
    settings = json.loads(json.dumps(settings, default=_plain))
    if not cell_args.validation:  # the validation options act only with its prompts
        settings["study"] = {k: v for k, v in settings["study"].items() if not k.startswith("validation_")}
    return without_added_later(settings)


def without_added_later(settings: dict) -> dict:
    """settings without the ADDED_LATER options at the value that runs as before them."""
    settings = {k: dict(v) if isinstance(v, dict) else v for k, v in settings.items()}
    for (group, name), value in ADDED_LATER.items():
        if group in settings and name in settings[group] and settings[group][name] == value:
            del settings[group][name]
    return settings


def cell_name(variant: str, seed: int, settings: dict) -> str:
    """VARIANT-sSEED-DIGEST, DIGEST naming the cell's settings: a changed default or argument makes new cells
    (files and run dirs) instead of reusing cells that ran with something else, which stay where they are."""
    return f"{variant}-s{seed}-{settings_digest(settings)}"


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def find_cell(cell_dirs: list[Path], variant: str, seed: int, settings: dict) -> Path:
    """The cell file for these settings in the first of cell_dirs that has one (OUT/cells, then the kept cells):
    its own name, else a cell that ran the same settings under another variant (when a lever becomes a default,
    its cells are the new baseline's), or a cell whose recorded settings are these (ran_with). Where none has it,
    its path in cell_dirs[0], to be written."""
    name, digest = cell_name(variant, seed, settings), settings_digest(settings)
    for cells in cell_dirs:
        own = cells / f"{name}.json"
        if own.is_file():
            return own
        same = sorted(cells.glob(f"*-s{seed}-{digest}.json")) or [
            path for path in sorted(cells.glob(f"*-s{seed}-*.json")) if ran_with(path) == settings
        ]
        if same:
            return same[0]
    return cell_dirs[0] / f"{name}.json"


def ran_with(path: Path) -> dict | None:
    """A cell file's settings as cell_settings makes them today: a cell that ran while an option was being added
    has it in its settings at the value that runs as before it, and is the same cell as one without it."""
    settings = json.loads(path.read_text()).get("settings")
    return without_added_later(settings) if settings else None


def digest_of(path: Path) -> str:
    return path.stem.rsplit("-", 1)[1]


def _plain(value):
    return asdict(value) if is_dataclass(value) else str(value)


def run_cell(variant: str, seed: int, args, out: str, name: str, settings: dict) -> dict:
    """One cell in this (fresh) process: the pipeline, then the evaluation of its export."""
    _set_up_process()
    out_dir = Path(out)
    inputs = prepare_inputs(args, out_dir)
    if variant == PEER:
        return run_peer_cell(seed, args, out_dir, inputs, name)
    if repick_of(variant) and is_peer(variant):
        return run_repick_cell(variant, seed, args, out_dir, inputs, settings)
    if repick_of(variant):
        return run_our_repick_cell(variant, seed, args, out_dir, inputs, name, settings)
    change = VARIANTS[variant]
    cell_args = variant_args(variant, seed, args)
    run_dir = out_dir / "runs" / name
    ours = run_ours(str(inputs.model_dir), inputs.files, cell_args, run_dir, inputs.tiny)
    evaluator = Evaluator(inputs, args, out_dir / "cache")
    base = evaluator.baseline()
    summary = evaluator.summarize(base, evaluator.evaluate(ours["model_dir"]))
    # This cell's own export and caches (~0.8 GB on smollm2); its study and trials.csv stay.
    shutil.rmtree(ours["model_dir"])
    shutil.rmtree(run_dir / "ours" / "cache", ignore_errors=True)
    return {
        "variant": variant,
        "seed": seed,
        "change": change,
        "n_startup_trials": cell_args.startup,
        "metrics": _metrics(summary, inputs, ours["seconds_per_trial"]),
        "before": {name: summary["sets"][name]["before"] for name in inputs.sets},
        "selected_trial": (ours["card"] or {}).get("trial"),
        "trial_states": ours["trial_states"],
        "start_up_s": ours["start_up_s"],
        "eval_s": summary["eval_s"],
    }


def run_peer_cell(seed: int, args, out_dir: Path, inputs, name: str) -> dict:
    """heretic on the same inputs and seed, evaluated like a lever's cell."""
    cell_args = argparse.Namespace(**vars(args))
    cell_args.seed = seed
    run_dir = out_dir / "runs" / name
    peer = run_heretic(args.heretic, str(inputs.model_dir), inputs.files, cell_args, run_dir, inputs.heretic_system)
    evaluator = Evaluator(inputs, args, out_dir / "cache")
    summary = evaluator.summarize(evaluator.baseline(), evaluator.evaluate(peer["model_dir"]))
    shutil.rmtree(peer["model_dir"])  # its log, argv and study checkpoint stay
    return {
        "variant": PEER,
        "seed": seed,
        "change": {"tool": "heretic", "argv": peer["argv"]},
        "n_startup_trials": args.startup,
        "metrics": _metrics(summary, inputs, peer["seconds_per_trial"]),
        "before": {name: summary["sets"][name]["before"] for name in inputs.sets},
        "selected_trial": peer["chosen_trial"],
        "search_refusal": peer["chosen_search_refusal"],
        "pareto_front": peer["pareto_front"],
        "trials_run": peer["trials_run"],
        "start_up_s": peer["start_up_s"],
        "eval_s": summary["eval_s"],
    }


def run_repick_cell(variant: str, seed: int, args, out_dir: Path, inputs, settings: dict) -> dict:
    """heretic_at_T: the pick at target T from the same seed's heretic search (its run dir in OUT/runs), saved by
    heretic from its stored results and evaluated like any cell. No trial runs, so it has no s/trial. A pick that
    is a trial of that search already evaluated (by the heretic cell or another repick) reuses its numbers."""
    target = settings["repick_target"]
    source = cell_name(PEER, seed, source_settings_of(settings))
    cell = {
        "variant": variant,
        "seed": seed,
        "change": {"tool": "heretic", "picked_from": source, "refusal_target": target},
        "n_startup_trials": args.startup,
    }
    cell_dirs = cell_dirs_of(args, out_dir)
    pick = predicted_pick(cell_dirs, seed, settings)
    if pick is not None:
        same = evaluated_trial(cell_dirs, seed, source, pick[0])
        if same is not None:
            picked = {"selected_trial": pick[0], "search_refusal": pick[1], "pareto_front": pick[2]}
            return {**cell, **picked, **reused_numbers(*same)}
    work = out_dir / "runs" / source / "heretic"
    if not (work / "argv.json").is_file() or not (out_dir / "cells" / f"{source}.json").is_file():
        raise RuntimeError(f"{variant} seed {seed}: no finished heretic cell {source} in {out_dir} to pick from")
    peer = repick_heretic(work, target, args.heretic_timeout)
    evaluator = Evaluator(inputs, args, out_dir / "cache")
    summary = evaluator.summarize(evaluator.baseline(), evaluator.evaluate(peer["model_dir"]))
    shutil.rmtree(peer["model_dir"])
    return {
        **cell,
        "metrics": _metrics(summary, inputs, None),
        "before": {name: summary["sets"][name]["before"] for name in inputs.sets},
        "selected_trial": peer["chosen_trial"],
        "search_refusal": peer["chosen_search_refusal"],
        "pareto_front": peer["pareto_front"],
        "eval_s": summary["eval_s"],
    }


def run_our_repick_cell(variant: str, seed: int, args, out_dir: Path, inputs, name: str, settings: dict) -> dict:
    """V_at_T for our variant V: the study of V's cell (its run dir in OUT/runs) re-read, its pick at target T by
    the tool's own rule exported there and evaluated like any cell. A trial already evaluated (by V's cell or
    another repick) reuses its numbers."""
    import optuna

    from abliterate.pareto import select_trial

    source, target = repick_of(variant)
    cell_dirs = cell_dirs_of(args, out_dir)
    source_path = find_cell(cell_dirs, source, seed, source_settings_of(settings))
    run_dir = out_dir / "runs" / source_path.stem / "ours"
    if not source_path.is_file() or not (run_dir / "study.db").is_file():
        raise RuntimeError(f"{variant} seed {seed}: no finished {source} cell with its study in {run_dir}")
    options, module, data, trainer = our_parts(
        str(inputs.model_dir), inputs.files, variant_args(source, seed, args), inputs.tiny
    )
    storage = f"sqlite:///{(run_dir / 'study.db').resolve()}"
    study = optuna.load_study(study_name=options["study"].study_name, storage=storage)
    margin = options["study"].steer_margin  # the tool's rule: within the source's margin where none is at T
    chosen = select_trial(study.get_trials(deepcopy=False), "min_kl_under", target, fallback_target=target + margin)
    cell = {
        "variant": variant,
        "seed": seed,
        "change": {"picked_from": source_path.stem, "refusal_target": target},
        "n_startup_trials": args.startup,
        "selected_trial": chosen.number,
        "search_refusal": chosen.values[0],
    }
    same = evaluated_trial(cell_dirs, seed, source_path.stem, chosen.number)
    if same is not None:
        return {**cell, **reused_numbers(*same)}
    export_dir = out_dir / "runs" / name / "model"
    trainer.export(
        module,
        data,
        study=options["study"],
        space=options["space"],
        output_dir=str(run_dir),
        export_dir=str(export_dir),
        trial=chosen.number,
        overwrite=True,
    )
    evaluator = Evaluator(inputs, args, out_dir / "cache")
    summary = evaluator.summarize(evaluator.baseline(), evaluator.evaluate(str(export_dir)))
    shutil.rmtree(export_dir.parent)  # the export; the source's study and trials.csv stay
    shutil.rmtree(run_dir / "cache", ignore_errors=True)
    return {
        **cell,
        "metrics": _metrics(summary, inputs, None),
        "before": {name: summary["sets"][name]["before"] for name in inputs.sets},
        "eval_s": summary["eval_s"],
    }


def reused_numbers(name: str, evaluated: dict) -> dict:
    """A repick's numbers from cell `name`, which evaluated the same trial (a repick has no s/trial)."""
    metrics = {k: v for k, v in evaluated["metrics"].items() if k != "seconds_per_trial"}
    return {"metrics": metrics, "before": evaluated["before"], "eval_s": 0.0, "same_trial_as": name}


def source_settings_of(repick_settings: dict) -> dict:
    """The settings of the cell a repick picks from (cell_settings' inverse for repicks)."""
    return {name: value for name, value in repick_settings.items() if name != "repick_target"}


def predicted_pick(cell_dirs: list[Path], seed: int, settings: dict) -> tuple[int, float, list] | None:
    """(trial, its search refusal, the front) that repick `settings` picks by our rule from its heretic cell's
    recorded front; None while that cell is unfinished, or kept from before cells recorded the front."""
    source_path = find_cell(cell_dirs, PEER, seed, source_settings_of(settings))
    front = json.loads(source_path.read_text()).get("pareto_front") if source_path.is_file() else None
    if not front:
        return None
    trial, refusal, _ = pick_by_our_rule([tuple(c) for c in front], settings["repick_target"])
    return trial, refusal, front


def repick_waves(repicks: list[tuple[str, int, str, dict]], cell_dirs: list[Path]) -> list[list]:
    """The repicks in waves, no two in a wave picking the same trial of the same search: each later one then
    reuses the first one's evaluation instead of evaluating it again side by side."""
    waves: list[list] = []
    count: dict[object, int] = {}
    for cell in repicks:
        variant, seed, name, settings = cell
        if not is_peer(variant):
            key = (seed, repick_of(variant)[0])  # each exports into its source's run dir: one at a time
        else:
            pick = predicted_pick(cell_dirs, seed, settings)
            key = (seed, pick[0]) if pick is not None else name  # a run's repicks of one seed share one search
        wave = count[key] = count.get(key, -1) + 1
        waves += [[] for _ in range(wave + 1 - len(waves))]
        waves[wave].append(cell)
    return waves


def evaluated_trial(cell_dirs: list[Path], seed: int, source: str, trial: int) -> tuple[str, dict] | None:
    """(name, cell) of a finished cell that evaluated `trial` of heretic cell `source`'s search: that cell or a
    repick from it."""
    for cells in cell_dirs:
        for path in sorted(cells.glob(f"*-s{seed}-*.json")):
            cell = json.loads(path.read_text())
            from_source = path.stem == source or cell.get("change", {}).get("picked_from") == source
            if from_source and cell.get("selected_trial") == trial:
                return path.stem, cell
    return None


def cell_dirs_of(args, out: Path) -> list[Path]:
    """Where cells are looked for: OUT/cells (written), then --kept (read only)."""
    return [out / "cells", *([Path(args.kept)] if args.kept else [])]


def _metrics(summary: dict, inputs, seconds_per_trial: float | None) -> dict:
    metrics = {f"refusal_{name}": summary["sets"][name]["after"] for name in inputs.harmful_sets}
    metrics.update(
        over_refusal=summary["over_refusal_after"],
        kl_first_token=summary["kl_first_token"],
        kl_n_token=summary["kl_n_token"],
        agreement_16=summary["agreement_16"],
    )
    return metrics if seconds_per_trial is None else {**metrics, "seconds_per_trial": seconds_per_trial}


def _run_and_write(variant: str, seed: int, args, out: str, name: str, settings: dict) -> None:
    result = {**run_cell(variant, seed, args, out, name, settings), "settings": settings}
    path = Path(out) / "cells" / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)  # a cell file is whole or absent


def run_cells(todo: list[tuple[str, int, str, dict]], args, out: Path) -> list[str]:
    """Each cell in a fresh process of its own, --jobs at a time (a cell never runs where another warmed up);
    returns the cells that failed (their tracebacks are on stderr). Leaving early (Ctrl-C, SIGTERM) kills the
    running cells: a cell file is written only by a cell that finished."""
    context, queue, running, failed = multiprocessing.get_context("spawn"), list(todo), {}, []
    start = time.perf_counter()
    try:
        while queue or running:
            while queue and len(running) < args.jobs:
                variant, seed, name, settings = queue.pop(0)
                cell = context.Process(target=_run_and_write, args=(variant, seed, args, str(out), name, settings))
                cell.name = name
                cell.start()
                running[cell.sentinel] = cell
            for sentinel in multiprocessing.connection.wait(list(running)):
                cell = running.pop(sentinel)
                cell.join()
                if cell.exitcode != 0:
                    failed.append(cell.name)
                finished = len(todo) - len(queue) - len(running)
                outcome = "done" if cell.exitcode == 0 else f"FAILED (exit {cell.exitcode})"
                elapsed = time.perf_counter() - start
                progress = f"{finished}/{len(todo)}, {elapsed:.0f}s"
                print(f"bench_defaults: cell {cell.name} {outcome} ({progress})", file=sys.stderr)
    finally:
        for cell in running.values():
            cell.kill()
            cell.join()
    return failed


def mean_std(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def summarize(cells: list[dict]) -> dict:
    """Per variant: each metric's mean and std over its seeds, and of its difference from the baseline cell of
    the same seed (only seeds both have)."""
    by_variant: dict[str, dict[int, dict]] = {}
    for cell in cells:
        by_variant.setdefault(cell["variant"], {})[cell["seed"]] = cell["metrics"]
    baseline = by_variant.get("baseline", {})
    summary = {}
    for variant, seeds in by_variant.items():
        metrics = [m for m in METRICS if all(m in values for values in seeds.values())]
        row = {"seeds": sorted(seeds), "metrics": {m: mean_std([v[m] for v in seeds.values()]) for m in metrics}}
        paired = sorted(set(seeds) & set(baseline))
        if variant != "baseline" and paired:
            row["minus_baseline"] = {m: mean_std([seeds[s][m] - baseline[s][m] for s in paired]) for m in metrics}
        summary[variant] = row
    return summary


HARMFUL_SETS = ("refusal_harmful_test", "refusal_harmbench_standard", "refusal_jbb_harmful")


def equal_refusal(cells: list[dict], ours: str = "baseline") -> dict:
    """Our variant `ours` against heretic's front, seed by seed, on refusals (the mean over HARMFUL_SETS) and KL16.
    Picks by one rule land at different refusal rates for the two tools (they count refusals differently while
    searching), so this reads heretic's evaluated picks (its cell and its heretic_at_T repicks) as a front:
    - peer_kl_n_token: heretic's KL16 at our refusal rate, linear between the two undominated picks that
      bracket it (None where none do), and ratio, ours over it;
    - peer_dominates: one of heretic's picks refuses no more than ours at no more KL16 (and is not equal);
    - ours_dominates: ours refuses no more than some pick of heretic's at no more KL16 (and is not equal)."""
    by_seed: dict[int, dict[str, dict]] = {}
    for cell in cells:
        by_seed.setdefault(cell["seed"], {})[cell["variant"]] = cell["metrics"]

    def refusal(metrics: dict) -> float:
        return sum(metrics[name] for name in HARMFUL_SETS) / len(HARMFUL_SETS)

    def dominates(a: tuple, b: tuple) -> bool:
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    seeds = {}
    for seed, variants in sorted(by_seed.items()):
        points = sorted((refusal(m), m["kl_n_token"]) for v, m in variants.items() if is_peer(v))
        front = [p for i, p in enumerate(points) if all(p[1] < q[1] for q in points[:i])]
        if ours not in variants or not front:
            continue
        point = (refusal(variants[ours]), variants[ours]["kl_n_token"])
        peer_kl = front[0][1] if len(front) == 1 and front[0][0] == point[0] else None
        for (r0, kl0), (r1, kl1) in zip(front, front[1:], strict=False):
            if r0 <= point[0] <= r1:
                peer_kl = kl0 + (kl1 - kl0) * (point[0] - r0) / (r1 - r0)
                break
        seeds[seed] = {
            "refusal": point[0],
            "kl_n_token": point[1],
            "peer_points": points,
            "peer_kl_n_token": peer_kl,
            "ratio": point[1] / peer_kl if peer_kl else None,
            "peer_dominates": any(dominates(p, point) for p in points),
            "ours_dominates": any(dominates(point, p) for p in points),
        }
    ratios = [row["ratio"] for row in seeds.values() if row["ratio"] is not None]
    return {"seeds": seeds, "ratio": mean_std(ratios) if ratios else None}


def table(summary: dict) -> str:
    """Markdown: per variant, mean ± std, and the paired difference from the baseline below it."""
    metrics = [m for m in METRICS if any(m in row["metrics"] for row in summary.values())]
    lines = [
        "| variant | seeds | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for variant, row in summary.items():
        cells = [_mean_std(row["metrics"], m, "{mean:.4g} ± {std:.2g}") for m in metrics]
        lines.append(f"| {variant} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
        if "minus_baseline" in row:
            diffs = [_mean_std(row["minus_baseline"], m, "{mean:+.4g} ± {std:.2g}") for m in metrics]
            lines.append(
                f"| − baseline, paired | {row['minus_baseline'][metrics[0]]['n']} | " + " | ".join(diffs) + " |"
            )
    return "\n".join(lines) + "\n"


def _mean_std(stats: dict, metric: str, form: str) -> str:
    return form.format(**stats[metric]) if metric in stats else "—"  # a repick cell has no s/trial


def main() -> None:
    parser = BenchParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--seeds", default="101-105", help='sampler seeds, "101-105" or "1,3,7" (default 101-105)')
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)} (default all)"
    )
    parser.add_argument(
        "--heretic", help=f'heretic executable (its own venv): adds the "{PEER}" variant, the peer on the same inputs'
    )
    parser.add_argument("--heretic-timeout", type=float, default=7200, help="seconds per heretic run (default 7200)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run side by side (s/trial needs 1)")
    parser.add_argument("--report", action="store_true", help="run no cell: summarise the cells already in OUT")
    parser.add_argument(
        "--kept",
        default=str(KEPT),
        help=f"cells kept from earlier runs, read and never written, reused like OUT's ('' for none; default {KEPT})",
    )
    args = parser.parse_args()
    check_run_arguments(parser, args)
    args.projected, args.norm_preserving = "true", "false"  # the tool's defaults; variants override them
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = [*VARIANTS, PEER] if args.heretic else list(VARIANTS)
    if args.heretic and args.variants == parser.get_default("variants"):
        variants.append(PEER)
    unknown = [v for v in variants if v not in known and not (repick_of(v) and (args.heretic or not is_peer(v)))]
    needs_peer = [v for v in unknown if is_peer(v)]
    if needs_peer:
        parser.error(f"--variants {needs_peer[0]}: give its executable with --heretic BIN (a venv of its own)")
    if unknown:
        parser.error(
            f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(known)}"
            + f", or VARIANT{AT}T for VARIANT's search picked at selection target T (heretic's too, with --heretic)"
        )
    if args.heretic and not os.access(args.heretic, os.X_OK):
        parser.error(f"--heretic {args.heretic}: not an executable file; give heretic's path in its own venv")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError:
        parser.error(f'--seeds {args.seeds!r}: give a range such as "101-105" or a list such as "1,3,7"')
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.kept and not Path(args.kept).is_dir():
        parser.error(f"--kept {args.kept}: not a folder; give the folder of kept cells, or '' for none")

    _set_up_process()
    out = Path(args.out or f"/tmp/bench-defaults-{args.organism}")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(args, out)
    if inputs is None:
        print(f"bench_defaults: {SHARED} (data and organisms/smollm2-refusal) is absent; skipping", file=sys.stderr)
        print(json.dumps({"organism": args.organism, "skipped": f"{SHARED} absent"}))
        return
    settings = {(v, s): cell_settings(v, s, args, inputs) for s in seeds for v in variants}
    cell_dirs = cell_dirs_of(args, out)
    paths = {cell: find_cell(cell_dirs, *cell, settings[cell]) for cell in settings}
    todo, digests = [], set()
    for (v, s), path in paths.items():
        if not path.is_file() and digest_of(path) not in digests:  # one run for variants that resolve alike
            todo.append((v, s, path.stem, settings[v, s]))
            digests.add(digest_of(path))
    done = sum(path.is_file() for path in paths.values())
    kept = sum(path.is_file() and path.parent != out / "cells" for path in paths.values())
    todo = [] if args.report else todo
    # The original's rates, once, before any cell (cells then read them from OUT/cache); every cell keeps them.
    before = Evaluator(inputs, args, out / "cache").baseline()["rates"] if todo else None
    print(
        f"bench_defaults: {len(todo)} cells to run, {done} already done ({kept} of them kept in {args.kept}), "
        f"{args.jobs} at a time",
        file=sys.stderr,
    )
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # like Ctrl-C: cells are stopped
    # Repicks read their source cell's search, so they run once every other cell is done, in waves (above).
    failed = run_cells([cell for cell in todo if not repick_of(cell[0])], args, out)
    for wave in repick_waves([cell for cell in todo if repick_of(cell[0])], cell_dirs):
        failed += run_cells(wave, args, out)

    paths = {cell: find_cell(cell_dirs, *cell, settings[cell]) for cell in settings}  # and those this run wrote
    cells = [{**json.loads(path.read_text()), "variant": v} for (v, s), path in paths.items() if path.is_file()]
    before = before or (cells[0]["before"] if cells else None)
    summary = summarize(cells)
    (out / "table.md").write_text(table(summary))
    result = {
        "organism": args.organism,
        "model": str(inputs.model_dir),
        "trials": args.trials,
        "n_startup_trials": args.startup,
        "seeds": seeds,
        "max_new_tokens": args.max_new_tokens,
        "kl_n": args.kl_n,
        "jobs": args.jobs,
        "cpu": f"{os.cpu_count()} cores",
        "before": before,
        "variants": {v: VARIANTS.get(v, {"tool": v}) for v in variants},
        "summary": summary,
        "equal_refusal": {v: equal_refusal(cells, v) for v in variants if not is_peer(v)},
        "failed_cells": failed,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print(table(summary), file=sys.stderr)
    print(json.dumps(result))
    if failed:
        print(f"bench_defaults: {len(failed)} cells failed: {', '.join(failed)} (rerun to retry them)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
