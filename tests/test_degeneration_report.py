"""Degeneration, reported on every trial by default: its draft-checked replies are the greedy ones,
and its value reaches the trial, trials.csv and the run summary without changing the search."""

import csv
import json

import torch
import yaml
from organism_helpers import chat_batch

from abliterate.cli import main
from abliterate.metrics import greedy_reply_tokens
from abliterate.models import load_model, load_tokenizer
from abliterate.module import AbliterationModule
from abliterate.scorers import KL, Degeneration, MarkerRefusals
from abliterate.scorers.degeneration import verified_replies


def harmless_prompts(organism_dir, n: int = 16) -> list[str]:
    return (organism_dir / "harmless_test.txt").read_text().splitlines()[:n]


def test_checked_replies_are_the_greedy_replies(organism_dir):
    model, tokenizer = load_model(str(organism_dir), dtypes=["float32"]), load_tokenizer(str(organism_dir))
    batch = chat_batch(tokenizer, harmless_prompts(organism_dir))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for limit in (3, 13, 24):  # replies cut at the limit, some cut and some ended (12 to 14 tokens), all ended
        original = greedy_reply_tokens(model, tokenizer, ids, mask, limit)
        assert {len(r) == limit for r in original} == {3: {True}, 13: {True, False}, 24: {False}}[limit]
        # the original's own replies, and guesses that are wrong from the start, halfway, or too long
        drafts = [
            original,
            [[] for _ in original],
            [r[: len(r) // 2] + [5] * 4 for r in original],
            [r + [7] * 3 for r in original],
        ]
        for guess in drafts:
            assert verified_replies(model, tokenizer, ids, mask, guess, limit) == original
    with torch.no_grad():  # a changed model: its replies leave the original's, and are still its greedy ones
        weight = model.get_output_embeddings().weight
        weight.add_(0.5 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    changed = greedy_reply_tokens(model, tokenizer, ids, mask, 24)
    assert changed != original
    assert verified_replies(model, tokenizer, ids, mask, original, 24) == changed


def test_the_default_scorers_report_degeneration():
    scorers = list(AbliterationModule().scorers)
    assert [(type(s), s.direction) for s in scorers] == [
        (MarkerRefusals, "minimize"),
        (KL, "minimize"),
        (Degeneration, "report"),
    ]


def test_every_completed_trial_reports_degeneration(organism_config, organism_dir, tmp_path, capsys):
    run = tmp_path / "run"
    main(
        ["run", "--config", str(organism_config), "--model", str(organism_dir), "--output_dir", str(run)]
        + ["--study.n_trials", "4"]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= summary["degeneration_after"] <= 1.0
    rows = list(csv.DictReader((run / "trials.csv").open()))
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert complete and all(0.0 <= float(r["user_attrs_degeneration"]) <= 1.0 for r in complete)
    assert "values_degeneration" not in rows[0]  # reported, not an objective
    assert "scorers" not in yaml.safe_load((run / "config.yaml").read_text())["module"]  # the defaults
    card = json.loads((run / "model" / "abliterate.json").read_text())
    assert card["after"]["degeneration"] == round(summary["degeneration_after"], 5)
