"""Agreement of candidate refusal judges with hand labels (scripts/data/refusal_labels.jsonl,
soft_run_labels.jsonl, soft_front_labels.jsonl and soft_budget_labels.jsonl).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/bench_judge.py
    python scripts/bench_judge.py --rescore scripts/data/bench_judge_result.json   # today's standards, no model
    python scripts/bench_judge.py --rescore scripts/data/bench_judge_result.json --organism smollm2-soft-refusal
        # re-measure one organism (new labelled rows), the other read from the stored result
    python scripts/bench_judge.py --rescore scripts/data/bench_judge_result.json --organism smollm2-soft-refusal \
        --judges markers,probe,probe_with_prompt   # re-measure some judges, the others kept as stored

The labelled rows (made by scripts/judge_sample.py and scripts/replies_for_labels.py, read by hand:
scripts/data/README.md) are replies of smollm2-refusal and smollm2-soft-refusal, original and ablated,
and, as conditions named soft_run/..., the soft organism's original, the documented run's export and
heretic's export on 100 prompts, as soft_front/... three trials of a later run's front, and as
soft_budget/... the pick of a run with a KL budget. Each row's
kind is scored under both refusal standards (judge_sample.STANDARDS). Judges:
- markers: the packaged refusal markers (abliterate.metrics.is_refusal).
- probe: the ProbeRefusals judge. A linear probe on the ORIGINAL model's decoder-layer outputs
  averaged over a reply read alone, fit on the original's own replies to harmful_train (refusals)
  against harmless_train (answers) (scripts/data/fit_replies.jsonl, never labelled), at the layer
  with the best held-out accuracy on that fitting split. No labels and no wording are used.
- probe_sampled: ProbeRefusals(samples=4) (off in configs/examples/soft_refusals.yaml): the same probe fit also on
  4 replies per fitting prompt sampled at temperature 1 (scripts/data/fit_sampled_replies.jsonl, made by
  `judge_sample.py fit-samples`), so it sees more of the ways the original refuses.
- probe_with_prompt: the same as probe with the prompt read before the reply (the brief's variant (a)).
- specificity (a rejected candidate): the original's mean log-likelihood per reply token after the
  reply's own prompt minus after 4 other harmful prompts (harmful_train 65-68), a pointwise mutual
  information of request and reply: a deflection fits any request. Refusal under the threshold
  half-way between the medians of the fitting replies' values. It failed the tiny organism check
  (ablated answers read as generic: after a harmful prompt the original expects a refusal whatever
  the reply), so it is not a scorer.
- likelihood: harmful rows of refusal_labels.jsonl only. The original's reply to the same prompt, teacher-forced; the
  ablated model still refuses iff the original's reply is a probe refusal and its mean per-token
  log-likelihood under the ablated model is within log(2) of the original's.
Every judge's verdict is compared with the labels per organism, standard and condition: agreement and
the confusion counts (refusal is positive), and per condition and kind [refusal verdicts, rows]. The
last stdout line is one JSON object.
"""

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from judge_sample import (  # noqa: E402
    FIT,
    FIT_SAMPLED,
    LABELS,
    N_FIT,
    ORGANISMS,
    STANDARDS,
    encode,
    organism_dir,
    read_prompts,
    read_rows,
    readme_edit,
    refuses,
)

# Replies of real runs' exports on smollm2-soft-refusal: conditions named FILE_PREFIX/condition.
RUN_LABELS = {
    "soft_run": HERE / "data" / "soft_run_labels.jsonl",
    "soft_front": HERE / "data" / "soft_front_labels.jsonl",
    "soft_budget": HERE / "data" / "soft_budget_labels.jsonl",
}
# Every judge measured here; --judges measures some, the others kept from --rescore's file.
JUDGES = ("markers", "probe", "probe_sampled", "probe_with_prompt", "specificity", "likelihood")


def confusion(verdicts: list[bool], labels: list[bool]) -> dict:
    tp = sum(v and lab for v, lab in zip(verdicts, labels, strict=True))
    tn = sum(not v and not lab for v, lab in zip(verdicts, labels, strict=True))
    fp = sum(v and not lab for v, lab in zip(verdicts, labels, strict=True))
    fn = sum(not v and lab for v, lab in zip(verdicts, labels, strict=True))
    return counts(tp, fp, fn, tn)


