"""What a person reads: trials.csv, pareto.png, the study summary, the run summary, the picker."""

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from abliterate.errors import AbliterateError
from abliterate.pareto import select_trial
from abliterate.rundir import atomic_path

log = logging.getLogger("abliterate.reports")

LABELS = {
    "kl": "KL divergence",
    "degeneration": "degenerate replies",
    "judge_refusals": "judged refusal rate",
    "capability": "multiple-choice accuracy",
}


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """Every trial's number, state, values (named by metric), parameters, attributes and duration."""
    frame = study.trials_dataframe(attrs=("number", "state", "values", "params", "user_attrs", "duration"))
    if "duration" in frame:
        frame["duration"] = frame["duration"].dt.total_seconds()
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def plot_pareto(trials: Sequence[FrozenTrial], front, chosen, names: Sequence[str], path: Path) -> bool:
    """First objective (refusals) against the second, every trial marked by state, the front joined,
    the chosen trial starred; a third objective colours the points. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping %s (pip install matplotlib)", path.name)
        return False
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and "bound" in t.user_attrs]
    fig, ax = plt.subplots(figsize=(6, 4))
    colour = {"c": [t.values[2] for t in complete], "cmap": "viridis"} if len(names) > 2 else {"c": "0.6"}
    points = ax.scatter(
        [t.values[1] for t in complete], [t.values[0] for t in complete], s=12, label="complete", **colour
    )
    if len(names) > 2:
        fig.colorbar(points, ax=ax, label=names[2])
    if pruned:
        ax.scatter(
            [t.user_attrs["bound"][1] for t in pruned],
            [t.user_attrs["bound"][0] for t in pruned],
            s=12,
            marker="x",
            c="0.75",
            label="pruned (bound)",
        )
    ax.plot([t.values[1] for t in front], [t.values[0] for t in front], "o-", c="C0", mfc="none", label="Pareto front")
    if chosen is not None:
        ax.scatter([chosen.values[1]], [chosen.values[0]], s=120, marker="*", c="C3", label=f"chosen #{chosen.number}")
    ax.set_xlabel(f"{names[1]} (harmless)")
    ax.set_ylabel(f"{names[0]} (harmful)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip("."))
    plt.close(fig)
    return True


def log_study(trials: Sequence[FrozenTrial], front, chosen, names: Sequence[str], policy: str) -> None:
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    log.info("study: %s", ", ".join(f"{n} {c}" for n, c in states.items() if c))
    for t in front:
        log.info(
            "  Pareto trial %d: %s", t.number, ", ".join(f"{n} {v:.4f}" for n, v in zip(names, t.values, strict=True))
        )
    log.info("selected trial %d by %s", chosen.number, policy)


def print_run_summary(
    model_id, chosen: FrozenTrial, reported: dict, before: dict, names, counts: dict, target: Path, seconds: float
):
    """The result for a person, then one JSON line for scripts (stdout); reported (not optimised)
    scorers' values follow the objectives. `counts`: per scorer, (the role it reads, its prompts)."""
    after = dict(zip(names, chosen.values, strict=True)) | reported
    lines = [f"\nabliterated {model_id} with trial {chosen.number}"]
    for name, value in after.items():
        what = "refusal rate" if name == names[0] else LABELS.get(name, name)
        role, n = counts[name]  # the prompts its scorer reads (a reported marker count: harmful)
        label = what if what == name else f"{what} ({name})"
        lines.append(f"  {label} on {n} {role} prompts: {before.get(name, 0.0):.4f} before -> {value:.4f} after")
    lines.append(f"  model written to {target}\n")
    print("\n".join(lines))
    summary = {
        "refusal_before": before.get(names[0]),
        "refusal_after": chosen.values[0],
        "kl": after.get("kl", chosen.values[1]),
        **{f"{name}_after": value for name, value in after.items() if name not in ("kl",) and name != names[0]},
        "trial": chosen.number,
        "export": str(target),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(summary))


def choose_from_front(trials, front, default, names: Sequence[str], read=input) -> FrozenTrial:
    """On a terminal: show the Pareto front and let the user pick the trial to export."""
    print("\nPareto front:", file=_err())
    print("  " + "  ".join(f"{h:>10}" for h in ("trial", *names)), file=_err())
    for t in front:
        mark = "  <- default" if t.number == default.number else ""
        print("  " + "  ".join([f"{t.number:>10}", *(f"{v:>10.4f}" for v in t.values)]) + mark, file=_err())
    while True:
        answer = read(f"trial to export [{default.number}]: ").strip()
        if not answer:
            return default
        if not answer.isdigit():
            print(
                f"  {answer!r} is not a trial number; type one from the list, or Enter for {default.number}",
                file=_err(),
            )
            continue
        try:
            return select_trial(trials, answer, 0.0)
        except AbliterateError as err:
            print(f"  {err}", file=_err())


def _err():
    return sys.stderr


class SearchProgress:
    """One line per finished trial on stderr: done/total, pruned, elapsed, ETA, best value under target."""

    def __init__(self, done: int, total: int, names: Sequence[str], refusal_target: float, stream=None):
        self.clock = time.perf_counter
        self.start = self.clock()
        self.done, self.total, self.first = done, total, done
        self.names, self.target = list(names), refusal_target
        self.pruned = 0
        self.best: float | None = None
        self.stream = stream or sys.stderr

    def trial_done(self, values: Sequence[float] | None = None, pruned: bool = False) -> None:
        self.done += 1
        self.pruned += pruned
        if values is not None and values[0] <= self.target:
            self.best = values[1] if self.best is None else min(self.best, values[1])
        elapsed = self.clock() - self.start
        ran = self.done - self.first
        eta = elapsed / ran * (self.total - self.done) if ran else 0.0
        best = f"{self.best:.4f}" if self.best is not None else "none yet"
        print(
            f"trials {self.done}/{self.total} ({self.pruned} pruned), {_clock(elapsed)} elapsed, ETA {_clock(eta)}, "
            f"best {self.names[1]} at {self.names[0]} <= {self.target:g}: {best}",
            file=self.stream,
            flush=True,
        )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
