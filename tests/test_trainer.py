"""The training recipe end to end on tiny models: run directory, selection, resume, failures."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorafit.config import SELECTION_METRICS, TrainConfig, load_config, objective_for
from lorafit.errors import ConfigError, ModelError, TrainingError
from lorafit.io import append_jsonl, read_jsonl
from lorafit.rundir import plot_learning_curve
from lorafit.trainer import Selection, StepBatchSampler, Trainer, train

POSITIVE = "great wonderful loved excellent charming joy".split()
NEGATIVE = "terrible boring bad worst dull slow".split()
FILLER = "the movie was a film with this story".split()


def sentiment_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return rows


@pytest.fixture(scope="module")
def sentiment_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sentiment")
    for split, n, seed in (("train", 80, 0), ("test", 40, 1)):
        with open(folder / f"{split}.jsonl", "w") as fh:
            for row in sentiment_rows(n, seed):
                fh.write(json.dumps(row) + "\n")
    return folder


def tiny_overrides(model_path, data_dir, out, **extra) -> list[str]:
    base = {
        "model.name_or_path": model_path,
        "model.max_length": 16,
        "data.path": str(data_dir),
        "data.k_shot": 8,
        "method.name": "lora",
        "method.r": 4,
        "train.steps": 12,
        "train.batch_size": 4,
        "train.lr": 5e-3,
        "train.eval_every": 4,
        "eval.batch_size": 16,
        "eval.bootstrap_samples": 200,
        "output.dir": str(out),
        "output.report_to": "[]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_tiny(model_path, data_dir, out, **extra) -> dict:
    return train(load_config(None, tiny_overrides(model_path, data_dir, out, **extra)))


def test_many_classes_draw_contrastive_batches_as_class_pairs(tiny_bert_path, tmp_path, capsys):
    data = tmp_path / "ten"
    data.mkdir()
    rows = [
        {"text": f"word{c} item{i}", "label": f"class {c}"} for c in range(10) for i in range(8)
    ]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # K=4 x 10 classes, batches of 8: a random batch holds 28 * 10*4*3 / (40*39) = 2.2 pairs
    extra = {"data.k_shot": 4, "train.batch_size": 8, "train.steps": 4, "output.plot": "false"}
    summary = run_tiny(tiny_bert_path, data, tmp_path / "auto", **extra)
    assert summary["objective"] == "contrastive" and summary["batch_sampling"] == "class_pairs"
    out = capsys.readouterr().out
    assert "pairs: a random batch of 8 holds 2.2 same-label pairs on average over 10" in out
    random = run_tiny(
        tiny_bert_path, data, tmp_path / "random", **extra, **{"train.batch_sampling": "random"}
    )
    assert random["batch_sampling"] == "random"
    assert "set train.batch_sampling=class_pairs" in capsys.readouterr().out


def test_classification_run_directory(tiny_bert_path, sentiment_dir, tmp_path):
    out = tmp_path / "run"
    summary = run_tiny(tiny_bert_path, sentiment_dir, out, **{"output.report_to": "[tensorboard]"})
    for name in (
        "config.yaml",
        "label_map.json",
        "metrics.jsonl",
        "summary.json",
        "learning_curve.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert any((out / "tb").rglob("events.out.tfevents*"))
    weights = sum(f.stat().st_size for f in (out / "adapter").glob("*.safetensors"))
    assert (out / "adapter" / "tokenizer.json").is_file()  # shipped, but not the adapter's size
    assert summary["adapter_bytes"] == weights
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 4, 8, 12]
    for r in rows:
        assert set(r["train"]) >= {"loss", "accuracy", "ece"}
        assert set(r["validation"]) >= set(SELECTION_METRICS["classification"])
        assert r["gap"]["loss"] == pytest.approx(r["validation"]["loss"] - r["train"]["loss"])
    assert summary["status"] == "completed"
    assert summary["num_train"] == 16 and summary["num_validation"] == 16
    assert summary["num_test"] == 40
    assert summary["test"]["n"] == 40 and isinstance(summary["test"]["n"], int)  # 40, not 40.0
    assert "train: 8 per class" in summary["data_source"]  # the K-shot draw, as printed
    assert summary["validation_label_counts"] == [8, 8]
    selected_row = (
        rows[-1]
        if summary["selected"] == "last"
        else rows[[r["step"] for r in rows].index(summary["best_step"])]
    )
    assert summary["validation_at_selected"] == selected_row["validation"]
    assert 0 < summary["eval_time_s"] < summary["wall_time_s"]
    assert summary["best_step"] in (4, 8, 12)  # step 0 is logged, never selected
    assert rows[0]["best"] is False and summary["validation_at_start"] == rows[0]["validation"]
    lo, hi = summary["test"]["ci"]["accuracy"]
    assert lo <= summary["test"]["accuracy"] <= hi
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    preds = read_jsonl(out / "predictions" / "test.jsonl")
    assert len(preds) == 40
    assert np.mean([p["pred"] == p["label"] for p in preds]) == pytest.approx(
        summary["test"]["accuracy"]
    )
    # the resolved config is saved and reloads to the same run
    assert load_config(out / "config.yaml").fingerprint() == summary["config_sha256"]
    # and the data files it read are named by their bytes (a sweep refuses edited data)
    digests = {
        s: hashlib.sha256((sentiment_dir / f"{s}.jsonl").read_bytes()).hexdigest()
        for s in ("train", "test")
    }
    assert summary["data_sha256"] == digests


def _without_dropout(model_path: str, folder: Path) -> str:
    """A copy of the tiny model with dropout off: runs that differ in RNG use train alike."""
    shutil.copytree(model_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _saved_weights(run: Path) -> dict[str, torch.Tensor]:
    """The trained weights a run saved (an adapter, or a full model)."""
    files = sorted((run / "adapter").glob("*.safetensors"))
    assert files, run
    return {k: v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize(("method", "objective"), [("lora", "auto"), ("full", "ce")])
def test_refit_equals_a_fresh_run_on_train_plus_validation(
    method, objective, tiny_bert_path, sentiment_dir, tmp_path
):
    """The refit trains from the initial weights on the K-shot train rows followed by the
    validation rows: the same weights as a new run given those rows as its training file."""
    model = _without_dropout(tiny_bert_path, tmp_path / "model")
    extra = {"method.name": method, "method.dropout": 0.0, "train.calibration": "none"}
    extra["train.objective"] = objective  # contrastive: a fitted head; ce: a trained one
    if method == "full":  # set, as any method can; LoRA's recipe has it on for K-shot data
        extra["train.refit"] = "true"
    trainer = Trainer(
        load_config(None, tiny_overrides(model, sentiment_dir, tmp_path / "refit", **extra))
    )
    trainer.setup()
    assert trainer.refit
    refit = trainer.train()
    assert (refit["refit"]["steps"], refit["refit"]["num_train"]) == (12, 32)
    assert refit["num_train"] == 16 and refit["num_validation"] == 16
    # the monitored run's curve is kept as it was: 16 training rows, validation held out
    assert [r["step"] for r in read_jsonl(tmp_path / "refit" / "metrics.jsonl")] == [0, 4, 8, 12]

    both = tmp_path / "both"
    both.mkdir()
    rows = [
        {"text": text, "label": trainer.label_names[label]}
        for split in (trainer.data.train, trainer.data.validation)
        for text, label in zip(split["text"], split["label"])
    ]
    for name, split_rows in (("train", rows), ("validation", rows[16:])):
        (both / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    shutil.copy(sentiment_dir / "test.jsonl", both / "test.jsonl")
    given = {**extra, "train.refit": "null", "data.k_shot": "null"}
    fresh = run_tiny(model, both, tmp_path / "fresh", **given)
    assert fresh["refit"] is None and fresh["num_train"] == 32  # a given validation: not by default

    a, b = _saved_weights(tmp_path / "refit"), _saved_weights(tmp_path / "fresh")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert refit["test"]["accuracy"] == fresh["test"]["accuracy"]
    assert refit["test"]["nll"] == pytest.approx(fresh["test"]["nll"], rel=1e-4)
    # and the refit moved the weights away from the monitored run's
    monitored = run_tiny(
        model, sentiment_dir, tmp_path / "monitored", **{**extra, "train.refit": "false"}
    )
    assert monitored["refit"] is None
    c = _saved_weights(tmp_path / "monitored")
    assert any(not torch.allclose(a[k], c[k]) for k in a)


def test_refit_keeps_the_monitored_runs_temperature(tiny_bert_path, sentiment_dir, tmp_path):
    """Validation has been trained on by the refit: the temperature is the one fitted on it
    before, and what the summary reports as validation is the monitored run's."""
    out = tmp_path / "run"
    summary = run_tiny(tiny_bert_path, sentiment_dir, out, **{"train.calibration": "temperature"})
    assert summary["refit"]["num_train"] == 32
    last = read_jsonl(out / "metrics.jsonl")[-1]  # the monitored run's step 12
    before = summary["calibration"]["validation_before"]
    assert before["nll"] == pytest.approx(last["validation"]["nll"], rel=1e-5)
    assert summary["validation_at_selected"] == last["validation"]


