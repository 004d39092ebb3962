"""Benchmark pruning: the same seeded search with and without it, on the demo organism
(and on ../shared's smollm2-refusal organism when --model points at its merged dir).

Every trial is a start-up (random) trial, so both runs evaluate the very same parameters and
their Pareto fronts of completed trials can be compared exactly. Prints one JSON line:
seconds_per_trial with and without pruning, speedup, pruned_fraction, fronts_identical.

    OMP_NUM_THREADS=1 python scripts/bench_search.py --trials 40
    OMP_NUM_THREADS=1 python scripts/bench_search.py --model /tmp/smollm2-refusal-merged --prompts ../shared/data --trials 20
"""

import argparse
import json
import logging
import os
import time
from pathlib import Path

import optuna
import torch

from abliterate.data import PromptDataModule
from abliterate.module import AbliterationModule
from abliterate.options import EvalOptions, LoadOptions, SearchSpace, StudyOptions
from abliterate.pareto import pareto_front
from abliterate.pipeline import Pipeline
from abliterate.prompts import PromptSource
from abliterate.study import make_study
from abliterate.trainer import AbliterationTrainer


def parts(model_dir: str, prompts: Path, limit: int | None, max_new_tokens: int, eval_batch_size: int):
    module = AbliterationModule(
        model_id=model_dir,
        load=LoadOptions(dtypes=["float32"]),
        evaluation=EvalOptions(max_new_tokens=max_new_tokens),
    )

    def source(name: str) -> PromptSource:
        return PromptSource(str(prompts / name), limit=limit)

    data = PromptDataModule(
        harmful=source("harmful_train.txt"),
        harmless=source("harmless_train.txt"),
        eval_harmful=source("harmful_test.txt"),
        eval_harmless=source("harmless_test.txt"),
        batch_size=32,
        eval_batch_size=eval_batch_size,
    )
    trainer = AbliterationTrainer(accelerator="auto", devices=1, enable_progress_bar=False)
    return module, data, trainer


def search(pipe: Pipeline, reference, space, trials: int, prune: bool, seed: int) -> tuple[optuna.Study, float]:
    # n_startup_trials >= trials: every trial is sampled independently of the history.
    options = StudyOptions(n_trials=trials, n_startup_trials=trials, seed=seed, prune=prune)
    study = make_study(options, optuna.storages.InMemoryStorage(), pipe.objectives)
    start = time.perf_counter()
    pipe.search(study, options, space, reference)
    return study, time.perf_counter() - start


def setup(args) -> tuple[SearchSpace, str, Path]:
    """One torch thread unless OMP_NUM_THREADS says otherwise, quiet logs, and the model: --model, or the
    tiny organism (trained and cached like the demo) with a search space wide enough for it."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.model is None:
        from abliterate.demo import default_cache_dir
        from abliterate.organism import build_tiny_organism

        args.model = str(build_tiny_organism(default_cache_dir() / "organism", progress=False))
        space = SearchSpace(direction_index=(0.0, 1.0), max_weight_position=(0.0, 1.0), min_weight_distance=(0.5, 1.0))
        return space, "tiny", Path(args.prompts or args.model)
    return SearchSpace(), Path(args.model).name, Path(args.prompts or args.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model dir; default: the demo organism (trained and cached)")
    parser.add_argument("--prompts", help="dir with harmful/harmless _train/_test.txt; default: the model dir")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--limit", type=int, default=None, help="prompts per file")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    space, organism, prompts = setup(args)

    module, data, trainer = parts(args.model, prompts, args.limit, args.max_new_tokens, args.eval_batch_size)
    pipe = Pipeline(trainer, module, data, None)  # no run dir: nothing cached
    pipe.residuals()
    reference = pipe.reference()
    results = {}
    for prune in (False, True):
        study, seconds = search(pipe, reference, space, args.trials, prune, args.seed)
        results[prune] = (study, seconds)

    def front(study):
        return [(t.number, tuple(t.values)) for t in pareto_front(study.trials)]

    (plain, plain_s), (pruned, pruned_s) = results[False], results[True]
    n_pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in pruned.trials)
    print(
        json.dumps(
            {
                "organism": organism,
                "device": str(module.model.device),
                "trials": args.trials,
                "eval_harmful": len(data.dataset("eval_harmful")),
                "eval_batch_size": args.eval_batch_size,
                "seconds_per_trial_no_pruning": round(plain_s / args.trials, 4),
                "seconds_per_trial_pruning": round(pruned_s / args.trials, 4),
                "speedup": round(plain_s / pruned_s, 2),
                "pruned_fraction": round(n_pruned / args.trials, 3),
                "fronts_identical": front(plain) == front(pruned),
                "front": front(pruned),
            }
        )
    )


if __name__ == "__main__":
    main()
