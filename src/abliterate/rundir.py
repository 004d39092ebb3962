"""One writer per run dir, and clean-up of the temp files a killed writer leaves behind.

`RunDir(path).lock()` holds an OS file lock (flock, via filelock) on `path/.abliterate.lock` for as
long as the context is open. The kernel drops the lock when its process dies, however it dies, so a
lock left by a killed run never blocks the next one. The holder records its pid and command line in
`path/.abliterate.owner`, which only serves to name it when another process is refused.

Writers that write `X` atomically first write `.X.tmp-PID` (and move an old `X` aside to
`.X.old-PID`) next to it. `stale_temps` finds such siblings whose process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from abliterate.errors import AbliterateError, first_line

log = logging.getLogger("abliterate.rundir")

LOCK_FILE = ".abliterate.lock"
OWNER_FILE = ".abliterate.owner"

# `.{name}.tmp-{pid}` / `.{name}.old-{pid}`: what a writer of `name` leaves behind when it is killed.
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")

# Run dirs this process holds, resolved path -> nesting depth: the lock is re-entrant in one process.
_held: dict[str, int] = {}


def temp_sibling(target: Path, kind: str) -> Path:
    """Where this process writes `target` before renaming it into place (kind "tmp") or moves it aside ("old")."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp sibling to write, renamed onto `path` when done: a kill never leaves half a file."""
    tmp = temp_sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to someone else
        return True
    return True


def stale_temps(parent: Path, name: str | None = None) -> list[tuple[Path, str]]:
    """(path, kind) of the temp siblings in `parent` (of `name`, or of any name) whose writer is gone."""
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    stale = []
    for path in entries:
        match = _TEMP.fullmatch(path.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and not pid_alive(pid):
            stale.append((path, match["kind"]))
    return stale


@contextmanager
def undone_on_failure(path: Path, settings: frozenset[str]) -> Iterator[None]:
    """Around a verb that makes or fills the run dir `path`: when it fails having added nothing but the files
    named in `settings` (its config, the lock), take those back, and the dirs it created, so that bad input
    leaves no half-made run dir. Anything that was there before, or that the verb made besides, is kept."""
    created = []  # the dirs this verb will create, deepest first
    missing = path
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        before = set(os.listdir(path)) if path.is_dir() else set()
    except OSError:
        before = None  # unreadable: never undo
    try:
        yield
    except BaseException:
        with suppress(OSError):
            added = set(os.listdir(path)) - before if before is not None else {None}
            if added <= settings:
                for name in added:
                    (path / name).unlink(missing_ok=True)
                for directory in created:
                    directory.rmdir()  # stops at the first that is not empty
        raise


class RunDir:
    """A run dir (study.db, cache/, ...) that one process at a time may write."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def create(self) -> Path:
        """The dir, created with its parents; a one-line error naming the fix when it can't be."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise AbliterateError(
                f"cannot create run dir {self.path} ({first_line(err)}); choose a writable --output_dir"
            ) from err
        if not os.access(self.path, os.W_OK):
            raise AbliterateError(f"run dir {self.path} is not writable; choose a writable --output_dir")
        return self.path

    def holder(self) -> dict | None:
        """What the current holder recorded about itself (pid, started, command), if readable."""
        try:
            owner = json.loads((self.path / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None

    def _busy(self) -> AbliterateError:
        owner = self.holder()
        fix = "wait for it or use another --output_dir"
        if owner is None or not pid_alive(owner["pid"]):  # the holder is starting up or just finished
            return AbliterateError(f"{self.path} is in use by another abliterate process; {fix}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
        command = str(owner.get("command", "?"))[:200]
        return AbliterateError(
            f"{self.path} is in use by abliterate pid {owner['pid']} (started {started}: {command}); {fix}"
        )

    @contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold the run dir for this process; refuse at once when another live process holds it."""
        self.create()
        key = str(self.path.resolve())
        if key in _held:  # already ours: nested use in the same process
            _held[key] += 1
            try:
                yield self
            finally:
                _held[key] -= 1
            return
        file_lock = FileLock(self.path / LOCK_FILE, timeout=0, thread_local=False)
        try:
            file_lock.acquire()
        except Timeout:
            raise self._busy() from None
        except OSError as err:
            raise AbliterateError(
                f"cannot lock run dir {self.path} ({first_line(err)}); choose a writable --output_dir"
            ) from err
        _held[key] = 1
        owner = self.path / OWNER_FILE
        try:
            record = {"pid": os.getpid(), "started": time.time(), "command": " ".join(sys.argv)}
            tmp = temp_sibling(owner, "tmp")
            try:
                tmp.write_text(json.dumps(record))
                os.replace(tmp, owner)
            except OSError as err:  # only used to name us to others: not worth failing the run for
                with suppress(OSError):
                    tmp.unlink()
                log.warning("could not record the holder of %s: %s", self.path, first_line(err))
            yield self
        finally:
            del _held[key]
            try:
                if (self.holder() or {}).get("pid") == os.getpid():
                    owner.unlink()
            except OSError as err:
                log.debug("could not remove %s: %s", owner, err)
            file_lock.release()
