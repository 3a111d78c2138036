"""The docs/recipes.md table: lorafit's per-method defaults next to the plain-Trainer baseline.

    python scripts/recipes_table.py                       # everything, in priority order
    python scripts/recipes_table.py --datasets sst2 --k 16 --seeds 13 21 42
    python scripts/recipes_table.py --report-only         # rebuild the table from finished runs
    python scripts/recipes_table.py --dataset mytask data.path=my/folder data.label=topic \
        --k 16 --seeds 13 21 42 --out runs/mytask          # the same comparison on your data

Each cell is one `python -m lorafit train` run (lorafit defaults: only data, K, seed and the
method are set, nothing else) or one `scripts/baseline_trainer.py` run (the issue's plain
transformers Trainer + peft settings), run one at a time. Finished runs (summary.json present)
are skipped, so the script resumes where it stopped. The table reports mean ± std over seeds of
test accuracy, macro-F1, the train−test accuracy gap and ECE, and is written to
<out>/table.md (paste into docs/recipes.md).

Protocol (LM-BFF): K per class to train and a disjoint K per class to validate, both drawn from
the train pool with data.seed = seed (the training seed is the same number).
- SST-2: GLUE train sentences of 8+ words; test = the 872 GLUE validation sentences (all).
- AG News: the 10k train slice; test = a stratified 1,000 of the 7,600 test articles.
- MR: no official split. A fixed, stratified 1,000 rows (seed 0) are held out once as the test
  set (written to <out>/data/mr/test.jsonl); the rest is the train pool. The defaults were
  selected on a dev slice of that pool only (scripts/select_defaults.py).
- Your dataset (`--dataset NAME KEY=VALUE ...`): the lorafit `data.`/`model.` settings you give
  (data.path at least; a test file beside train, or data.test_fraction carves one), for both
  lorafit and the plain-Trainer script; model.max_length is lorafit's default unless set.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
PY = sys.executable
METHODS = ("lora", "head", "full", "qlora")
BASELINES = ("full", "lora", "head")
SEEDS = (13, 21, 42, 87, 100)
DATASETS = ("sst2", "mr", "ag_news")
CUSTOM: dict[str, list[str]] = {}  # --dataset NAME KEY=VALUE ...: name -> its settings


def hold_out(labels: list, n: int, eligible: list[int], seed: int = 0) -> set[int]:
    """Stratified `n` of the `eligible` row indices (an equal share per label, seeded)."""
    by_label: dict = {}
    for i in eligible:
        by_label.setdefault(labels[i], []).append(i)
    rng = random.Random(seed)
    chosen: set[int] = set()
    for label in sorted(by_label, key=str):
        idx = by_label[label][:]
        rng.shuffle(idx)
        chosen.update(idx[: n // len(by_label)])
    return chosen


def mr_split(out: Path, n_test: int = 1000, seed: int = 0) -> Path:
    """Fixed MR split: a stratified `n_test` rows held out as test, the rest the train pool."""
    from lorafit.io import write_text

    folder = out / "data" / "mr"
    if (folder / "train.jsonl").exists() and (folder / "test.jsonl").exists():
        return folder
    lines = (DATA / "mr" / "mr.jsonl").read_text().splitlines()
    labels = [json.loads(line)["label"] for line in lines]
    test = hold_out(labels, n_test, list(range(len(lines))), seed)
    for name, keep in (("train", lambda i: i not in test), ("test", lambda i: i in test)):
        write_text(
            folder / f"{name}.jsonl", "\n".join(x for i, x in enumerate(lines) if keep(i)) + "\n"
        )
    return folder


def data_overrides(dataset: str, out: Path) -> list[str]:
    """`key=value` data/model settings of one dataset (the protocol above)."""
    if dataset in CUSTOM:
        return CUSTOM[dataset]
    if dataset == "sst2":
        return [
            f"data.path={DATA / 'sst2'}",
            "data.test_split=validation",
            "data.min_words=8",
            "model.max_length=64",
        ]
    if dataset == "ag_news":
        return [
            f"data.path={DATA / 'ag_news'}",
            "data.max_test_examples=1000",
            "model.max_length=128",
        ]
    if dataset == "mr":
        return [
            f"data.path={mr_split(out)}",
            "data.validation_split=null",
            "model.max_length=64",
        ]
    raise SystemExit(f"unknown dataset {dataset!r}; use one of {DATASETS}")


QUIET = [
    "output.report_to=[]",
    "output.plot=false",
    "output.save_adapter=false",
    "eval.save_predictions=false",
    "eval.batch_size=128",
]


def lorafit_command(
    dataset: str, k: int, method: str, seed: int, run_dir: Path, out: Path, extra=()
):
    return [
        PY,
        "-m",
        "lorafit",
        "train",
        "model.name_or_path=minilm",
        *data_overrides(dataset, out),
        f"data.k_shot={k}",
        f"data.seed={seed}",
        f"train.seed={seed}",
        f"method.name={method}",
        f"output.dir={run_dir}",
        "output.overwrite=true",
        *QUIET,
        *extra,
    ]


class Variant(NamedTuple):
    """lorafit's defaults with one earlier default restored."""

    overrides: list[str]
    label: str  # the report's "setting" column
    flag: str  # the command-line option that lists the methods to run under it
    help: str


