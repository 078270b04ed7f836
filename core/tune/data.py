"""Examples for `swarm tune`: read a dataset, split it, tokenize it once, and cut it into padded batches.

Loading (:func:`load_data`) turns a dataset into a :class:`TuneData` of train and validation :class:`Example` lists:

* a local file: ``.jsonl`` (JSON lines), ``.json`` (JSON lines, or one JSON array of objects), ``.csv`` or ``.tsv``
  (a header row names the fields), read with the standard library. Fields default to ``text`` (or ``sentence``
  when the rows have no ``text``) and ``label``. Every problem is one :class:`ConfigError` naming the file, the
  line and the field.
* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
* any other name is a Hugging Face dataset id (``owner/name`` or ``owner/name:config``) or a short alias from
  :data:`DATASET_ALIASES` (``sst2``, ``imdb``, ``wikitext2``), loaded by ``datasets.load_dataset`` from its cache or
  the hub. When neither has it, a :class:`ConfigError` says so and points to local files.

The validation examples come from ``validation_file`` for a local file, else from the dataset's own ``validation``
split (or ``test``, when its labels are real), else from a deterministic split of the training rows
(``validation_split`` of them, chosen by ``random.Random(seed)``). Classification labels are integers (class ids
``0..max``, named ``"0".."max"``) or strings (mapped to ids in sorted order, named by the strings); a dataset's
``ClassLabel`` names are used when it has them. For the ``lm`` task labels are ignored and empty texts skipped.

Batching runs in two steps, so that a training loop over several epochs tokenizes once:

    items = prepare(data.train, tokenizer, max_length, task)      # token ids (+ class id) per item
    pad_id = pad_token_id(tokenizer)
    for epoch in range(epochs):
        total = count_batches(len(items), batch_size)              # for a progress bar
        for batch in batches(items, batch_size, pad_id=pad_id, task=task, shuffle=True, seed=seed, epoch=epoch):
            ...  # batch.input_ids [B, T], batch.attention_mask [B, T], batch.labels [B] or [B, T]

:func:`prepare` truncates a classification input to its first ``max_length`` tokens (one warning per call says how
many were cut) and splits an lm text into consecutive chunks of ``max_length`` tokens (:func:`lm_chunks`), so each
lm item is one chunk. :func:`batches` pads on the right with ``pad_id``; lm labels are the input ids with -100 at
padding (the model shifts them). Shuffling uses ``random.Random(seed + epoch)``: the same seed and epoch give the
same order.

Nothing here imports ``datasets`` until a directory or hub dataset is loaded.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...transport.errors import ConfigError

logger = logging.getLogger(__name__)

TASKS = ("classification", "lm")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
# Suffixes that make a name that does not exist read as a missing file rather than a hub dataset id.
_PATH_LIKE_SUFFIXES = (*FILE_SUFFIXES, ".txt", ".parquet", ".arrow")
_HINT = "pass a local file: --dataset ./data.jsonl --text-field sentence --label-field label " \
        "(.jsonl, .csv and .tsv are supported)"
_INT_LITERAL = re.compile(r"\s*[+-]?\d{1,18}\s*")  # a longer one is no class id (and int() would refuse it)
MAX_CLASSES = 1 << 16  # class ids are 0..MAX_CLASSES-1: the names of all of them are made, so a huge id is refused
_TOKENIZE_CHUNK = 1024  # texts handed to the tokenizer per call


@dataclass(frozen=True)
class DatasetAlias:
    """Where a short dataset name lives on the hub and which fields and splits to use."""

    path: str  # hub dataset id
    config: str | None  # dataset configuration (subset) name
    text_field: str | None  # column with the input text (None: "text", or "sentence" when there is no "text")
    label_field: str | None  # column with the class label (None: "label" for a hub id, no labels for an alias)
    train_split: str = "train"  # split the training examples come from
    validation_split: str | None = "validation"  # split the validation examples come from (None: split train)


DATASET_ALIASES: dict[str, DatasetAlias] = {
    "sst2": DatasetAlias("nyu-mll/glue", "sst2", "sentence", "label"),
    "imdb": DatasetAlias("stanfordnlp/imdb", None, "text", "label", validation_split="test"),
    "wikitext2": DatasetAlias("Salesforce/wikitext", "wikitext-2-raw-v1", "text", None),
}


@dataclass(frozen=True, slots=True)
class Example:
    text: str  # the input text
    label: int | None  # class id for classification, None for lm


@dataclass
class TuneData:
    train: list[Example]  # training examples, shuffled with the seed (capped by max_examples)
    validation: list[Example]  # held-out examples (may be empty)
    labels: list[str] | None  # class names in id order for classification, None for lm

    @property
    def num_labels(self) -> int:
        """How many classes there are (0 for lm)."""
        return len(self.labels) if self.labels is not None else 0


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64 token ids, right-padded
    attention_mask: torch.Tensor  # [B, T] int64, 1 for tokens and 0 for padding
    labels: torch.Tensor  # classification: [B] class ids; lm: [B, T] token ids with -100 at padding

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on `device`."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


# A tokenized item: token ids and its class id (None for lm).
Item = tuple[list[int], int | None]
# A row before its label is encoded: where it came from (for messages), its text, its raw label.
_Row = tuple[str, str, Any]


# ---------------------------------------------------------------------------------------------------------- loading


def load_data(dataset: str, task: str = "classification", text_field: str | None = None,
              label_field: str | None = None, validation_split: float = 0.1, seed: int = 0,
              max_examples: int | None = None, validation_file: str | None = None) -> TuneData:
    """Load `dataset` for `task` ("classification" or "lm").

    `dataset` is a local file, a saved dataset directory, a hub id (``owner/name`` or ``owner/name:config``) or an
    alias from :data:`DATASET_ALIASES`. `text_field`/`label_field` name the fields (default: ``text``, or
    ``sentence``, and ``label``). `validation_file` (local files only) holds the validation examples. Otherwise a
    dataset's own ``validation`` (or labelled ``test``) split is used, and failing that `validation_split` of the
    training rows, in [0, 0.5], are held out. `seed` fixes that split and the order of the training examples;
    `max_examples` keeps the first that many of them. Raises :class:`ConfigError` for anything the user can fix.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    if not 0.0 <= validation_split <= 0.5:
        raise ConfigError(f"validation_split must be between 0 and 0.5, got {validation_split}")
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples must be at least 1, got {max_examples}")

    path = Path(dataset).expanduser()
    if path.is_file() or _looks_like_file(dataset, path):
        train_rows = _file_rows(path, task, text_field, label_field)
        if validation_file is not None:
            val_rows = _file_rows(Path(validation_file).expanduser(), task, text_field, label_field)
        else:
            train_rows, val_rows = _split(train_rows, validation_split, seed)
        return _finish(train_rows, val_rows, None, task, str(path), seed, max_examples,
                       shuffled=validation_file is None)
    if validation_file is not None:
        raise ConfigError(f"validation_file works with a local dataset file (.jsonl, .json, .csv, .tsv), "
                          f"not with {dataset!r}")
    if path.is_dir():
        return _load_saved(path, task, text_field, label_field, validation_split, seed, max_examples)
    return _load_hub(dataset, task, text_field, label_field, validation_split, seed, max_examples)


