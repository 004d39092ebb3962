"""Two "nodes" sharing one study on a real PostgreSQL server (docs/distributed.md, "Across machines").

.ci/run starts a throwaway server with scripts/postgres_for_tests.sh and passes its URL in
ABLITERATE_TEST_POSTGRES_URL. Without it (or without the driver) the test is skipped, saying why;
it never falls back to SQLite.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

URL = os.environ.get("ABLITERATE_TEST_POSTGRES_URL")
N_TRIALS = 60  # enough that node 0 is still mid-search when the test kills it (tiny trials take ~0.1 s)


def unavailable() -> str | None:
    """Why the test cannot run (checked before the session fixtures train the organism)."""
    if not URL:
        why = os.environ.get("ABLITERATE_TEST_POSTGRES_UNAVAILABLE", "ABLITERATE_TEST_POSTGRES_URL is not set")
        return f"no PostgreSQL server: {why.strip().splitlines()[-1] if why.strip() else why}"
    if importlib.util.find_spec("psycopg2") is None:
        return "the PostgreSQL driver is not installed (pip install -e '.[postgres]')"
    return None


pytestmark = [pytest.mark.postgres, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]


def worker(organism_config, organism_dir, out, url, study_name, log):
    """`abliterate search` on one node: its own run dir, the shared study."""
    args = [
        *(sys.executable, "-m", "abliterate", "search", "--config", str(organism_config)),
        *("--model", str(organism_dir), "--output_dir", str(out)),
        *("--study.storage", url, "--study.study_name", study_name),
        *("--study.n_trials", str(N_TRIALS), "--study.prune", "false", "--study.stale_after", "10"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def trials(storage, study_name):
    return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)


def wait(proc, log, timeout=600):
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_two_nodes_share_a_postgres_study_and_survive_kill_9(organism_config, organism_dir, tmp_path):
    postgres_url = URL
    study_name = f"test-{uuid.uuid4().hex[:12]}"  # the server outlives one test run
    runs = [tmp_path / "node0", tmp_path / "node1"]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = [worker(organism_config, organism_dir, runs[i], postgres_url, study_name, logs[i]) for i in (0, 1)]
    try:
        # Kill node 0 with -9 while it runs a trial, once the study has some finished trials.
        victim, storage, deadline = None, None, time.time() + 600
        while victim is None:
            assert time.time() < deadline, "node 0 never ran a trial"
            assert procs[0].poll() is None, "node 0 exited early: " + logs[0].read_text()[-2000:]
            if storage is None:  # open it once the nodes have created the schema and the study
                if "running trials" not in logs[0].read_text():
                    time.sleep(0.5)
                    continue
                storage = optuna.storages.RDBStorage(postgres_url)
            # Frozen, node 0 cannot finish the trial it runs between this read and the kill.
            procs[0].send_signal(signal.SIGSTOP)
            now = trials(storage, study_name)
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in now)
            mine = [t for t in now if t.state == TrialState.RUNNING and t.user_attrs.get("worker_pid") == procs[0].pid]
            if finished >= 2 and mine:
                procs[0].send_signal(signal.SIGKILL)
                procs[0].wait()
                victim = mine[0].number
            else:  # probe often: on an idle machine a trial is RUNNING for only ~0.1 s
                procs[0].send_signal(signal.SIGCONT)
                time.sleep(0.02)
        caches = {p.name: p.read_bytes() for p in (runs[0] / "cache").iterdir()}
        assert sorted(name.split("-")[0] for name in caches) == ["reference", "residuals"]

        # Restart node 0 on its own run dir; both nodes then finish the study.
        rerun_log = tmp_path / "node0-rerun.log"
        procs[0] = worker(organism_config, organism_dir, runs[0], postgres_url, study_name, rerun_log)
        wait(procs[0], rerun_log)
        wait(procs[1], logs[1])
    finally:
        for proc in procs:
            proc.kill()

    study = trials(storage, study_name)
    finished = [t for t in study if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    running = [t for t in study if t.state == TrialState.RUNNING]
    assert len(finished) == N_TRIALS, f"finished {len(finished)}, running {[t.number for t in running]}"
    assert len({t.number for t in finished}) == N_TRIALS
    # the killed node lost only its in-flight trial: after 10 s without progress a live node failed it
    assert running == []
    failed = {t.number for t in study if t.state == TrialState.FAIL and not t.user_attrs.get("surplus")}
    assert failed == {victim}, "only the killed node's trial and surplus asks failed"
    assert len({t.user_attrs["worker_pid"] for t in finished}) >= 2, "both nodes ran trials"

    # each node computed its own caches; the restarted node reused its own
    for run in runs:
        assert sorted(p.name.split("-")[0] for p in (run / "cache").iterdir()) == ["reference", "residuals"]
    rerun = rerun_log.read_text()
    assert "reusing cached residuals" in rerun and "reusing cached reference" in rerun
    assert {p.name: p.read_bytes() for p in (runs[0] / "cache").iterdir()} == caches
    assert "reusing cached" not in logs[1].read_text()
