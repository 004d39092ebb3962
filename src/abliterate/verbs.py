"""The verbs as typed functions over (trainer, module, datamodule): what each command does, in order.

`AbliterationTrainer` methods delegate here; the passes, caches and study are the Pipeline's.
"""

import json
import logging
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import optuna
from optuna.trial import TrialState

import abliterate.reproduce as records
from abliterate.errors import AbliterateError, Interrupted
from abliterate.hub import check_push, push
from abliterate.options import ClassifierOptions, DirectionOptions, HubOptions, SearchSpace, StudyOptions
from abliterate.pipeline import Pipeline
from abliterate.reports import SearchProgress, choose_from_front, log_study, plot_pareto, write_trials_csv
from abliterate.runconfig import CONFIG_FILE, check_settings_owner
from abliterate.rundir import LOCK_FILE, OWNER_FILE, RunDir, stale_temps, undone_on_failure
from abliterate.study import FINISHED

log = logging.getLogger("abliterate")

# The files of a run dir that are written through a temp sibling (rundir.atomic_path).
TRIALS_CSV, PARETO_PNG = "trials.csv", "pareto.png"
RUN_FILES = (CONFIG_FILE, TRIALS_CSV, PARETO_PNG, OWNER_FILE)


@contextmanager
def phase(name: str, kept: str):
    """Turn an interrupt during `name` into one line saying what was kept and how to resume."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as err:
        if isinstance(err, SystemExit) and not isinstance(err.__context__, KeyboardInterrupt) and err.code in (0, None):
            raise
        raise Interrupted(f"interrupted during {name}; {kept}. Rerun the same command to resume.") from None


def run_dir_of(output_dir: str) -> Path:
    if not str(output_dir).strip():
        raise AbliterateError("--output_dir is empty; name a run dir, e.g. --output_dir outputs")
    return Path(output_dir)


@contextmanager
def writing(trainer, out: Path):
    """Hold the run dir for this process (rank 0 only: the other ranks are its helpers)."""
    if not trainer.is_global_zero:
        yield
        return
    check_settings_owner(out)
    with undone_on_failure(out, frozenset((CONFIG_FILE, LOCK_FILE))), RunDir(out).lock():
        for name in RUN_FILES:  # what a killed writer of these left half-written; any other file is not ours
            for path, _ in stale_temps(out, name):
                if path.is_file():
                    log.warning("removing %s, left by a writer whose process is gone", path)
                    path.unlink(missing_ok=True)
        yield


def keep_settings(trainer, out: Path, module, datamodule, study=None, space=None) -> None:
    """OUTPUT_DIR/config.yaml: what later verbs on this run dir, and trial workers, start from. Written once
    the settings have loaded a model and prompts, so a refused or failed command leaves the last good ones."""
    from abliterate.runconfig import resolved_config, save_run_config
    from abliterate.workers import is_worker

    if trainer.is_global_zero and not is_worker():
        save_run_config(out, resolved_config(out, module, datamodule, study, space))


def fail_interrupted_trials(trainer, study: optuna.Study, options: StudyOptions) -> None:
    """With the run dir's lock held, a RUNNING trial of its own study belongs to a process that died.
    Rank 0 only: under DDP another rank would see rank 0's first trial running, and fail it."""
    from abliterate.workers import is_worker

    if options.storage is not None or is_worker() or not trainer.is_global_zero:
        return
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        log.info("trial %d was interrupted in an earlier run; marked FAIL", t.number)


def prepare(pipe: Pipeline):
    """Residuals (directions) and the reference, each cached; an interrupt says what was kept."""
    with phase("residual collection", "nothing of it was cached"):
        pipe.residuals()
    with phase("the reference pass", "the residuals are cached"):
        reference = pipe.reference()
    return reference


def search_study(pipe: Pipeline, study: optuna.Study, options: StudyOptions, space: SearchSpace, reference) -> None:
    if options.workers > 1:
        from abliterate.workers import run_workers

        run_workers(study, options.workers, options.n_trials, pipe.run_dir)
        return
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    names = [s.name for s in pipe.objectives]
    progress = (
        SearchProgress(done, options.n_trials, names, options.refusal_target) if pipe.trainer.is_global_zero else None
    )
    kept = f"the running trial is marked FAIL and finished trials are kept in study {study.study_name!r}"
    with phase("the search", kept):
        pipe.search(study, options, space, reference, progress)


