"""GPU benchmark (issue #15), called by scripts/bench_gpu.sh. Prints one JSON object on stdout.

Per model shape (random weights, bf16: an 8B-shape Llama and an MoE shape; --smoke: tiny shapes,
fp32, CPU): residual collection (prompt tokens/s), the reference pass, s/trial at 100 + 100 eval
prompts and 32 new tokens (random weights never refuse, so every harmful row decodes to the end),
peak GPU memory; and greedy decoding of one eval batch in each mode, timed and checked against
plain eager attention in the same run:
  eager            HF generate, eager attention, dynamic KV cache: the reference for agreement
  sdpa             HF generate, SDPA attention, dynamic KV cache
  static           HF generate, SDPA, a static KV cache (compilation disabled)
  static_compiled  HF generate, SDPA, a static KV cache, torch.compile of the decode step (GPU only)
  drop_rows        decode.greedy_decode (the trial path), SDPA: finished rows leave the batch
Then contrastive PCA (k = 3) on synthetic residuals, 64 layers x 5120 at n = 400 per class.

The prompts are the tiny organism's templated requests (about 10 tokens each, word-level
tokenizer), so token rates are for short prompts. Steps left when --budget-s runs out are
reported as skipped rather than run, so the whole run ends in time.

    scripts/bench_gpu.sh            # on a GPU: within 8 minutes on an H100/H200
    scripts/bench_gpu.sh --smoke    # CPU, tiny shapes, < 60 s (CI)
"""

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

sys.path.insert(0, str(Path(__file__).parent))
from bench_directions import synthetic  # noqa: E402
from bench_trial import sample_plans  # noqa: E402

from abliterate.data import PromptDataModule, left_pad_collate  # noqa: E402
from abliterate.decode import greedy_decode  # noqa: E402
from abliterate.directions import contrastive_pca  # noqa: E402
from abliterate.metrics import _greedy_generate  # noqa: E402
from abliterate.module import AbliterationModule  # noqa: E402
from abliterate.options import EvalOptions, LoadOptions, SearchSpace  # noqa: E402
from abliterate.organism_data import build_tokenizer, organism_prompts  # noqa: E402
from abliterate.pipeline import Pipeline  # noqa: E402
from abliterate.prompts import PromptSource  # noqa: E402
from abliterate.trainer import AbliterationTrainer  # noqa: E402