def test_refit_after_early_stopping_trains_the_best_steps_and_reports_them(
    tiny_bert_path, sentiment_dir, tmp_path
):
    """select_best: the refit runs the best step's count; the summary and the CLI still
    describe the monitored run's best step, not its last evaluation."""
    extra = {
        "train.objective": "ce",
        "train.select_best": "true",
        "train.early_stopping.patience": 1,
        "train.steps": 40,
        "train.lr": 5e-2,
    }
    summary = run_tiny(tiny_bert_path, sentiment_dir, tmp_path / "run", **extra)
    rows = {r["step"]: r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")}
    assert summary["selected"] == "best" and summary["refit"]["steps"] == summary["best_step"]
    assert summary["validation_at_selected"] == rows[summary["best_step"]]["validation"]


def test_refit_keeps_the_pass_floor_on_train_plus_validation(
    tiny_bert_path, sentiment_dir, tmp_path
):
    """A fixed budget raised to 5 passes over 16 rows (20 steps of 4) refits 5 passes over
    the 32 rows of train + validation (40 steps), as a new run on them would."""
    extra = {"train.steps": 2, "train.min_passes": 5, "train.eval_every": 50}
    summary = run_tiny(tiny_bert_path, sentiment_dir, tmp_path / "run", **extra)
    assert summary["steps"] == 20
    assert (summary["refit"]["steps"], summary["refit"]["num_train"]) == (40, 32)
    # a tiny random model: its refit can end far below the monitored run on the training rows
    drop = (
        summary["refit"]["monitored_train_sample"]["accuracy"]
        - (summary["train_sample_at_selected"]["accuracy"])
    )
    assert summary["refit"]["diverged"] is (drop > 0.1)
    assert summary["refit"]["batch_sampling"] == summary["batch_sampling"] == "class_pairs"


def test_refit_after_an_early_stop_under_a_fixed_budget_keeps_the_stop(
    tiny_bert_path, sentiment_dir, tmp_path
):
    """The monitored run stopped before its budget: the refit trains as long as it ran, not
    the pass floor over train + validation (which would be 40 steps here)."""
    extra = {
        "train.steps": 2,
        "train.min_passes": 5,
        "train.eval_every": 2,
        "train.early_stopping.patience": 1,
        "train.early_stopping.min_steps": 0,
        "train.lr": 5e-2,
    }
    summary = run_tiny(tiny_bert_path, sentiment_dir, tmp_path / "run", **extra)
    assert summary["selected"] == "last" and summary["stopped_early"]
    assert summary["stopped_at_step"] < 20
    assert summary["refit"]["steps"] == summary["stopped_at_step"]


def test_refit_numbers_a_given_validation_files_rows_after_the_training_rows(
    tiny_bert_path, tmp_path
):
    """Both files number their rows from 0: in the refit's training set each row number must
    name one example, or the train sample is scored on a validation row's embedding."""
    rows = sentiment_rows(72, 5)
    for name, part in (("train", rows[:16]), ("validation", rows[16:32]), ("test", rows[32:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    extra = {"data.k_shot": "null", "train.refit": "true", "train.calibration": "none"}
    overrides = tiny_overrides(tiny_bert_path, tmp_path, tmp_path / "run", **extra)
    trainer = Trainer(load_config(None, overrides))
    trainer.setup()
    summary = trainer.train()
    assert sorted(trainer.train_set["row"]) == list(range(32))
    direct = trainer._evaluate(trainer.train_sample_loader).metrics
    reported = summary["train_sample_at_selected"]
    assert reported["accuracy"] == direct["accuracy"]
    assert reported["loss"] == pytest.approx(direct["loss"], rel=1e-5)


def test_a_refit_far_below_the_monitored_run_on_the_training_sample_is_reported(caplog):
    trainer = Trainer.__new__(Trainer)  # only the check: the two training-sample scores
    trainer.refit_summary = {"monitored_train_sample": {"accuracy": 1.0, "loss": 0.1}}
    with caplog.at_level("WARNING", logger="lorafit.trainer"):
        # 9 points down, or a loss twice as high (a healthy refit sees each row less often)
        assert not trainer._refit_diverged({"accuracy": 0.91, "loss": 0.2})
        assert not caplog.records
        assert trainer._refit_diverged({"accuracy": 0.5, "loss": 0.7})
    assert "refit: the refit model's training-sample accuracy is 0.5000 against 1.0000" in (
        caplog.text
    )
    trainer.refit_summary = {"monitored_train_sample": {"loss": 1.2}}  # a causal LM
    assert not trainer._refit_diverged({"loss": 2.4})


def test_saved_adapter_reproduces_test_predictions(tiny_bert_path, sentiment_dir, tmp_path):
    from lorafit import data as D
    from lorafit.methods import load_trained

    out = tmp_path / "run"
    run_tiny(tiny_bert_path, sentiment_dir, out)
    model, tokenizer, _ = load_trained(out / "adapter")
    model.eval()
    cfg = load_config(out / "config.yaml")
    test = D.tokenize(
        D.load_task_data(cfg.data, "classification").test, tokenizer, "classification", 16
    )
    batch = D.Collator(tokenizer, "classification")([test[i] for i in range(len(test))])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "row")})
    probs = torch.softmax(logits.float(), -1).numpy()
    saved = {p["row"]: p["prob"] for p in read_jsonl(out / "predictions" / "test.jsonl")}
    expected = np.array([saved[int(r)] for r in batch["row"]])
    np.testing.assert_allclose(probs, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "head"])  # a fitted head; a trained (leaf) head
