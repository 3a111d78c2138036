"""`lorafit` command line: train, compare, export, predict, demo, config.

`python -m lorafit`, the `lorafit` console script and `accelerate launch -m lorafit` all land
here. User mistakes (LorafitError) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lorafit.errors import LorafitError


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune one model: lorafit train CONFIG.yaml [key=value ...]"
    )
    p.add_argument("config", nargs="?", help="YAML config (optional: all keys can be overrides)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4")
    p.set_defaults(func=_cmd_train)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="method x label budget x seed sweep with statistics")
    p.add_argument("config", help="sweep YAML (see configs/compare_*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the sweep")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs that crashed before")
    p.add_argument(
        "--report-only", action="store_true", help="rebuild tables/plots from finished runs"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="runs at once (same as sweep.workers=N)"
    )
    p.set_defaults(func=_cmd_compare)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="package a run's adapter (or a merged model) for deployment")
    p.add_argument("run_dir", help="run directory (or the adapter/ folder inside one)")
    p.add_argument("--out", required=True, help="output folder (new, or empty)")
    p.add_argument(
        "--merge", action="store_true", help="write a merged full model (no PEFT needed)"
    )
    p.add_argument(
        "--tolerance",
        type=_positive_float,
        default=None,
        help="max |merged - adapter| logit difference accepted by --merge "
        "(default 1e-3 for float32 compute, 5e-2 for bf16/fp16)",
    )
    p.set_defaults(func=_cmd_export)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="batch prediction with exported adapters or runs")
    p.add_argument(
        "model_dir",
        nargs="+",
        help="exported folder, run directory or PEFT adapter folder; several (NAME=DIR) share one base",
    )
    p.add_argument(
        "--input",
        default="-",
        help="csv/tsv/jsonl/json/parquet/txt file, or - to stream stdin (default: -)",
    )
    p.add_argument(
        "--output",
        default="-",
        help="a .csv/.tsv table or a JSON-lines file (written atomically), or - for stdout "
        "(default: -; --input - streams to --output - only)",
    )
    p.add_argument(
        "--label-column",
        default=None,
        help="column of true labels: print accuracy, macro-F1, ECE and NLL with a 95%% CI",
    )
    p.add_argument("--metrics", default=None, help="write the --label-column scores as JSON here")
    p.add_argument("--adapter", default=None, help="adapter name when several are loaded")
    p.add_argument("--text-column", default=None, help="text column of csv/tsv/jsonl input")
    p.add_argument(
        "--delimiter",
        default=None,
        help="field separator of a csv/tsv input, e.g. ';' (default: ',' for .csv, tab for .tsv)",
    )
    p.add_argument(
        "--text-pair-column",
        default=None,
        help="second text column for a sentence-pair model (default: the one it was trained on)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default: 32)")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="causal LM generation length (default: 64)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="causal LM sampling temperature (default: 0 = greedy); classifiers use the "
        "calibrated probabilities the run saved",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--base-model", default=None, help="another path to the same base model")
    p.set_defaults(func=_cmd_predict)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="a short few-shot LoRA run on SST-2 with MiniLM")
    p.add_argument(
        "--data",
        default=None,
        help="SST-2 folder or file (default: $LORAFIT_DATA_DIR/sst2, then ../shared/data/sst2, "
        "then the hub's stanfordnlp/sst2)",
    )
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_cmd_demo)


def _add_config(sub) -> None:
    p = sub.add_parser(
        "config",
        help="print every config key with its default and meaning",
        description="Print every key of a run config (lorafit train: data.*, model.*, method.*, "
        "train.*, eval.*, output.*) and of a sweep file's sweep.* section (lorafit compare), "
        "with its default and meaning, then each method's defaults. Set keys in YAML or as "
        "section.key=value overrides.",
    )
    p.set_defaults(func=_cmd_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafit", description="Parameter-efficient fine-tuning when labels are few."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_compare, _add_export, _add_predict, _add_demo, _add_config):
        add(sub)
    return parser


def _split_config(args) -> tuple[str | None, list[str]]:
    """`lorafit train a=b` (no YAML) is allowed: a first positional with '=' is an override."""
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _cmd_train(args) -> int:
    from lorafit.config import load_config
    from lorafit.sweep import die_with_sweep
    from lorafit.trainer import train

    die_with_sweep()  # a run launched by `lorafit compare` ends with it
    cfg = load_config(*_split_config(args))
    summary = train(cfg)
    _print_summary(summary, cfg.output.dir)
    return 0


def _cmd_compare(args) -> int:
    from lorafit.sweep import run_compare

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"sweep.workers={args.workers}")
    result = run_compare(
        args.config, overrides, retry_failed=args.retry_failed, report_only=args.report_only
    )
    if result.crashed:  # failed (at-chance) runs are results; crashed ones are not
        n = len(result.crashed)
        print(
            f"lorafit compare: {n} run{'s' if n > 1 else ''} crashed (see the report); "
            f"rerun {'them' if n > 1 else 'it'} with --retry-failed",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_export(args) -> int:
    from lorafit.export import export_run

    out = export_run(args.run_dir, args.out, merge=args.merge, tolerance=args.tolerance)
    method = json.loads((out / "lorafit.json").read_text()).get("method")
    whole = {"full": "full model", "head": "head-only model (base + head)"}.get(method)
    if whole:  # no adapter: --merge has nothing to fold in
        what = whole + (" (no adapter: --merge had nothing to merge)" if args.merge else "")
    else:
        what = "merged model" if args.merge else "adapter"
    print(f"exported {what} to {out}")
    return 0


def _cmd_predict(args) -> int:
    from lorafit.predict import predict_cli

    return predict_cli(args)


def _cmd_demo(args) -> int:
    from lorafit.config import load_config
    from lorafit.data import find_demo_data
    from lorafit.trainer import train

    here = os.path.dirname(os.path.abspath(__file__))
    demo_yaml = os.path.join(here, "recipes", "demo.yaml")
    data_path = find_demo_data(args.data)
    cfg = load_config(
        demo_yaml,
        [
            f"data.path={data_path}",
            f"output.dir={args.out}",
            "output.overwrite=true",
            *args.overrides,
        ],
    )
    summary = train(cfg)
    _print_summary(summary, cfg.output.dir)
    return 0


def _cmd_config(args) -> int:
    from lorafit.config import config_docs
    from lorafit.recipes import table
    from lorafit.sweep import SweepConfig

    # run keys (lorafit train), then the sweep section of a `lorafit compare` file
    rows = config_docs() + config_docs(SweepConfig, "sweep.")
    width = max(len(k) for k, _, _ in rows)
    for key, default, doc in rows:
        print(f"{key:<{width}}  {default:<14}  {doc}")
    # What the None defaults above resolve to, per method (lorafit/recipes.py; docs/recipes.md).
    print("\nPer-method defaults (a None above takes its method's value):")
    for row in table():
        print(
            f"  {row['method']:<13} objective={row['objective']} lr={row['lr']:g} "
            f"head_lr={'lr' if row['head_lr'] is None else format(row['head_lr'], 'g')} "
            f"steps={row['steps']} min_passes={row['min_passes']:g} "
            f"select_best={str(row['select_best']).lower()} "
            f"r={row['r'] if row['r'] is not None else '-'} pool_layers={row['pool_layers']} "
            f"refit={str(row['refit']).lower()}"
        )
        print(f"  {'':<13} evidence: {row['why']}")
    return 0


SMALL_VALIDATION_ROWS = 64  # below this, a flat validation accuracy may hide a moving model


def _print_summary(summary: dict, run_dir: str) -> None:
    """A few readable lines: test metric with its CI, the gap, where the plot is."""
    from lorafit.distributed import is_main_process

    if not summary or not is_main_process():  # under a launcher only rank 0 prints
        return
    test = summary["test"]
    classification = summary["task"] == "classification"
    metric = summary["selection_metric"] if classification else "loss"
    key = "accuracy" if classification else "loss"
    level = round(100 * test.get("ci_level", 0.95))
    intervals = test.get("ci", {})
    # the token-weighted loss's own CI; runs written before it had only the per-example NLL's
    ci_of = "" if key in intervals or classification else " of the mean per-example NLL"
    ci = intervals.get(key) or (None if classification else intervals.get("nll"))
    ci_text = f" ({level}% CI{ci_of} {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    lines = [
        "",
        f"run:        {run_dir}",
        f"test {key}: {test[key]:.4f}{ci_text} on {summary['num_test']} examples",
    ]
    if classification:
        lines.append(
            f"            macro-F1 {test['f1_macro']:.4f}, ECE {test['ece']:.4f}, NLL {test['nll']:.4f}"
        )
        calibration = summary.get("calibration")
        fitted_on = "the monitored run's validation" if summary.get("refit") else "validation"
        if calibration and "test_before" in calibration and calibration["temperature"] != 1.0:
            lines.append(
                f"            calibrated by temperature {calibration['temperature']:.3g} "
                f"(fitted on {fitted_on}): test ECE {calibration['test_before']['ece']:.4f} "
                f"before, NLL {calibration['test_before']['nll']:.4f} before"
            )
        majority = _majority_class(summary)
        if majority:
            lines.append(f"            {majority}")
    gap = summary.get("train_test_gap") or {}
    if key in gap:
        # as the trainer stores it: the loss gap is test minus train, a metric's train minus test
        first, second = ("test", "train-sample") if key == "loss" else ("train-sample", "test")
        lines.append(
            f"gap:        {first} {key} minus {second} {key} = {gap[key]:+.4f} "
            f"({_tested(summary, metric)})"
        )
    start, tested = summary.get("validation_at_start"), summary.get("validation_at_selected")
    if start and tested and start.get(metric) is not None and tested.get(metric) is not None:
        lines.append(
            f"trained:    validation {metric} {start[metric]:.4f} at step 0 -> "
            f"{tested[metric]:.4f} ({_selected(summary, metric)})"
        )
        rows = summary.get("num_validation") or 0
        if metric == "accuracy" and 0 < rows <= SMALL_VALIDATION_ROWS:
            lines.append(
                f"            on {rows} validation rows one row is {100 / rows:.3g} points of "
                "accuracy; the validation loss in the plot moves in finer steps"
            )
    refit = summary.get("refit")
    if refit:
        lines.append(
            f"refit:      the tested model was trained again from the start on train + "
            f"validation ({refit['num_train']} rows, {refit['steps']} steps; train.refit); the "
            "validation numbers are the monitored run's"
        )
    if summary.get("stopped_early"):
        lines.append(
            f"stopped:    early, at step {summary['stopped_at_step']} of {summary['steps']}: "
            f"validation {metric} stopped improving (train.early_stopping.patience)"
        )
    lines.append(
        f"cost:       {summary['trainable_params']:,} trainable of {summary['total_params']:,} params, "
        f"{summary['wall_time_s']:.0f}s, peak {summary['peak_memory_mb']:.0f} MB"
    )
    plot = os.path.join(run_dir, "learning_curve.png")
    if os.path.exists(plot):  # output.plot=false writes none
        lines.append(f"plot:       {plot}")
    print("\n".join(lines))


def _majority_class(summary: dict) -> str | None:
    """The accuracy of always predicting the test set's largest class, when the classes are
    unequal: on an imbalanced test set a high accuracy can be worse than that constant guess."""
    matrix = (summary.get("test_per_class") or {}).get("confusion_matrix")
    counts = [sum(row) for row in matrix or []]
    total = sum(counts)
    present = [c for c in counts if c]  # a class with no test rows does not unbalance the set
    if not total or (len(present) > 1 and max(present) < 2 * min(present)):  # near-balanced
        return None
    names = summary.get("label_names") or [str(c) for c in range(len(counts))]
    top = max(range(len(counts)), key=counts.__getitem__)
    return (
        f"always predicting the largest test class '{names[top]}' scores accuracy "
        f"{counts[top] / total:.4f}; compare macro-F1 on imbalanced data"
    )


def _tested(summary: dict, metric: str) -> str:
    """Which weights were tested: the refit's, else the monitored run's selected ones."""
    if summary.get("refit"):
        weights = "EMA weights at step" if summary.get("ema_decay") else "last step"
        return f"the refit's {weights} {summary['refit']['steps']}"
    return _selected(summary, metric)


def _selected(summary: dict, metric: str) -> str:
    """The monitored run's selected weights: the best validation step, or the last under a
    fixed budget."""
    if summary.get("selected") == "best":
        return f"weights of step {summary['best_step']}, best by validation {metric}"
    if summary.get("ema_decay"):
        return f"EMA weights at the last step {summary['stopped_at_step']}, a fixed budget"
    return f"weights of the last step {summary['stopped_at_step']}, a fixed budget"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but key=value overrides may also follow options: `compare c.yaml
    --report-only sweep.seeds=3` (argparse reads a command's positionals in one run)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        hint = _override_hint(extra) if hasattr(args, "overrides") else ""
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def _override_hint(extra: list[str]) -> str:
    """`--steps 5` (another tool's habit) -> "; settings are key=value overrides: train.steps=5"."""
    from lorafit.config import _misplaced_key

    option = next((a for a in extra if a.startswith("--")), None)
    if option is None:
        return ""
    name, sep, value = option[2:].partition("=")
    key = _misplaced_key("", name.replace("-", "_"))
    if key is None:
        return ""
    following = extra[extra.index(option) + 1 :]
    if not sep and following and not following[0].startswith("-"):
        value = following[0]
    return f"; settings are key=value overrides: {key}={value or '...'}"


_RESUME_HINTS = {
    "train": "resume with train.resume=true",
    "compare": "run the same command again: finished runs are kept and interrupted ones "
    "resume from their last checkpoints",
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        code = args.func(args)
    except LorafitError as e:
        print(f"lorafit: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under a launcher, one line, not one per rank
            print(
                f"lorafit: interrupted; {_RESUME_HINTS.get(args.command, '')}".rstrip("; "),
                file=sys.stderr,
            )
        sys.exit(130)
    if "torch.distributed" in sys.modules:  # the command used torch (`lorafit config` does not)
        from lorafit.distributed import leave_process_group

        leave_process_group()
    sys.exit(code or 0)
