"""Optuna search over ablation parameters: one `Trainer.predict` per trial.

The same `sample_plan` rebuilds a finished trial's plan from its stored params, since a
FrozenTrial's `suggest_*` returns the recorded value.
"""

import csv
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from abliterate.ablation import AblationParams, ComponentKernel
from abliterate.callbacks import Point, RefusalPruning, strictly_dominates
from abliterate.errors import AbliterateError
from abliterate.options import DirectionOptions, SearchSpace, StudyOptions

log = logging.getLogger("abliterate.search")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
REFUSAL_CONSTRAINT = "refusal_rate_over_target"  # > 0: infeasible for TPE (StudyOptions.steer_to_target)


@dataclass
class TrialPlan:
    """What one trial does: which directions, ablated how."""

    directions: DirectionOptions
    ablation: AblationParams


def sample_plan(trial: optuna.Trial | FrozenTrial, space: SearchSpace, n_layers: int) -> TrialPlan:
    last = max(n_layers - 1, 1)
    method = trial.suggest_categorical("direction_method", space.direction_methods)
    if method == "contrastive_pca":
        k = trial.suggest_int("k", *space.k)
        alpha = trial.suggest_float("alpha", *space.alpha)
        decay = trial.suggest_float("direction_decay", *space.direction_decay)
    else:
        k, alpha, decay = 1, 1.0, 1.0
    projected = trial.suggest_categorical("projected", space.projected)
    scope = trial.suggest_categorical("direction_scope", space.direction_scope)
    index = None
    if scope == "global":
        lo, hi = space.direction_index
        index = trial.suggest_float("direction_index", lo * last, hi * last)
    components = {}
    for name in space.components:
        max_weight = trial.suggest_float(f"{name}.max_weight", *space.max_weight)
        lo, hi = space.max_weight_position
        position = trial.suggest_float(f"{name}.max_weight_position", lo * last, hi * last)
        min_fraction = trial.suggest_float(f"{name}.min_weight", *space.min_weight)
        lo, hi = space.min_weight_distance
        distance = trial.suggest_float(f"{name}.min_weight_distance", max(1.0, lo * last), max(1.0, hi * last))
        components[name] = ComponentKernel(max_weight, position, min_fraction * max_weight, distance)
    norm_preserving = trial.suggest_categorical("norm_preserving", space.norm_preserving)
    return TrialPlan(
        directions=DirectionOptions(method=method, k=k, alpha=alpha, projected=projected),
        ablation=AblationParams(
            components=components, direction_index=index, direction_decay=decay, norm_preserving=norm_preserving
        ),
    )


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL; a path ending in .journal is a journal file (safe for many writers)."""
    if url.endswith(".journal"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:///").removeprefix("journal://")))
    # SQLite serialises writers with a lock; a long busy timeout lets a few local workers share it.
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def make_study(options: StudyOptions, storage: str | optuna.storages.BaseStorage) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(
        multivariate=True, group=True, n_startup_trials=options.n_startup_trials, seed=options.seed
    )
    return optuna.create_study(
        study_name=options.study_name,
        storage=open_storage(storage) if isinstance(storage, str) else storage,
        directions=["minimize", "minimize"],
        sampler=sampler,
        load_if_exists=True,
    )


OBJECTIVE_ATTR = "objective"


def check_objective(study: optuna.Study, objective: dict, record: bool) -> None:
    """Refuse to add trials to a study whose values were measured another way.

    `objective` names what the two values depend on (model, eval prompts, refusal markers, KL
    positions...). A new study records it; trials scored under another one would be mixed silently.
    """
    stored = study.user_attrs.get(OBJECTIVE_ATTR)
    has_trials = bool(study.get_trials(deepcopy=False, states=FINISHED))
    if stored is None and has_trials:
        raise AbliterateError(
            f"study {study.study_name!r} was made by an older abliterate that did not record how its trials "
            "were scored; search again with a new --output_dir"
        )
    if stored is not None and stored != objective:
        changed = ", ".join(
            f"{key} {stored.get(key)!r} -> {objective.get(key)!r}"
            for key in sorted(set(stored) | set(objective))
            if stored.get(key) != objective.get(key)
        )
        raise AbliterateError(
            f"study {study.study_name!r} was scored with other settings ({changed}); restore them, "
            "or search again with a new --output_dir"
        )
    if stored is None and record:
        study.set_user_attr(OBJECTIVE_ATTR, objective)


def completed_points(study: optuna.Study) -> list[Point]:
    return [tuple(t.values) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def _claimed(study: optuna.Study, up_to: int | None = None) -> int:
    """Finished or running trials (numbered below `up_to`): the ones that count towards n_trials."""
    states = (*FINISHED, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if up_to is None or t.number < up_to)


def run_search(trainer, module, datamodule, options: StudyOptions, space: SearchSpace, study: optuna.Study) -> None:
    """Run trials until the study holds `options.n_trials` finished (complete or pruned) trials.

    An ask/tell loop rather than `optimize`: several workers can share the study, and a trial
    asked for past the total (two workers racing for the last one) is failed at once, so the
    study ends with exactly n_trials finished trials.
    """
    n_harmful = len(datamodule.dataset("eval_harmful"))
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    if done >= options.n_trials:
        log.info("study %s already has %d finished trials; nothing to run", study.study_name, done)
        return
    log.info("running trials %d..%d of %d", done + 1, options.n_trials, options.n_trials)
    distributed = trainer.world_size > 1
    while True:
        # Only rank 0 talks to Optuna; the other ranks evaluate the plan it broadcasts.
        order, trial = None, None
        try:
            if trainer.is_global_zero and _claimed(study) < options.n_trials:
                trial = study.ask()
                if _claimed(study, up_to=trial.number) >= options.n_trials:
                    trial.set_user_attr("surplus", True)
                    study.tell(trial, state=TrialState.FAIL)
                    trial = None
                else:
                    order = sample_plan(trial, space, module.n_layers)
            if distributed:
                order = trainer.strategy.broadcast(order, src=0)
            if order is None:
                break
            _run_trial(trainer, module, datamodule, options, study, trial, order, n_harmful)
        except BaseException:
            # Ctrl-C can land anywhere between ask and tell; never leave the trial RUNNING.
            if trial is not None:
                _fail_if_running(study, trial)
            raise


def _run_trial(trainer, module, datamodule, options: StudyOptions, study, trial, plan: TrialPlan, n_harmful: int):
    start = time.perf_counter()
    record = trial if trial is not None else _OtherRankTrial()
    record.set_user_attr("worker_pid", os.getpid())
    try:
        directions = module.directions_for(plan.directions)
        completed = completed_points(study) if trial is not None else []
        pruning = RefusalPruning(record, completed, n_harmful, enabled=options.prune)
        result = trainer.evaluate_plan(module, datamodule, plan.ablation, directions, extra_callbacks=[pruning])
    except optuna.TrialPruned:
        if trial is not None:
            trial.set_user_attr("seconds", time.perf_counter() - start)
            if options.steer_to_target:
                # Pruned: its refusal rate is at least the bound RefusalPruning recorded.
                bound = trial.user_attrs["refusal_lower_bound"]
                trial.set_constraint(REFUSAL_CONSTRAINT, bound - options.refusal_target)
            study.tell(trial, state=TrialState.PRUNED)
            log.info(
                "trial %d pruned after %s/%d prompts (%.1fs)",
                trial.number,
                trial.user_attrs.get("prompts_seen"),
                n_harmful,
                time.perf_counter() - start,
            )
        return
    if trial is None:
        return
    seconds = time.perf_counter() - start
    trial.set_user_attr("seconds", seconds)
    if options.steer_to_target:
        trial.set_constraint(REFUSAL_CONSTRAINT, result["refusal_rate"] - options.refusal_target)
    study.tell(trial, [result["refusal_rate"], result["kl"]])
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    log.info(
        "trial %d (%d/%d): refusals %.3f, KL %.4f (%.1fs)",
        trial.number,
        finished,
        options.n_trials,
        result["refusal_rate"],
        result["kl"],
        seconds,
    )


def _fail_if_running(study: optuna.Study, trial: optuna.Trial) -> None:
    """Mark an interrupted trial FAIL unless it already reached a finished state."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if any(t.number == trial.number for t in running):
        study.tell(trial, state=TrialState.FAIL)