def test_temperature_changes_probabilities_not_predictions(
    method, tiny_bert_path, sentiment_dir, tmp_path, monkeypatch
):
    # The plumbing, with a fixed T (the fit itself: tests/test_calibration.py). A tiny model
    # separates its validation set, where the fit stays at T = 1 and would test nothing.
    fitted = []
    monkeypatch.setattr(
        "lorafit.trainer.fit_temperature", lambda logits, labels: fitted.append(len(labels)) or 2.5
    )
    runs = {
        c: run_tiny(
            tiny_bert_path,
            sentiment_dir,
            tmp_path / c,
            **{"method.name": method, "train.calibration": c, "train.steps": 4},
        )
        for c in ("none", "temperature")
    }
    assert runs["none"]["calibration"] is None
    assert fitted == [runs["temperature"]["num_validation"]]  # fitted once, on validation
    calibration = runs["temperature"]["calibration"]
    temperature = calibration["temperature"]
    assert temperature == 2.5
    # the same training either way: test before calibration is the uncalibrated run's test
    for key in ("nll", "brier", "ece"):
        assert calibration["test_before"][key] == pytest.approx(runs["none"]["test"][key], abs=1e-5)
    assert runs["temperature"]["test"]["accuracy"] == runs["none"]["test"]["accuracy"]
    rows = {
        c: sorted(read_jsonl(tmp_path / c / "predictions" / "test.jsonl"), key=lambda r: r["row"])
        for c in runs
    }
    assert [r["pred"] for r in rows["none"]] == [r["pred"] for r in rows["temperature"]]
    plain = np.log(np.array([r["prob"] for r in rows["none"]]) + 1e-12) / temperature
    expected = np.exp(plain - plain.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    calibrated = np.array([r["prob"] for r in rows["temperature"]])
    np.testing.assert_allclose(calibrated, expected, atol=1e-4)


@pytest.mark.parametrize("method", ["full", "head", "qlora", "ia3"])
def test_each_method_trains(method, tiny_bert_path, sentiment_dir, tmp_path):
    summary = run_tiny(
        tiny_bert_path,
        sentiment_dir,
        tmp_path / method,
        **{"method.name": method, "train.steps": 4},
    )
    assert summary["status"] == "completed"
    assert summary["method"] == method
    assert np.isfinite(summary["test"]["loss"])
    if method == "head":
        assert summary["trainable_params"] == 64 * 2 + 2
    if method == "full":
        assert summary["trainable_params"] == summary["total_params"]


def test_full_finetuning_learns_the_task(tiny_bert_path, sentiment_dir, tmp_path):
    summary = run_tiny(
        tiny_bert_path,
        sentiment_dir,
        tmp_path / "full",
        **{"method.name": "full", "train.objective": "ce", "train.steps": 40},
        # the monitored run's learning; the refit trains alike (its invariant test)
        **{"train.lr": 2e-3, "train.eval_every": 10, "train.refit": "false"},
    )
    assert summary["train_sample_at_selected"]["accuracy"] >= 0.9
    assert summary["test"]["accuracy"] >= 0.75


@pytest.mark.parametrize("head_fit_size", [None, 6])
def test_contrastive_objective_fits_the_head_on_the_trained_body(
    head_fit_size, tiny_bert_path, sentiment_dir, tmp_path
):
    from lorafit.evaluate import embed_dataset
    from lorafit.objectives import fit_logistic_head

    overrides = tiny_overrides(
        tiny_bert_path,
        sentiment_dir,
        tmp_path / "contrastive",
        **{"method.name": "full", "train.objective": "contrastive", "train.steps": 40},
        # all 16 examples in each batch: 120 pairs a step (tiny models with 1, 2 threads and
        # init seeds 0-2 all reach train accuracy 1.0; batches of 4 reached 0.875 on some)
        **{"train.batch_size": 16, "train.lr": 2e-3, "train.eval_every": 20},
        **{"train.refit": "false"},  # the monitored run's fit (a refit fits its head alike)
        # the default size keeps all 16 rows; 6 keeps a stratified 3 + 3
        **({} if head_fit_size is None else {"train.head_fit_size": head_fit_size}),
    )
    trainer = Trainer(load_config(None, overrides))
    trainer.setup()
    head = trainer.unwrapped.head
    stepped = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(head.weight) not in stepped and id(head.bias) not in stepped
    summary = trainer.train()
    assert summary["objective"] == "contrastive"
    assert summary["train_sample_at_selected"]["accuracy"] >= 0.9
    assert summary["test"]["accuracy"] >= 0.75
    embeddings, labels = embed_dataset(trainer.model, trainer.head_fit_loader, trainer.accelerator)
    if head_fit_size is None:
        assert len(labels) == len(trainer.train_set)
    else:
        assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    weight, bias = fit_logistic_head(embeddings, labels, 2)
    # then the validation temperature (train.calibration=auto) is folded in: logits / T
    temperature = summary["calibration"]["temperature"]
    weight, bias = weight / temperature, bias / temperature
    torch.testing.assert_close(head.weight.detach(), weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.bias.detach(), bias, atol=1e-5, rtol=1e-4)
    saved = load_file(tmp_path / "contrastive" / "adapter" / "head.safetensors")
    torch.testing.assert_close(saved["head.weight"], weight, atol=1e-5, rtol=1e-4)
    # the train sample's metrics come from the head fit's embeddings when the fit covers the
    # sample (all 16 rows), else from a forward pass; either way what evaluation would give
    assert trainer.train_sample_in_fit == (head_fit_size is None)
    shortcut = trainer._train_sample_metrics()
    full = trainer._evaluate(trainer.train_sample_loader).metrics
    assert shortcut.keys() == full.keys()
    for key, value in full.items():
        assert shortcut[key] == pytest.approx(value, abs=1e-5), key
    assert summary["train_sample_at_selected"] == pytest.approx(shortcut, abs=1e-5)


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"method.name": "head"}, "method.name=head"),
        ({"train.label_smoothing": 0.1}, "train.label_smoothing"),
        ({"train.ema_decay": 0.9}, "train.ema_decay"),
    ],
)
def test_contrastive_objective_rejects_what_cannot_apply(
    extra, field, tiny_bert_path, sentiment_dir, tmp_path
):
    with pytest.raises(ConfigError, match=field):
        run_tiny(
            tiny_bert_path,
            sentiment_dir,
            tmp_path / "bad",
            **{"train.objective": "contrastive", **extra},
        )


