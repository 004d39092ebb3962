"""What is wrong with a local prompt file that failed to load: one line naming the file, the line and the fix."""

import json
import logging
from pathlib import Path

import datasets

from abliterate.errors import AbliterateError, first_line

# File suffix -> the `datasets` packaged builder that reads it (.txt is read here: one prompt a line).
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FILE_SUFFIXES = (".txt", *BUILDERS)


def utf8_problem(path: Path) -> str | None:
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                byte = line[error.start]
                column = error.start + 1
                return f"line {number} is not UTF-8 (byte 0x{byte:02x} at column {column}); save the file as UTF-8"
    return None


def _json_problem(path: Path) -> str | None:
    text = path.read_text(encoding="utf-8-sig")
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as whole:
        document_error = whole
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:
        json.loads(first)
        json_lines = True
    except json.JSONDecodeError:
        json_lines = path.suffix.lower() == ".jsonl"
    if not json_lines:  # one JSON document
        return (
            f"line {document_error.lineno} is not valid JSON ({document_error.msg} at column {document_error.colno}); "
            "fix the JSON there"
        )
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return (
                    f"line {number} is not valid JSON ({error.msg} at column {error.colno}); "
                    "fix that line (JSON Lines: one object per line)"
                )
    return None


def _file_problem(path: Path) -> str | None:
    """What makes a data file unreadable (an empty file, bad UTF-8, bad JSON), or None if that is not it."""
    if path.stat().st_size == 0:
        return "is empty; put prompts in it"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return None
    problem = utf8_problem(path)
    if problem is None and suffix in (".json", ".jsonl"):
        problem = _json_problem(path)
    return problem


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)


def _root_cause(error: BaseException) -> BaseException:
    seen = {id(error)}
    while (nxt := error.__cause__ or error.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        error = nxt
    return error


def reading_files(path: Path, read):
    """read(), with a failure caused by a local data file under `path` turned into one line naming file and line."""
    # The json and csv builders log the error they then raise; it is reported here in one line instead.
    builders_log = logging.getLogger("datasets.packaged_modules")
    level = builders_log.level
    builders_log.setLevel(logging.CRITICAL)
    try:
        return read()
    except AbliterateError:
        raise
    except Exception as error:
        for file in _data_files(path):
            problem = _file_problem(file)
            if problem is not None:
                raise AbliterateError(f"{file} {problem}") from error
        if isinstance(error, datasets.exceptions.DatasetGenerationError):
            raise AbliterateError(
                f"could not read {path} ({first_line(_root_cause(error))}); "
                f"check that its files are valid {'/'.join(BUILDERS)} data"
            ) from error
        raise
    finally:
        builders_log.setLevel(level)


# ---- one reader per kind of source; each returns the raw column values, split slice and limit applied ----
