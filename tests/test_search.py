import random
import signal

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from abliterate.errors import AbliterateError
from abliterate.options import SearchSpace, StudyOptions
from abliterate.pareto import knee, pareto_front, prunable, select_trial, strictly_dominates
from abliterate.plans import sample_plan


def front_points(points):
    return sorted({p for p in points if not any(strictly_dominates(q, p) for q in points)})


@pytest.mark.parametrize("seed", range(40))
def test_pruning_never_removes_a_pareto_trial(seed):
    """Simulate searches trial by trial, chunk by chunk: pruning keeps the front of the unpruned search."""
    rng = random.Random(seed)
    n_prompts, chunk = 20, 4
    trials = []
    for _ in range(30):
        kl = round(rng.choice([rng.random(), rng.random() * 0.1]), 2)  # ties on KL happen
        refusals = [rng.random() < rng.random() for _ in range(n_prompts)]
        trials.append((kl, refusals))

    completed = []
    for kl, refusals in trials:
        final = (sum(refusals) / n_prompts, kl)
        pruned = False
        for seen in range(chunk, n_prompts, chunk):  # the last chunk completes the trial
            bound = (sum(refusals[:seen]) / n_prompts, kl)
            assert bound[0] <= final[0]
            if prunable(bound, completed):
                pruned = True
                # sound: the full evaluation would have been strictly dominated
                assert any(strictly_dominates(c, final) for c in completed)
                break
        if not pruned:
            completed.append(final)

    unpruned = [(sum(r) / n_prompts, kl) for kl, r in trials]
    assert front_points(completed) == front_points(unpruned)


def test_prunable_needs_strict_domination():
    assert not prunable((0.2, 0.1), [(0.2, 0.1)])  # equal is not dominated
    assert prunable((0.2, 0.1), [(0.2, 0.05)])
    assert prunable((0.3, 0.1), [(0.2, 0.1)])
    assert not prunable((0.1, 0.1), [(0.2, 0.05)])


def synthetic_trials(points):
    dist = {"x": FloatDistribution(0, 1)}
    trials = []
    for i, values in enumerate(points):
        if values is None:
            t = create_trial(state=TrialState.PRUNED, params={"x": 0.5}, distributions=dist)
        else:
            t = create_trial(values=list(values), params={"x": 0.5}, distributions=dist)
        t.number = i
        trials.append(t)
    return trials


def test_select_min_kl_under_target():
    trials = synthetic_trials([(0.5, 0.01), (0.04, 0.3), (0.02, 0.5), (0.0, 0.9), None, (0.04, 0.4)])
    assert select_trial(trials, "min_kl_under", 0.05).number == 1
    assert select_trial(trials, "min_kl_under", 0.01).number == 3
    assert select_trial(trials, "min_kl_under", 1.0).number == 0


def test_select_min_kl_under_falls_back_to_fewest_refusals_with_a_warning(caplog):
    trials = synthetic_trials([(0.5, 0.01), (0.3, 0.2), (0.3, 0.1)])
    with caplog.at_level("WARNING"):
        assert select_trial(trials, "min_kl_under", 0.05).number == 2
    assert "no trial reaches" in caplog.text


def test_select_min_kl_under_looks_within_the_margin_before_the_fewest_refusals(caplog):
    trials = synthetic_trials([(0.01, 0.5), (0.02, 0.05), (0.05, 0.01)])
    with caplog.at_level("WARNING"):
        assert select_trial(trials, "min_kl_under", 0.0, fallback_target=0.02).number == 1
    assert "lowest KL at <= 0.020" in caplog.text
    assert select_trial(trials, "min_kl_under", 0.0, fallback_target=0.015).number == 0
    assert select_trial(trials, "min_kl_under", 0.0).number == 0  # no margin: the fewest refusals
    assert select_trial(trials, "min_kl_under", 0.02, fallback_target=0.04).number == 1  # the target first


