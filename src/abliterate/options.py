"""Option groups shared by the module, the search and the CLI.

Every field has a docstring: LightningCLI turns them into `--help` and `--print_config`.
"""

import logging
from dataclasses import dataclass, field
from typing import Literal

from abliterate.errors import AbliterateError

DEFAULT_THINK_TAGS: list[list[str]] = [
    ["<think>", "</think>"],
    [
        "<|channel|>analysis<|message|>",
        "<|channel|>final<|message|>",
        "<|end|><|start|>assistant<|channel|>final<|message|>",
    ],
    ["<seed:think>", "</seed:think>"],
    ["[THINK]", "[/THINK]"],
    ["\u25c1think\u25b7", "\u25c1/think\u25b7"],
]
"""Thinking block tags (`EvalOptions.think_tags`): [open, close] or [open, close, text appended to close a
thought cut at the budget] (gpt-oss ends its analysis channel with <|end|> and starts the final one)."""


# accelerate's placement strategies (a device name, like cuda:0, puts the whole model there).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class LoadOptions:
    """How the model is loaded."""

    dtypes: list[str] = field(default_factory=lambda: ["auto", "bfloat16", "float16", "float32"])
    """dtypes to try in order; the next is tried only when one is unsupported."""
    device_map: str | None = None
    """accelerate placement, e.g. "auto" to spread a model too big for one device."""
    revision: str | None = None
    """hub revision (branch, tag or commit)."""
    trust_remote_code: bool = False
    """allow the model repo's own code to run; only when you trust it."""
    gguf_file: str | None = None
    """a GGUF file name inside the model dir (weights are dequantised on load)."""
    load_in_4bit: bool = False
    """bitsandbytes 4-bit loading (CUDA only)."""
    edit_mode: Literal["auto", "weights", "hooks"] = "auto"
    """how trials apply the ablation: weights (edit in place, then restore), hooks (project the writers'
    outputs; for 4-bit or disk-offloaded writers), auto (weights unless a writer cannot be edited)."""

    def __post_init__(self) -> None:
        import torch

        if not isinstance(self.device_map, str) or self.device_map in DEVICE_MAPS:  # a dict: accelerate's own map
            return
        try:
            torch.device(self.device_map)
        except (RuntimeError, ValueError):
            raise AbliterateError(
                f"module.load.device_map={self.device_map!r}: use {', '.join(DEVICE_MAPS)} or a device like cuda:0"
            ) from None


@dataclass
class DirectionOptions:
    """How refusal directions are computed from residuals."""

    method: Literal["mean_diff", "contrastive_pca"] = "mean_diff"
    """mean difference of harmful and harmless residuals, or contrastive PCA around it."""
    k: int = 1
    """directions per layer (contrastive_pca only; 1 means the mean difference)."""
    alpha: float = 1.0
    """contrastive PCA weight of the harmless covariance: C = S_harmful - alpha * S_harmless."""
    projected: bool = True
    """make the mean difference orthogonal to the harmless mean first (keeps the part every prompt shares)."""
    winsorize: float = 0.995
    """clamp each layer's residual coordinates at this quantile of their magnitudes (both classes pooled)
    before the means, so a few massive activations cannot dominate them; 1 leaves them as they are. 0.995
    lowered the picks' 16-token KL on every seed of docs/benchmarks.md's lever table."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise AbliterateError(f"direction.k={self.k}: use 1 or more directions per layer")
        if not 0.0 < self.winsorize <= 1.0:
            raise AbliterateError(f"direction.winsorize={self.winsorize}: give a quantile in (0, 1], 1 for off")


@dataclass
class EvalOptions:
    """How refusals and KL divergence are measured."""

    markers: list[str] | None = None
    """refusal marker substrings; None uses the packaged list."""
    max_new_tokens: int = 32
    """greedy tokens generated per harmful prompt (a sequence stops early on a marker)."""
    kl_tokens: int = 16
    """KL divergence averaged over the first n reply tokens, teacher-forced on the original's greedy reply
    (1: first token only, as heretic). n > 1 also sees replies that drift after a good first token; the
    cached reference holds n x vocab floats per harmless prompt."""
    thinking: bool | None = None
    """reasoning models. None (default, auto): a chat template that mentions `enable_thinking` or a tag of
    think_tags is a thinking model's, and is scored as it is used: it thinks (up to think_tokens), then
    answers; refusals are judged on the answer (max_new_tokens after the thought), KL on the first kl_tokens
    answer tokens after the original's thought. Judged from the first token, a thinking model's replies are
    thoughts: markers in a deliberation read as refusals, and a refusal after a long thought is never reached.
    True: score so even where the template is not recognised. False: judge replies from their first token
    (the only way before; and what the auto mode amounts to for non-thinking templates). To abliterate the
    no-thinking mode instead, pass --data.enable_thinking false where the template has the switch: the
    template then closes an empty block and replies are judged whole."""
    think_tokens: int = 128
    """thinking budget: greedy tokens a thought may take before its close tag is appended and the answer
    generated (budget forcing). Refusals are usually decided early in a thought; each trial generates up to
    think_tokens + max_new_tokens per harmful prompt, so raise it only for models that need it."""
    think_tags: list[list[str]] = field(default_factory=lambda: [list(t) for t in DEFAULT_THINK_TAGS])
    """thinking block tags, first match in the chat template wins: [open, close] or [open, close, text
    appended to close a thought at the budget]. Default: <think>, gpt-oss channels, <seed:think>, [THINK], ◁think▷."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.kl_tokens < 1:
            raise AbliterateError("evaluation.max_new_tokens and evaluation.kl_tokens must be >= 1")
        if self.think_tokens < 1:
            raise AbliterateError("evaluation.think_tokens must be >= 1")
        for tags in self.think_tags:
            if len(tags) not in (2, 3) or not all(tags):
                raise AbliterateError(
                    f"evaluation.think_tags entry {tags!r}: give [open, close] or [open, close, forced close], non-empty"
                )
        if self.kl_tokens > self.max_new_tokens:
            # Not an error (KL is teacher-forced on the original's reply), but its values are not
            # comparable with a run that scores fewer positions: say so once.
            logging.getLogger("abliterate.options").warning(
                "evaluation.kl_tokens=%d averages KL over more reply tokens than the %d generated for refusals; "
                "KL values are only comparable between runs with the same kl_tokens",
                self.kl_tokens,
                self.max_new_tokens,
            )


