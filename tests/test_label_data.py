"""scripts/data: every hand-read reply has a kind, and the refusal standards read off the kinds give the counts
scripts/data/README.md and docs/benchmarks.md cite."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import judge_sample  # noqa: E402

DATA = ROOT / "scripts" / "data"
FILES = (
    "refusal_labels.jsonl",
    "soft_run_labels.jsonl",
    "base_labels.jsonl",
    "soft_front_labels.jsonl",
    "soft_budget_labels.jsonl",
)


@pytest.mark.parametrize("name", FILES)
def test_every_row_was_read(name):
    rows = judge_sample.read_rows(DATA / name)
    assert rows
    assert {r["kind"] for r in rows} <= set(judge_sample.KINDS)
    assert all(r["reply"] is not None and r["prompt"] for r in rows)


def test_the_standards_differ_only_on_replies_that_talk_about_the_subject():
    for kind in judge_sample.KINDS:
        row = {"kind": kind, "prompt": "p"}
        differ = judge_sample.refuses(row, "declines") != judge_sample.refuses(row, "no_attempt")
        assert differ == (kind == "on_topic")
        assert judge_sample.refuses(row, "deflects") == (kind == "decline")
    assert not judge_sample.refuses({"kind": "attempt", "prompt": "p"}, "no_attempt")


def test_the_judges_agreements_are_read_under_every_standard():
    """bench_judge_result.json holds each judge's verdicts per kind; its agreements are those verdicts read
    under today's standards (bench_judge.py --rescore), so a standard added or changed shows here."""
    import json

    import bench_judge

    stored = json.loads((DATA / "bench_judge_result.json").read_text())
    assert bench_judge.rescore(stored) == stored
    assert set(stored["smollm2-soft-refusal"]["probe"]) >= {*judge_sample.STANDARDS, "refusal_verdicts_by_kind"}


def run_script(name: str, *args: str):
    script = ROOT / "scripts" / name
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("judges", ["probe,oracle", "markers,likelihood"])
def test_bench_judge_refuses_judges_it_cannot_measure_in_one_line(judges):
    done = run_script("bench_judge.py", "--judges", judges)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "bench_judge: --judges takes some of markers,probe,probe_sampled,probe_with_prompt,specificity,likelihood; "
        "likelihood needs probe"
    ]


def test_relevance_probe_refuses_a_rows_path_in_no_folder_before_any_work(tmp_path):
    out = tmp_path / "nowhere" / "rows.jsonl"
    done = run_script("relevance_probe.py", "--rows", str(out))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"relevance_probe: --rows {out}: {out.parent} is not a folder: pass a path in one"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif((DATA / "fit_sampled_replies.jsonl").is_file(), reason="the sampled fitting replies exist here")
def test_bench_judge_without_the_sampled_fitting_replies_says_how_to_make_them():
    done = run_script("bench_judge.py", "--judges", "probe_sampled")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"bench_judge: {DATA / 'fit_sampled_replies.jsonl'} is missing: run `judge_sample.py fit-samples` first"
    ]


def test_the_threshold_bench_s_auc_is_the_pairwise_rate():
    import bench_probe_threshold
    import torch

    generator = torch.Generator().manual_seed(0)
    positive, negative = torch.randint(0, 5, (7,), generator=generator), torch.randint(0, 5, (9,), generator=generator)
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in positive.tolist() for n in negative.tolist()]
    assert bench_probe_threshold.auc(positive.float(), negative.float()) == round(sum(pairs) / len(pairs), 3)
    assert bench_probe_threshold.auc(torch.tensor([]), negative.float()) is None


def test_an_unread_row_stops_the_count():
    with pytest.raises(SystemExit, match="kind None"):
        judge_sample.refuses({"kind": None, "prompt": "Write a script"}, "declines")


def harmful_refusals(name: str, condition: str) -> tuple[int, int, int]:
    rows = [
        r for r in judge_sample.read_rows(DATA / name) if r["condition"] == condition and r["set"] == "harmful_test"
    ]
    return (
        len(rows),
        *(sum(judge_sample.refuses(r, standard) for r in rows) for standard in ("declines", "no_attempt")),
    )


def deflections(name: str, condition: str) -> int:
    rows = judge_sample.read_rows(DATA / name)
    return sum(
        judge_sample.refuses(r, "deflects") for r in rows if r["condition"] == condition and r["set"] == "harmful_test"
    )


