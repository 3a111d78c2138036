"""Tables, statistics and plots of a `lorafit compare` sweep, read back from its run directories.

Everything here is recomputed from the run directories (summary.json, predictions/test.jsonl)
and `state.json`, so `--report-only` rebuilds the same report at any time. Statistics come from
`lorafit.metrics` (mean_ci, hierarchical_paired_test); only Holm's step-down correction lives
here.

Protocol, in the order it is applied:
1. Grid search: per (method, K, seed), the grid point with the best validation metric is kept
   (ties: lower validation loss, then grid order). Test metrics never take part. A choice made
   while other grid points crashed or have not run is flagged: it may change once they finish.
2. Failed runs (Mosbach et al. 2021): a kept run whose validation accuracy (of the weights it
   tested) is at or below the validation set's majority-class rate is `failed`: listed apart,
   never in the metric means. So is a run whose refit diverged (train.refit: its
   training-sample accuracy ended more than 10 points under the monitored run's).
3. Per method x K over the `ok` seeds: mean, sample std, Student-t CI across seeds, the mean of
   the per-run bootstrap CIs, gap and ECE; cost over the `ok` and `failed` seeds.
4. Paired test against the baseline at the same K, over the seeds where both runs are ok and
   the test rows both predicted: Δ is the mean over seeds of the per-seed difference; its CI and
   bootstrap p-value resample seeds and test rows (two levels), and the permutation test swaps
   whole runs per seed. Holm-Bonferroni adjusts the chosen p-values over all comparisons in the
   table.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from lorafit.errors import ConfigError
from lorafit.io import read_jsonl, write_text, write_with
from lorafit.rundir import RunDir, flat_settings, read_summary

if TYPE_CHECKING:
    from lorafit.sweep import Run, Sweep

_STATUSES = ("ok", "failed", "crashed", "pending")
_UNFINISHED = ("crashed", "pending")
# Valid range of the sweep metrics (accuracy, f1_macro): intervals across seeds are clipped to it
METRIC_RANGE = (0.0, 1.0)
PLOTS = {
    "metric_vs_k": "test {metric} vs K (mean and CI across seeds)",
    "gap_vs_k": "generalisation gap vs K",
    "ece_vs_k": "calibration (ECE) vs K",
    "params_vs_metric": "trainable parameters vs test {metric}",
}


# ----------------------------------------------------------------------------------- statistics
def _few_seeds_note(paired_seeds: int) -> str:
    """What a Δ over so few seeds can say (docs/comparisons.md has the simulation)."""
    if paired_seeds <= 1:
        return ": test rows only"
    return ": indicative only" if paired_seeds == 2 else ""


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1), in input order; a
    missing (NaN) p-value counts as 1, never as significant."""
    p = np.nan_to_num(np.asarray(p_values, dtype=np.float64), nan=1.0)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, (m - rank) * p[index])
        adjusted[index] = min(1.0, running)
    return adjusted.tolist()


def seed_stats(values: list[float], level: float) -> dict[str, float]:
    """Mean, sample std and Student-t CI across seeds (NaN where undefined).

    The CI is clipped to METRIC_RANGE: a 2-seed t-interval can span [-0.3, 1.9], and an accuracy
    above 1 is not a plausible value."""
    from lorafit.metrics import mean_ci

    nan = float("nan")
    if not values:
        return {"mean": nan, "std": nan, "ci_low": nan, "ci_high": nan}
    ci = mean_ci(values, level=level)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else nan
    low, high = np.clip([ci.low, ci.high], *METRIC_RANGE)  # NaN stays NaN
    return {"mean": ci.estimate, "std": std, "ci_low": float(low), "ci_high": float(high)}


