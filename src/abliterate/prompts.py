"""Prompt sets: load them from files, dataset dirs or the hub, and wrap them in a chat template.

Every `PromptSource` field has a docstring: LightningCLI turns them into `--help`.
"""

import itertools
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import jinja2

from abliterate.errors import AbliterateError

log = logging.getLogger("abliterate.prompts")

# File suffix -> the `datasets` packaged builder that reads it (.txt is read here: one prompt a line).
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FILE_SUFFIXES = (".txt", *BUILDERS)
TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".tmpl", ".txt")

# "train", "train[:400]", "test[10:20]", "train[-5:]", "train[:10%]"
_SPLIT = re.compile(r"^\s*([\w.-]+)\s*(?:\[\s*(-?\d+)?\s*(%)?\s*:\s*(-?\d+)?\s*(%)?\s*\])?\s*$")


@dataclass
class PromptSource:
    """Where one prompt set comes from."""

    dataset: str
    """hub dataset id, a local dataset dir (from save_to_disk, or a dir of data files), or a .txt/.json/.jsonl/.csv/.parquet file (.txt: one prompt a line)."""
    config: str | None = None
    """dataset subset (config) name, e.g. "en" for allenai/c4."""
    split: str = "train"
    """split, optionally sliced by row: "train", "train[:400]", "test[100:200]"."""
    column: str = "text"
    """column holding the prompt text (ignored for .txt files)."""
    streaming: bool = False
    """read only the rows needed (split slice and limit) instead of downloading the whole dataset; needs limit or a slice end."""
    limit: int | None = None
    """keep at most this many prompts (after the split slice); None keeps all."""
    system_prompt: str | None = None
    """system prompt for this set; None uses the data module's."""
    prefix: str = ""
    """text put before every prompt."""
    suffix: str = ""
    """text put after every prompt."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise AbliterateError(
                f"prompt limit for {self.dataset} is {self.limit}; set limit >= 1, or null for all rows"
            )


@dataclass(frozen=True)
class _Split:
    name: str
    start: int | None = None
    stop: int | None = None
    start_percent: bool = False
    stop_percent: bool = False

    def bounds(self, n: int) -> range:
        """The rows this slice selects from a split of n rows (percent rounds like `datasets`)."""

        def resolve(value: int | None, percent: bool) -> int | None:
            return value if value is None or not percent else int(round(value * n / 100.0))

        start = resolve(self.start, self.start_percent)
        stop = resolve(self.stop, self.stop_percent)
        return range(n)[slice(start, stop)]


def _parse_split(source: PromptSource) -> _Split:
    match = _SPLIT.match(source.split)
    if match is None:
        raise AbliterateError(
            f"split {source.split!r} of {source.dataset} is not understood; set split: a name with an optional row slice, e.g. train[:400]"
        )
    name, start, start_pct, stop, stop_pct = match.groups()
    return _Split(
        name,
        None if start is None else int(start),
        None if stop is None else int(stop),
        bool(start_pct),
        bool(stop_pct),
    )


def _streamed_rows(source: PromptSource, split: _Split) -> tuple[int, int]:
    """(rows to skip, rows to read) for a streamed source; rows arrive in order, so only plain row numbers work."""
    if split.start_percent or split.stop_percent or (split.start or 0) < 0 or (split.stop or 0) < 0:
        raise AbliterateError(
            f"streaming {source.dataset} reads rows in order, so split {source.split!r} must use non-negative row numbers; "
            "set split like train[100:500], or streaming: false"
        )
    start = split.start or 0
    count = None if split.stop is None else max(split.stop - start, 0)
    if source.limit is not None:
        count = source.limit if count is None else min(count, source.limit)
    if count is None:
        raise AbliterateError(
            f"streaming {source.dataset} needs a row count; set limit (or a split slice end like {split.name}[:1000])"
        )
    return start, count


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def _check_column(source: PromptSource, columns: Sequence[str] | None) -> None:
    if columns is not None and source.column not in columns:
        raise AbliterateError(
            f"{source.dataset} has no column {source.column!r}; set column: one of {', '.join(map(str, columns))}"
        )


def _texts(source: PromptSource, values: Iterable, columns: Sequence[str] | None) -> list[str]:
    texts = []
    for row, value in enumerate(values):
        if not isinstance(value, str):
            hint = (
                f"; set column: one of {', '.join(map(str, columns))}" if columns else "; set column to a text column"
            )
            raise AbliterateError(
                f"column {source.column!r} of {source.dataset} holds {type(value).__name__} values (row {row}), not text{hint}"
            )
        texts.append(value)
    return texts


def _string_columns(features) -> list[str] | None:
    if features is None:
        return None
    return [
        name
        for name, feature in features.items()
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    ]


# ---- one reader per kind of source; each returns the raw column values, split slice and limit applied ----


def _read_txt(source: PromptSource, path: Path, split: _Split) -> list[str]:
    if split.name != "train":
        raise AbliterateError(
            f"{path} is a text file with one split, 'train'; set split: train (optionally sliced, e.g. train[:400])"
        )
    with path.open(encoding="utf-8") as file:
        lines = (line.strip() for line in file)
        prompts = (line for line in lines if line)
        if source.streaming:
            start, count = _streamed_rows(source, split)
            return list(itertools.islice(prompts, start, start + count))
        rows = list(prompts)
    rows = [rows[i] for i in split.bounds(len(rows))]
    return rows if source.limit is None else rows[: source.limit]


def _read_dataset(source: PromptSource, ds: datasets.Dataset) -> list[str]:
    """Values of a map-style dataset whose split slice is already applied."""
    _check_column(source, ds.column_names)
    if source.limit is not None and len(ds) > source.limit:
        ds = ds.select(range(source.limit))
    # Only the prompt column is read: other columns (images, long documents) stay on disk.
    return _texts(source, ds[source.column], _string_columns(ds.features))


def _read_iterable(source: PromptSource, ds: datasets.IterableDataset, split: _Split) -> list[str]:
    start, count = _streamed_rows(source, split)
    columns = ds.column_names  # None when the features are only known once rows are read
    _check_column(source, columns)
    text_columns = _string_columns(ds.features)
    if columns is not None:
        ds = ds.select_columns([source.column])
    if start:
        ds = ds.skip(start)
    ds = ds.take(count)
    # islice, not plain iteration: IterableDataset.take pulls row count+1 before it stops.
    rows: Iterator[dict] = itertools.islice(iter(ds), count)

    def values() -> Iterator:
        for row in rows:
            if source.column not in row:
                _check_column(source, list(row))
            yield row[source.column]

    return _texts(source, values(), text_columns)


def _read_saved(source: PromptSource, path: Path, split: _Split) -> list[str]:
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split.name not in saved:
            raise AbliterateError(f"{path} has no split {split.name!r}; set split: one of {', '.join(saved)}")
        ds = saved[split.name]
    else:
        # A saved Dataset is one split; accept its own name (if recorded) or the default "train".
        own = str(saved.split) if saved.split is not None else None
        if split.name not in ("train", own):
            raise AbliterateError(
                f"{path} is a single saved split ({own or 'unnamed'}), not {split.name!r}; set split: train (optionally sliced)"
            )
        ds = saved
    if source.streaming:
        start, count = _streamed_rows(source, split)  # same rules as any streamed source
        rows = range(len(ds))[start : start + count]
    else:
        rows = split.bounds(len(ds))
    if rows != range(len(ds)):
        ds = ds.select(rows if len(rows) else [])  # select() rejects an empty range past the end
    return _read_dataset(source, ds)


def _load_dataset(source: PromptSource, split: _Split, path: str, **kwargs) -> list[str]:
    """`datasets.load_dataset` for packaged builders (local files) and hub ids."""
    try:
        if source.streaming:
            ds = datasets.load_dataset(path, split=split.name, streaming=True, **kwargs)
        else:
            # datasets slices map-style splits itself ("train[:400]", "train[:10%]", "train+test").
            ds = datasets.load_dataset(path, split=source.split, **kwargs)
    except (ConnectionError, FileNotFoundError) as error:
        raise AbliterateError(
            f"could not load {source.dataset}: not a local file or dir, and not available from the hub ({_one_line(error)}); "
            "check the dataset path or id, or download it first"
        ) from error
    except ValueError as error:
        message = _one_line(error)
        if "split" in message.lower() or "config" in message.lower():
            raise AbliterateError(f"could not load {source.dataset}: {message}; check split and config") from error
        raise
    if isinstance(ds, datasets.IterableDataset):
        return _read_iterable(source, ds, split)
    return _read_dataset(source, ds)


def _read(source: PromptSource, split: _Split) -> list[str]:
    path = Path(os.path.expanduser(source.dataset))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return _read_txt(source, path, split)
        if suffix not in BUILDERS:
            raise AbliterateError(
                f"{path} has an unsupported extension {suffix or '(none)'!r}; use a {'/'.join(FILE_SUFFIXES)} file or a dataset dir"
            )
        return _load_dataset(source, split, BUILDERS[suffix], data_files=str(path))
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _read_saved(source, path, split)
        return _load_dataset(source, split, str(path), name=source.config)
    if path.suffix.lower() in FILE_SUFFIXES or source.dataset.startswith((".", "/", "~")):
        raise AbliterateError(f"prompt file or dir {source.dataset} does not exist; check the dataset path")
    return _load_dataset(source, split, source.dataset, name=source.config)


def load_prompts(source: PromptSource) -> list[str]:
    """Prompts of `source`: prefix + text + suffix per row, stripped; split slice first, then `limit`."""
    start = time.perf_counter()
    split = _parse_split(source)
    if source.streaming:
        _streamed_rows(source, split)  # a stream without a row count would never end
    texts = _read(source, split)
    prompts = [f"{source.prefix}{text}{source.suffix}".strip() for text in texts]
    if source.limit is not None:
        prompts = prompts[: source.limit]
    if not prompts:
        raise AbliterateError(f"{source.dataset} ({source.split}) has no prompts; check split/limit")
    log.info(
        "loaded %d prompts from %s (%s, column %s%s) in %.2fs",
        len(prompts),
        source.dataset,
        source.split,
        source.column,
        ", streamed" if source.streaming else "",
        time.perf_counter() - start,
    )
    return prompts


# ---- chat formatting ----


def _template_text(chat_template: str | None) -> str | None:
    """A template string, read from a file when `chat_template` names one."""
    if chat_template is None:
        return None
    looks_like_path = "{" not in chat_template and "\n" not in chat_template
    if looks_like_path:
        path = Path(os.path.expanduser(chat_template))
        if path.is_file():
            return path.read_text(encoding="utf-8")
        if path.suffix.lower() in TEMPLATE_SUFFIXES or os.sep in chat_template:
            raise AbliterateError(f"chat template file {chat_template} does not exist; check the chat_template path")
    # A Jinja string, or the name of one of the tokenizer's templates (e.g. "tool_use").
    return chat_template


def format_chat(
    tokenizer,
    prompts: Sequence[str],
    *,
    system_prompt: str | None = None,
    chat_template: str | None = None,
    enable_thinking: bool | None = None,
) -> list[str]:
    """Each prompt as one user turn (after an optional system turn) with the generation prompt appended.

    `chat_template` (a Jinja string or a file path) replaces the tokenizer's template. Templates
    that reject a system role (e.g. Gemma 2) get the system prompt folded into the user turn.
    """
    template = _template_text(chat_template)
    model = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise AbliterateError(
            f"model {model} has no chat template; pass --data.chat_template <Jinja string or file path>"
        )
    if not prompts:
        return []
    kwargs: dict = {"tokenize": False, "add_generation_prompt": True}
    if template is not None:
        kwargs["chat_template"] = template
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking  # only templates that know the switch see it

    def conversation(prompt: str, fold: bool) -> list[dict[str, str]]:
        if system_prompt is None:
            return [{"role": "user", "content": prompt}]
        if fold:
            return [{"role": "user", "content": f"{system_prompt}\n\n{prompt}"}]
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]

    def render(conversations: list[list[dict[str, str]]]) -> list[str]:
        try:
            return tokenizer.apply_chat_template(conversations, **kwargs)
        except jinja2.TemplateSyntaxError as error:
            raise AbliterateError(
                f"chat template of {model} does not parse (line {error.lineno}: {error.message}); fix --data.chat_template"
            ) from error

    fold = False
    if system_prompt is not None:
        # Try the system role once, on the first prompt, and fold only if the template rejects it.
        try:
            render([conversation(prompts[0], fold=False)])
        except AbliterateError:
            raise
        except Exception as error:
            if "system" not in str(error).lower():
                raise
            fold = True
            log.info(
                "chat template of %s rejects the system role (%s); folding the system prompt into the user turn",
                model,
                _one_line(error),
            )
    return list(render([conversation(prompt, fold) for prompt in prompts]))