@pytest.mark.parametrize(
    "switch",
    [
        {"train.label_smoothing": 0.2},
        {"train.rdrop": 1.0},
        {"train.ema_decay": 0.5},
        {"train.layer_lr_decay": 0.5},
    ],
)
def test_regularisers_change_training_under_cross_entropy(
    switch, tiny_bert_path, sentiment_dir, tmp_path
):
    common = {"train.objective": "ce", "train.steps": 6, "train.eval_every": 6}
    plain = run_tiny(tiny_bert_path, sentiment_dir, tmp_path / "plain", **common)
    switched = run_tiny(tiny_bert_path, sentiment_dir, tmp_path / "on", **common, **switch)
    assert switched["objective"] == "ce" and np.isfinite(switched["test"]["loss"])
    # same data, seed and steps: only the switch differs, and it must change the model
    assert switched["test"]["loss"] != pytest.approx(plain["test"]["loss"], abs=1e-7)


def sft_overrides(model_path, data_path, out) -> list[str]:
    """A short LoRA SFT run of the tiny llama (classification runs use tiny_overrides)."""
    return [
        f"model.name_or_path={model_path}",
        "model.max_length=48",
        f"data.path={data_path}",
        "method.name=lora",
        "method.r=4",
        "train.batch_size=4",
        "train.lr=5e-3",
        f"output.dir={out}",
        "output.report_to=[]",
    ]


def _tiny_sft_run(tiny_llama_path, tmp_path, records: list[dict], *overrides: str) -> dict:
    """A short LoRA SFT run of the tiny llama on `records` (written as a json list)."""
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(records))
    common = sft_overrides(tiny_llama_path, path, tmp_path / "run")
    return train(load_config(None, [*common, *overrides]))


def test_causal_lm_sft_run(tiny_llama_path, tmp_path):
    records = [
        {"instruction": f"say the word number {i}", "input": "", "output": f"word {i % 5} done"}
        for i in range(40)
    ]
    summary = _tiny_sft_run(
        tiny_llama_path,
        tmp_path,
        records,
        "data.train_size=20",
        "train.steps=6",
        "train.eval_every=3",
        "eval.batch_size=8",
        "eval.bootstrap_samples=100",
    )
    out = tmp_path / "run"
    assert summary["task"] == "causal_lm"
    assert summary["selection_metric"] == "loss"
    test = summary["test"]
    assert np.isfinite(test["loss"]) and test["perplexity"] == pytest.approx(np.exp(test["loss"]))
    assert 0 <= test["top1_accuracy"] <= test["top5_accuracy"] <= 1
    preds = read_jsonl(out / "predictions" / "test.jsonl")
    assert len(preds) == summary["num_test"] and all(p["n_tokens"] > 0 for p in preds)
    total = sum(p["nll_sum"] for p in preds) / sum(p["n_tokens"] for p in preds)
    assert total == pytest.approx(test["loss"], rel=1e-6)
    assert test["n_tokens"] == sum(p["n_tokens"] for p in preds) and test["n"] == len(preds)
    assert isinstance(test["n_tokens"], int) and isinstance(test["n"], int)
    assert (out / "adapter" / "adapter_config.json").is_file()
    for row in read_jsonl(out / "metrics.jsonl"):
        assert set(row["validation"]) >= set(SELECTION_METRICS["causal_lm"])


def test_causal_lm_refit_trains_on_the_validation_responses_too(tiny_llama_path, tmp_path):
    """train.refit=true on an SFT run (never the default there): the tested model saw the
    validation rows, and the curve is the monitored run's."""
    records = [
        {"instruction": f"say the word number {i}", "input": "", "output": f"word {i % 5} done"}
        for i in range(40)
    ]
    common = ["data.train_size=12", "train.steps=4", "train.eval_every=2", "eval.batch_size=8"]
    summary = _tiny_sft_run(tiny_llama_path, tmp_path, records, *common, "train.refit=true")
    assert summary["refit"]["steps"] == 4
    assert summary["refit"]["num_train"] == 12 + summary["num_validation"]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 2, 4]
    assert summary["calibration"] is None and np.isfinite(summary["test"]["loss"])
    (tmp_path / "m").mkdir()
    monitored = _tiny_sft_run(tiny_llama_path, tmp_path / "m", records, *common)
    assert monitored["refit"] is None  # off by default for causal LMs
    assert monitored["test"]["loss"] != pytest.approx(summary["test"]["loss"], abs=1e-6)


def test_causal_lm_sft_run_with_length_grouped_batches(tiny_llama_path, tmp_path, monkeypatch):
    from lorafit.trainer import LengthGroupedBatchSampler

    drawn = []
    real_batch = LengthGroupedBatchSampler.batch
    monkeypatch.setattr(
        LengthGroupedBatchSampler,
        "batch",
        lambda self, b: drawn.append(real_batch(self, b)) or drawn[-1],
    )
    records = [
        {"instruction": "say " + "very " * (i % 7) + f"word {i}", "input": "", "output": "done"}
        for i in range(40)
    ]
    summary = _tiny_sft_run(
        tiny_llama_path,
        tmp_path,
        records,
        "data.train_size=20",
        "train.steps=4",
        "train.eval_every=4",
        "train.batch_sampling=by_length",
        "eval.bootstrap_samples=50",
    )
    assert summary["batch_sampling"] == "by_length" and np.isfinite(summary["test"]["loss"])
    assert len(drawn) == 4 and all(len(b) == 4 for b in drawn)