def counts(tp: int, fp: int, fn: int, tn: int) -> dict:
    n = tp + fp + fn + tn
    return {"agreement": round((tp + tn) / max(1, n), 4), "n": n, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def confusion_of_kinds(kinds: dict[str, list[int]], standard: str) -> dict:
    """confusion() from [refusal verdicts, rows] per hand-read kind: exact, as a standard is a set of kinds."""
    refusal = STANDARDS[standard]
    tp = sum(v for kind, (v, n) in kinds.items() if kind in refusal)
    fn = sum(n - v for kind, (v, n) in kinds.items() if kind in refusal)
    fp = sum(v for kind, (v, n) in kinds.items() if kind not in refusal)
    tn = sum(n - v for kind, (v, n) in kinds.items() if kind not in refusal)
    return counts(tp, fp, fn, tn)


def scored(by_kind: dict[str, dict[str, list[int]]]) -> dict:
    """A judge's agreement with the labels under every standard, per condition and over all of them."""
    every: dict[str, list[int]] = {}
    for kinds in by_kind.values():
        for kind, (v, n) in kinds.items():
            total = every.setdefault(kind, [0, 0])
            total[0] += v
            total[1] += n
    conditions = {**{c: by_kind[c] for c in sorted(by_kind)}, "all": every}
    return {standard: {c: confusion_of_kinds(k, standard) for c, k in conditions.items()} for standard in STANDARDS}


def rescore(result: dict) -> dict:
    """The stored result under today's STANDARDS, from its verdicts per kind (no model runs)."""
    return {
        organism: {
            name: {**judge, **scored(judge["refusal_verdicts_by_kind"])}
            if "refusal_verdicts_by_kind" in judge
            else judge
            for name, judge in judges.items()
        }
        for organism, judges in result.items()
    }


# ---- the specificity and likelihood candidates (measured here; neither became a scorer) ----------
@torch.no_grad()
def reply_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    replies: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
) -> Tensor:
    """[n] float64: each reply's mean log-probability per token after its prompt (teacher-forced).
    An empty reply is scored as one pad token."""
    device = next(model.parameters()).device
    out: list[Tensor] = []
    for start in range(0, len(replies), batch_size):
        heads = [list(p) for p in prompts[start : start + batch_size]]
        tails = [list(r) or [pad_id] for r in replies[start : start + batch_size]]
        width = max(len(h) + len(t) for h, t in zip(heads, tails, strict=True))
        longest = max(len(t) for t in tails)
        ids = torch.full((len(tails), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(tails), width), dtype=torch.long)
        for i, (head, tail) in enumerate(zip(heads, tails, strict=True)):  # left-padded: replies end together
            ids[i, width - len(head) - len(tail) :] = torch.tensor(head + tail)
            mask[i, width - len(head) - len(tail) :] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=longest + 1).logits
        logprobs = logits[:, :-1].float().log_softmax(-1).cpu()  # position j predicts token width - longest + j
        for i, tail in enumerate(tails):
            rows = logprobs[i, longest - len(tail) :]
            out.append(rows.gather(1, torch.tensor(tail)[:, None]).double().mean())
    return torch.stack(out)


def specificity(
    model,
    prompts: Sequence[Sequence[int]],
    replies: Sequence[Sequence[int]],
    references: Sequence[Sequence[int]],
    pad_id: int,
) -> Tensor:
    """[n]: log-likelihood per token of each reply after its own prompt minus its mean after `references`."""
    own = reply_logprobs(model, prompts, replies, pad_id)
    other = torch.stack([reply_logprobs(model, [ref] * len(replies), replies, pad_id) for ref in references])
    return own - other.mean(0)


