"""Time the same recorded trial plans with two (or more) source trees, each in a fresh process: the
before/after of a change to how a trial is scored, on the exact plans a study sampled.

Each tree runs residuals, the reference pass, then `Pipeline.evaluate` with a Pruning callback that
has no completed trials (so nothing is pruned) for every --trials plan (read with the default
search space), --repeats times. Prints one
JSON object: per tree, the reference seconds, each trial's seconds and values; and the ratio of the
mean trial seconds of every tree to the first's. Progress goes to stderr.

    git worktree add /tmp/before 355f18b
    OMP_NUM_THREADS=1 python scripts/bench_trial_ab.py --src /tmp/before --src . \\
        --model /tmp/smollm2-refusal-merged --prompts /tmp/bq-s5b/prompts \\
        --study /tmp/bq-s5b/ours/study.db --trials 19 --repeats 2
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def child(args) -> None:
    """In the fresh process: the tree's own abliterate, the plans timed."""
    import logging
    import time

    sys.path[:0] = [str(Path(args.child) / "src"), str(Path(args.child) / "scripts")]
    import optuna
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from bench_search import parts

    import abliterate
    from abliterate.callbacks import Pruning
    from abliterate.options import SearchSpace
    from abliterate.pipeline import Pipeline

    assert Path(abliterate.__file__).resolve().is_relative_to(Path(args.child).resolve()), abliterate.__file__

    class Unrecorded:
        def set_user_attr(self, key, value) -> None:
            pass

    module, data, trainer = parts(args.model, Path(args.prompts), None, args.max_new_tokens, args.eval_batch_size)
    pipe = Pipeline(trainer, module, data, None)
    pipe.residuals()
    start = time.perf_counter()
    reference = pipe.reference()
    result = {"reference_s": round(time.perf_counter() - start, 1), "trials": []}
    study = optuna.load_study(study_name=args.study_name, storage=f"sqlite:///{args.study}")
    totals = {role: len(data.dataset(role)) for role in ("eval_harmful", "eval_harmless")}
    for number in args.trials:
        plan = pipe.plan_of(study.trials[number], SearchSpace())
        for _ in range(args.repeats):
            start = time.perf_counter()
            values = pipe.evaluate(plan, reference, [Pruning(Unrecorded(), pipe.objectives, [], totals)]).values
            seconds = round(time.perf_counter() - start, 1)
            print(f"{args.child}: trial {number} {seconds}s {values}", file=sys.stderr, flush=True)
            result["trials"].append({"trial": number, "seconds": seconds, "values": values})
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", action="append", required=True, help="a source tree (repeat; the first is the base)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="dir with harmful/harmless _train/_test.txt")
    parser.add_argument("--study", required=True, help="study.db of the run whose plans are timed")
    parser.add_argument("--study-name", default="abliterate")
    parser.add_argument("--trials", type=int, nargs="+", required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--eval-batch-size", type=int, default=25)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    runs = {}
    for src in args.src:
        print(f"timing {src} in a fresh process", file=sys.stderr, flush=True)
        argv = [sys.executable, __file__, *sys.argv[1:], "--child", src]
        runs[src] = json.loads(subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout)

    def mean(run) -> float:
        return sum(t["seconds"] for t in run["trials"]) / len(run["trials"])

    base = runs[args.src[0]]
    print(
        json.dumps(
            {"runs": runs, "trial_seconds_ratio_to_first": {s: round(mean(r) / mean(base), 3) for s, r in runs.items()}}
        )
    )


if __name__ == "__main__":
    main()
