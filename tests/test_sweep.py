"""`lorafit compare`: sweep config, grid expansion, resumption, statistics, failed runs, report.

Most tests use a fake launcher that writes synthetic run directories (summary.json and
predictions/test.jsonl with a chosen per-example correctness), so the statistics can be checked
against hand-computed values. One test runs a real tiny sweep end to end through the CLI.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from lorafit.data import data_files_sha256
from lorafit.errors import ConfigError
from lorafit.io import write_json
from lorafit.report import holm, seed_stats
from lorafit.sweep import (
    Outcome,
    SweepState,
    execute,
    launch_subprocess,
    load_sweep,
    run_compare,
)

ROOT = Path(__file__).resolve().parent.parent
N_TEST = 200


def _sweep_file(tmp_path: Path, sweep: dict | None = None, base: dict | None = None) -> Path:
    spec = {
        "sweep": {
            "dir": str(tmp_path / "sweep"),
            "methods": {"full": {"train": {"lr": 1e-4}}, "lora": {"method": {"r": 4}}},
            "k_shots": [8],
            "seeds": [1, 2, 3],
            "baseline": "full",
            "n_resamples": 2000,
            **(sweep or {}),
        },
        "base": base or {"model": {"name_or_path": "unused"}, "data": {"path": "unused"}},
    }
    path = tmp_path / "compare.yaml"
    path.write_text("# lorafit compare compare.yaml\n" + yaml.safe_dump(spec))
    return path


class FakeTrainer:
    """A launcher that writes a finished (or crashed) run directory without training.

    `plan[(method, seed)]` (or `plan[(method, seed, hp_label)]`) gives the run's test
    correctness mask, its validation accuracy, or "crash"; the test labels are fixed.
    """

    def __init__(self, plan: dict, labels: np.ndarray | None = None):
        self.plan = plan
        self.labels = labels if labels is not None else np.arange(N_TEST) % 2
        self.calls: list[str] = []

    def __call__(self, run, config_path, log_path, env) -> Outcome:
        from lorafit.sweep import hp_label

        self.calls.append(run.id)
        assert config_path.read_text().startswith(f"# lorafit train {config_path}")
        assert env["PATH"] == os.environ["PATH"]
        spec = self.plan.get((run.method, run.seed, hp_label(run.hp))) or self.plan.get(
            (run.method, run.seed), {}
        )
        if spec == "crash":
            run.dir.mkdir(parents=True, exist_ok=True)
            return Outcome(False, "exit code 2: training loss is nan at step 3", 1.0)
        correct = np.asarray(spec.get("correct", np.ones(N_TEST, bool)))
        (run.dir / "checkpoints" / "step-3").mkdir(parents=True)
        write_fake_run(
            run,
            self.labels,
            correct,
            spec.get("val_acc", 0.9),
            spec.get("val_loss"),
            ci_level=spec.get("ci_level", 0.95),
            refit=spec.get("refit"),
        )
        return Outcome(True, None, 2.5)


def write_fake_run(
    run, labels, correct, val_acc, val_loss=None, train_acc=1.0, ci_level=0.95, refit=None
) -> None:
    preds = np.where(correct, labels, 1 - labels)
    accuracy = float(correct.mean())
    lines = [
        json.dumps({"row": 100 + i, "label": int(y), "pred": int(p), "prob": [0.5, 0.5]})
        for i, (y, p) in enumerate(zip(labels, preds))
    ]
    (run.dir / "predictions").mkdir(parents=True, exist_ok=True)
    (run.dir / "predictions" / "test.jsonl").write_text("\n".join(lines) + "\n")
    (run.dir / "config.yaml").write_text(run.config.to_yaml())  # as the trainer saves it
    summary = {
        "status": "completed",
        "task": "classification",
        "test": {
            "accuracy": accuracy,
            "f1_macro": accuracy,
            "nll": 0.5,
            "loss": 0.5,
            "ece": 0.1 + accuracy / 10,
            "ci": {"accuracy": [accuracy - 0.05, accuracy + 0.05]},
            "ci_level": ci_level,
        },
        "best_validation": {"accuracy": val_acc, "loss": 1.0 if val_loss is None else val_loss},
        "train_sample_at_selected": {"accuracy": train_acc, "loss": 0.1},
        "label_names": ["neg", "pos"],
        "validation_label_counts": [8, 8],
        "trainable_params": 1000 if run.method == "lora" else 100000,
        "total_params": 100000,
        "adapter_bytes": 4000,
        "peak_memory_mb": 500.0,
        "peak_cuda_memory_mb": None,
        "wall_time_s": 10.0,
        "eval_time_s": 2.5,
        "config_sha256": run.config.fingerprint(),
        "data_sha256": data_files_sha256(run.config.data),
        "refit": refit,
    }
    write_json(run.dir / "summary.json", summary)


def _mask(accuracy: float, seed: int = 0) -> np.ndarray:
    """Exactly round(accuracy * N_TEST) correct examples at random positions."""
    mask = np.zeros(N_TEST, bool)
    mask[: round(accuracy * N_TEST)] = True
    return np.random.default_rng(seed).permutation(mask)


def _read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _summary_row(sweep_dir: Path, method: str, k: int = 8) -> dict:
    rows = _read_csv(sweep_dir / "summary.csv")
    return next(r for r in rows if r["method"] == method and int(r["k_shot"]) == k)


# ------------------------------------------------------------------------------------- config
def test_example_configs_parse_and_follow_the_protocol():
    lmbff = load_sweep(ROOT / "configs/compare_sst2_lmbff.yaml")
    assert set(lmbff.config.methods) == {"full", "head", "lora", "qlora"}
    assert lmbff.config.k_shots == [16, 64, 256]
    assert lmbff.config.k_shot_unit == "per_class"
    assert lmbff.config.seeds == [13, 21, 42, 87, 100]
    assert len({r.cell for r in lmbff.runs}) == 4 * 3 * 5  # x the learning-rate grid
    assert all(r.config.model.name_or_path == "minilm" for r in lmbff.runs)
    assert all(r.config.train.refit is False for r in lmbff.runs)  # LM-BFF tests the best step
    ci = load_sweep(ROOT / "configs/compare_sst2_ci.yaml")
    assert len(ci.runs) <= 12
    for name in ("compare_sst2_lmbff.yaml", "compare_sst2_ci.yaml"):
        text = (ROOT / "configs" / name).read_text()
        assert text.startswith(f"# lorafit compare configs/{name}"), name
        assert "sweep" in yaml.safe_load(text)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sweep.methodz={}"], "did you mean 'sweep.methods'"),
        (["sweeps.k_shots=[8]"], "did you mean 'sweep'"),
        (["sweep.baseline=nope"], "sweep.baseline='nope' is not one of sweep.methods"),
        (["sweep.k_shots=[0]"], "sweep.k_shots=[0]"),
        (["sweep.seeds=[1,1]"], "sweep.seeds"),
        (["sweep.metric=auroc"], "sweep.metric='auroc' is not valid"),
        (["sweep.workers=0"], "sweep.workers=0 must be > 0"),
        (["base.data.k_shot=8"], "base.data.k_shot is set by sweep.k_shots"),
        (["base.train.seed=8"], "base.train.seed is set by sweep.seeds"),
        (["base.train.lrr=1"], "did you mean 'base.train.lr'"),
        (["base.method.name=lora"], "base.method is not used"),
        (["sweep.methods.lora.train.stepz=3"], "did you mean 'sweep.methods.lora.train.steps'"),
        (["sweep.methods.lora.data.seed=3"], "sweep.methods.lora.data.seed is set by sweep.seeds"),
        (["sweep.grid.nope={train.lr: [1]}"], "sweep.grid.nope names no method"),
        (["sweep.methods.lora.method.name=lroa"], "sweep.methods.lora: method.name='lroa' is not"),
        (["sweep.grid.lora={train.lr: 1e-4}"], "sweep.grid.lora.train.lr must be a non-empty list"),
        (["sweep.grid.lora={method.dropout: [1.5]}"], "method.dropout=1.5 must be in [0, 1)"),
        (["sweep.grid.lora={data.seed: [1]}"], "sweep.grid.lora.data.seed cannot be searched"),
        (
            ["sweep.grid.lora={train.lr: [1.0e-3, 0.001]}"],
            "sweep.grid.lora.train.lr lists 0.001 twice",
        ),
    ],
)
def test_bad_sweep_config_names_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_sweep(_sweep_file(tmp_path), overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_sweep_section_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {steps: 3}\n")
    with pytest.raises(ConfigError, match="top-level `sweep:` section"):
        load_sweep(path)


def test_grid_expansion_sets_k_seed_and_hyper_parameters(tmp_path):
    sweep = load_sweep(
        _sweep_file(tmp_path),
        [
            "sweep.k_shots=[8,16]",
            "sweep.seeds=2",
            "sweep.grid.lora={train.lr: [1.0e-4, 1.0e-3], method.r: [4, 8]}",
            "sweep.k_shot_unit=total",
        ],
    )
    assert sweep.config.seeds == [13, 21]  # the first LM-BFF seeds
    full = [r for r in sweep.runs if r.method == "full"]
    lora = [r for r in sweep.runs if r.method == "lora"]
    assert len(full) == 2 * 2 and len(lora) == 2 * 2 * 4
    assert len({r.id for r in sweep.runs}) == len(sweep.runs)
    for run in sweep.runs:
        c = run.config
        assert c.data.seed == c.train.seed == run.seed
        assert c.data.k_shot == run.k_shot and c.data.k_shot_unit == "total"
        assert run.dir == (tmp_path / "sweep" / "runs" / run.id).absolute()
        assert c.method.name == run.method
    r = next(
        r
        for r in lora
        if dict(r.hp) == {"train.lr": 1e-3, "method.r": 8} and (r.k_shot, r.seed) == (16, 21)
    )
    assert r.id == "lora/k16/seed21/lr-0.001_r-8"
    assert r.config.train.lr == 1e-3 and r.config.method.r == 8
    assert all(r.config.train.lr == 1e-4 and r.config.method.r == 8 for r in full)
    assert {dict(r.hp)["method.r"] for r in lora} == {4, 8}


# ------------------------------------------------------------------------------- resumption
def test_finished_runs_are_skipped_and_crashed_ones_retried_on_request(tmp_path):
    path = _sweep_file(tmp_path, {"seeds": [1, 2], "workers": 2})
    crashing = FakeTrainer({("lora", 2): "crash"})
    run_compare(path, [], launch=crashing)
    assert len(crashing.calls) == 4
    sweep_dir = tmp_path / "sweep"
    lora = _summary_row(sweep_dir, "lora")
    assert (lora["n_ok"], lora["n_crashed"]) == ("1", "1")  # reported, never averaged in
    assert float(lora["accuracy_mean"]) == 1.0
    assert "training loss is nan at step 3" in (sweep_dir / "summary.md").read_text()
    state = json.loads((sweep_dir / "state.json").read_text())["runs"]
    assert state["lora/k8/seed2"]["status"] == "crashed"

    again = FakeTrainer({})
    run_compare(path, [], launch=again)
    assert again.calls == []  # finished runs skipped, the crashed one only reported
    run_compare(path, [], retry_failed=True, launch=again)
    assert again.calls == ["lora/k8/seed2"]
    assert not list(sweep_dir.glob("runs/*/*/*/checkpoints"))  # completed: no resume needed
    lora = _summary_row(sweep_dir, "lora")
    assert (lora["n_ok"], lora["n_crashed"]) == ("2", "0")


def test_runs_that_crashed_under_other_settings_are_rerun_from_scratch(tmp_path):
    path = _sweep_file(tmp_path, {"seeds": [1]})
    crashing = FakeTrainer({("lora", 1): "crash", ("full", 1): "crash"})
    run_compare(path, [], launch=crashing)  # e.g. a wrong base.data.label: every run crashes
    stale = tmp_path / "sweep" / "runs" / "lora" / "k8" / "seed1"
    (stale / "checkpoints" / "step-2").mkdir(parents=True)  # from the crashed settings
    (stale / "config.yaml").write_text("train: {weight_decay: 0.01}\n")
    fixed, resumable = FakeTrainer({}), []

    def launch(run, config_path, log_path, env) -> Outcome:
        resumable.append((run.dir / "checkpoints").exists())
        return fixed(run, config_path, log_path, env)

    run_compare(path, ["base.train.weight_decay=0.02"], launch=launch)  # the mistake fixed
    assert sorted(fixed.calls) == ["full/k8/seed1", "lora/k8/seed1"]  # no --retry-failed needed
    assert resumable == [False, False]  # the old settings' checkpoint was not resumed


def test_interrupted_run_is_rerun_from_scratch_without_checkpoint(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, {"seeds": [1]}))
    stale = sweep.runs[0].dir
    (stale / "metrics.jsonl").parent.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text('{"step": 5}\n')
    fake = FakeTrainer({})
    counts = execute(sweep, launch=fake, progress=False)
    assert counts["completed"] == 2 and not (stale / "metrics.jsonl").exists()


def test_process_time_of_a_resumed_run_counts_every_launch(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, {"seeds": [1]}))
    restarted, resumed = sweep.runs

    def crash_after_a_checkpoint(run, config_path, log_path, env) -> Outcome:
        (run.dir / "checkpoints" / "step-2").mkdir(parents=True)
        return Outcome(False, "killed by signal 9", 1.0)

    execute(sweep, launch=crash_after_a_checkpoint, progress=False)
    shutil.rmtree(restarted.dir / "checkpoints")  # nothing to resume: starts again from scratch
    execute(sweep, retry_failed=True, launch=FakeTrainer({}), progress=False)
    state = json.loads((tmp_path / "sweep" / "state.json").read_text())["runs"]
    assert state[restarted.id]["process_time_s"] == 2.5
    assert state[resumed.id]["process_time_s"] == 1.0 + 2.5


def test_ctrl_c_launches_nothing_more_and_a_rerun_resumes(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, {"seeds": [1, 2]}))  # 4 runs, one worker
    calls = []

    def interrupted(run, config_path, log_path, env) -> Outcome:
        calls.append(run.id)
        (run.dir / "checkpoints" / "step-2").mkdir(parents=True)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while this run trains
        time.sleep(0.2)
        return Outcome(False, "exit code 130: lorafit: interrupted", 1.0)

    with pytest.raises(KeyboardInterrupt):
        execute(sweep, launch=interrupted, progress=False)
    assert len(calls) == 1  # the three queued runs were never launched
    state = json.loads((tmp_path / "sweep" / "state.json").read_text())["runs"]
    assert state[calls[0]]["status"] == "running"  # not crashed: a rerun resumes it
    rerun = FakeTrainer({})
    counts = execute(sweep, launch=rerun, progress=False)
    assert counts["completed"] == 4 and calls[0] in rerun.calls


def test_interrupt_children_stops_the_launched_trainings():
    from lorafit import sweep as S

    child = subprocess.Popen(["sleep", "30"])
    with S._CHILDREN_LOCK:
        S._CHILDREN.add(child)
    try:
        S.interrupt_children()
        assert child.wait(timeout=10) == -signal.SIGINT
    finally:
        with S._CHILDREN_LOCK:
            S._CHILDREN.discard(child)


def test_subprocess_launcher_reports_the_error_line(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, {"seeds": [1]}))
    log = tmp_path / "run.log"
    outcome = launch_subprocess(sweep.runs[0], tmp_path / "missing.yaml", log, dict(os.environ))
    assert not outcome.ok and outcome.seconds > 0
    assert outcome.error.startswith("exit code 2: config file") and "missing.yaml" in outcome.error
    assert "lorafit train" in log.read_text()


def test_changed_config_of_a_finished_run_is_refused(tmp_path):
    path = _sweep_file(tmp_path, {"seeds": [1]})
    sweep = load_sweep(path)
    run_compare(path, [], launch=FakeTrainer({}))
    for report_only in (False, True):
        with pytest.raises(ConfigError, match=r"other settings .*train.steps: \d+ then, 7 now"):
            run_compare(path, ["base.train.steps=7"], report_only=report_only)
    # a refused sweep leaves the saved sweep.yaml alone: it still rebuilds the report
    saved_sweep = (tmp_path / "sweep" / "sweep.yaml").read_text()
    assert "steps: 7" not in saved_sweep
    run_compare(tmp_path / "sweep" / "sweep.yaml", [], report_only=True)
    # a setting that an older lorafit did not have is not a difference
    summary = json.loads((sweep.runs[0].dir / "summary.json").read_text())
    write_json(sweep.runs[0].dir / "summary.json", {**summary, "config_sha256": "older"})
    saved = yaml.safe_load((sweep.runs[0].dir / "config.yaml").read_text())
    del saved["train"]["label_smoothing"]
    (sweep.runs[0].dir / "config.yaml").write_text(yaml.safe_dump(saved))
    run_compare(path, [], report_only=True)


# csv lines "text,label" of a learnable 2-class file, for sweeps that read real data files
DATA_ROWS = [f"text {i} {'good' if i % 2 else 'bad'} words,{i % 2}" for i in range(80)]


def test_finished_runs_on_a_data_file_edited_since_are_refused(tmp_path):
    data = tmp_path / "d.csv"
    rows = DATA_ROWS
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    base = {"model": {"name_or_path": "unused"}, "data": {"path": str(data)}}
    path = _sweep_file(tmp_path, {"seeds": [1]}, base)
    run_compare(path, [], launch=FakeTrainer({}))
    data.write_text("text,label\n" + "\n".join(rows[::-1]) + "\n")  # same rows, new order
    with pytest.raises(
        ConfigError, match=r"trained on other data: the train file has changed since, in .*d.csv"
    ):
        run_compare(path, ["sweep.seeds=[1,2]"], launch=FakeTrainer({}))
    # the report is about the runs: it rebuilds while they all share the data they had
    run_compare(path, [], report_only=True)
    # runs trained on two versions of the file cannot share a table
    new = ["sweep.dir=" + str(tmp_path / "new"), "sweep.seeds=[1,2]"]
    run_compare(path, new, launch=FakeTrainer({}))
    old_hashes = json.loads((load_sweep(path).runs[0].dir / "summary.json").read_text())
    seed2 = load_sweep(path, new).runs[1]
    summary = json.loads((seed2.dir / "summary.json").read_text())
    assert seed2.id == "full/k8/seed2" and summary["data_sha256"] != old_hashes["data_sha256"]
    write_json(seed2.dir / "summary.json", {**summary, "data_sha256": old_hashes["data_sha256"]})
    with pytest.raises(
        ConfigError,
        match=r"runs full/k8/seed1 and full/k8/seed2 .*different data \(the train file has changed",
    ):
        run_compare(path, new, report_only=True)


def test_a_data_file_added_to_the_folder_is_other_data_an_unused_one_is_not(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = DATA_ROWS
    (folder / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    base = {"model": {"name_or_path": "unused"}, "data": {"path": str(folder)}}
    path = _sweep_file(tmp_path, {"seeds": [1]}, base)
    run_compare(path, [], launch=FakeTrainer({}))  # tested on rows carved from train.csv
    (folder / "test.csv").write_text("text,label\n" + "\n".join(rows[:20]) + "\n")
    with pytest.raises(ConfigError, match=r"other data: the test file was added since"):
        run_compare(path, ["sweep.seeds=[1,2]"], launch=FakeTrainer({}))
    # with a test file, K-shot does not read validation.csv: adding or editing it changes nothing
    run_compare(path, ["sweep.dir=" + str(tmp_path / "new")], launch=FakeTrainer({}))
    (folder / "validation.csv").write_text("text,label\n" + "\n".join(rows[:4]) + "\n")
    run_compare(
        path, ["sweep.dir=" + str(tmp_path / "new"), "sweep.seeds=[1,2]"], launch=FakeTrainer({})
    )


def test_runs_tested_on_other_labels_are_a_one_line_error(tmp_path):
    # runs of an older lorafit (no data_sha256): the paired test meets a row with two labels
    path = _sweep_file(tmp_path, {"seeds": [1]})
    run_compare(path, [], launch=FakeTrainer({}))
    flipped = 1 - np.arange(N_TEST) % 2
    with pytest.raises(
        ConfigError,
        match=r"test row 100 has label 0 in run lora/k8/seed1 and 1 in run lora/k8/seed2",
    ):
        run_compare(path, ["sweep.seeds=[1,2]"], launch=FakeTrainer({}, labels=flipped))


def test_a_baseline_without_ok_runs_says_why_deltas_are_blank(tmp_path):
    path = _sweep_file(tmp_path, {"seeds": [1, 2]})
    plan = {("full", 1): "crash", ("full", 2): "crash"}
    text = (
        run_compare(path, [], launch=FakeTrainer(plan)).report.parent / "summary.md"
    ).read_text()
    assert "It has no ok run at K = 8, so there are no paired tests" in text
    text = (
        run_compare(path, [], launch=FakeTrainer({}), retry_failed=True).report.parent
        / "summary.md"
    ).read_text()
    assert "no ok run" not in text


def test_report_only_runs_nothing_and_lists_missing_runs(tmp_path):
    path = _sweep_file(tmp_path, {"seeds": [1, 2]})
    run_compare(path, ["sweep.seeds=[1]"], launch=FakeTrainer({}))

    def refuse(*args):
        raise AssertionError("report-only must not train")

    recorded = (tmp_path / "sweep" / "sweep.yaml").read_text()
    text = run_compare(path, [], report_only=True, launch=refuse).report.read_text()
    assert "lora/k8/seed2" in text.split("## Not run yet")[1]
    assert _summary_row(tmp_path / "sweep", "lora")["n_pending"] == "1"
    # a what-if with other seeds leaves the sweep's record alone: it still rebuilds as run
    assert (tmp_path / "sweep" / "sweep.yaml").read_text() == recorded
    what_if = "**What-if report** (`--report-only` with other settings than the sweep's record: seeds: [1, 2] (sweep.yaml: [1]))"
    assert what_if in text and what_if in (tmp_path / "sweep" / "summary.md").read_text()
    text = run_compare(tmp_path / "sweep" / "sweep.yaml", [], report_only=True).report.read_text()
    assert "What-if" not in text


def test_report_only_on_a_sweep_that_never_ran_is_an_error(tmp_path):
    path = _sweep_file(tmp_path, {"seeds": [1]})
    with pytest.raises(ConfigError, match=r"--report-only: no run of this sweep has finished in "):
        run_compare(path, [], report_only=True)


def test_a_launch_left_running_by_a_killed_sweep_is_waited_for(tmp_path):
    """Its lock is held (here by another process, as by an orphaned child): the rerun waits,
    finds the run finished, launches nothing, and records it as completed."""
    sweep = load_sweep(_sweep_file(tmp_path, {"seeds": [1]}))
    orphan, other = sweep.runs
    (orphan.dir / "checkpoints" / "step-3").mkdir(parents=True)
    write_fake_run(orphan, np.arange(N_TEST) % 2, np.ones(N_TEST, bool), 0.9)
    summary = orphan.dir / "summary.json"
    finished = summary.read_text()
    summary.unlink()  # still training
    state = SweepState(tmp_path / "sweep" / "state.json")
    state.record(orphan, status="running")  # as the killed sweep left it
    lock = tmp_path / "sweep" / "locks" / f"{orphan.id.replace('/', '__')}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time, pathlib; fh = open(sys.argv[1], 'a+'); "
            "fcntl.flock(fh, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.5); "
            "pathlib.Path(sys.argv[2]).write_text(sys.argv[3])",
            str(lock),
            str(summary),
            finished,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "held\n"
    fake = FakeTrainer({})
    counts = execute(sweep, launch=fake, progress=False)
    holder.wait()
    assert fake.calls == [other.id] and counts["completed"] == 2
    runs = json.loads((tmp_path / "sweep" / "state.json").read_text())["runs"]
    assert runs[orphan.id]["status"] == runs[other.id]["status"] == "completed"
    assert not (orphan.dir / "checkpoints").exists()  # dropped, as keep_checkpoints=false says


def test_a_sweeps_child_dies_with_the_sweep(tmp_path):
    """SIGKILL the sweep: its `lorafit train` child gets SIGTERM from the kernel."""
    child_pid = tmp_path / "child.pid"
    sweep_code = (
        "import os, subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import os, sys, time; from lorafit.sweep import die_with_sweep; die_with_sweep(); "
        'open(sys.argv[1], "w").write(str(os.getpid())); time.sleep(60)\', sys.argv[1]], '
        "env={**os.environ, 'LORAFIT_SWEEP_PID': str(os.getpid())}); time.sleep(60)"
    )
    sweep_process = subprocess.Popen([sys.executable, "-c", sweep_code, str(child_pid)])
    deadline = time.time() + 30
    while not (child_pid.exists() and child_pid.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    pid = int(child_pid.read_text())
    os.kill(sweep_process.pid, signal.SIGKILL)
    sweep_process.wait()
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# ------------------------------------------------------------------------------- statistics
def test_holm_matches_hand_computed_values():
    # sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([0.02]) == pytest.approx([0.02])


def test_seed_statistics_match_hand_computed_values(tmp_path):
    accuracies = [0.80, 0.82, 0.78, 0.85, 0.75]
    seeds = [1, 2, 3, 4, 5]
    plan = {("lora", s): {"correct": _mask(a, s)} for s, a in zip(seeds, accuracies)}
    plan.update({("full", s): {"correct": _mask(0.7, 50 + s)} for s in seeds})
    run_compare(_sweep_file(tmp_path, {"seeds": seeds}), [], launch=FakeTrainer(plan))
    row = _summary_row(tmp_path / "sweep", "lora")
    # mean 0.8; squared deviations sum to 0.0058 -> std sqrt(0.00145); t(0.975, 4) = 2.776445
    std = math.sqrt(0.0058 / 4)
    half = 2.776445 * std / math.sqrt(5)
    assert float(row["accuracy_mean"]) == pytest.approx(0.8)
    assert float(row["accuracy_std"]) == pytest.approx(std)
    assert float(row["accuracy_ci_low"]) == pytest.approx(0.8 - half, abs=1e-6)
    assert float(row["accuracy_ci_high"]) == pytest.approx(0.8 + half, abs=1e-6)
    assert float(row["bootstrap_ci_low_mean"]) == pytest.approx(0.75)  # fake CIs: acc ± 0.05
    assert float(row["gap_mean"]) == pytest.approx(0.2)  # train-sample accuracy 1.0 - 0.8
    assert float(row["ece_mean"]) == pytest.approx(0.18)
    assert float(row["eval_share"]) == pytest.approx(0.25)
    assert float(row["delta"]) == pytest.approx(0.1)  # mean over seeds: 0.8 vs 0.7
    assert int(row["paired_examples"]) == 5 * N_TEST
    assert _summary_row(tmp_path / "sweep", "full")["p_permutation"] == ""  # the baseline
    runs = _read_csv(tmp_path / "sweep" / "runs.csv")
    assert len(runs) == 10 and {r["status"] for r in runs} == {"ok"}
    assert {"cfg.method.name", "cfg.train.lr", "cfg.method.r", "wall_time_s"} <= set(runs[0])


def test_seed_interval_is_clipped_to_the_metric_range():
    # 2 seeds: t(0.975, 1) = 12.706, so the raw interval is 0.9 +- 0.635 = [0.265, 1.535]
    stats = seed_stats([0.95, 0.85], 0.95)
    assert stats["mean"] == pytest.approx(0.9)
    assert stats["ci_low"] == pytest.approx(0.9 - 12.7062 * 0.05, abs=1e-3)
    assert stats["ci_high"] == 1.0
    assert seed_stats([0.05, 0.15], 0.95)["ci_low"] == 0.0
    assert math.isnan(seed_stats([0.9], 0.95)["ci_high"])  # one seed: no interval


def test_paired_test_detects_a_real_difference_and_not_a_null_one(tmp_path):
    seeds = list(range(1, 9))  # the permutation test swaps whole runs: p >= 2 / 2^8 = 0.0078
    plan = {}
    for s in seeds:
        plan[("full", s)] = {"correct": _mask(0.70, s)}
        plan[("better", s)] = {"correct": _mask(0.80, 100 + s)}
        plan[("same", s)] = {"correct": _mask(0.70, 200 + s)}  # same rate, other errors
    # sweep method names are labels; each still names a real method
    methods = {
        "full": None,
        "better": {"method": {"name": "lora"}},
        "same": {"method": {"name": "head"}},
    }
    base = {"model": {"name_or_path": "unused"}, "data": {"path": "unused"}}
    # the exact test is the one Holm adjusts here (the default is the bootstrap)
    options = {"seeds": seeds, "methods": methods, "paired_test": "permutation"}
    path = _sweep_file(tmp_path, options, base)
    run_compare(path, [], launch=FakeTrainer(plan))
    better = _summary_row(tmp_path / "sweep", "better")
    same = _summary_row(tmp_path / "sweep", "same")
    assert float(better["p_permutation"]) == pytest.approx(2 / 2**8)  # all 8 seeds agree
    assert float(better["p_bootstrap"]) < 0.01
    assert float(same["p_permutation"]) > 0.2 and float(same["p_bootstrap"]) > 0.2
    assert float(better["delta_ci_low"]) > 0 > float(same["delta_ci_low"])
    # Holm over the two comparisons: the smaller p doubles, the larger stays (>= the first)
    assert float(better["p_holm"]) == pytest.approx(2 * float(better["p_permutation"]))
    assert float(same["p_holm"]) == pytest.approx(float(same["p_permutation"]))
    text = (tmp_path / "sweep" / "summary.md").read_text()
    assert "Holm-Bonferroni" in text and "2 comparisons" in text
    assert "Δ vs full [95% CI, seeds × test rows]" in text
    assert "(8 seeds)" in text


def test_the_report_says_when_a_tested_model_was_refit(tmp_path):
    run_compare(_sweep_file(tmp_path, {"seeds": [1]}), [], launch=FakeTrainer({}))
    assert "**refit**" not in (tmp_path / "sweep" / "summary.md").read_text()
    plan = {("lora", 2): {"correct": _mask(0.8), "refit": {"steps": 3, "num_train": 32}}}
    (tmp_path / "b").mkdir()
    run_compare(_sweep_file(tmp_path / "b", {"seeds": [2]}), [], launch=FakeTrainer(plan))
    text = (tmp_path / "b" / "sweep" / "summary.md").read_text()
    assert "- **refit**: runs with train.refit" in text
    # lora was refit, the full baseline was not: its Δ is marked and the note says why
    assert int(_summary_row(tmp_path / "b" / "sweep", "lora")["refit_differs"]) == 1
    assert "(1 seed: test rows only) ‡" in text and "- **‡ refit differs**" in text
    plan[("full", 2)] = {"correct": _mask(0.7), "refit": {"steps": 3, "num_train": 32}}
    (tmp_path / "c").mkdir()
    run_compare(_sweep_file(tmp_path / "c", {"seeds": [2]}), [], launch=FakeTrainer(plan))
    text = (tmp_path / "c" / "sweep" / "summary.md").read_text()
    assert "‡" not in text and "- **refit**: runs with train.refit" in text


def test_a_diverged_refit_is_a_failed_run(tmp_path):
    diverged = {"steps": 3, "num_train": 32, "diverged": True}
    plan = {
        ("lora", 1): {"correct": _mask(0.9, 1)},
        ("lora", 2): {"correct": _mask(0.8, 2)},
        ("lora", 3): {"correct": _mask(0.5, 3), "refit": diverged},  # validation is fine
    }
    run_compare(_sweep_file(tmp_path), [], launch=FakeTrainer(plan))
    row = _summary_row(tmp_path / "sweep", "lora")
    assert (row["n_ok"], row["n_failed"]) == ("2", "1")
    assert float(row["accuracy_mean"]) == pytest.approx(0.85)
    failed = (tmp_path / "sweep" / "summary.md").read_text().split("## Failed runs")[1]
    assert "| lora/k8/seed3 | 0.900 | 0.500 | yes | 0.500 |" in failed


def test_a_one_seed_comparison_says_its_ci_covers_test_rows_only(tmp_path):
    run_compare(_sweep_file(tmp_path, {"seeds": [1]}), [], launch=FakeTrainer({}))
    text = (tmp_path / "sweep" / "summary.md").read_text()
    assert "(1 seed: test rows only)" in text and "1 comparison in this table" in text
    assert "With one paired seed there are no seeds to redraw" in text


def test_paired_ci_covers_the_spread_between_seeds(tmp_path):
    # lora wins by 0.15 in two seeds and loses by 0.05 in two: pooling the 4 x 200 rows as
    # independent pairs gives the CI [+0.006, +0.099] (p = 0.036), which excludes 0
    seeds = [1, 2, 3, 4]
    plan = {("full", s): {"correct": _mask(0.70, s)} for s in seeds}
    for s, accuracy in zip(seeds, [0.85, 0.85, 0.65, 0.65]):
        plan[("lora", s)] = {"correct": _mask(accuracy, 100 + s)}
    run_compare(_sweep_file(tmp_path, {"seeds": seeds}), [], launch=FakeTrainer(plan))
    row = _summary_row(tmp_path / "sweep", "lora")
    assert float(row["delta"]) == pytest.approx(0.05)
    assert (float(row["delta_seed_min"]), float(row["delta_seed_max"])) == pytest.approx(
        (-0.05, 0.15)
    )
    assert float(row["delta_ci_low"]) < 0 < float(row["delta_ci_high"])
    assert float(row["p_bootstrap"]) > 0.05
    # the swaps that keep both +0.15 seeds on one side (8 of 16) are as extreme as observed
    assert float(row["p_permutation"]) == pytest.approx(0.5)
    assert (int(row["paired_test_rows"]), int(row["paired_examples"])) == (N_TEST, 4 * N_TEST)


def test_failed_runs_are_flagged_and_kept_out_of_the_means(tmp_path):
    plan = {
        ("lora", 1): {"correct": _mask(0.9, 1)},
        ("lora", 2): {"correct": _mask(0.8, 2)},
        ("lora", 3): {"correct": _mask(0.5, 3), "val_acc": 0.5},  # = majority rate 8/16
    }
    run_compare(_sweep_file(tmp_path), [], launch=FakeTrainer(plan))
    sweep_dir = tmp_path / "sweep"
    row = _summary_row(sweep_dir, "lora")
    assert (row["n_ok"], row["n_failed"]) == ("2", "1")
    assert float(row["accuracy_mean"]) == pytest.approx(0.85)
    runs = {r["run_id"]: r for r in _read_csv(sweep_dir / "runs.csv")}
    assert runs["lora/k8/seed3"]["status"] == "failed"
    assert runs["lora/k8/seed1"]["status"] == "ok"
    assert float(runs["lora/k8/seed3"]["validation_majority_rate"]) == 0.5
    failed = (sweep_dir / "summary.md").read_text().split("## Failed runs")[1]
    assert "lora/k8/seed3" in failed and "lora/k8/seed1" not in failed
    assert int(row["paired_seeds"]) == 2  # the failed seed is not in the paired test


def test_cost_of_a_cell_whose_runs_all_failed_is_still_reported(tmp_path):
    plan = {("lora", s): {"correct": _mask(0.5, s), "val_acc": 0.5} for s in (1, 2, 3)}
    run_compare(_sweep_file(tmp_path), [], launch=FakeTrainer(plan))
    row = _summary_row(tmp_path / "sweep", "lora")
    assert (row["n_ok"], row["n_failed"]) == ("0", "3") and row["accuracy_mean"] == ""
    assert float(row["trainable_params"]) == 1000 and float(row["adapter_bytes"]) == 4000
    cost = (tmp_path / "sweep" / "summary.md").read_text().split("## Cost")[1]
    assert "| lora | 8 | 1k | 4kB | 500 MB |" in cost


def test_grid_point_is_chosen_on_validation_never_on_test(tmp_path):
    plan = {}
    for s in (1, 2, 3):
        # lr 0.01 wins on test but loses on validation; it must not be chosen
        plan[("lora", s, "lr-0.01")] = {"correct": _mask(0.95, s), "val_acc": 0.7}
        plan[("lora", s, "lr-0.001")] = {"correct": _mask(0.75, s), "val_acc": 0.8}
    path = _sweep_file(tmp_path, {"grid": {"lora": {"train.lr": [0.01, 0.001]}}})
    run_compare(path, [], launch=FakeTrainer(plan))
    runs = _read_csv(tmp_path / "sweep" / "runs.csv")
    chosen = [r["hp"] for r in runs if r["method"] == "lora" and r["selected"] == "True"]
    assert chosen == ["lr-0.001"] * 3
    assert float(_summary_row(tmp_path / "sweep", "lora")["accuracy_mean"]) == pytest.approx(0.75)


def test_report_links_tables_and_plots(tmp_path):
    run_compare(_sweep_file(tmp_path, {"k_shots": [8, 16]}), [], launch=FakeTrainer({}))
    sweep_dir = tmp_path / "sweep"
    report = (sweep_dir / "report.md").read_text()
    for name in ("metric_vs_k", "gap_vs_k", "ece_vs_k", "params_vs_metric"):
        png = sweep_dir / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"]({name}.png)" in report
    for name in ("runs.csv", "summary.csv", "summary.md", "sweep.yaml"):
        assert (sweep_dir / name).exists() and f"({name})" in report
    assert not list(sweep_dir.glob(".*.tmp"))  # atomic writes leave no temporaries
    # the resolved sweep.yaml rebuilds the same report
    again = run_compare(sweep_dir / "sweep.yaml", [], report_only=True)
    assert again.report.read_text() == report


def test_commands_written_for_copying_quote_their_paths(tmp_path):
    folder = tmp_path / "my runs"  # a space: the commands must survive copy and paste
    folder.mkdir()
    run_compare(_sweep_file(folder), [], launch=FakeTrainer({}))
    quoted = shlex.quote(str(folder / "sweep" / "sweep.yaml"))
    assert (
        f"`lorafit compare {quoted} --report-only`" in (folder / "sweep" / "report.md").read_text()
    )
    first_line = (folder / "sweep" / "sweep.yaml").read_text().splitlines()[0]
    assert shlex.split(first_line[2:]) == [
        "lorafit",
        "compare",
        str(folder / "sweep" / "sweep.yaml"),
        "--report-only",
    ]


def test_crashed_and_pending_grid_points_are_counted_listed_and_flagged(tmp_path):
    plan = {("lora", s, "lr-0.0001"): {"correct": _mask(0.6, s), "val_acc": 0.7} for s in (1, 2)}
    plan.update({("lora", s, "lr-0.001"): "crash" for s in (1, 2)})
    path = _sweep_file(tmp_path, {"seeds": [1, 2], "grid": {"lora": {"train.lr": [1e-4, 1e-3]}}})
    run_compare(path, [], launch=FakeTrainer(plan))
    sweep_dir = tmp_path / "sweep"
    text = (sweep_dir / "summary.md").read_text()
    assert "Runs: 4 ok, 0 failed, 2 crashed, 0 not run yet" in text
    crashed = text.split("## Crashed runs")[1]
    assert "lora/k8/seed1/lr-0.001" in crashed and "lora/k8/seed2/lr-0.001" in crashed
    assert "training loss is nan at step 3" in crashed
    main_table = text.split("## Cost")[0]
    assert "| lora | 8 | 2 / 0 / 0, grid incomplete: 2 crashed |" in main_table
    assert "| full | 8 | 2 / 0 / 0 |" in main_table
    lora = _summary_row(sweep_dir, "lora")
    assert (lora["n_ok"], lora["n_crashed"], lora["n_grid_incomplete"]) == ("2", "0", "2")
    assert (lora["n_grid_crashed"], lora["n_grid_pending"]) == ("2", "0")
    # a grid point added later and not run yet: the choice was made without it
    wider = ["sweep.grid.lora={train.lr: [1.0e-4, 1.0e-3, 1.0e-2]}"]
    text = run_compare(path, wider, report_only=True).report.read_text()
    assert "2 / 0 / 0, grid incomplete: 2 crashed, 2 not run |" in text
    assert "lora/k8/seed2/lr-0.01" in text.split("## Not run yet")[1]


def test_per_run_ci_column_names_the_level_the_runs_used(tmp_path):
    path = _sweep_file(tmp_path, {"seeds": [1, 2]})
    run_compare(path, ["sweep.ci_level=0.9"], launch=FakeTrainer({}))
    text = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| 90% CI across seeds | mean per-run 95% bootstrap CI |" in text
    assert "each run's 95% bootstrap CI" in text
    mixed = {("full", s): {"ci_level": 0.8} for s in (1, 2)}
    run_compare(path, ["sweep.dir=" + str(tmp_path / "mixed")], launch=FakeTrainer(mixed))
    text = (tmp_path / "mixed" / "summary.md").read_text()
    assert "mean per-run bootstrap CI (levels differ: 80%, 95%)" in text
    assert "[0.950, 1.050] at 80%" in text and "[0.950, 1.050] at 95%" in text


@pytest.fixture
def saved_axes(monkeypatch) -> dict:
    """{plot name: its axes}, filled as the report saves each figure."""
    from matplotlib.figure import Figure

    axes = {}
    savefig = Figure.savefig

    def keep_axes(fig, path, **kwargs):
        axes[Path(path).name.lstrip(".").split(".")[0]] = fig.axes[0]  # atomic: .name.*.tmp
        return savefig(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_axes)
    return axes


def test_single_k_plot_draws_the_ci_as_error_bars_within_the_metric_range(tmp_path, saved_axes):
    from matplotlib.container import ErrorbarContainer

    axes = saved_axes
    plan = {("lora", 1): {"correct": _mask(0.6, 1)}, ("lora", 2): {"correct": _mask(0.9, 2)}}
    run_compare(_sweep_file(tmp_path, {"seeds": [1, 2]}), [], launch=FakeTrainer(plan))
    lora = _summary_row(tmp_path / "sweep", "lora")
    # the raw t-interval is 0.75 +- 12.7 * 0.15 = [-1.16, 2.66]: clipped to [0, 1] in the table
    assert (float(lora["accuracy_ci_low"]), float(lora["accuracy_ci_high"])) == (0.0, 1.0)
    ax = axes["metric_vs_k"]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # one per method: a band over a single K would be invisible
    low, high = ax.get_ylim()
    assert -0.1 < low and high < 1.1  # and in the plot


def test_plot_legends_name_a_method_without_an_ok_run(tmp_path, saved_axes):
    plan = {("full", 1): "crash", ("full", 2): "crash"}
    run_compare(_sweep_file(tmp_path, {"seeds": [1, 2]}), [], launch=FakeTrainer(plan))
    for plot in ("gap_vs_k", "ece_vs_k"):
        labels = [t.get_text() for t in saved_axes[plot].get_legend().get_texts()]
        assert labels == ["full (no ok run)", "lora"], plot


def test_compare_exits_1_when_runs_crashed_but_not_when_they_failed(tmp_path, monkeypatch, capsys):
    import lorafit.sweep
    from tests.tiny import run_cli

    path = _sweep_file(tmp_path, {"seeds": [1, 2]})
    failing = {("lora", 1): {"correct": _mask(0.5, 1), "val_acc": 0.5}}
    monkeypatch.setattr(lorafit.sweep, "launch_subprocess", FakeTrainer(failing))
    assert run_cli(["compare", str(path)]) == 0  # a failed run is a result
    crashing = _sweep_file(tmp_path, {"seeds": [1, 2], "dir": str(tmp_path / "crashing")})
    monkeypatch.setattr(lorafit.sweep, "launch_subprocess", FakeTrainer({("lora", 2): "crash"}))
    capsys.readouterr()
    assert run_cli(["compare", str(crashing)]) == 1
    assert (tmp_path / "crashing" / "report.md").exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("lorafit compare: 1 run crashed (see the report); rerun it with --retry-failed")
    assert run_cli(["compare", str(crashing), "--report-only"]) == 1


def test_killed_run_names_the_signal_not_the_progress_bar(tmp_path, monkeypatch):
    import subprocess

    sweep = load_sweep(_sweep_file(tmp_path, {"seeds": [1]}))
    bar = "train:  67%|██████▋   | 8/12 [00:01<00:00, 7.1step/s, loss=0.31]"

    def child(output: str, code: int):
        class Child:  # what launch_subprocess uses of a Popen
            def __init__(self, args, stdout, **kwargs):
                stdout.write(output)

            def wait(self):
                return code

        return Child

    monkeypatch.setattr(
        subprocess, "Popen", child(f"classification | lora on tiny\r{bar}\r{bar}", -9)
    )
    outcome = launch_subprocess(sweep.runs[0], tmp_path / "c.yaml", tmp_path / "a.log", {})
    assert outcome.error == "killed by signal 9 (SIGKILL; out of memory?)"

    monkeypatch.setattr(
        subprocess, "Popen", child(f"Traceback ...\nValueError: boom\n{bar}\r{bar}\n", 1)
    )
    outcome = launch_subprocess(sweep.runs[0], tmp_path / "c.yaml", tmp_path / "b.log", {})
    assert outcome.error == "exit code 1: ValueError: boom"


# ---------------------------------------------------------------------------------- real runs
@pytest.mark.slow  # four `python -m lorafit train` processes: mostly their start-up time
def test_tiny_sweep_end_to_end(tmp_path, tiny_bert_path):
    """2 methods x 1 K x 2 seeds of real training on the tiny BERT, through the CLI."""
    from lorafit.cli import main

    words = {0: "terrible boring bad dull worst slow", 1: "great wonderful loved excellent joy"}
    rows = ["sentence\tlabel"]
    for i in range(60):
        label = i % 2
        picked = words[label].split()
        rows.append(f"the movie was {picked[i % len(picked)]} and {picked[(i + 2) % 5]}\t{label}")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("\n".join(rows[:41]) + "\n")
    (data / "test.tsv").write_text("\n".join([rows[0], *rows[41:]]) + "\n")
    spec = {
        "sweep": {
            "dir": str(tmp_path / "sweep"),
            "methods": {"head": {"train": {"lr": 5e-3}}, "lora": {"method": {"r": 2}}},
            "k_shots": [4],
            "seeds": [1, 2],
            "n_resamples": 200,
        },
        "base": {
            "model": {"name_or_path": tiny_bert_path, "max_length": 16},
            "data": {"path": str(data), "validation_split": None},
            "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "train_eval_size": 8},
            "eval": {"batch_size": 32, "bootstrap_samples": 50},
            "output": {"report_to": [], "plot": False},
        },
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(path), "--workers", "2"])
    assert exit_info.value.code == 0
    sweep_dir = tmp_path / "sweep"
    runs = _read_csv(sweep_dir / "runs.csv")
    assert len(runs) == 4
    assert all(r["status"] in ("ok", "failed") for r in runs), [r["error"] for r in runs]
    for r in runs:
        assert float(r["validation_majority_rate"]) == 0.5  # 4 + 4 validation rows
        failed = float(r["validation_accuracy"]) <= 0.5
        assert r["status"] == ("failed" if failed else "ok")
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0 and float(r["wall_time_s"]) > 0
        assert int(r["trainable_params"]) > 0 and float(r["process_time_s"]) > 0
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert summary["data_seed"] == summary["seed"] == int(r["seed"])
    head = _summary_row(sweep_dir, "head", 4)
    assert int(head["n_ok"]) + int(head["n_failed"]) == 2
    params = {r["method"]: int(r["trainable_params"]) for r in runs}
    assert params["head"] < params["lora"]  # lora trains the head and the adapters
    report = (sweep_dir / "report.md").read_text()
    assert "| lora | 4 |" in report and "metric_vs_k.png" in report
    # a second invocation finds everything finished and trains nothing
    stamps = {r["run_id"]: (Path(r["run_dir"]) / "summary.json").stat().st_mtime_ns for r in runs}
    with pytest.raises(SystemExit):
        main(["compare", str(path)])
    for r in runs:
        assert (Path(r["run_dir"]) / "summary.json").stat().st_mtime_ns == stamps[r["run_id"]]
    state = json.loads((sweep_dir / "state.json").read_text())["runs"]
    assert len(state) == 4 and all(s["status"] == "completed" for s in state.values())


def test_launched_sweep_runs_once_on_the_main_process(tmp_path, monkeypatch):
    """Under torchrun/accelerate launch: rank 0 runs N single-process workers, others nothing."""
    path = _sweep_file(tmp_path, {"seeds": [1, 2]})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("RANK", "1")
    idle = FakeTrainer({})
    run_compare(path, [], launch=idle)
    assert idle.calls == [] and not (tmp_path / "sweep").exists()

    monkeypatch.setenv("RANK", "0")
    envs = []

    class Recording(FakeTrainer):
        def __call__(self, run, config_path, log_path, env):
            envs.append(env)
            return super().__call__(run, config_path, log_path, env)

    main = Recording({})
    run_compare(path, [], launch=main)
    assert sorted(main.calls) == sorted(r.id for r in load_sweep(path).runs)
    # each run is its own single-process job: no inherited process group
    assert all("WORLD_SIZE" not in e and "MASTER_PORT" not in e for e in envs)
    assert all(e.get("OMP_NUM_THREADS") for e in envs)  # 2 CPU workers share the cores


def test_causal_lm_sweeps_are_refused_before_training(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    base = {"model": {"name_or_path": "unused"}, "data": {"path": str(data)}}
    path = _sweep_file(tmp_path, {"seeds": [1]}, base=base)
    launcher = FakeTrainer({})
    with pytest.raises(ConfigError, match=r"full/k8/seed1 is causal-LM instruction tuning"):
        run_compare(path, [], launch=launcher)
    assert launcher.calls == [] and not (tmp_path / "sweep" / "sweep.yaml").exists()


def test_data_errors_name_the_sweep_keys_but_not_file_names():
    from lorafit.sweep import _sweep_keys

    message = _sweep_keys(
        "/in/data.csv: no column 'mood' (data.label); data.k_shot=100 is more than a class "
        "has; or data.k_shot_unit=total; see data.tsv"
    )
    assert message == (
        "/in/data.csv: no column 'mood' (base.data.label); sweep.k_shots=100 is more than a "
        "class has; or sweep.k_shot_unit=total; see data.tsv"
    )


def test_data_mistakes_are_one_error_before_any_run(tmp_path):
    data = tmp_path / "reviews.csv"
    rows = [
        f"review number {i} is {'great' if i % 2 else 'bad'},{'Happy' if i % 2 else 'Sad'}"
        for i in range(40)
    ]
    data.write_text("review_body,customer_mood\n" + "\n".join(rows) + "\n")
    base = {"model": {"name_or_path": "unused"}, "data": {"path": str(data), "label": "mood"}}
    launcher = FakeTrainer({})
    with pytest.raises(ConfigError) as info:
        run_compare(_sweep_file(tmp_path, {"seeds": [1, 2]}, base=base), [], launch=launcher)
    message = str(info.value)
    assert message.startswith("full/k8/seed1: ") and "no column 'mood' (base.data.label)" in message
    base["data"].update(label="customer_mood", text="review_body")
    with pytest.raises(ConfigError) as info:
        run_compare(_sweep_file(tmp_path, {"k_shots": [100]}, base=base), [], launch=launcher)
    assert "sweep.k_shots" in str(info.value) and "data.k_shot" not in str(info.value).replace(
        "sweep.k_shots", ""
    )
    assert launcher.calls == [] and not (tmp_path / "sweep" / "sweep.yaml").exists()


def test_report_refuses_finished_causal_lm_runs(tmp_path):
    # a hub dataset's task is only known from its runs' summaries
    path = _sweep_file(tmp_path, {"seeds": [1]})
    run_compare(path, [], launch=FakeTrainer({}))
    sweep = load_sweep(path)
    summary = json.loads((sweep.runs[0].dir / "summary.json").read_text())
    write_json(sweep.runs[0].dir / "summary.json", {**summary, "task": "causal_lm"})
    with pytest.raises(ConfigError, match="causal-LM instruction tuning"):
        run_compare(path, [], report_only=True)