class _OtherRankTrial:
    """Stands in for the trial on ranks other than 0, which keep no Optuna state."""

    def set_user_attr(self, key: str, value) -> None:
        pass


# ---- selection ----------------------------------------------------------------------
def pareto_front(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Completed trials not strictly dominated by another, sorted by refusals."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    front = [t for t in complete if not any(strictly_dominates(tuple(o.values), tuple(t.values)) for o in complete)]
    return sorted(front, key=lambda t: (t.values[0], t.values[1], t.number))


def knee(front: Sequence[FrozenTrial]) -> FrozenTrial:
    """The front point farthest from the chord joining its two ends (objectives scaled to [0, 1])."""
    if len(front) <= 2:
        return min(front, key=lambda t: (t.values[0] + t.values[1], t.number))
    xs = [t.values[0] for t in front]
    ys = [t.values[1] for t in front]
    sx = (max(xs) - min(xs)) or 1.0
    sy = (max(ys) - min(ys)) or 1.0
    pts = [((x - min(xs)) / sx, (y - min(ys)) / sy) for x, y in zip(xs, ys, strict=True)]
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    norm = math.hypot(x1 - x0, y1 - y0) or 1.0
    dist = [abs((y1 - y0) * x - (x1 - x0) * y + x1 * y0 - y1 * x0) / norm for x, y in pts]
    return front[max(range(len(front)), key=lambda i: (dist[i], -i))]


def select_trial(trials: Sequence[FrozenTrial], policy: str, refusal_target: float) -> FrozenTrial:
    """Pick the trial to export: min_kl_under (default), knee, or an explicit trial number."""
    if policy.isdigit():
        for t in trials:
            if t.number == int(policy):
                if t.state != TrialState.COMPLETE:
                    raise AbliterateError(f"trial {policy} is {t.state.name}, not COMPLETE; pick a completed trial")
                return t
        raise AbliterateError(f"no trial {policy} in the study; see trials.csv for trial numbers")
    front = pareto_front(trials)
    if not front:
        raise AbliterateError("the study has no completed trial yet; run more trials (--study.n_trials)")
    if policy == "knee":
        return knee(front)
    under = [t for t in front if t.values[0] <= refusal_target]
    if under:
        return min(under, key=lambda t: (t.values[1], t.number))
    best = front[0]
    log.warning(
        "no trial reaches refusal rate <= %.3f; picking the fewest refusals (trial %d: %.3f)",
        refusal_target,
        best.number,
        best.values[0],
    )
    return best


# ---- outputs ----------------------------------------------------------------------
def write_trials_csv(trials: Sequence[FrozenTrial], path: Path) -> None:
    param_names = sorted({name for t in trials for name in t.params})
    attr_names = sorted({name for t in trials for name in t.user_attrs})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "refusal_rate", "kl", "duration_s", *param_names, *attr_names])
        for t in trials:
            values = t.values or [None, None]
            duration = t.duration.total_seconds() if t.duration else None
            writer.writerow(
                [t.number, t.state.name, *values, duration]
                + [t.params.get(n) for n in param_names]
                + [t.user_attrs.get(n) for n in attr_names]
            )


def plot_pareto(trials: Sequence[FrozenTrial], chosen: FrozenTrial | None, path: Path) -> bool:
    """refusals vs KL with the front and the chosen trial; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping %s (pip install matplotlib)", path.name)
        return False
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    front = pareto_front(trials)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t.values[1] for t in complete], [t.values[0] for t in complete], s=12, c="0.6", label="trials")
    ax.plot([t.values[1] for t in front], [t.values[0] for t in front], "o-", c="C0", label="Pareto front")
    if chosen is not None:
        ax.scatter([chosen.values[1]], [chosen.values[0]], s=120, marker="*", c="C3", label=f"chosen #{chosen.number}")
    ax.set_xlabel("KL divergence (harmless)")
    ax.set_ylabel("refusal rate (harmful)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