# ------------------------------------------------------------------------------- run collection
def collect_runs(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per run: settings, status, validation and test metrics, gap, cost."""
    from lorafit.sweep import SweepState, causal_lm_error, hp_label, run_status

    state = SweepState(sweep.dir / "state.json")
    metric = sweep.config.metric
    varying = _varying_settings(sweep.runs)
    rows = []
    for run in sweep.runs:
        status = run_status(run, state, check_data=False)  # data: checked by run_compare
        summary = read_summary(run.dir)
        if status == "completed" and summary.get("task") == "causal_lm":
            raise causal_lm_error(sweep, run.id)
        launched = state.get(run)
        row: dict[str, Any] = {
            "run_id": run.id,
            "method": run.method,
            "k_shot": run.k_shot,
            "k_shot_unit": run.config.data.k_shot_unit,
            "seed": run.seed,
            "hp": hp_label(run.hp),
            "selected": False,
            "status": "pending",
            "error": "",
        }
        if status == "completed":
            row.update(_summary_fields(summary, _validation_of_tested_weights(run), metric))
            row["validation_majority_rate"] = validation_majority_rate(run, summary)
            # the level of the run's own bootstrap CI (eval.ci_level), not the sweep's
            row["test_ci_level"] = (summary.get("test") or {}).get(
                "ci_level", run.config.eval.ci_level
            )
            row["status"] = "failed" if _is_failed(row) else "ok"
        elif status == "crashed":
            row["status"] = "crashed"
            row["error"] = launched.get("error") or ""
        row["process_time_s"] = launched.get("process_time_s")
        row.update({f"cfg.{key}": _setting(run, key) for key in varying})
        row["run_dir"] = str(run.dir)
        rows.append(row)
    _select_grid_points(rows, metric)
    return rows


def _validation_of_tested_weights(run: Run) -> dict:
    """Validation metrics of the weights that were tested: the best step's, or the last one's
    when the run kept its last weights (train.select_best=false)."""
    summary = read_summary(run.dir)
    if summary.get("validation_at_selected"):
        return summary["validation_at_selected"]
    if summary.get("selected") == "last":
        rows = read_jsonl(RunDir(run.dir).metrics)
        return rows[-1].get("validation", {}) if rows else {}
    return summary.get("best_validation") or {}


def _summary_fields(summary: dict, validation: dict, metric: str) -> dict[str, Any]:
    test = summary.get("test") or {}
    train_sample = summary.get("train_sample_at_selected") or {}
    refit = summary.get("refit") or {}  # the tested model was trained again (train.refit)
    ci = (test.get("ci") or {}).get(metric) or [None, None]
    wall, eval_s = summary.get("wall_time_s"), summary.get("eval_time_s")
    return {
        f"validation_{metric}": validation.get(metric),
        "validation_accuracy": validation.get("accuracy"),
        "validation_loss": validation.get("loss"),
        f"test_{metric}": test.get(metric),
        "test_accuracy": test.get("accuracy"),
        "test_f1_macro": test.get("f1_macro"),
        "test_nll": test.get("nll"),
        "test_ece": test.get("ece"),
        f"test_{metric}_ci_low": ci[0],
        f"test_{metric}_ci_high": ci[1],
        # train-sample metric minus test metric, both with the selected weights
        f"gap_{metric}": _minus(train_sample.get(metric), test.get(metric)),
        "gap_loss": _minus(test.get("loss"), train_sample.get("loss")),
        "trainable_params": summary.get("trainable_params"),
        "total_params": summary.get("total_params"),
        "adapter_bytes": summary.get("adapter_bytes"),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "peak_cuda_memory_mb": summary.get("peak_cuda_memory_mb"),
        "wall_time_s": wall,
        "eval_time_s": eval_s,
        "eval_share": eval_s / wall if wall and eval_s is not None else None,
        "examples_per_s": summary.get("examples_per_s"),
        "best_step": summary.get("best_step"),
        "stopped_at_step": summary.get("stopped_at_step"),
        "num_train": summary.get("num_train"),
        # rows the tested model was refit on (train + validation; train.refit), else None
        "refit_num_train": refit.get("num_train"),
        "refit_diverged": bool(refit.get("diverged")),
        "num_validation": summary.get("num_validation"),
        "num_test": summary.get("num_test"),
        "num_classes": len(summary.get("label_names") or []) or None,
    }


def _minus(a, b):
    return None if a is None or b is None else a - b


def _is_failed(row: dict) -> bool:
    if row.get("refit_diverged"):  # the tested model is the refit, which validation never saw
        return True
    accuracy, majority = row.get("validation_accuracy"), row.get("validation_majority_rate")
    return accuracy is not None and majority is not None and accuracy <= majority + 1e-12


def validation_majority_rate(run: Run, summary: dict) -> float | None:
    """Share of the validation set's most frequent class (the Mosbach et al. failure line)."""
    counts = summary.get("validation_label_counts")
    if counts:
        return max(counts) / sum(counts)
    return _majority_from_data(json.dumps(run.config.data.__dict__, sort_keys=True, default=str))


@functools.cache
def _majority_from_data(data_json: str) -> float | None:
    """Rebuild the run's validation split (same data config, same seed) and count its labels."""
    from lorafit.config import DataConfig, from_dict
    from lorafit.data import load_task_data
    from lorafit.errors import LorafitError

    try:
        data = load_task_data(from_dict(DataConfig, json.loads(data_json)), "classification")
    except LorafitError:
        return None
    counts = np.bincount(np.asarray(data.validation["label"], dtype=np.int64))
    return float(counts.max() / counts.sum()) if counts.sum() else None


def _select_grid_points(rows: list[dict], metric: str) -> None:
    """Per (method, K, seed) keep the best grid point on validation; test never decides.

    The kept run records how many of the other grid points were crashed or pending when it was
    chosen (grid_crashed, grid_pending): with those, the choice may change.
    """
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        row["grid_crashed"] = row["grid_pending"] = 0
        cells.setdefault((row["method"], row["k_shot"], row["seed"]), []).append(row)
    for variants in cells.values():
        finished = [r for r in variants if r["status"] in ("ok", "failed")]
        if finished:
            best = max(
                finished,
                key=lambda r: (
                    _number(r.get(f"validation_{metric}"), -math.inf),
                    -_number(r.get("validation_loss"), math.inf),
                ),
            )  # max() keeps the first of equals: grid order breaks the last ties
            best["grid_crashed"] = sum(r["status"] == "crashed" for r in variants)
            best["grid_pending"] = sum(r["status"] == "pending" for r in variants)
        else:
            best = next((r for r in variants if r["status"] == "crashed"), variants[0])
        best["selected"] = True


def _number(value, default: float) -> float:
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _varying_settings(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between runs (plus the method name): the 'settings'."""
    flat = [flat_settings(run.config.to_dict()) for run in runs]
    skip = {"output.dir", "data.seed", "train.seed", "data.k_shot", "data.k_shot_unit"}
    keys = [k for k in flat[0] if k not in skip and len({json.dumps(f[k]) for f in flat}) > 1]
    return ["method.name", *[k for k in keys if k != "method.name"]]


def _setting(run: Run, key: str) -> Any:
    value = flat_settings(run.config.to_dict())[key]
    return json.dumps(value) if isinstance(value, (list, dict)) else value


# ------------------------------------------------------------------------------------ summary
def summarise(sweep: Sweep, rows: list[dict]) -> list[dict[str, Any]]:
    """One row per method x K over the selected runs, with the paired test against baseline."""
    cfg = sweep.config
    metric = cfg.metric
    kept = [r for r in rows if r["selected"]]
    by_cell = {(r["method"], r["k_shot"], r["seed"]): r for r in kept}
    table = []
    for method in cfg.methods:
        for k in cfg.k_shots:
            cell_rows = [r for r in kept if r["method"] == method and r["k_shot"] == k]
            ok = [r for r in cell_rows if r["status"] == "ok"]
            # a failed run is left out of the quality means, but its cost was real and known
            finished = [r for r in cell_rows if r["status"] in ("ok", "failed")]
            stats = seed_stats([r[f"test_{metric}"] for r in ok], cfg.ci_level)
            levels = {r["test_ci_level"] for r in ok}
            entry: dict[str, Any] = {
                "method": method,
                "k_shot": k,
                "n_seeds": len(cell_rows),
                "n_ok": len(ok),
                "n_failed": sum(r["status"] == "failed" for r in cell_rows),
                "n_crashed": sum(r["status"] == "crashed" for r in cell_rows),
                "n_pending": sum(r["status"] == "pending" for r in cell_rows),
                # seeds whose grid point was chosen while other grid points had not finished
                "n_grid_incomplete": sum(
                    r["grid_crashed"] + r["grid_pending"] > 0 for r in cell_rows
                ),
                "n_grid_crashed": sum(r["grid_crashed"] for r in cell_rows),
                "n_grid_pending": sum(r["grid_pending"] for r in cell_rows),
                f"{metric}_mean": stats["mean"],
                f"{metric}_std": stats["std"],
                f"{metric}_ci_low": stats["ci_low"],
                f"{metric}_ci_high": stats["ci_high"],
                "bootstrap_ci_low_mean": _mean(ok, f"test_{metric}_ci_low"),
                "bootstrap_ci_high_mean": _mean(ok, f"test_{metric}_ci_high"),
                "bootstrap_ci_level": levels.pop() if len(levels) == 1 else None,
                "gap_mean": _mean(ok, f"gap_{metric}"),
                "gap_std": _std(ok, f"gap_{metric}"),
                "ece_mean": _mean(ok, "test_ece"),
                "ece_std": _std(ok, "test_ece"),
                "nll_mean": _mean(ok, "test_nll"),
                "trainable_params": _median(finished, "trainable_params"),
                "adapter_bytes": _median(finished, "adapter_bytes"),
                "peak_memory_mb": _mean(finished, "peak_memory_mb"),
                "peak_cuda_memory_mb": _mean(finished, "peak_cuda_memory_mb"),
                "wall_time_s": _mean(finished, "wall_time_s"),
                "eval_share": _mean(finished, "eval_share"),
                "process_time_s": _mean(finished, "process_time_s"),
            }
            if method != cfg.baseline:
                entry.update(_paired_against_baseline(sweep, by_cell, method, k))
            table.append(entry)
    primary = f"p_{cfg.paired_test}"
    tested = [e for e in table if e.get(primary) is not None]
    for entry, adjusted in zip(tested, holm([e[primary] for e in tested])):
        entry["p_holm"] = adjusted
    return table


def _check_same_test_labels(
    tested: dict[int, tuple[int, str]], predictions: dict[int, tuple[int, int]], run_id: str
) -> None:
    """Paired tests match test rows by number across runs: one row with two labels means the
    runs were tested on different data (a file edited between runs made before lorafit
    recorded data hashes)."""
    for row, (label, _) in predictions.items():
        seen, other = tested.setdefault(row, (label, run_id))
        if seen != label:
            raise ConfigError(
                f"test row {row} has label {seen} in run {other} and {label} in run {run_id}: "
                "the runs were tested on different data; rerun the sweep into a new sweep.dir"
            )


def _paired_against_baseline(sweep: Sweep, by_cell: dict, method: str, k: int) -> dict:
    """Paired test over the seeds where both runs are ok, on the test rows both runs predicted:
    seed spread plus a bootstrap over test rows, and a permutation test that swaps whole runs
    per seed (`lorafit.metrics.hierarchical_paired_test`)."""
    from lorafit import metrics as M

    cfg = sweep.config
    rows, labels, preds_method, preds_baseline = [], [], [], []
    num_classes, refit_differs = None, 0
    tested: dict[int, tuple[int, str]] = {}  # test row -> (label, the first run that had it)
    for seed in cfg.seeds:
        a, b = by_cell.get((method, k, seed)), by_cell.get((cfg.baseline, k, seed))
        if not a or not b or a["status"] != "ok" or b["status"] != "ok":
            continue
        # one side trained on train + validation (twice the labels at K-shot), the other not
        refit_differs += bool(a.get("refit_num_train")) != bool(b.get("refit_num_train"))
        pa, pb = _predictions(a["run_dir"]), _predictions(b["run_dir"])
        common = sorted(set(pa) & set(pb))
        if not common:
            continue
        _check_same_test_labels(tested, pa, a["run_id"])
        _check_same_test_labels(tested, pb, b["run_id"])
        rows.append(common)
        labels.append([pa[row][0] for row in common])
        preds_method.append([pa[row][1] for row in common])
        preds_baseline.append([pb[row][1] for row in common])
        num_classes = max(num_classes or 0, a.get("num_classes") or 0) or None
    if not rows:
        return {"paired_seeds": 0}
    test = M.hierarchical_paired_test(
        rows,
        labels,
        preds_method,
        preds_baseline,
        metric=cfg.metric,
        num_classes=num_classes,
        n_resamples=cfg.n_resamples,
        level=0.95,
        seed=0,
    )
    return {
        "paired_seeds": len(rows),
        "refit_differs": refit_differs,
        "paired_test_rows": len(set().union(*rows)),
        "paired_examples": sum(len(seed_rows) for seed_rows in rows),
        "delta": test.difference,
        "delta_ci_low": test.low,
        "delta_ci_high": test.high,
        "delta_seed_min": min(test.seed_differences),
        "delta_seed_max": max(test.seed_differences),
        "p_bootstrap": test.p_bootstrap,
        "p_permutation": test.p_permutation,
    }


def _predictions(run_dir: str) -> dict[int, tuple[int, int]]:
    """test row -> (label, predicted label)."""
    rows = read_jsonl(RunDir(Path(run_dir)).predictions)
    return {int(r["row"]): (int(r["label"]), int(r["pred"])) for r in rows if "pred" in r}


def _values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def _mean(rows, key) -> float:
    values = _values(rows, key)
    return float(np.mean(values)) if values else float("nan")


def _std(rows, key) -> float:
    values = _values(rows, key)
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _median(rows, key) -> float:
    values = _values(rows, key)
    return float(np.median(values)) if values else float("nan")


# ------------------------------------------------------------------------------------- writing
def write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_value(row.get(c)) for c in columns})
    write_text(path, buffer.getvalue())


def _csv_value(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    return value


def _fmt(value, digits=3, unit="") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}{unit}"


def _fmt_count(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def _fmt_bytes(value) -> str:
    text = _fmt_count(value)
    return text if text == "–" else f"{text}B"


def _fmt_p(value) -> str:
    if value is None:
        return "–"
    # 3 digits: 0.0496 must not print as 0.05 beside the rule "p < 0.05"
    return f"{value:.3g}" if value >= 0.001 else "<0.001"


def _baseline_note(cfg: Any, table: list[dict]) -> str:
    """Why Δ cells are blank: the baseline has no ok run at some K (all failed or not run)."""
    empty = [e["k_shot"] for e in table if e["method"] == cfg.baseline and not e["n_ok"]]
    if not empty:
        return ""
    at = ", ".join(map(str, empty))
    return f" It has no ok run at K = {at}, so there are no paired tests (Δ –) there."


def summary_markdown(sweep: Sweep, rows: list[dict], table: list[dict]) -> str:
    cfg = sweep.config
    metric, level = cfg.metric, _pct_text(cfg.ci_level)
    counts = {s: sum(r["status"] == s for r in rows) for s in _STATUSES}
    finished = [r for r in rows if r["status"] != "pending"]
    kept = sum(r["selected"] for r in finished)
    grid_note = (
        f" The tables keep {kept} of the {len(finished)} finished runs, per method, K and seed "
        "the grid point best on validation."
        if kept < len(finished)
        else ""
    )
    # each run's bootstrap CI has the run's own level (eval.ci_level), whatever sweep.ci_level is
    run_levels = sorted({r["test_ci_level"] for r in rows if r["selected"] and r["status"] == "ok"})
    if len(run_levels) == 1:
        bootstrap_head = f"mean per-run {_pct_text(run_levels[0])} bootstrap CI"
        bootstrap_note = f"each run's {_pct_text(run_levels[0])} bootstrap CI"
    else:
        differ = f" (levels differ: {', '.join(map(_pct_text, run_levels))})" if run_levels else ""
        bootstrap_head = f"mean per-run bootstrap CI{differ}"
        bootstrap_note = "each run's bootstrap CI (at the level shown in the cell)"
    lines = [
        f"# {metric} on test: {len(cfg.methods)} methods x K in {cfg.k_shots} "
        f"({cfg.k_shot_unit.replace('_', ' ')}) x {len(cfg.seeds)} seeds",
        "",
        f"Seeds {cfg.seeds}. Runs: {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['crashed']} crashed, {counts['pending']} not run yet.{grid_note} "
        f"Baseline for the paired tests: **{cfg.baseline}**.{_baseline_note(cfg, table)}",
        "",
        f"| method | K | ok / failed / crashed | {metric} mean ± std | {level} CI across seeds "
        f"| {bootstrap_head} | gap (train − test) | ECE "
        f"| Δ vs {cfg.baseline} [95% CI, seeds × test rows] | p ({cfg.paired_test}) "
        "| p (Holm) |",
        "|---|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in table:
        delta = "baseline" if e["method"] == cfg.baseline else "–"
        if e.get("delta") is not None:
            delta = (
                f"{e['delta']:+.3f} [{e['delta_ci_low']:+.3f}, {e['delta_ci_high']:+.3f}] "
                f"({_plural(e['paired_seeds'], 'seed')}{_few_seeds_note(e['paired_seeds'])})"
            )
            if e.get("refit_differs"):
                delta += " ‡"
        bootstrap = f"[{_fmt(e['bootstrap_ci_low_mean'])}, {_fmt(e['bootstrap_ci_high_mean'])}]"
        if len(run_levels) > 1 and e["n_ok"]:
            cell_level = e["bootstrap_ci_level"]
            bootstrap += f" at {_pct_text(cell_level)}" if cell_level else " (mixed levels)"
        lines.append(
            f"| {e['method']} | {e['k_shot']} | {_status_counts(e)} "
            f"| {_fmt(e[f'{metric}_mean'])} ± {_fmt(e[f'{metric}_std'])} "
            f"| [{_fmt(e[f'{metric}_ci_low'])}, {_fmt(e[f'{metric}_ci_high'])}] "
            f"| {bootstrap} "
            f"| {_fmt(e['gap_mean'])} ± {_fmt(e['gap_std'])} "
            f"| {_fmt(e['ece_mean'])} ± {_fmt(e['ece_std'])} "
            f"| {delta} | {_fmt_p(e.get(f'p_{cfg.paired_test}'))} | {_fmt_p(e.get('p_holm'))} |"
        )
    m = sum(e.get("p_holm") is not None for e in table)
    lines.append("")
    if any(r.get("refit_num_train") for r in rows if r["selected"]):
        lines.append(
            "- **refit**: runs with train.refit (the K-shot default of lora, qlora, full and "
            "head) were trained again on train + validation after the monitored run: their "
            "test metric, gap and ECE are of that model; validation (and the failed-run check) "
            "is of the monitored run."
        )
    if any(e.get("refit_differs") for e in table):
        lines.append(
            "- **‡ refit differs**: one side of this comparison was refit on train + validation "
            "and the other was not (train.refit is on by default for lora, qlora, full and head "
            "only), so Δ mixes the method with twice the labels; set base.train.refit the same "
            "for every method to compare the methods alone."
        )
    if any(e["n_grid_incomplete"] for e in table):
        lines.append(
            "- **grid incomplete**: in some seeds the grid point was chosen among the ones that "
            "finished while others had crashed or not run yet (counted in the cell); the choice "
            "may change once they finish (--retry-failed reruns crashed runs)."
        )
    lines += [
        f"- **mean ± std**: over the ok seeds (sample std). **{level} CI across seeds**: "
        "Student-t interval of the mean over seeds (training and sampling randomness). "
        f"**Per-run bootstrap CI**: the mean of {bootstrap_note} over its test "
        "examples (test-set noise only; the level is the runs' eval.ci_level).",
        "- **gap**: train-sample metric minus test metric with the selected weights; "
        "**ECE**: top-label expected calibration error on test (after the run's "
        "validation temperature, train.calibration).",
        f"- **Δ and p**: paired comparison of the method with {cfg.baseline} at the same K, "
        "over the seeds where both runs are ok, on the test rows both predicted. Δ is the mean "
        "over those seeds of the per-seed difference. Its 95% CI and the bootstrap p-value "
        "add the spread between seeds (K-shot sample and training; Student t) to the "
        f"test-set sampling (a bootstrap of the test rows, {cfg.n_resamples} resamples, each "
        "row once for all seeds). With 2 paired seeds they are indicative only (a simulated "
        "null came out significant 13% of the time at 5%; 7% with 3 seeds, 5% with 5 or "
        "more). The permutation test swaps "
        "the two runs of a seed as a whole (under the null either could carry either name); "
        "with S seeds its p-value cannot go below 2/2^S (0.0625 for 5 seeds). With one paired "
        "seed there are no seeds to redraw: the CI and the bootstrap p-value cover the test "
        "rows only, and say nothing about another K-shot sample or training run.",
        f"- **Multiple comparisons**: {_plural(m, 'comparison')} in this table; Holm-Bonferroni "
        "adjusted "
        f"p-values (of the {cfg.paired_test} test) control the family-wise error rate. "
        "Read a difference as significant at 5% only if p (Holm) < 0.05.",
        "- **Failed runs** (validation accuracy of the tested weights at or below the "
        "majority-class rate of the validation set, Mosbach et al. 2021, or a refit whose "
        "training-sample accuracy ended more than 10 points under the monitored run's) of the "
        "kept grid points, and crashed runs of every grid point, are listed below and are not "
        "in the means.",
        "",
        "## Cost",
        "",
        "| method | K | trainable params | adapter | peak memory (RSS) | peak GPU memory "
        "| wall time / run | eval share | process time / run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in table:
        lines.append(
            f"| {e['method']} | {e['k_shot']} | {_fmt_count(e['trainable_params'])} "
            f"| {_fmt_bytes(e['adapter_bytes'])} | {_fmt(e['peak_memory_mb'], 0, ' MB')} "
            f"| {_fmt(e['peak_cuda_memory_mb'], 0, ' MB')} | {_fmt(e['wall_time_s'], 1, ' s')} "
            f"| {_fmt(_pct(e['eval_share']), 0, '%')} | {_fmt(e['process_time_s'], 1, ' s')} |"
        )
    lines += [
        "",
        "Cost is over the finished runs, failed ones included (their cost was real). "
        "Wall time: the run's training loop with its periodic evaluations, then the final "
        "train-sample and test evaluations (summary.json wall_time_s; not saving). Eval share: "
        "eval_time_s / wall_time_s, where eval_time_s is the time of all those evaluations, so "
        "both count the same final ones. Process time: the whole `lorafit train` process "
        "(start-up, data and model loading, training, test, saving). Adapter: the saved weight "
        "files (the tokenizer and configs saved beside them are not counted).",
    ]
    lines += _run_list(rows, "failed", metric)
    lines += _run_list(rows, "crashed", metric)
    lines += _run_list(rows, "pending", metric)
    return "\n".join(lines) + "\n"


def _pct(value):
    return None if value is None or math.isnan(value) else 100 * value


def _pct_text(level: float) -> str:
    return f"{100 * level:.3g}%"


def _status_counts(e: dict) -> str:
    """`2 / 0 / 1 (+1 pending), grid incomplete: 2 crashed, 1 not run` for a table cell."""
    text = f"{e['n_ok']} / {e['n_failed']} / {e['n_crashed']}"
    if e["n_pending"]:
        text += f" (+{e['n_pending']} pending)"
    if e["n_grid_incomplete"]:
        unfinished = [f"{e['n_grid_crashed']} crashed"] if e["n_grid_crashed"] else []
        unfinished += [f"{e['n_grid_pending']} not run"] if e["n_grid_pending"] else []
        text += f", grid incomplete: {', '.join(unfinished)}"
    return text


def _run_list(rows: list[dict], status: str, metric: str) -> list[str]:
    # failed: the kept runs only (results); crashed and pending: every grid point (to rerun)
    chosen = [r for r in rows if r["status"] == status and (r["selected"] or status in _UNFINISHED)]
    if not chosen:
        return []
    if status == "failed":
        out = [
            "",
            "## Failed runs (not averaged)",
            "",
            "| run | validation accuracy | majority-class rate | refit diverged | test "
            + metric
            + " |",
            "|---|---:|---:|:---:|---:|",
        ]
        out += [
            f"| {r['run_id']} | {_fmt(r['validation_accuracy'])} "
            f"| {_fmt(r['validation_majority_rate'])} | {'yes' if r.get('refit_diverged') else ''} "
            f"| {_fmt(r[f'test_{metric}'])} |"
            for r in chosen
        ]
    elif status == "crashed":
        out = ["", "## Crashed runs (not averaged; rerun with --retry-failed)", ""]
        out += ["| run | error |", "|---|---|"]
        out += [f"| {r['run_id']} | {r['error'].replace('|', '/')} |" for r in chosen]
    else:
        out = ["", "## Not run yet", "", ", ".join(r["run_id"] for r in chosen)]
    return out


# --------------------------------------------------------------------------------------- plots
def write_plots(sweep: Sweep, rows: list[dict], table: list[dict]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = sweep.config
    metric = cfg.metric
    ks = cfg.k_shots
    colours = {m: f"C{i}" for i, m in enumerate(cfg.methods)}
    unit = "per class" if cfg.k_shot_unit == "per_class" else "in total"
    paths = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = sweep.dir / f"{name}.png"
        write_with(path, lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
        paths[name] = path

    def dodge(i: int) -> float:
        """x factor that keeps the error bars of the methods apart on the log2 K axis."""
        return 2 ** (0.04 * (i - (len(cfg.methods) - 1) / 2))

    def by_k_axes(title: str, ylabel: str):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        if len(ks) == 1:  # one octave around K, or the dodged methods fill the whole width
            ax.set_xlim(ks[0] / 2**0.5, ks[0] * 2**0.5)
        ax.set_xlabel(f"K (labels {unit})")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        return fig, ax

    # test metric vs K: mean with the CI across seeds (a band; error bars for a single K, where
    # a band has no width), each ok seed as a dot, failed as x
    fig, ax = by_k_axes(PLOTS["metric_vs_k"].format(metric=metric), f"test {metric}")
    for i, method in enumerate(cfg.methods):
        cells = [e for e in table if e["method"] == method]
        x = [e["k_shot"] for e in cells]
        mean = [e[f"{metric}_mean"] for e in cells]
        low = [e[f"{metric}_ci_low"] for e in cells]
        high = [e[f"{metric}_ci_high"] for e in cells]
        if len(ks) == 1:
            ax.errorbar(
                [k * dodge(i) for k in x],
                mean,
                yerr=_error_bar_lengths(mean, low, high),
                fmt="o",
                capsize=4,
                color=colours[method],
                label=method,
            )
        else:
            ax.plot(x, mean, "-o", color=colours[method], label=method)
            ax.fill_between(x, low, high, color=colours[method], alpha=0.15)
        # seeds just right of their mean and on top of it, so that bars do not hide them
        beside = (dodge(i) if len(ks) == 1 else 1) * 2**0.012
        for status, style in (
            ("ok", {"marker": "o", "s": 16, "edgecolors": "white", "linewidths": 0.5}),
            ("failed", {"marker": "x", "s": 40, "linewidths": 1.5}),
        ):
            points = [
                (r["k_shot"] * beside, r[f"test_{metric}"])
                for r in rows
                if r["selected"] and r["method"] == method and r["status"] == status
            ]
            if points:
                ax.scatter(*zip(*points), color=colours[method], alpha=0.8, zorder=3, **style)
    shown_as = "bars" if len(ks) == 1 else "band"
    ax.legend(title=f"{shown_as}: {_pct_text(cfg.ci_level)} CI; x: failed run", fontsize=8)
    save(fig, "metric_vs_k")

    for name, key, ylabel in (
        ("gap_vs_k", "gap", f"train − test {metric}"),
        ("ece_vs_k", "ece", "test ECE"),
    ):
        fig, ax = by_k_axes(PLOTS[name], ylabel)
        for i, method in enumerate(cfg.methods):
            cells = [e for e in table if e["method"] == method]
            ax.errorbar(
                [e["k_shot"] * dodge(i) for e in cells],
                [e[f"{key}_mean"] for e in cells],
                yerr=[0.0 if math.isnan(e[f"{key}_std"]) else e[f"{key}_std"] for e in cells],
                fmt="-o",
                capsize=3,
                color=colours[method],
                # all failed: in the legend (its colour), not silently absent from the axes
                label=method if any(e["n_ok"] for e in cells) else f"{method} (no ok run)",
            )
        if key == "gap":
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.legend(title="mean ± std over seeds", fontsize=8)
        save(fig, name)

    # cost vs quality: one point per method x K, bigger markers for bigger K
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in cfg.methods:
        cells = [e for e in table if e["method"] == method and not math.isnan(e[f"{metric}_mean"])]
        for e in cells:
            low, high = e[f"{metric}_ci_low"], e[f"{metric}_ci_high"]
            ax.errorbar(
                e["trainable_params"],
                e[f"{metric}_mean"],
                yerr=_error_bar_lengths([e[f"{metric}_mean"]], [low], [high]),
                fmt="o",
                markersize=4 + 2 * ks.index(e["k_shot"]),
                capsize=3,
                color=colours[method],
                label=method if e is cells[0] else None,
            )
            ax.annotate(
                f"K={e['k_shot']}",
                (e["trainable_params"], e[f"{metric}_mean"]),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=7,
            )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(PLOTS["params_vs_metric"].format(metric=metric))
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save(fig, "params_vs_metric")
    return paths


def _error_bar_lengths(mean, low, high) -> np.ndarray:
    """matplotlib's yerr ([below], [above]) for intervals around the means; 0 where undefined."""
    lengths = np.array([np.subtract(mean, low), np.subtract(high, mean)], dtype=float)
    return np.nan_to_num(np.clip(lengths, 0.0, None))


# -------------------------------------------------------------------------------------- report
def write_report(sweep: Sweep) -> Path:
    """runs.csv, summary.csv, summary.md, the four plots and report.md; returns report.md."""
    rows = collect_runs(sweep)
    table = summarise(sweep, rows)
    write_csv(sweep.dir / "runs.csv", rows)
    write_csv(sweep.dir / "summary.csv", table)
    summary_md = summary_markdown(sweep, rows, table)
    what_if = _what_if_note(sweep)
    if what_if:  # under the title, where a reader of the tables sees it first
        title, rest = summary_md.split("\n", 1)
        summary_md = f"{title}\n\n{what_if}\n{rest}"
    write_text(sweep.dir / "summary.md", summary_md)
    plots = write_plots(sweep, rows, table)
    metric = sweep.config.metric
    body = summary_md.split("\n", 1)[1]  # the report has its own title
    lines = [
        f"# Comparison report: {sweep.dir.name}",
        "",
        f"Rebuild with `lorafit compare {shlex.quote(str(sweep.dir / 'sweep.yaml'))} --report-only`. "
        "Files: [runs.csv](runs.csv) (one row per run), [summary.csv](summary.csv), "
        "[summary.md](summary.md), [sweep.yaml](sweep.yaml) (the resolved sweep), "
        "[state.json](state.json) (launch status and errors), `logs/` (each run's output).",
        body,
        "## Plots",
        "",
    ]
    for name, path in plots.items():
        title = PLOTS[name].format(metric=metric)
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    lines += ["## Runs", "", "| run | status | selected | test " + metric + " | curve |"]
    lines += ["|---|---|:---:|---:|---|"]
    for r in rows:
        rel = Path(r["run_dir"]).relative_to(sweep.dir.absolute())
        curve = RunDir(rel).learning_curve
        link = f"[learning curve]({curve})" if (sweep.dir / curve).exists() else "–"
        lines.append(
            f"| [{r['run_id']}]({rel}) | {r['status']} | {'yes' if r['selected'] else ''} "
            f"| {_fmt(r.get(f'test_{metric}'))} | {link} |"
        )
    path = sweep.dir / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _what_if_note(sweep: Sweep) -> str:
    """A `--report-only` what-if (other seeds, another metric) rewrites the tables but not
    sweep.yaml: say which settings differ from the recorded ones, and how to restore."""
    from lorafit.sweep import _plain

    recorded_path = sweep.dir / "sweep.yaml"
    if not recorded_path.exists():
        return ""
    recorded = (yaml.safe_load(recorded_path.read_text()) or {}).get("sweep") or {}
    now = _plain(sweep.config)
    differ = [
        f"{key}: {now[key]} (sweep.yaml: {recorded[key]})"
        for key in now
        if key in recorded and _json(now[key]) != _json(recorded[key])
    ]
    if not differ:
        return ""
    restore = f"lorafit compare {shlex.quote(str(recorded_path))} --report-only"
    return (
        f"**What-if report** (`--report-only` with other settings than the sweep's record: "
        f"{'; '.join(differ)}). `{restore}` rebuilds the recorded report."
    )


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
