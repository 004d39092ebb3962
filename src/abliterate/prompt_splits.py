"""Split strings, which `datasets` parses ("train[:400]", "test[-5:]", "train[:10%]", "train+test"): the rows a
prompt source's split selects, for map-style and streamed datasets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import datasets

from abliterate.errors import AbliterateError, first_line

if TYPE_CHECKING:
    from abliterate.prompts import PromptSource


def parse_split(source: PromptSource) -> datasets.ReadInstruction:
    try:
        return datasets.ReadInstruction.from_spec(source.split.strip())
    except ValueError as error:
        raise AbliterateError(
            f"split {source.split!r} of {source.dataset} is not understood ({first_line(error)}); "
            "set split: a name with an optional row slice, e.g. train[:400]"
        ) from error


def split_parts(split: datasets.ReadInstruction) -> list:
    """The parsed `+`-separated parts (splitname, from_, to, unit "abs" or "%").

    `datasets` has no public accessor for them; streaming needs the raw bounds, since a stream's length is unknown.
    """
    return split._relative_instructions


def split_names(split: datasets.ReadInstruction) -> list[str]:
    return list(dict.fromkeys(part.splitname for part in split_parts(split)))


def split_rows(
    source: PromptSource, split: datasets.ReadInstruction, lengths: dict[str, int]
) -> list[tuple[str, range]]:
    """(split name, rows) per part of `split`, given each split's length."""
    try:
        return [(part.splitname, range(part.from_, part.to)) for part in split.to_absolute(lengths)]
    except ValueError as error:  # e.g. pct1_dropremainder rounding on fewer than 100 rows
        raise AbliterateError(
            f"split {source.split!r} of {source.dataset} does not apply ({first_line(error)}); set split like train[:400]"
        ) from error


def streamed_rows(source: PromptSource, split: datasets.ReadInstruction) -> tuple[int, int]:
    """(rows to skip, rows to read) for a streamed source; rows arrive in order, so only plain row numbers work."""
    parts = split_parts(split)
    part = parts[0]
    if len(parts) > 1 or part.unit == "%" or (part.from_ or 0) < 0 or (part.to or 0) < 0:
        raise AbliterateError(
            f"streaming {source.dataset} reads rows in order, so split {source.split!r} must be one split with non-negative row numbers; "
            "set split like train[100:500], or streaming: false"
        )
    start = part.from_ or 0
    count = None if part.to is None else max(part.to - start, 0)
    if source.limit is not None:
        count = source.limit if count is None else min(count, source.limit)
    if count is None:
        raise AbliterateError(
            f"streaming {source.dataset} needs a row count; set limit (or a split slice end like {part.splitname}[:1000])"
        )
    return start, count