VARIANTS = {
    "lorafit_ce": Variant(
        ["train.objective=ce"],
        "lorafit defaults, `train.objective=ce`",
        "--ce-methods",
        "also run these methods with train.objective=ce (the defaults before contrastive)",
    ),
    "lorafit_last": Variant(
        ["model.pool_layers=1"],
        "lorafit defaults, `model.pool_layers=1` (the last layer only)",
        "--last-layer-methods",
        "also run these methods with model.pool_layers=1 (head: the default before 3)",
    ),
    "lorafit_lr2e5": Variant(
        ["train.lr=2e-5"],
        "lorafit defaults, `train.lr=2e-5`",
        "--lr-2e-5-methods",
        "also run these methods with train.lr=2e-5 (full: the default before 5e-5)",
    ),
    "lorafit_norefit": Variant(
        ["train.refit=false"],
        "lorafit defaults, `train.refit=false` (the monitored run tested: the defaults before the refit)",
        "--no-refit-methods",
        "also run these methods with train.refit=false (the defaults before the refit)",
    ),
}


def baseline_command(dataset: str, k: int, method: str, seed: int, run_dir: Path, out: Path):
    return [
        PY,
        str(ROOT / "scripts" / "baseline_trainer.py"),
        "--method",
        method,
        "--dataset",
        dataset,
        "--k",
        str(k),
        "--seed",
        str(seed),
        "--out",
        str(run_dir),
        "--data-overrides",
        *data_overrides(dataset, out),
    ]


COMMANDS = {
    "lorafit": lorafit_command,
    "baseline": baseline_command,
    **{
        system: functools.partial(lorafit_command, extra=variant.overrides)
        for system, variant in VARIANTS.items()
    },
}


def planned(datasets, ks, seeds, methods, baselines, variant_methods=None):
    """(dataset, k, system, method, seed) in priority order: dataset, K, then seed-major.

    variant_methods: VARIANTS system -> the methods to run under it too.
    """
    for dataset in datasets:
        for k in ks:
            for seed in seeds:
                for m in methods:
                    yield dataset, k, "lorafit", m, seed
                for m in baselines:
                    yield dataset, k, "baseline", m, seed
                for system, variant in (variant_methods or {}).items():
                    for m in variant:
                        yield dataset, k, system, m, seed