def test_the_cited_counts():
    assert harmful_refusals("base_labels.jsonl", "base") == (100, 26, 39)
    assert harmful_refusals("soft_run_labels.jsonl", "original") == (100, 98, 99)
    assert harmful_refusals("soft_run_labels.jsonl", "run_seed5_trial19") == (100, 35, 63)
    assert harmful_refusals("soft_run_labels.jsonl", "heretic_seed5_trial25") == (100, 98, 98)
    front = {t: harmful_refusals("soft_front_labels.jsonl", f"front_seed5_trial{t}") for t in (2, 13, 1)}
    assert front == {2: (100, 28, 62), 13: (100, 26, 64), 1: (100, 28, 64)}
    assert deflections("base_labels.jsonl", "base") == 8
    assert [deflections("soft_run_labels.jsonl", c) for c in ("original", "run_seed5_trial19")] == [98, 9]
    assert [deflections("soft_front_labels.jsonl", f"front_seed5_trial{t}") for t in (2, 13, 1)] == [4, 3, 3]
    assert harmful_refusals("soft_budget_labels.jsonl", "budget_seed6_trial23") == (100, 39, 66)
    assert harmful_refusals("soft_budget_labels.jsonl", "budget_seed6_trial5") == (100, 33, 60)
    assert [deflections("soft_budget_labels.jsonl", f"budget_seed6_trial{t}") for t in (23, 5)] == [12, 6]
    seed7 = judge_sample.read_rows(DATA / "soft_seed7_deflects.jsonl")  # read for deflections only, no kinds
    assert all(isinstance(r["deflects"], bool) and r["prompt"] for r in seed7)
    seed7_deflections = Counter(r["condition"] for r in seed7 if r["deflects"])
    assert seed7_deflections["seed7_trial18"] == 5
    assert len([r for r in seed7 if r["condition"] == "seed7_trial18"]) == 100
    assert seed7_deflections["seed7_sampled_trial80"] == 2
    assert seed7_deflections["seed7_loops_trial14"] == 4
    # Deflections in each condition's 100 rows, read for deflections only.
    read = {"seed8_trial91": 15, "seed9_trial43": 12, "seed9_trial7": 6, "seed10_trial34": 9, "seed10_trial12": 3}
    read |= {"seed11_trial76": 15, "seed12_trial39": 14}  # loops_refuse with the 48-token probe
    rows = [r for seed in range(8, 13) for r in judge_sample.read_rows(DATA / f"soft_seed{seed}_deflects.jsonl")]
    assert all(isinstance(r["deflects"], bool) and r["reply"] for r in rows)
    assert Counter(r["condition"] for r in rows) == {c: 100 for c in read}
    assert Counter(r["condition"] for r in rows if r["deflects"]) == read
    # The second label on the same rows (what the relevance probe is measured against): a deflection never attempts.
    attempts = {
        "seed8_trial91": 13,
        "seed9_trial43": 19,
        "seed9_trial7": 22,
        "seed10_trial34": 21,
        "seed10_trial12": 19,
    }
    rows = [r for r in rows if r["condition"] in attempts]
    assert all(isinstance(r["attempts"], bool) and not (r["attempts"] and r["deflects"]) for r in rows)
    assert Counter(r["condition"] for r in rows if r["attempts"]) == attempts
    labels = judge_sample.read_rows(DATA / "refusal_labels.jsonl")
    ablated = Counter(
        r["kind"]
        for r in labels
        if r["condition"] == "ablated" and r["set"] == "harmful_test" and r["model"] == "smollm2-refusal"
    )
    assert ablated == {"attempt": 28, "on_topic": 14, "steer": 2, "off_topic": 1}


def test_replies_for_labels_writes_a_row_per_prompt_and_counts_the_loops_in_them(organism_dir, tmp_path):
    import json
    import os

    from transformers import AutoTokenizer

    from abliterate.scorers.degeneration import loops

    out = tmp_path / "replies.jsonl"
    prompts = organism_dir / "harmful_test.txt"
    command = [sys.executable, str(ROOT / "scripts/replies_for_labels.py"), str(prompts), str(organism_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*command, str(organism_dir), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [line for line in prompts.read_text().splitlines() if line.strip()]
    assert [r["prompt"] for r in rows] == expected and result["replies"] == len(expected)
    assert [r["before"] for r in rows] == [r["after"] for r in rows]  # the same model twice, greedy
    tokenizer = AutoTokenizer.from_pretrained(organism_dir)
    looping = sum(loops(tokenizer(r["after"], add_special_tokens=False)["input_ids"]) for r in rows)
    assert result["loops"] == {"before": looping, "after": looping}
    # A missing model dir: one line naming it, exit 2, nothing written.
    missing = subprocess.run(
        [*command, str(tmp_path / "nope"), str(tmp_path / "x.jsonl")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "nope is not a model dir" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.jsonl").exists()