def _looks_like_file(dataset: str, path: Path) -> bool:
    """Whether a name that is not an existing directory means a local file (so a missing one is reported as such)."""
    if path.is_dir():
        return False
    if path.exists():
        return True
    return path.suffix.lower() in _PATH_LIKE_SUFFIXES or dataset.startswith(("./", "../", "/", "~", ".\\"))


def _finish(train_rows: list[_Row], val_rows: list[_Row], names: list[str] | None, task: str, source: str,
            seed: int, max_examples: int | None, shuffled: bool) -> TuneData:
    """Encode the labels of both parts together, shuffle and cap the training part."""
    if not train_rows:
        raise ConfigError(f"{source} has no training examples")
    if task == "lm":
        train = [Example(text, None) for _, text, _ in train_rows]
        validation = [Example(text, None) for _, text, _ in val_rows]
        labels = None
    else:
        ids, labels = _encode_labels(train_rows + val_rows, source, names)
        train = [Example(text, i) for (_, text, _), i in zip(train_rows, ids[:len(train_rows)], strict=True)]
        validation = [Example(text, i) for (_, text, _), i in zip(val_rows, ids[len(train_rows):], strict=True)]
    if not shuffled:
        random.Random(seed).shuffle(train)
    if max_examples is not None:
        train = train[:max_examples]
    return TuneData(train, validation, labels)