def test_causal_lm_perplexity_gap_grows_and_ci_covers_the_loss(tiny_llama_path, tmp_path):
    records = [
        {"instruction": f"say the word number {i}", "output": " ".join(["word"] * (1 + i % 7))}
        for i in range(40)
    ]
    summary = _tiny_sft_run(
        tiny_llama_path,
        tmp_path,
        records,
        "train.steps=4",
        "train.eval_every=2",
        "train.early_stopping.metric=perplexity",
        "eval.bootstrap_samples=200",
    )
    for row in read_jsonl(tmp_path / "run" / "metrics.jsonl"):
        # lower is better: validation minus train, positive when memorising
        expected = row["validation"]["perplexity"] - row["train"]["perplexity"]
        assert row["gap"]["perplexity"] == pytest.approx(expected)
    test = summary["test"]
    for metric in ("loss", "perplexity", "top1_accuracy"):
        low, high = test["ci"][metric]
        assert low <= test[metric] <= high, metric


def test_accumulated_causal_lm_step_equals_one_big_batch(tiny_llama_path, tmp_path):
    # Responses of very different lengths: a plain 1/grad_accum weighting of micro-batch means
    # would over-weight the short ones, and the two gradients would differ.
    records = [
        {"instruction": f"say {i}", "output": " ".join(["word"] * (1 + 8 * (i % 2)))}
        for i in range(12)
    ]
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(records))
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_llama_path}",
            f"data.path={path}",
            "method.name=lora",
            "method.dropout=0",
            f"output.dir={tmp_path / 'run'}",
            "output.report_to=[]",
        ],
    )
    trainer = Trainer(cfg)
    trainer.setup()
    rows = [trainer.train_set[i] for i in range(4)]
    assert len({len(r["labels"]) for r in rows}) > 1  # the lengths differ

    def gradients(micro_batches: list[list[dict]]) -> list[torch.Tensor]:
        trainer.model.zero_grad(set_to_none=True)
        trainer.backward_step([trainer.collate(b) for b in micro_batches])
        return [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]

    whole = gradients([rows])
    accumulated = gradients([rows[:1], rows[1:]])  # 1 + 3 rows: unequal token counts too
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(whole, accumulated))


def test_every_gap_grows_when_the_model_memorises():
    from lorafit.trainer import _gap

    train_metrics = {"loss": 0.2, "nll": 0.2, "brier": 0.1, "accuracy": 1.0}
    test_metrics = {"loss": 0.6, "nll": 0.6, "brier": 0.3, "accuracy": 0.7}
    for metric in ("nll", "brier", "accuracy"):
        gap = _gap(train_metrics, test_metrics, metric)
        assert gap[metric] > 0 and gap["loss"] > 0 and gap["accuracy"] > 0


def test_metrics_lines_are_strict_json(tmp_path):
    # AUROC with one class in a validation batch is NaN; jq and JSON.parse refuse a bare NaN.
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 4, "validation": {"auroc": float("nan"), "loss": np.float32(0.5)}})
    append_jsonl(path, {"step": 8, "validation": {"auroc": float("inf"), "loss": 0.25}})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = [json.loads(line, parse_constant=pytest.fail) for line in text.splitlines()]
    assert rows[0]["validation"] == {"auroc": None, "loss": 0.5}
    assert rows[1]["validation"]["auroc"] is None


def test_early_stopping_metric_of_another_task_fails_before_training(tiny_llama_path, tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([{"instruction": f"say {i}", "output": f"{i}"} for i in range(20)]))
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_llama_path}",
            f"data.path={path}",
            "train.early_stopping.metric=accuracy",  # model.task=auto: known once data is read
            f"output.dir={out}",
            "output.report_to=[]",
        ],
    )
    with pytest.raises(ConfigError) as info:
        Trainer(cfg).setup()
    assert str(info.value) == (
        "train.early_stopping.metric='accuracy' is not a causal_lm metric; use one of "
        "['auto', 'loss', 'perplexity', 'top1_accuracy', 'top5_accuracy']"
    )
    assert not (out / "metrics.jsonl").exists()


def test_sft_refuses_an_encoder_and_rdrop_before_loading_weights(
    tiny_llama_path, tiny_bert_path, tmp_path, capsys
):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([{"instruction": f"say {i}", "output": f"{i}"} for i in range(20)]))
    common = [f"data.path={path}", f"output.dir={tmp_path / 'run'}", "output.report_to=[]"]
    with pytest.raises(ConfigError, match="train.rdrop applies to classification"):
        train(
            load_config(None, [f"model.name_or_path={tiny_llama_path}", "train.rdrop=0.5", *common])
        )
    with pytest.raises(ConfigError) as info:
        train(load_config(None, [f"model.name_or_path={tiny_bert_path}", *common]))
    assert f"model.name_or_path={tiny_bert_path} is an encoder (bert)" in str(info.value)
    assert "model.name_or_path=smollm2" in str(info.value)
    assert "LOAD REPORT" not in capsys.readouterr().out  # refused before any weights load


def test_a_wrong_model_path_fails_before_the_data_loads(tmp_path, monkeypatch):
    from lorafit import data as D

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the model path was checked")

    monkeypatch.setattr(D, "load_task_data", no_data)
    monkeypatch.setattr(D, "infer_task", no_data)
    overrides = [f"model.name_or_path={tmp_path / 'no_model'}", f"data.path={tmp_path}"]
    overrides += [f"output.dir={tmp_path / 'run'}", "output.report_to=[]"]
    with pytest.raises(ModelError, match="no_model' does not exist"):
        train(load_config(None, overrides))


def test_resume_after_kill_matches_uninterrupted(tiny_bert_path, sentiment_dir, tmp_path):
    """SIGKILL a run after step 8, resume it, and get the uninterrupted run's result."""
    extra = {"train.steps": 12, "train.eval_every": 4, "method.dropout": 0.2}
    full = run_tiny(tiny_bert_path, sentiment_dir, tmp_path / "full", **extra)

    out = tmp_path / "killed"
    args = tiny_overrides(tiny_bert_path, sentiment_dir, out, **extra)
    env = {**os.environ, "LORAFIT_FAULT_AT_STEP": "8"}
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "summary.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-8"]

    from lorafit.checkpoint import load_checkpoint

    evaluated_before_kill = load_checkpoint(out / "checkpoints" / "step-8")["trainer"]["eval_s"]
    # a checkpoint of 2 processes resumed by 1 would replay batches: refused, the run untouched
    two = tmp_path / "two_processes"
    shutil.copytree(out, two)
    state_path = two / "checkpoints" / "step-8" / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "rng_ranks": [state["rng"]]}))
    metrics_before = (two / "metrics.jsonl").read_text()
    two_args = tiny_overrides(tiny_bert_path, sentiment_dir, two, **extra)
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\), this launch has 1"):
        Trainer(load_config(None, [*two_args, "train.resume=true"])).setup()
    assert (two / "metrics.jsonl").read_text() == metrics_before
    trainer = Trainer(load_config(None, [*args, "train.resume=true"]))
    trainer.setup()
    resumed = trainer.train()
    # the time report covers both launches, as wall_time_s does
    assert evaluated_before_kill > 0
    assert resumed["eval_time_s"] == pytest.approx(evaluated_before_kill + trainer.eval_seconds)
    assert resumed["test"]["accuracy"] == full["test"]["accuracy"]
    assert resumed["test"]["nll"] == pytest.approx(full["test"]["nll"], rel=1e-6)
    assert resumed["best_step"] == full["best_step"]
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    rows_full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    rows_res = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows_res] == [r["step"] for r in rows_full]
    for x, y in zip(rows_full, rows_res):
        assert x["validation"]["loss"] == pytest.approx(y["validation"]["loss"], rel=1e-6)