def check_range(name: str, bounds: tuple[float, float] | list[float], low: float, high: float) -> tuple[float, float]:
    """Validate a [lo, hi] search range inside [low, high]."""
    if len(bounds) != 2:
        raise AbliterateError(f"search space {name} must be [low, high], got {bounds}")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not (low <= lo <= hi <= high):
        raise AbliterateError(f"search space {name}={[lo, hi]} is invalid: need {low} <= low <= high <= {high}")
    return lo, hi


@dataclass
class SearchSpace:
    """Ranges Optuna searches. Layer positions are fractions of depth (0 = first layer, 1 = last)."""

    direction_scope: list[Literal["global", "per_layer"]] = field(default_factory=lambda: ["per_layer"])
    """per_layer: each layer its own direction; global: one interpolated at direction_index for all layers (out of
    the default space: on smollm2-refusal it spent trials and lost on KL, docs/benchmarks.md)."""
    direction_index: tuple[float, float] = (0.2, 0.9)
    """where the global direction is taken, as a fraction of depth."""
    max_weight: tuple[float, float] = (0.8, 1.5)
    """peak ablation weight per component."""
    max_weight_position: tuple[float, float] = (0.4, 1.0)
    """layer of the peak weight, as a fraction of depth."""
    min_weight: tuple[float, float] = (0.0, 1.0)
    """weight at the kernel's edge, as a fraction of the peak weight."""
    min_weight_distance: tuple[float, float] = (0.1, 0.6)
    """kernel half-width, as a fraction of depth (at least one layer)."""
    components: list[Literal["attn", "mlp"]] = field(default_factory=lambda: ["attn", "mlp"])
    """residual writers to ablate: attention out-projections and MLP down-projections."""
    direction_methods: list[Literal["mean_diff", "contrastive_pca"]] = field(default_factory=lambda: ["mean_diff"])
    """direction methods to choose from; add contrastive_pca to search k, alpha and decay."""
    projected: list[bool] = field(default_factory=lambda: [True])
    """choices for making directions orthogonal to the harmless mean (see docs/benchmarks.md for why True)."""
    k: tuple[int, int] = (2, 4)
    """contrastive PCA directions per layer."""
    alpha: tuple[float, float] = (0.0, 2.0)
    """contrastive PCA harmless-covariance weight."""
    direction_decay: tuple[float, float] = (0.0, 1.0)
    """weight of direction j is decay**j times the kernel weight."""
    norm_preserving: list[bool] = field(default_factory=lambda: [False])
    """choices for rescaling each weight column back to its original norm."""
    winsorize: list[float] = field(default_factory=lambda: [DirectionOptions.winsorize])
    """choices for direction.winsorize (residual clamping quantile; 1 is off), e.g. [0.995, 1.0]."""

    def __post_init__(self) -> None:
        check_range("direction_index", self.direction_index, 0.0, 1.0)
        check_range("max_weight", self.max_weight, 0.0, 10.0)
        check_range("max_weight_position", self.max_weight_position, 0.0, 1.0)
        check_range("min_weight", self.min_weight, 0.0, 1.0)
        check_range("min_weight_distance", self.min_weight_distance, 0.0, 1.0)
        check_range("alpha", self.alpha, 0.0, 100.0)
        check_range("direction_decay", self.direction_decay, 0.0, 1.0)
        check_range("k", self.k, 1, 64)
        for name in ("direction_scope", "components", "direction_methods", "projected", "norm_preserving", "winsorize"):
            if not getattr(self, name):
                raise AbliterateError(f"search space {name} must list at least one choice")
        for quantile in self.winsorize:
            if not 0.0 < quantile <= 1.0:
                raise AbliterateError(f"search space winsorize={self.winsorize}: give quantiles in (0, 1], 1 for off")


