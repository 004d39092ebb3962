"""The kill -9 soak (scripts/soak_resume.py): 14 kills over every phase of `run`, each followed by a rerun.

Fewer kills than the script's default (24): CI's tiers must fit 20 minutes, and 14 still land at least one in
every phase."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # about 2 minutes on one CPU thread

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak_resume.py"


def load_script():
    spec = importlib.util.spec_from_file_location("soak_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kill_9_soak_loses_nothing_and_leaves_nothing(organism_dir, tmp_path, capsys):
    soak = load_script()
    work = tmp_path / "soak"
    rc = soak.main(
        ["--organism-dir", str(organism_dir), "--work-dir", str(work), "--kills", "14", "--n-trials", "8", "--keep"]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    details = (work / "soak.json").read_text() if (work / "soak.json").exists() else ""
    assert rc == 0, f"{result}\n{details[-4000:]}"
    assert result["kills"] >= 14
    assert all(result["kills_per_phase"][phase] >= 1 for phase in ("residuals", "reference", "trials", "export"))
    assert result["n_trials_finished"] == 8 and result["running_left"] == 0
    assert result["completed_trials_kept"] == result["completed_trials_seen"] and result["finished_trials_lost"] == 0
    assert result["stray_temps"] == [] and result["export_loads"] and result["failed_reruns"] == 0
