"""Where a run's time goes: each phase (residuals, reference, search, the pick's reported scorers,
export) and, inside it, the greedy decodes, teacher-forced log-probs and refusal generation.

Runs `AbliterationTrainer.run` once in this process with the timers wrapped around the pipeline's
phases and the scorers' model calls; prints one JSON line, seconds per phase and per phase:call.
Made the reference-pass and Degeneration lines of docs/benchmarks.md (issue #15), e.g.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/bench_phases.py --model /tmp/smollm2-refusal-merged \
        --prompts /tmp/bq-s5d/prompts --trials 3

--prompts: a dir with harmful_train, harmless_train, harmful_test and harmless_test .txt files
(the tiny organism's dir has them). Compare two revisions by running it twice, one after the other.
"""

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("residuals", "reference", "search", "reported_values", "export")
# The scorers' model calls; greedy_continuation and greedy_reply_tokens are what revisions before 7ded793
# called (one decode each), so the script times those too.
CALLS = ("generate_responses", "greedy_tokens", "greedy_continuation", "greedy_reply_tokens", "next_token_logprobs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model dir")
    parser.add_argument("--prompts", required=True, type=Path, help="dir of the four prompt files")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=25, help="eval batch size")
    args = parser.parse_args()
    names = ("harmful_train", "harmless_train", "harmful_test", "harmless_test")
    missing = [n for n in names if not (args.prompts / f"{n}.txt").is_file()]
    if missing:
        parser.error(f"{args.prompts} lacks {', '.join(f'{n}.txt' for n in missing)}")

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import abliterate.scorers.base as base
    from abliterate.cli import configure_logging
    from abliterate.data import PromptDataModule
    from abliterate.module import AbliterationModule
    from abliterate.options import EvalOptions, LoadOptions, SearchSpace, StudyOptions
    from abliterate.pipeline import Pipeline
    from abliterate.prompts import PromptSource
    from abliterate.trainer import AbliterationTrainer

    configure_logging()
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    stack = ["start"]

    def timed(owner, name: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a, **kw):
            if name in PHASES:
                stack.append(name)
            start = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                spent = time.perf_counter() - start
                if name in PHASES:
                    stack.pop()
                    seconds[name] += spent
                else:
                    seconds[f"{stack[-1]}:{name}"] += spent
                calls[name] += 1

        setattr(owner, name, wrapper)

    for name in CALLS:
        if hasattr(base, name):
            timed(base, name)
    for name in PHASES:
        timed(Pipeline, name)

    files = {n: str(args.prompts / f"{n}.txt") for n in names}
    module = AbliterationModule(
        model_id=args.model,
        load=LoadOptions(dtypes=["float32"]),
        evaluation=EvalOptions(max_new_tokens=args.max_new_tokens, kl_tokens=16),
    )
    data = PromptDataModule(
        harmful=PromptSource(files["harmful_train"]),
        harmless=PromptSource(files["harmless_train"]),
        eval_harmful=PromptSource(files["harmful_test"]),
        eval_harmless=PromptSource(files["harmless_test"]),
        batch_size=32,
        eval_batch_size=args.batch_size,
    )
    trainer = AbliterationTrainer(accelerator="cpu", devices=1, enable_progress_bar=False)
    out = Path(tempfile.mkdtemp(prefix="bench-phases-"))
    try:
        start = time.perf_counter()
        trainer.run(
            module,
            data,
            study=StudyOptions(n_trials=args.trials, seed=args.seed),
            space=SearchSpace(),
            output_dir=str(out),
            export_dir=str(out / "model"),
            overwrite=True,
        )
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)  # a temp dir this script made
    result = {"model": args.model, "trials": args.trials, "wall_s": round(wall, 2)}
    result |= {"seconds": {k: round(v, 2) for k, v in seconds.items()}, "calls": dict(calls)}
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
