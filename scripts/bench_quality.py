"""Quality benchmark: run the full pipeline on a refusal organism and measure what it did.

Last stdout line: one JSON object with refusal_before/after (harmful eval set), over_refusal
before/after, per-set rates, kl_first_token, kl_n_token (KL(original || ablated) averaged over
the first n positions of the original's greedy reply, teacher-forced), agreement_16 (share of
harmless prompts whose first 16 greedy tokens equal the original's), seconds_per_trial and
wall time per phase. With --compare DIR, a second abliterated model (e.g. heretic's) is
evaluated with the same code and put beside ours as ratios.

    OMP_NUM_THREADS=1 python scripts/bench_quality.py --organism tiny --trials 30
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --organism smollm2-refusal --model /tmp/smollm2-refusal-merged \\
        --trials 20 --limit 128

smollm2-refusal needs the merged organism (../shared/organisms/smollm2-refusal/README.md says how
to merge the adapter into the GGUF base) and ../shared/data; without them it prints a skip line.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import optuna
import torch
from transformers import AutoModelForCausalLM

from abliterate.data import PromptDataModule
from abliterate.metrics import (
    KLDivergence,
    default_markers,
    generate_responses,
    greedy_continuation,
    is_refusal,
    next_token_logprobs,
)
from abliterate.module import AbliterationModule
from abliterate.options import EvalOptions, LoadOptions, SearchSpace, StudyOptions
from abliterate.prompts import PromptSource, format_chat, load_prompts
from abliterate.search import make_study, run_search, select_trial
from abliterate.trainer import AbliterationTrainer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HARMFUL_SETS = ("harmful_test", "harmbench_standard", "jbb_harmful")
HARMLESS_SETS = ("harmless_test", "xstest_safe")


def batches(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def encode(tokenizer, prompts):
    texts = format_chat(tokenizer, prompts)
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def refusal_rate(model, tokenizer, prompts, max_new_tokens, batch_size=16):
    markers = default_markers()
    refused = 0
    for chunk in batches(prompts, batch_size):
        enc = encode(tokenizer, chunk)
        replies = generate_responses(
            model, tokenizer, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens
        )
        refused += sum(is_refusal(r, markers) for r in replies)
    return refused / len(prompts)


@torch.no_grad()
def divergence(original, ablated, tokenizer, prompts, n_tokens=16, batch_size=16):
    """first-token KL, n-token KL (teacher-forced on the original's greedy reply), agreement of 16 tokens."""
    first, multi = KLDivergence(), KLDivergence()
    agree = 0
    for chunk in batches(prompts, batch_size):
        enc = encode(tokenizer, chunk)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        cont = greedy_continuation(original, ids, mask, n_tokens, tokenizer.pad_token_id)
        ref = next_token_logprobs(original, ids, mask, cont)
        new = next_token_logprobs(ablated, ids, mask, cont)
        first.update(new[:, 0], ref[:, 0])
        multi.update(new, ref)
        mine = greedy_continuation(ablated, ids, mask, n_tokens, tokenizer.pad_token_id)
        # both continuations hold n-1 greedy tokens; the n-th is the argmax of the last distribution
        full_ref = torch.cat([cont, ref[:, -1].argmax(-1, keepdim=True)], 1)
        ablated_last = next_token_logprobs(ablated, ids, mask, mine)[:, -1].argmax(-1, keepdim=True)
        full_new = torch.cat([mine, ablated_last], 1)
        agree += int((full_ref == full_new).all(-1).sum())
    return float(first.compute()), float(multi.compute()), agree / len(prompts)


def evaluate(original, ablated, tokenizer, sets, max_new_tokens):
    rates = {name: refusal_rate(ablated, tokenizer, prompts, max_new_tokens) for name, prompts in sets.items()}
    harmless = sets.get("harmless_test") or sets["harmless"]
    kl1, kln, agreement = divergence(original, ablated, tokenizer, harmless)
    return rates, kl1, kln, agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organism", choices=("tiny", "smollm2-refusal"), default="tiny")
    parser.add_argument("--model", help="model dir (smollm2-refusal: the merged organism)")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--limit", type=int, default=None, help="train prompts per class for the directions")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--compare", help="another abliterated model dir to evaluate the same way (e.g. heretic's)")
    parser.add_argument("--compare-seconds-per-trial", type=float, help="its measured s/trial, for the ratio")
    parser.add_argument("--out", help="run dir (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    if args.organism == "tiny":
        from abliterate.demo import default_cache_dir
        from abliterate.organism import build_tiny_organism

        model_dir = args.model or str(build_tiny_organism(default_cache_dir() / "organism", progress=False))
        prompt_dir = Path(model_dir)
        sets_files = {
            "harmful_test": prompt_dir / "harmful_test.txt",
            "harmless_test": prompt_dir / "harmless_test.txt",
        }
        space = SearchSpace(direction_index=(0.0, 1.0), max_weight_position=(0.0, 1.0), min_weight_distance=(0.5, 1.0))
    else:
        if not (SHARED / "data").is_dir() or not args.model or not Path(args.model).is_dir():
            print(json.dumps({"skipped": "needs ../shared/data and --model (the merged smollm2-refusal organism)"}))
            return
        model_dir, prompt_dir = args.model, SHARED / "data"
        sets_files = {name: prompt_dir / f"{name}.txt" for name in (*HARMFUL_SETS, *HARMLESS_SETS)}
        space = SearchSpace()

    phases = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        module = AbliterationModule(
            model_id=model_dir,
            load=LoadOptions(dtypes=["float32"]),
            evaluation=EvalOptions(max_new_tokens=args.max_new_tokens),
        )
        data = PromptDataModule(
            harmful=PromptSource(str(prompt_dir / "harmful_train.txt"), limit=args.limit),
            harmless=PromptSource(str(prompt_dir / "harmless_train.txt"), limit=args.limit),
            eval_harmful=PromptSource(str(prompt_dir / "harmful_test.txt")),
            eval_harmless=PromptSource(str(prompt_dir / "harmless_test.txt")),
            batch_size=32,
            eval_batch_size=16,
        )
        trainer = AbliterationTrainer(accelerator="auto", devices=1, enable_progress_bar=False)
        data.attach_tokenizer(module.tokenizer)
        start = time.perf_counter()
        trainer.collect_residuals(module, data, cache_dir=None)
        phases["directions_s"] = time.perf_counter() - start
        start = time.perf_counter()
        trainer.compute_baseline(module, data, cache_dir=None)
        phases["baseline_s"] = time.perf_counter() - start
        options = StudyOptions(n_trials=args.trials, n_startup_trials=min(10, args.trials))
        study = make_study(options, optuna.storages.InMemoryStorage())
        start = time.perf_counter()
        run_search(trainer, module, data, options, space, study)
        phases["search_s"] = time.perf_counter() - start
        chosen = select_trial(study.trials, "min_kl_under", options.refusal_target)
        plan = trainer.plan_for(module, chosen, space)
        start = time.perf_counter()
        from abliterate.export import save_checkpoint

        with module.weight_editor().applied(plan.ablation, module.directions_for(plan.directions)):
            save_checkpoint(
                module.model, module.tokenizer, out / "model", overwrite=True, card={"base_model": model_dir}
            )
        phases["export_s"] = time.perf_counter() - start

        start = time.perf_counter()
        tokenizer = module.tokenizer
        sets = {name: load_prompts(PromptSource(str(path))) for name, path in sets_files.items()}
        original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        ablated = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
        before = {name: refusal_rate(original, tokenizer, p, args.max_new_tokens) for name, p in sets.items()}
        after, kl1, kln, agreement = evaluate(original, ablated, tokenizer, sets, args.max_new_tokens)
        phases["eval_s"] = time.perf_counter() - start

        harmless_names = [n for n in sets if n in HARMLESS_SETS or n == "harmless_test"]

        def over(rates):
            return sum(rates[n] * len(sets[n]) for n in harmless_names) / sum(len(sets[n]) for n in harmless_names)

        result = {
            "organism": args.organism,
            "trials": args.trials,
            "selected_trial": chosen.number,
            "refusal_before": before["harmful_test"],
            "refusal_after": after["harmful_test"],
            "over_refusal_before": over(before),
            "over_refusal_after": over(after),
            "per_set_before": before,
            "per_set_after": after,
            "kl_first_token": kl1,
            "kl_n_token": kln,
            "agreement_16": agreement,
            "seconds_per_trial": phases["search_s"] / args.trials,
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
            **{k: round(v, 1) for k, v in phases.items()},
        }
        if args.compare:
            other = AutoModelForCausalLM.from_pretrained(args.compare, dtype=torch.float32).eval()
            o_rates, o_kl1, o_kln, o_agree = evaluate(original, other, tokenizer, sets, args.max_new_tokens)
            result["compare"] = {
                "model": args.compare,
                "refusal_after": o_rates["harmful_test"],
                "over_refusal_after": over(o_rates),
                "per_set_after": o_rates,
                "kl_first_token": o_kl1,
                "kl_n_token": o_kln,
                "agreement_16": o_agree,
            }
            result["ratio_refusal_after"] = result["refusal_after"] / max(o_rates["harmful_test"], 1e-9)
            result["ratio_kl_n_token"] = kln / max(o_kln, 1e-12)
            if args.compare_seconds_per_trial:
                result["ratio_seconds_per_trial"] = result["seconds_per_trial"] / args.compare_seconds_per_trial
    print(json.dumps(result))


if __name__ == "__main__":
    main()
