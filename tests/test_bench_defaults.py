"""scripts/bench_defaults.py: the paired lever table's maths, and one small run on the tiny organism."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from abliterate.options import StudyOptions
from abliterate.pareto import select_trial

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_defaults  # noqa: E402
import bench_quality  # noqa: E402


def cell(variant: str, seed: int, **metrics) -> dict:
    return {"variant": variant, "seed": seed, "metrics": metrics}


def test_seeds_parse_as_ranges_and_lists():
    assert bench_defaults.parse_seeds("101-105") == [101, 102, 103, 104, 105]
    assert bench_defaults.parse_seeds("1,3,7-8") == [1, 3, 7, 8]


def test_summary_pairs_each_variant_with_the_baseline_of_the_same_seed():
    cells = [
        cell("baseline", 1, kl_n_token=0.02, refusal_harmful_test=0.10),
        cell("baseline", 2, kl_n_token=0.04, refusal_harmful_test=0.00),
        cell("baseline", 3, kl_n_token=0.03, refusal_harmful_test=0.05),
        cell("lever", 1, kl_n_token=0.01, refusal_harmful_test=0.10),
        cell("lever", 2, kl_n_token=0.05, refusal_harmful_test=0.02),  # seed 3 missing: paired on 1 and 2
    ]
    summary = bench_defaults.summarize(cells)
    base = summary["baseline"]["metrics"]["kl_n_token"]
    assert base["mean"] == pytest.approx(0.03) and base["std"] == pytest.approx(0.01) and base["n"] == 3
    assert "minus_baseline" not in summary["baseline"]
    diff = summary["lever"]["minus_baseline"]["kl_n_token"]  # -0.01 and +0.01
    assert diff["mean"] == pytest.approx(0.0) and diff["std"] == pytest.approx(0.0141421, rel=1e-4) and diff["n"] == 2
    refusals = summary["lever"]["minus_baseline"]["refusal_harmful_test"]  # 0 and +0.02
    assert refusals["mean"] == pytest.approx(0.01)
    table = bench_defaults.table(summary)
    assert "| lever | 2 |" in table and "| − baseline, paired | 2 |" in table


def bench_arguments(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_quality.add_run_arguments(parser)
    args = parser.parse_args(["--organism", "smollm2-refusal", *argv])
    bench_quality.check_run_arguments(parser, args)
    args.projected, args.norm_preserving = "true", "false"
    return args


def test_equal_refusal_reads_heretics_kl_at_our_refusal_rate_between_its_picks():
    def cell(variant: str, seed: int, refusals: tuple, kl: float) -> dict:
        metrics = dict(zip(bench_defaults.HARMFUL_SETS, refusals, strict=True))
        return {"variant": variant, "seed": seed, "metrics": {**metrics, "kl_n_token": kl}}

    cells = [
        cell("baseline", 1, (0.01, 0.03, 0.02), 0.02),  # mean refusal 0.02
        cell("heretic", 1, (0.0, 0.0, 0.0), 0.03),
        cell("heretic_at_0.05", 1, (0.03, 0.04, 0.05), 0.02),  # mean 0.04
        cell("heretic_at_0.1", 1, (0.03, 0.03, 0.03), 0.035),  # dominated by heretic's cell: not on its front
        cell("baseline", 2, (0.0, 0.0, 0.0), 0.01),  # below every heretic pick: no reading
        cell("heretic", 2, (0.01, 0.01, 0.01), 0.03),
        cell("contrastive_pca", 3, (0.0, 0.0, 0.0), 0.01),  # no baseline or heretic: left out
        cell("baseline", 4, (0.03, 0.03, 0.03), 0.02),
        cell("heretic", 4, (0.01, 0.01, 0.01), 0.019),  # fewer refusals at less KL16
    ]
    result = bench_defaults.equal_refusal(cells)
    assert set(result["seeds"]) == {1, 2, 4}
    one = result["seeds"][1]
    assert one["refusal"] == pytest.approx(0.02) and one["peer_kl_n_token"] == pytest.approx(0.025)
    assert one["ratio"] == pytest.approx(0.02 / 0.025)
    assert result["seeds"][2]["peer_kl_n_token"] is None and result["seeds"][2]["ratio"] is None
    # Seed 1: ours refuses less than heretic's 0.05 pick at the same KL16; its other picks refuse less at more.
    assert one["ours_dominates"] and not one["peer_dominates"]
    assert result["seeds"][4]["peer_dominates"] and not result["seeds"][4]["ours_dominates"]
    # Seed 2: ours refuses less at less KL than heretic's only pick.
    assert result["seeds"][2]["ours_dominates"] and not result["seeds"][2]["peer_dominates"]
    assert result["ratio"]["n"] == 1 and result["ratio"]["mean"] == pytest.approx(0.8)  # seeds 2, 4: unbracketed
    # Any of our variants reads the same way: contrastive_pca's one cell (seed 3) has no heretic pick beside it.
    assert bench_defaults.equal_refusal(cells, "contrastive_pca") == {"seeds": {}, "ratio": None}
    renamed = [{**c, "variant": "no_winsorize"} if c["variant"] == "baseline" else c for c in cells]
    assert bench_defaults.equal_refusal(renamed, "no_winsorize") == result


def test_a_repick_without_its_heretic_cell_says_which_cell_it_needs(tmp_path):
    inputs = SimpleNamespace(model_dir=Path("/models/organism"), tiny=False)
    settings = bench_defaults.cell_settings("heretic_at_0.05", 101, bench_arguments(), inputs)
    peer = bench_defaults.cell_settings(bench_defaults.PEER, 101, bench_arguments(), inputs)
    source = bench_defaults.cell_name(bench_defaults.PEER, 101, peer)
    args = bench_arguments()
    args.kept = ""
    with pytest.raises(RuntimeError, match=f"no finished heretic cell {source} in "):
        bench_defaults.run_repick_cell("heretic_at_0.05", 101, args, tmp_path, inputs, settings)


def test_a_repick_landing_on_an_evaluated_trial_reuses_its_numbers_without_running_heretic(tmp_path, monkeypatch):
    inputs = SimpleNamespace(model_dir=Path("/models/organism"), tiny=False)
    args = bench_arguments()
    args.kept = str(tmp_path / "kept")
    peer = bench_defaults.cell_settings(bench_defaults.PEER, 101, args, inputs)
    source = bench_defaults.cell_name(bench_defaults.PEER, 101, peer)
    front = [[3, 0.0, 0.05], [7, 0.04, 0.03], [9, 0.12, 0.01]]  # heretic's menu: (trial, its count, KL)
    metrics = {"refusal_harmful_test": 0.05, "kl_n_token": 0.02, "seconds_per_trial": 40.0}
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / f"{source}.json").write_text(  # the heretic cell, kept: picked trial 3 at 0.02
        json.dumps(
            {"selected_trial": 3, "pareto_front": front, "metrics": {**metrics, "kl_n_token": 0.04}, "before": {}}
        )
    )
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "heretic_at_0.05-s101-0123456789.json").write_text(
        json.dumps({"change": {"picked_from": source}, "selected_trial": 7, "metrics": metrics, "before": {"x": 1}})
    )
    (tmp_path / "cells" / "heretic_at_0.05-s101-other.json").write_text(  # another search's trial 9
        json.dumps({"change": {"picked_from": "heretic-s101-other"}, "selected_trial": 9, "metrics": {}, "before": {}})
    )
    monkeypatch.setattr(bench_defaults, "repick_heretic", lambda *a: pytest.fail("heretic ran"))
    at = {t: bench_defaults.cell_settings(f"heretic_at_{t}", 101, args, inputs) for t in ("0.01", "0.1")}
    cell = bench_defaults.run_repick_cell("heretic_at_0.1", 101, args, tmp_path, inputs, at["0.1"])
    assert (cell["selected_trial"], cell["same_trial_as"]) == (7, "heretic_at_0.05-s101-0123456789")
    assert cell["metrics"] == {"refusal_harmful_test": 0.05, "kl_n_token": 0.02}  # no s/trial: no trial ran
    cell = bench_defaults.run_repick_cell("heretic_at_0.01", 101, args, tmp_path, inputs, at["0.01"])
    assert (cell["selected_trial"], cell["same_trial_as"], cell["metrics"]["kl_n_token"]) == (3, source, 0.04)
    # trial 9 (at 0.15) was evaluated only from another search: heretic must run, and its run dir is missing
    settings = bench_defaults.cell_settings("heretic_at_0.15", 101, args, inputs)
    with pytest.raises(RuntimeError, match="no finished heretic cell"):
        bench_defaults.run_repick_cell("heretic_at_0.15", 101, args, tmp_path, inputs, settings)
    # a heretic cell kept before cells recorded heretic's front: heretic must run
    (tmp_path / "kept" / f"{source}.json").write_text(json.dumps({"selected_trial": 3, "metrics": metrics}))
    with pytest.raises(RuntimeError, match="no finished heretic cell"):
        bench_defaults.run_repick_cell("heretic_at_0.1", 101, args, tmp_path, inputs, at["0.1"])


def test_repicks_that_pick_the_same_trial_run_in_separate_waves(tmp_path):
    inputs = SimpleNamespace(model_dir=Path("/models/organism"), tiny=False)
    args = bench_arguments()
    peer = bench_defaults.cell_settings(bench_defaults.PEER, 101, args, inputs)
    front = [[3, 0.0, 0.05], [7, 0.04, 0.03], [9, 0.12, 0.01]]
    (tmp_path / f"{bench_defaults.cell_name(bench_defaults.PEER, 101, peer)}.json").write_text(
        json.dumps({"selected_trial": 7, "pareto_front": front})
    )

    def repick(target: str, seed: int = 101) -> tuple:
        variant = f"heretic_at_{target}"
        settings = bench_defaults.cell_settings(variant, seed, args, inputs)
        return variant, seed, bench_defaults.cell_name(variant, seed, settings), settings

    # 0.05 and 0.1 both pick trial 7, 0.01 picks 3 and 0.15 picks 9; seed 102 has no heretic cell to predict from.
    cells = [repick("0.05"), repick("0.1"), repick("0.01"), repick("0.15"), repick("0.05", 102), repick("0.1", 102)]
    waves = bench_defaults.repick_waves(cells, [tmp_path])
    assert [[(v, s) for v, s, *_ in wave] for wave in waves] == [
        [("heretic_at_0.05", 101), ("heretic_at_0.01", 101), ("heretic_at_0.15", 101)]
        + [("heretic_at_0.05", 102), ("heretic_at_0.1", 102)],
        [("heretic_at_0.1", 101)],
    ]


def test_a_cell_is_named_by_everything_it_runs_with(monkeypatch):
    inputs = SimpleNamespace(model_dir=Path("/models/organism"), tiny=False)

    def name(variant: str, seed: int = 101, args: argparse.Namespace | None = None) -> str:
        settings = bench_defaults.cell_settings(variant, seed, args or bench_arguments(), inputs)
        return bench_defaults.cell_name(variant, seed, settings)

    base = name("baseline")
    assert base == name("baseline") and base.startswith("baseline-s101-") and len(base) == len("baseline-s101-") + 10
    levers = [v for v in bench_defaults.VARIANTS if v not in bench_defaults.ABSORBED]
    digests = {name(v)[-10:] for v in levers} | {name("baseline", 102)[-10:]}
    assert len(digests) == len(levers) + 1  # every lever and seed is a settings change
    assert all(name(v)[-10:] == base[-10:] for v in bench_defaults.ABSORBED)  # the defaults now
    # Each lever is in the settings as the run resolves it, beside the tool's other defaults.
    settings = bench_defaults.cell_settings("no_winsorize", 101, bench_arguments(), inputs)
    assert settings["space"]["winsorize"] == [1.0] and settings["space"]["projected"] == [True]
    assert settings["study"]["refusal_target"] == StudyOptions.refusal_target  # the tool's, as the bench's default
    # An option added after cells were kept is left out at the value that runs as before it (so the cells of
    # the target before the margin keep their names), and kept at any other.
    assert settings["study"]["steer_margin"] == StudyOptions.steer_margin != 0.0
    before = bench_defaults.cell_settings("refusal_target_0.02", 101, bench_arguments(), inputs)["study"]
    assert "steer_margin" not in before and before["refusal_target"] == 0.02
    assert (
        bench_defaults.cell_settings("startup_half", 101, bench_arguments(), inputs)["study"]["n_startup_trials"] == 5
    )
    assert settings["module"]["residual_positions"] == 1 and settings["module"]["evaluation"]["max_new_tokens"] == 24
    # Another argument, or another default of the tool, names other cells.
    assert name("baseline", args=bench_arguments("--max-new-tokens", "32")) != base
    from abliterate.module import AbliterationModule

    init = AbliterationModule.__init__
    monkeypatch.setattr(init, "__defaults__", (*init.__defaults__[:-1], 2))  # residual_positions: 1 -> 2
    assert name("baseline") != base
    monkeypatch.undo()
    assert name("baseline") == base
    # heretic's cells depend on the arguments, not on our options.
    monkeypatch.setattr(init, "__defaults__", (*init.__defaults__[:-1], 2))
    peer = bench_defaults.cell_settings(bench_defaults.PEER, 101, bench_arguments(), inputs)
    assert "space" not in peer and peer["trials"] == 30 and peer["model"] == "/models/organism"
    # Our cells' selection target is in their study options; heretic's is the argument.
    assert peer["refusal_target"] == 0.02  # --peer-target's default, not ours
    assert name(bench_defaults.PEER, args=bench_arguments("--peer-target", "0.5")) != name(bench_defaults.PEER)
    assert name(bench_defaults.PEER, args=bench_arguments("--refusal-target", "0.5")) == name(bench_defaults.PEER)
    # A repick is heretic's cell plus the target it picks at.
    repick = bench_defaults.cell_settings("heretic_at_0.05", 101, bench_arguments(), inputs)
    assert repick == {**peer, "repick_target": 0.05}
    assert len({name(bench_defaults.PEER), name("heretic_at_0.05"), name("heretic_at_0.1")}) == 3
    # So is a repick from one of our variants' searches: that cell plus the target.
    monkeypatch.undo()
    ours = bench_defaults.cell_settings("no_winsorize_at_0.0", 101, bench_arguments(), inputs)
    assert ours == {**settings, "repick_target": 0.0}
    assert bench_defaults.repick_of("no_winsorize_at_0.0") == ("no_winsorize", 0.0)
    assert [
        bench_defaults.repick_of(v) for v in ("no_winsorize", "unknown_at_0.1", "baseline_at_2", "baseline_at_x")
    ] == [None] * 4


def test_a_cell_that_ran_the_same_settings_under_another_variant_is_found(tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()
    settings = {"seed": 101, "space": {"winsorize": [0.995]}}
    lever = cells / f"{bench_defaults.cell_name('winsorize_0.995', 101, settings)}.json"
    lever.write_text("{}")
    # The lever's cell is the baseline's once the lever is the default; other settings or seeds are new cells.
    assert bench_defaults.find_cell([cells], "baseline", 101, settings) == lever
    other = bench_defaults.find_cell([cells], "baseline", 101, {**settings, "space": {"winsorize": [1.0]}})
    assert not other.exists() and other.name.startswith("baseline-s101-") and other.parent == cells
    assert not bench_defaults.find_cell([cells], "baseline", 102, {**settings, "seed": 102}).exists()


def test_a_cell_that_ran_while_an_option_was_added_is_found_by_its_recorded_settings(tmp_path):
    """A kept cell that recorded an ADDED_LATER option at its before-value (it ran after the option landed) is the
    cell of today's settings, which leave that option out: found, not run again under a second name."""
    settings = {"seed": 128, "study": {"refusal_target": 0.02}}
    recorded = {"seed": 128, "study": {"refusal_target": 0.02, "max_kl": None}}
    assert bench_defaults.ADDED_LATER[("study", "max_kl")] is None
    old = tmp_path / f"{bench_defaults.cell_name('validation_100_tolerant', 128, recorded)}.json"
    old.write_text(json.dumps({"settings": recorded}))
    assert bench_defaults.find_cell([tmp_path], "validation_100_tolerant", 128, settings) == old
    # At any other value the option is a setting: another cell.
    budget = {"seed": 128, "study": {"refusal_target": 0.02, "max_kl": 0.05}}
    assert not bench_defaults.find_cell([tmp_path], "validation_100_tolerant", 128, budget).exists()


