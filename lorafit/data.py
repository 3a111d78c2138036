"""Data: load -> map columns and labels -> split -> K-shot sample -> tokenise.

Every source goes through the `datasets` library: a local csv/tsv/jsonl/json/parquet file, a
folder of train/validation/test files, or a hub dataset name. Rows are normalised to

- classification: "text", optional "text_pair", "label" (int id), "row" (0-based data row in its file)
- causal LM (SFT): "messages" (list of {"role", "content"}, the last one the assistant's response), "row"

and split following LM-BFF in K-shot mode: K per class for training and a disjoint K per class
for validation, both from the train pool, and the full test set untouched. Bad data raises
`DataError` with one line naming the file, row and column, and the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import logging
import math
import os
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset

from lorafit.config import DataConfig
from lorafit.errors import ConfigError, DataError, ModelError
from lorafit.hub import hub_reachable
from lorafit.io import write_json

logger = logging.getLogger(__name__)

# extension -> `datasets` builder
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
TEXT_COLUMN_CANDIDATES: tuple[str, ...] = (
    "sentence",
    "text",
    "content",
    "review",
    "document",
    "comment",
    "tweet",
    "utterance",
)
# a csv/tsv value written as a number (labels only: text stays as written)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
HUB_DEMO_DATASET = "stanfordnlp/sst2"
# largest / smallest class of the train pool at which K per class gets an imbalance note
IMBALANCE_RATIO = 4
IGNORE_INDEX = -100
TASKS = ("classification", "causal_lm")
# Used when a tokenizer has no chat template (base models): the Alpaca prompt format.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
# seeds of the independent sampling stages: changing one stage's size leaves the others alone
_CARVE_TEST, _CARVE_VALIDATION, _K_SHOT, _TRAIN_SIZE, _MAX_TEST, _HEAD_FIT, _MAX_VALIDATION = range(
    7
)
_TIE_STREAM = 1  # third seed word: a stage's tie-breaking stream, apart from its draws


@dataclass
class TaskData:
    """The three splits of one task, normalised (see the module docstring for the columns)."""

    task: str
    train: Dataset
    validation: Dataset
    test: Dataset
    label_names: list[str] | None  # id order (classification); None for causal LM
    source: str  # one line: where each split came from and how it was sampled
    warnings: list[str]  # leakage, imbalance, unused files...: logged once when loaded, kept here


@dataclass
class _Split:
    dataset: Dataset
    origin: str  # the file (or hub split) named in error messages
    untyped: bool = False  # csv/tsv: every value was read as a string


# -- public API ----------------------------------------------------------------------------------


def load_task_data(cfg: DataConfig, task: str) -> TaskData:
    """Read `cfg.path`, normalise columns and labels, and build train/validation/test."""
    if task not in TASKS:
        raise DataError(f"task {task!r} is not valid; use one of {list(TASKS)}")
    # Checked here, not in DataConfig: a sweep's base config may set it, and the sweep sets k_shot.
    if cfg.validation_k is not None and cfg.k_shot is None:
        raise ConfigError(
            "data.validation_k needs data.k_shot (it sizes the K-shot validation draw); "
            "without K-shot sampling use data.validation_fraction"
        )
    raw = _read_splits(cfg)
    warnings = _warn(_unused_files_note(cfg))
    if task == "classification":
        label_names, pools, label_warnings = _normalise_classification(raw, cfg)
        warnings += label_warnings
    else:
        label_names = None
        pools = {
            role: _normalise_sft(split, cfg)
            for role, split in raw.items()
            if not (role == "validation" and _validation_unused(raw, cfg))
        }
    validation_unused = "validation" in raw and "validation" not in pools
    train, validation, test, notes, split_warnings = _assign_splits(
        pools, cfg, label_names, validation_unused
    )
    origins = ", ".join(f"{role}: {raw[role].origin}" for role in pools)
    source = f"{origins}; " + "; ".join(notes)
    return TaskData(task, train, validation, test, label_names, source, warnings + split_warnings)


def infer_task(cfg: DataConfig) -> str:
    """Return "causal_lm" when the training data has a messages column or instruction + output columns."""
    columns = _read_splits(cfg)["train"].dataset.column_names
    sft = cfg.messages in columns or (cfg.instruction in columns and cfg.output in columns)
    return "causal_lm" if sft else "classification"


def tokenize(
    dataset: Dataset,
    tokenizer: Any,
    task: str,
    max_length: int,
    split: str | None = None,
    warn: bool = True,
) -> Dataset:
    """Normalised rows -> input_ids, attention_mask (+ token_type_ids), labels, row.

    `split` ("train", ...) names the rows in the truncation warning; `warn=False` leaves the
    warning to the caller (`lorafit predict` words its own).

    Causal LM: the prompt is rendered with the tokenizer's chat template (Alpaca-style without
    one) and the labels are IGNORE_INDEX on every prompt token, so the loss covers the response.
    """
    if task == "classification":
        texts = dataset["text"][:]
        pairs = dataset["text_pair"][:] if "text_pair" in dataset.column_names else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        if warn:
            _warn_truncated_texts(tokenizer, texts, pairs, encoded["input_ids"], max_length, split)
        columns = {
            name: encoded[name]
            for name in ("input_ids", "attention_mask", "token_type_ids")
            if name in encoded
        }
        if "label" in dataset.column_names:  # absent when predicting on unlabelled text
            columns["labels"] = dataset["label"][:]
    elif task == "causal_lm":
        columns = _tokenize_sft(dataset["messages"][:], tokenizer, max_length, split)
    else:
        raise DataError(f"task {task!r} is not valid; use one of {list(TASKS)}")
    columns["row"] = dataset["row"][:]
    return Dataset.from_dict(columns)


def _in_split(split: str | None) -> str:
    return f" in the {split} split" if split else ""


def count_truncated(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, ids: list, max_length: int
) -> int:
    """How many rows, tokenised to `ids` with truncation at max_length, lost tokens."""
    full = [i for i, row in enumerate(ids) if len(row) >= max_length]  # only these may be cut
    if not full:
        return 0
    # one token past max_length tells a cut row; it also keeps transformers from warning about
    # sequences longer than the model's limit, which lorafit never feeds it
    lengths = tokenizer(
        [texts[i] for i in full],
        [pairs[i] for i in full] if pairs is not None else None,
        truncation=True,
        max_length=max_length + 1,
    )["input_ids"]
    return sum(len(row) > max_length for row in lengths)


def _warn_truncated_texts(
    tokenizer: Any,
    texts: list[str],
    pairs: list[str] | None,
    ids: list,
    max_length: int,
    split: str | None,
) -> None:
    """Log once how many classification rows lost tokens to max_length (only the start is read)."""
    truncated = count_truncated(tokenizer, texts, pairs, ids, max_length)
    if truncated:
        logger.warning(
            "%d of %d texts%s exceed model.max_length=%d tokens and were truncated (the start "
            "is kept); raise model.max_length to use more of each text",
            truncated,
            len(texts),
            _in_split(split),
            max_length,
        )


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices by decreasing length, ties in order: batches of similar lengths pad (and
    compute) less, and the largest batch comes first, so running out of memory shows at once."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


class Collator:
    """DataLoader collate_fn: right-pads a list of tokenised rows into torch tensors.

    input_ids with the pad id, attention_mask/token_type_ids with 0, causal-LM labels with
    IGNORE_INDEX; classification labels and "row" become 1-D tensors. Padding is always on the
    right so that positions match training without position ids.
    """

    def __init__(self, tokenizer: Any, task: str) -> None:
        if task not in TASKS:
            raise DataError(f"task {task!r} is not valid; use one of {list(TASKS)}")
        if tokenizer.pad_token_id is None:
            raise ModelError(
                "the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)"
            )
        self.pad_id = int(tokenizer.pad_token_id)
        self.task = task

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        pad_values = {"input_ids": self.pad_id, "attention_mask": 0, "token_type_ids": 0}
        if self.task == "causal_lm":
            pad_values["labels"] = IGNORE_INDEX
        longest = max(len(f["input_ids"]) for f in features)
        batch: dict[str, Any] = {}
        for name, pad in pad_values.items():
            if name not in features[0]:
                continue
            rows = [_as_list(f[name]) for f in features]
            batch[name] = torch.tensor(
                [r + [pad] * (longest - len(r)) for r in rows], dtype=torch.long
            )
        if self.task == "classification" and "labels" in features[0]:
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        batch["row"] = torch.tensor([int(f["row"]) for f in features], dtype=torch.long)
        return batch


def save_label_map(path: str | Path, names: Sequence[str]) -> None:
    """Write {"labels": [...], "label2id": {...}} atomically."""
    names = [str(n) for n in names]
    write_json(path, {"labels": names, "label2id": {n: i for i, n in enumerate(names)}})


def load_label_map(path: str | Path) -> list[str]:
    """Label names in id order from a file written by `save_label_map`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        names = [str(n) for n in data["labels"]]
    except FileNotFoundError:
        raise DataError(
            f"label map {path} not found; it is written to the run directory as label_map.json"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(
            f"label map {path} is not valid ({e}); expected {{'labels': [...], 'label2id': {{...}}}}"
        ) from None
    expected = {n: i for i, n in enumerate(names)}
    if data.get("label2id", expected) != expected:
        raise DataError(f"label map {path}: 'label2id' disagrees with the order of 'labels'")
    return names


def find_demo_data(explicit: str | None) -> str:
    """SST-2 for `lorafit demo`: --data, $LORAFIT_DATA_DIR/sst2, <repo>/../shared/data/sst2, the hub."""
    if explicit:
        return explicit
    candidates = []
    if os.environ.get("LORAFIT_DATA_DIR"):
        candidates.append(Path(os.environ["LORAFIT_DATA_DIR"]) / "sst2")
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2")
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate)
    return HUB_DEMO_DATASET  # offline, loading it raises a DataError that says to pass --data