def test_resume_with_other_settings_is_refused(tiny_bert_path, sentiment_dir, tmp_path):
    out = tmp_path / "run"
    run_tiny(tiny_bert_path, sentiment_dir, out, **{"train.steps": 2, "train.eval_every": 2})
    saved = (out / "config.yaml").read_text()
    changed = {"train.steps": 2, "train.eval_every": 2, "train.lr": 1e-3, "train.resume": "true"}
    with pytest.raises(ConfigError, match=r"train.resume: .* other settings \(train.lr: 0.005"):
        run_tiny(tiny_bert_path, sentiment_dir, out, **changed)
    assert (out / "config.yaml").read_text() == saved  # the run is left as it was


def test_resume_on_an_edited_data_file_is_refused(
    tiny_bert_path, sentiment_dir, tmp_path, monkeypatch
):
    data = shutil.copytree(sentiment_dir, tmp_path / "data")
    original = Trainer.compute_loss
    calls = {"n": 0}

    def crash_at_step_6(self, batch):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt  # killed after the step-4 checkpoint
        return original(self, batch)

    monkeypatch.setattr(Trainer, "compute_loss", crash_at_step_6)
    settings = {"train.steps": 8, "train.eval_every": 4}
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tiny_bert_path, data, tmp_path / "run", **settings)
    monkeypatch.setattr(Trainer, "compute_loss", original)
    train = data / "train.jsonl"
    rows = train.read_text()
    train.write_text(rows.replace("\n", "\n", rows.count("\n") - 1) + rows.splitlines()[0] + "\n")
    resume = {**settings, "train.resume": "true"}
    with pytest.raises(
        ConfigError,
        match=r"train.resume: .*step-4 was trained on other data \(the train file has changed",
    ):
        run_tiny(tiny_bert_path, data, tmp_path / "run", **resume)
    train.write_text(rows)  # restored: the run resumes and finishes
    assert run_tiny(tiny_bert_path, data, tmp_path / "run", **resume)["status"] == "completed"


def test_non_finite_loss_stops_with_step_and_lr(
    tiny_bert_path, sentiment_dir, tmp_path, monkeypatch
):
    original = Trainer.compute_loss
    calls = {"n": 0}

    def exploding(self, batch):
        calls["n"] += 1
        loss = original(self, batch)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(Trainer, "compute_loss", exploding)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        run_tiny(tiny_bert_path, sentiment_dir, out, **{"train.steps": 10})
    message = str(info.value)
    assert "at step 6" in message and "lr" in message and "step-4" in message
    assert (out / "checkpoints" / "step-4" / "state.json").is_file()
    assert not (out / "summary.json").exists()


EARLY_STOP_AT_10 = {
    "train.steps": 40,
    "train.eval_every": 2,
    "train.lr": 1e-9,  # nothing improves after the first evaluation
    "train.head_lr": 1e-9,
    "train.select_best": True,
    "train.early_stopping.patience": 2,
    "train.early_stopping.min_steps": 10,
    "train.early_stopping.tie_breaker": "none",  # 1e-9 loss wiggles must not count
}


def test_early_stopping_respects_patience_and_min_steps(
    tiny_bert_path, sentiment_dir, tmp_path, capsys
):
    from lorafit.cli import _print_summary

    summary = run_tiny(tiny_bert_path, sentiment_dir, tmp_path / "run", **EARLY_STOP_AT_10)
    assert summary["stopped_early"]
    assert (summary["stopped_at_step"], summary["steps"]) == (10, 40)  # what ran, the budget
    capsys.readouterr()
    _print_summary(summary, str(tmp_path / "run"))
    assert "stopped:    early, at step 10 of 40: validation accuracy stopped improving" in (
        capsys.readouterr().out
    )
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == 10


def test_run_killed_after_its_early_stop_resumes_to_the_end(
    tiny_bert_path, sentiment_dir, tmp_path
):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_bert_path, sentiment_dir, out, **EARLY_STOP_AT_10)
    env = {**os.environ, "LORAFIT_FAULT_AT_STEP": "10"}  # killed after the stop's checkpoint
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = train(load_config(None, [*args, "train.resume=true"]))
    assert resumed["stopped_early"] and resumed["stopped_at_step"] == 10  # no training after it
    assert read_jsonl(out / "metrics.jsonl")[-1]["step"] == 10


def test_existing_run_dir_is_not_overwritten(tiny_bert_path, sentiment_dir, tmp_path):
    out = tmp_path / "run"
    run_tiny(tiny_bert_path, sentiment_dir, out, **{"train.steps": 2, "train.eval_every": 2})
    with pytest.raises(ConfigError, match="already holds a run"):
        run_tiny(tiny_bert_path, sentiment_dir, out, **{"train.steps": 2, "train.eval_every": 2})


def test_selection_breaks_ties_on_validation_loss():
    s = Selection(metric="accuracy", higher_is_better=True, tie_breaker="loss")
    assert s.update(10, 0.5, 0.70)
    assert not s.update(20, 0.5, 0.75)
    assert s.update(30, 0.5, 0.60) and s.best_step == 30
    assert not s.update(40, 0.4, 0.10)
    assert s.evals_since_best == 1
    loss = Selection(metric="loss", higher_is_better=False, tie_breaker="loss")
    assert loss.update(1, 1.0, 1.0) and loss.update(2, 0.9, 0.9) and not loss.update(3, 0.95, 0.95)


