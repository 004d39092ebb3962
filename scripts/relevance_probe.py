"""A relevance probe, measured against the hand label `attempts` (issue #14; docs/benchmarks.md, "Does the
relevance probe see replies that give nothing?"). Not a scorer: a measurement of whether one is worth building.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/relevance_probe.py [--rows OUT.jsonl]

The probe is fit on the ORIGINAL soft organism alone, on harmless prompts alone: its greedy reply to each of the 64
fitting prompts (fit_replies.jsonl) read after that prompt is an answer; its reply to the next prompt, read after
this one, is not. Every third layer is tried and the best held-out layer kept (the library's `choose_probe`). It
then reads each hand-read reply of seeds 8-10 (scripts/data/soft_seed{8,9,10}_deflects.jsonl) after its prompt,
and calls it a non-answer when the probe's score is above 0. Printed (stdout, JSON): per trial and in all, how many
rows its verdict agrees with `attempts` false, and how it splits over deflections, loops and the rest.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_judge import token_ids  # noqa: E402
from bench_quality import load_lm  # noqa: E402
from judge_sample import FIT, encode, organism_dir, read_rows  # noqa: E402

from abliterate.scorers.degeneration import loops  # noqa: E402
from abliterate.scorers.reply_probe import choose_probe, probe_scores, reply_states  # noqa: E402

SEEDS = (8, 9, 10)
LAYERS = list(range(0, 30, 3))
log = logging.getLogger("relevance_probe")


def labelled_rows() -> list[dict]:
    return [r for seed in SEEDS for r in read_rows(HERE / "data" / f"soft_seed{seed}_deflects.jsonl")]


def fit_probe(model, tokenizer):
    fit = [
        r
        for r in read_rows(FIT)
        if r["model"] == "smollm2-soft-refusal" and not r.get("sampled") and r["set"] == "harmless_train"
    ]
    prompts = encode(tokenizer, [r["prompt"] for r in fit])
    replies = token_ids(tokenizer, [r["reply"] for r in fit])
    other_replies = replies[1:] + replies[:1]  # each prompt paired with the next prompt's reply
    pad = tokenizer.pad_token_id
    answers = reply_states(model, replies, LAYERS, pad, prefixes=prompts)
    non_answers = reply_states(model, other_replies, LAYERS, pad, prefixes=prompts)
    return choose_probe(non_answers, answers, LAYERS), len(fit)


def tally(rows: list[dict]) -> dict:
    agree = sum(r["non_answer"] != r["attempts"] for r in rows)
    kinds = {
        "deflects": [r for r in rows if r["deflects"]],
        "loops": [r for r in rows if r["loops"] and not r["deflects"]],
        "attempts": [r for r in rows if r["attempts"] and not r["loops"]],
        "other": [r for r in rows if not (r["deflects"] or r["loops"] or r["attempts"])],
    }
    return {
        "rows": len(rows),
        "agrees_with_attempts": agree,
        "agreement": round(agree / len(rows), 3),
        "non_answers": sum(r["non_answer"] for r in rows),
        "attempts_false": sum(not r["attempts"] for r in rows),
        **{f"{k}_called_non_answers": f"{sum(r['non_answer'] for r in v)}/{len(v)}" for k, v in kinds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, help="also write each row with its verdict here (JSON lines)")
    args = parser.parse_args()
    if args.rows and not args.rows.parent.is_dir():  # before minutes of work: one line, exit 2
        print(f"relevance_probe: --rows {args.rows}: {args.rows.parent} is not a folder: pass a path in one", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = organism_dir("smollm2-soft-refusal")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_lm(str(path))
    started = time.monotonic()
    probe, n_fit = fit_probe(model, tokenizer)
    log.info("probe fit on %d harmless prompts reads layer %d (%.0fs)", n_fit, probe.layer, time.monotonic() - started)
    rows = labelled_rows()
    pad = tokenizer.pad_token_id
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    for i, condition in enumerate(conditions, 1):
        subset = [r for r in rows if r["condition"] == condition]
        ids = token_ids(tokenizer, [r["reply"] for r in subset])
        states = reply_states(model, ids, [probe.layer], pad, prefixes=encode(tokenizer, [r["prompt"] for r in subset]))
        verdicts = (probe_scores(states[:, 0], probe.weight, probe.bias) > 0).tolist()
        for row, verdict, reply_ids in zip(subset, verdicts, ids, strict=True):
            row["non_answer"], row["loops"] = bool(verdict), loops(reply_ids)
        print(f"read {condition} ({i}/{len(conditions)}), {time.monotonic() - started:.0f}s", file=sys.stderr)
    result = {"layer": probe.layer, "fit_prompts": n_fit}
    result |= {c: tally([r for r in rows if r["condition"] == c]) for c in conditions}
    result["all"] = tally(rows)
    if args.rows:
        with args.rows.open("w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