# -- reading -------------------------------------------------------------------------------------


def _read_splits(cfg: DataConfig) -> dict[str, _Split]:
    """Raw splits by role ("train", and "validation"/"test" when given)."""
    if not cfg.path:
        raise DataError(
            "data.path is not set; pass a csv/tsv/jsonl/json/parquet file, a folder or a hub dataset name"
        )
    path = Path(cfg.path).expanduser()
    if path.is_file():
        splits = {"train": _file_split(path, cfg.delimiter)}
    elif path.is_dir():
        splits = {
            role: _file_split(file, cfg.delimiter) for role, file in _split_files(path, cfg).items()
        }
    elif looks_local(cfg.path):
        raise DataError(
            f"data file or folder {cfg.path} not found (working directory {Path.cwd()}); check data.path"
        )
    else:
        splits = _hub_splits(cfg)
    for role, split in splits.items():
        if role == "validation" and _validation_unused(splits, cfg):
            continue  # dropped once the test labels are read (see _normalise_classification)
        if len(split.dataset) == 0:
            raise DataError(
                f"{split.origin}: no data rows (empty split); add rows or point data.path elsewhere"
            )
    return splits


def data_files_sha256(cfg: DataConfig) -> dict[str, str]:
    """{split role: sha256 of its file's bytes} of the local files `cfg` reads; {} for a hub
    dataset. Recorded in summary.json, so a sweep never reuses a run trained on a file that has
    been edited since."""
    path = Path(cfg.path).expanduser() if cfg.path else None
    if path is None or not path.exists():
        return {}
    files = {"train": path} if path.is_file() else _split_files(path, cfg)
    if _validation_unused(files, cfg) and not _labels_hidden(files["test"], cfg):
        del files["validation"]  # not read, so an edit there changes nothing
    return {role: _file_sha256(str(f), *_stamp(f)) for role, f in sorted(files.items())}


def changed_data_files(then: dict[str, str], now: dict[str, str]) -> str:
    """What differs between two `data_files_sha256` results, for an error message."""
    parts = [
        f"the {role} file {'was removed' if role not in now else 'was added' if role not in then else 'has changed'}"
        for role in sorted(set(then) | set(now))
        if then.get(role) != now.get(role)
    ]
    return " and ".join(parts)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    """Cached on (path, mtime, size): a sweep asks once per run."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix.lower() in SUPPORTED_EXTENSIONS


def _split_names(cfg: DataConfig) -> dict[str, str]:
    """Split name (file stem or hub split) of each role. A split that the test role claims is not
    also the validation split: validation is then carved from train (see `_assign_splits`)."""
    names = {"train": cfg.train_split, "validation": cfg.validation_split, "test": cfg.test_split}
    if _validation_is_test(cfg):
        del names["validation"]
    return {role: name for role, name in names.items() if name is not None}


def _validation_unused(raw: dict[str, Any], cfg: DataConfig) -> bool:
    """K-shot draws validation from train, so a given validation split beside a labelled test
    split is not used, and its rows are not checked (a bad row there must not stop the run)."""
    return cfg.k_shot is not None and "validation" in raw and "test" in raw


def _labels_hidden(file: Path, cfg: DataConfig) -> bool:
    """A labelled file whose label cells are all empty: read as no such split at all."""
    split = _file_split(file, cfg.delimiter)
    try:
        keys = _label_keys(split, _label_column(split, cfg))
    except DataError:
        return False  # no label column: the run stops on it, so this answer is never used
    return all(k is None for k in keys)


def _validation_is_test(cfg: DataConfig) -> bool:
    return cfg.validation_split is not None and cfg.validation_split == cfg.test_split


def _split_files(folder: Path, cfg: DataConfig) -> dict[str, Path]:
    """Files of a folder matched to split roles by stem; a folder with one data file is the train pool."""
    files = sorted(
        f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in SUPPORTED_EXTENSIONS
    )
    if not files:
        raise DataError(
            f"{folder}: no data files; expected e.g. train.tsv, validation.tsv, test.tsv (csv/tsv/jsonl/json/parquet)"
        )
    found: dict[str, Path] = {}
    for role, stem in _split_names(cfg).items():
        matches = [f for f in files if f.stem == stem]
        if len(matches) > 1:
            raise DataError(
                f"{folder}: several files for the {role} split ({', '.join(f.name for f in matches)}); keep one"
            )
        if matches:
            found[role] = matches[0]
    if "train" not in found:
        if len(files) == 1:
            return {"train": files[0]}
        names = ", ".join(f.name for f in files)
        raise DataError(
            f"{folder}: no file for the train split '{cfg.train_split}' among {names}; rename one or set data.train_split"
        )
    return found


def _unused_files_note(cfg: DataConfig) -> str | None:
    """Data files of a folder that no split name matches (a `dev.csv`): unused, so say so."""
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        return None
    found = _split_files(folder, cfg)
    used = set(found.values())
    unused = sorted(
        f.name
        for f in folder.iterdir()
        if f.is_file() and f.suffix.lower() in SUPPORTED_EXTENSIONS and f not in used
    )
    if not unused:
        return None
    split_names = _split_names(cfg)
    names = ", ".join(f"{r}_split={n!r}" for r, n in split_names.items())
    stems = [Path(name).stem for name in unused]
    # a split name with no file, close to an unused file's name: most likely a typo
    typos = [
        (role, close[0])
        for role, name in split_names.items()
        if role not in found and (close := difflib.get_close_matches(name, stems, n=1, cutoff=0.5))
    ]
    fix = (
        "; ".join(f"data.{role}_split={stem} to use it as the {role} split" for role, stem in typos)
        if typos
        else f"to use it, e.g. as validation, set data.validation_split={stems[0]}"
    )
    return (
        f"{folder}: {', '.join(unused)} not used (no split name matches the file name: data.{names}); "
        f"{'set ' if typos else ''}{fix}"
    )


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int, delimiter: str | None) -> Dataset:
    suffix = Path(path).suffix.lower()
    kwargs: dict[str, Any] = {}
    try:
        if SUPPORTED_EXTENSIONS[suffix] == "csv":
            # keep "NA"/"null" as text; TSV files carry bare quote characters, so quoting is off
            if delimiter == "\\t":  # data.delimiter=\t typed on the command line: a tab
                delimiter = "\t"
            kwargs = {
                "delimiter": delimiter or ("\t" if suffix == ".tsv" else ","),
                "keep_default_na": False,
            }
            if suffix == ".tsv":
                kwargs["quoting"] = 3  # csv.QUOTE_NONE
            # every column as text: inferring types from the first chunk breaks on later rows
            header = pd.read_csv(path, nrows=0, **kwargs).columns
            _check_unique_header(path, kwargs)
            kwargs["features"] = Features({column: Value("string") for column in header})
        with _quiet_datasets_errors():  # a failure becomes one DataError line below
            return load_dataset(
                SUPPORTED_EXTENSIONS[suffix], data_files=path, split="train", **kwargs
            )
    except DataError:
        raise
    except Exception as e:
        if "corresponds to no data" in str(e):  # a header without rows
            return Dataset.from_dict({})
        if isinstance(e, pd.errors.EmptyDataError) or os.path.getsize(path) == 0:
            raise DataError(f"{path} is empty (not even a header row); give it data") from None
        bad_line = not_utf8(path) if suffix != ".parquet" else None
        if bad_line is None and SUPPORTED_EXTENSIONS[suffix] == "json":
            bad_line = _bad_json_line(path)
        fix = f"check that it is valid {suffix[1:]}"
        if bad_line is None and SUPPORTED_EXTENSIONS[suffix] == "csv":
            with open(path, encoding="utf-8-sig") as fh:
                header = fh.readline().rstrip("\r\n")
            other = _separator_fix(header, used=kwargs.get("delimiter"))
            fix = f"its header looks separated by {other}" if other else fix
        raise DataError(f"could not read {path}: {bad_line or _root_cause(e)}; {fix}") from None


def _check_unique_header(path: str, read_kwargs: dict[str, Any]) -> None:
    """A csv/tsv header naming a column twice: pandas would rename the second copy `name.1`
    and lorafit would read the first without a word, so refuse it."""
    names = [str(n).strip() for n in pd.read_csv(path, nrows=1, header=None, **read_kwargs).iloc[0]]
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if name in seen:
            raise DataError(
                f"{path}: the header names column {name!r} twice (columns {seen[name]} and "
                f"{number}); rename or drop one"
            )
        seen[name] = number


@contextlib.contextmanager
def _quiet_datasets_errors() -> Iterator[None]:
    """Silence `datasets`' own 'Failed to read file ...' log line while a file loads."""
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def not_utf8(path: str | Path) -> str | None:
    """'line N is not UTF-8 (...)' for the first such line of a text file, else None."""
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return (
                    f"line {n} is not UTF-8 (byte {line[e.start]:#04x}); save the file as UTF-8, "
                    f"e.g. iconv -f latin1 -t utf-8"
                )
    return None


