"""DDP on 2 CPU processes (gloo) gives the single-process results: residuals, directions, metrics, pruning."""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("ddp_equivalence.py")


def run(organism_dir, out, devices):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(organism_dir), str(out), str(devices)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / f"result{devices}.json").read_text()), load_file(
        str(out / f"tensors{devices}.safetensors")
    )


@pytest.mark.ddp
def test_ddp_matches_single_process(organism_dir, tmp_path):
    single, single_t = run(organism_dir, tmp_path, 1)
    ddp, ddp_t = run(organism_dir, tmp_path, 2)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    for name in ("harmful", "harmless"):
        assert ddp_t[name].shape == single_t[name].shape  # every prompt counted once
        torch.testing.assert_close(ddp_t[name], single_t[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ddp_t["directions"], single_t["directions"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ddp_t["pca"], single_t["pca"], atol=1e-4, rtol=1e-4)
    assert ddp["baseline"] == single["baseline"]
    assert ddp["result"]["refusals"] == single["result"]["refusals"]
    assert ddp["result"]["kl"] == pytest.approx(single["result"]["kl"], rel=1e-5, abs=1e-7)
    assert single["pruned"] and ddp["pruned"]
    # pruned on the bound: refusals so far >= 3 of 57, at the final KL
    assert ddp["attrs"]["bound"][0] * 57 >= 3 and single["attrs"]["bound"][0] * 57 >= 3
    # the same seeded search: same trials, same outcomes, no duplicates
    assert len(ddp["trials"]) == len(single["trials"]) == 4
    for (n1, s1, p1, v1), (n2, s2, p2, v2) in zip(single["trials"], ddp["trials"], strict=True):
        assert (n1, s1, p1) == (n2, s2, p2)
        if v1 is not None:
            assert v2[0] == v1[0] and v2[1] == pytest.approx(v1[1], rel=1e-5, abs=1e-7)


def test_a_trial_running_on_rank_0_is_not_failed_by_another_rank():
    """Under DDP rank 1 may open the study after rank 0 started its first trial: only rank 0 (which
    holds the run dir) may take a RUNNING trial for one a dead process left."""
    from types import SimpleNamespace

    from optuna.trial import TrialState

    from abliterate.options import StudyOptions
    from abliterate.verbs import fail_interrupted_trials

    study = optuna.create_study(directions=["minimize", "minimize"])
    running = study.ask()
    fail_interrupted_trials(SimpleNamespace(is_global_zero=False), study, StudyOptions())
    assert study.trials[running.number].state == TrialState.RUNNING
    fail_interrupted_trials(SimpleNamespace(is_global_zero=True), study, StudyOptions())
    assert study.trials[running.number].state == TrialState.FAIL


@pytest.mark.ddp
def test_the_cli_runs_under_ddp_and_says_each_step_once(organism_dir, organism_config, tmp_path):
    out = tmp_path / "run"
    preset = Path(__file__).parents[1] / "configs" / "trainer" / "ddp_cpu.yaml"
    argv = ["run", "--model", str(organism_dir), "--config", str(organism_config), "--config", str(preset)]
    argv += ["--study.n_trials", "3", "--output_dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "abliterate", *argv], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr  # two processes ran
    for step in ("collected residuals", "reference (original model)", "selected trial", "exported to"):
        assert result.stderr.count(step) == 1, step
    trials = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{out / 'study.db'}").trials
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert (out / "model" / "config.json").is_file()
