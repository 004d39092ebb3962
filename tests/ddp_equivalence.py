"""Run by tests/test_ddp.py as `python tests/ddp_equivalence.py ORGANISM OUT DEVICES`.

Collects residuals, evaluates one plan, and evaluates it again under a pruning callback, on
`DEVICES` CPU processes (DDP over gloo when > 1); rank 0 writes what it saw to OUT.
"""

import json
import os
import sys
from pathlib import Path

import optuna
import torch
from safetensors.torch import save_file

from abliterate.ablation import AblationParams, ComponentKernel
from abliterate.callbacks import Pruning
from abliterate.data import PromptDataModule
from abliterate.module import AbliterationModule
from abliterate.options import DirectionOptions, EvalOptions, LoadOptions, SearchSpace, StudyOptions
from abliterate.pipeline import Pipeline
from abliterate.plans import TrialPlan
from abliterate.prompts import PromptSource
from abliterate.trainer import AbliterationTrainer


class RecordingTrial:
    def __init__(self):
        self.user_attrs = {}

    def set_user_attr(self, key, value):
        self.user_attrs[key] = value


def main() -> None:
    organism, out, devices = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    module = AbliterationModule(
        model_id=str(organism), load=LoadOptions(dtypes=["float32"]), evaluation=EvalOptions(max_new_tokens=12)
    )
    data = PromptDataModule(
        harmful=PromptSource(str(organism / "harmful_train.txt"), limit=101),  # odd: uneven shards
        harmless=PromptSource(str(organism / "harmless_train.txt"), limit=96),
        eval_harmful=PromptSource(str(organism / "harmful_test.txt"), limit=57),
        eval_harmless=PromptSource(str(organism / "harmless_test.txt"), limit=55),
        batch_size=16,
        eval_batch_size=8,
    )
    trainer = AbliterationTrainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", enable_progress_bar=False
    )
    pipe = Pipeline(trainer, module, data, out / f"run{devices}")
    pipe.residuals()
    reference = pipe.reference()
    baseline = reference.values["refusals"]
    kernel = ComponentKernel(max_weight=1.0, max_weight_position=1.0, min_weight=1.0, min_weight_distance=2.0)
    plan = AblationParams(components={"attn": kernel, "mlp": kernel}, direction_index=0.5)
    result = pipe.evaluate(TrialPlan(DirectionOptions(), plan), reference).values
    # A completed trial that dominates once 3 refusals are seen: pruning must stop at the same batch.
    partial = AblationParams(components={"mlp": ComponentKernel(0.3, 1.0, 0.3, 2.0)}, direction_index=1.0)
    trial = RecordingTrial()
    totals = {"eval_harmful": 57, "eval_harmless": 55}
    pruning = Pruning(trial, pipe.objectives, [(2.5 / 57, 0.0)], totals)
    try:
        pipe.evaluate(TrialPlan(DirectionOptions(), partial), reference, [pruning])
        pruned = False
    except optuna.TrialPruned:
        pruned = True
    pca = module.directions_for(DirectionOptions(method="contrastive_pca", k=3, alpha=0.5))
    # A short seeded search: rank 0 asks Optuna, every rank evaluates the broadcast plan.
    options = StudyOptions(n_trials=4, n_startup_trials=4, seed=1, storage=f"sqlite:///{out / f'study{devices}.db'}")
    study = pipe.open_study(options)
    pipe.search(study, options, SearchSpace(), reference)
    trials = [(t.number, t.state.name, t.params, t.values) for t in study.get_trials()]
    if trainer.is_global_zero:
        save_file(
            {k: v.contiguous() for k, v in {**module.residuals, "directions": module.directions, "pca": pca}.items()},
            str(out / f"tensors{devices}.safetensors"),
        )
        record = {
            "baseline": baseline,
            "result": result,
            "pruned": pruned,
            "attrs": trial.user_attrs,
            "trials": trials,
            "world_size": trainer.world_size,
        }
        (out / f"result{devices}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
