"""Big models: the size of an adapter export against a merged one, and the cost per trial of
ablating with forward hooks (`module.load.edit_mode hooks`, the path of 4-bit and disk-offloaded
models) against editing the weights in place. Prints one JSON line; progress goes to stderr.

(a) sizes, for every rank in --ranks (rank = directions ablated per writer):
  - tiny: the tiny organism exported by `Pipeline.export` with format `both`, every layer and both
    components ablated (rank 1: the mean difference; rank k: contrastive PCA with k directions).
    adapter bytes: `adapter/adapter_model.safetensors`; merged bytes: the `*.safetensors` beside it.
  - 7B: Llama-2-7B's shape (32 x 4096, MLP 11008, vocab 32000) built on the meta device, so nothing
    is allocated. merged bytes: the parameters x 2 (bf16, as save_pretrained writes them).
    The adapter is built by `adapters.build_adapter` on that skeleton: each writer's weight is read
    through an accelerate-style weights map (the route of a disk-offloaded model) that makes a random
    bf16 weight when asked, one writer at a time, so peak memory stays at a few hundred MB. Random
    orthonormal directions, every layer and both components ablated. It is saved with
    `LoraAdapter.save` (PEFT's file layout), and its keys and shapes are checked against the LoRA
    modules PEFT itself creates for that config on the skeleton.
(b) hooks vs weights: the same sampled plans (random trials of the default search space, no
  pruning) evaluated with `Pipeline.evaluate` on the same model with a `WeightEditor` and with a
  `HookEditor` (both built once, as a run builds its editor once), --repeats times each, alternating
  which goes first; a plan's time is the fastest of its repeats. On the tiny organism, and on a
  random Llama (--llama-*) when the prompt files are there (default ../shared/data). Reports s/trial
  for both, their ratio, the median time of apply + reset alone per plan (the edit's fixed cost per
  trial; the hooks' is registering them), and whether the replies and values agree.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/bench_adapter.py
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/bench_adapter.py --trials 10 --llama-trials 0   # tiny only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import optuna
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from abliterate.ablation import AblationParams, ComponentKernel, WeightEditor
from abliterate.adapters import ADAPTER_WEIGHTS, BaseWeights, build_adapter
from abliterate.data import PromptDataModule
from abliterate.editing import make_editor
from abliterate.hooks import HookEditor
from abliterate.models import residual_writers
from abliterate.module import AbliterationModule
from abliterate.options import DirectionOptions, EvalOptions, LoadOptions, SearchSpace
from abliterate.pipeline import Pipeline
from abliterate.plans import TrialPlan, sample_plan
from abliterate.prompts import PromptSource
from abliterate.trainer import AbliterationTrainer

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "vocab_size": 32000}
LLAMA2_7B |= {"num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False}
FILES = ("harmful_train.txt", "harmless_train.txt", "harmful_test.txt", "harmless_test.txt")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def full_ablation(n_layers: int) -> AblationParams:
    """Every layer, both components, weight 1: the largest adapter a plan can make."""
    kernel = ComponentKernel(max_weight=1.0, max_weight_position=0.0, min_weight=1.0, min_weight_distance=n_layers)
    return AblationParams(components={"attn": kernel, "mlp": kernel}, direction_index=None)


def direction_options(rank: int) -> DirectionOptions:
    return DirectionOptions() if rank == 1 else DirectionOptions(method="contrastive_pca", k=rank)


def files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


# ---- (a) sizes -------------------------------------------------------------------------------------


class RandomWeights:
    """An accelerate-style weights map whose tensors are made when read: a random bf16 weight of the
    writer's full shape, seeded by the writer, so that one writer's weight exists at a time."""

    def __init__(self, shape: tuple[int, ...], seed: int):
        self.shape, self.seed = shape, seed

    def __getitem__(self, name: str) -> torch.Tensor:
        if name != "weight":
            raise KeyError(name)
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)


def skeleton_7b() -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA2_7B, dtype=torch.bfloat16)).to(torch.bfloat16)


def random_directions(layers: int, k: int, hidden: int, seed: int = 1) -> torch.Tensor:
    """[layers, k, hidden] float32, orthonormal per layer."""
    q, _ = torch.linalg.qr(torch.randn(layers, hidden, k, generator=torch.Generator().manual_seed(seed)))
    return q.mT.contiguous()


def sizes_7b(rank: int, tmp: Path) -> dict:
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    model = skeleton_7b()
    merged_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # untied: every tensor saved
    writers = residual_writers(model)
    for layer, components in enumerate(writers):
        for c, component in enumerate(sorted(components)):
            for i, ref in enumerate(components[component]):
                seed = 1000 * layer + 10 * c + i
                ref.module._hf_hook = SimpleNamespace(weights_map=RandomWeights(tuple(ref.weight.shape), seed))
    layers, hidden = LLAMA2_7B["num_hidden_layers"], LLAMA2_7B["hidden_size"]
    start = time.perf_counter()
    adapter = build_adapter(
        writers,
        full_ablation(layers),
        random_directions(layers, rank, hidden),
        BaseWeights(model),
        None,
        "llama-2-7b-shape",
    )
    build_s = time.perf_counter() - start
    out = tmp / f"adapter-7b-r{rank}"
    adapter.save(out)
    adapter_bytes = (out / ADAPTER_WEIGHTS).stat().st_size

    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes that the skeleton has no name_or_path
        peft_model = get_peft_model(skeleton_7b(), adapter.config())
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    return {
        "rank": rank,
        "targets": len(adapter.targets),
        "adapter_bytes": adapter_bytes,
        "merged_bytes_bf16": merged_bytes,
        "merged_over_adapter": round(merged_bytes / adapter_bytes, 1),
        "adapter_build_s": round(build_s, 2),
        "matches_peft_layout": saved == expected,
        "peak_rss_mb": peak_rss_mb(),
    }


def sizes_tiny(pipe: Pipeline, organism: Path, rank: int, tmp: Path) -> dict:
    plan = TrialPlan(direction_options(rank), full_ablation(pipe.module.n_layers))
    target = tmp / f"tiny-r{rank}"
    pipe.export(plan, {"base_model": str(organism), "trial": 0}, target, False, "both")
    adapter_bytes = (target / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    merged_bytes = files_bytes(target)
    params_bytes = sum(p.numel() * p.element_size() for p in pipe.module.model.parameters())
    return {
        "rank": rank,
        "adapter_bytes": adapter_bytes,
        "merged_bytes": merged_bytes,
        "merged_over_adapter": round(merged_bytes / adapter_bytes, 1),
        # the 7B figure counts parameter bytes: on the real export that count is this close to the file
        "merged_file_over_parameter_bytes": round(merged_bytes / params_bytes, 4),
    }


# ---- (b) hooks vs weights --------------------------------------------------------------------------


def parts(model_dir: str, prompts: Path, limit: int | None, max_new_tokens: int, eval_batch_size: int):
    module = AbliterationModule(
        model_id=model_dir, load=LoadOptions(dtypes=["float32"]), evaluation=EvalOptions(max_new_tokens=max_new_tokens)
    )
    src = {f.removesuffix(".txt"): PromptSource(str(prompts / f), limit=limit) for f in FILES}
    data = PromptDataModule(
        harmful=src["harmful_train"],
        harmless=src["harmless_train"],
        eval_harmful=src["harmful_test"],
        eval_harmless=src["harmless_test"],
        batch_size=32,
        eval_batch_size=eval_batch_size,
    )
    trainer = AbliterationTrainer(accelerator="cpu", devices=1, enable_progress_bar=False)
    pipe = Pipeline(trainer, module, data, None)  # no run dir: nothing cached
    pipe.residuals()
    return pipe


def sampled_plans(n: int, n_layers: int, seed: int) -> list[TrialPlan]:
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed))
    return [sample_plan(study.ask(), SearchSpace(), n_layers) for _ in range(n)]


def hooks_vs_weights(pipe: Pipeline, trials: int, repeats: int, seed: int, label: str) -> dict:
    """Each plan `repeats` times per editor, alternating which goes first; a plan's time per editor is
    the fastest of its repeats (on a shared machine, the least disturbed one)."""
    module = pipe.module
    module.configure_model()
    editors = {"weights": make_editor(module.model, "weights"), "hooks": make_editor(module.model, "hooks")}
    assert isinstance(editors["weights"], WeightEditor) and isinstance(editors["hooks"], HookEditor)
    reference = pipe.reference()
    plans = sampled_plans(trials, module.n_layers, seed)
    for mode in editors:  # warm-up: the first predict of each kind pays one-off costs
        module.editor = editors[mode]
        pipe.evaluate(plans[0], reference)
    best: dict[str, list[float]] = {mode: [] for mode in editors}
    same_replies, value_diff = 0, 0.0
    for i, plan in enumerate(plans):
        seconds: dict[str, list[float]] = {mode: [] for mode in editors}
        results = {}
        for r in range(repeats):
            order = ("weights", "hooks") if (i + r) % 2 == 0 else ("hooks", "weights")
            for mode in order:
                module.editor = editors[mode]
                start = time.perf_counter()
                results[mode] = pipe.evaluate(plan, reference)
                seconds[mode].append(time.perf_counter() - start)
        for mode in editors:
            best[mode].append(min(seconds[mode]))
        same_replies += results["hooks"].responses == results["weights"].responses
        value_diff = max(
            value_diff, *(abs(results["hooks"].values[k] - v) for k, v in results["weights"].values.items())
        )
        say(f"{label} plan {i + 1}/{trials}: weights {best['weights'][-1]:.3f}s, hooks {best['hooks'][-1]:.3f}s")
    module.editor = None
    setup: dict[str, list[float]] = {mode: [] for mode in editors}  # apply + reset alone, per plan
    with torch.no_grad():
        for plan in plans:
            directions = module.directions_for(plan.directions)
            for mode, editor in editors.items():
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    editor.apply(plan.ablation, directions)
                    editor.reset()
                    times.append(time.perf_counter() - start)
                setup[mode].append(min(times))
    per_trial = {mode: sum(s) / trials for mode, s in best.items()}
    return {
        "trials": trials,
        "repeats": repeats,
        "eval_prompts": len(pipe.datamodule.dataset("eval_harmful")) + len(pipe.datamodule.dataset("eval_harmless")),
        "max_new_tokens": module.eval_options.max_new_tokens,
        "weights_s_per_trial": round(per_trial["weights"], 4),
        "hooks_s_per_trial": round(per_trial["hooks"], 4),
        "ratio_hooks_over_weights": round(per_trial["hooks"] / per_trial["weights"], 3),
        "median_plan_ratio": round(
            statistics.median(h / w for h, w in zip(best["hooks"], best["weights"], strict=True)), 3
        ),
        "weights_apply_reset_s": round(statistics.median(setup["weights"]), 4),
        "hooks_apply_reset_s": round(statistics.median(setup["hooks"]), 4),
        "replies_identical": f"{same_replies}/{trials}",
        "max_abs_value_diff": float(f"{value_diff:.3g}"),
    }


def random_llama(prompts: Path, out: Path, args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_throughput import build_model

    shape = SimpleNamespace(
        layers=args.llama_layers,
        hidden=args.llama_hidden,
        intermediate=args.llama_intermediate,
        heads=args.llama_hidden // 64,
        kv_heads=args.llama_hidden // 64,
        vocab=args.llama_vocab,
    )
    build_model(prompts, out, shape)


def main() -> None:
    default_prompts = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 3], help="directions per writer for the sizes")
    parser.add_argument("--trials", type=int, default=20, help="plans timed both ways on the tiny organism")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each plan per editor; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", default=str(default_prompts), help="prompt files for the random Llama")
    parser.add_argument(
        "--llama-trials", type=int, default=4, help="plans timed both ways on the random Llama (0: skip)"
    )
    parser.add_argument("--llama-layers", type=int, default=8)
    parser.add_argument("--llama-hidden", type=int, default=1024)
    parser.add_argument("--llama-intermediate", type=int, default=2816)
    parser.add_argument("--llama-vocab", type=int, default=16000)
    parser.add_argument("--llama-limit", type=int, default=16, help="prompts per file for the random Llama")
    parser.add_argument("--llama-max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("abliterate").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result: dict = {"threads": threads, "rss_after_imports_mb": peak_rss_mb()}

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # first, so that peak_rss_mb is this part's peak
        result["sizes_7b"] = []
        for rank in args.ranks:
            say(f"7B shape: building the rank-{rank} adapter, one random writer at a time")
            result["sizes_7b"].append(sizes_7b(rank, tmp))

        from abliterate.demo import default_cache_dir
        from abliterate.organism import build_tiny_organism

        organism = build_tiny_organism(default_cache_dir() / "organism", progress=False)
        tiny = parts(str(organism), organism, None, max_new_tokens=12, eval_batch_size=8)
        say("tiny organism: exports")
        result["sizes_tiny"] = [sizes_tiny(tiny, organism, rank, tmp) for rank in args.ranks]
        row = hooks_vs_weights(tiny, args.trials, args.repeats, args.seed, "tiny")
        result["hooks_vs_weights"] = {"tiny": {"model": "tiny organism 2x64, fp32", **row}}

        prompts = Path(args.prompts)
        if args.llama_trials > 0 and all((prompts / f).is_file() for f in FILES):
            model_dir = tmp / "llama"
            random_llama(prompts, model_dir, args)
            pipe = parts(str(model_dir), prompts, args.llama_limit, args.llama_max_new_tokens, eval_batch_size=16)
            size = f"{files_bytes(model_dir) / 2**20:.0f} MB fp32"
            model = f"llama {args.llama_layers}x{args.llama_hidden}, MLP {args.llama_intermediate}, random, {size}"
            row = hooks_vs_weights(pipe, args.llama_trials, args.repeats, args.seed, "llama")
            result["hooks_vs_weights"]["random_llama"] = {"model": model, **row}
        elif args.llama_trials > 0:
            say(f"no prompt files in {prompts}: the random Llama is skipped")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
