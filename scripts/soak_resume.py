"""Fault-injection soak: `kill -9` an `abliterate run` on the tiny organism at random moments in every
phase, rerun the same command after each kill until it finishes, then check that nothing was lost or
left behind.

Phases, told apart by the run's stderr lines: startup (imports, lock, model load), residuals (the
residual pass), reference (directions and the reference pass), trials (study open, ask/evaluate/tell),
report (trials.csv, pareto.png, selection), export (the checkpoint written beside the run dir's files)
and exit (after the export, or "nothing new"). The kills are aimed phase by phase, each while its work
is still ahead (cached residuals are not collected again; the export happens once, so its kills come
before the report's, which every rerun passes again); when a phase ends before its share is spent, the
rest go to phases every rerun passes (startup, report, exit). A kill that overshoots residuals or
reference before one has landed there removes that phase's cache, so the next run passes through it
again (a run recomputes a missing cache; the reference pass lasts about 0.1 s, one slice too many
closes it for good). Inside a phase each kill lands at a random
moment: a random delay after the line that opens a long phase (startup, trials, exit), or, for the
short ones (residuals, reference, report: tenths of a second; export: milliseconds), a random slice
while the run is advanced in 5 ms (export: 1 ms) slices with SIGSTOP/SIGCONT. The phase a kill landed
in is read from everything the process wrote before it died. After each kill the study is snapshotted
(a copy of study.db and its journal): every finished trial seen once must stay finished with the same
parameters and values.

At the end: exactly --n-trials finished (COMPLETE + PRUNED) trials, no RUNNING trial, no finished
trial lost or changed, no temp file or dir anywhere in the run dir (".tmp", ".old-", hidden entries
other than the lock file), and the export loads with AutoModelForCausalLM.from_pretrained.

Progress goes to stderr; one JSON line to stdout; exit status 1 if any check failed. The run dir and
the log of every run's stderr (soak.log) are kept on failure (or with --keep) for reproduction.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/soak_resume.py [--kills 24] [--n-trials 12] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PHASES = ("startup", "residuals", "reference", "trials", "report", "export", "exit")  # in a run's order
# The order kills are aimed in: each phase while it is still ahead. The export happens once (a rerun after
# it says "nothing new"), so it goes before the report, which every later rerun passes through again.
TARGETS = ("startup", "residuals", "reference", "trials", "export", "report", "exit")
REQUIRED = ("residuals", "reference", "trials", "export")
# Phases a run passes once, until their cache is written: a kill that overshoots one closes it for good.
ONE_SHOT = ("residuals", "reference")
# Shares of the kills beyond one per phase (trials are the longest phase and the one with most state).
WEIGHTS = {"startup": 1, "residuals": 2, "reference": 2, "trials": 6, "report": 1, "export": 2, "exit": 1}

LOCK_FILE = ".abliterate.lock"  # the run dir's flock file: stays by design
STUDY_NAME = "abliterate"

_MODEL_LOADED = re.compile(r"abliterate\.module: loaded ")
_RESIDUALS_DONE = re.compile(r"collected residuals in|reusing cached residuals")
_REFERENCE_DONE = re.compile(r"reference \(original model\):|reusing cached reference")
_PROGRESS = re.compile(r"^trials (\d+)/(\d+) \(")  # SearchProgress: one line per finished trial
_TRIAL_DONE = re.compile(r"trial \d+ \((\d+)/(\d+)\):")
_NOTHING_TO_RUN = re.compile(r"already has \d+ finished trials; nothing to run")
_SELECTED = re.compile(r"abliterate\.reports: selected trial")
_EXPORTED = re.compile(r"exported to .* in [\d.]+s|nothing new: ")


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- one run of the CLI -------------------------------------------------------------------------


class Run:
    """One `abliterate run` subprocess in its own process group, its stderr lines collected by a thread."""

    def __init__(self, cmd: list[str], env: dict, log_file) -> None:
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.times: list[float] = []  # time.monotonic() each line was read
        self.cond = threading.Condition()
        self.log_file = log_file
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.log_file.write(line + "\n")
            self.log_file.flush()
            with self.cond:
                self.lines.append(line)
                self.times.append(time.monotonic())
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def snapshot(self) -> list[str]:
        with self.cond:
            return list(self.lines)

    def wait_line(self, pattern: re.Pattern, timeout: float, count: int = 1, after: int = 0) -> int | None:
        """Wait for the `count`-th line from index `after` matching `pattern`; its index, or None on exit/timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hits = [i for i in range(after, len(self.lines)) if pattern.search(self.lines[i])]
                if len(hits) >= count:
                    return hits[count - 1]
                if self.proc.poll() is not None and not self.reader.is_alive():
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.05))

    def sleep(self, seconds: float) -> bool:
        """Sleep unless the process exits first; True if it is still alive."""
        try:
            self.proc.wait(timeout=max(seconds, 0.0))
            return False
        except subprocess.TimeoutExpired:
            return True

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> bool:
        """kill -9 the run's process group; True if it was still running (a real kill)."""
        alive = self.proc.poll() is None
        self.signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join()
        return alive

    def finish(self, timeout: float) -> int | None:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.reader.join()
        return rc