@pytest.mark.parametrize(
    ("refusals", "methods", "hinted"),
    [(0.4, ["mean_diff"], True), (0.04, ["mean_diff"], False), (0.4, ["mean_diff", "contrastive_pca"], False)],
)
def test_a_pick_above_the_target_names_contrastive_pca_only_when_the_space_lacks_it(caplog, refusals, methods, hinted):
    from abliterate.verbs import hint_more_directions

    chosen = synthetic_trials([(refusals, 0.01)])[0]
    with caplog.at_level("WARNING", logger="abliterate"):
        hint_more_directions(chosen, StudyOptions(refusal_target=0.05), SearchSpace(direction_methods=methods))
    assert ("configs/examples/contrastive_pca.yaml" in caplog.text) is hinted, caplog.text
    if hinted:
        assert f"refusal rate of {refusals:.3f}" in caplog.text


def test_a_kl_budget_leaves_the_pick_to_the_trials_within_it(caplog):
    """The soft organism's front (docs/benchmarks.md): min_kl_under alone takes 0 refusals at KL 0.057; under
    a budget of 0.05 it takes the lowest KL at refusal_target + steer_margin, saying so."""
    from abliterate.pareto import within_budget

    trials = synthetic_trials([(0.0, 0.0797), (0.01, 0.0478), (0.0, 0.0574), (0.05, 0.039), None, (0.3, 0.01)])
    assert select_trial(trials, "min_kl_under", 0.0, fallback_target=0.02).number == 2
    kept = within_budget(trials, 1, 0.05, "kl")
    assert [t.number for t in kept] == [1, 3, 5]
    assert select_trial(kept, "min_kl_under", 0.0, fallback_target=0.02).number == 1
    assert "no trial reaches refusal rate <= 0.000" in caplog.text
    assert [t.number for t in within_budget(trials, 1, 0.0478, "kl")] == [1, 3, 5], "at the budget counts"
    with pytest.raises(AbliterateError, match=r"no completed trial has kl <= 0.005 .* lowest is trial 5 at 0.0100"):
        within_budget(trials, 1, 0.005, "kl")


def test_select_knee_and_number():
    # a convex front whose knee is (0.1, 0.1)
    trials = synthetic_trials([(1.0, 0.0), (0.1, 0.1), (0.05, 0.6), (0.0, 1.0), (0.5, 0.5)])
    front = pareto_front(trials)
    assert [t.number for t in front] == [3, 2, 1, 0]
    assert knee(front).number == 1
    assert select_trial(trials, "knee", 0.05).number == 1
    assert select_trial(trials, "2", 0.05).number == 2


def test_select_errors_name_the_fix():
    trials = synthetic_trials([None, (0.1, 0.1)])
    with pytest.raises(AbliterateError, match="PRUNED"):
        select_trial(trials, "0", 0.05)
    with pytest.raises(AbliterateError, match="trials.csv"):
        select_trial(trials, "9", 0.05)
    with pytest.raises(AbliterateError, match="n_trials"):
        select_trial(synthetic_trials([None]), "min_kl_under", 0.05)


def test_sample_plan_replays_from_frozen_trial():
    space = SearchSpace(
        direction_methods=["mean_diff", "contrastive_pca"],
        projected=[False, True],
        direction_scope=["global", "per_layer"],
    )
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(8):
        trial = study.ask()
        plan = sample_plan(trial, space, n_layers=12)
        study.tell(trial, [0.1, 0.1])
        replay = sample_plan(study.trials[-1], space, n_layers=12)
        assert replay == plan
        for kernel in plan.ablation.components.values():
            assert 0.8 <= kernel.max_weight <= 1.5
            assert 0.0 <= kernel.min_weight <= kernel.max_weight
            assert 0.4 * 11 <= kernel.max_weight_position <= 11
        if plan.ablation.direction_index is not None:
            assert 0.2 * 11 <= plan.ablation.direction_index <= 0.9 * 11
    assert {t.params["projected"] for t in study.trials} == {False, True}
    assert {t.params["direction_scope"] for t in study.trials} == {"global", "per_layer"}


