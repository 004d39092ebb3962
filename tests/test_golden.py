"""Golden run: a seeded 10-trial search on the tiny organism, recorded before the orchestration refactor.

Trial parameters, values and the exported weights must stay identical. Regenerate only on purpose:
ABLITERATE_RECORD_GOLDEN=1 pytest tests/test_golden.py
"""

import hashlib
import json
import os
from pathlib import Path

import optuna
import torch
from safetensors import safe_open

from abliterate.cli import main

GOLDEN = Path(__file__).parent / "data" / "golden_search.json"


def weight_hashes(model_dir: Path) -> dict[str, str]:
    hashes = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in sorted(f.keys()):
                tensor = f.get_tensor(name).contiguous()
                hashes[name] = hashlib.sha256(tensor.view(-1).view(dtype=torch.uint8).numpy()).hexdigest()
    return hashes


def golden_record(organism_dir: Path, organism_config: Path, out: Path) -> dict:
    args = [
        "run",
        "--model",
        str(organism_dir),
        "--config",
        str(organism_config),
        "--study.n_trials",
        "10",
        "--study.seed",
        "0",
        # the defaults it was recorded with (winsorising and the 0.02 target came later, measured)
        "--space.winsorize",
        "[1.0]",
        "--study.refusal_target",
        "0.05",
    ]
    main([*args, "--output_dir", str(out)])
    study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{out / 'study.db'}")
    trials = [
        {"number": t.number, "state": t.state.name, "params": t.params, "values": t.values}
        for t in study.get_trials(deepcopy=False)
    ]
    return {"trials": trials, "weights": weight_hashes(out / "model")}


def test_golden_search_is_unchanged(organism_dir, organism_config, tmp_path):
    record = golden_record(organism_dir, organism_config, tmp_path / "run")
    if os.environ.get("ABLITERATE_RECORD_GOLDEN"):
        GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert record["trials"] == expected["trials"]
    assert record["weights"] == expected["weights"]
