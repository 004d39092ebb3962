"""Degeneration, reported by default for the exported trial: its value reaches the run summary and the
card without changing the search (`study.report_scorers: completed` adds it to every completed trial)."""

import csv
import json

import yaml

from abliterate.cli import main
from abliterate.module import AbliterationModule
from abliterate.scorers import KL, Degeneration, MarkerRefusals


def harmless_prompts(organism_dir, n: int = 16) -> list[str]:
    return (organism_dir / "harmless_test.txt").read_text().splitlines()[:n]


def test_the_default_scorers_report_degeneration():
    scorers = list(AbliterationModule().scorers)
    assert [(type(s), s.direction) for s in scorers] == [
        (MarkerRefusals, "minimize"),
        (KL, "minimize"),
        (Degeneration, "report"),
    ]


def test_the_export_reports_degeneration(organism_config, organism_dir, tmp_path, capsys):
    run = tmp_path / "run"
    main(
        ["run", "--config", str(organism_config), "--model", str(organism_dir), "--output_dir", str(run)]
        + ["--study.n_trials", "4"]
    )
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    harmless = len((organism_dir / "harmless_test.txt").read_text().splitlines())
    assert f"degenerate replies (degeneration) on {harmless} harmless prompts: 0.0000 before" in out
    assert 0.0 <= summary["degeneration_after"] <= 1.0
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert any(r["state"] == "COMPLETE" for r in rows)
    assert "values_degeneration" not in rows[0] and "user_attrs_degeneration" not in rows[0]  # not in the search
    assert "scorers" not in yaml.safe_load((run / "config.yaml").read_text())["module"]  # the defaults
    card = json.loads((run / "model" / "abliterate.json").read_text())
    assert card["after"]["degeneration"] == round(summary["degeneration_after"], 5)
    assert card["before"]["degeneration"] == 0.0