@pytest.mark.parametrize("choices", [[True], [False]])
def test_sample_plan_takes_projection_from_the_space(choices):
    study = optuna.create_study(directions=["minimize", "minimize"])
    plan = sample_plan(study.ask(), SearchSpace(projected=choices), n_layers=12)
    assert plan.directions.projected is choices[0]


def test_winsorize_is_a_parameter_only_when_the_space_offers_a_choice():
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    chosen = set()
    for _ in range(12):
        trial = study.ask()
        plan = sample_plan(trial, SearchSpace(winsorize=[0.99, 1.0]), n_layers=12)
        study.tell(trial, [0.1, 0.1])
        assert study.trials[-1].params["winsorize"] == plan.directions.winsorize
        chosen.add(plan.directions.winsorize)
    assert chosen == {0.99, 1.0}
    # A single choice is no parameter, so studies made before the option existed still rebuild.
    trial = study.ask()
    plan = sample_plan(trial, SearchSpace(winsorize=[0.995]), n_layers=12)
    assert plan.directions.winsorize == 0.995 and "winsorize" not in trial.params


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_weight": (1.5, 0.8)}, "max_weight"),
        ({"direction_index": (0.2, 1.2)}, "direction_index"),
        ({"components": []}, "components"),
        ({"winsorize": [0.99, 1.5]}, "winsorize"),
        ({"winsorize": []}, "winsorize"),
        ({"k": (0, 3)}, "k"),
    ],
)
def test_search_space_rejects_bad_bounds(kwargs, match):
    with pytest.raises(AbliterateError, match=match):
        SearchSpace(**kwargs)


def test_search_options_validate():
    with pytest.raises(AbliterateError, match="select"):
        StudyOptions(select="best")
    with pytest.raises(AbliterateError, match="refusal_target"):
        StudyOptions(refusal_target=5)
    with pytest.raises(AbliterateError, match="steer_margin"):
        StudyOptions(steer_margin=-0.1)
    with pytest.raises(AbliterateError, match="max_kl"):
        StudyOptions(max_kl=-0.01)


def test_interactive_choice_from_front(capsys):
    from abliterate.reports import choose_from_front

    trials = synthetic_trials([(0.5, 0.01), (0.04, 0.3), None, (0.0, 0.9)])
    front = pareto_front(trials)
    answers = iter(["7", "2", "3"])  # unknown trial, pruned trial, then a valid one
    names = ["refusals", "kl"]
    chosen = choose_from_front(trials, front, front[1], names, read=lambda prompt: next(answers))
    assert chosen.number == 3
    err = capsys.readouterr().err  # the picker talks on stderr: stdout carries results only
    assert "<- default" in err and "no trial 7" in err and "PRUNED" in err
    assert choose_from_front(trials, front, front[1], names, read=lambda prompt: "").number == front[1].number
    answers = iter(["abc", "-1", "3"])  # not numbers: asked again, never the default silently
    assert choose_from_front(trials, front, front[1], names, read=lambda prompt: next(answers)).number == 3
    err = capsys.readouterr().err
    assert "'abc' is not a trial number" in err and "'-1' is not a trial number" in err


def test_replaying_a_trial_from_another_space_says_how_to_recover():
    from abliterate.plans import rebuild_plan

    # A trial stored before `projected` was a search parameter: only direction_method was recorded.
    old = optuna.trial.create_trial(
        params={"direction_method": "mean_diff"},
        distributions={"direction_method": optuna.distributions.CategoricalDistribution(["mean_diff"])},
        values=[0.0, 0.1],
    )
    with pytest.raises(AbliterateError, match="projected.*new --output_dir"):
        rebuild_plan(old, SearchSpace(), n_layers=4)