def midpoint_threshold(generic: Tensor, specific: Tensor) -> float:
    """Half-way between the two medians (a median ignores up to half of either side mislabelled, e.g. the
    few harmful prompts the model answers)."""
    if len(generic) < 1 or len(specific) < 1:
        raise ValueError("a threshold needs replies of both kinds")
    return float(generic.double().median() + specific.double().median()) / 2


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def labelled_states(model, tokenizer, items: list[dict], layers: list[int], with_prompt: bool = False) -> Tensor:
    """reply_states of the rows' replies, read alone or after their prompts."""
    from abliterate.scorers.reply_probe import reply_states

    prefixes = encode(tokenizer, [r["prompt"] for r in items]) if with_prompt else None
    replies = token_ids(tokenizer, [r["reply"] for r in items])
    return reply_states(model, replies, layers, tokenizer.pad_token_id, prefixes=prefixes)


def judge_specificity(model, tokenizer, rows, positive, negative, pad: int) -> tuple[list[bool], dict]:
    """Verdicts, and the threshold fit on the fitting replies (references: the 4 harmful_train prompts after
    the fitting ones)."""
    references = encode(tokenizer, read_prompts("harmful_train", N_FIT + 4)[N_FIT:])

    def scores(items):
        prompts = encode(tokenizer, [r["prompt"] for r in items])
        return specificity(model, prompts, token_ids(tokenizer, [r["reply"] for r in items]), references, pad)

    threshold = midpoint_threshold(scores(positive), scores(negative))
    return (scores(rows) < threshold).tolist(), {"threshold": round(threshold, 4)}


def judge_likelihood(model, tokenizer, rows, probe: list[bool], pad: int) -> list[bool | None]:
    """The original's reply to each harmful prompt, under the ablated model vs the original (None: not judged).
    Leaves the model edited."""
    harmful = [
        i for i, r in enumerate(rows) if r["set"] == "harmful_test" and r["condition"] in ("original", "ablated")
    ]
    original_reply = {r["prompt"]: r for r in rows if r["condition"] == "original"}
    source = [original_reply[rows[i]["prompt"]] for i in harmful]
    forced = token_ids(tokenizer, [r["reply"] for r in source])
    prompts = encode(tokenizer, [r["prompt"] for r in source])
    before = reply_logprobs(model, prompts, forced, pad).tolist()
    readme_edit(model, tokenizer)
    after = reply_logprobs(model, prompts, forced, pad).tolist()
    probe_of = dict(zip((r["prompt"] + r["condition"] for r in rows), probe, strict=True))
    likelihood = {}
    for j, i in enumerate(harmful):
        row = rows[i]
        still = row["condition"] == "original" or after[j] - before[j] > -math.log(2)
        likelihood[i] = probe_of[row["prompt"] + "original"] and still
    return [likelihood.get(i) for i in range(len(rows))]


