"""The speed levers of one trial (issue #15), each measured on and off in the same process, with
ratios. Prints one JSON object on stdout; progress goes to stderr.

Levers (--levers, default all):
  drop_rows    generation drops finished rows (decode.greedy_decode) vs HF generate decoding every
               row to the end of its batch; the same fixed plans, on/off alternated per plan.
  sorted       length-sorted eval batches (data.TokenizedPrompts) vs the prompt files' order.
  batch_size   s/trial at each --batch-sizes value, the same plans.
  prune_first  the seeded random search with pruning, with the role-start bound (a scorer's
               `best_possible`, 0 refusals) vs without: s/trial, harmful batches generated, fronts.
  prefix       the longest token prefix all eval prompts share, and its share of the tokens a trial
               runs through the model: what reusing its KV cache could at most skip.

    OMP_NUM_THREADS=1 python scripts/bench_trial.py                       # the tiny organism
    OMP_NUM_THREADS=1 python scripts/bench_trial.py --model /tmp/smollm2-refusal-merged --prompts ../shared/data \
        --limit 64 --max-new-tokens 16 --plans 4 --trials 12
"""

import argparse
import json
import sys
import time
from contextlib import contextmanager
from os.path import commonprefix
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_search import parts, search, setup  # noqa: E402  (the same model, data and seeded search)

import abliterate.metrics  # noqa: E402
import abliterate.scorers.base  # noqa: E402
from abliterate.data import EVAL_ROLES, shard_batches  # noqa: E402
from abliterate.options import SearchSpace  # noqa: E402
from abliterate.pareto import pareto_front  # noqa: E402
from abliterate.pipeline import Pipeline  # noqa: E402
from abliterate.plans import sample_plan  # noqa: E402
from abliterate.scorers import Scorer  # noqa: E402

LEVERS = ("drop_rows", "sorted", "batch_size", "prune_first", "prefix")


def note(message: str) -> None:
    print(f"bench_trial: {message}", file=sys.stderr, flush=True)


@contextmanager
def patched(obj, name: str, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextmanager
def drop_rows(on: bool):
    with patched(abliterate.metrics, "can_drop_rows", abliterate.metrics.can_drop_rows if on else lambda _: False):
        yield


@contextmanager
def sorted_batches(data, on: bool):
    saved = {role: data.dataset(role).order for role in EVAL_ROLES}
    if not on:
        for role in EVAL_ROLES:
            data.dataset(role).order = list(range(len(data.dataset(role))))
    try:
        yield
    finally:
        for role, order in saved.items():
            data.dataset(role).order = order


@contextmanager
def prune_first(on: bool):
    from abliterate.scorers import JudgeRefusals, MarkerRefusals

    off = {cls: cls.best_possible for cls in (MarkerRefusals, JudgeRefusals)}
    try:
        if not on:
            for cls in off:
                cls.best_possible = Scorer.best_possible
        yield
    finally:
        for cls, hook in off.items():
            cls.best_possible = hook


@contextmanager
def counting_generation():
    """Counts generate_responses calls: one per harmful batch generated."""
    counter = {"batches": 0}
    inner = abliterate.scorers.base.generate_responses

    def counted(*args, **kwargs):
        counter["batches"] += 1
        return inner(*args, **kwargs)

    with patched(abliterate.scorers.base, "generate_responses", counted):
        yield counter


def sample_plans(space: SearchSpace, n_layers: int, n: int, seed: int) -> list:
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed))
    plans = []
    for _ in range(n):
        trial = study.ask()
        plans.append(sample_plan(trial, space, n_layers))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return plans


def timed_trial(pipe: Pipeline, plan, reference):
    """(wall s, this process's CPU s, token positions the model ran, the result). On a shared machine
    the CPU seconds and the token count are the steadier figures."""
    tokens = [0]

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens[0] += ids.numel() if ids is not None else 0

    handle = pipe.module.model.register_forward_pre_hook(count, with_kwargs=True)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        result = pipe.evaluate(plan, reference)
    finally:
        handle.remove()
    return time.perf_counter() - wall, time.process_time() - cpu, tokens[0], result