class _Interrupt:
    """Raises KeyboardInterrupt the n-th time it is called, like Ctrl-C landing there."""

    def __init__(self, at: int):
        self.calls, self.at = 0, at

    def __call__(self):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["sample_plan", "evaluate", "set_constraint", "tell"])
def test_ctrl_c_anywhere_between_ask_and_tell_fails_the_trial(where, monkeypatch):
    """Whatever step the interrupt hits, the study keeps no RUNNING trial and finished trials stay."""
    from types import SimpleNamespace

    from abliterate import study as search
    from abliterate.scorers import KL, MarkerRefusals

    interrupt = _Interrupt(at=3)  # the third trial is interrupted
    if where == "sample_plan":
        real = search.sample_plan
        monkeypatch.setattr(search, "sample_plan", lambda *a: (interrupt(), real(*a))[1])
    if where in ("set_constraint", "tell"):
        cls = optuna.Trial if where == "set_constraint" else optuna.Study
        real_method = getattr(cls, where)
        monkeypatch.setattr(cls, where, lambda self, *a, **k: (interrupt(), real_method(self, *a, **k))[1])

    def evaluate(trial, plan, completed):
        if where == "evaluate":
            interrupt()
        return {"refusals": 0.5, "kl": 0.01}

    ranks = SimpleNamespace(world_size=1, is_global_zero=True)
    scorers = [MarkerRefusals(), KL()]
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    options = StudyOptions(n_trials=5, prune=False)
    with pytest.raises(KeyboardInterrupt):
        search.run_search(ranks, study, options, SearchSpace(), 4, scorers, evaluate)
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states
    assert states[:2] == [TrialState.COMPLETE, TrialState.COMPLETE] and states[-1] == TrialState.FAIL


def search_until_interrupted(study) -> None:
    """A 5-trial search that a Ctrl-C stops, under Python's own SIGINT handler: a job that a
    non-interactive shell starts in the background inherits SIGINT ignored."""
    from types import SimpleNamespace

    from abliterate import study as search
    from abliterate.scorers import KL, MarkerRefusals

    ranks = SimpleNamespace(world_size=1, is_global_zero=True)
    scorers, options = [MarkerRefusals(), KL()], StudyOptions(n_trials=5, prune=False)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            search.run_search(
                ranks, study, options, SearchSpace(), 4, scorers, lambda *a: {"refusals": 0.5, "kl": 0.01}
            )
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_ask_fails_the_new_trial():
    """A signal arriving while `study.ask()` samples, after the trial was stored, still fails that trial."""
    import os

    class InterruptedSampler(optuna.samplers.RandomSampler):
        calls = 0

        def before_trial(self, study, trial):
            InterruptedSampler.calls += 1
            if InterruptedSampler.calls == 3:  # the third trial, already RUNNING in the storage
                os.kill(os.getpid(), signal.SIGINT)
            super().before_trial(study, trial)

    study = optuna.create_study(directions=["minimize", "minimize"], sampler=InterruptedSampler(seed=0))
    search_until_interrupted(study)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]


def _reads_the_trials_after_the_third_alive_at(statement: str, params: tuple, seen: list) -> bool:
    if params[:2] == (3, "alive_at"):
        seen.append(statement)
    return bool(seen) and statement.startswith("SELECT trials.")  # rows still to fetch: the statement is live


# Where a signal arriving during cursor.execute is raised, in the third trial (trial_id 3 in a new database).
INTERRUPTED_STATEMENTS = {
    "reading the trials": _reads_the_trials_after_the_third_alive_at,
    "writing its state": lambda statement, params, seen: params[0] == "COMPLETE" and params[-1] == 3,
}


