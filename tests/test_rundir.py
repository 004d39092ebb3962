"""One writer per run dir: the lock refuses a second live process, never a dead one."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from abliterate.errors import AbliterateError
from abliterate.rundir import LOCK_FILE, OWNER_FILE, RunDir, pid_alive, stale_temps

# Takes the lock on argv[1], says so on stdout, then holds it until stdin closes.
HOLDER = textwrap.dedent(
    """
    import sys
    from abliterate.rundir import RunDir
    with RunDir(sys.argv[1]).lock():
        print("locked", flush=True)
        sys.stdin.read()
    print("released", flush=True)
    """
)

# Tries to take the lock on argv[1]; prints the one-line error and exits 2 when refused.
TAKER = textwrap.dedent(
    """
    import sys
    from abliterate.errors import AbliterateError
    from abliterate.rundir import RunDir
    try:
        with RunDir(sys.argv[1]).lock():
            print("locked", flush=True)
    except AbliterateError as err:
        print(err, flush=True)
        sys.exit(2)
    """
)


def _python(script, *args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(proc.stdout)
    assert not pid_alive(pid)
    return pid


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock on tmp_path/run until the test ends."""
    proc = _python(HOLDER, tmp_path / "run")
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_lock_records_the_holder_and_cleans_up(tmp_path):
    run = tmp_path / "new" / "run"
    with RunDir(run).lock() as held:
        assert held.path == run and run.is_dir()
        owner = json.loads((run / OWNER_FILE).read_text())
        assert owner["pid"] == os.getpid()
        assert RunDir(run).holder()["pid"] == os.getpid()
        with RunDir(run).lock():  # re-entrant within one process
            pass
        assert (run / OWNER_FILE).exists()  # the outer hold is still on
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    with RunDir(run).lock():  # free again
        pass


def test_second_process_is_refused_while_held(holder, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(AbliterateError) as info:
        with RunDir(run).lock():
            pytest.fail("took a lock another process holds")
    message = str(info.value)
    assert f"is in use by abliterate pid {holder.pid} (" in message
    assert message.endswith("; wait for it or use another --output_dir")
    assert len(message.splitlines()) == 1
    assert json.loads((run / OWNER_FILE).read_text())["pid"] == holder.pid  # the holder's record is untouched

    holder.stdin.close()  # let it finish
    assert holder.stdout.readline().strip() == "released"
    assert holder.wait() == 0
    with RunDir(run).lock():
        assert json.loads((run / OWNER_FILE).read_text())["pid"] == os.getpid()


def test_other_process_is_refused_while_we_hold(tmp_path):
    run = tmp_path / "run"
    with RunDir(run).lock():
        taker = _python(TAKER, run)
        out, err = taker.communicate()
        assert taker.returncode == 2 and "Traceback" not in err
        assert out.strip().endswith("wait for it or use another --output_dir")
        assert f"{run} is in use by abliterate pid {os.getpid()} (" in out
    taker = _python(TAKER, run)
    out, _ = taker.communicate()
    assert taker.returncode == 0 and out.strip() == "locked"


def test_lock_of_a_killed_process_does_not_block(holder, tmp_path):
    run = tmp_path / "run"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((run / OWNER_FILE).read_text())["pid"] == holder.pid  # left behind by the killed holder
    with RunDir(run).lock():
        assert json.loads((run / OWNER_FILE).read_text())["pid"] == os.getpid()


def test_unwritable_run_dir_names_the_flag():
    with pytest.raises(AbliterateError, match="choose a writable --output_dir"):
        with RunDir("/proc/abliterate-run").lock():
            pass


def test_stale_temps_are_those_of_dead_writers(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    names = [
        f".model.tmp-{dead}",
        f".model.old-{dead}",
        f".model.tmp-{alive}",
        f".model.tmp-{os.getpid()}",
        f".other.tmp-{dead}",
        f"model.tmp-{dead}",  # not hidden: not a temp name
        ".model.tmp-x1",
    ]
    for name in names:
        (tmp_path / name).mkdir()
    assert stale_temps(tmp_path, "model") == [
        (tmp_path / f".model.old-{dead}", "old"),
        (tmp_path / f".model.tmp-{dead}", "tmp"),
    ]
    assert [p.name for p, _ in stale_temps(tmp_path)] == [
        f".model.old-{dead}",
        f".model.tmp-{dead}",
        f".other.tmp-{dead}",
    ]
    assert stale_temps(tmp_path / "missing") == []
