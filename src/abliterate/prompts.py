"""Prompt sets: load them from files, dataset dirs or the hub, and wrap them in a chat template.

Every `PromptSource` field has a docstring: LightningCLI turns them into `--help`.
"""

import ast
import contextlib
import dataclasses
import difflib
import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import jinja2

from abliterate.errors import AbliterateError, first_line
from abliterate.prompt_files import BUILDERS, FILE_SUFFIXES, reading_files, utf8_problem
from abliterate.prompt_splits import parse_split, split_names, split_parts, split_rows, streamed_rows

log = logging.getLogger("abliterate.prompts")

TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".tmpl", ".txt")


@dataclass
class PromptSource:
    """Where one prompt set comes from."""

    dataset: str
    """hub dataset id, a local dataset dir (from save_to_disk, or a dir of data files), or a .txt/.json/.jsonl/.csv/.parquet file (.txt: one prompt a line)."""
    config: str | None = None
    """dataset subset (config) name, e.g. "en" for allenai/c4."""
    split: str = "train"
    """split, optionally sliced by row: "train", "train[:400]", "test[100:200]", "train[-50:]", "train[:10%]". A single file or a saved single split has one split, so any name reads it and only the slice counts ("test[:100]" on a .txt file: its first 100 prompts)."""
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
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise AbliterateError(
                f"a prompt source has dataset {self.dataset!r}; name a hub id, a dataset dir or a {'/'.join(FILE_SUFFIXES)} file"
            )
        if self.limit is not None and self.limit < 1:
            raise AbliterateError(
                f"prompt limit for {self.dataset} is {self.limit}; set limit >= 1, or null for all rows"
            )


# What a prompt role takes: a PromptSource, or a string or path naming its dataset (the other fields default).
# os.PathLike also keeps a file name as given on the command line: with a dataclass in the union, jsonargparse
# would otherwise read an existing file as a sub-config, and could take a .txt file's text for the string.
PromptSourceLike = PromptSource | str | os.PathLike


def _not_a_source(fields: dict, role: str) -> AbliterateError:
    """What is wrong with a role's mapping that jsonargparse could not make a PromptSource of (it then falls
    through to the union's `str` and arrives here as the mapping's rendering)."""
    known = [f.name for f in dataclasses.fields(PromptSource)]
    unknown = [str(key) for key in fields if key not in known]
    if unknown:
        hints = [difflib.get_close_matches(key, known, n=1, cutoff=0.6) for key in unknown]
        named = ", ".join(f"{k} (did you mean {h[0]}?)" if h else k for k, h in zip(unknown, hints, strict=True))
        return AbliterateError(f"data.{role} has unknown field {named}; a prompt source takes {', '.join(known)}")
    try:
        PromptSource(**fields)
    except AbliterateError as err:
        return err
    except TypeError as err:
        return AbliterateError(f"data.{role} {fields}: {err}")
    return AbliterateError(f"data.{role} {fields}: check each field's type (limit: a number, streaming: true/false)")


