"""lm-evaluation-harness tasks on two models, side by side (`abliterate benchmark`).

lm-eval is an optional extra (pip install 'abliterate[benchmark]'), imported only when a benchmark
runs. The packaged task `abliterate_everyday` (data/benchmark/) asks the capability probe's questions
(data/capability/everyday.jsonl) as `scorers.Capability` does: the chat-formatted question, each
choice scored as the whole reply by the sum of its tokens' log-probs; so its `acc` is the probe's
accuracy. Nothing here touches the hub unless a task named by the user needs to download its data.
"""

import json
import logging
import math
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from abliterate.errors import AbliterateError
from abliterate.export import MANIFEST
from abliterate.rundir import atomic_path

log = logging.getLogger("abliterate.benchmark")

PACKAGED_TASK = "abliterate_everyday"
TASK_DIR = "data/benchmark"
QUESTIONS = "data/capability/everyday.jsonl"
INSTALL = "pip install 'abliterate[benchmark]'"


@dataclass
class BenchmarkOptions:
    """Which lm-eval tasks run, and how."""

    tasks: list[str] = field(default_factory=lambda: [PACKAGED_TASK])
    """lm-eval task (or group) names, or task YAML files; default: the packaged 30 everyday-fact questions."""
    include_path: str | None = None
    """a dir of your own lm-eval task YAMLs, so that --lm_eval.tasks can name them."""
    limit: int | None = None
    """at most this many examples per task (quick checks only: the numbers are not comparable to full runs)."""
    num_fewshot: int | None = None
    """few-shot examples per prompt; None: each task's own setting."""
    batch_size: int = 16
    """sequences per forward pass."""

    def __post_init__(self) -> None:
        if not self.tasks or not all(isinstance(t, str) and t.strip() for t in self.tasks):
            raise AbliterateError(
                f"--lm_eval.tasks {self.tasks!r}: name one lm-eval task or more, e.g. [{PACKAGED_TASK}]"
            )
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise AbliterateError("--lm_eval.batch_size and --lm_eval.limit must be >= 1")


def require_lm_eval() -> None:
    """Before any model is loaded: lm-eval must be installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise AbliterateError(f"abliterate benchmark needs lm-eval, which is not installed: {INSTALL}") from None


def task_specs(options: BenchmarkOptions) -> tuple[list, object]:
    """The task list and TaskManager for `simple_evaluate`. The packaged task goes in as its YAML's
    config with the data file's real path (lm-eval reads data_files relative to the working dir);
    the manager indexes the packaged dir, the user's include_path, and lm-eval's own tasks only when
    a name is not among those (indexing them all takes seconds)."""
    import yaml
    from lm_eval.tasks import TaskManager

    packaged = Path(str(files("abliterate").joinpath(TASK_DIR)))
    include = [str(packaged), *([options.include_path] if options.include_path else [])]
    manager = TaskManager(include_path=include, include_defaults=False)
    if any(t not in manager.all_tasks and not Path(t).is_file() for t in options.tasks):
        manager = TaskManager(include_path=include)
    unknown = [t for t in options.tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise AbliterateError(
            f"unknown lm-eval task {unknown[0]!r}; name one lm-eval knows (lm-eval ls tasks), a task YAML file, "
            "or pass --lm_eval.include_path DIR for your own"
        )
    config = yaml.safe_load((packaged / f"{PACKAGED_TASK}.yaml").read_text())
    config["dataset_kwargs"]["data_files"] = {"test": str(files("abliterate").joinpath(QUESTIONS))}
    return [config if t == PACKAGED_TASK else t for t in options.tasks], manager


def run_tasks(model, tokenizer, options: BenchmarkOptions, system_prompt: str | None = None) -> dict[str, dict]:
    """{task: {metric: value}} of one model (already loaded, on its device) on the options' tasks.

    Prompts are chat-formatted when the tokenizer has a chat template (the model is judged as it is
    used); the values are lm-eval's, with stderr columns dropped."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    specs, manager = task_specs(options)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, device=str(model.device))
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=specs,
        task_manager=manager,
        num_fewshot=options.num_fewshot,
        limit=options.limit,
        apply_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        system_instruction=system_prompt,
        bootstrap_iters=0,
        log_samples=False,
    )
    table = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, _, kind = key.partition(",")
            if kind and "_stderr" not in metric and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[metric if kind == "none" else f"{metric},{kind}"] = float(value)
        if metrics:
            table[task] = metrics
    return table


def side_by_side(original: dict[str, dict], abliterated: dict[str, dict]) -> list[dict]:
    """One row per (task, metric) either model has: both values and abliterated - original."""
    rows = []
    for task in sorted(set(original) | set(abliterated)):
        before, after = original.get(task, {}), abliterated.get(task, {})
        for metric in sorted(set(before) | set(after)):
            a, b = before.get(metric, math.nan), after.get(metric, math.nan)
            rows.append({"task": task, "metric": metric, "original": a, "abliterated": b, "delta": b - a})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (the terminal's and the model card's)."""
    lines = ["| task | metric | original | abliterated | delta |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['original']:.4f} | {r['abliterated']:.4f} | {r['delta']:+.4f} |"
        )
    return "\n".join(lines)


BENCHMARKS_KEY = "benchmarks"  # abliterate.json: the rows, so that a re-export of the same trial keeps them
BENCHMARKS_TITLE = "## Benchmarks"


def benchmarks_section(record: dict | None) -> list[str]:
    """The card's last section: the side-by-side lm-eval table (none without a benchmark record)."""
    if not record:
        return []
    what = f"lm-evaluation-harness {record.get('lm_eval', '')}".strip()
    return [
        BENCHMARKS_TITLE,
        "",
        f"{what}, the original model against this one:",
        "",
        markdown_table(record["rows"]),
        "",
    ]


def with_benchmarks(readme: str, record: dict) -> str:
    """README text with its Benchmarks section replaced by `record`'s (added at the end if there is none)."""
    start = readme.find(f"\n{BENCHMARKS_TITLE}\n")
    if start >= 0:
        end = readme.find("\n## ", start + 1)
        readme = readme[: start + 1] + (readme[end + 1 :] if end >= 0 else "")
    return readme.rstrip("\n") + "\n\n" + "\n".join(benchmarks_section(record))


def add_benchmarks(export_dir: Path, record: dict) -> None:
    """Put `record` in an export's abliterate.json and its README's Benchmarks section, each file atomically."""
    manifest = json.loads((export_dir / MANIFEST).read_text())
    readme = export_dir / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    with atomic_path(readme) as tmp:
        tmp.write_text(with_benchmarks(text, record))
    with atomic_path(export_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps({**manifest, BENCHMARKS_KEY: record}, indent=2, sort_keys=True, default=str))


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
