"""Plain vs projected refusal directions at fixed ablation kernels: refusals and first-token KL.

Both direction sets come from the same residuals (`compute_directions(..., projected=False/True)`);
each kernel is applied with `WeightEditor` and evaluated with the search's own metrics on the
first N harmful_test / harmless_test prompts. The kernels are trials of a plain-direction search
on the smollm2-refusal organism (the three per-layer ones and the selected global one).

    OMP_NUM_THREADS=1 python scripts/bench_projection.py --model /tmp/smollm2-refusal-merged

Prints one JSON object; `kl_ratio_plain_over_projected` compares the two in the same run.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

from abliterate.ablation import AblationParams, ComponentKernel, WeightEditor
from abliterate.directions import compute_directions
from abliterate.metrics import KLDivergence, default_markers, generate_responses, is_refusal, next_token_logprobs
from abliterate.models import decoder_layers, residual_writers
from abliterate.module import capture_prompt_end
from abliterate.prompts import format_chat

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# (name, direction_index or None for per-layer, attn kernel, mlp kernel): ComponentKernel arguments
# are (max_weight, max_weight_position, min_weight, min_weight_distance) in layers.
KERNELS = [
    ("trial0_per_layer", None, (1.222, 21.08, 0.518, 12.27), (1.106, 27.12, 1.066, 8.46)),
    ("trial3_per_layer", None, (0.813, 22.35, 0.498, 11.85), (1.461, 23.46, 0.525, 9.24)),
    ("trial5_per_layer", None, (0.913, 22.96, 0.231, 9.66), (0.971, 14.37, 0.107, 12.42)),
    ("trial14_global", 21.135, (1.180, 18.90, 0.487, 11.42), (1.179, 25.53, 0.610, 16.65)),
]


def read(name: str, limit: int | None = None) -> list[str]:
    lines = [line for line in (SHARED / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:limit] if limit else lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/smollm2-refusal-merged")
    parser.add_argument("--train", type=int, default=128, help="prompts per class for the directions")
    parser.add_argument("--eval", type=int, default=50, help="harmful and harmless eval prompts")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    def encode(prompts: list[str]):
        return tokenizer(format_chat(tokenizer, prompts), return_tensors="pt", padding=True, add_special_tokens=False)

    @torch.no_grad()
    def residuals(prompts: list[str]) -> torch.Tensor:
        rows = []
        for i in range(0, len(prompts), 32):
            batch = encode(prompts[i : i + 32])
            with capture_prompt_end(decoder_layers(model)) as captured:
                model(**batch, logits_to_keep=1)
            rows.append(torch.stack(captured, dim=1))
        return torch.cat(rows)

    harmful, harmless = (
        residuals(read("harmful_train.txt", args.train)),
        residuals(read("harmless_train.txt", args.train)),
    )
    directions = {p: compute_directions(harmful, harmless, projected=p) for p in (False, True)}
    print(f"residuals and directions in {time.perf_counter() - start:.0f}s", flush=True)

    editor = WeightEditor(residual_writers(model))
    bad, good = encode(read("harmful_test.txt", args.eval)), encode(read("harmless_test.txt", args.eval))
    markers = default_markers()
    with torch.no_grad():
        reference = next_token_logprobs(model, good.input_ids, good.attention_mask)

    @torch.no_grad()
    def evaluate(params: AblationParams, dirs: torch.Tensor) -> dict:
        with editor.applied(params, dirs):
            kl = KLDivergence()
            kl.update(next_token_logprobs(model, good.input_ids, good.attention_mask), reference)
            replies = generate_responses(
                model, tokenizer, bad.input_ids, bad.attention_mask, max_new_tokens=args.max_new_tokens, markers=markers
            )
        return {
            "refusal": sum(is_refusal(r, markers) for r in replies) / len(replies),
            "kl": round(kl.compute().item(), 4),
        }

    results = {}
    for name, index, attn, mlp in KERNELS:
        params_ = dict(components={"attn": ComponentKernel(*attn), "mlp": ComponentKernel(*mlp)}, direction_index=index)
        row = {}
        for projected in (False, True):
            t = time.perf_counter()
            row["projected" if projected else "plain"] = evaluate(AblationParams(**params_), directions[projected])
            print(f"{name} projected={projected}: {row} ({time.perf_counter() - t:.0f}s)", flush=True)
        row["kl_ratio_plain_over_projected"] = round(row["plain"]["kl"] / max(row["projected"]["kl"], 1e-9), 2)
        results[name] = row
    print(
        json.dumps(
            {
                "model": args.model,
                "train_prompts_per_class": args.train,
                "eval_prompts": args.eval,
                "kernels": results,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