def on_off(pipe, plans, reference, switch, label: str) -> dict:
    """Each plan once per setting, the order alternating per plan; a plan's results must be identical."""
    totals = {on: [0.0, 0.0, 0] for on in (True, False)}  # wall s, CPU s, model tokens
    identical, responses_identical, max_diff = True, True, 0.0
    for i, plan in enumerate(plans):
        results = {}
        for on in (True, False) if i % 2 == 0 else (False, True):
            with switch(on):
                *costs, results[on] = timed_trial(pipe, plan, reference)
            totals[on] = [a + b for a, b in zip(totals[on], costs, strict=True)]
        on, off = results[True], results[False]
        identical &= on.values == off.values and on.responses == off.responses
        responses_identical &= sorted(on.responses) == sorted(off.responses)  # batch order may reorder them
        max_diff = max(max_diff, *(abs(on.values[k] - off.values[k]) for k in on.values))
        note(f"{label} plan {i}: on {totals[True]} off {totals[False]} (wall s, CPU s, tokens) so far")
    (wall_on, cpu_on, tokens_on), (wall_off, cpu_off, tokens_off) = totals[True], totals[False]
    return {
        "s_per_trial_on": round(wall_on / len(plans), 4),
        "s_per_trial_off": round(wall_off / len(plans), 4),
        "speedup": round(wall_off / wall_on, 3),
        "cpu_s_per_trial_on": round(cpu_on / len(plans), 4),
        "cpu_s_per_trial_off": round(cpu_off / len(plans), 4),
        "cpu_speedup": round(cpu_off / cpu_on, 3),
        "model_tokens_on": tokens_on,
        "model_tokens_off": tokens_off,
        "results_identical": identical,
        "responses_identical": responses_identical,
        "max_value_diff": max_diff,
    }


def padding_share(data, on: bool) -> float:
    """Share of the eval batches' prompt tokens that are left padding, sorted or in file order."""
    padded = real = 0
    with sorted_batches(data, on):
        for role in EVAL_ROLES:
            dataset = data.dataset(role)
            for batch in shard_batches(len(dataset), data.eval_batch_size, 0, 1):
                lengths = [len(dataset[p]["input_ids"]) for p in batch]
                padded += max(lengths) * len(lengths)
                real += sum(lengths)
    return round(1 - real / padded, 4)


def batch_sizes(pipe, data, plans, reference, sizes) -> dict:
    seconds = dict.fromkeys(sizes, 0.0)
    for i, plan in enumerate(plans):
        for size in sizes if i % 2 == 0 else reversed(sizes):
            data.eval_batch_size = size
            seconds[size] += timed_trial(pipe, plan, reference)[1]  # CPU seconds
    first = seconds[sizes[0]]
    return {
        str(b): {"cpu_s_per_trial": round(s / len(plans), 4), "ratio": round(s / first, 3)} for b, s in seconds.items()
    }


def prune_first_lever(pipe, reference, space, trials: int, seed: int, repeats: int) -> dict:
    rows = {True: [], False: []}
    for rep in range(repeats):
        for on in (True, False) if rep % 2 == 0 else (False, True):
            cpu = time.process_time()
            with prune_first(on), counting_generation() as counter:
                study, seconds = search(pipe, reference, space, trials, prune=True, seed=seed)
            cpu = time.process_time() - cpu
            pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
            front = [(t.number, tuple(t.values)) for t in pareto_front(study.trials)]
            rows[on].append((seconds, counter["batches"], len(pruned), front, cpu))
            note(f"prune_first {'on' if on else 'off'}: {seconds:.2f}s, {counter['batches']} harmful batches")
    best = {on: min(r[0] for r in rows[on]) for on in rows}
    cpu = {on: min(r[4] for r in rows[on]) for on in rows}
    return {
        "trials": trials,
        "s_per_trial_on": round(best[True] / trials, 4),
        "s_per_trial_off": round(best[False] / trials, 4),
        "speedup": round(best[False] / best[True], 3),
        "cpu_s_per_trial_on": round(cpu[True] / trials, 4),
        "cpu_s_per_trial_off": round(cpu[False] / trials, 4),
        "cpu_speedup": round(cpu[False] / cpu[True], 3),
        "harmful_batches_on": rows[True][0][1],
        "harmful_batches_off": rows[False][0][1],
        "pruned_on": rows[True][0][2],
        "pruned_off": rows[False][0][2],
        "fronts_identical": rows[True][0][3] == rows[False][0][3],
    }


def prefix_lever(pipe, data) -> dict:
    ids = {role: data.dataset(role).input_ids for role in EVAL_ROLES}
    every = [row for rows in ids.values() for row in rows]
    prefix = len(commonprefix(every))
    options = pipe.module.eval_options
    # Tokens a trial runs through the model without pruning: the KL pass (prompt + kl_tokens - 1 per
    # harmless prompt), generation's prefill (each harmful prompt) and at most max_new_tokens decode steps.
    kl = sum(len(r) + options.kl_tokens - 1 for r in ids["eval_harmless"])
    generation = sum(len(r) + options.max_new_tokens for r in ids["eval_harmful"])
    out = {
        "shared_prefix_tokens": prefix,
        "mean_prompt_tokens": round(sum(map(len, every)) / len(every), 1),
        "prefix_share_of_trial_tokens": round(prefix * len(every) / (kl + generation), 4),
    }
    return out | (
        prefix_cache_check(pipe.module.model, ids["eval_harmful"][: data.eval_batch_size], prefix) if prefix else {}
    )