@pytest.mark.parametrize("where", INTERRUPTED_STATEMENTS)
def test_ctrl_c_inside_a_sqlite_statement_fails_the_trial_at_once(where, tmp_path):
    """Ctrl-C landing just after SQLite ran a statement: a read whose rows were not all fetched keeps its
    lock on the database while the interrupt's traceback keeps its cursor. The trial is still marked FAIL,
    under a 1 s busy timeout (the CLI's is 120 s, and a Ctrl-C used to wait it out, then fail)."""

    from sqlalchemy import event

    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 1}})
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(storage=storage, directions=["minimize", "minimize"], sampler=sampler)
    seen, hit = [], []

    @event.listens_for(storage.engine, "after_cursor_execute")
    def interrupt(conn, cursor, statement, params, context, executemany):
        if not hit and INTERRUPTED_STATEMENTS[where](statement, tuple(params), seen):
            hit.append(statement)
            raise KeyboardInterrupt

    search_until_interrupted(study)
    assert hit, "the statement was never run"
    states = [t.state for t in optuna.load_study(study_name=study.study_name, storage=url).trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]


def test_a_shared_study_waits_for_a_silent_node_and_reruns_its_trial(tmp_path):
    """Every other trial is finished and a dead node's trial still looks alive: the study must not end
    one short. The live node waits until that trial is stale, fails it and runs one in its place."""
    import time
    from types import SimpleNamespace

    from abliterate import study as search
    from abliterate.scorers import KL, MarkerRefusals

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, directions=["minimize", "minimize"])
    for values in ([0.1, 0.2], [0.2, 0.1]):
        study.add_trial(create_trial(values=values))
    silent = study.ask()  # the dead node's trial, last seen alive now
    silent.set_user_attr(search.ALIVE_ATTR, time.time())
    ranks = SimpleNamespace(world_size=1, is_global_zero=True)
    options = StudyOptions(n_trials=3, prune=False, storage=url, stale_after=1.0)
    scorers = [MarkerRefusals(), KL()]
    search.run_search(ranks, study, options, SearchSpace(), 4, scorers, lambda *a: {"refusals": 0.5, "kl": 0.01})
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]


def test_a_study_refuses_trials_scored_another_way():
    from abliterate.study import check_objective

    scoring = {"kl_tokens": 1, "eval_prompts": "abc"}
    study = optuna.create_study(directions=["minimize", "minimize"])
    check_objective(study, scoring, record=False)  # a new study: nothing to compare, nothing recorded
    assert "objective" not in study.user_attrs
    check_objective(study, scoring, record=True)
    study.add_trial(create_trial(values=[0.1, 0.2]))
    check_objective(study, dict(scoring), record=True)  # the same scoring resumes
    with pytest.raises(AbliterateError, match=r"kl_tokens 1 -> 16\).*new --output_dir"):
        check_objective(study, {**scoring, "kl_tokens": 16}, record=True)
    assert study.user_attrs["objective"] == scoring

    old = optuna.create_study(directions=["minimize", "minimize"])
    old.add_trial(create_trial(values=[0.1, 0.2]))  # trials, but no record of how they were scored
    with pytest.raises(AbliterateError, match="older abliterate.*new --output_dir"):
        check_objective(old, scoring, record=True)


def test_three_objectives_front_knee_and_selection():
    # refusals, KL, and a maximised third objective (e.g. capability): sign -1 turns it into a minimum.
    trials = synthetic_trials([(0.0, 0.5, 0.9), (0.0, 0.1, 0.5), (0.1, 0.1, 0.8), (0.5, 0.0, 0.9), (0.6, 0.2, 0.1)])
    signs = [1, 1, -1]
    front = pareto_front(trials, signs)
    assert sorted(t.number for t in front) == [0, 1, 2, 3]  # 4 is dominated by 2
    assert select_trial(trials, "min_kl_under", 0.05, signs).number == 1
    # The knee with three objectives: the front point nearest the ideal one, scaled to [0, 1].
    assert knee(front, signs).number == 2
    # All minimised, the lower third values win instead: 1 dominates 0 and 2, and 4 joins the front.
    assert sorted(t.number for t in pareto_front(trials)) == [1, 3, 4]