def is_json_list(path: str | Path) -> bool:
    """A .json file holding one JSON list (of records), else JSON lines: what its first
    non-blank character says."""
    with open(path, encoding="utf-8-sig") as fh:
        for chunk in iter(lambda: fh.read(4096), ""):
            if chunk.strip():
                return chunk.lstrip().startswith("[")
    return False


def _bad_json_line(path: str) -> str | None:
    """Where a json/jsonl file breaks ("line 3: not valid JSON (...)"): Arrow's own message
    names a column and a row of its chunk, not the line. None when every line parses."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        return f"{type(e).__name__}: {e}"
    if is_json_list(path):  # one JSON document: a list of records
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}: not valid JSON ({e.msg})"
        return None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n}: not valid JSON ({e.msg}); each line must be one JSON object"
        if not isinstance(record, dict):
            return f"line {n}: expected a JSON object per line, got {type(record).__name__}"
    return None


def _file_split(path: Path, delimiter: str | None) -> _Split:
    untyped = SUPPORTED_EXTENSIONS.get(path.suffix.lower()) == "csv"
    return _Split(_load_file(path, delimiter), str(path), untyped)


def _load_file(path: Path, delimiter: str | None) -> Dataset:
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        supported = ", ".join(s[1:] for s in SUPPORTED_EXTENSIONS)
        raise DataError(
            f"{path}: unsupported file extension '{path.suffix}'; use one of {supported}"
        )
    return _load_cached(str(path), *_stamp(path), delimiter)


@functools.lru_cache(maxsize=4)
def _load_hub(path: str, name: str | None) -> DatasetDict:
    online = hub_reachable()
    try:
        loaded = load_dataset(path, name)
    except Exception as e:
        local = "e.g. data.path=my_data.csv or a folder with train/test files"
        if path == HUB_DEMO_DATASET:
            local = "e.g. data.path=../shared/data/sst2 (lorafit demo: --data ../shared/data/sst2)"
        if not online:
            problem = f"the hub cannot be reached and '{path}' is not in the local cache"
        elif isinstance(e, ConnectionError):
            problem = f"could not download the hub dataset '{path}'"
        else:
            raise DataError(
                f"'{path}' is neither a local file or folder nor a loadable hub dataset "
                f"({_root_cause(e)}); check data.path and data.name"
            ) from None
        raise DataError(
            f"{problem} ({_root_cause(e)}); pass a local file or folder instead, {local}"
        ) from None
    if not isinstance(loaded, DatasetDict):
        loaded = DatasetDict({"train": loaded})
    return loaded


def _hub_splits(cfg: DataConfig) -> dict[str, _Split]:
    loaded = _load_hub(cfg.path, cfg.name)
    label = f"{cfg.path}" + (f"/{cfg.name}" if cfg.name else "")
    if cfg.train_split not in loaded:
        raise DataError(
            f"hub dataset {label} has no split '{cfg.train_split}' (splits: {', '.join(loaded)}); set data.train_split"
        )
    return {
        role: _Split(loaded[s], f"{label}[{s}]")
        for role, s in _split_names(cfg).items()
        if s in loaded
    }


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# -- columns and labels --------------------------------------------------------------------------


def _require_column(split: _Split, column: str, field: str, taken: Sequence[str] = ()) -> str:
    """`column` of the split, else a one-line error suggesting a close name not `taken` by
    another field (an SFT file's 'input' is not its missing 'output')."""
    columns = split.dataset.column_names
    if column in columns:
        return column
    free = [c for c in columns if c not in taken]
    close = difflib.get_close_matches(column, free, n=1, cutoff=0.5)
    hint = _delimiter_hint(split, columns) or (
        f"did you mean '{close[0]}'? set data.{field}={close[0]}"
        if close
        else f"set data.{field} to one of them"
    )
    raise DataError(
        f"{split.origin}: no column '{column}' (data.{field}); available columns: {', '.join(columns)}; {hint}"
    )


def _delimiter_hint(split: _Split, columns: Sequence[str]) -> str | None:
    """A csv/tsv read as one column whose name holds another separator: say which to set."""
    if not split.untyped or len(columns) != 1:
        return None
    fix = _separator_fix(columns[0])
    return f"its one column looks separated by {fix}" if fix else None


def other_separator(header: str, used: str | None = None) -> str | None:
    """The separator (;, tab, |, comma) a header line holds other than `used`, if any."""
    return next((sep for sep in (";", "\t", "|", ",") if sep in header and sep != used), None)


def _separator_fix(header: str, used: str | None = None) -> str | None:
    """ "';': set data.delimiter=';'" when a header line holds a separator other than `used`."""
    found = other_separator(header, used)
    if found is None:
        return None
    shown = "\\t" if found == "\t" else found  # as typed on the command line
    return f"'{shown}': set data.delimiter='{shown}'"


def detect_column(columns: Sequence[str], name: str) -> str | None:
    """`name`, else the only column equal to it ignoring case (auto-detection only)."""
    if name in columns:
        return name
    folded = [column for column in columns if column.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def _text_column(split: _Split, cfg: DataConfig) -> str:
    if cfg.text != "auto":
        return _require_column(split, cfg.text, "text")
    columns = split.dataset.column_names
    for candidate in TEXT_COLUMN_CANDIDATES:
        column = detect_column(columns, candidate)
        if column is not None:
            return column
    raise DataError(
        f"{split.origin}: no text column found (data.text=auto looks for {', '.join(TEXT_COLUMN_CANDIDATES)}); "
        f"available columns: {', '.join(columns)}; "
        + (_delimiter_hint(split, columns) or "set data.text=<column>")
    )


def _texts(split: _Split, column: str, field: str = "text") -> list[str]:
    values = split.dataset[column][:]
    for row, value in enumerate(values):
        if isinstance(value, (list, dict)):  # str() would train on "['a', 'b']"
            raise DataError(
                f"{split.origin} row {row} column '{column}': expected a text, got a JSON "
                f"{'list' if isinstance(value, list) else 'object'} ({str(value)[:60]}); "
                f"join it into one string or set data.{field} to a text column"
            )
    empty = [row for row, value in enumerate(values) if value is None or not str(value).strip()]
    if empty:
        raise DataError(
            f"{split.origin} row {empty[0]} column '{column}': empty text{_more_rows(empty)}; "
            "fill it in or remove the row"
        )
    return [v if isinstance(v, str) else str(v) for v in values]


def _label_key(value: Any, negative_is_missing: bool) -> int | str | None:
    """Raw label -> int or str; None for an unlabelled row (None, "", NaN; -1 in hub ClassLabel columns)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return None if negative_is_missing and value < 0 else int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return int(value) if value.is_integer() else str(value)
    return str(value).strip() or None


def _label_column(split: _Split, cfg: DataConfig) -> str:
    """data.label; the default ("label") also matches the only column named so in another case."""
    if cfg.label == DataConfig.label:
        column = detect_column(split.dataset.column_names, cfg.label)
        if column is not None:
            return column
    columns = split.dataset.column_names
    hint = _sft_hint(columns, cfg) if cfg.label not in columns else None
    if hint:
        raise DataError(
            f"{split.origin}: no column '{cfg.label}' (data.label) for classification; "
            f"available columns: {', '.join(columns)}; {hint}"
        )
    return _require_column(split, cfg.label, "label")


# column names that mark prompt/response data (instruction tuning), not classification
_PROMPT_NAMES = ("prompt", "question", "query", "instruction")
_RESPONSE_NAMES = ("response", "answer", "completion", "output", "target")


def _sft_hint(columns: Sequence[str], cfg: DataConfig) -> str | None:
    """For data that looks like instruction tuning but lacks lorafit's SFT columns: what to set."""
    lowered = {c.lower(): c for c in columns}
    if "conversations" in lowered:  # ShareGPT
        return f"for chat data set data.messages={lowered['conversations']}"
    prompt = cfg.instruction if cfg.instruction in columns else None
    prompt = prompt or next((lowered[n] for n in _PROMPT_NAMES if n in lowered), None)
    response = cfg.output if cfg.output in columns else None
    response = response or next((lowered[n] for n in _RESPONSE_NAMES if n in lowered), None)
    if prompt is None:
        return None
    if prompt == cfg.instruction and response == cfg.output:  # lorafit's SFT columns are there
        return "this is instruction-tuning data: set model.task=causal_lm (or auto)"
    if response is None:
        return (
            f"for instruction tuning '{prompt}' needs a response column: add one, or set "
            f"data.instruction={prompt} data.output=<response column>"
        )
    return f"for instruction tuning set data.instruction={prompt} data.output={response}"


def _label_keys(split: _Split, column: str) -> list[int | str | None]:
    # hub ClassLabel columns mark hidden labels (GLUE test) with -1; elsewhere -1 is a real label
    hidden = isinstance(split.dataset.features.get(column), ClassLabel)
    values = split.dataset[column][:]
    if split.untyped:
        values = _numbers_if_all_numeric(values)
    for row, value in enumerate(values):
        if isinstance(value, (list, dict)):  # multi-label rows are not one class
            raise DataError(
                f"{split.origin} row {row} column '{column}': expected one label (a string or "
                f"integer), got a JSON {'list' if isinstance(value, list) else 'object'} "
                f"({str(value)[:60]}); lorafit trains single-label classification: give each row one label"
            )
    return [_label_key(v, hidden) for v in values]


def _numbers_if_all_numeric(values: list[str | None]) -> list[Any]:
    """csv/tsv labels: numbers when every non-empty value is one (the type a typed file would
    have, inferred from the whole column), else the strings unchanged."""
    stripped = [(v or "").strip() for v in values]
    if not all(_NUMBER.fullmatch(v) for v in stripped if v):
        return values
    return [_number(v) if v else None for v in stripped]


def _number(text: str) -> int | float:
    return int(text) if text.lstrip("+-").isdigit() else float(text)


def numeric_label_name(text: str) -> str | None:
    """The label name training gives a numeric csv/tsv label ("01", "+1", "1.0" -> "1"); None
    for text that is not a number."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    return str(_label_key(_number(text), negative_is_missing=False))


def _more_rows(rows: list[int]) -> str:
    """ " (and N more rows: a, b, c, ...)" after the first of `rows`, so one run lists them all."""
    rest = rows[1:]
    if not rest:
        return ""
    shown = ", ".join(map(str, rest[:10])) + (", ..." if len(rest) > 10 else "")
    return f" (and {len(rest)} more row{'s' if len(rest) > 1 else ''}: {shown})"


def _unlabelled_error(split: _Split, role: str, keys: list, column: str) -> DataError:
    fix = (
        "set data.test_split=null to evaluate on the validation split instead"
        if role == "test"
        else "label the row or remove it"
    )
    rows = [row for row, key in enumerate(keys) if key is None]
    value = split.dataset[rows[0]][column]
    return DataError(
        f"{split.origin} row {rows[0]} column '{column}': unlabelled row "
        f"(label {'empty' if value is None else repr(value)})"
        f"{_more_rows(rows)}; {fix}"
    )


def _normalise_classification(
    raw: dict[str, _Split], cfg: DataConfig
) -> tuple[list[str], dict[str, Dataset], list[str]]:
    """Map text and label columns of every split; label ids follow `cfg.labels` or sorted
    training values. Returns the label names, the splits and the warnings."""
    raw = dict(raw)
    keys: dict[str, list] = {}
    label_columns: dict[str, str] = {}
    # train first, validation last: whether it is used depends on the test split's labels
    order = {"train": 0, "test": 1, "validation": 2}
    for role, split in sorted(raw.items(), key=lambda item: order[item[0]]):
        if role == "validation" and _validation_unused(raw, cfg):
            del raw[role]  # K-shot draws validation from train: the file is not read further
            continue
        try:
            label_columns[role] = _label_column(split, cfg)
        except DataError:
            if role == "train" or _delimiter_hint(split, split.dataset.column_names):
                raise  # the train file's own error, or the file's separator is the cause
            # an unlabelled file for prediction, placed beside the training files
            raise DataError(
                f"{split.origin}: the {role} split has no label column '{cfg.label}' "
                f"(data.label); add its labels, or set data.{role}_split=null to carve a "
                f"labelled {role} set from train (lorafit predict reads unlabelled files)"
            ) from None
        keys[role] = _label_keys(split, label_columns[role])
        if role == "test" and all(k is None for k in keys[role]):
            # hidden test labels (GLUE on the hub): behave as if no test split was given
            del raw[role], keys[role]

    train = raw["train"]
    feature = train.dataset.features.get(label_columns["train"])
    train_keys = [k for k in keys["train"] if k is not None]
    if cfg.labels is not None:
        names = [str(n) for n in cfg.labels]
        ints_are_ids = _integer_labels_are_ids(train_keys, names, train, label_columns["train"])
    elif isinstance(feature, ClassLabel):
        names, ints_are_ids = list(feature.names), True
    else:
        distinct = set(train_keys)
        if all(isinstance(k, int) for k in distinct):
            names = [str(k) for k in sorted(distinct)]
        else:
            names = sorted(str(k) for k in distinct)
        ints_are_ids = False
    label2id = {n: i for i, n in enumerate(names)}

    pools: dict[str, Dataset] = {}
    for role, split in raw.items():
        text_column = _text_column(split, cfg)
        columns: dict[str, list] = {"text": _texts(split, text_column)}
        if cfg.text_pair is not None:
            columns["text_pair"] = _texts(
                split, _require_column(split, cfg.text_pair, "text_pair"), "text_pair"
            )
        column = label_columns[role]
        if None in keys[role]:
            raise _unlabelled_error(split, role, keys[role], column)
        ids = [
            _label_id(key, label2id, ints_are_ids, split, row, column, cfg)
            for row, key in enumerate(keys[role])
        ]
        columns["label"] = ids
        columns["row"] = list(range(len(ids)))
        pools[role] = Dataset.from_dict(columns)
    if len(set(train_keys)) == 1:
        raise DataError(
            f"{train.origin} column '{label_columns['train']}': classification needs at least 2 "
            f"labels in the training split, found only {train_keys[0]!r}; add rows of the other classes "
            "(or point data.label at the column that holds the classes)"
        )
    warnings = [] if ints_are_ids else _warn(_respelled_numbers_note(train, label_columns["train"]))
    if cfg.labels is None:  # listed in data.labels: the user means them as classes
        warnings += _warn(_missing_value_labels_note(names, train.origin))
    return names, pools, warnings


# spellings that spreadsheets and pandas write for a missing value; "none" and "NA" are left
# out: they are real class names in some datasets ("no relation", "North America")
_MISSING_SPELLINGS = {"nan", "null", "#n/a", "n/a", "<na>"}


def _missing_value_labels_note(names: list[str], origin: str) -> str | None:
    """A label 'NaN' is a class to lorafit (csv/tsv cells are read as written); say so."""
    missing = [n for n in names if n.strip().lower() in _MISSING_SPELLINGS]
    if not missing:
        return None
    shown = ", ".join(repr(n) for n in missing)
    return (
        f"{origin}: label {shown} looks like a missing value but is a class of its own; if those "
        f"rows are unlabelled, empty the label cells or remove the rows"
    )


def _respelled_numbers_note(split: _Split, column: str) -> str | None:
    """Numeric csv/tsv labels are read as numbers, so '01' becomes class '1': say so."""
    if not split.untyped:
        return None
    names = {v.strip(): numeric_label_name(v) for v in split.dataset[column][:] if v and v.strip()}
    if not all(names.values()):
        return None  # not a numeric column: labels keep their spelling
    changed = sorted(v for v, name in names.items() if name != v)
    if not changed:
        return None
    shown = ", ".join(f"'{v}' -> '{names[v]}'" for v in changed[:4])
    more = ", ..." if len(changed) > 4 else ""
    return (
        f"{split.origin} column '{column}': the labels are numbers, so they are named by their "
        f"value ({shown}{more}); predictions and label_map.json use these names"
    )


def _integer_labels_are_ids(
    train_keys: list[int | str], names: list[str], train: _Split, column: str
) -> bool:
    """With data.labels: integer labels are names when every one is listed, ids when none is;
    partly listed is ambiguous."""
    if not all(isinstance(k, int) for k in train_keys):
        return False
    distinct = sorted(set(train_keys))
    unlisted = [k for k in distinct if str(k) not in names]
    if not unlisted:
        return False
    if len(unlisted) == len(distinct):
        if distinct[0] >= 1 and distinct[-1] == len(names):  # e.g. 1..4 for 4 names
            raise DataError(
                f"{train.origin} column '{column}': integer labels {distinct[0]}..{distinct[-1]} "
                f"look 1-based, but with data.labels={names} they are ids 0..{len(names) - 1}; "
                f"renumber the labels from 0 in the file, or list the label values in data.labels"
            )
        return True
    as_ids = ", ".join(f"{k} -> '{names[k]}'" for k in distinct[:4] if 0 <= k < len(names))
    raise DataError(
        f"{train.origin} column '{column}': integer labels {distinct[:8]} are partly listed in "
        f"data.labels={names}, so they are ambiguous: as names, {unlisted[0]} is not in data.labels; "
        f"as ids, {as_ids or 'none is in range'}; to mean names list every label value in "
        f"data.labels, to mean ids give data.labels names that are not integers"
    )


def _label_id(
    key: int | str,
    label2id: dict[str, int],
    ints_are_ids: bool,
    split: _Split,
    row: int,
    column: str,
    cfg: DataConfig,
) -> int:
    where = f"{split.origin} row {row} column '{column}'"
    if ints_are_ids and isinstance(key, int):
        if 0 <= key < len(label2id):
            return key
        raise DataError(
            f"{where}: label id {key} is outside 0..{len(label2id) - 1} of data.labels; fix the row or extend data.labels"
        )
    if str(key) in label2id:
        return label2id[str(key)]
    names = list(label2id)
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if cfg.labels is not None:
        raise DataError(
            f"{where}: unknown label '{key}'{hint}; data.labels is {names}: fix the row or add the label"
        )
    raise DataError(
        f"{where}: label '{key}' does not occur in the training split{hint}; list every label in "
        f"data.labels to keep the row (a class without training rows is never predicted) or remove it"
    )


def instruction_prompt(instruction: str, extra: Any) -> str:
    """The user turn of an Alpaca-style row: the instruction, then its input after a blank line."""
    return f"{instruction}\n\n{extra}" if extra is not None and str(extra).strip() else instruction


def _normalise_sft(split: _Split, cfg: DataConfig) -> Dataset:
    """Chat `messages`, or instruction (+ input) and output columns -> messages ending with the response."""
    columns = split.dataset.column_names
    if cfg.messages in columns:
        conversations = [
            _check_messages(m, split, row, cfg.messages)
            for row, m in enumerate(split.dataset[cfg.messages][:])
        ]
    else:
        instruction = _require_column(split, cfg.instruction, "instruction")
        output = _require_column(split, cfg.output, "output", taken=(instruction, cfg.input))
        instructions = _texts(split, instruction, "instruction")
        outputs = _texts(split, output, "output")
        inputs = split.dataset[cfg.input][:] if cfg.input in columns else [None] * len(instructions)
        conversations = []
        for text, extra, response in zip(instructions, inputs, outputs):
            conversations.append(
                [
                    {"role": "user", "content": instruction_prompt(text, extra)},
                    {"role": "assistant", "content": response},
                ]
            )
    return Dataset.from_dict({"messages": conversations, "row": list(range(len(conversations)))})


CHAT_ROLES = ("system", "user", "assistant", "tool")  # what chat templates render
# ShareGPT writes a turn as {"from": "human" | "gpt" | "system", "value": ...}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def as_chat_message(message: Any) -> Any:
    """A ShareGPT turn as a {'role', 'content'} message; anything else as given."""
    if isinstance(message, dict) and message.get("role") is None and "from" in message:
        speaker = str(message["from"])
        return {"role": _SHAREGPT_ROLES.get(speaker, speaker), "content": message.get("value")}
    return message


def _check_messages(messages: Any, split: _Split, row: int, column: str) -> list[dict[str, str]]:
    where = f"{split.origin} row {row} column '{column}'"
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages")
    checked = []
    for message in map(as_chat_message, messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                f"{where}: every message needs 'role' and 'content', got {str(message)[:80]!r}"
            )
        role = str(message["role"])
        if role not in CHAT_ROLES:
            raise DataError(
                f"{where}: role {role!r} is not one of {', '.join(CHAT_ROLES)} (or ShareGPT's "
                "'from': human / gpt / system)"
            )
        checked.append({"role": role, "content": str(message["content"] or "")})
    if checked[-1]["role"] != "assistant" or not checked[-1]["content"].strip():
        raise DataError(
            f"{where}: the last message must be a non-empty 'assistant' response (the training target)"
        )
    return checked


# -- splits and sampling -------------------------------------------------------------------------


def _strata(dataset: Dataset) -> np.ndarray:
    """Class ids to stratify on (one stratum for causal LM)."""
    if "label" in dataset.column_names:
        return np.asarray(dataset["label"][:], dtype=np.int64)
    return np.zeros(len(dataset), dtype=np.int64)


def _sampling(dataset: Dataset) -> str:
    """How `_split_off` drew `dataset`: by class when it has labels (see `_strata`)."""
    return "stratified" if "label" in dataset.column_names else "random"


def _tie_rank(counts: dict[int, int], seed: int, stage: int) -> dict[int, int]:
    """A random order of the classes, fixed by (seed, stage), that breaks rounding ties."""
    order = np.random.default_rng([seed, stage, _TIE_STREAM]).permutation(len(counts))
    return {c: int(rank) for c, rank in zip(sorted(counts), order)}


def _allocate(
    counts: dict[int, int],
    total: int,
    seed: int,
    stage: int,
    caps: dict[int, int] | None = None,
) -> dict[int, int]:
    """Split `total` across classes in proportion to `counts` by largest remainder, ties broken
    at random by (seed, stage); never above `caps` (default `counts`): what a capped class cannot
    take goes to the next largest remainders."""
    caps = caps or counts
    size = sum(counts.values())
    total = min(total, sum(caps.values()))
    exact = {c: total * n / size for c, n in counts.items()}
    share = {c: min(int(math.floor(x)), caps[c]) for c, x in exact.items()}
    rank = _tie_rank(counts, seed, stage)
    order = sorted(counts, key=lambda c: (share[c] - exact[c], rank[c]))
    short = total - sum(share.values())
    while short > 0:
        for c in order:
            if short > 0 and share[c] < caps[c]:
                share[c] += 1
                short -= 1
    return share


def _allocate_every_class(
    counts: dict[int, int], total: int, seed: int, stage: int
) -> dict[int, int]:
    """`_allocate`, but a class left without rows takes one from the class with the largest
    share; when `total` is below the number of classes, every class gets one row anyway."""
    share = _allocate(counts, total, seed, stage)
    rank = _tie_rank(counts, seed, stage)
    for c in [c for c, n in share.items() if n == 0]:
        donor = max(share, key=lambda d: (share[d], rank[d]))
        if share[donor] > 1:
            share[donor] -= 1
        share[c] = 1
    return share


def _draw(
    strata: np.ndarray, sizes: list[dict[int, int]], seed: int, stage: int
) -> list[np.ndarray]:
    """Disjoint stratified draws: draw j takes sizes[j][c] rows of class c; sorted row indices."""
    rng = np.random.default_rng([seed, stage])
    draws: list[list[np.ndarray]] = [[] for _ in sizes]
    for c in np.unique(strata):
        order = rng.permutation(np.flatnonzero(strata == c))
        start = 0
        for j, size in enumerate(sizes):
            draws[j].append(order[start : start + size.get(int(c), 0)])
            start += size.get(int(c), 0)
    return [np.sort(np.concatenate(d)) if d else np.zeros(0, dtype=np.int64) for d in draws]


def _class_counts(strata: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(strata, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts)}


def head_fit_sample(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """The training rows a fitted (contrastive) head learns from: all of them up to `size`, else a
    fixed sample stratified by class in which every class keeps at least one row."""
    if size is None or len(dataset) <= size:
        return dataset
    strata = _strata(dataset)
    share = _allocate_every_class(_class_counts(strata), size, seed, _HEAD_FIT)
    (rows,) = _draw(strata, [share], seed, _HEAD_FIT)
    return dataset.select(rows)


def _split_off(
    dataset: Dataset, n_out: int, seed: int, stage: int, every_class: bool = False
) -> tuple[Dataset, Dataset]:
    """(rest, carved): `n_out` rows carved out, stratified by class; with `every_class`, at least
    one row of each class when `n_out` allows."""
    strata = _strata(dataset)
    counts = _class_counts(strata)
    allocate = _allocate_every_class if every_class and n_out >= len(counts) else _allocate
    (carved,) = _draw(strata, [allocate(counts, n_out, seed, stage)], seed, stage)
    rest = np.setdiff1d(np.arange(len(dataset)), carved)
    return dataset.select(rest), dataset.select(carved)


def _fraction_size(n: int, fraction: float, what: str, origin: str) -> int:
    if n < 2:
        raise DataError(
            f"{origin}: {n} row(s) cannot be split into train and {what}; add rows or give a {what} file"
        )
    return min(n - 1, max(1, int(n * fraction + 0.5)))


def _assign_splits(
    pools: dict[str, Dataset],
    cfg: DataConfig,
    label_names: list[str] | None,
    validation_unused: bool = False,
) -> tuple[Dataset, Dataset, Dataset, list[str], list[str]]:
    """Given or carved test, then (K-shot) train and validation from the train pool; returns the
    splits, the sampling notes and the warnings. `validation_unused`: a given validation split
    was dropped (K-shot with a test split), which the notes say."""
    pool = pools["train"]
    notes: list[str] = []
    warnings: list[str] = []
    if "test" in pools:
        test = pools["test"]
        notes.append("test: the given test split")
    elif "validation" in pools:
        test = pools["validation"]
        notes.append("test: the given validation split (no labelled test split)")
    else:
        pool, test = _split_off(
            pool,
            _fraction_size(len(pool), cfg.test_fraction, "test", "train pool"),
            cfg.seed,
            _CARVE_TEST,
        )
        notes.append(
            f"test: {len(test)} rows carved from train (test_fraction={cfg.test_fraction}, seed {cfg.seed})"
        )

    if cfg.min_words:
        kept = [i for i, n in enumerate(_word_counts(pool)) if n >= cfg.min_words]
        notes.append(f"train pool: {len(kept)} of {len(pool)} rows with >= {cfg.min_words} words")
        pool = pool.select(kept)
        if len(pool) == 0:
            raise DataError(
                f"no training rows have >= {cfg.min_words} words (data.min_words); lower it"
            )

    if label_names is not None:
        warnings.extend(_warn(_classes_without_rows_note(pool, label_names, cfg.min_words)))
        warnings.extend(_warn(_labels_differing_in_case_note(label_names)))

    given_validation = "validation" in pools and "test" in pools
    if cfg.k_shot is not None:
        train, validation = _k_shot(pool, cfg, label_names)
        if cfg.k_shot_unit == "per_class" and label_names is not None:
            warnings.extend(_warn(_imbalance_note(pool, label_names)))
        elif label_names is not None:
            warnings.extend(_warn(_classes_left_out_note(pool, train, label_names, cfg.k_shot)))
        unit = (
            "per class"
            if cfg.k_shot_unit == "per_class" and label_names is not None
            else "in total"
        )
        notes.append(
            f"train: {cfg.k_shot} {unit}, validation: {cfg.validation_k or cfg.k_shot} {unit}, disjoint, "
            f"both from the train pool (LM-BFF, seed {cfg.seed})"
            + ("; the given validation split is unused" if validation_unused else "")
        )
    else:
        if given_validation:
            train, validation = pool, pools["validation"]
            notes.append("validation: the given validation split")
        else:
            n_validation = _fraction_size(
                len(pool), cfg.validation_fraction, "validation", "train pool"
            )
            train, validation = _split_off(pool, n_validation, cfg.seed, _CARVE_VALIDATION)
            notes.append(
                f"validation: {len(validation)} rows carved from train (validation_fraction={cfg.validation_fraction})"
                + (
                    "; data.validation_split names the test split, so it is not used for validation"
                    if _validation_is_test(cfg) and "test" in pools
                    else ""
                )
            )
        if cfg.train_size is not None:
            n_train = (
                int(len(train) * cfg.train_size + 0.5)
                if cfg.train_size < 1
                else int(cfg.train_size)
            )
            if n_train > len(train):
                raise DataError(
                    f"data.train_size={cfg.train_size:g} exceeds the {len(train)} training rows; lower it"
                )
            _, train = _split_off(train, max(1, n_train), cfg.seed, _TRAIN_SIZE)
            notes.append(
                f"train: {len(train)} rows, {_sampling(train)} (train_size={cfg.train_size:g}, seed {cfg.seed})"
            )

    test = _capped(test, "test", cfg.max_test_examples, cfg.seed, _MAX_TEST, notes)
    validation = _capped(
        validation, "validation", cfg.max_validation_examples, cfg.seed, _MAX_VALIDATION, notes
    )
    for role, dataset in (("train", train), ("validation", validation), ("test", test)):
        if len(dataset) == 0:
            raise DataError(
                f"the {role} split is empty after sampling; check data.k_shot, data.train_size and the data files"
            )
    if label_names is not None:
        warnings.extend(_warn(_classes_without_test_rows_note(test, train, label_names)))
    validation_in_pool = cfg.k_shot is not None or not given_validation
    keys = {name: _row_keys(d) for name, d in (("train", train), ("validation", validation))}
    warnings.extend(_warn(_leakage_note(pool, keys, test, validation_in_pool)))
    warnings.extend(_warn(_validation_overlap_note(keys)))
    return train, validation, test, notes, warnings


def _warn(note: str | None) -> list[str]:
    """A note worth a warning: logged once, and returned for `TaskData.warnings`."""
    if note is None:
        return []
    logger.warning(note)
    return [note]


def _classes_without_rows_note(
    pool: Dataset, label_names: list[str], min_words: int | None
) -> str | None:
    present = set(pool["label"][:])
    missing = [name for c, name in enumerate(label_names) if c not in present]
    if not missing:
        return None
    after = f" (after data.min_words={min_words})" if min_words else ""
    names = ", ".join(f"'{name}'" for name in missing)
    classes = "class" if len(missing) == 1 else "classes"
    return (
        f"no rows in the train pool{after} for data.labels {classes} {names}: kept in the label "
        "space but never trained on, so test rows of that label count as errors; add training "
        "rows for each or drop it from data.labels and the test file"
    )


def _classes_without_test_rows_note(
    test: Dataset, train: Dataset, label_names: list[str]
) -> str | None:
    """A trained class with no test rows: macro-F1 then counts it only if the model predicts it
    (as F1 0), so the number depends on the model's mistakes, not the data."""
    missing = sorted(set(train["label"][:]) - set(test["label"][:]))
    if not missing:
        return None
    names = ", ".join(f"'{label_names[c]}'" for c in missing[:5])
    classes = "class" if len(missing) == 1 else "classes"
    return (
        f"test: no rows of {classes} {names}{', ...' if len(missing) > 5 else ''}: macro-F1 counts "
        f"such a class (as F1 0) only when the model predicts it; add test rows of every class "
        f"for comparable macro-F1"
    )


def _classes_left_out_note(
    pool: Dataset, train: Dataset, label_names: list[str], k: int
) -> str | None:
    """K in total, in proportion to the pool, can leave a small class with no training row."""
    left_out = sorted(set(pool["label"][:]) - set(train["label"][:]))
    if not left_out:
        return None
    names = ", ".join(f"'{label_names[c]}'" for c in left_out[:5])
    # per_class draws K for training and K for validation from every class: say what fits
    smallest = min(_class_counts(_strata(pool)).values())
    per_class = (
        f"data.k_shot_unit=per_class with data.k_shot <= {smallest // 2} (the smallest class "
        f"has {smallest} pool rows)"
        if smallest >= 2
        else "data.k_shot_unit=per_class once every class has 2 or more pool rows"
    )
    return (
        f"train: no rows of class {names}{', ...' if len(left_out) > 5 else ''} (data.k_shot={k} in "
        f"total, shared in proportion to the pool): the model never predicts it; raise data.k_shot "
        f"or set {per_class}"
    )


def _capped(
    dataset: Dataset, role: str, limit: int | None, seed: int, stage: int, notes: list[str]
) -> Dataset:
    """data.max_<role>_examples: a stratified sample of at most `limit` rows (every class kept
    while `limit` allows), noted in `notes`."""
    if limit is None or len(dataset) <= limit:
        return dataset
    _, kept = _split_off(dataset, limit, seed, stage, every_class=True)
    notes.append(f"{role}: {_sampling(kept)} sample of {len(kept)} rows (max_{role}_examples)")
    return kept


def _labels_differing_in_case_note(label_names: list[str]) -> str | None:
    """'Pos' and 'pos' are two classes to lorafit; almost always a typo in the data. So are two
    Unicode spellings of 'négatif' (a composed and a decomposed é), which print alike."""
    by_folded: dict[str, list[str]] = {}
    for name in label_names:
        by_folded.setdefault(unicodedata.normalize("NFC", name).casefold(), []).append(name)
    clashes = [names for names in by_folded.values() if len(names) > 1]
    if not clashes:
        return None
    shown = "; ".join(" vs ".join(repr(n) for n in names) for names in clashes[:3])
    return (
        f"labels that differ only in case or Unicode form are separate classes: {shown}; if "
        f"they mean the same class, spell them one way in the data"
    )


def _imbalance_note(pool: Dataset, label_names: list[str]) -> str | None:
    """K per class balances an imbalanced pool: the model's class priors are not the data's."""
    counts = _class_counts(_strata(pool))
    if len(counts) < 2 or max(counts.values()) < IMBALANCE_RATIO * min(counts.values()):
        return None
    shares = ", ".join(
        f"'{label_names[c]}' {n}" for c, n in sorted(counts.items(), key=lambda x: -x[1])[:4]
    )
    return (
        f"imbalanced train pool ({shares}{', ...' if len(counts) > 4 else ''} rows): K per class "
        f"trains on balanced classes, so on a test set with these proportions accuracy can fall "
        f"below the majority-class rate; read macro-F1, or set data.k_shot_unit=total to keep them"
    )


def _row_keys(dataset: Dataset) -> list[str]:
    """What makes two rows the same input: text (+ text_pair), or an SFT row's prompt messages."""
    if "text" not in dataset.column_names:
        return [json.dumps(messages[:-1], sort_keys=True) for messages in dataset["messages"][:]]
    if "text_pair" not in dataset.column_names:
        return dataset["text"][:]
    return [f"{t}\x1f{p}" for t, p in zip(dataset["text"][:], dataset["text_pair"][:])]


def _leakage_note(
    pool: Dataset, keys: dict[str, list[str]], test: Dataset, validation_in_pool: bool
) -> str | None:
    """Test rows that repeat a training input inflate test scores: count them (never removed).
    `keys`: the `_row_keys` of the drawn train and validation rows."""
    drawn = set(keys["train"]) | set(keys["validation"])
    seen = set(_row_keys(pool)) | drawn
    test_keys = _row_keys(test)
    n_seen = sum(key in seen for key in test_keys)
    if not n_seen:
        return None
    n_drawn = sum(key in drawn for key in test_keys)
    where = "the train pool" if validation_in_pool else "the train pool or validation file"
    if "text_pair" in test.column_names:
        same = "same text and text_pair"
    else:
        same = "same text" if "text" in test.column_names else "same prompt"
    return (
        f"leakage: {n_seen} of {len(test)} test rows also appear in {where} ({n_drawn} of them "
        f"in the drawn train/validation rows; {same}); test scores may be optimistic, "
        f"deduplicate the data files"
    )


def _validation_overlap_note(keys: dict[str, list[str]]) -> str | None:
    """Validation rows that repeat a training input (duplicated rows in the data) make the
    validation curve, the gap and model selection look better than they are."""
    seen = set(keys["train"])
    n = sum(key in seen for key in keys["validation"])
    if not n:
        return None
    return (
        f"leakage: {n} of {len(keys['validation'])} validation rows repeat a training input: validation "
        f"scores, the train/validation gap and model selection may be optimistic; deduplicate "
        f"the data files"
    )


def _word_counts(dataset: Dataset) -> list[int]:
    if "text" in dataset.column_names:
        return [len(t.split()) for t in dataset["text"][:]]
    return [sum(len(m["content"].split()) for m in messages) for messages in dataset["messages"][:]]


def _k_shot(
    pool: Dataset, cfg: DataConfig, label_names: list[str] | None
) -> tuple[Dataset, Dataset]:
    """LM-BFF: K per class for training and a disjoint validation_k per class, from the train pool
    (classes without pool rows get none; `_assign_splits` warns about them)."""
    k, validation_k = cfg.k_shot, cfg.validation_k or cfg.k_shot
    strata = _strata(pool)
    counts = _class_counts(strata)
    if cfg.k_shot_unit == "per_class" and label_names is not None:
        train_sizes = {c: k for c in counts}
        validation_sizes = {c: validation_k for c in counts}
        smallest = min(counts, key=lambda c: counts[c])
        n = counts[smallest]
        if n < k + validation_k:
            largest_k = n - cfg.validation_k if cfg.validation_k else n // 2
            fits = (
                f"the largest data.k_shot that fits is {largest_k}"
                if largest_k >= 1
                else "lower data.validation_k"
            )
            raise DataError(
                f"class '{label_names[smallest]}' has {n} rows in the train pool but K-shot needs "
                f"{k} (data.k_shot) + {validation_k} (data.validation_k) disjoint rows; {fits}, "
                f"or set data.k_shot_unit=total to draw K rows in all, or add rows"
            )
    else:
        if len(pool) < k + validation_k:
            raise DataError(
                f"the train pool has {len(pool)} rows but K-shot needs {k} (data.k_shot) + {validation_k} "
                f"(data.validation_k) disjoint rows; lower them or add rows"
            )
        # validation in proportion to the pool like train (same tie-breaking), within what is left
        train_sizes = _allocate(counts, k, cfg.seed, _K_SHOT)
        remaining = {c: counts[c] - train_sizes[c] for c in counts}
        validation_sizes = _allocate(counts, validation_k, cfg.seed, _K_SHOT, caps=remaining)
    train_idx, validation_idx = _draw(strata, [train_sizes, validation_sizes], cfg.seed, _K_SHOT)
    return pool.select(train_idx), pool.select(validation_idx)


# -- SFT tokenisation ----------------------------------------------------------------------------


def _render_prompt(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """Text of the prompt messages up to and including the assistant's generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    preamble = ALPACA_PREAMBLE
    parts = []
    for message in messages:
        if message["role"] == "system":
            preamble = message["content"].strip() + "\n\n"
        elif message["role"] == "assistant":
            parts.append(f"### Response:\n{message['content']}\n\n")
        else:
            parts.append(f"### Instruction:\n{message['content']}\n\n")
    return (tokenizer.bos_token or "") + preamble + "".join(parts) + "### Response:\n"


# stands in for the last prompt message when finding what the template puts after it
_CONTENT_SENTINEL = "LORAFIT-PROMPT-CONTENT-SENTINEL"


def _template_tail(prompt_messages: list[dict[str, str]], tokenizer: Any) -> list[int]:
    """Tokens the template renders after the last prompt message's content (its end of turn and
    the assistant marker, e.g. '<|im_end|>\n<|im_start|>assistant\n'); [] when not found."""
    if not prompt_messages:
        return []
    stand_in = [*prompt_messages[:-1], {**prompt_messages[-1], "content": _CONTENT_SENTINEL}]
    rendered = _render_prompt(stand_in, tokenizer)
    if _CONTENT_SENTINEL not in rendered:
        return []
    tail = rendered.rsplit(_CONTENT_SENTINEL, 1)[1]
    return tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []


def fit_prompt(
    prompt: list[int], messages: list[dict[str, str]], tokenizer: Any, budget: int
) -> list[int]:
    """`prompt` (the token ids of `messages` rendered) cut to `budget` tokens if longer: its head
    (system prompt, instruction) and, room permitting, the template's tail (the assistant
    marker). Training and `lorafit predict` cut prompts the same way."""
    if len(prompt) <= budget:
        return prompt
    tail = _template_tail(messages, tokenizer)
    keep_tail = tail if len(tail) < budget else []
    return prompt[: budget - len(keep_tail)] + keep_tail


def _tokenize_sft(
    conversations: list[list[dict[str, str]]], tokenizer: Any, max_length: int, split: str | None
) -> dict[str, list]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError(
            "the tokenizer has no eos token; causal-LM SFT needs one to end each response"
        )
    min_response = max(1, max_length // 4)
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    truncated = 0
    for messages in conversations:
        prompt = tokenizer(_render_prompt(messages[:-1], tokenizer), add_special_tokens=False)[
            "input_ids"
        ]
        response = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"] + [eos]
        if len(prompt) + len(response) > max_length:
            # at least `min_response` response tokens; the prompt keeps its head and, room
            # permitting, the template's tail, so training sees the inference format
            truncated += 1
            keep_response = min(len(response), max(max_length - len(prompt), min_response))
            prompt = fit_prompt(prompt, messages[:-1], tokenizer, max_length - keep_response)
            response = response[:keep_response]
        columns["input_ids"].append(prompt + response)
        columns["attention_mask"].append([1] * (len(prompt) + len(response)))
        columns["labels"].append([IGNORE_INDEX] * len(prompt) + response)
    if truncated:
        logger.warning(
            "%d of %d SFT examples%s exceed max_length=%d tokens and were truncated (prompt "
            "head, template tail with the assistant marker, and response start kept); raise "
            "model.max_length to train on full examples",
            truncated,
            len(conversations),
            _in_split(split),
            max_length,
        )
    return columns


def _as_list(value: Any) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)
