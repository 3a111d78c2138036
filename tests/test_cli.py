"""The `lorafit` command line: argument parsing, output.overwrite safety, the printed summary."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafit import cli
from lorafit.config import load_config
from tests.test_trainer import tiny_overrides as trainer_overrides
from tests.tiny import run_cli


@pytest.fixture(scope="module")
def sentiment_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sentiment")
    words = {"pos": "great wonderful loved", "neg": "terrible boring bad"}
    for split, n in (("train", 32), ("test", 16)):
        rows = [{"text": words[label], "label": label} for label in ("pos", "neg") * (n // 2)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def tiny_overrides(model_path, data_dir, out, **extra) -> list[str]:
    """test_trainer's tiny run, cut to 2 steps: these tests check what the CLI does around it."""
    quick = {"train.steps": 2, "train.eval_every": 2, "output.plot": "false", **extra}
    return trainer_overrides(model_path, data_dir, out, **quick)


# -- output.overwrite ----------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["output.overwrite", "train.resume"])
def test_a_folder_that_is_not_a_run_is_never_written_into(
    tmp_path, capsys, tiny_bert_path, sentiment_dir, setting
):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("important\n")
    (victim / "config.yaml").write_text("train: {steps: 3}\n")  # a hand-written config
    argv = tiny_overrides(tiny_bert_path, sentiment_dir, victim, **{setting: "true"})
    assert run_cli(["train", *argv]) == 2
    assert sorted(p.name for p in victim.iterdir()) == ["config.yaml", "notes.txt", "sub"]
    assert (victim / "notes.txt").read_text() == "important\n" and (victim / "sub").is_dir()
    assert (victim / "config.yaml").read_text() == "train: {steps: 3}\n"
    error = capsys.readouterr().err.strip()
    assert error.startswith("lorafit: error: output.dir") and str(victim) in error
    assert "choose another output.dir or delete" in error and "\n" not in error


def test_overwrite_replaces_a_previous_run(tmp_path, tiny_bert_path, sentiment_dir):
    out = tmp_path / "run"
    argv = tiny_overrides(tiny_bert_path, sentiment_dir, out)
    old = load_config(None, argv)
    # an earlier run, as the trainer leaves it: its config.yaml, metrics, a checkpoint
    (out / "checkpoints" / "step-7").mkdir(parents=True)
    saved = old.to_dict()
    del saved["train"]["label_smoothing"]  # as a lorafit without that setting saved it
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    (out / "metrics.jsonl").write_text('{"step": 7}\n')
    (out / ".summary.json.x1.tmp").write_text("")  # left over by a crash mid-write
    assert run_cli(["train", *argv]) == 2  # without output.overwrite: refused
    assert (out / "metrics.jsonl").read_text() == '{"step": 7}\n'
    # a replacement that fails on its data leaves the old run as it was
    bad_data = [*argv, f"data.path={tmp_path / 'missing.csv'}", "output.overwrite=true"]
    assert run_cli(["train", *bad_data]) == 2
    assert (out / "checkpoints" / "step-7").is_dir()

    assert run_cli(["train", *argv, "output.overwrite=true"]) == 0
    assert not (out / "checkpoints" / "step-7").exists()
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_empty_output_folder_is_used(tmp_path, tiny_bert_path, sentiment_dir):
    out = tmp_path / "empty"
    out.mkdir()
    argv = tiny_overrides(tiny_bert_path, sentiment_dir, out)
    assert run_cli(["train", *argv]) == 0
    assert (out / "summary.json").exists()


