"""The pick re-scored on held-out harmful prompts (data.validation_harmful, validation.py), and the pick within a KL
budget (study.max_kl)."""

import json
import logging
import re

import optuna
import pytest
from helpers import copy_run
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from abliterate.cli import main
from abliterate.errors import AbliterateError
from abliterate.options import StudyOptions
from abliterate.scorers import MarkerRefusals
from abliterate.validation import candidates, pooled_rate, scoring, validated_pick

TRAINER = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]


def trial(number: int, refusals: float, kl: float, state=TrialState.COMPLETE):
    made = create_trial(
        state=state,
        values=[refusals, kl] if state == TrialState.COMPLETE else None,
        params={"x": float(number)},
        distributions={"x": FloatDistribution(0, 100)},
    )
    made.number = number
    return made


TRIALS = [
    trial(0, 0.00, 0.030),
    trial(1, 0.00, 0.010),  # the lowest KL at 0: what min_kl_under alone exports
    trial(2, 0.01, 0.005),
    trial(3, 0.00, 0.020),  # dominated by trial 1, still a candidate
    trial(4, 0.50, 0.001),
    trial(5, 0.00, 0.0, state=TrialState.PRUNED),
]


def numbers(found: tuple[float, list]) -> tuple[float, list[int]]:
    return found[0], [t.number for t in found[1]]


def test_candidates_are_every_completed_trial_under_the_target_lowest_kl_first():
    assert numbers(candidates(TRIALS, 0.0, 0.02)) == (0.0, [1, 3, 0])
    assert numbers(candidates(TRIALS, 0.01, 0.03)) == (0.01, [2, 1, 3, 0])
    # None at the target: those under the steering bound (its limit then); none there either: no candidates.
    assert numbers(candidates([TRIALS[2], TRIALS[4]], 0.0, 0.02)) == (0.02, [2])
    assert numbers(candidates([TRIALS[4]], 0.0, 0.02)) == (0.0, [])
    # A maximised second objective (sign -1): the highest first.
    assert numbers(candidates(TRIALS, 0.0, 0.02, sign=-1)) == (0.0, [0, 3, 1])


def test_pooled_rate_counts_refusals_over_both_sets():
    assert pooled_rate(0.0, 100, 0.03, 100) == 0.015
    assert pooled_rate(0.01, 100, 0.0, 50) == 1 / 150
    assert pooled_rate(0.07, 100, 0.0, 100) == 0.035  # 0.07 * 100 is 7.000000000000001: counted as 7


def test_validated_pick_takes_the_first_candidate_that_holds_on_the_validation_prompts():
    _, pool = candidates(TRIALS, 0.0, 0.02)
    rates = {1: 0.04, 3: 0.0, 0: 0.0}
    scored = []

    def rate(t):
        scored.append(t.number)
        return rates[t.number]

    chosen, checked = validated_pick(pool, 4, 0.0, 100, 100, rate)
    assert chosen.number == 3
    assert scored == [1, 3]  # stops at the first that holds: trial 0 is never re-scored
    assert [(c.trial.number, c.validation, c.pooled) for c in checked] == [(1, 0.04, 0.02), (3, 0.0, 0.0)]


def test_validated_pick_admits_the_tolerance_and_no_more():
    _, pool = candidates(TRIALS, 0.0, 0.02)
    rates = {1: 0.02, 3: 0.01, 0: 0.0}
    # Allowed 0.01 (target 0, the default tolerance): trial 1 refuses two in 100 and is passed over.
    assert validated_pick(pool, 4, 0.0 + 0.01, 100, 100, lambda t: rates[t.number])[0].number == 3
    # Allowed 0.02: 0.01 + 0.01 in floating point is 0.02 exactly or not; two in 100 must pass either way.
    assert validated_pick(pool, 4, 0.01 + 0.01, 100, 100, lambda t: rates[t.number])[0].number == 1
    assert validated_pick(pool, 4, 0.0, 100, 100, lambda t: rates[t.number])[0].number == 0


def test_validated_pick_without_a_candidate_that_holds_takes_the_lowest_pooled_rate():
    _, pool = candidates(TRIALS, 0.0, 0.02)
    rates = {1: 0.03, 3: 0.01, 0: 0.01}
    chosen, checked = validated_pick(pool, 4, 0.0, 100, 100, lambda t: rates[t.number])
    assert chosen.number == 3  # tied with trial 0 at 0.005 pooled: the lower KL
    assert len(checked) == 3
    # The limit caps the re-scoring: with 1, the first candidate is the pick whatever it refuses.
    chosen, checked = validated_pick(pool, 1, 0.0, 100, 100, lambda t: rates[t.number])
    assert chosen.number == 1 and len(checked) == 1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("validation_candidates", 0, "study.validation_candidates must be >= 1"),
        ("validation_tolerance", -0.01, "study.validation_tolerance must be a fraction in [0, 1]"),
        ("validation_tolerance", 1.5, "study.validation_tolerance must be a fraction in [0, 1]"),
    ],
)
def test_validation_options_out_of_range_stop_with_one_line(field, value, message):
    with pytest.raises(AbliterateError, match=re.escape(message)):
        StudyOptions(**{field: value})


