"""The Optuna study: storage, creation, the record of how trials are scored, and the ask/tell loop.

Lightning-free: a trial is evaluated by the `evaluate` function the pipeline passes in.
"""

import logging
import os
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import optuna
import sqlalchemy
from optuna.trial import TrialState

from abliterate.errors import INTERRUPT_REQUESTED, AbliterateError
from abliterate.options import SearchSpace, StudyOptions
from abliterate.pareto import Point, minimised
from abliterate.plans import TrialPlan, sample_plan
from abliterate.scorers import Scorer

log = logging.getLogger("abliterate.study")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
REFUSAL_CONSTRAINT = "refusal_rate_over_target"  # > 0: infeasible for TPE (StudyOptions.steer_bound)
OBJECTIVE_ATTR = "objective"


class InfeasiblePlan(Exception):
    """A sampled plan that cannot be evaluated (e.g. more contrastive PCA directions than the prompts
    support): that trial fails, the search goes on."""


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL; a path ending in .journal is a journal file (safe for many writers)."""
    if url.endswith(".journal"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:///").removeprefix("journal://")))
    # SQLite serialises writers with a lock; a long busy timeout lets a few local workers share it.
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Nodes starting together on a fresh database race to create Optuna's tables: the loser retries.
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())


def objectives_of(scorers: Sequence[Scorer]) -> list[Scorer]:
    return [s for s in scorers if s.is_objective]


def signs_of(objectives: Sequence[Scorer]) -> list[int]:
    """+1 for a minimised objective, -1 for a maximised one (pareto.py minimises everything)."""
    return [-1 if s.direction == "maximize" else 1 for s in objectives]


def make_study(
    options: StudyOptions, storage: str | optuna.storages.BaseStorage, objectives: Sequence[Scorer]
) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(
        multivariate=True,
        group=True,
        n_startup_trials=options.n_startup_trials,
        seed=options.seed,
    )
    study = optuna.create_study(
        study_name=options.study_name,
        storage=open_storage(storage) if isinstance(storage, str) else storage,
        directions=[s.direction for s in objectives],
        sampler=sampler,
        load_if_exists=True,
    )
    names = [s.name for s in objectives]
    if study.metric_names != names:
        study.set_metric_names(names)  # labels optuna-dashboard's axes
    return study


def check_objective(study: optuna.Study, objective: dict, record: bool) -> None:
    """Refuse to add trials to a study whose values were measured another way.

    `objective` names what the values depend on (model, eval prompts, scorers...). A new study
    records it; trials scored under another one would be mixed silently.
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


