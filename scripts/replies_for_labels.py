"""Greedy 48-token replies of two models to one prompt file, for labelling by hand: one JSON line per
prompt, {"prompt", "before", "after"}, made as judge_sample.py makes its rows (`judge_sample.replies`:
the chat template's default system prompt, greedy, cut at eos). Made the rows of
scripts/data/soft_run_labels.jsonl:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/replies_for_labels.py PROMPTS.txt ORIGINAL_DIR EXPORT_DIR OUT.jsonl

With --no-original only the export's replies are made ({"prompt", "after"}), as for the three trials of
scripts/data/soft_front_labels.jsonl, whose original is already in soft_run_labels.jsonl.

The last stdout line is {"replies": N, "loops": {"before": n, "after": n}}: how many replies loop (some 4-token
sequence occurs 3 times, `abliterate.scorers.degeneration.loops`, on each reply's text tokenised again), the count
docs/benchmarks.md reports beside the hand-read deflections.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_sample import replies  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", type=Path, help="one prompt per line")
    parser.add_argument("original", help="model dir of the original")
    parser.add_argument("export", help="model dir of the abliterated export")
    parser.add_argument("out", type=Path, help="JSON lines to write")
    parser.add_argument("--no-original", action="store_true", help="skip the original's replies")
    args = parser.parse_args()
    models = [("after", args.export)] if args.no_original else [("before", args.original), ("after", args.export)]
    bad = [f"{args.prompts} is not a file"] if not args.prompts.is_file() else []
    bad += [f"{path} is not a model dir" for _, path in models if not Path(path, "config.json").is_file()]
    if bad:  # one line, exit 2, nothing written
        print(f"replies_for_labels: {'; '.join(bad)}: pass a prompt file and saved model dirs", file=sys.stderr)
        sys.exit(2)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abliterate.scorers.degeneration import loops

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    prompts = [line for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    columns, looping = {}, {}
    for name, path in models:
        print(f"{name}: {path}", file=sys.stderr, flush=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        columns[name] = replies(model, tokenizer, prompts)
        looping[name] = sum(loops(tokenizer(reply, add_special_tokens=False)["input_ids"]) for reply in columns[name])
    with args.out.open("w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            f.write(json.dumps({"prompt": prompt, **{name: column[i] for name, column in columns.items()}}) + "\n")
    print(json.dumps({"replies": len(prompts), "loops": looping}))


if __name__ == "__main__":
    main()