@dataclass
class StudyOptions:
    """How the Optuna search runs and which trial is picked."""

    n_trials: int = 100
    """total trials in the study (a resumed study counts the trials it already has)."""
    n_startup_trials: int = 20
    """random trials before TPE takes over."""
    seed: int = 0
    """sampler seed."""
    storage: str | None = None
    """Optuna storage URL; default: SQLite file study.db in the output dir."""
    study_name: str = "abliterate"
    """study name inside the storage."""
    prune: bool = True
    """stop a trial early once its (KL, refusals so far) is dominated by a completed trial."""
    refusal_target: float = 0.0
    """min_kl_under picks the lowest KL among trials with refusal rate at or below this, on the search's
    prompts (of prompts the search never saw, HarmBench and JBB, picks at 0 refused 0.01-0.025 and picks at
    0.02 about 0.02-0.04: docs/benchmarks.md)."""
    steer_to_target: bool = True
    """tell the sampler that trials above refusal_target + steer_margin are infeasible (an Optuna constraint),
    so TPE refines the low-KL trials under the target instead of the low-KL trials that do nothing."""
    steer_margin: float = 0.02
    """how far above refusal_target a trial still counts as feasible to the sampler (at a target of 0, a
    bound of exactly 0 left TPE few feasible trials to learn from, and its picks cost more KL), and where
    the pick looks when no trial reaches the target, before it falls back to the fewest refusals."""
    select: str = "min_kl_under"
    """trial selection: min_kl_under, knee, or a trial number."""
    max_kl: float | None = None
    """a damage budget: min_kl_under and knee pick only among trials whose KL objective is at most this; where
    none of them reaches refusal_target, min_kl_under takes the lowest KL at refusal_target + steer_margin, else
    the fewest refusals, with a warning. The search is unchanged, so changing it on a finished run only re-picks."""
    validation_candidates: int = 4
    """with data.validation_harmful set, min_kl_under re-scores up to this many of its lowest-KL candidates
    (trials at or under refusal_target) on those prompts, and picks the first that refuses at most
    refusal_target + validation_tolerance of them (else the fewest refusals over both prompt sets)."""
    validation_tolerance: float = 0.01
    """how many more of the validation prompts than refusal_target a candidate may refuse: one in 100 is
    sampling noise, and rejecting on it cost KL for no fewer refusals elsewhere (docs/benchmarks.md)."""
    workers: int = 1
    """trial worker processes sharing the storage (one per device when >1 GPU)."""
    report_scorers: Literal["export", "completed"] = "export"
    """when the reported (not optimised) scorers, Degeneration by default, run: export: once, for the
    exported trial (its card and the run's summary); completed: on every completed trial too (a
    trials.csv column), which made smollm2-refusal's completed trials about a third slower."""
    stale_after: float = 900.0
    """with a shared --study.storage: seconds without progress (a batch) after which another node's
    RUNNING trial counts as abandoned (its node died) and is failed, so the study still reaches n_trials."""

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise AbliterateError("study.n_trials must be >= 1")
        if not 0.0 <= self.refusal_target <= 1.0:
            raise AbliterateError("study.refusal_target must be a fraction in [0, 1]")
        if not 0.0 <= self.steer_margin <= 1.0:
            raise AbliterateError("study.steer_margin must be a fraction in [0, 1]")
        if self.workers < 1:
            raise AbliterateError(f"study.workers={self.workers}: use 1 for one process, or more for parallel workers")
        if self.n_startup_trials < 0:
            raise AbliterateError("study.n_startup_trials must be >= 0")
        if not 0 <= self.seed < 2**32:  # the sampler's numpy generator takes no other seed
            raise AbliterateError(f"study.seed={self.seed}: use a seed from 0 to 2**32 - 1")
        if self.validation_candidates < 1:
            raise AbliterateError("study.validation_candidates must be >= 1")
        if not 0.0 <= self.validation_tolerance <= 1.0:
            raise AbliterateError("study.validation_tolerance must be a fraction in [0, 1]")
        if self.max_kl is not None and not self.max_kl > 0:
            raise AbliterateError(f"study.max_kl={self.max_kl}: use a KL budget above 0, or null for none")
        if self.select not in ("min_kl_under", "knee") and not self.select.isdigit():
            raise AbliterateError(f"study.select={self.select!r}: use min_kl_under, knee, or a trial number")

    @property
    def steer_bound(self) -> float:
        """The refusal rate above which the sampler counts a trial infeasible (with steer_to_target)."""
        return self.refusal_target + self.steer_margin


