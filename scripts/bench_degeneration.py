"""Benchmark the per-trial cost of reporting Degeneration: the same seeded search on the demo
organism with the objectives only (refusals, KL), and with Degeneration reported (greedy replies,
finished rows dropped).

The searches sample the very same plans (every trial is a start-up trial), so their objective
values must be identical; prints one JSON line: seconds_per_trial for each, the ratio, and whether
the values matched.

    OMP_NUM_THREADS=1 python scripts/bench_degeneration.py --trials 20
"""

import argparse
import json
import logging
import os
import time

import optuna
import torch

from abliterate.data import PromptDataModule
from abliterate.module import AbliterationModule
from abliterate.options import EvalOptions, LoadOptions, SearchSpace, StudyOptions
from abliterate.pipeline import Pipeline
from abliterate.prompts import PromptSource
from abliterate.scorers import KL, Degeneration, MarkerRefusals
from abliterate.study import make_study
from abliterate.trainer import AbliterationTrainer

SPACE = SearchSpace(direction_index=(0.0, 1.0), max_weight_position=(0.0, 1.0), min_weight_distance=(0.5, 1.0))


def timed_search(model_dir: str, scorers, trials: int, seed: int, max_new_tokens: int) -> tuple[list, float, dict]:
    evaluation = EvalOptions(max_new_tokens=max_new_tokens)
    module = AbliterationModule(model_dir, load=LoadOptions(dtypes=["float32"]), evaluation=evaluation, scorers=scorers)
    data = PromptDataModule(
        **{
            role: PromptSource(
                f"{model_dir}/{role.removeprefix('eval_')}_{'test' if role.startswith('eval') else 'train'}.txt"
            )
            for role in ("harmful", "harmless", "eval_harmful", "eval_harmless")
        },
        batch_size=64,
        eval_batch_size=16,
    )
    trainer = AbliterationTrainer(accelerator="cpu", devices=1, enable_progress_bar=False)
    pipe = Pipeline(trainer, module, data, None)  # no run dir: nothing cached
    pipe.residuals()
    start = time.perf_counter()
    reference = pipe.reference()
    reference_s = time.perf_counter() - start
    # report_scorers completed: what this measures is the cost of a reported scorer on every completed trial
    options = StudyOptions(n_trials=trials, n_startup_trials=trials, seed=seed, report_scorers="completed")
    study = make_study(options, optuna.storages.InMemoryStorage(), pipe.objectives)
    start = time.perf_counter()
    pipe.search(study, options, SPACE, reference)
    seconds = time.perf_counter() - start
    values = [(t.number, t.state.name, t.values) for t in study.trials]
    reported = {t.number: t.user_attrs.get("degeneration") for t in study.trials if "degeneration" in t.user_attrs}
    return values, seconds, {"reference_s": round(reference_s, 3), "reported": reported}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=12, help="refusal reply length (the organism config's)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from abliterate.demo import default_cache_dir
    from abliterate.organism import build_tiny_organism

    model_dir = str(build_tiny_organism(default_cache_dir() / "organism", progress=False))
    runs = {
        "objectives_only": [MarkerRefusals(), KL()],
        "degeneration_reported": [MarkerRefusals(), KL(), Degeneration(direction="report")],
    }
    results = {
        name: timed_search(model_dir, s, args.trials, args.seed, args.max_new_tokens) for name, s in runs.items()
    }
    seconds = {name: r[1] for name, r in results.items()}
    values = {name: r[0] for name, r in results.items()}
    reported = {name: r[2]["reported"] for name, r in results.items()}
    base = seconds["objectives_only"]
    print(
        json.dumps(
            {
                "trials": args.trials,
                **{f"seconds_per_trial_{name}": round(s / args.trials, 4) for name, s in seconds.items()},
                "ratio_reported_vs_objectives_only": round(seconds["degeneration_reported"] / base, 3),
                "reference_s": {name: r[2]["reference_s"] for name, r in results.items()},
                "objective_values_identical": len({json.dumps(v) for v in values.values()}) == 1,
                "degeneration_reported_trials": len(reported["degeneration_reported"]),
                "degeneration_values": sorted(set(reported["degeneration_reported"].values())),
            }
        )
    )


if __name__ == "__main__":
    main()