def test_a_data_warning_prints_once(tmp_path, tiny_bert_path, sentiment_dir, capsys, caplog):
    # every test text of sentiment_dir is also a train text: the leakage warning
    argv = tiny_overrides(tiny_bert_path, sentiment_dir, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        assert run_cli(["train", *argv]) == 0
    out = capsys.readouterr().out
    assert "data: train: " in out and "leakage" not in out  # the data: line leaves it to the log
    assert caplog.text.count("leakage: 16 of 16 test rows") == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_warnings"][0].startswith("leakage: 16 of 16 test rows")


# -- argument parsing ----------------------------------------------------------------------------


def test_overrides_may_follow_the_options(monkeypatch):
    import lorafit.sweep

    calls = []

    def run_compare(*args, **options):
        calls.append((args, options))
        return lorafit.sweep.CompareResult(Path("report.md"), crashed=[])

    monkeypatch.setattr(lorafit.sweep, "run_compare", run_compare)
    argv = ["compare", "c.yaml", "a.b=1", "--report-only", "sweep.seeds=3", "--workers", "2"]
    assert run_cli(argv) == 0
    (config, overrides), options = calls[0]
    assert config == "c.yaml" and overrides == ["a.b=1", "sweep.seeds=3", "sweep.workers=2"]
    assert options == {"retry_failed": False, "report_only": True}


def test_unknown_option_is_still_refused(capsys):
    assert run_cli(["compare", "c.yaml", "--report-only", "--nope", "a.b=1"]) == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["--steps", "5"], "train.steps=5"),
        (["--learning-rate=1e-4"], "train.lr=1e-4"),
        (["--max_length", "64"], "model.max_length=64"),
    ],
)
def test_an_option_spelled_like_a_setting_gets_its_override(capsys, argv, hint):
    assert run_cli(["train", "c.yaml", *argv]) == 2
    err = capsys.readouterr().err
    assert f"settings are key=value overrides: {hint}" in err


# -- printed summary -----------------------------------------------------------------------------


def _summary(task: str, test: dict, gap: dict, **fields) -> dict:
    """A summary.json as the trainer writes it, with the fields the printed summary reads."""
    common = {"num_test": 16, "trainable_params": 10, "total_params": 100}
    common.update(wall_time_s=1.0, peak_memory_mb=1.0)
    return {"task": task, "test": test, "train_test_gap": gap, **common, **fields}


def test_causal_lm_summary_prints_the_gap_as_stored_and_the_ci(capsys):
    summary = _summary(
        "causal_lm",
        test={"loss": 5.9961, "ci": {"nll": [5.977, 6.014]}, "ci_level": 0.9},
        gap={"loss": 5.9961 - 6.0037},  # the trainer stores test minus train
        selection_metric="loss",
        selected="last",
        stopped_at_step=4,
    )
    cli._print_summary(summary, "runs/sft")
    out = capsys.readouterr().out
    assert "test loss minus train-sample loss = -0.0076" in out
    assert "90% CI of the mean per-example NLL 5.977-6.014" in out  # a run without the loss CI


def test_causal_lm_summary_prints_the_ci_of_the_loss_it_reports(capsys):
    ci = {"nll": [5.9, 6.1], "loss": [5.97, 6.02]}
    summary = _summary(
        "causal_lm",
        test={"loss": 5.9961, "ci": ci, "ci_level": 0.95},
        gap={"loss": 0.01},
        selection_metric="loss",
        selected="last",
        stopped_at_step=4,
    )
    cli._print_summary(summary, "runs/sft")
    assert "test loss: 5.9961 (95% CI 5.970-6.020)" in capsys.readouterr().out