def recheck(pipe: Pipeline, study, space, reference, classifier: ClassifierOptions) -> None:
    """Re-judge the best Pareto trials' harmful replies with the classifier (reported, not used to select)."""
    if not (classifier.enabled and classifier.recheck_top):
        return
    from abliterate.classifier import RefusalClassifier

    judge = RefusalClassifier(classifier, device=pipe.trainer.strategy.root_device)
    rows = pipe.recheck(study.get_trials(deepcopy=False), space, reference, judge, classifier.recheck_top)
    if pipe.trainer.is_global_zero:
        (pipe.run_dir / "classifier_recheck.json").write_text(json.dumps(rows, indent=2))


def report(pipe: Pipeline, study: optuna.Study, options: StudyOptions, space: SearchSpace, interactive: bool = False):
    """trials.csv, pareto.png and the log summary; on a terminal, the user may pick another trial."""
    trials = study.get_trials(deepcopy=False)
    chosen = pipe.choose(study, options, space)
    front = pipe.front(study)
    names = [s.name for s in pipe.objectives]
    if pipe.trainer.is_global_zero:
        write_trials_csv(study, pipe.run_dir / TRIALS_CSV)
        plot_pareto(trials, front, chosen, names, pipe.run_dir / PARETO_PNG)
        log_study(trials, front, chosen, names, options.select)
        hint_more_directions(chosen, options, space)
        if interactive and sys.stdin.isatty() and sys.stdout.isatty():
            chosen = choose_from_front(trials, front, chosen, names)
    return chosen


def hint_more_directions(chosen: optuna.trial.FrozenTrial, options: StudyOptions, space: SearchSpace) -> None:
    """Refusals left above the target by a mean-difference-only space: name the lever that removed them on the
    two-styles organism (one mean difference cannot remove a refusal carried by two directions)."""
    if chosen.values[0] > options.refusal_target and "contrastive_pca" not in space.direction_methods:
        log.warning(
            "the pick leaves a refusal rate of %.3f, above study.refusal_target %g: when refusal is carried by more "
            "than one direction one mean difference cannot remove it; add contrastive PCA to the space (--config "
            "configs/examples/contrastive_pca.yaml, see docs/benchmarks.md) or run more trials",
            chosen.values[0],
            options.refusal_target,
        )