def completed_points(study: optuna.Study, signs: Sequence[int]) -> list[Point]:
    return [minimised(t.values, signs) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def _claimed(study: optuna.Study, up_to: int | None = None) -> int:
    """Finished or running trials (numbered below `up_to`): the ones that count towards n_trials."""
    states = (*FINISHED, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if up_to is None or t.number < up_to)


# evaluate(trial or None, plan, completed points) -> {scorer name: value}; raises optuna.TrialPruned.
Evaluate = Callable[[optuna.Trial | None, TrialPlan, list[Point]], dict[str, float]]


def run_search(
    ranks,
    study: optuna.Study,
    options: StudyOptions,
    space: SearchSpace,
    n_layers: int,
    scorers: Sequence[Scorer],
    evaluate: Evaluate,
    progress=None,
) -> None:
    """Run trials until the study holds `options.n_trials` finished (complete or pruned) trials.

    An ask/tell loop rather than `optimize`: several workers can share the study, and a trial
    asked for past the total (two workers racing for the last one) is failed at once, so the
    study ends with exactly n_trials finished trials. `ranks` is the Trainer (world_size,
    is_global_zero, strategy.broadcast): only rank 0 talks to Optuna; the other ranks evaluate
    the plan it broadcasts.
    """
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    if done >= options.n_trials:
        log.info("study %s already has %d finished trials; nothing to run", study.study_name, done)
        return
    log.info("running trials %d..%d of %d", done + 1, options.n_trials, options.n_trials)
    distributed = ranks.world_size > 1
    while True:
        plan, trial = None, None
        try:
            if INTERRUPT_REQUESTED.is_set():  # an interrupt whose KeyboardInterrupt was swallowed
                raise KeyboardInterrupt
            if ranks.is_global_zero and options.storage is not None:
                fail_stale_trials(study, options.stale_after)
                _wait_for_other_nodes(study, options)
            if ranks.is_global_zero and _claimed(study) < options.n_trials:
                with _interrupts_deferred():
                    trial = study.ask()
                if _claimed(study, up_to=trial.number) >= options.n_trials:
                    trial.set_user_attr("surplus", True)
                    study.tell(trial, state=TrialState.FAIL)
                    trial = None
                else:
                    plan = sample_plan(trial, space, n_layers)
            if distributed:
                plan = ranks.strategy.broadcast(plan, src=0)
            if plan is None:
                break
            _run_trial(study, options, scorers, trial, plan, evaluate, progress)
        except BaseException as err:
            # Ctrl-C can land anywhere between ask and tell; never leave the trial RUNNING.
            if trial is not None:
                if not isinstance(err, Exception):
                    _release_interrupted_statements(err)
                _fail_if_running(study, trial)
            raise


def _run_trial(study, options: StudyOptions, scorers, trial, plan: TrialPlan, evaluate: Evaluate, progress) -> None:
    start = time.perf_counter()
    objectives = objectives_of(scorers)
    if trial is not None:
        trial.set_user_attr("worker_pid", os.getpid())
        trial.set_user_attr(ALIVE_ATTR, time.time())
    completed = completed_points(study, signs_of(objectives)) if trial is not None else []
    try:
        values = evaluate(trial, plan, completed)
    except InfeasiblePlan as err:
        if trial is not None:
            trial.set_user_attr("infeasible", str(err))
            study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s; the search goes on", trial.number, err)
            limit = 2 * options.n_trials + 10  # a search space that is mostly infeasible must still end
            if sum("infeasible" in t.user_attrs for t in study.get_trials(deepcopy=False)) > limit:
                raise AbliterateError(
                    f"more than {limit} sampled plans were infeasible ({err}); narrow the search space"
                ) from err
        return
    except optuna.TrialPruned:
        if trial is None:
            return
        seconds = time.perf_counter() - start
        trial.set_user_attr("seconds", seconds)
        if options.steer_to_target:
            # Pruned: its refusal rate is at least the bound the pruning callback recorded.
            trial.set_constraint(REFUSAL_CONSTRAINT, trial.user_attrs["bound"][0] - options.steer_bound)
        study.tell(trial, state=TrialState.PRUNED)
        attrs = trial.user_attrs
        log.info(
            "trial %d pruned after %s %s prompts (%.1fs)",
            trial.number,
            attrs.get("prompts_seen"),
            attrs.get("pruned_in", ""),
            seconds,
        )
        if progress:
            progress.trial_done(pruned=True)
        return
    if trial is None:
        return
    seconds = time.perf_counter() - start
    trial.set_user_attr("seconds", seconds)
    for scorer in scorers:
        if not scorer.is_objective and scorer.name in values:  # reported scorers, when run on every trial
            trial.set_user_attr(scorer.name, values[scorer.name])
    point = [values[s.name] for s in objectives]
    if options.steer_to_target:
        trial.set_constraint(REFUSAL_CONSTRAINT, point[0] - options.steer_bound)
    study.tell(trial, point)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    shown = ", ".join(f"{s.name} {values[s.name]:.4f}" for s in scorers if s.name in values)
    log.info("trial %d (%d/%d): %s (%.1fs)", trial.number, finished, options.n_trials, shown, seconds)
    if progress:
        progress.trial_done(values=point)


ALIVE_ATTR = "alive_at"  # wall-clock seconds of a running trial's last sign of life (each batch)


def fail_stale_trials(study: optuna.Study, stale_after: float) -> None:
    """In a shared storage, a RUNNING trial whose worker has shown no progress for `stale_after`
    seconds belongs to a node that died: fail it, so that it stops counting towards n_trials."""
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = t.user_attrs.get(ALIVE_ATTR) or (t.datetime_start.timestamp() if t.datetime_start else now)
        if now - last > stale_after:
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (RuntimeError, ValueError):  # another node got there first
                continue
            log.warning("trial %d showed no progress for %.0fs (its worker is gone); marked FAIL", t.number, now - last)


def _wait_for_other_nodes(study: optuna.Study, options: StudyOptions) -> None:
    """In a shared storage, wait while the last trials run on other nodes: one whose node died would
    otherwise still count towards n_trials when every live node has stopped, and the study would end
    short. Each running trial finishes, or shows no progress for `stale_after` seconds and is failed
    (then this node runs a trial in its place)."""
    logged = False
    while _claimed(study) >= options.n_trials and _finished(study) < options.n_trials:
        if not logged:
            running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
            log.info(
                "waiting for trials %s on other nodes (one without progress for %.0fs is failed and rerun here)",
                running,
                options.stale_after,
            )
            logged = True
        time.sleep(1.0)
        fail_stale_trials(study, options.stale_after)


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


@contextmanager
def _interrupts_deferred():
    """Ctrl-C or SIGTERM inside `study.ask()` would leave a RUNNING trial that nothing holds to fail:
    deliver it once the trial is assigned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be restored
                signal.signal(sig, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            else:
                signal.raise_signal(pending[0])


def _release_interrupted_statements(err: BaseException) -> None:
    """Free what an interrupt unwound through, so that the trial can be marked FAIL at once.

    Ctrl-C landing in a SQLite query whose rows were not all fetched leaves that statement live while its
    cursor lives, and the interrupt's traceback frames keep the cursor: its connection (closed by
    SQLAlchemy, but a zombie until then) keeps a lock on the database, and the write that marks the
    trial FAIL waits out the busy timeout (120 s), then fails.
    """
    seen = set()
    while err is not None and id(err) not in seen:  # Lightning turns Ctrl-C into SystemExit: its context too
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)  # frames still executing (this one) are skipped
        err = err.__cause__ or err.__context__


def _fail_if_running(study: optuna.Study, trial: optuna.Trial) -> None:
    """Mark an interrupted trial FAIL unless it already reached a finished state."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if any(t.number == trial.number for t in running):
        study.tell(trial, state=TrialState.FAIL)