def phase_of(lines: list[str]) -> str:
    """The phase a process was in when it stopped, from all it wrote to stderr."""
    phase = "startup"
    for line in lines:
        if phase == "startup" and _MODEL_LOADED.search(line):
            phase = "residuals"
        if _RESIDUALS_DONE.search(line):
            phase = "reference"
        if _REFERENCE_DONE.search(line):
            phase = "trials"
        if _all_finished(line):
            phase = "report"
        if _SELECTED.search(line):
            phase = "export"
        if _EXPORTED.search(line):
            phase = "exit"
    return phase


def _all_finished(line: str) -> bool:
    if _NOTHING_TO_RUN.search(line):
        return True
    match = _PROGRESS.search(line) or _TRIAL_DONE.search(line)
    return bool(match) and int(match[1]) >= int(match[2])


_ALL_FINISHED = re.compile(r"^trials (\d+)/\1 \(|trial \d+ \((\d+)/\2\):|" + _NOTHING_TO_RUN.pattern)


# ---- the study, read from a copy ----------------------------------------------------------------


def read_study(run_dir: Path, scratch: Path) -> dict[int, tuple]:
    """{trial number: (state, params, values)} of every trial, read from a copy of study.db and its journal.

    The copy (opened read-write, so SQLite rolls a hot journal back there as the next run would) leaves
    the run dir exactly as the killed process left it.
    """
    db = run_dir / "study.db"
    if not db.exists():
        return {}
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for suffix in ("", "-journal", "-wal", "-shm"):
        src = run_dir / f"study.db{suffix}"
        if src.exists():
            shutil.copy2(src, scratch / src.name)
    trials: dict[int, tuple] = {}
    with sqlite3.connect(scratch / "study.db") as conn:
        try:
            study = conn.execute("SELECT study_id FROM studies WHERE study_name = ?", (STUDY_NAME,)).fetchone()
        except sqlite3.OperationalError:  # the schema was not created yet
            return {}
        if study is None:
            return {}
        rows = conn.execute("SELECT trial_id, number, state FROM trials WHERE study_id = ?", study).fetchall()
        for trial_id, number, state in rows:
            params = conn.execute(
                "SELECT param_name, param_value FROM trial_params WHERE trial_id = ? ORDER BY param_name", (trial_id,)
            ).fetchall()
            values = conn.execute(
                "SELECT objective, value, value_type FROM trial_values WHERE trial_id = ? ORDER BY objective",
                (trial_id,),
            ).fetchall()
            trials[number] = (state, tuple(params), tuple(values))
    return trials


def finished(trials: dict[int, tuple]) -> dict[int, tuple]:
    return {n: t for n, t in trials.items() if t[0] in ("COMPLETE", "PRUNED")}


# ---- the run dir --------------------------------------------------------------------------------


