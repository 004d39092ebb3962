"""Throughput of the pipeline: residual collection (prompt tokens/s) and seconds per trial.

Builds a randomly initialised Llama of SmolLM2-135M's shape (or --layers/--hidden/...), with a
word-level tokenizer made from the prompt files and a chat template, so it runs with no hub
access. Random weights never emit a refusal marker, so every trial generates the full
--max-new-tokens for every harmful prompt: the worst case for s/trial. Prints one JSON line.

    python scripts/bench_throughput.py --prompts ../shared/data --accelerator gpu
    OMP_NUM_THREADS=1 python scripts/bench_throughput.py --prompts ../shared/data --accelerator cpu --layers 4 --limit 64
"""

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import optuna
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from abliterate.data import PromptDataModule
from abliterate.module import AbliterationModule
from abliterate.options import EvalOptions, LoadOptions, SearchSpace, StudyOptions
from abliterate.pipeline import Pipeline
from abliterate.prompts import PromptSource
from abliterate.scorers import KL, MarkerRefusals
from abliterate.study import make_study
from abliterate.trainer import AbliterationTrainer

FILES = ("harmful_train.txt", "harmless_train.txt", "harmful_test.txt", "harmless_test.txt")
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} <end> "
    "{% else %}{{ m['content'] }} <end> {% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def build_model(prompts: Path, out: Path, args) -> None:
    words = sorted({w for f in FILES for w in re.findall(r"\w+|[^\w\s]", (prompts / f).read_text().lower())})
    special = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>", "<end>"]
    vocab = {w: i for i, w in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = TEMPLATE
    config = LlamaConfig(
        vocab_size=max(args.vocab, len(vocab)),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, help="dir with harmful/harmless _train/_test.txt")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--limit", type=int, default=None, help="prompts per file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument(
        "--kl-tokens",
        type=int,
        nargs="+",
        default=[EvalOptions.kl_tokens],
        help="KL positions of the search objective; several values are timed in the same run, with ratios",
    )
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(Path(args.prompts), model_dir, args)
        module = AbliterationModule(
            model_id=str(model_dir),
            load=LoadOptions(dtypes=[args.dtype, "float32"]),
            evaluation=EvalOptions(max_new_tokens=args.max_new_tokens),
        )
        src = {f.removesuffix(".txt"): PromptSource(str(Path(args.prompts) / f), limit=args.limit) for f in FILES}
        data = PromptDataModule(
            harmful=src["harmful_train"],
            harmless=src["harmless_train"],
            eval_harmful=src["harmful_test"],
            eval_harmless=src["harmless_test"],
            batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size,
        )
        trainer = AbliterationTrainer(accelerator=args.accelerator, devices=args.devices, enable_progress_bar=False)
        data.attach_tokenizer(module.tokenizer)
        module.configure_model()  # load (and place) before timing
        if torch.cuda.is_available() and args.accelerator in ("gpu", "cuda", "auto"):
            module.model.to("cuda")

        start = time.perf_counter()
        Pipeline(trainer, module, data, None).residuals()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        residual_s = time.perf_counter() - start
        tokens = sum(
            len(data.dataset(r).input_ids[i]) for r in ("harmful", "harmless") for i in range(len(data.dataset(r)))
        )
        per_kl = {}
        for kl_tokens in args.kl_tokens:
            module.eval_options = EvalOptions(max_new_tokens=args.max_new_tokens, kl_tokens=kl_tokens)
            module.scorers = torch.nn.ModuleList([MarkerRefusals(), KL(kl_tokens)])
            pipe = Pipeline(trainer, module, data, None)
            start = time.perf_counter()
            reference = pipe.reference()
            baseline_s = time.perf_counter() - start
            options = StudyOptions(n_trials=args.trials, n_startup_trials=args.trials, prune=False)
            study = make_study(options, optuna.storages.InMemoryStorage(), pipe.objectives)  # same seed: same trials
            start = time.perf_counter()
            pipe.search(study, options, SearchSpace(), reference)
            per_kl[kl_tokens] = {
                "baseline_s": round(baseline_s, 3),
                "seconds_per_trial": round((time.perf_counter() - start) / args.trials, 3),
                "reference_mb": round(reference.tensors["kl.logprobs"].numel() * 4 / 2**20, 1),
            }
        first = per_kl[args.kl_tokens[0]]["seconds_per_trial"]
        for row in per_kl.values():
            row["seconds_per_trial_ratio"] = round(row["seconds_per_trial"] / first, 3)

    if trainer.is_global_zero:
        print(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name() if module.model.device.type == "cuda" else "cpu",
                    "devices": args.devices,
                    "dtype": str(module.model.dtype),
                    "model": f"llama {args.layers}x{args.hidden}, vocab {args.vocab} (random weights)",
                    "residual_prompts": len(data.dataset("harmful")) + len(data.dataset("harmless")),
                    "residual_tokens_per_s": round(tokens / residual_s, 1),
                    "residual_s": round(residual_s, 3),
                    "eval_prompts": len(data.dataset("eval_harmful")) + len(data.dataset("eval_harmless")),
                    "max_new_tokens": args.max_new_tokens,
                    "seconds_per_trial": per_kl[args.kl_tokens[0]]["seconds_per_trial"],
                    "kl_tokens": per_kl,
                }
            )
        )


if __name__ == "__main__":
    main()