def test_kept_cells_are_found_after_the_run_s_own_and_new_cells_go_to_the_run(tmp_path):
    out, kept = tmp_path / "out", tmp_path / "kept"
    out.mkdir(), kept.mkdir()
    settings = {"seed": 101, "space": {"winsorize": [0.995]}}
    name = f"{bench_defaults.cell_name('baseline', 101, settings)}.json"
    (kept / name).write_text("{}")
    assert bench_defaults.find_cell([out, kept], "baseline", 101, settings) == kept / name
    (out / name).write_text("{}")  # the run's own cell comes first
    assert bench_defaults.find_cell([out, kept], "baseline", 101, settings) == out / name
    # A cell in neither is written to the run's dir, never to the kept one.
    missing = bench_defaults.find_cell([out, kept], "baseline", 102, {**settings, "seed": 102})
    assert missing.parent == out and not missing.exists()


@pytest.mark.slow
def test_a_small_run_applies_each_lever_writes_every_cell_and_resumes(organism_dir, tmp_path):
    out = tmp_path / "bench"
    command = [
        sys.executable,
        str(ROOT / "scripts/bench_defaults.py"),
        "--organism",
        "tiny",
        "--model",
        str(organism_dir),
        "--trials",
        "3",
        "--eval-limit",
        "8",
        "--seeds",
        "1-2",
        "--variants",
        "baseline,not_projected,no_steer_to_target,baseline_at_1.0",
        "--jobs",
        "2",
        "--out",
        str(out),
        "--kept",
        "",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cells = {}
    for path in (out / "cells").glob("*.json"):
        cell = json.loads(path.read_text())
        assert path.stem == bench_defaults.cell_name(cell["variant"], cell["seed"], cell["settings"])
        cells[cell["variant"], cell["seed"]] = cell
    variants = ("baseline", "not_projected", "no_steer_to_target", "baseline_at_1.0")
    assert set(cells) == {(v, s) for v in variants for s in (1, 2)}
    # The summary is the cells' own numbers.
    for variant in ("baseline", "not_projected"):
        values = [cells[variant, s]["metrics"]["kl_n_token"] for s in (1, 2)]
        assert result["summary"][variant]["metrics"]["kl_n_token"]["mean"] == pytest.approx(sum(values) / 2, abs=1e-5)

    def run_dir(variant: str, seed: int = 1) -> Path:
        return out / "runs" / bench_defaults.cell_name(variant, seed, cells[variant, seed]["settings"]) / "ours"

    # Each lever reached the search: the studies' stored choices differ exactly where the variant says.
    def trials(variant: str, seed: int = 1) -> list:
        storage = f"sqlite:///{run_dir(variant, seed) / 'study.db'}"
        return optuna.load_study(study_name="abliterate", storage=storage).trials

    # The repick is the baseline search's pick by the tool's rule at target 1 (the lowest KL): the baseline cell's
    # numbers where that is the baseline's own pick, else an evaluation of its own, whose export is gone.
    for seed in (1, 2):
        repick, baseline = cells["baseline_at_1.0", seed], cells["baseline", seed]
        assert repick["selected_trial"] == select_trial(trials("baseline", seed), "min_kl_under", 1.0).number
        if repick["selected_trial"] == baseline["selected_trial"]:
            assert repick["same_trial_as"] == run_dir("baseline", seed).parent.name
            assert repick["metrics"] == {k: v for k, v in baseline["metrics"].items() if k != "seconds_per_trial"}
        else:
            assert repick["eval_s"] > 0 and "same_trial_as" not in repick
        name = bench_defaults.cell_name("baseline_at_1.0", seed, repick["settings"])
        assert not (out / "runs" / name).exists() and not (run_dir("baseline", seed) / "cache").exists()

    assert {t.params["projected"] for t in trials("baseline")} == {True}
    assert {t.params["projected"] for t in trials("not_projected")} == {False}
    assert all("constraints:refusal_rate_over_target" in t.system_attrs for t in trials("baseline"))
    assert not any("constraints:refusal_rate_over_target" in t.system_attrs for t in trials("no_steer_to_target"))
    assert not (run_dir("baseline") / "model").exists()  # evaluated, then removed
    # A second run finds every cell and runs none.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "0 cells to run, 8 already done (0 of them kept" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == before
    # --report elsewhere, with these cells kept and a seed that has none yet: it runs nothing, summarises the kept
    # cells, and writes no cell anywhere.
    report_out = tmp_path / "report"
    report_command = [*command[:-3], str(report_out), "--kept", str(out / "cells"), "--report"]
    report_command[report_command.index("--seeds") + 1] = "1-3"
    report = subprocess.run(report_command, capture_output=True, text=True, env=env, timeout=600)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "0 cells to run, 8 already done (8 of them kept" in report.stderr, report.stderr[-2000:]
    report_summary = json.loads(report.stdout.strip().splitlines()[-1])["summary"]
    assert report_summary == result["summary"]
    assert not list((report_out / "cells").glob("*")) and {p.name for p in (out / "cells").glob("*")} == set(before)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigterm_stops_the_running_cells_and_writes_none(organism_dir, tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, str(ROOT / "scripts/bench_defaults.py"), "--organism", "tiny", "--model"]
    command += [str(organism_dir), "--trials", "2000", "--seeds", "1-2", "--variants", "baseline", "--jobs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        bench = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.PIPE, stderr=stderr, env=env)
        deadline = time.monotonic() + 300
        while "abliterate.study: trial" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        children = [int(pid) for pid in subprocess.check_output(["ps", "-o", "pid=", "--ppid", str(bench.pid)]).split()]
        assert len(children) >= 2, log.read_text()[-2000:]  # both cells (and multiprocessing's resource tracker)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
    time.sleep(1)
    assert not [pid for pid in children if alive(pid)]  # no cell left running on its own
    assert not list((out / "cells").glob("*"))  # and none written half-way


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--variants", "baseline,heretic"], "--variants heretic: give its executable with --heretic BIN"),
        (["--heretic", "/nonexistent/heretic"], "--heretic /nonexistent/heretic: not an executable file"),
        (["--variants", "heretic_at_0.05"], "--variants heretic_at_0.05: give its executable with --heretic BIN"),
        (["--heretic", sys.executable, "--variants", "heretic_at_high"], "unknown heretic_at_high; choose from"),
        (["--kept", "/nonexistent/cells"], "--kept /nonexistent/cells: not a folder"),
    ],
)
def test_the_heretic_variant_needs_an_executable_and_says_so(tmp_path, extra, says):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_defaults.py"), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and [says in line for line in done.stderr.splitlines()] == [True], done.stderr
    assert not out.exists()  # refused before anything was written
