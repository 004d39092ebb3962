"""One error type for bad user input: the CLI prints it as one line and exits non-zero."""


class AbliterateError(Exception):
    """A problem the user can fix. The message is one line and names the fix."""
