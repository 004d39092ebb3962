"""Parallel trial workers: N processes running `abliterate search` against one study storage.

The coordinating process computes the caches first, so every worker loads residuals and
baselines instead of recomputing them, then waits for the workers and selects and exports.
"""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch

from abliterate.errors import AbliterateError
from abliterate.runconfig import CONFIG_FILE

log = logging.getLogger("abliterate.workers")

WORKER_ENV = "ABLITERATE_WORKER"


def is_worker() -> bool:
    """True inside a worker process: it must not clean up other workers' running trials."""
    return os.environ.get(WORKER_ENV) == "1"


def run_workers(study: optuna.Study, n_workers: int, n_trials: int, output_dir: Path) -> None:
    """Start `n_workers` search processes on this run's resolved config (OUTPUT_DIR/config.yaml, written
    by the CLI) and wait for them; one GPU each when there are enough."""
    config_path = output_dir / CONFIG_FILE
    if not config_path.is_file():
        raise AbliterateError(
            f"study.workers > 1 starts workers from {config_path}, which run and search write; start them with `abliterate run` or `abliterate search`"
        )
    gpus = torch.cuda.device_count()
    procs = []
    for i in range(n_workers):
        env = dict(os.environ, **{WORKER_ENV: "1"})
        if gpus >= n_workers:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        log_path = output_dir / f"worker-{i}.log"
        cmd = [
            sys.executable,
            "-m",
            "abliterate",
            "search",
            "--config",
            str(config_path),
            "--output_dir",
            str(output_dir),
            "--study.workers",
            "1",
        ]
        with log_path.open("w") as log_file:
            procs.append((subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT), log_path))
        log.info("worker %d started (pid %d, log %s)", i, procs[-1][0].pid, log_path)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    last = -1
    while any(p.poll() is None for p, _ in procs):
        done = len(study.get_trials(deepcopy=False, states=states))
        if done != last:
            log.info("workers: %d/%d trials finished", done, n_trials)
            last = done
        time.sleep(2)
    failed = [(i, p.returncode, path) for i, (p, path) in enumerate(procs) if p.returncode != 0]
    if failed:
        i, code, path = failed[0]
        raise AbliterateError(f"worker {i} exited with code {code}; see {path}")
