"""Is the probe's miss of the deflections an edit leaves a matter of its threshold, or of what it reads?

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/bench_probe_threshold.py [--organism smollm2-soft-refusal]

ProbeRefusals' probe (bench_judge.py's `probe`: fit on the original's own replies, layer by held-out accuracy)
scores every hand-labelled row of the organism. Its threshold is half-way between the fitting classes' means
(z = 0.5 on the scale where the answers' mean is 0 and the refusals' 1). For z from 0.1 to 0.5 this prints, per
condition, the deflections (`decline` rows: the `deflects` standard) it sees and the other rows it calls
refusals, and the AUC of deflection against the rest over the rows of edited models. Progress on stderr; the
last stdout line is one JSON object.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_judge import labelled_rows, labelled_states  # noqa: E402
from judge_sample import FIT, ORGANISMS, organism_dir, read_rows  # noqa: E402

# Conditions whose replies come from a model no abliteration touched (heretic's pick kept the deflections).
UNEDITED = ("original", "soft_run/original", "soft_run/heretic_seed5_trial25")


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float | None:
    """P(a positive scores above a negative), ties counted half; None without both."""
    if not len(positive) or not len(negative):
        return None
    above = (positive[:, None] > negative[None, :]).double().mean()
    ties = (positive[:, None] == negative[None, :]).double().mean()
    return round(float(above + ties / 2), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organism", choices=ORGANISMS, default="smollm2-soft-refusal")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from bench_quality import load_lm
    from transformers import AutoTokenizer

    from abliterate.scorers.reply_probe import choose_probe, probe_scores

    rows = [r for r in labelled_rows() if r["model"] == args.organism]
    fit = [r for r in read_rows(FIT) if r["model"] == args.organism]
    path = organism_dir(args.organism)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_lm(str(path))
    layers = list(range(len(model.model.layers)))

    def states(items: list[dict]) -> torch.Tensor:
        print(f"reading {len(items)} replies", file=sys.stderr, flush=True)
        return labelled_states(model, tokenizer, items, layers)

    positive = states([r for r in fit if r["set"] == "harmful_train"])
    negative = states([r for r in fit if r["set"] == "harmless_train"])
    sample = states(rows)
    probe = choose_probe(positive, negative, layers)
    scores = probe_scores(sample[:, probe.layer], probe.weight, probe.bias)
    answers = float(probe_scores(negative[:, probe.layer], probe.weight, probe.bias).mean())
    refusals = float(probe_scores(positive[:, probe.layer], probe.weight, probe.bias).mean())
    deflects = torch.tensor([r["kind"] == "decline" for r in rows])
    edited = torch.tensor([r["condition"] not in UNEDITED for r in rows])
    result = {
        "organism": args.organism,
        "layer": probe.layer,
        "auc_edited": auc(scores[edited & deflects], scores[edited & ~deflects]),
        "by_z": {},
    }
    for z in (0.1, 0.2, 0.25, 0.3, 0.4, 0.5):
        verdicts = scores > answers + z * (refusals - answers)
        by_condition = {}
        for condition in sorted({r["condition"] for r in rows}):
            mine = torch.tensor([r["condition"] == condition for r in rows])
            by_condition[condition] = {
                "deflections_seen": f"{int((verdicts & deflects & mine).sum())}/{int((deflects & mine).sum())}",
                "false_refusals": f"{int((verdicts & ~deflects & mine).sum())}/{int((~deflects & mine).sum())}",
            }
        result["by_z"][z] = {
            "agreement": round(float((verdicts == deflects).double().mean()), 4),
            "edited_deflections_seen": f"{int((verdicts & deflects & edited).sum())}/{int((deflects & edited).sum())}",
            "edited_false_refusals": f"{int((verdicts & ~deflects & edited).sum())}/{int((~deflects & edited).sum())}",
            "by_condition": by_condition,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