@torch.no_grad()
def prefix_cache_check(model, rows: list[list[int]], prefix: int, repeats: int = 2) -> dict:
    """One batch's next-token logits: the full prompts (as trials run them) vs the shared prefix encoded
    once, its KV cache expanded to the batch, and only the left-padded suffixes run after it."""
    from transformers import DynamicCache

    def left_pad(parts):
        width = max(map(len, parts))
        ids = torch.zeros((len(parts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, part in enumerate(parts):
            ids[i, width - len(part) :], mask[i, width - len(part) :] = torch.tensor(part), 1
        return ids, mask

    full_ids, full_mask = left_pad(rows)
    suffix_ids, suffix_mask = left_pad([r[prefix:] for r in rows])
    mask = torch.cat([torch.ones((len(rows), prefix), dtype=torch.long), suffix_mask], 1)
    full_ids, full_mask, suffix_ids, mask = (t.to(model.device) for t in (full_ids, full_mask, suffix_ids, mask))
    seconds = {"full": [], "prefix_cached": []}
    for _ in range(repeats):
        cpu = time.process_time()
        full = model(
            input_ids=full_ids,
            attention_mask=full_mask,
            position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=1,
        ).logits[:, -1]
        seconds["full"].append(time.process_time() - cpu)
        cpu = time.process_time()
        cache = DynamicCache(config=model.config)
        model(
            input_ids=torch.tensor([rows[0][:prefix]], device=model.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(len(rows))
        cached = model(
            input_ids=suffix_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1)[:, prefix:].clamp(min=0),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        seconds["prefix_cached"].append(time.process_time() - cpu)
    return {
        "prefill_batch": len(rows),
        "prefill_cpu_s_full": [round(s, 3) for s in seconds["full"]],
        "prefill_cpu_s_prefix_cached": [round(s, 3) for s in seconds["prefix_cached"]],
        "prefill_speedup": round(min(seconds["full"]) / min(seconds["prefix_cached"]), 3),
        "max_logit_diff": (full - cached).abs().max().item(),
        "bit_identical": torch.equal(full, cached),
        "argmax_equal": bool((full.argmax(-1) == cached.argmax(-1)).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model dir; default: the demo organism (trained and cached)")
    parser.add_argument("--prompts", help="dir with harmful/harmless _train/_test.txt; default: the model dir")
    parser.add_argument("--levers", nargs="+", choices=LEVERS, default=list(LEVERS))
    parser.add_argument("--limit", type=int, default=None, help="prompts per file")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--plans", type=int, default=10, help="fixed random plans per on/off lever")
    parser.add_argument("--trials", type=int, default=40, help="trials per search (prune_first)")
    parser.add_argument("--repeats", type=int, default=2, help="searches per setting (prune_first); the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    space, organism, prompts = setup(args)
    module, data, trainer = parts(args.model, prompts, args.limit, args.max_new_tokens, args.eval_batch_size)
    pipe = Pipeline(trainer, module, data, None)
    reference = None
    if set(args.levers) - {"prefix"}:
        pipe.residuals()
        reference = pipe.reference()
    else:  # the prefix check needs only the model and the tokenised prompts
        module.configure_model()
        data.attach_tokenizer(module.tokenizer)
    plans = sample_plans(space, module.n_layers, args.plans, args.seed)
    out = {
        "organism": organism,
        "eval_prompts": {role: len(data.dataset(role)) for role in EVAL_ROLES},
        "max_new_tokens": args.max_new_tokens,
        "kl_tokens": module.eval_options.kl_tokens,
        "eval_batch_size": args.eval_batch_size,
        "plans": args.plans,
    }
    for lever in args.levers:
        note(f"{lever} ...")
        data.eval_batch_size = args.eval_batch_size
        if lever == "drop_rows":
            out[lever] = on_off(pipe, plans, reference, drop_rows, lever)
        elif lever == "sorted":
            out[lever] = on_off(pipe, plans, reference, lambda on: sorted_batches(data, on), lever)
            out[lever] |= {
                "padding_share_on": padding_share(data, True),
                "padding_share_off": padding_share(data, False),
            }
        elif lever == "batch_size":
            out[lever] = batch_sizes(pipe, data, plans, reference, args.batch_sizes)
        elif lever == "prune_first":
            out[lever] = prune_first_lever(pipe, reference, space, args.trials, args.seed, args.repeats)
        elif lever == "prefix":
            out[lever] = prefix_lever(pipe, data)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
