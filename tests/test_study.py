"""Study storage under stress: kill -9 and resume, and two workers sharing one study."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from helpers import interruptible
from optuna.trial import TrialState

pytestmark = pytest.mark.process  # starts, kills and interrupts CLI runs


def cli(organism_config, organism_dir, out, *extra):
    return [
        sys.executable,
        "-m",
        "abliterate",
        "run",
        "--config",
        str(organism_config),
        "--model",
        str(organism_dir),
        "--output_dir",
        str(out),
        *extra,
    ]


def load(out):
    return optuna.load_study(study_name="abliterate", storage=f"sqlite:///{out / 'study.db'}")


def count(study, *states):
    return sum(t.state in states for t in study.get_trials(deepcopy=False))


def wait_for_complete_trials(out, n, proc, timeout=300):
    """Poll the SQLite file read-only (cheap, no schema checks) until n trials are COMPLETE."""
    import sqlite3

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the search exited early"
        if (out / "study.db").exists():
            try:
                with sqlite3.connect(f"file:{out / 'study.db'}?mode=ro", uri=True, timeout=5) as db:
                    if db.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0] >= n:
                        return
            except sqlite3.Error:  # the schema is still being created
                pass
        time.sleep(0.5)
    pytest.fail(f"the search did not complete {n} trials in {timeout}s")


def test_kill_9_then_resume(organism_config, organism_dir, tmp_path):
    out = tmp_path / "run"
    args = cli(organism_config, organism_dir, out, "--study.n_trials", "20", "--study.prune", "false")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_complete_trials(out, 3, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    study = load(out)
    kept = {t.number: (t.params, t.values) for t in study.trials if t.state == TrialState.COMPLETE}
    assert 3 <= len(kept) < 20, "killed mid-search"
    assert not (out / "model").exists()
    caches = {p.name: p.read_bytes() for p in (out / "cache").iterdir()}  # (loading touches mtime: LRU)
    assert sorted(name.split("-")[0] for name in caches) == ["reference", "residuals"]

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    study = load(out)
    assert count(study, TrialState.COMPLETE, TrialState.PRUNED) == 20
    assert count(study, TrialState.RUNNING) == 0
    for number, (params, values) in kept.items():
        assert (study.trials[number].params, study.trials[number].values) == (params, values)
    # the caches were loaded, not recomputed
    assert "reusing cached residuals" in rerun.stderr and "reusing cached reference" in rerun.stderr
    assert {p.name: p.read_bytes() for p in (out / "cache").iterdir()} == caches
    assert (out / "model" / "config.json").is_file()


def test_two_workers_share_one_study(organism_config, organism_dir, tmp_path):
    out = tmp_path / "run"
    args = cli(organism_config, organism_dir, out, "--study.n_trials", "10", "--study.workers", "2")
    coordinator = subprocess.Popen(
        args, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _, stderr = coordinator.communicate(timeout=600)
    assert coordinator.returncode == 0, stderr[-3000:]
    study = load(out)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 10
    assert len({t.number for t in finished}) == 10
    # Trials here take 0.1s, so which worker runs them is down to start-up times (test_search checks
    # that two workers split a study); what holds always: workers ran them, and both joined the study.
    assert coordinator.pid not in {t.user_attrs["worker_pid"] for t in finished}
    for log in ("worker-0.log", "worker-1.log"):
        text = (out / log).read_text()
        assert "reusing cached residuals" in text and ("running trials" in text or "nothing to run" in text)
    assert (out / "model" / "config.json").is_file() and (out / "trials.csv").is_file()


def test_ctrl_c_marks_the_running_trial_and_says_how_to_resume(organism_config, organism_dir, tmp_path):
    out = tmp_path / "run"
    args = cli(organism_config, organism_dir, out, "--study.n_trials", "200", "--study.prune", "false")
    proc = subprocess.Popen(
        args,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    wait_for_complete_trials(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Rerun the same command to resume" in stderr
    study = load(out)
    assert count(study, TrialState.RUNNING) == 0
    assert count(study, TrialState.COMPLETE) >= 2
    assert not (out / "model").exists()