def trial_by_number(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    from abliterate.pareto import select_trial

    if number < 0:
        raise AbliterateError(f"--trial {number} is not a trial number; use one from trials.csv (0 or more)")
    return select_trial(study.get_trials(deepcopy=False), str(number), 0.0)


def export_card(
    pipe: Pipeline, chosen, reference, study: optuna.Study, reported: dict, options=None, space=None
) -> dict:
    """The export's record; `reported`: the reported scorers' values for `chosen` (`Pipeline.reported_values`)."""
    names = [s.name for s in pipe.objectives]
    before = {n: round(reference.values.get(n, 0.0), 5) for n in names + list(reported)}
    after = dict(zip(names, chosen.values, strict=True)) | reported
    card = {
        "base_model": pipe.module.model_id,
        "trial": chosen.number,
        "study": study.study_name,
        "run_dir": str(pipe.run_dir.resolve()),
        "refusal_before": before[names[0]],
        "refusal_after": round(chosen.values[0], 4),
        "kl": round(dict(zip(names, chosen.values, strict=True)).get("kl", chosen.values[1]), 5),
        "before": before,
        "after": {n: round(v, 5) for n, v in after.items()},
        "params": chosen.params,
    }
    if chosen.number in pipe.validated:  # data.validation_harmful: the pick's refusal rate there
        card["validation_refusal"] = round(pipe.validated[chosen.number], 4)
    if options is not None:  # with the study options and space: reproduce.json's record too
        from abliterate.cache import model_stamp
        from abliterate.runconfig import resolved_config

        config = resolved_config(pipe.run_dir, pipe.module, pipe.datamodule, options, space)
        stamp = model_stamp(pipe.module.model_id, pipe.module.load_options.revision)
        card["reproduce"] = records.make_record(pipe, config, chosen, study.study_name, stamp)
    return card


def kept_benchmarks(card: dict, previous: dict | None) -> dict:
    """Exporting the trial an earlier export held again keeps its `abliterate benchmark` table (the card a push sends)."""
    from abliterate.benchmark import BENCHMARKS_KEY

    if previous and previous.get("trial") == card["trial"] and previous.get(BENCHMARKS_KEY):
        card[BENCHMARKS_KEY] = previous[BENCHMARKS_KEY]
    return card


def own_export(target: Path, out: Path, options: StudyOptions) -> dict | None:
    """The record of an export this run dir's study made at `target` earlier (None if there is none)."""
    try:
        record = json.loads((target / "abliterate.json").read_text())
    except (OSError, ValueError):
        return None
    inside = target.resolve().parent == out.resolve()  # the default OUTPUT_DIR/model, even in a moved run dir
    same = (inside or record.get("run_dir") == str(out.resolve())) and record.get("study") == options.study_name
    return record if same else None


def run(
    trainer,
    module,
    datamodule,
    study: StudyOptions,
    space: SearchSpace,
    output_dir: str,
    export_dir,
    overwrite,
    classifier,
    export_format: str = "merged",
    hub: HubOptions = HubOptions(),
    interactive: bool = True,
) -> Path:
    from abliterate.export import check_export_format, check_export_target
    from abliterate.reports import print_run_summary

    start = time.perf_counter()
    out = run_dir_of(output_dir)
    target = Path(export_dir) if export_dir else out / "model"
    with writing(trainer, out):
        previous = own_export(target, out, study)
        if trainer.is_global_zero:  # it also removes stale temp dirs: one process only
            check_export_target(target, overwrite or previous is not None, out)
            check_export_format(export_format, space.norm_preserving)
            check_push(hub)
        pipe = Pipeline(trainer, module, datamodule, out)
        pipe.check_existing_study(study)
        pipe.check_selection(study)
        reference = prepare(pipe)
        check_refusals_to_remove(pipe, reference, study)
        keep_settings(trainer, out, module, datamodule, study, space)  # once the model and prompts have loaded
        optuna_study = pipe.open_study(study)
        fail_interrupted_trials(trainer, optuna_study, study)
        search_study(pipe, optuna_study, study, space, reference)
        recheck(pipe, optuna_study, space, reference, classifier)
        chosen = report(pipe, optuna_study, study, space, interactive=interactive)
        same = previous is not None and previous.get("format", "merged") == export_format
        if same and previous.get("trial") == chosen.number and not overwrite:
            print(f"nothing new: {target} already holds trial {chosen.number} of this study", file=sys.stderr)
            push(target, hub, chosen, trainer.is_global_zero)
            return target
        with phase("export", "the study and caches are kept; the export was not written"):
            reported = pipe.reported_values(chosen, space, reference)
            pipe.export(
                pipe.plan_of(chosen, space),
                kept_benchmarks(export_card(pipe, chosen, reference, optuna_study, reported, study, space), previous),
                target,
                True if previous else overwrite,
                export_format,
            )
        push(target, hub, chosen, trainer.is_global_zero)
    if trainer.is_global_zero:
        names = [s.name for s in pipe.objectives]
        counts = {s.name: (s.role.removeprefix("eval_"), len(datamodule.dataset(s.role))) for s in pipe.scorers}
        seconds = time.perf_counter() - start
        print_run_summary(module.model_id, chosen, reported, reference.values, names, counts, target, seconds)
    return target


def check_refusals_to_remove(pipe: Pipeline, reference, study: StudyOptions) -> None:
    """A model that does not refuse the harmful prompts has nothing to abliterate."""
    name = pipe.objectives[0].name
    rate = reference.values[name]
    if rate == 0.0 or rate <= study.refusal_target:  # counted by the configured judge, not only markers
        raise AbliterateError(
            f"the original model's {name} on the harmful eval prompts is {rate:g}, at or under "
            f"study.refusal_target {study.refusal_target:g}: there is nothing to remove; check --data.eval_harmful "
            "and module.scorers (deflections: configs/examples/soft_refusals.yaml)"
        )


def directions(trainer, module, datamodule, output_dir: str, options: DirectionOptions) -> Path:
    from abliterate.cache import fingerprint, save_tensors

    out = run_dir_of(output_dir)
    if options.method == "contrastive_pca":  # the rank bound, before any forward pass
        n = len(datamodule.prompts("harmful")) + len(datamodule.prompts("harmless"))
        if options.k - 1 > n - 2:
            raise AbliterateError(
                f"--direction.k {options.k} needs at least {options.k + 1} harmful and harmless prompts, "
                f"got {n}: use a smaller k or more prompts"
            )
    with writing(trainer, out):
        pipe = Pipeline(trainer, module, datamodule, out)
        with phase("residual collection", "nothing of it was cached"):
            pipe.residuals()
        keep_settings(trainer, out, module, datamodule)  # once the model and prompts have loaded
        result = module.directions_for(options)
        path = out / "directions.safetensors"
        if trainer.is_global_zero:
            info = {"model": str(module.model_id), "options": json.dumps(options.__dict__)}
            save_tensors(path, {"directions": result}, key=fingerprint(info), info=info)
            log.info("saved directions %s to %s", tuple(result.shape), path)
    return path


def search(
    trainer, module, datamodule, study: StudyOptions, space: SearchSpace, output_dir: str, classifier
) -> optuna.Study:
    from abliterate.workers import is_worker

    out = run_dir_of(output_dir)
    with writing(trainer, out) if not is_worker() else nullcontext():
        pipe = Pipeline(trainer, module, datamodule, out)
        pipe.check_existing_study(study)
        pipe.check_selection(study)
        reference = prepare(pipe)
        keep_settings(trainer, out, module, datamodule, study, space)  # once the model and prompts have loaded
        optuna_study = pipe.open_study(study)
        fail_interrupted_trials(trainer, optuna_study, study)
        search_study(pipe, optuna_study, study, space, reference)
        if not is_worker():  # the coordinator reports once all workers are done
            recheck(pipe, optuna_study, space, reference, classifier)
            report(pipe, optuna_study, study, space)
    return optuna_study


def export(
    trainer,
    module,
    datamodule,
    study: StudyOptions,
    space: SearchSpace,
    output_dir: str,
    export_dir,
    trial,
    overwrite,
    export_format: str = "merged",
    hub: HubOptions = HubOptions(),
) -> Path:
    from abliterate.export import check_export_format, check_export_target

    out = run_dir_of(output_dir)
    target = Path(export_dir) if export_dir else out / "model"
    with writing(trainer, out):
        previous = own_export(target, out, study)
        check_export_target(target, overwrite or previous is not None, out)
        check_export_format(export_format)
        check_push(hub)
        pipe = Pipeline(trainer, module, datamodule, out)
        optuna_study = pipe.load_study(study)
        chosen = trial_by_number(optuna_study, trial) if trial is not None else None
        if chosen is None:
            pipe.check_selection(study)
        with phase("residual collection", "nothing of it was cached"):
            pipe.residuals()  # the directions; the reference is only needed for the card's "before"
        reference = pipe.reference()
        if chosen is None:
            chosen = report(pipe, optuna_study, study, space, interactive=True)
        reported = pipe.reported_values(chosen, space, reference)
        pipe.export(
            pipe.plan_of(chosen, space),
            kept_benchmarks(export_card(pipe, chosen, reference, optuna_study, reported, study, space), previous),
            target,
            overwrite or previous is not None,
            export_format,
        )
        push(target, hub, chosen, trainer.is_global_zero)
    return target


def demo(trainer, module, datamodule, output_dir: str, n_trials: int, overwrite: bool, cache_dir) -> Path:
    import os

    import torch

    from abliterate.demo import configure_demo

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    study, space = configure_demo(module, datamodule, n_trials=n_trials, cache_dir=cache_dir)
    return run(
        trainer, module, datamodule, study, space, output_dir, None, overwrite, ClassifierOptions(), interactive=False
    )