def as_source(value: PromptSourceLike | None, role: str = "<role>") -> PromptSource | None:
    """A prompt role's source: a string or path is the `dataset` (hub id, dir or file) with default fields."""
    if isinstance(value, str) and value.startswith("{"):
        fields = None
        with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
            fields = ast.literal_eval(value)
        if isinstance(fields, dict):
            raise _not_a_source(fields, role)
    if isinstance(value, str) and value.startswith("Namespace("):
        # jsonargparse's rendering of fields given without a dataset, e.g. --data.harmful.limit 5 after
        # --data.harmful p.txt (a field flag replaces a plain string) or with no dataset at all.
        raise AbliterateError(
            "a prompt role got fields but no dataset; add --data.<role>.dataset p.txt, "
            "or give the role whole: --data.<role> '{dataset: p.txt, limit: 5}'"
        )
    return PromptSource(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else value


def _select(source: PromptSource, split: datasets.ReadInstruction, splits: dict) -> datasets.Dataset:
    """The rows of map-style `splits` (name -> Dataset) that `split` selects."""
    if source.streaming:
        start, count = streamed_rows(source, split)  # same rules as any streamed source
        name = split_parts(split)[0].splitname
        pieces = [(name, range(len(splits[name]))[start : start + count])]
    else:
        pieces = split_rows(source, split, {name: len(ds) for name, ds in splits.items()})
    selected = []
    for name, rows in pieces:
        ds = splits[name]
        if rows != range(len(ds)):
            ds = ds.select(rows if len(rows) else [])  # select() rejects an empty range past the end
        selected.append(ds)
    return selected[0] if len(selected) == 1 else datasets.concatenate_datasets(selected)


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


def _read_txt(source: PromptSource, path: Path, split: datasets.ReadInstruction) -> list[str]:
    try:
        with path.open(encoding="utf-8-sig") as file:
            lines = (line.strip() for line in file)
            prompts = (line for line in lines if line)
            if source.streaming:
                start, count = streamed_rows(source, split)
                return list(itertools.islice(prompts, start, start + count))
            rows = list(prompts)
    except UnicodeDecodeError as error:
        raise AbliterateError(f"{path} {utf8_problem(path) or first_line(error)}") from error
    # A text file has one split: every part of `split` names it.
    lengths = dict.fromkeys(split_names(split), len(rows))
    rows = [rows[i] for _, part in split_rows(source, split, lengths) for i in part]
    return rows if source.limit is None else rows[: source.limit]


def _read_dataset(source: PromptSource, ds: datasets.Dataset) -> list[str]:
    """Values of a map-style dataset whose split slice is already applied."""
    _check_column(source, ds.column_names)
    if source.limit is not None and len(ds) > source.limit:
        ds = ds.select(range(source.limit))
    # Only the prompt column is read: other columns (images, long documents) stay on disk.
    return _texts(source, ds[source.column], _string_columns(ds.features))


def _read_iterable(source: PromptSource, ds: datasets.IterableDataset, split: datasets.ReadInstruction) -> list[str]:
    start, count = streamed_rows(source, split)
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


def _read_saved(source: PromptSource, path: Path, split: datasets.ReadInstruction) -> list[str]:
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        missing = [name for name in split_names(split) if name not in saved]
        if missing:
            raise AbliterateError(f"{path} has no split {missing[0]!r}; set split: one of {', '.join(saved)}")
        splits = dict(saved)
    else:
        # A saved Dataset is one split: every part of `split` names it.
        splits = dict.fromkeys(split_names(split), saved)
    return _read_dataset(source, _select(source, split, splits))


def _load_dataset(source: PromptSource, split: datasets.ReadInstruction, path: str, **kwargs) -> list[str]:
    """`datasets.load_dataset` for hub ids and dirs of data files."""
    try:
        if source.streaming:
            streamed_rows(source, split)  # one split, plain row numbers
            ds = datasets.load_dataset(path, split=split_parts(split)[0].splitname, streaming=True, **kwargs)
        else:
            # datasets slices map-style splits itself ("train[:400]", "train[:10%]", "train+test").
            ds = datasets.load_dataset(path, split=str(split), **kwargs)
    except (ConnectionError, FileNotFoundError) as error:
        if Path(source.dataset).expanduser().is_dir():  # a local dir without data files
            raise AbliterateError(
                f"could not load {source.dataset}: the dir holds no dataset ({first_line(error)}); point at a "
                f"dir saved by datasets' save_to_disk, a dir of {'/'.join(FILE_SUFFIXES)} files, or one such file"
            ) from error
        raise AbliterateError(
            f"could not load {source.dataset}: not a local file or dir, and not available from the hub ({first_line(error)}); "
            "check the dataset path or id, or download it first"
        ) from error
    except ValueError as error:
        message = first_line(error)
        if "split" in message.lower() or "config" in message.lower():
            raise AbliterateError(f"could not load {source.dataset}: {message}; check split and config") from error
        raise
    if isinstance(ds, datasets.IterableDataset):
        return _read_iterable(source, ds, split)
    return _read_dataset(source, ds)


def _read_file(source: PromptSource, path: Path, split: datasets.ReadInstruction) -> list[str]:
    """A .json/.jsonl/.csv/.parquet file: one split, whatever the split name says."""
    builder = BUILDERS[path.suffix.lower()]
    if source.streaming:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
        return _read_iterable(source, ds, split)
    ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    return _read_dataset(source, _select(source, split, dict.fromkeys(split_names(split), ds)))


def _read(source: PromptSource, split: datasets.ReadInstruction) -> list[str]:
    path = Path(os.path.expanduser(source.dataset))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return _read_txt(source, path, split)
        if suffix not in BUILDERS:
            raise AbliterateError(
                f"{path} has an unsupported extension {suffix or '(none)'!r}; use a {'/'.join(FILE_SUFFIXES)} file or a dataset dir"
            )
        return reading_files(path, lambda: _read_file(source, path, split))
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _read_saved(source, path, split)
        return reading_files(path, lambda: _load_dataset(source, split, str(path), name=source.config))
    if path.suffix.lower() in FILE_SUFFIXES or source.dataset.startswith((".", "/", "~")):
        raise AbliterateError(f"prompt file or dir {source.dataset} does not exist; check the dataset path")
    return _load_dataset(source, split, source.dataset, name=source.config)


def load_prompts(source: PromptSource) -> list[str]:
    """Prompts of `source`: prefix + text + suffix per row, stripped; split slice first, then `limit`."""
    start = time.perf_counter()
    split = parse_split(source)
    if source.streaming:
        streamed_rows(source, split)  # a stream without a row count would never end
    texts = _read(source, split)
    prompts = [f"{source.prefix}{text}{source.suffix}".strip() for text in texts]
    if source.limit is not None:
        prompts = prompts[: source.limit]
    if not prompts:
        raise AbliterateError(f"{source.dataset} ({source.split}) has no prompts; check split/limit")
    if Path(os.path.expanduser(source.dataset)).suffix.lower() == ".txt":
        details = ""  # one prompt a line: no split name or column to report
    else:
        details = f" ({source.split}, column {source.column}{', streamed' if source.streaming else ''})"
    log.info("loaded %d prompts from %s%s in %.2fs", len(prompts), source.dataset, details, time.perf_counter() - start)
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
                first_line(error),
            )
    return list(render([conversation(prompt, fold) for prompt in prompts]))