ExportFormat = Literal["merged", "adapter", "both"]
"""merged: a full checkpoint with the ablation in its weights; adapter: a PEFT LoRA adapter (rank = directions
per writer; load it on the base with PeftModel.from_pretrained; needs abliterate[adapter]); both: the merged
checkpoint with the adapter in adapter/. 4-bit and disk-offloaded loads merge into the base's own files."""


CLASSIFIER_TASKS = ("text-classification", "zero-shot-classification")


@dataclass
class ClassifierOptions:
    """A model that judges whether a response is a refusal (off unless `model` is set)."""

    model: str | None = None
    """hub id or local dir of a text-classification or zero-shot-classification (NLI) model; None: off."""
    task: Literal["text-classification", "zero-shot-classification"] = "zero-shot-classification"
    """text-classification: a model with a refusal label; zero-shot-classification: any NLI model."""
    refusal_label: str = "refusal"
    """text-classification: the model's label meaning refusal; zero-shot: the candidate label for refusal."""
    other_label: str = "compliance"
    """zero-shot: the competing candidate label (unused by text-classification)."""
    hypothesis_template: str = "This response is a {}."
    """zero-shot: the NLI hypothesis, {} replaced by each candidate label."""
    threshold: float = 0.5
    """a response is a refusal when the score of refusal_label is at or above this."""
    batch_size: int = 16
    """responses per classifier forward pass."""
    recheck_top: int = 5
    """Pareto trials (fewest marker refusals first) re-checked with the classifier after the search."""
    trust_remote_code: bool = False
    """let the classifier model's own Python code (auto_map) run; only for code you trust."""

    def __post_init__(self) -> None:
        if self.task not in CLASSIFIER_TASKS:
            raise AbliterateError(f"classifier.task={self.task!r}: use one of {', '.join(CLASSIFIER_TASKS)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise AbliterateError(f"classifier.threshold={self.threshold} must be a score in [0, 1]")
        if self.batch_size < 1:
            raise AbliterateError("classifier.batch_size must be >= 1")
        if self.recheck_top < 0:
            raise AbliterateError("classifier.recheck_top must be >= 0")
        if self.task == "zero-shot-classification":
            if self.refusal_label == self.other_label:
                raise AbliterateError("classifier.refusal_label and classifier.other_label must differ")
            if "{}" not in self.hypothesis_template:
                raise AbliterateError("classifier.hypothesis_template must contain {} for the label")

    @property
    def enabled(self) -> bool:
        return bool(self.model)


HUB_REPO_ID = r"(?:[\w.-]+/)?[\w.-]+"


@dataclass
class HubOptions:
    """Upload the export to the Hugging Face Hub, in one commit. Nothing is uploaded unless push_to is set."""

    push_to: str | None = None
    """hub repo to upload the export to (user/name or org/name; created if missing); None: no upload."""
    private: bool = False
    """create the repo private (a repo that exists keeps its visibility)."""
    token: str | None = None
    """hub token; default HF_TOKEN, else the one `hf auth login` stored. Never printed; prefer HF_TOKEN to this flag."""

    def __post_init__(self) -> None:
        import re

        if self.push_to is not None and not re.fullmatch(HUB_REPO_ID, self.push_to):
            raise AbliterateError(f"hub.push_to={self.push_to!r} is not a hub repo id; use user/name or org/name")
