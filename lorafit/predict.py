"""Batch prediction with one or several adapters on one base: `Predictor` and `lorafit predict`.

`Predictor({"sst2": dir_a, "news": dir_b})` loads the base once and every adapter onto it (PEFT
`load_adapter`); `predict(texts, adapter="news")` switches the active adapter (and, for
classification, the head that belongs to it) without reloading anything.
Classification returns the label and the probabilities; causal LM returns a generation.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from lorafit import data as D
from lorafit import methods as Meth
from lorafit.config import DataConfig
from lorafit.errors import DataError, ModelError
from lorafit.export import LoadedModel, check_base, load, open_package, verify_files
from lorafit.io import atomic_path, write_json
from lorafit.models import TextClassifier

logger = logging.getLogger(__name__)

INPUT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt")
TABLE_SUFFIXES = (".csv", ".tsv")  # --output as a table; any other name gets JSON lines
PROMPT_COLUMNS = ("prompt", "instruction", "input", "question")
MESSAGES_SHAPE = (
    "a list of {'role': ..., 'content': '...'} objects whose last is from the 'user' (a trailing "
    "'assistant' answer is dropped), e.g. [{'role': 'user', 'content': 'hi'}]"
)


@dataclass
class _Adapter:
    """One named adapter, ready to predict: the model to call and the PEFT adapter to activate."""

    loaded: LoadedModel
    model: nn.Module
    peft_name: str | None  # None: a single model that needs no switching


class Predictor:
    """Predict with one model, or with several adapters sharing one base in memory.

    sources: a folder (export, run directory, plain PEFT adapter) or {name: folder}. With several,
    every adapter must be a PEFT adapter of the same task on the same base (same weight hash).
    """

    def __init__(
        self,
        sources: str | Path | Mapping[str, str | Path],
        *,
        base_model: str | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(sources, Mapping):
            sources = {Path(sources).name: sources}
        if not sources:
            raise ModelError("no model folder given")
        names = list(sources)
        first = load(sources[names[0]], base_model=base_model, device=device)
        body = first.model.encoder if isinstance(first.model, TextClassifier) else first.model
        self.device = next(p.device for p in first.model.parameters())
        self._adapters = {names[0]: _Adapter(first, first.model, "default")}
        for i, name in enumerate(names[1:], start=1):
            self._adapters[name] = self._attach(name, sources[name], f"adapter{i}", first, body)
        if len(names) == 1:
            self._adapters[names[0]].peft_name = None

    def _attach(
        self, name: str, source: str | Path, peft_name: str, first: LoadedModel, body: nn.Module
    ) -> _Adapter:
        from peft import PeftModel

        if not isinstance(body, PeftModel):
            raise ModelError(
                f"the first model ({first.meta.get('method')}, {'merged' if first.manifest and first.manifest.get('kind') == 'merged' else 'no adapter'}) "
                "cannot share its base; list PEFT adapter folders (not merged or full models)"
            )
        package = open_package(source)
        verify_files(package)
        meta = package.meta
        if meta["task"] != first.task or bool(meta.get("plain_peft")) != bool(
            first.meta.get("plain_peft")
        ):
            raise ModelError(
                f"adapter {name!r} ({source}) is a {meta['task']} "
                f"{'plain-PEFT' if meta.get('plain_peft') else 'lorafit'} adapter but the first is a "
                f"{first.task} {'plain-PEFT' if first.meta.get('plain_peft') else 'lorafit'} one; "
                "adapters on one base must share the task and the format"
            )
        if meta.get("quantized") != first.meta.get("quantized") or meta["method"] == "full":
            raise ModelError(
                f"adapter {name!r} ({source}) cannot share the base of the first: one is 4-bit "
                "(qlora) or a full model; load it on its own"
            )
        if package.manifest:
            check_base(package, _config_of(first))
        elif not package.manifest and meta["base_model"] != first.meta["base_model"]:
            raise ModelError(
                f"adapter {name!r} was trained on {meta['base_model']}, not on "
                f"{first.meta['base_model']}; adapters on one base must share it"
            )
        try:
            body.load_adapter(str(package.weights_dir), adapter_name=peft_name, is_trainable=False)
        except Exception as e:
            raise ModelError(
                f"cannot load adapter {name!r} from {package.weights_dir}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"
            ) from None
        model = first.model
        if isinstance(first.model, TextClassifier):  # its own head on the shared encoder
            model = Meth.classifier_from_meta(body, meta).to(self.device)
            Meth._load_head(model, package.weights_dir / Meth.HEAD_FILE)
            model.requires_grad_(False).eval()
        body.requires_grad_(False)
        label_names = package.label_names
        if label_names is None and meta.get("plain_peft") and meta["task"] == "classification":
            label_names = [f"LABEL_{i}" for i in range(meta["num_labels"])]
        loaded = first._replace(
            model=model,
            label_names=label_names,
            max_length=(meta.get("model_config") or {}).get("max_length") or first.max_length,
            meta=meta,
            manifest=package.manifest,
        )
        return _Adapter(loaded, model, peft_name)

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    @property
    def task(self) -> str:
        return next(iter(self._adapters.values())).loaded.task

    def _select(self, adapter: str | None) -> _Adapter:
        chosen = self._adapters[adapter_name(adapter, self.adapters)]
        if chosen.peft_name is not None:
            body = (
                chosen.model.encoder if isinstance(chosen.model, TextClassifier) else chosen.model
            )
            body.set_adapter(chosen.peft_name)
            body.requires_grad_(False)  # set_adapter marks the active adapter trainable
        return chosen

    def predict(
        self,
        inputs: Sequence[str | Sequence[str] | list[dict[str, str]]],
        *,
        adapter: str | None = None,
        batch_size: int = 32,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        progress: bool = False,
        origins: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """One result per input, in order. Inputs are texts, [text, text_pair] for a model trained
        on sentence pairs (`data.text_pair`), or chat messages for causal LM. origins: where each
        input came from ("FILE line N"), named in errors (default "input I").

        classification: {"label", "label_id", "probs": {label: p}};
        causal LM: {"generation"} (temperature 0 = greedy).
        """
        chosen = self._select(adapter)
        if isinstance(inputs, str):  # iterating it would predict each character
            raise DataError("inputs must be a list of texts; for one text pass [text]")
        if not inputs:
            raise DataError("no inputs to predict")
        check_options(batch_size, max_new_tokens, temperature)
        where = list(origins) if origins is not None else [f"input {i}" for i in range(len(inputs))]
        if chosen.loaded.task == "classification":
            text_pair = chosen.loaded.meta.get("text_pair")
            texts, pairs = _classification_inputs(inputs, text_pair, where)
            return _classify(chosen, texts, pairs, batch_size, progress, self.device)
        prompts = [_generation_input(x, w) for x, w in zip(inputs, where)]
        return _generate(
            chosen, prompts, batch_size, max_new_tokens, temperature, progress, self.device
        )


def check_options(batch_size: int, max_new_tokens: int, temperature: float) -> None:
    """Refuse option values that cannot work, before any model loads (CLI) or runs."""
    if batch_size < 1:
        raise DataError(f"batch size (--batch-size) must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise DataError(
            f"max_new_tokens (--max-new-tokens) must be at least 1, got {max_new_tokens}"
        )
    if not temperature >= 0:  # NaN too
        raise DataError(
            f"temperature (--temperature) must be 0 (greedy) or positive, got {temperature}"
        )


def adapter_name(name: str | None, loaded: Sequence[str]) -> str:
    """The adapter to use: `name`, or the only one loaded; else a ModelError naming the choices."""
    if name is None:
        if len(loaded) > 1:
            raise ModelError(
                f"several adapters are loaded ({', '.join(loaded)}); choose one "
                "(CLI: --adapter NAME, or an 'adapter' field per input row)"
            )
        return loaded[0]
    if name not in loaded:
        raise ModelError(f"unknown adapter {name!r}; loaded adapters: {', '.join(loaded)}")
    return name


def _config_of(loaded: LoadedModel):
    from lorafit.config import ModelConfig

    return ModelConfig(**loaded.meta["model_config"])


def _classification_inputs(
    inputs: Sequence[Any], text_pair: str | None, where: list[str]
) -> tuple[list[str], list[str] | None]:
    """(texts, second texts or None). A pair model (trained with data.text_pair) takes pairs only."""
    if text_pair is None:
        for value, origin in zip(inputs, where):
            if not isinstance(value, str):
                raise DataError(
                    f"{origin}: classification inputs must be texts, got {type(value).__name__}"
                    " (this model was not trained on sentence pairs)"
                )
            _text(value, origin)  # an empty text is refused, as in a file
        return list(inputs), None
    for value, origin in zip(inputs, where):
        if not _is_pair(value):
            raise DataError(
                f"{origin}: this model was trained on sentence pairs (data.text_pair="
                f"{text_pair}); give each input as [text, text_pair]"
            )
        _text(value[0], origin)
        _text(value[1], origin)
    return [v[0] for v in inputs], [v[1] for v in inputs]


def _warn_truncated(count: int, total: int, max_length: int, kept: str) -> None:
    if count:
        logger.warning(
            "%d of %d inputs exceed max_length=%d tokens and were truncated (%s kept)",
            count,
            total,
            max_length,
            kept,
        )


def _generation_batches(lengths: list[int], batch_size: int, same_length: bool) -> list[list[int]]:
    """Row indices per batch, longest first; with `same_length`, a batch never mixes lengths."""
    batches: list[list[int]] = []
    for i in D.longest_first(lengths):
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and not (same_length and lengths[last[0]] != lengths[i]):
            last.append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def _classify(
    chosen: _Adapter,
    texts: list[str],
    pairs: list[str] | None,
    batch_size: int,
    progress: bool,
    device: torch.device,
) -> list[dict[str, Any]]:
    loaded = chosen.loaded
    tokenizer, max_length = loaded.tokenizer, loaded.max_length
    columns = {"text": texts, "row": list(range(len(texts)))}
    if pairs is not None:  # tokenised as tokenizer(text, text_pair), as in training
        columns["text_pair"] = pairs
    rows = Dataset.from_dict(columns)
    features = D.tokenize(rows, tokenizer, "classification", max_length, warn=False).to_list()
    ids = [f["input_ids"] for f in features]
    truncated = D.count_truncated(tokenizer, texts, pairs, ids, max_length)
    _warn_truncated(truncated, len(texts), max_length, "start")
    collate = D.Collator(tokenizer, "classification")
    names = loaded.label_names
    results: list[dict[str, Any]] = [{} for _ in texts]
    order = D.longest_first([len(row) for row in ids])
    with tqdm(total=len(texts), unit="ex", desc="predict", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = collate([features[i] for i in order[start : start + batch_size]])
            rows_in_batch = batch.pop("row").tolist()
            out = chosen.model(**{k: v.to(device) for k, v in batch.items()})
            logits = out if torch.is_tensor(out) else out.logits  # [B, C]
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            for row, p in zip(rows_in_batch, probs):
                label_id = int(p.argmax())
                results[row] = {
                    "label": names[label_id] if names else label_id,
                    "label_id": label_id,
                    "probs": {
                        (names[c] if names else str(c)): round(float(v), 6) for c, v in enumerate(p)
                    },
                }
            bar.update(len(rows_in_batch))
    return results


@torch.no_grad()
def _generate(
    chosen: _Adapter,
    inputs: list[str | list[dict[str, str]]],
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    progress: bool,
    device: torch.device,
) -> list[dict[str, Any]]:
    loaded = chosen.loaded
    tokenizer, max_length = loaded.tokenizer, loaded.max_length
    conversations = [[{"role": "user", "content": x}] if isinstance(x, str) else x for x in inputs]
    prompts = [D._render_prompt(messages, tokenizer) for messages in conversations]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    # Cut an over-long prompt as training did: its head and the assistant turn marker.
    kept = "the head and the assistant marker, as in training"
    _warn_truncated(sum(len(ids) > max_length for ids in encoded), len(encoded), max_length, kept)
    encoded = [
        D.fit_prompt(ids, messages, tokenizer, max_length)
        for ids, messages in zip(encoded, conversations)
    ]
    pad_id = tokenizer.pad_token_id
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    results: list[dict[str, Any]] = [{} for _ in encoded]
    # Prompt-learning adapters put virtual tokens at fixed positions, before any left padding:
    # padding would shift the prompt away from them, so only equal lengths share a batch.
    peft_config = getattr(chosen.model, "active_peft_config", None)
    same_length = bool(getattr(peft_config, "is_prompt_learning", False))
    batches = _generation_batches([len(ids) for ids in encoded], batch_size, same_length)
    with tqdm(total=len(encoded), unit="ex", desc="generate", disable=not progress) as bar:
        for rows in batches:
            longest = max(len(encoded[i]) for i in rows)
            # generation continues at the right edge, so prompts are padded on the left
            input_ids = torch.tensor(
                [[pad_id] * (longest - len(encoded[i])) + encoded[i] for i in rows]
            )
            attention_mask = torch.tensor(
                [[0] * (longest - len(encoded[i])) + [1] * len(encoded[i]) for i in rows]
            )
            out = chosen.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            for row, ids in zip(rows, out[:, longest:].cpu()):
                results[row] = {"generation": tokenizer.decode(ids, skip_special_tokens=True)}
            bar.update(len(rows))
    return results


# -- input files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputColumns:
    """Where an input row's text is: the first of `text` present, and for a model trained on
    sentence pairs, `text_pair` (required in every row). `messages`: causal-LM chat rows are read.
    `instruction_input`: (instruction, input) columns; a row read from the instruction column gets
    its input appended as training does (lorafit.data.instruction_prompt)."""

    text: tuple[str, ...] = D.TEXT_COLUMN_CANDIDATES + PROMPT_COLUMNS
    text_pair: str | None = None
    messages: bool = True
    instruction_input: tuple[str, str] | None = (DataConfig.instruction, DataConfig.input)
    exact: bool = False  # a column the user named: its case must match too
    label: str | None = None  # true labels to score the predictions against (--label-column)


def _text_column(columns: list[str], chosen: InputColumns) -> str | None:
    """The first of `chosen.text` among `columns`; else, unless the user named the column, the
    first that only one column equals ignoring case (as training's auto-detection does)."""
    found = next((c for c in chosen.text if c in columns), None)
    if found is not None or chosen.exact:
        return found
    return next(filter(None, (D.detect_column(columns, c) for c in chosen.text)), None)


def input_columns(
    text_column: str | None,
    text_pair_column: str | None,
    meta: dict[str, Any],
    label_column: str | None = None,
) -> InputColumns:
    """The CLI's columns for one model: the given ones win, else those it was trained with."""
    if text_column:
        text: tuple[str, ...] = (text_column,)
    else:
        text = ((meta["text"],) if meta.get("text") else ()) + InputColumns.text
    given = bool(text_column)
    if meta["task"] == "causal_lm":
        if label_column:
            raise DataError("--label-column scores classifiers; this model is a causal LM")
        return InputColumns(text, None, messages=not given, exact=given)
    pair = text_pair_column or meta.get("text_pair")
    return InputColumns(
        text, pair, messages=False, instruction_input=None, exact=given, label=label_column
    )


Columns = InputColumns | Mapping[str, InputColumns]  # one for every row, or per adapter name


def _is_pair(value: Any) -> bool:
    """A [text, text_pair] input (a JSON array, or a 2-list/tuple of strings in Python)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(t, str) for t in value)
    )


def _text(value: Any, where: str) -> str:
    if isinstance(value, (list, dict)):  # str() would predict on "['a', 'b']"
        raise DataError(f"{where}: expected a text, got {type(value).__name__}: {str(value)[:60]}")
    if value is None or not str(value).strip():
        raise DataError(f"{where}: empty text; fill it in or remove the row")
    return value if isinstance(value, str) else str(value)


def _prompt_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Chat messages to answer; a trailing assistant message (a reference answer) is dropped."""
    if isinstance(messages, list):
        messages = [D.as_chat_message(m) for m in messages]
    valid = isinstance(messages, list) and all(
        isinstance(m, dict) and m.get("role") in D.CHAT_ROLES and isinstance(m.get("content"), str)
        for m in messages
    )
    if valid and messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not valid or not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: expected chat messages: {MESSAGES_SHAPE}")
    return messages


def _generation_input(value: Any, where: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return _text(value, where)
    if _is_pair(value):
        raise DataError(f"{where}: a causal LM takes a text or chat messages, not a [text, pair]")
    return _prompt_messages(value, where)


def _columns_for(name: str | None, columns: Columns, origin: str) -> InputColumns:
    """The columns of the model a row goes to."""
    if isinstance(columns, InputColumns):
        return columns
    try:
        return columns[adapter_name(name, list(columns))]
    except ModelError as e:
        raise ModelError(f"{origin}: {e}") from None


def _row_from_record(
    record: Any, origin: str, columns: Columns, adapter: str | None = None
) -> dict[str, Any]:
    """{"input": text, [text, text_pair] or messages, "origin", "id"?, "adapter"?} from a JSON
    value or csv row, read with the columns of the adapter it goes to (its own, else `adapter`)."""
    row: dict[str, Any] = {"origin": origin}
    if isinstance(record, dict):
        row.update({k: record[k] for k in ("id", "adapter") if record.get(k) not in (None, "")})
    chosen = _columns_for(row.get("adapter", adapter), columns, origin)
    if chosen.label is not None:
        row["true_label"] = _true_label(record, chosen.label, origin)
    if isinstance(record, str):
        row["input"] = _text(record, origin)
        return row
    if _is_pair(record):
        row["input"] = [_text(t, origin) for t in record]
        return row
    if not isinstance(record, dict):
        raise DataError(
            f"{origin}: expected a JSON object, a string or [text, text_pair], "
            f"got {type(record).__name__}"
        )
    if chosen.messages and record.get("messages") is not None:
        row["input"] = _prompt_messages(record["messages"], f"{origin} column 'messages'")
        return row
    column = _text_column(list(record), chosen)
    if column is None:
        raise DataError(
            f"{origin}: no text column ({', '.join(chosen.text)}); columns: "
            f"{', '.join(record)}; pass --text-column"
        )
    text = _text(record[column], f"{origin} column '{column}'")
    if chosen.instruction_input and column == chosen.instruction_input[0]:
        text = D.instruction_prompt(text, record.get(chosen.instruction_input[1]))
    row["input"] = text
    if chosen.text_pair is not None:
        if chosen.text_pair not in record:
            raise DataError(
                f"{origin}: no '{chosen.text_pair}' column (the second text of a sentence-pair "
                f"model); columns: {', '.join(record)}; pass --text-pair-column"
            )
        second = _text(record[chosen.text_pair], f"{origin} column '{chosen.text_pair}'")
        row["input"] = [text, second]
    return row


def _true_label(record: Any, column: str, origin: str) -> Any:
    """The raw value of the --label-column of one input row (mapped to an id when scored)."""
    if not isinstance(record, dict):
        raise DataError(f"{origin}: --label-column needs table or JSON-object rows, not plain text")
    if column not in record:
        raise DataError(
            f"{origin}: no '{column}' column (--label-column); columns: {', '.join(record)}"
        )
    value = record[column]
    if value is None or not str(value).strip():
        raise DataError(
            f"{origin} column '{column}': no label; fill it in or predict without --label-column"
        )
    return value


def read_inputs(
    path: str | Path,
    columns: Columns = InputColumns(),
    adapter: str | None = None,
    delimiter: str | None = None,
) -> list[dict[str, Any]]:
    """Rows of a csv/tsv/jsonl/json/parquet/txt file: {"input", "origin", optional "id", "adapter"}.

    columns: one InputColumns for every row, or {adapter name: InputColumns}: each row is read
    with those of the adapter it names (else `adapter`, else the only one)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise DataError(
            f"{path}: unsupported input '{suffix}'; use one of {', '.join(INPUT_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(f"input file {path} not found")
    if delimiter is not None and (suffix not in (".csv", ".tsv") or len(delimiter) != 1):
        raise DataError(f"--delimiter is one character for a .csv or .tsv input, got {delimiter!r}")
    rows, blank = [], []
    try:
        for record, origin in _records(path, suffix, delimiter):
            if record is _BLANK:
                blank.append(origin.rsplit(" ", 1)[-1])
            else:
                rows.append(_row_from_record(record, origin, columns, adapter))
    except UnicodeDecodeError:
        raise DataError(f"{path}: {D.not_utf8(path) or 'not UTF-8'}") from None
    if not rows:
        raise DataError(f"{path} has no input rows; nothing to predict")
    if blank:  # the output's `row` counts inputs, so say which lines it does not count
        shown = ", ".join(blank[:5]) + (f" and {len(blank) - 5} more" if len(blank) > 5 else "")
        print(
            f"{path}: skipped {len(blank)} blank line(s) (line {shown}); "
            "the output's `row` numbers the other lines from 0",
            file=sys.stderr,
        )
    return rows


_BLANK = object()  # a blank line of a .txt or JSON-lines input


def _records(path: Path, suffix: str, delimiter: str | None = None) -> Iterable[tuple[Any, str]]:
    """(record, origin) of each input in the file: a text, a JSON value or a table row;
    `delimiter` overrides the csv/tsv separator of the extension.

    A blank line of a .txt or JSON-lines file yields (_BLANK, origin): it is skipped."""
    if suffix == ".parquet":  # the training formats: parquet, and .json as one list
        for n, record in enumerate(_parquet_records(path)):
            yield record, f"{path} row {n}"
        return
    if suffix == ".json" and D.is_json_list(path):
        try:
            records = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
        for n, record in enumerate(records):
            yield record, f"{path} item {n}"
        return
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's "CSV UTF-8" BOM
        if suffix == ".txt":
            for n, line in enumerate(fh, start=1):
                yield (line.rstrip("\r\n") if line.strip() else _BLANK), f"{path} line {n}"
        elif suffix in (".jsonl", ".json"):  # a .json that is not one list: JSON lines
            for n, line in enumerate(fh, start=1):
                record = _BLANK
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
                yield record, f"{path} line {n}"
        else:  # TSV files carry bare quote characters, so quoting is off (as in lorafit.data)
            separator = delimiter or ("\t" if suffix == ".tsv" else ",")
            reader = csv.DictReader(
                fh,
                delimiter=separator,
                quoting=csv.QUOTE_NONE if separator == "\t" else csv.QUOTE_MINIMAL,
            )
            header = reader.fieldnames or []
            other = D.other_separator(header[0], separator) if len(header) == 1 else None
            if other:  # one column whose name holds another separator: e.g. a ;-separated csv
                raise DataError(
                    f"{path}: the header {header[0]!r} is one column; the file looks separated "
                    f"by {other!r}, not {separator!r}: pass --delimiter '{other}'"
                )
            # "line N" of the file, as for jsonl/txt ("row N" would read as the output's 0-based row)
            for record in reader:
                origin = f"{path} line {reader.line_num}"
                # fields past the header (csv keys them None) would be dropped, the text cut short;
                # a missing field is None, and an empty text or label is named where it is read
                extra = record.pop(None, None)
                if extra:
                    raise DataError(
                        f"{origin}: {len(header) + len(extra)} fields, the header has "
                        f"{len(header)}; quote a text that holds the separator {separator!r}"
                    )
                yield record, origin


def _parquet_records(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:
        raise DataError(
            f"could not read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            "; check that it is valid parquet"
        ) from None


def _output_record(index: int, row: dict[str, Any], result: dict[str, Any], named: bool) -> dict:
    record: dict[str, Any] = {"row": index}
    if "id" in row:
        record["id"] = row["id"]
    if named:
        record["adapter"] = row["adapter"]
    record.update(result)
    return record


def predict_rows(
    predictor: Predictor, rows: list[dict[str, Any]], adapter: str | None, **options: Any
) -> list[dict[str, Any]]:
    """Predict every row, grouped by adapter (a row's own "adapter" field wins over `adapter`)."""
    named = assign_adapters(predictor, rows, adapter)
    results: list[dict[str, Any]] = [{} for _ in rows]
    for name, indices in _by_adapter(rows).items():
        inputs = [rows[i]["input"] for i in indices]
        origins = [rows[i].get("origin", f"row {i}") for i in indices]
        outputs = predictor.predict(inputs, adapter=name, origins=origins, **options)
        for i, out in zip(indices, outputs):
            results[i] = _output_record(i, rows[i], out, named)
    return results


def assign_adapters(predictor: Predictor, rows: list[dict[str, Any]], adapter: str | None) -> bool:
    """Give each row its "adapter" (its own field, else `adapter`, else the only one); True when
    the predictor serves several."""
    named = len(predictor.adapters) > 1
    for row in rows:
        row.setdefault("adapter", adapter)
        if row["adapter"] is None and not named:
            row["adapter"] = predictor.adapters[0]
    return named


def _by_adapter(rows: list[dict[str, Any]]) -> dict[str | None, list[int]]:
    """Row indices by the adapter each row goes to, in first-seen order."""
    groups: dict[str | None, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["adapter"], []).append(i)
    return groups


def true_label_ids(predictor: Predictor, rows: list[dict[str, Any]]) -> dict[int, int]:
    """{row index: the model's label id} of the rows' true labels ("true_label", read by
    --label-column); called before predicting, so that a bad label fails before any work."""
    ids = {}
    for name, indices in _by_adapter(rows).items():
        names = predictor._adapters[name].loaded.label_names
        ids.update({i: _label_id(rows[i], names) for i in indices})
    return ids


def score_predictions(
    predictor: Predictor,
    rows: list[dict[str, Any]],
    results: list[dict[str, Any]],
    label_ids: dict[int, int],
) -> dict[str, dict[str, Any]]:
    """{adapter: metrics} of the predictions against the true labels (`true_label_ids`), with
    bootstrap CIs over the rows. Each result gains "true_label", the label's name in the
    model's own spelling."""
    from lorafit.config import EvalConfig
    from lorafit.evaluate import confidence_intervals, evaluate_logits

    eval_cfg = EvalConfig()
    scores = {}
    for name, indices in _by_adapter(rows).items():
        names = predictor._adapters[name].loaded.label_names
        labels = np.array([label_ids[i] for i in indices], dtype=np.int64)
        probs = np.array([[results[i]["probs"][n] for n in names] for i in indices])  # [N, C]
        log_probs = np.log(np.clip(probs, 1e-12, None)).astype(np.float32)  # softmax -> probs
        evaluated = evaluate_logits(log_probs, labels, len(names), eval_cfg, keep_per_example=True)
        ci = confidence_intervals(evaluated.per_example, "classification", len(names), eval_cfg)
        scores[name] = {**evaluated.metrics, "n": len(indices), "ci": ci}
        scores[name]["ci_level"] = eval_cfg.ci_level  # as summary.json's test block has it
        for i, label in zip(indices, labels.tolist()):
            results[i]["true_label"] = names[label]
    return scores


def _label_id(row: dict[str, Any], names: list[str]) -> int:
    """A true label as the model's label id: its name ("positive"), or its id (0, "1") where no
    label name is a number (labels 1/3/5: "1" is the name, never id 1)."""
    raw = row["true_label"]
    text = str(raw).strip()
    if text not in names and not isinstance(raw, bool):  # "01", "+1", "1.0": training's "1"
        text = D.numeric_label_name(text) or text
    if text in names:
        return names.index(text)
    numbered = any(re.fullmatch(r"[+-]?\d+", name) for name in names)
    if not numbered and not isinstance(raw, bool) and text.isdigit() and int(text) < len(names):
        return int(text)
    ids = (
        "; its labels are numbers, so a value is read as a label name, never as an id"
        if numbered
        else f" (or their ids 0-{len(names) - 1})"
    )
    raise DataError(
        f"{row['origin']}: unknown label {raw!r}; the model's labels are {', '.join(names)}{ids}"
    )


def _score_lines(scores: dict[str, dict[str, Any]], column: str) -> list[str]:
    lines = []
    for name, score in scores.items():
        low, high = score["ci"].get("accuracy", (float("nan"),) * 2)
        who = f"{name}: " if len(scores) > 1 else ""
        lines.append(
            f"{who}against '{column}': accuracy {score['accuracy']:.4f} (95% CI {low:.3f}-"
            f"{high:.3f}), macro-F1 {score['f1_macro']:.4f}, ECE {score['ece']:.4f}, "
            f"NLL {score['nll']:.4f} on {score['n']} rows"
        )
    return lines


def _stdin_record(line: str, where: str) -> Any:
    """A JSON object, string or [text, text_pair]; any other line is plain text."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        if line.startswith("{"):  # meant as a JSON object
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        return line
    return value if isinstance(value, (str, dict)) or _is_pair(value) else line


def _stream(predictor: Predictor, columns: Columns, args: Any, options: dict[str, Any]) -> int:
    """stdin -> stdout, one line at a time: a text, or a JSON object, string or [text, text_pair]."""
    count = 0
    for n, line in enumerate(sys.stdin, start=1):
        if not line.strip():  # not an input: say so, a client pairing lines 1:1 would drift
            print(f"lorafit: stdin line {n} is blank: skipped, no output line", file=sys.stderr)
            continue
        where = f"stdin line {n}"
        row = _row_from_record(_stdin_record(line.strip(), where), where, columns, args.adapter)
        [result] = predict_rows(predictor, [row], args.adapter, **options)
        result["row"] = count
        sys.stdout.write(_json_lines([result]))
        sys.stdout.flush()
        count += 1
    if count == 0:
        raise DataError("no input rows on stdin; nothing to predict")
    return 0


def parse_model_dirs(values: Iterable[str]) -> dict[str, str]:
    """CLI model folders, each DIR or NAME=DIR; names default to the folder name."""
    sources: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep:
            name, folder = Path(value.rstrip("/")).name, value
        if name in sources:
            raise ModelError(f"two model folders are named {name!r}; name them with NAME=DIR")
        sources[name] = folder
    return sources


def predict_cli(args: Any) -> int:
    """`lorafit predict DIR [NAME=DIR ...] --input FILE|- --output FILE|-`."""
    sources = parse_model_dirs(args.model_dir)
    check_options(args.batch_size, args.max_new_tokens, args.temperature)
    if args.adapter is not None:
        adapter_name(args.adapter, list(sources))  # an unknown name fails before any work
    if args.label_column and args.input == "-":
        raise DataError("--label-column scores a whole file; pass --input FILE")
    if args.metrics and not args.label_column:
        raise DataError("--metrics writes the scores of --label-column; pass it too")
    if args.input == "-" and args.output != "-":
        raise DataError("--input - streams to stdout; use --output - with it")
    if args.output != "-" and Path(args.output).resolve() == Path(args.input).resolve():
        raise DataError(f"--output {args.output} is the --input file; write to another file")
    columns = {
        name: input_columns(
            args.text_column, args.text_pair_column, open_package(folder).meta, args.label_column
        )
        for name, folder in sources.items()
    }
    rows = (
        None
        if args.input == "-"
        else read_inputs(args.input, columns, args.adapter, delimiter=args.delimiter)
    )
    predictor = Predictor(sources, base_model=args.base_model, device=args.device)
    options = {
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
    }
    if rows is None:
        return _stream(predictor, columns, args, options)
    if args.label_column:
        assign_adapters(predictor, rows, args.adapter)
        label_ids = true_label_ids(predictor, rows)  # a bad label fails before predicting
    results = predict_rows(predictor, rows, args.adapter, progress=True, **options)
    if args.label_column:
        scores = score_predictions(predictor, rows, results, label_ids)
        for line in _score_lines(scores, args.label_column):
            print(line, file=sys.stderr)
        if args.metrics:
            write_json(args.metrics, scores)
    if args.output == "-":
        sys.stdout.write(_json_lines(results))
        sys.stdout.flush()
    else:
        with atomic_path(args.output) as tmp:
            write_predictions(tmp, results, rows, table=Path(args.output).suffix.lower())
        print(f"wrote {len(results)} predictions to {args.output}", file=sys.stderr)
    return 0


def write_predictions(
    path: Path, results: list[dict[str, Any]], rows: list[dict[str, Any]], table: str = ""
) -> None:
    """JSONL, or a table when `table` is ".csv" or ".tsv": one row per input with its text(s),
    the prediction, and a `prob_<label>` column per label (the union over the adapters used)."""
    if table not in TABLE_SUFFIXES:
        path.write_text(_json_lines(results))
        return
    records = []
    for result, row in zip(results, rows):
        text = row["input"]
        if isinstance(text, list) and text and isinstance(text[0], dict):  # chat: the last turn
            text = text[-1]["content"]
        texts = {"text": text} if isinstance(text, str) else dict(zip(("text", "text_pair"), text))
        record = {k: result[k] for k in ("row", "id", "adapter") if k in result} | texts
        record.update({k: v for k, v in result.items() if k not in record and k != "probs"})
        if "probs" in result:
            record["confidence"] = result["probs"][result["label"]]
            record.update({f"prob_{k}": v for k, v in result["probs"].items()})
        records.append(record)
    header = list(dict.fromkeys(k for record in records for k in record))  # first-seen order
    with open(path, "w", newline="", encoding="utf-8") as fh:
        # a tsv is read back with quoting off, like the training reader: no tabs or newlines
        if table == ".tsv":
            writer = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None)
            clean = [{k: _tsv_cell(v) for k, v in r.items()} for r in records]
        else:
            writer, clean = csv.writer(fh), records
        writer.writerow(header)
        writer.writerows([r.get(k, "") for k in header] for r in clean)


def _json_lines(results: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in results)


def _tsv_cell(value: Any) -> Any:
    return " ".join(value.split()) if isinstance(value, str) else value
