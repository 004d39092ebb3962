"""Scorers: their maths on plain inputs, the pass order they imply, and a third objective end to end."""

import csv

import optuna
import pytest
import torch
from helpers import organism_pipeline

from abliterate.cli import main
from abliterate.errors import AbliterateError
from abliterate.module import AbliterationModule
from abliterate.passes import scorer_roles
from abliterate.scorers import KL, Degeneration, MarkerRefusals
from abliterate.scorers.degeneration import degenerate, loops


def test_degenerate_spots_loops_and_replies_that_never_end():
    assert degenerate([1, 2, 3, 4] * 3, limit=64, ngram=4, repeats=3)  # "Dear [Name]" three times
    assert not degenerate([1, 2, 3, 4] * 2 + [5], limit=64, ngram=4, repeats=3)
    assert degenerate(list(range(8)), limit=8, ngram=4, repeats=3)  # ran to the token limit
    assert not degenerate(list(range(7)), limit=8, ngram=4, repeats=3)
    assert not degenerate([], limit=8, ngram=4, repeats=3)
    assert loops([7] + [1, 2, 3, 4] * 3) and not loops(list(range(64)))  # loops() ignores the length


def test_degeneration_counts_only_what_the_original_did_not_do():
    class Obs:
        def __init__(self, replies, original):
            self._replies, self._original = replies, original
            self.ids = torch.zeros((len(replies), 1), dtype=torch.long)
            self.selected = None

        def replies(self, n):
            return self._replies

        def select(self, rows):
            self.selected = rows.tolist()
            return Obs([self._replies[i] for i in self.selected], None)

        def reference(self, name):
            if name != "degeneration.degenerate":
                raise KeyError(name)  # no kept replies to check: the scorer generates them
            return self._original

    scorer = Degeneration(max_new_tokens=6, ngram=2, repeats=3)
    looping, fine = [7, 8, 7, 8, 7, 8], [1, 2, 3]
    flags = scorer.observe_original(Obs([looping, fine, fine], None))["degenerate"]
    assert flags.tolist() == [True, False, False]
    assert scorer.original_value() == 0.0  # it loops in the original too: nothing the original adds to itself
    scorer.reset()
    # prompt 0 looped in the original too: not counted; prompt 1 is new; prompt 2 is still fine
    trial = Obs([looping, looping, fine], flags)
    scorer.update(trial)
    assert scorer.compute() == pytest.approx(1 / 3)
    assert trial.selected == [1, 2]  # prompt 0 cannot add a degenerate reply: it is not decoded


def test_roles_of_scorers_with_a_best_possible_value_come_last():
    assert scorer_roles([MarkerRefusals(), KL()]) == ("eval_harmless", "eval_harmful")
    assert scorer_roles([MarkerRefusals(), KL(), Degeneration()]) == ("eval_harmless", "eval_harmful")


def test_scorer_lists_that_cannot_be_searched_are_refused():
    with pytest.raises(AbliterateError, match="refusal rate as its first objective"):
        AbliterationModule(scorers=[KL(), MarkerRefusals()])
    with pytest.raises(AbliterateError, match="refusal rate as its first objective"):
        AbliterationModule(scorers=[MarkerRefusals(), KL(direction="report")])
    with pytest.raises(AbliterateError, match="unique"):
        AbliterationModule(scorers=[MarkerRefusals(), KL(), KL(tokens=2)])


def test_degeneration_as_a_third_objective_end_to_end(organism_config, organism_dir, tmp_path, capsys):
    """One config entry adds the scorer: the study gets three named objectives and everything follows."""
    config = tmp_path / "three.yaml"
    # The organism config's `module:` section holds load and evaluation; scorers join it.
    text = organism_config.read_text().replace(
        "module:\n",
        "module:\n  scorers:\n"
        "    - class_path: abliterate.scorers.MarkerRefusals\n"
        "    - class_path: abliterate.scorers.KL\n"
        "    - class_path: abliterate.scorers.Degeneration\n"
        "      init_args: {max_new_tokens: 16}\n",
    )
    config.write_text(text)
    out = tmp_path / "run"
    args = ["run", "--config", str(config), "--model", str(organism_dir), "--output_dir", str(out)]
    main([*args, "--study.n_trials", "4", "--study.n_startup_trials", "4"])
    study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{out / 'study.db'}")
    assert study.metric_names == ["refusals", "kl", "degeneration"]
    assert [d.name for d in study.directions] == ["MINIMIZE"] * 3
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(len(t.values) == 3 and 0.0 <= t.values[2] <= 1.0 for t in complete)
    header = next(csv.reader((out / "trials.csv").open()))
    assert {"values_refusals", "values_kl", "values_degeneration"} <= set(header)
    assert (out / "pareto.png").is_file() and (out / "model" / "config.json").is_file()
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"degeneration_after"' in summary


def test_reported_scorers_run_on_every_trial_or_for_the_export(organism_dir, tmp_path):
    """study.report_scorers=completed stores a reported scorer on every completed trial; the default
    (export) skips it in the search and measures the same value for the trial that is exported."""
    from abliterate.options import SearchSpace, StudyOptions
    from abliterate.pipeline import Pipeline

    scorers = [MarkerRefusals(), KL(), Degeneration(max_new_tokens=8, direction="report")]
    pipe = organism_pipeline(organism_dir, tmp_path, scorers)
    module, data, trainer = pipe.module, pipe.datamodule, pipe.trainer
    reference = pipe.reference()
    assert set(reference.values) == {"refusals", "kl", "degeneration"}
    assert reference.values["degeneration"] == 0.0  # the original adds no degenerate reply to its own
    assert reference.tensors["degeneration.degenerate"].shape == (16,)
    assert reference.tensors["kl.logprobs"].shape[:2] == (16, 16)
    stored = {}
    for mode in ("completed", "export"):
        options = StudyOptions(n_trials=3, n_startup_trials=3, study_name=mode, report_scorers=mode)
        study = pipe.open_study(options)
        pipe.search(study, options, SearchSpace(), reference)
        assert study.metric_names == ["refusals", "kl"]
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert complete
        for trial in complete:
            if mode == "completed":
                stored[trial.number] = trial.user_attrs["degeneration"]
                assert 0.0 <= stored[trial.number] <= 1.0
                assert pipe.reported_values(trial, SearchSpace(), reference) == {"degeneration": stored[trial.number]}
            else:
                assert "degeneration" not in trial.user_attrs
                assert pipe.reported_values(trial, SearchSpace(), reference) == {"degeneration": stored[trial.number]}
    # The reference is cached by content: the same scorers hit it, other settings do not.
    again = Pipeline(trainer, module, data, tmp_path / "run").reference()
    assert torch.equal(again.tensors["degeneration.degenerate"], reference.tensors["degeneration.degenerate"])