def stray_temps(run_dir: Path, export: Path) -> list[str]:
    """Temp files and dirs anywhere under the run dir: ".tmp" / ".old-" names, hidden entries but the lock."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        for name in [*dirs, *files]:
            path = Path(root) / name
            rel = path.relative_to(run_dir).as_posix()
            if ".tmp" in name or ".old-" in name:
                found.append(rel)
            elif name.startswith(".") and not (path.parent == run_dir and name == LOCK_FILE):
                found.append(rel)
    if export.parent != run_dir and export.parent.is_dir():  # hidden dirs beside an export elsewhere
        found += [str(p) for p in export.parent.iterdir() if p.name.startswith(".") and p.is_dir()]
    return sorted(found)


def cached(run_dir: Path, name: str) -> bool:
    return any((run_dir / "cache").glob(f"{name}-*.safetensors"))


def reopen(run_dir: Path, phase: str) -> None:
    """Remove a one-shot phase's cache after a kill overshot it, so a rerun passes through it again."""
    for path in (run_dir / "cache").glob(f"{phase}-*.safetensors"):
        path.unlink()
    log(f"the kill overshot {phase} before any landed there: removed its cache so the next run redoes it")


def exported(export: Path) -> bool:
    return (export / "abliterate.json").is_file()


# ---- the kill plan ------------------------------------------------------------------------------


def plan_kills(total: int) -> dict[str, int]:
    """Kills per phase: one each, the rest by WEIGHTS (largest remainders)."""
    quota = dict.fromkeys(PHASES, 1)
    extra = max(total - len(PHASES), 0)
    weight = sum(WEIGHTS.values())
    shares = {p: extra * WEIGHTS[p] / weight for p in PHASES}
    for p in PHASES:
        quota[p] += int(shares[p])
    left = total - sum(quota.values())
    for p in sorted(PHASES, key=lambda p: shares[p] - int(shares[p]), reverse=True)[: max(left, 0)]:
        quota[p] += 1
    return quota