def _split(rows: list[_Row], validation_split: float, seed: int) -> tuple[list[_Row], list[_Row]]:
    """Hold out max(1, round(n * validation_split)) rows chosen by `seed`; both parts come back shuffled."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * validation_split)) if len(rows) >= 2 and validation_split > 0 else 0
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


# ------------------------------------------------------------------------------------------------------- local files


def _file_rows(path: Path, task: str, text_field: str | None, label_field: str | None) -> list[_Row]:
    """Read one local file into rows, checking fields and types as it goes."""
    if not path.exists():
        raise ConfigError(f"dataset file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; validation_file must be a .jsonl, .json, .csv or .tsv file")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ConfigError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; supported are .jsonl, "
                          f".json (JSON lines or a JSON array of objects), .csv and .tsv")
    try:
        if suffix in (".csv", ".tsv"):
            records = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
        else:
            content = path.read_text(encoding="utf-8-sig")
            is_array = suffix == ".json" and content.lstrip().startswith("[")
            records = _read_json_array(path, content) if is_array else _read_json_lines(path, content)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not records:
        raise ConfigError(f"{path} has no examples (the file is empty)")
    return _rows(records, str(path), task, text_field, label_field, labels_are_text=suffix in (".csv", ".tsv"))


def _read_json_lines(path: Path, content: str) -> list[tuple[str, dict[str, Any]]]:
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        except (RecursionError, ValueError) as exc:  # nested too deeply, or an integer of more than 4300 digits
            raise ConfigError(f"{path} line {number}: unreadable JSON ({_unreadable(exc)})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path} line {number}: expected a JSON object with the fields, got "
                              f"{_type_name(record)}")
        records.append((f"line {number}", record))
    return records


def _unreadable(exc: Exception) -> str:
    """Why json could read no value where the text is valid JSON (json's decoder recurses once per level)."""
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _read_json_array(path: Path, content: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    except (RecursionError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable JSON ({_unreadable(exc)})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected JSON lines or a JSON array of objects, got {_type_name(data)}")
    for index, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise ConfigError(f"{path} item {index}: expected a JSON object with the fields, got {_type_name(record)}")
    return [(f"item {index}", record) for index, record in enumerate(data, start=1)]


def _read_delimited(path: Path, delimiter: str) -> list[tuple[str, dict[str, Any]]]:
    # newline="" lets quoted fields hold line breaks, as the csv module expects
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            return _delimited_records(path, reader, delimiter)
        except csv.Error as exc:  # e.g. a field longer than csv.field_size_limit() (128 KiB)
            raise ConfigError(f"{path} line {reader.line_num}: {exc}") from None


def _delimited_records(path: Path, reader: Any, delimiter: str) -> list[tuple[str, dict[str, Any]]]:
    header = next(reader, None)
    if header is None:
        return []
    records = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        where = f"line {reader.line_num}"
        if len(row) != len(header):
            raise ConfigError(f"{path} {where}: {len(row)} fields, but the header has {len(header)} "
                              f"({', '.join(header)}); quote fields that contain {_delimiter_name(delimiter)}")
        records.append((where, dict(zip(header, row, strict=True))))
    return records


def _delimiter_name(delimiter: str) -> str:
    return "tabs" if delimiter == "\t" else "commas"


def _rows(records: list[tuple[str, dict[str, Any]]], source: str, task: str, text_field: str | None,
          label_field: str | None, labels_are_text: bool) -> list[_Row]:
    """Pull text and raw label out of each record; `where` in messages is `source` plus the record's place."""
    first = records[0][1]
    if text_field is None:
        text_field = "sentence" if "text" not in first and "sentence" in first else "text"
    if label_field is None:
        label_field = "label"
    rows: list[_Row] = []
    for place, record in records:
        where = f"{source} {place}"
        if text_field not in record:
            raise ConfigError(f"{where}: no text field {text_field!r} (the row has: {_fields(record)}); "
                              f"choose one with --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            raise ConfigError(f"{where}: text field {text_field!r} must be a string, got {_type_name(text)}")
        if task == "lm":
            if text.strip():
                rows.append((where, text, None))
            continue
        if not text.strip():
            raise ConfigError(f"{where}: text field {text_field!r} is empty")
        if label_field not in record:
            raise ConfigError(f"{where}: no label field {label_field!r} (the row has: {_fields(record)}); "
                              f"choose one with --label-field")
        rows.append((where, text, _check_label(record[label_field], where, label_field)))
    if not rows:
        raise ConfigError(f"{source} has no examples (every {text_field!r} is empty)")
    if labels_are_text and task == "classification" and all(_INT_LITERAL.fullmatch(label) for _, _, label in rows):
        rows = [(where, text, int(label)) for where, text, label in rows]
    return rows


def _check_label(label: Any, where: str, label_field: str) -> int | str:
    if isinstance(label, bool) or not isinstance(label, int | str):
        raise ConfigError(f"{where}: label field {label_field!r} must be an integer or a string, "
                          f"got {_type_name(label)} {label!r}")
    if isinstance(label, str) and not label.strip():
        raise ConfigError(f"{where}: label field {label_field!r} is empty")
    return label


def _encode_labels(rows: list[_Row], source: str, names: list[str] | None) -> tuple[list[int], list[str]]:
    """Class ids for the rows' labels and the class names (given `names` for ClassLabel columns)."""
    ints = [row for row in rows if isinstance(row[2], int)]
    strs = [row for row in rows if isinstance(row[2], str)]
    if ints and strs:
        raise ConfigError(f"{source}: labels mix integers and strings ({ints[0][0]} has {ints[0][2]!r}, "
                          f"{strs[0][0]} has {strs[0][2]!r}); use one kind")
    if strs:
        names = sorted({label for _, _, label in rows})
        index = {name: i for i, name in enumerate(names)}
        ids = [index[label] for _, _, label in rows]
    else:
        for where, _, label in rows:
            if label < 0:
                raise ConfigError(f"{where}: label {label} is negative; integer labels are class ids 0, 1, 2, ...")
            if label >= MAX_CLASSES:
                raise ConfigError(f"{where}: label {label} is not a class id swarm tunes for (ids are 0 to "
                                  f"{MAX_CLASSES - 1}); use string labels for names")
            if names is not None and label >= len(names):
                raise ConfigError(f"{where}: label {label} is not a class id of this dataset "
                                  f"(it has {len(names)} classes)")
        ids = [label for _, _, label in rows]
        if names is None:
            names = [str(i) for i in range(max(ids) + 1)]
    distinct = sorted(set(ids))
    if len(distinct) < 2:
        found = ", ".join(repr(names[i]) for i in distinct)
        raise ConfigError(f"{source}: classification needs at least 2 distinct labels, found {len(distinct)} "
                          f"({found})")
    return ids, names


def _fields(record: dict[str, Any]) -> str:
    return ", ".join(repr(key) for key in record) or "no fields"


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------ datasets: disk and hub


def _load_saved(path: Path, task: str, text_field: str | None, label_field: str | None, validation_split: float,
                seed: int, max_examples: int | None) -> TuneData:
    """A directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    saved = (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    if not saved and not (path / "dataset_dict.json").is_file():
        raise ConfigError(f"{path} is a directory but not a dataset saved with save_to_disk (it has no "
                          f"dataset_dict.json, or dataset_info.json and state.json); pass a .jsonl, .json, .csv or "
                          f".tsv file instead")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # a damaged directory: say which, keep the cause for --debug
        raise ConfigError(f"cannot load the saved dataset {path}: {_reason(exc)}") from exc
    return _from_datasets(loaded, str(path), None, task, text_field, label_field, validation_split, seed,
                          max_examples)


def _load_hub(dataset: str, task: str, text_field: str | None, label_field: str | None, validation_split: float,
              seed: int, max_examples: int | None) -> TuneData:
    """A hub dataset id (``owner/name`` or ``owner/name:config``) or an alias, from the datasets cache or the hub."""
    alias = DATASET_ALIASES.get(dataset.lower())
    if alias is None:
        name, _, config = dataset.partition(":")
        alias = DatasetAlias(name, config or None, None, None, validation_split=None)
    elif task == "classification" and alias.label_field is None and label_field is None:
        raise ConfigError(f"dataset {dataset!r} has no labels; use it with the lm task")
    from huggingface_hub import constants

    if not (_offline() or constants.is_offline_mode()):  # one quick request first: datasets would retry for half
        from ..weights import hub_unreachable  # a minute per file when the hub is unreachable

        problem = hub_unreachable(alias.path, repo_type="dataset", filename="README.md")
        if problem is not None:
            raise ConfigError(f"dataset {dataset!r} cannot be fetched: {problem}; if it is in the local datasets "
                              f"cache, set HF_HUB_OFFLINE=1 to use that copy, or {_HINT}")
    import datasets

    try:
        loaded = datasets.load_dataset(alias.path, alias.config)
    except Exception as exc:  # datasets raises many kinds here; each becomes one message a user can act on
        raise _hub_error(dataset, exc) from exc
    return _from_datasets(loaded, f"dataset {dataset!r}", alias, task, text_field, label_field, validation_split,
                          seed, max_examples)


def _offline() -> bool:
    """Whether offline mode is on for datasets (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_error(dataset: str, exc: Exception) -> ConfigError:
    from datasets import config
    from datasets.exceptions import DatasetNotFoundError

    offline = bool(config.HF_HUB_OFFLINE) or _offline()
    if isinstance(exc, DatasetNotFoundError) and not offline:
        return ConfigError(f"dataset {dataset!r} was not found on the Hugging Face hub, or it needs a login "
                           f"({_reason(exc)}); check the name, or {_HINT}")
    if offline or isinstance(exc, OSError | TimeoutError):  # ConnectionError and FileNotFoundError are OSErrors
        reason = "offline mode is on: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set" if offline else _reason(exc)
        return ConfigError(f"dataset {dataset!r} is not in the local datasets cache and the Hugging Face hub cannot "
                           f"be reached ({reason}); download it on a machine with internet, or {_HINT}")
    return ConfigError(f"cannot load dataset {dataset!r} ({_reason(exc)}); {_HINT}")


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message, short enough for one line of output."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _from_datasets(loaded: Any, source: str, alias: DatasetAlias | None, task: str, text_field: str | None,
                   label_field: str | None, validation_split: float, seed: int,
                   max_examples: int | None) -> TuneData:
    """Examples from a datasets Dataset (split here) or DatasetDict (its own splits)."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        train_rows, names = _dataset_rows(loaded, source, task, text_field, label_field)
        train_rows, val_rows = _split(train_rows, validation_split, seed)
        return _finish(train_rows, val_rows, names, task, source, seed, max_examples, shuffled=True)

    train_name = alias.train_split if alias is not None else "train"
    if train_name not in loaded:
        raise ConfigError(f"{source} has no {train_name!r} split (it has: {', '.join(loaded) or 'none'})")
    if alias is not None:
        text_field = text_field or alias.text_field
        label_field = label_field or alias.label_field
    train_rows, names = _dataset_rows(loaded[train_name], f"{source} split {train_name!r}", task, text_field,
                                      label_field)
    candidates = [alias.validation_split] if alias is not None and alias.validation_split else ["validation", "test"]
    for split in candidates:
        if split in loaded and split != train_name:
            val_rows, _ = _dataset_rows(loaded[split], f"{source} split {split!r}", task, text_field, label_field,
                                        allow_empty=True)
            if val_rows:
                return _finish(train_rows, val_rows, names, task, source, seed, max_examples, shuffled=False)
    train_rows, val_rows = _split(train_rows, validation_split, seed)
    return _finish(train_rows, val_rows, names, task, source, seed, max_examples, shuffled=True)


def _dataset_rows(ds: Any, source: str, task: str, text_field: str | None, label_field: str | None,
                  allow_empty: bool = False) -> tuple[list[_Row], list[str] | None]:
    """Rows of one datasets split (label -1, the 'no label' of GLUE test splits, and empty texts are dropped)."""
    from datasets import ClassLabel

    columns = list(ds.column_names)
    if text_field is None:
        text_field = "sentence" if "text" not in columns and "sentence" in columns else "text"
    if text_field not in columns:
        raise ConfigError(f"{source}: no text field {text_field!r} (its columns: {', '.join(columns)}); "
                          f"choose one with --text-field")
    texts = list(ds[text_field])
    names: list[str] | None = None
    if task == "lm":
        labels: list[Any] = [None] * len(texts)
    else:
        label_field = label_field or "label"
        if label_field not in columns:
            raise ConfigError(f"{source}: no label field {label_field!r} (its columns: {', '.join(columns)}); "
                              f"choose one with --label-field")
        feature = ds.features[label_field]
        if isinstance(feature, ClassLabel):
            names = list(feature.names)
        labels = list(ds[label_field])

    rows: list[_Row] = []
    empty = 0
    for index, (text, label) in enumerate(zip(texts, labels, strict=True)):
        where = f"{source} row {index}"
        if not isinstance(text, str):
            raise ConfigError(f"{where}: text field {text_field!r} must be a string, got {_type_name(text)}")
        if not text.strip():
            empty += 1
            continue
        if task == "lm":
            rows.append((where, text, None))
        elif label != -1:
            rows.append((where, text, _check_label(label, where, label_field or "label")))
    if empty and task == "classification":
        logger.warning("%s: skipped %d examples with empty text", source, empty)
    if not rows and not allow_empty:
        raise ConfigError(f"{source} has no usable examples")
    return rows, names


# ---------------------------------------------------------------------------------------------------------- batching


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos token, else 0."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def _tokenize(texts: Sequence[str], tokenizer: Any) -> Iterator[list[int]]:
    """Token ids of each text, special tokens included (several texts per tokenizer call)."""
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = list(texts[start:start + _TOKENIZE_CHUNK])
        yield from tokenizer(chunk, add_special_tokens=True, verbose=False)["input_ids"]


def lm_chunks(examples: Iterable[Example], tokenizer: Any, max_length: int) -> list[list[int]]:
    """Each text's token ids cut into consecutive pieces of at most `max_length` tokens (empty texts give none)."""
    _check_positive("max_length", max_length)
    chunks = []
    for ids in _tokenize([example.text for example in examples], tokenizer):
        chunks.extend(list(ids[start:start + max_length]) for start in range(0, len(ids), max_length))
    return chunks


def prepare(examples: Sequence[Example], tokenizer: Any, max_length: int, task: str) -> list[Item]:
    """Tokenize once: (token ids, class id) per example for classification, (chunk, None) per lm chunk."""
    _check_positive("max_length", max_length)
    if task == "lm":
        return [(chunk, None) for chunk in lm_chunks(examples, tokenizer, max_length)]
    if task != "classification":
        raise ConfigError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    items: list[Item] = []
    truncated = 0
    for example, ids in zip(examples, _tokenize([example.text for example in examples], tokenizer), strict=True):
        if example.label is None:
            raise ConfigError(f"example {example.text[:40]!r} has no label; classification needs one per example")
        if not ids:
            continue
        if len(ids) > max_length:
            truncated += 1
        items.append((list(ids[:max_length]), example.label))
    if truncated:
        logger.warning("%d of %d examples were longer than %d tokens and were truncated to their first %d",
                       truncated, len(examples), max_length, max_length)
    return items


def count_batches(n_items: int, batch_size: int) -> int:
    """How many batches :func:`batches` yields for `n_items` items (the last one may be smaller)."""
    _check_positive("batch_size", batch_size)
    return math.ceil(n_items / batch_size)


def batches(items: Sequence[Item], batch_size: int, *, pad_id: int, task: str, shuffle: bool = False,
            seed: int = 0, epoch: int = 0) -> Iterator[Batch]:
    """Padded batches of `items` (from :func:`prepare`), in order or shuffled by `seed + epoch`."""
    _check_positive("batch_size", batch_size)
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    order = list(range(len(items)))
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([items[i] for i in order[start:start + batch_size]], pad_id, task)


def collate(items: Sequence[Item], pad_id: int, task: str) -> Batch:
    """One right-padded batch of items."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, _) in enumerate(items):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    if task == "lm":
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return Batch(input_ids, attention_mask, labels)


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")


__all__ = [
    "DATASET_ALIASES",
    "Batch",
    "DatasetAlias",
    "Example",
    "Item",
    "TuneData",
    "batches",
    "collate",
    "count_batches",
    "lm_chunks",
    "load_data",
    "pad_token_id",
    "prepare",
]