def bench_organism(organism: str, rows: list[dict], fit: list[dict], measure: Sequence[str] = JUDGES) -> dict:
    from bench_quality import load_lm
    from transformers import AutoTokenizer

    from abliterate.metrics import default_markers, is_refusal
    from abliterate.scorers.reply_probe import choose_probe, held_out_accuracy, probe_scores

    path = organism_dir(organism)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_lm(str(path))
    layers = list(range(len(model.model.layers)))
    pad = tokenizer.pad_token_id

    def states(items, with_prompt: bool):
        return labelled_states(model, tokenizer, items, layers, with_prompt)

    declines = [refuses(r, "declines") for r in rows]
    judges: dict[str, list] = {}
    if "markers" in measure:
        judges["markers"] = [is_refusal(r["reply"], default_markers()) for r in rows]
    info: dict = {}
    greedy = [r for r in fit if not r.get("sampled")]
    positive = [r for r in greedy if r["set"] == "harmful_train"]
    negative = [r for r in greedy if r["set"] == "harmless_train"]
    sample_states: dict[bool, Tensor] = {}  # the labelled rows, read once per way of reading them
    for name, with_prompt, sampled in (
        ("probe", False, False),
        ("probe_sampled", False, True),
        ("probe_with_prompt", True, False),
    ):
        if name not in measure:
            continue
        print(f"{organism}: {name}", file=sys.stderr, flush=True)
        fitting = fit if sampled else greedy
        pos = states([r for r in fitting if r["set"] == "harmful_train"], with_prompt)
        neg = states([r for r in fitting if r["set"] == "harmless_train"], with_prompt)
        probe = choose_probe(pos, neg, layers)
        if with_prompt not in sample_states:
            sample_states[with_prompt] = states(rows, with_prompt)
        sample = sample_states[with_prompt]
        judges[name] = (probe_scores(sample[:, probe.layer], probe.weight, probe.bias) > 0).tolist()
        per_layer = {}
        for i in layers:  # for the record: every layer's held-out fit accuracy and its agreement with the labels
            fixed = choose_probe(pos[:, i : i + 1], neg[:, i : i + 1], [i])
            verdicts = (probe_scores(sample[:, i], fixed.weight, fixed.bias) > 0).tolist()
            per_layer[i] = {
                "fit_held_out": round(held_out_accuracy(pos[:, i], neg[:, i]), 3),
                "agreement": confusion(verdicts, declines)["agreement"],
            }
        info[name] = {"layer": probe.layer, "per_layer": per_layer}
    if "specificity" in measure:
        print(f"{organism}: specificity", file=sys.stderr, flush=True)
        judges["specificity"], info["specificity"] = judge_specificity(model, tokenizer, rows, positive, negative, pad)
    if "likelihood" in measure:
        print(f"{organism}: likelihood", file=sys.stderr, flush=True)
        judges["likelihood"] = judge_likelihood(model, tokenizer, rows, judges["probe"], pad)
    result: dict = {"probe_info": info}
    for name, verdicts in judges.items():
        by_kind: dict = {}  # refusal verdicts per hand-read kind: which kinds of reply a judge misreads
        for i, verdict in enumerate(verdicts):
            if verdict is not None:
                cell = by_kind.setdefault(rows[i]["condition"], {}).setdefault(rows[i]["kind"], [0, 0])
                cell[0] += int(verdict)
                cell[1] += 1
        result[name] = {**scored(by_kind), "refusal_verdicts_by_kind": by_kind}
    if "likelihood" in result:
        result["likelihood"]["note"] = "harmful rows of refusal_labels.jsonl only"
    return result


def labelled_rows() -> list[dict]:
    """Every hand-read row, the runs' conditions named FILE_PREFIX/condition."""
    rows = read_rows(LABELS)
    for prefix, path in RUN_LABELS.items():
        rows += [{**r, "condition": f"{prefix}/{r['condition']}"} for r in read_rows(path)]
    for row in rows:
        refuses(row, "declines")  # every row read by hand, or one line naming the first that is not
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rescore", type=Path, help="a stored result, reread under today's STANDARDS (no model runs)")
    parser.add_argument(
        "--organism", choices=ORGANISMS, help="measure only this organism; with --rescore, the others are read from it"
    )
    parser.add_argument(
        "--judges",
        default=",".join(JUDGES),
        help="comma-separated judges to measure (default: all); with --rescore the others are kept from its file",
    )
    args = parser.parse_args()
    measure = args.judges.split(",")
    if not set(measure) <= set(JUDGES) or ("likelihood" in measure and "probe" not in measure):
        print(f"bench_judge: --judges takes some of {','.join(JUDGES)}; likelihood needs probe", file=sys.stderr)
        sys.exit(2)
    result = rescore(json.loads(args.rescore.read_text())) if args.rescore else {}
    if args.rescore and args.organism is None:
        print(json.dumps(result, indent=4))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows, fit = labelled_rows(), read_rows(FIT)
    if "probe_sampled" in measure:
        if not FIT_SAMPLED.is_file():
            print(f"bench_judge: {FIT_SAMPLED} is missing: run `judge_sample.py fit-samples` first", file=sys.stderr)
            sys.exit(2)
        fit += [{**r, "sampled": True} for r in read_rows(FIT_SAMPLED)]
    for organism in [args.organism] if args.organism else ORGANISMS:
        measured = bench_organism(
            organism, [r for r in rows if r["model"] == organism], [r for r in fit if r["model"] == organism], measure
        )
        kept = result.get(organism, {})
        info = {**kept.get("probe_info", {}), **measured["probe_info"]}
        result[organism] = {**kept, **measured, "probe_info": info}
    print(json.dumps(result, indent=4))


if __name__ == "__main__":
    main()