SHAPES = {
    # Llama-3.1-8B
    "llama_8b": (
        LlamaConfig,
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32)
        | dict(num_key_value_heads=8, vocab_size=128256),
    ),
    # Qwen3-30B-A3B's layer (128 experts, 8 active, expert MLP 768), 16 of its 48 layers: 10 B parameters
    "moe_qwen3": (
        Qwen3MoeConfig,
        dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128)
        | dict(num_experts_per_tok=8, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=4)
        | dict(head_dim=128, vocab_size=151936),
    ),
}
SMOKE_SHAPES = {
    "llama_8b": (LlamaConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    "moe_qwen3": (
        Qwen3MoeConfig,
        dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
        | dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    ),
}
MODES = ("eager", "sdpa", "static", "static_compiled", "drop_rows")


def note(message: str) -> None:
    print(f"bench_gpu: {message}", file=sys.stderr, flush=True)


def failure(error: Exception) -> dict:
    """A step that failed: its traceback on stderr, one line in the JSON."""
    logging.getLogger("bench_gpu").exception("step failed")
    return {"error": f"{type(error).__name__}: {error}"[:500]}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    """The run's time budget: a step that would start after it is skipped."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def write_prompts(root: Path, residual: int, eval_n: int) -> dict[str, PromptSource]:
    """Residual and eval prompt files from the organism's templated requests (repeated as needed)."""
    sources = {}
    for kind in ("harmful", "harmless"):
        pool = organism_prompts(kind, "train") + organism_prompts(kind, "test")
        for role, n in ((kind, residual), (f"eval_{kind}", eval_n)):
            path = root / f"{role}.txt"
            path.write_text("\n".join(pool[i % len(pool)] for i in range(n)) + "\n")
            sources[role] = PromptSource(str(path))
    return sources


def build_model(shape: str, smoke: bool, tokenizer, dtype: torch.dtype, device: str):
    config_cls, kwargs = (SMOKE_SHAPES if smoke else SHAPES)[shape]
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    config = config_cls(**{"vocab_size": len(tokenizer)} | kwargs, **special, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: no stop but max_new_tokens, as in a worst case
    return model.eval()


def decode_modes(model, tokenizer, ids, mask, max_new_tokens: int, clock: Clock, gpu: bool) -> dict:
    """One batch greedily decoded in each mode: seconds (after a warm-up run) and agreement with eager."""
    out, reference = {}, None
    for mode in MODES:
        if mode == "static_compiled" and not gpu:
            out[mode] = {"skipped": "needs a GPU"}
            continue
        if clock.left() < 30:
            out[mode] = {"skipped": "time budget"}
            continue
        model.set_attn_implementation("eager" if mode == "eager" else "sdpa")

        def run(mode=mode):
            if mode == "drop_rows":
                return greedy_decode(model, ids, mask, max_new_tokens)
            extra = {}
            if mode.startswith("static"):
                extra = dict(cache_implementation="static", disable_compile=mode == "static")
            return _greedy_generate(model, ids, mask, max_new_tokens, tokenizer.pad_token_id, None, **extra).tolist()

        try:
            start = time.perf_counter()
            run()  # warm-up (for static_compiled: the compilation)
            sync()
            warm_s = time.perf_counter() - start
            start = time.perf_counter()
            tokens = run()
            sync()
            seconds = time.perf_counter() - start
        except Exception as error:  # one mode failing (a compiler, say) must not cost the others
            out[mode] = failure(error)
            continue
        if reference is None:
            reference = tokens
        same_rows = sum(a == b for a, b in zip(tokens, reference, strict=True))
        pairs = [(x, y) for a, b in zip(tokens, reference, strict=True) for x, y in zip(a, b, strict=False)]
        out[mode] = {
            "s": round(seconds, 4),
            "first_run_s": round(warm_s, 3),
            "new_tokens_per_s": round(len(ids) * max_new_tokens / seconds, 1),
            "rows_equal_to_eager": round(same_rows / len(ids), 3),
            "tokens_equal_to_eager": round(sum(x == y for x, y in pairs) / max(len(pairs), 1), 3),
        }
        note(f"  {mode}: {out[mode]}")
    model.set_attn_implementation("sdpa")
    return out


def bench_shape(shape: str, args, sources, tokenizer, clock: Clock) -> dict:
    gpu = args.device == "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = build_model(shape, args.smoke, tokenizer, dtype, args.device)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    note(f"{shape}: {params / 1e9:.2f} B parameters built in {build_s:.1f}s")
    module = AbliterationModule(
        model_id=shape,
        load=LoadOptions(dtypes=[str(dtype).removeprefix("torch.")]),
        evaluation=EvalOptions(max_new_tokens=args.max_new_tokens),
    )
    # Random weights in memory, nothing to load (as module._load: nn.Module would register the model).
    module.__dict__["_hf_model"], module._tokenizer = model, tokenizer
    data = PromptDataModule(**sources, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size)
    data.attach_tokenizer(tokenizer)
    accelerator = "gpu" if gpu else "cpu"
    trainer = AbliterationTrainer(accelerator=accelerator, devices=1, enable_progress_bar=False)
    pipe = Pipeline(trainer, module, data, None)
    row = {"parameters": params, "dtype": str(dtype), "build_s": round(build_s, 2)}

    start = time.perf_counter()
    pipe.residuals()
    sync()
    residual_s = time.perf_counter() - start
    tokens = sum(len(ids) for role in ("harmful", "harmless") for ids in data.dataset(role).input_ids)
    row |= {"residual_prompts": 2 * args.residual_prompts, "residual_s": round(residual_s, 3)}
    row["residual_tokens_per_s"] = round(tokens / residual_s, 1)
    row["mean_prompt_tokens"] = round(tokens / (2 * args.residual_prompts), 1)

    start = time.perf_counter()
    reference = pipe.reference()
    row["reference_s"] = round(time.perf_counter() - start, 3)
    seconds = []
    for plan in sample_plans(SearchSpace(), module.n_layers, args.trials, seed=0):
        if clock.left() < 60:
            break
        start = time.perf_counter()
        pipe.evaluate(plan, reference)
        sync()
        seconds.append(time.perf_counter() - start)
    row |= {"eval_prompts": f"{args.eval_prompts} + {args.eval_prompts}", "max_new_tokens": args.max_new_tokens}
    row |= {"trials": len(seconds), "s_per_trial": round(sum(seconds) / len(seconds), 3) if seconds else None}
    note(f"{shape}: {row}")

    harmful = data.dataset("eval_harmful")  # its first batch, as a trial generates it
    items = [harmful[i] for i in range(min(args.eval_batch_size, len(harmful)))]
    collated = left_pad_collate(tokenizer.pad_token_id, "eval_harmful")(items)
    ids, mask = collated["input_ids"].to(model.device), collated["attention_mask"].to(model.device)
    row["decode_batch"] = len(items)
    row["decode_modes"] = decode_modes(model, tokenizer, ids, mask, args.max_new_tokens, clock, gpu)
    row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None
    del pipe, module, model, trainer
    if gpu:
        torch.cuda.empty_cache()
    return row


def bench_pca(args) -> dict:
    layers, dim, n = (4, 64, 16) if args.smoke else (64, 5120, 400)
    bad, good = synthetic(n, layers, dim, device=args.device)
    contrastive_pca(bad[:, :1, :64], good[:, :1, :64], k=2)  # warm-up: kernels, library load
    sync()
    start = time.perf_counter()
    contrastive_pca(bad, good, k=3)
    sync()
    return {"layers": layers, "hidden": dim, "n_per_class": n, "k": 3, "s": round(time.perf_counter() - start, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, fp32 (CI)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--residual-prompts", type=int, default=400, help="per class")
    parser.add_argument("--eval-prompts", type=int, default=100, help="per class")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=50)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=420.0, help="steps that would start later are skipped")
    args = parser.parse_args()
    if args.smoke:
        args.residual_prompts, args.eval_prompts, args.max_new_tokens = 8, 4, 4
        args.batch_size, args.eval_batch_size, args.trials = 8, 4, 1
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    clock = Clock(args.budget_s)
    out = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "smoke": args.smoke,
        "torch": torch.__version__,
    }
    tokenizer = build_tokenizer(model_max_length=4096)
    with tempfile.TemporaryDirectory() as tmp:
        sources = write_prompts(Path(tmp), args.residual_prompts, args.eval_prompts)
        out["shapes"] = {}
        for shape in args.shapes:
            if clock.left() < 90:
                out["shapes"][shape] = {"skipped": "time budget"}
                continue
            try:
                out["shapes"][shape] = bench_shape(shape, args, sources, tokenizer, clock)
            except Exception as error:  # keep the other shape's figures from a lent GPU's one run
                out["shapes"][shape] = failure(error)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    try:
        out["contrastive_pca"] = bench_pca(args) if clock.left() > 20 else {"skipped": "time budget"}
    except Exception as error:
        out["contrastive_pca"] = failure(error)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    out["wall_s"] = round(time.perf_counter() - clock.start, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