def test_scoring_switches_the_role_and_restores_the_class_default():
    scorer = MarkerRefusals()
    with scoring(scorer, "validation_harmful"):
        assert scorer.role == "validation_harmful"
    assert scorer.role == "eval_harmful" and "role" not in vars(scorer)
    with pytest.raises(RuntimeError), scoring(scorer, "validation_harmful"):
        raise RuntimeError
    assert scorer.role == "eval_harmful"


def test_export_rescores_the_pick_on_validation_prompts_and_reuses_the_scores(
    organism_dir, finished_organism_run, tmp_path, caplog
):
    """The validation rate in the card is the exported model's refusal rate on those prompts; a second
    export re-scores nothing (the rates are cached in the run dir)."""
    from organism_helpers import measure_refusals
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, config, _ = copy_run(finished_organism_run, tmp_path / "copy")
    prompts = (organism_dir / "harmful_train.txt").read_text().splitlines()[:32]
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(prompts) + "\n")
    study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{run / 'study.db'}")
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    lowest_kl = min(completed, key=lambda t: (t.values[1], t.number))
    target = 1.0  # every trial is a candidate, and the first re-scored (the lowest KL) holds

    def export(name: str) -> dict:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="abliterate.validation"):
            main(
                ["export", "--output_dir", str(run), "--config", str(config), "--export_dir", str(tmp_path / name)]
                + ["--data.validation_harmful", json.dumps({"dataset": str(held_out)})]
                + ["--study.refusal_target", str(target), *TRAINER]
            )
        return json.loads((tmp_path / name / "abliterate.json").read_text())

    card = export("first")
    assert card["trial"] == lowest_kl.number
    assert "32 of the 32 data.validation_harmful prompts are also in data.harmful" in caplog.text
    assert "validation: 32 prompts" in caplog.text and f"trial {lowest_kl.number} refuses" in caplog.text
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "first").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "first")
    assert card["validation_refusal"] == pytest.approx(measure_refusals(model, tokenizer, prompts), abs=1 / 32)
    assert list((run / "cache").glob("validation-*.safetensors"))

    again = export("second")
    assert again["trial"] == card["trial"] and again["validation_refusal"] == card["validation_refusal"]
    assert "refuses" not in caplog.text  # read back, not generated again


def test_inspect_stars_the_validated_trial_that_export_takes(
    organism_dir, finished_organism_run, tmp_path, caplog, monkeypatch
):
    """inspect's pareto.png marks the trial export takes, validation included, from the rates export cached."""
    import abliterate.verbs_inspect as verbs_inspect

    run, config, _ = copy_run(finished_organism_run, tmp_path / "copy")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join((organism_dir / "harmful_train.txt").read_text().splitlines()[:32]) + "\n")
    options = ["--output_dir", str(run), "--config", str(config), "--study.refusal_target", "1.0"]
    options += ["--data.validation_harmful", json.dumps({"dataset": str(held_out)}), *TRAINER]
    main(["export", *options, "--export_dir", str(tmp_path / "model")])
    exported = json.loads((tmp_path / "model" / "abliterate.json").read_text())["trial"]

    starred = []
    plot = verbs_inspect.plot_pareto
    monkeypatch.setattr(verbs_inspect, "plot_pareto", lambda *a, **k: starred.append(a[2]) or plot(*a, **k))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="abliterate.validation"):
        main(["inspect", *options])
    assert [t.number for t in starred] == [exported]
    assert f"validation picks trial {exported}" in caplog.text
    assert "refuses" not in caplog.text  # the rates export cached, not generated again
    assert (run / "inspect" / "pareto.png").is_file()


def test_export_under_a_kl_budget_takes_a_trial_within_it(finished_organism_run, tmp_path, caplog):
    """A budget under the default pick's KL: the export is the least-refusing trial within it, and says so."""
    run, config, card = copy_run(finished_organism_run, tmp_path / "copy")
    study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{run / 'study.db'}")
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    budget = (card["kl"] + min(t.values[1] for t in completed)) / 2
    within = [t for t in completed if t.values[1] <= budget]
    assert within and card["kl"] > budget, "the fixture's trials no longer straddle a budget"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(
            ["export", "--output_dir", str(run), "--config", str(config), "--export_dir", str(tmp_path / "model")]
            + ["--study.max_kl", str(budget), *TRAINER]
        )
    exported = json.loads((tmp_path / "model" / "abliterate.json").read_text())
    assert exported["trial"] == min(within, key=lambda t: (t.values[0], t.values[1])).number
    assert exported["kl"] <= budget < card["kl"]
    assert f"the pick is made among {len(within)} of {len(completed)} completed trials" in caplog.text