def test_classification_summary_gap_is_train_minus_test(capsys):
    test = {"accuracy": 0.7, "f1_macro": 0.7, "ece": 0.1, "nll": 0.6}
    test.update(ci={"accuracy": [0.6, 0.8]}, ci_level=0.95)
    summary = _summary(
        "classification",
        test=test,
        gap={"loss": 0.2, "accuracy": 0.25},
        selection_metric="accuracy",
        selected="best",
        best_step=3,
    )
    cli._print_summary(summary, "runs/x")
    out = capsys.readouterr().out
    assert "train-sample accuracy minus test accuracy = +0.2500" in out
    assert "95% CI 0.600-0.800" in out
    assert "calibrated" not in out  # train.calibration=none
    calibration = {"temperature": 2.5, "test_before": {"ece": 0.21, "nll": 0.93, "brier": 0.4}}
    cli._print_summary({**summary, "calibration": calibration}, "runs/x")
    out = capsys.readouterr().out
    assert "ECE 0.1000, NLL 0.6000" in out  # the calibrated test metrics, as before
    assert "temperature 2.5 (fitted on validation): test ECE 0.2100 before, NLL 0.9300" in out
    unscaled = {**calibration, "temperature": 1.0}  # the fit asked for no softening
    cli._print_summary({**summary, "calibration": unscaled}, "runs/x")
    assert "calibrated" not in capsys.readouterr().out


def test_summary_of_a_refit_says_which_model_each_line_describes(capsys):
    test = {"accuracy": 0.7, "f1_macro": 0.7, "ece": 0.1, "nll": 0.6}
    fields = dict(selection_metric="accuracy", selected="best", best_step=150)
    summary = _summary("classification", test, {"accuracy": 0.3}, **fields)
    calibration = {"temperature": 2.5, "test_before": {"ece": 0.21, "nll": 0.93, "brier": 0.4}}
    summary.update(
        refit={"steps": 150, "num_train": 64},
        calibration=calibration,
        validation_at_start={"accuracy": 0.5},
        validation_at_selected={"accuracy": 0.75},
    )
    cli._print_summary(summary, "runs/x")
    out = capsys.readouterr().out
    assert "accuracy = +0.3000 (the refit's last step 150)" in out  # the gap: the refit's
    assert "0.5000 at step 0 -> 0.7500 (weights of step 150, best by validation" in out
    assert "trained again from the start on train + validation (64 rows, 150 steps" in out
    assert "temperature 2.5 (fitted on the monitored run's validation)" in out
    cli._print_summary({**summary, "ema_decay": 0.99}, "runs/x")  # tested: the EMA's weights
    assert "(the refit's EMA weights at step 150)" in capsys.readouterr().out


def test_summary_prints_validation_before_and_after_training(capsys):
    test = {"accuracy": 0.7, "f1_macro": 0.7, "ece": 0.1, "nll": 0.6}
    fields = dict(selection_metric="f1_macro", selected="last", stopped_at_step=200)
    summary = _summary("classification", test, {}, **fields)
    cli._print_summary(summary, "runs/x")
    assert "trained:" not in capsys.readouterr().out  # resumed past step 0, or an older run
    start, tested = {"f1_macro": 0.61, "accuracy": 0.5}, {"f1_macro": 0.74, "accuracy": 0.9}
    cli._print_summary(
        {**summary, "validation_at_start": start, "validation_at_selected": tested}, "runs/x"
    )
    assert (
        "trained:    validation f1_macro 0.6100 at step 0 -> 0.7400 "
        "(weights of the last step 200, a fixed budget)"
    ) in capsys.readouterr().out
    ema = {"validation_at_start": start, "validation_at_selected": tested, "ema_decay": 0.99}
    cli._print_summary({**summary, **ema}, "runs/x")
    assert "(EMA weights at the last step 200, a fixed budget)" in capsys.readouterr().out
    flat = {
        "validation_at_start": {"accuracy": 0.625},
        "validation_at_selected": {"accuracy": 0.625},
    }
    by_accuracy = {**summary, **flat, "selection_metric": "accuracy"}
    for rows, says in ((16, True), (0, False), (872, False)):
        cli._print_summary({**by_accuracy, "num_validation": rows}, "runs/x")
        note = "on 16 validation rows one row is 6.25 points of accuracy; the validation loss"
        assert (note in capsys.readouterr().out) is says