class Killer:
    """Chooses and performs the kill moment for a target phase.

    Long phases (startup, trials, exit) get a random wall-clock delay after the line that opens them.
    Short ones (residuals, reference, report: well under a second; export: milliseconds) are stepped:
    the run is stopped (SIGSTOP) and let on (SIGCONT) one slice at a time, and is killed after a random
    number of slices of run time in the phase, or at the phase's end if it ends first. The moment then
    does not depend on how loaded the machine is, and a missed phase is over by one slice at most.
    """

    # phase: (slice in seconds, slices of run time in the phase to draw the kill moment from)
    # Spans are short enough to land inside each phase on an idle machine (residuals about 100 ms of run
    # time, reference 200 ms, the report of a finished study 100 ms, the export about 7 ms on the organism);
    # on a loaded one a slice gives the run less time, so the same span lands earlier in the phase.
    STEPPED = {"residuals": (0.005, 15), "reference": (0.005, 30), "report": (0.005, 20), "export": (0.001, 6)}

    def __init__(self, rng: random.Random, n_trials: int, run_dir: Path, export: Path) -> None:
        self.rng = rng
        self.n_trials = n_trials
        self.run_dir = run_dir
        self.export = export
        self.span = {phase: slices for phase, (_, slices) in self.STEPPED.items()}
        self.trial_kills_left = 0
        self.trial_s = 0.5  # one trial, and the study open plus the first trial: measured as runs go
        self.first_s = 2.0

    def strike(self, run: Run, target: str, done: int, timeout: float) -> str:
        """Wait for a random moment in `target`, then return (the caller kills); how the moment was chosen."""
        rng = self.rng
        if target == "startup":
            delay = rng.uniform(0.2, 6.0)
            run.wait_line(_MODEL_LOADED, timeout=delay)  # never past the model load
            return f"{delay:.2f}s after start"
        if target == "trials":
            if run.wait_line(_REFERENCE_DONE, timeout) is None:
                return "exited before the trials"
            start = len(run.snapshot())
            left = max(self.n_trials - done, 1)
            span = max(left // max(self.trial_kills_left, 1), 1)
            more = rng.randrange(min(span, left))
            if more:
                if run.wait_line(_PROGRESS, timeout, count=more, after=start) is None:
                    return "exited during the trials"
                delay = rng.uniform(0, self.trial_s)
                end, at_end = _ALL_FINISHED, "at the end of the trials"
            else:
                delay = rng.uniform(0, self.first_s)  # the study open, then the first trial
                # first_s is a guess until a run has shown a trial: on a fast machine all trials may end within
                # it, and a first kill past them leaves the phase unreachable (seed 1485776339).
                end, at_end = _PROGRESS, "at the end of the first trial"
            if run.wait_line(end, timeout=delay, after=start) is not None:
                return f"{at_end} ({delay:.2f}s after {more} more finished trial(s))"
            return f"{delay:.2f}s after {more} more finished trial(s)"
        if target == "exit":
            if run.wait_line(_EXPORTED, timeout) is None:
                return "exited before the export"
            delay = rng.uniform(0, 1.0)
            run.sleep(delay)
            return f"{delay * 1000:.0f}ms after the export"
        trigger = {"residuals": _MODEL_LOADED, "reference": _RESIDUALS_DONE}.get(target, _ALL_FINISHED)
        if run.wait_line(trigger, timeout) is None:
            return f"exited before {target}"
        return self._step(run, target, timeout)

    def _step(self, run: Run, target: str, timeout: float) -> str:
        slice_s, _ = self.STEPPED[target]
        span = self.span[target]
        at = self.rng.randrange(span)
        steps = inside = 0
        run.signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run.signal(signal.SIGCONT)
            time.sleep(slice_s)
            run.signal(signal.SIGSTOP)
            steps += 1
            time.sleep(0.002)  # let the reader thread take what the run wrote
            if run.proc.poll() is not None:
                break
            phase = phase_of(run.snapshot())
            if target == "export" and phase == "report" and self._export_temp():
                phase = "export"  # its first line may not be read yet
            if PHASES.index(phase) > PHASES.index(target):
                break  # the phase ended first: kill at its end
            if phase == target:
                inside += 1
                if inside > at:
                    break
        return f"stepped {steps} x {slice_s * 1000:.0f}ms, {inside} in {target} (drawn: slice {at + 1})"

    def _export_temp(self) -> bool:
        return any(".tmp-" in p.name for p in self.export.parent.glob(f".{self.export.name}.*"))

    def learn(self, run: Run) -> None:
        """How long a trial, and the study open plus the first trial, took in this run (when it got there)."""
        with run.cond:
            lines, times = list(run.lines), list(run.times)
        ref = next((t for line, t in zip(lines, times, strict=True) if _REFERENCE_DONE.search(line)), None)
        done = [t for line, t in zip(lines, times, strict=True) if _PROGRESS.search(line)]
        if ref is not None and done:
            self.first_s = done[0] - ref
        if len(done) > 1:
            gaps = sorted(b - a for a, b in zip(done, done[1:], strict=False))
            self.trial_s = gaps[len(gaps) // 2]

    def landed(self, target: str, phase: str) -> None:
        if PHASES.index(phase) > PHASES.index(target):  # overshot: draw from a shorter span
            self.span[target] = max(self.span.get(target, 2) // 2, 1)


# ---- the soak -----------------------------------------------------------------------------------


def organism(path: str | None) -> Path:
    if path:
        return Path(path)
    from abliterate.organism import build_tiny_organism

    root = os.environ.get("ABLITERATE_TEST_CACHE") or Path(tempfile.gettempdir()) / "abliterate-soak-organism"
    return build_tiny_organism(root, progress=False)


def write_config(org: Path, path: Path) -> None:
    path.write_text(
        f"""
data:
  harmful: {{dataset: {org}/harmful_train.txt, split: train}}
  harmless: {{dataset: {org}/harmless_train.txt, split: train}}
  eval_harmful: {{dataset: {org}/harmful_test.txt, split: train}}
  eval_harmless: {{dataset: {org}/harmless_test.txt, split: train}}
  batch_size: 64
  eval_batch_size: 16
module:
  load: {{dtypes: [float32]}}
  evaluation: {{max_new_tokens: 12}}
trainer:
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
"""
    )


def export_loads(export: Path) -> tuple[bool, str]:
    try:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(str(export))
        return True, ""
    except Exception as err:  # noqa: BLE001 - reported, not raised
        return False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def final_counts(run_dir: Path) -> dict[str, int]:
    """Trial states as optuna reads the study (the finished run dir)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run_dir / 'study.db'}")
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def soak(
    kills: int,
    n_trials: int,
    seed: int,
    work: Path,
    organism_dir: Path,
    run_timeout: float = 600.0,
    max_failures: int = 3,
) -> dict:
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    export = run_dir / "model"
    config = work / "organism.yaml"
    write_config(organism_dir, config)
    cmd = [
        sys.executable,
        "-m",
        "abliterate",
        "run",
        "--config",
        str(config),
        "--model",
        str(organism_dir),
        "--output_dir",
        str(run_dir),
        "--study.n_trials",
        str(n_trials),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")

    quota = plan_kills(kills)
    killer = Killer(rng, n_trials, run_dir, export)
    killer.trial_kills_left = quota["trials"]
    attempts = dict.fromkeys(PHASES, 0)
    landed = dict.fromkeys(PHASES, 0)
    seen: dict[int, tuple] = {}  # every finished trial seen after a kill
    lost: list[dict] = []
    failures: list[dict] = []
    kill_log: list[dict] = []
    temps_after_kills: set[str] = set()
    lock_busy = False
    journals = 0
    runs = 0
    start = time.monotonic()
    log(f"seed {seed}; kills planned per phase {quota}; work dir {work}")
    log(f"command: {' '.join(cmd)}")

    with open(work / "soak.log", "a") as log_file:
        while True:
            done = len(finished(read_study(run_dir, work / "snap")))
            reachable = {
                "startup": True,
                "residuals": not cached(run_dir, "residuals"),
                "reference": not cached(run_dir, "reference"),
                "trials": done < n_trials,
                "report": True,
                "export": not exported(export),
                "exit": True,
            }
            target = None
            for phase in TARGETS:
                if landed[phase] < quota[phase] and reachable[phase] and attempts[phase] < 3 * quota[phase] + 2:
                    target = phase
                    break
            if target is None and sum(landed.values()) < kills:  # a phase was over before its quota was spent
                target = min((p for p in TARGETS if reachable[p]), key=lambda p: (landed[p], TARGETS.index(p)))
            runs += 1
            log_file.write(f"\n===== run {runs}: target {target or 'none (run to the end)'}\n")
            log_file.flush()
            run = Run(cmd, env, log_file)
            if target is None:
                try:
                    rc = run.finish(run_timeout)
                except BaseException:
                    run.kill()
                    raise
                lines = run.snapshot()
                if rc is None:
                    run.kill()
                    failures.append({"run": runs, "why": f"no exit in {run_timeout:.0f}s", "tail": lines[-15:]})
                    log(f"run {runs}: HANG, killed after {run_timeout:.0f}s")
                elif rc != 0:
                    failures.append({"run": runs, "rc": rc, "tail": lines[-15:]})
                    lock_busy |= any("in use by" in line for line in lines)
                    log(f"run {runs}: FAILED rc {rc}: {lines[-1] if lines else ''}")
                else:
                    log(f"run {runs}: finished (rc 0) in {time.monotonic() - run.start:.1f}s")
                    break
                if len(failures) >= max_failures:
                    log("too many failed runs; giving up")
                    break
                continue

            attempts[target] += 1
            try:
                how = killer.strike(run, target, done, run_timeout)
            finally:
                alive = run.kill()  # also when the soak itself fails: never leave a stopped run behind
            lines = run.snapshot()
            if not alive:  # it exited on its own before the moment came
                rc = run.proc.returncode
                if rc == 0:
                    log(f"run {runs}: finished (rc 0) before its kill in {target} ({how})")
                    break
                failures.append({"run": runs, "rc": rc, "tail": lines[-15:]})
                lock_busy |= any("in use by" in line for line in lines)
                log(f"run {runs}: FAILED rc {rc} before its kill: {lines[-1] if lines else ''}")
                if len(failures) >= max_failures:
                    log("too many failed runs; giving up")
                    break
                continue
            phase = phase_of(lines)
            landed[phase] += 1
            if target == "trials" and phase == "trials":
                killer.trial_kills_left -= 1
            killer.landed(target, phase)
            killer.learn(run)
            if target in ONE_SHOT and landed[target] == 0 and PHASES.index(phase) > PHASES.index(target):
                reopen(run_dir, target)
            temps = stray_temps(run_dir, export)
            temps_after_kills.update(temps)
            journals += (run_dir / "study.db-journal").exists()  # killed inside a study write
            trials = read_study(run_dir, work / "snap")
            for number, record in seen.items():
                if trials.get(number) != record:
                    lost.append(
                        {"after_kill": sum(landed.values()), "trial": number, "was": record, "now": trials.get(number)}
                    )
            seen.update(finished(trials))
            last = next((line for line in reversed(lines) if line.strip()), "")
            kill_log.append({"run": runs, "target": target, "phase": phase, "how": how, "last_line": last[-160:]})
            log(
                f"run {runs}: kill {sum(landed.values())} aimed at {target} ({how}) landed in {phase}; "
                f"{len(finished(trials))}/{n_trials} finished, {len(trials)} trials; temps now: {temps or 'none'}"
            )

    # ---- the checks
    completed = work / "snap"
    trials = read_study(run_dir, completed) if (run_dir / "study.db").exists() else {}
    for number, record in seen.items():
        if trials.get(number) != record and not any(item["trial"] == number for item in lost):
            lost.append({"after_kill": "end", "trial": number, "was": record, "now": trials.get(number)})
    counts = final_counts(run_dir) if (run_dir / "study.db").exists() else {}
    n_finished = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
    strays = stray_temps(run_dir, export)
    loads, load_error = export_loads(export) if exported(export) else (False, "no export")
    manifest_ok = False
    if exported(export):
        from abliterate.export import export_files

        manifest_ok = export_files(export) is not None
    missed = [p for p in REQUIRED if landed[p] == 0]
    completed_seen = [n for n, r in seen.items() if r[0] == "COMPLETE"]
    result = {
        "ok": False,
        "seed": seed,
        "kills": sum(landed.values()),
        "kills_per_phase": landed,
        "phases_missed": missed,
        "runs": runs,
        "reruns": runs - 1,
        "failed_reruns": len(failures),
        "lock_busy_after_wait": lock_busy,
        "wall_s": round(time.monotonic() - start, 1),
        "n_trials": n_trials,
        "n_trials_finished": n_finished,
        "trial_states": counts,
        "running_left": counts.get("RUNNING", 0),
        "completed_trials_seen": len(completed_seen),
        "completed_trials_kept": sum(trials.get(n) == seen[n] for n in completed_seen),
        "finished_trials_lost": len(lost),
        "temps_seen_after_kills": sorted(temps_after_kills),
        "hot_journals_after_kills": journals,
        "sqlite_journal_left": (run_dir / "study.db-journal").exists(),
        "stray_temps": strays,
        "export_loads": loads,
        "export_manifest_ok": manifest_ok,
    }
    result["ok"] = (
        result["kills"] >= kills
        and not missed
        and not failures
        and n_finished == n_trials
        and result["running_left"] == 0
        and not lost
        and not strays
        and loads
        and manifest_ok
    )
    details = {"failures": failures, "lost": lost, "load_error": load_error, "kill_log": kill_log}
    (work / "soak.json").write_text(json.dumps({**result, **details}, indent=1, default=str))
    for failure in failures:
        log(f"failed run {failure['run']}: " + "\n    ".join(["", *failure["tail"]]))
    for item in lost:
        log(f"LOST/CHANGED trial {item['trial']} (after kill {item['after_kill']}): {item['was']} -> {item['now']}")
    if load_error:
        log(f"export does not load: {load_error}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=24, help="kill -9s to inject (at least one per phase: 7)")
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=None, help="for the kill moments (default: random)")
    parser.add_argument("--organism-dir", help="a built tiny organism (default: build or reuse one)")
    parser.add_argument("--work-dir", help="where the run dir and soak.log go (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir even when every check passes")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds one run may take")
    args = parser.parse_args(argv)
    if args.kills < len(PHASES):
        parser.error(f"--kills must be at least {len(PHASES)} (one per phase)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="abliterate-soak-"))
    result = soak(args.kills, args.n_trials, seed, work, organism(args.organism_dir), args.run_timeout)
    if result["ok"] and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"kept {work} (soak.log: every run's stderr; soak.json: the details)")
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
