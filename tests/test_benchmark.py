"""`abliterate benchmark`: lm-eval tasks on the original and the abliterated model, side by side.

The packaged task asks the capability probe's questions in the probe's format, so lm-eval's `acc` on
it must equal `scorers.Capability`'s accuracy on the same model: checked on the tiny organism and on a
perturbed copy of it whose accuracy differs (a swapped or reused model would fail). Nothing here
reaches the hub: the push goes to test_hub's stand-in.
"""

import json
import sys

import pytest
import torch
from helpers import copy_run
from test_hub import hub  # noqa: F401 (the stand-in hub fixture)
from test_reproduce import TRAINER

from abliterate.benchmark import PACKAGED_TASK, BenchmarkOptions, run_tasks, with_benchmarks
from abliterate.cli import main
from abliterate.models import load_model, load_tokenizer
from abliterate.scorers.capability import answer_questions, load_questions

pytest.importorskip("lm_eval")


def probe_accuracy(model_dir) -> float:
    """The built-in capability probe's accuracy (scorers/capability.py) on the packaged questions."""
    model, tokenizer = load_model(str(model_dir), dtypes=["float32"]), load_tokenizer(str(model_dir))
    questions, _ = load_questions()
    picks = answer_questions(model, tokenizer, questions, source="everyday")
    return sum(p == q.answer for p, q in zip(picks, questions, strict=True)) / len(questions)


@pytest.fixture(scope="module")
def perturbed_dir(organism_dir, tmp_path_factory):
    """The organism with seeded noise on its output embedding: a model whose probe accuracy differs."""
    model, tokenizer = load_model(str(organism_dir), dtypes=["float32"]), load_tokenizer(str(organism_dir))
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        weight.add_(weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    target = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def run_dir(finished_organism_run, tmp_path_factory):
    run, config, card = copy_run(finished_organism_run, tmp_path_factory.mktemp("benchmark"))
    return run, config, card["trial"]


def table_and_json(out: str) -> tuple[list[str], dict]:
    lines = out.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])


def test_packaged_task_accuracy_is_the_capability_probes(organism_dir):
    model, tokenizer = load_model(str(organism_dir), dtypes=["float32"]), load_tokenizer(str(organism_dir))
    result = run_tasks(model, tokenizer, BenchmarkOptions())
    assert result == {PACKAGED_TASK: {"acc": probe_accuracy(organism_dir)}}


def test_compare_prints_both_models_side_by_side(organism_dir, perturbed_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./outputs/config.yaml to read
    original, perturbed = probe_accuracy(organism_dir), probe_accuracy(perturbed_dir)
    assert original != perturbed  # else the check below could not tell the models apart
    main(["benchmark", "--model", str(organism_dir), "--compare", str(perturbed_dir), *TRAINER])
    out, err = capsys.readouterr()
    table, record = table_and_json(out)
    assert table == [
        "| task | metric | original | abliterated | delta |",
        "|---|---|---:|---:|---:|",
        f"| {PACKAGED_TASK} | acc | {original:.4f} | {perturbed:.4f} | {perturbed - original:+.4f} |",
    ]
    (row,) = record["rows"]
    assert row == {
        "task": PACKAGED_TASK,
        "metric": "acc",
        "original": original,
        "abliterated": perturbed,
        "delta": perturbed - original,
    }
    assert "benchmark: original model" in err and "benchmark: abliterated model" in err  # progress on stderr
    assert not (perturbed_dir / "README.md").exists()  # not an export of this tool: no card to write


def test_run_dir_export_card_gets_one_benchmarks_section_and_the_push_sends_it(run_dir, hub, capsys):  # noqa: F811
    run, config, trial = run_dir
    export = run / "model"
    args = ["benchmark", "--output_dir", str(run), "--config", str(config), *TRAINER]
    for _ in range(2):  # a rerun replaces the section
        main(args)
    out, _ = capsys.readouterr()
    _, record = table_and_json(out)
    (row,) = record["rows"]
    assert row["original"] == probe_accuracy(record["original"]) and row["abliterated"] == probe_accuracy(export)
    card = (export / "README.md").read_text()
    assert card.count("## Benchmarks") == 1 and card.index("## Benchmarks") > card.index("## Parameters")
    assert f"| {PACKAGED_TASK} | acc | {row['original']:.4f} | {row['abliterated']:.4f} |" in card
    assert json.loads((export / "abliterate.json").read_text())["benchmarks"]["rows"] == record["rows"]

    # export the same trial again and push it: the card the upload sends keeps the section
    push = ["export", "--output_dir", str(run), "--config", str(config), "--trial", str(trial), *TRAINER]
    main([*push, "--hub.push_to", "tester/benchmarked"])
    pushed = hub.repos["tester/benchmarked"]["README.md"].decode()
    assert pushed == (export / "README.md").read_text() and pushed.count("## Benchmarks") == 1
    assert f"| {PACKAGED_TASK} | acc | {row['original']:.4f} | {row['abliterated']:.4f} |" in pushed


def test_the_section_is_replaced_where_it_stands_or_added_at_the_end():
    record = {
        "lm_eval": "0.4.13",
        "rows": [{"task": "t", "metric": "acc", "original": 0.5, "abliterated": 0.25, "delta": -0.25}],
    }
    card = "# m\n\n## Parameters\n\nx\n"
    once = with_benchmarks(card, record)
    assert (
        once.startswith(card) and once.count("## Benchmarks") == 1 and "| t | acc | 0.5000 | 0.2500 | -0.2500 |" in once
    )
    newer = {**record, "rows": [{**record["rows"][0], "abliterated": 0.75, "delta": 0.25}]}
    twice = with_benchmarks(once + "\n## Later\n\ny\n", newer)
    assert twice.count("## Benchmarks") == 1 and "0.2500 | -0.2500" not in twice and "| 0.7500 | +0.2500 |" in twice
    assert "## Later\n\ny" in twice


def test_without_lm_eval_one_line_names_the_extra(run_dir, capsys, monkeypatch):
    import abliterate.models

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    monkeypatch.setattr(abliterate.models, "load_model", lambda *a, **k: 1 / 0)  # nothing may load
    run, config, _ = run_dir
    with pytest.raises(SystemExit) as exit_:
        main(["benchmark", "--output_dir", str(run), "--config", str(config), *TRAINER])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install 'abliterate[benchmark]'" in errors[0], err


def test_an_adapter_only_export_is_refused_with_the_fix(tmp_path, organism_dir, capsys):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        main(["benchmark", "--model", str(organism_dir), "--compare", str(tmp_path), *TRAINER])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 2 and len(errors) == 1 and "--export_format both" in errors[0], err
