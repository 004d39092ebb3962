"""Errors and interrupts: bad user input becomes one line and a non-zero exit; Ctrl-C or SIGTERM, a resume hint."""

import threading


class AbliterateError(Exception):
    """A problem the user can fix. The message is one line and names the fix."""


def first_line(error: BaseException) -> str:
    """An exception's message as one short line, for wrapping it in an AbliterateError."""
    text = " ".join(str(error).split())
    return text[:300] if text else type(error).__name__


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a phase, with what was kept and how to resume (exit code 130)."""


INTERRUPT_REQUESTED = threading.Event()
"""Set by the CLI's SIGINT/SIGTERM handler beside the KeyboardInterrupt it raises. Python swallows an exception
raised where it cannot propagate (a finalizer run by the garbage collector), so the search also checks this
between trials: a Ctrl-C is never lost."""


def explain(error: BaseException) -> str | None:
    """One line for failures whose library message hides the cause (None: not one of them)."""
    text = " ".join(f"{e}" for e in chain(error))
    if (
        isinstance(error, OSError)
        and error.errno == 28
        or "database or disk is full" in text
        or "No space left" in text
    ):
        return "the disk is full; free some space, then rerun the same command to resume (finished trials are kept)"
    if "file is not a database" in text:
        return "study.db is not an Optuna study (damaged or another file); move it aside, or use another --output_dir"
    return None


def chain(error: BaseException):
    """The error, then its causes and contexts."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
