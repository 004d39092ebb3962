"""Greedy 48-token replies of two models to one prompt file, for labelling by hand: one JSON line per
prompt, {"prompt", "before", "after"}. Made the rows of scripts/data/soft_run_labels.jsonl:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/replies_for_labels.py PROMPTS.txt ORIGINAL_DIR EXPORT_DIR OUT.jsonl

Each prompt is one user turn under the chat template's default system prompt; batches of 25, left-padded.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
prompts = open(sys.argv[1]).read().splitlines()
out = {p: {} for p in prompts}
for name, path in (("before", sys.argv[2]), ("after", sys.argv[3])):
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i in range(0, len(prompts), 25):
        chunk = prompts[i : i + 25]
        texts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in chunk
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
        for p, row in zip(chunk, gen[:, enc["input_ids"].shape[1] :], strict=True):
            out[p][name] = tok.decode(row, skip_special_tokens=True)
        print(name, i, file=sys.stderr, flush=True)
with open(sys.argv[4], "w") as f:
    for p in prompts:
        f.write(json.dumps({"prompt": p, **out[p]}) + "\n")