def test_a_missing_cpp_core_is_a_one_line_error(tmp_path):
    # lorafit._C made unimportable, as on a machine where the extension did not build
    script = tmp_path / "without_core.py"
    script.write_text(
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'lorafit._C':\n"
        "            raise ImportError('not built')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from lorafit import cli\n"
        f"cli.main(['train', 'model.name_or_path=x', 'data.path={tmp_path / 'd.csv'}'])\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "C++ evaluation core, is not built" in lines[0]


def test_classification_summary_names_the_majority_class_rate(capsys):
    # 95/5 test set: accuracy 0.75 reads as fair unless the constant guess (0.95) is shown
    test = {"accuracy": 0.75, "f1_macro": 0.54, "ece": 0.07, "nll": 0.49}
    per_class = {"confusion_matrix": [[15, 5], [94, 286]]}
    fields = dict(selection_metric="accuracy", selected="last", stopped_at_step=40)
    summary = _summary("classification", test, {}, test_per_class=per_class, **fields)
    cli._print_summary({**summary, "label_names": ["complaint", "ok"]}, "runs/x")
    assert "largest test class 'ok' scores accuracy 0.9500" in capsys.readouterr().out
    balanced = {"confusion_matrix": [[100, 91], [98, 111]]}  # 52/48
    cli._print_summary({**summary, "test_per_class": balanced}, "runs/x")
    assert "largest test class" not in capsys.readouterr().out
    # a class with no test rows does not make a 20/20 test set imbalanced
    absent = {"confusion_matrix": [[18, 2, 0], [3, 17, 0], [0, 0, 0]]}
    cli._print_summary({**summary, "test_per_class": absent}, "runs/x")
    assert "largest test class" not in capsys.readouterr().out
    # a test set of one class: the constant guess is perfect
    one = {"confusion_matrix": [[0, 0, 0], [3, 17, 0], [0, 0, 0]]}
    names = ["complaint", "ok", "other"]
    cli._print_summary({**summary, "test_per_class": one, "label_names": names}, "runs/x")
    assert "largest test class 'ok' scores accuracy 1.0000" in capsys.readouterr().out


def test_export_names_what_it_wrote(tmp_path, monkeypatch, capsys):
    import argparse

    import lorafit.export

    def fake_export(run_dir, out, merge, tolerance):
        out = Path(out)
        out.mkdir()
        (out / "lorafit.json").write_text(json.dumps({"method": run_dir}))
        return out

    monkeypatch.setattr(lorafit.export, "export_run", fake_export)
    for method, merge, said in [
        ("head", False, "head-only model"),
        ("full", False, "full model"),
        ("lora", False, "adapter"),
        ("lora", True, "merged model"),
        ("full", True, "full model (no adapter: --merge had nothing to merge)"),
    ]:
        out = tmp_path / f"{method}-{merge}"
        args = argparse.Namespace(run_dir=method, out=str(out), merge=merge, tolerance=None)
        cli._cmd_export(args)
        assert capsys.readouterr().out.startswith(f"exported {said}"), method


def test_config_prints_what_each_method_default_resolves_to(capsys):
    from lorafit.recipes import RECIPES, recipe_for

    assert run_cli(["config"]) == 0
    out = capsys.readouterr().out
    assert "train.lr " in out  # the key table comes first
    for key in ("sweep.paired_test", "sweep.keep_checkpoints", "sweep.n_resamples"):
        assert f"\n{key} " in out, key  # a compare file's keys too
    for name, recipe in RECIPES.items():
        line = next(x for x in out.splitlines() if x.split()[:1] == [name])
        assert f"lr={recipe.lr:g}" in line and f"steps={recipe.steps}" in line
        assert f"pool_layers={recipe.pool_layers}" in line
        assert f"min_passes={recipe.min_passes:g}" in line
        assert f"refit={str(recipe.refit).lower()}" in line
        assert recipe_for(name).why in out
    assert "(other PEFT)" in out


def test_a_finished_command_leaves_the_process_group(tmp_path):
    # Gloo's threads left to the interpreter's exit can abort a finished launch (SIGABRT)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        assert run_cli(["config"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