def _claim(path: Path) -> bool:
    """Create `path` atomically: True if this process owns the run (several workers may share a grid)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def run_all(args) -> None:
    out = Path(args.out)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    deadline = time.time() + args.budget_min * 60 if args.budget_min else None
    if args.stop_at:  # HH:MM local time today
        hour, minute = map(int, args.stop_at.split(":"))
        now = time.localtime()
        stop = time.mktime((*now[:3], hour, minute, 0, *now[6:]))
        deadline = min(deadline or stop, stop)
    variant_methods = {system: getattr(args, system) for system in VARIANTS}
    for dataset, k, system, method, seed in planned(
        args.datasets, args.k, args.seeds, args.methods, args.baselines, variant_methods
    ):
        run_dir = out / "runs" / f"{dataset}_k{k}" / f"{system}-{method}" / f"seed{seed}"
        if (run_dir / "summary.json").exists():
            continue
        if deadline and time.time() > deadline:
            print(f"budget spent; stopping before {run_dir}", flush=True)
            break
        cmd = COMMANDS[system](dataset, k, method, seed, run_dir, out)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        claim = run_dir.parent / f"seed{seed}.claim"
        if not _claim(claim):
            continue  # another worker runs it (delete stale .claim files of killed workers)
        start = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {run_dir}", flush=True)
        with open(run_dir.parent / f"seed{seed}.log", "w") as log:
            rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        claim.unlink()
        status = "ok" if rc == 0 else f"FAILED rc={rc} (see {run_dir.parent}/seed{seed}.log)"
        print(f"    {status} in {time.time() - start:.0f}s", flush=True)


# -- report ---------------------------------------------------------------------------------------


def _stat(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "not run"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"  # one seed has no spread (the seeds column says so)
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


BASELINE_LABEL = {
    "full": "plain Trainer full FT (lr 3e-5, CLS pooler, 20 epochs, best epoch)",
    "lora": "plain Trainer LoRA r=8 q/v (lr 5e-4, CLS pooler, 20 epochs, best epoch)",
    "head": "plain Trainer head only (lr 1e-3, CLS pooler, 20 epochs, best epoch)",
}


def collect(out: Path) -> dict:
    cells: dict[tuple, list[dict]] = {}
    for summary in sorted((out / "runs").glob("*/*/seed*/summary.json")):
        s = json.loads(summary.read_text())
        cell = summary.parent.parent
        dataset, k = cell.parent.name.rsplit("_k", 1)
        system, method = cell.name.split("-", 1)
        cells.setdefault((dataset, int(k), system, method), []).append(s)
    return cells


SYSTEMS = ("lorafit", *VARIANTS, "baseline")


def _label(system: str, method: str, runs: list[dict]) -> str:
    if system == "baseline":
        return BASELINE_LABEL[method]
    if system in VARIANTS:
        return VARIANTS[system].label
    objectives = sorted({r.get("objective") or "ce" for r in runs})
    pooled = sorted({r.get("pool_layers") or 1 for r in runs})  # absent: run before the option
    layers = f"; `model.pool_layers={', '.join(map(str, pooled))}`" if pooled != [1] else ""
    return f"lorafit defaults (objective: {', '.join(objectives)}{layers})"


def report(args) -> str:
    out = Path(args.out)
    cells = collect(out)
    lines = []
    for dataset in args.datasets:
        for k in args.k:
            lines += [
                f"\n#### {dataset}, K={k}\n",
                "| method | setting | seeds | test n | accuracy | macro-F1 | train−test gap | ECE ×100 |",
                "|---|---|---|---|---|---|---|---|",
            ]
            columns = []  # (system, method) cells that have runs, for the per-seed table
            for method in METHODS:
                for system in SYSTEMS:
                    runs = sorted(
                        cells.get((dataset, k, system, method), []), key=lambda r: r["seed"]
                    )
                    if system != "lorafit" and not runs:
                        continue  # optional rows are listed only when run
                    if not runs:
                        lines.append(f"| {method} | lorafit defaults | – | – | not run | | | |")
                        continue
                    columns.append((system, method))
                    seeds = ",".join(str(r["seed"]) for r in runs)
                    n = sorted({r["num_test"] for r in runs})
                    acc = [r["test"]["accuracy"] for r in runs]
                    f1 = [r["test"]["f1_macro"] for r in runs]
                    gap = [r["train_test_gap"]["accuracy"] for r in runs]
                    ece = [r["test"]["ece"] for r in runs]
                    lines.append(
                        f"| {method} | {_label(system, method, runs)} | {seeds} | "
                        f"{','.join(map(str, n))} | {_stat(acc)} | {_stat(f1)} | {_stat(gap)} | "
                        f"{_stat(ece)} |"
                    )
            lines += _per_seed(cells, dataset, k, columns)
            lines += _calibration(cells, dataset, k, columns)
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    return text


def _per_seed(cells: dict, dataset: str, k: int, columns: list[tuple[str, str]]) -> list[str]:
    """Test accuracy per seed (training accuracy at the kept weights in brackets)."""
    if not columns:
        return []
    by_seed: dict[int, dict] = {}
    for system, method in columns:
        for r in cells[(dataset, k, system, method)]:
            by_seed.setdefault(r["seed"], {})[(system, method)] = r
    head = " | ".join(f"{system}-{method}" for system, method in columns)
    lines = ["", f"| seed | {head} |", "|---|" + "---|" * len(columns)]
    for seed in sorted(by_seed):
        cells_ = []
        for col in columns:
            r = by_seed[seed].get(col)
            if r is None:
                cells_.append("not run")
                continue
            train_acc = r["train_sample_at_selected"]["accuracy"] * 100
            cells_.append(f"{r['test']['accuracy'] * 100:.1f} ({train_acc:.0f})")
        lines.append(f"| {seed} | " + " | ".join(cells_) + " |")
    return lines


def _calibration(cells: dict, dataset: str, k: int, columns: list[tuple[str, str]]) -> list[str]:
    """Runs calibrated by a validation temperature (train.calibration): test ECE and NLL
    before (`calibration.test_before`, the same run's raw head) and after."""
    lines = []
    for system, method in columns:
        runs = [r for r in cells[(dataset, k, system, method)] if r.get("calibration")]
        if not runs:
            continue
        temperatures = [r["calibration"]["temperature"] for r in runs]
        before = [r["calibration"]["test_before"] for r in runs]
        lines.append(
            f"| {system}-{method} | {len(runs)} | {statistics.fmean(temperatures):.2f} "
            f"({min(temperatures):.2f}–{max(temperatures):.2f}) | "
            f"{_stat([b['ece'] for b in before])} → {_stat([r['test']['ece'] for r in runs])} | "
            f"{_stat([b['nll'] for b in before], 1, 3)} → "
            f"{_stat([r['test']['nll'] for r in runs], 1, 3)} |"
        )
    if not lines:
        return []
    head = [
        "",
        "| calibrated runs | seeds | temperature, mean (range) | test ECE ×100 before → after "
        "| test NLL before → after |",
        "|---|---|---|---|---|",
    ]
    return head + lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "recipes"))
    p.add_argument("--datasets", nargs="+", default=None, help=f"of {', '.join(DATASETS)}")
    p.add_argument(
        "--dataset",
        dest="custom",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "KEY=VALUE"),
        help="your own dataset: a name for the table, then lorafit data./model. settings "
        "(data.path=... at least); repeat for several",
    )
    p.add_argument("--k", nargs="+", type=int, default=[16, 64])
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES)
    for system, variant in VARIANTS.items():
        p.add_argument(
            variant.flag, dest=system, nargs="*", default=[], choices=METHODS, help=variant.help
        )
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--budget-min", type=float, default=None, help="stop launching after N minutes")
    p.add_argument("--stop-at", default=None, help="stop launching after HH:MM (local time)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    for name, *settings in args.custom:
        bad = [s for s in settings if not s.startswith(("data.", "model.")) or "=" not in s]
        if not any(s.startswith("data.path=") for s in settings) or bad or name in DATASETS:
            p.error(
                f"--dataset {name}: give a new name, then data./model. KEY=VALUE settings with "
                f"data.path=... among them{f' (not: {bad[0]})' if bad else ''}"
            )
        CUSTOM[name] = settings
    unknown = [d for d in args.datasets or [] if d not in DATASETS and d not in CUSTOM]
    if unknown:
        p.error(f"--datasets {unknown[0]}: not one of {', '.join(DATASETS)} or a --dataset name")
    args.datasets = args.datasets or list(CUSTOM) or list(DATASETS)
    if not args.report_only:
        run_all(args)
    print(report(args))


if __name__ == "__main__":
    main()