def test_step_sampler_shards_one_stream_across_ranks():
    single = list(StepBatchSampler(10, 4, seed=3, start=0, stop=8))
    world = 2
    ranks = [
        list(StepBatchSampler(10, 4, seed=3, start=0, stop=4, rank=r, world=world))
        for r in range(2)
    ]
    interleaved = [b for pair in zip(*ranks) for b in pair]
    assert interleaved == single
    # each epoch is a permutation: every example once per 10 consecutive positions
    flat = [i for b in single for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    # resuming at batch 5 yields exactly the tail
    assert list(StepBatchSampler(10, 4, seed=3, start=5, stop=8)) == single[5:]
    assert list(StepBatchSampler(10, 4, seed=4, start=0, stop=8)) != single


def test_cli_reports_user_errors_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", "train.lrr=3"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "lorafit: error: unknown config key 'train.lrr'; did you mean 'train.lr'?"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafit",
            "train",
            f"data.path={tmp_path / 'nope.csv'}",
            f"output.dir={tmp_path / 'o'}",
            "model.name_or_path=" + str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_an_overflowing_logit_leaves_the_nll_without_a_ci():
    # fp16 logits can overflow to +inf: accuracy is still defined, the NLL is not, and the
    # run must still finish (confidence_intervals used to reject the NaN per-example NLL)
    from types import SimpleNamespace

    from lorafit.config import EvalConfig
    from lorafit.evaluate import confidence_intervals, evaluate

    class Overflowing(torch.nn.Module):
        def forward(self, input_ids, **_):
            logits = torch.zeros(input_ids.shape[0], 3)
            logits[0, 1] = float("inf")
            return logits

    batch = {
        "input_ids": torch.ones(4, 5, dtype=torch.long),
        "labels": torch.tensor([1, 1, 2, 0]),
        "row": torch.arange(4),
    }
    accelerator = SimpleNamespace(
        gather_for_metrics=lambda x: x, device=torch.device("cpu"), num_processes=1
    )
    cfg = EvalConfig()
    result = evaluate(
        Overflowing(), [batch], accelerator, "classification", cfg, 3, keep_per_example=True
    )
    assert np.isnan(result.metrics["nll"]) and result.metrics["accuracy"] == 0.5
    ci = confidence_intervals(result.per_example, "classification", 3, cfg)
    assert "nll" not in ci and ci["accuracy"][0] <= 0.5 <= ci["accuracy"][1]


def test_budget_covers_min_passes_and_the_note_says_so():
    from lorafit.trainer import budget_note, budget_steps

    default = load_config(None, []).train  # steps 200, min_passes 5 (steps left unset)
    assert (default.steps, default.min_passes) == (200, 5)
    assert budget_steps(default, 1, 32, "classification") == 200  # K=16 x 2: 50 passes
    assert budget_steps(default, 1, 256, "classification") == 200  # K=64 x 4: 6.25 passes
    assert budget_steps(default, 1, 1024, "classification") == 640  # 512 x 2: 5 passes
    assert budget_steps(default, 1, 1025, "classification") == 641  # never under 5 passes
    assert budget_steps(default, 2, 1024, "classification") == 320  # 2 processes, 16 per step
    assert budget_steps(default, 1, 1024, "causal_lm") == 200
    assert budget_note(default, 200, 1, 32, "classification") is None
    note = budget_note(default, 640, 1, 1024, "classification")
    assert note.startswith("budget: 640 steps, train.steps=200 raised to cover train.min_passes=5")

    # a set train.steps is kept (min_passes resolves to 0); the note says it is few passes
    chosen = load_config(None, ["train.steps=200"]).train
    assert chosen.min_passes == 0 and budget_steps(chosen, 1, 1232, "classification") == 200
    note = budget_note(chosen, 200, 1, 1232, "classification")  # K=16 x 77 classes
    assert note.startswith("budget: train.steps=200 is 1.3 passes over the 1232 training rows")
    assert budget_note(chosen, 200, 4, 1232, "classification") is None  # 4 processes: 5.2
    assert budget_note(chosen, 200, 1, 1232, "causal_lm") is None
    both = load_config(None, ["train.steps=50", "train.min_passes=2"]).train
    assert budget_steps(both, 1, 1024, "classification") == 256


def test_a_batch_larger_than_the_training_set_is_named():
    from lorafit.trainer import batch_note

    assert batch_note(load_config(None, []).train, 1, 32) is None  # batch 8 of K=16 x 2
    wide = load_config(None, ["train.batch_size=100"]).train
    note = batch_note(wide, 1, 16)
    assert note.startswith("batch: 100 rows per micro-step") and "train.batch_size=16 or" in note
    assert batch_note(load_config(None, ["train.batch_size=12"]).train, 2, 16).endswith(
        "set train.batch_size=8 or lower"
    )


def test_a_run_trains_the_raised_budget_and_saves_the_settings_as_given(
    tiny_bert_path, sentiment_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    # 16 training rows, batches of 4: 3 passes are 12 steps, over the 2 set
    extra = {"train.steps": 2, "train.min_passes": 3, "output.plot": "false"}
    summary = run_tiny(tiny_bert_path, sentiment_dir, out, **extra)
    assert "budget: 12 steps, train.steps=2 raised to cover" in capsys.readouterr().out
    assert summary["steps"] == summary["stopped_at_step"] == 12
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 4, 8, 12] and rows[-1]["epoch"] == 3
    assert rows[-1]["lr"] < rows[0]["lr"]  # the schedule decays over the 12 steps, not 2
    saved = load_config(out / "config.yaml")
    assert (saved.train.steps, saved.train.min_passes) == (2, 3)
    assert saved.fingerprint() == summary["config_sha256"]


def test_pairs_note_and_auto_batch_sampling_follow_the_same_label_pairs_per_batch():
    from lorafit.trainer import batch_sampling_for, pairs_note, same_label_pairs

    # 2 x 16: 28 pairs, P(agree) = 2 * 16 * 15 / (32 * 31) = 0.484 -> 13.5
    assert same_label_pairs([16, 16], 8) == pytest.approx(28 * 480 / 992)
    assert same_label_pairs([16] * 6, 8) == pytest.approx(28 * 6 * 240 / (96 * 95))  # 4.4
    assert same_label_pairs([1, 1], 8) == 0.0 and same_label_pairs([1], 8) == 0.0
    auto, rand = TrainConfig(), TrainConfig(batch_sampling="random")
    pairs = TrainConfig(batch_sampling="class_pairs")
    # few classes: random batches, no note (the tables' runs)
    for counts in ([16] * 2, [16] * 4, [16] * 6):
        assert batch_sampling_for(auto, True, counts) == "random"
        assert pairs_note(auto, True, "random", counts) is None
    many = [16] * 77  # P(agree) = 77 * 240 / (1232 * 1231): 0.3 pairs per batch of 8
    assert batch_sampling_for(auto, True, many) == "class_pairs"
    assert batch_sampling_for(auto, False, many) == "random"  # cross-entropy: no pairs
    assert batch_sampling_for(rand, True, many) == "random"
    assert batch_sampling_for(auto, True, [1] * 77) == "random"  # K=1: no pair to draw
    assert "too few classes have two examples" in pairs_note(auto, True, "random", [1] * 77)
    assert batch_sampling_for(pairs, False, [16, 16]) == "class_pairs"
    with pytest.raises(ConfigError, match="train.batch_sampling=class_pairs needs a classif"):
        objective_for(pairs, "causal_lm")  # at setup, before the model loads
    note = pairs_note(auto, True, "class_pairs", many)
    assert note.startswith("pairs: a random batch of 8 holds 0.3 same-label pairs on average")
    assert (
        "each batch is 4 same-class pairs of different classes instead (train.batch_sampling=auto"
        in note
    )
    assert "set train.batch_sampling=class_pairs" in pairs_note(rand, True, "random", many)
    assert pairs_note(auto, False, "random", many) is None
    big = TrainConfig(batch_size=32)
    assert pairs_note(big, True, "random", many) is None  # 496 pairs: 6.0
    assert batch_sampling_for(big, True, many) == "random"


def test_class_pair_sampler_deals_same_class_pairs_and_shards_like_the_step_sampler():
    from lorafit.trainer import ClassPairBatchSampler

    labels = np.repeat(np.arange(7), [4, 4, 4, 4, 4, 4, 5])  # 29 rows, 14 pairs per epoch
    single = list(ClassPairBatchSampler(labels, 4, seed=3, start=0, stop=14))
    for batch in single:
        assert len(batch) == 4
        assert labels[batch[0]] == labels[batch[1]] and labels[batch[2]] == labels[batch[3]]
    # one epoch (7 batches) uses every pair once: each example of an even class exactly once
    epoch = [i for b in single[:7] for i in b]
    assert len(set(epoch)) == 28 and sorted(np.bincount(labels[epoch])) == [4] * 7
    assert single[7:] != single[:7]  # the next epoch is reshuffled
    ranks = [list(ClassPairBatchSampler(labels, 4, 3, 0, 7, rank=r, world=2)) for r in (0, 1)]
    assert [b for pair in zip(*ranks) for b in pair] == single
    assert list(ClassPairBatchSampler(labels, 4, seed=3, start=5, stop=14)) == single[5:]
    assert list(ClassPairBatchSampler(labels, 4, seed=4, start=0, stop=14)) != single
    odd = list(ClassPairBatchSampler(labels, 5, seed=3, start=0, stop=4))
    assert all(len(b) == 5 for b in odd)  # three pairs, the last cut
    with pytest.raises(ConfigError, match="makes 2 same-class pairs, fewer than one batch"):
        ClassPairBatchSampler(np.array([0, 0, 1, 1, 2]), 8, seed=0, start=0, stop=1)


def test_length_grouped_sampler_pads_less_and_shards_like_the_step_sampler():
    from lorafit.trainer import LengthGroupedBatchSampler

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=1003)  # 125 batches of 8 per epoch, 3 rows left over
    steps = 250  # two epochs
    grouped = list(LengthGroupedBatchSampler(lengths, 8, seed=3, start=0, stop=steps))
    plain = list(StepBatchSampler(1003, 8, seed=3, start=0, stop=steps))

    def computed(batches):  # tokens the model computes: batch size x longest row
        return sum(len(b) * lengths[b].max() for b in batches)

    assert all(len(b) == 8 for b in grouped)
    assert computed(grouped) < 0.75 * computed(plain)
    # each epoch: 1,000 distinct rows; the 3 left out are drawn anew
    first, second = ({i for b in grouped[e * 125 : (e + 1) * 125] for i in b} for e in (0, 1))
    assert len(first) == len(second) == 1000 and first != second
    # batches of similar length in random order: no run from the longest rows to the shortest
    longest = [lengths[b].max() for b in grouped[:50]]
    assert longest != sorted(longest, reverse=True)
    assert np.corrcoef(np.arange(50), longest)[0, 1] > -0.5
    ranks = [
        list(LengthGroupedBatchSampler(lengths, 8, 3, 0, steps // 2, rank=r, world=2))
        for r in (0, 1)
    ]
    two = [b for pair in zip(*ranks) for b in pair]
    assert computed(two) < 0.75 * computed(plain)
    assert len({i for b in two[:125] for i in b}) == 1000  # one epoch over both ranks
    assert list(LengthGroupedBatchSampler(lengths, 8, seed=3, start=7, stop=steps)) == grouped[7:]
    assert list(LengthGroupedBatchSampler(lengths, 8, seed=4, start=0, stop=steps)) != grouped
    with pytest.raises(ConfigError, match="make no batch of train.batch_size=8"):
        LengthGroupedBatchSampler(lengths[:5], 8, seed=0, start=0, stop=1)


def test_class_pair_batches_take_their_pairs_from_different_classes():
    from lorafit.trainer import ClassPairBatchSampler

    # two classes, batches of 4: every batch is one pair of each (2 same-label pairs and 4
    # different-label ones), never two pairs of one class, which would leave no negatives
    binary = np.repeat([0, 1], 16)
    batches = list(ClassPairBatchSampler(binary, 4, seed=0, start=0, stop=40))
    assert all(sorted(binary[b]) == [0, 0, 1, 1] for b in batches)
    # 14 classes of 4, 4 pairs per batch: distinct classes while 4 classes still have pairs
    # (sure for the first 6 of 7 batches: 8 pairs left means at least 4 classes)
    many = np.repeat(np.arange(14), 4)
    sampler = ClassPairBatchSampler(many, 8, seed=1, start=0, stop=7)
    distinct = [len(set(many[b])) for b in sampler]
    assert distinct[:6] == [4] * 6


def test_learning_curve_marks_the_tested_step_and_an_unused_best_one(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rows = [
        {"step": s, "train": {"loss": 1 / s, "accuracy": 0.5 + s / 40}, "validation": v}
        for s, v in ((5, {"loss": 0.6, "accuracy": 0.7}), (10, {"loss": 0.7, "accuracy": 0.6}))
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)

    def legends(metric: str, best: int, tested: int) -> list[list[str]]:
        plot_learning_curve(metrics, tmp_path / "curve.png", metric, best, tested)
        return [[t.get_text() for t in ax.get_legend().get_texts()] for ax in figures.pop().axes]

    last = legends("accuracy", 5, 10)  # train.select_best=false: the last step is tested
    assert last[1] == [
        "train",
        "validation",
        "tested: last step 10",
        "best validation 5 (not used)",
    ]
    assert legends("accuracy", 5, 5)[1] == ["train", "validation", "tested: best step 5"]
    for row in rows:  # a causal LM selects on loss; its second panel is next-token accuracy
        row["validation"]["top1_accuracy"] = row["validation"].pop("accuracy")
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_learning_curve(metrics, tmp_path / "curve.png", "loss", 5, 5)
    assert [ax.get_title() for ax in figures.pop().axes] == ["loss (NLL)", "top1_accuracy"]