def test_pruning_with_three_objectives_is_sound():
    rng = random.Random(0)
    completed = [(rng.random(), rng.random(), rng.random()) for _ in range(20)]
    for _ in range(500):
        final = (rng.random(), rng.random(), rng.random())
        bound = (final[0] * rng.random(), final[1], final[2])  # refusals so far can only grow
        if prunable(bound, completed):
            assert any(strictly_dominates(c, final) for c in completed)


def test_an_interrupt_swallowed_by_a_finalizer_still_stops_the_search_at_the_next_trial():
    """The CLI's handler raises KeyboardInterrupt and sets INTERRUPT_REQUESTED; a raise inside a finalizer
    (Python prints 'Exception ignored' and goes on) must not let the search run to the end."""
    import gc
    from types import SimpleNamespace

    from abliterate import study as search
    from abliterate.cli import _terminate
    from abliterate.errors import INTERRUPT_REQUESTED
    from abliterate.scorers import KL, MarkerRefusals

    class InterruptedWhenCollected:
        def __del__(self):
            _terminate(signal.SIGINT, None)  # what the handler does when the signal lands in a finalizer

    def evaluate(trial, plan, completed):
        if trial.number == 1:
            InterruptedWhenCollected()  # collected at once: its KeyboardInterrupt is swallowed
            gc.collect()
        return {"refusals": 0.5, "kl": 0.01}

    ranks = SimpleNamespace(world_size=1, is_global_zero=True)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    INTERRUPT_REQUESTED.clear()
    try:
        with pytest.raises(KeyboardInterrupt):
            search.run_search(
                ranks,
                study,
                StudyOptions(n_trials=5, prune=False),
                SearchSpace(),
                4,
                [MarkerRefusals(), KL()],
                evaluate,
            )
    finally:
        INTERRUPT_REQUESTED.clear()
    # Trial 1 finished (the interrupt was swallowed inside it), then the search stopped before asking trial 2.
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]


def test_two_workers_on_one_storage_split_the_trials_without_running_any_twice(tmp_path):
    """What `study.workers` relies on, without process start-up times deciding who runs what: worker a
    holds its first trial until worker b has one too, so both must take part; together they finish
    exactly n_trials distinct trials, and an ask past the total is failed as surplus."""
    import threading
    from types import SimpleNamespace

    from abliterate import study as search
    from abliterate.scorers import KL, MarkerRefusals

    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="shared", storage=search.open_storage(url), directions=["minimize"] * 2)
    b_has_a_trial = threading.Event()
    ran = {"a": [], "b": []}

    def worker(name):
        def evaluate(trial, plan, completed):
            if name == "b":
                b_has_a_trial.set()
            elif not ran["a"]:
                assert b_has_a_trial.wait(60), "worker b never got a trial"
            ran[name].append(trial.number)
            return {"refusals": 0.5, "kl": 0.01}

        study = optuna.load_study(study_name="shared", storage=search.open_storage(url))
        ranks = SimpleNamespace(world_size=1, is_global_zero=True)
        options = StudyOptions(n_trials=6, prune=False)
        search.run_search(ranks, study, options, SearchSpace(), 4, [MarkerRefusals(), KL()], evaluate)

    errors = []
    threads = [threading.Thread(target=lambda n=n: _record_errors(errors, worker, n)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    trials = optuna.load_study(study_name="shared", storage=url).trials
    finished = sorted(t.number for t in trials if t.state == TrialState.COMPLETE)
    assert ran["a"] and ran["b"], "both workers ran trials"
    assert sorted(ran["a"] + ran["b"]) == finished and len(finished) == 6
    assert all(t.user_attrs.get("surplus") for t in trials if t.state != TrialState.COMPLETE)


def _record_errors(errors, fn, *args):
    try:
        fn(*args)
    except BaseException as err:  # a thread's exception would otherwise only be printed
        errors.append(repr(err))
