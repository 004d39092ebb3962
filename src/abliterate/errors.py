"""One error type for bad user input: the CLI prints it as one line and exits non-zero."""


class AbliterateError(Exception):
    """A problem the user can fix. The message is one line and names the fix."""


def first_line(error: BaseException) -> str:
    """An exception's message as one short line, for wrapping it in an AbliterateError."""
    text = " ".join(str(error).split())
    return text[:300] if text else type(error).__name__
