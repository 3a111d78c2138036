"""The selection experiments behind lorafit/recipes.py, on training-split data only.

    python scripts/select_defaults.py --list
    python scripts/select_defaults.py --only core lora_low_lr head_lr --seeds 1
    python scripts/select_defaults.py --report-only

No test split is ever read. For each dataset a *dev* set is held out of the train pool once
(stratified, seed 0) and written, with the remaining pool, under <out>/data/:
- SST-2: 500 GLUE-train sentences of 8+ words (the GLUE validation file is never opened);
- AG News: 400 articles of the 10k train slice (the test file is never opened);
- MR: 500 rows of the pool left after scripts/recipes_table.py holds out its fixed test rows.
Each run then draws K per class to train and a disjoint K per class to validate from the rest
of the pool (LM-BFF), exactly as a user's run would, and "tests" on the dev set.

Every run keeps the last (select_best=false) and a checkpoint at every evaluation, so one run
answers the model-selection question without extra training: its dev accuracy at the last step
(a fixed budget) is compared with the dev accuracy of the step its 2K-example validation set
picks (accuracy, ties on lower loss; with and without min_steps=100). Results: <out>/results.jsonl (one
row per run and step) and <out>/report.md. Seeds here (1, 2, 3) differ from the table's.
Runs are sequential; finished runs are skipped (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from recipes_table import DATA, DATASETS, QUIET, hold_out, mr_split  # noqa: E402

PY = sys.executable


def per_dataset(group: str, method: str, *override_sets: list[str]) -> dict:
    """A group per dataset, `<group>_<dataset>`: one `method` run per set of overrides."""
    return {
        f"{group}_{dataset}": [(dataset, method, list(overrides)) for overrides in override_sets]
        for dataset in DATASETS
    }


def large_k_budget(steps: int) -> list[str]:
    """K=512 per class (validation 16 per class) trained for `steps`, evaluated every 100."""
    return [
        "data.k_shot=512",
        "data.validation_k=16",
        f"train.steps={steps}",
        "train.eval_every=100",
        "train.checkpoint_every=100000",
    ]


# name -> (dataset, method, [overrides]) ; every other setting is the lorafit default
EXPERIMENTS: dict[str, list[tuple[str, str, list[str]]]] = {
    # the core comparison, run first: body vs head learning rate for LoRA and full FT
    "core": [
        ("sst2", "lora", ["train.lr=3e-4", "train.head_lr=3e-4"]),
        ("sst2", "lora", ["train.lr=3e-4", "train.head_lr=1e-2"]),
        ("sst2", "head", ["train.lr=1e-2"]),
        ("sst2", "full", ["train.lr=2e-5", "train.head_lr=1e-2"]),
    ],
    "lora_low_lr": [("sst2", "lora", ["train.lr=1e-4", "train.head_lr=1e-2"])],
    "lora_lr": [("sst2", "lora", ["train.lr=1e-3", "train.head_lr=1e-3"])],
    "head_lr": [("sst2", "head", ["train.lr=3e-2"])],
    "full_lr": [("sst2", "full", ["train.lr=2e-5", "train.head_lr=2e-5"])],
    "regularisers": [
        ("sst2", "lora", ["train.label_smoothing=0.1"]),
        ("sst2", "lora", ["train.ema_decay=0.99"]),
    ],
    "defaults_mr": [("mr", m, []) for m in ("lora", "head", "full")],
    "defaults_agnews": [("ag_news", m, []) for m in ("lora", "head", "full")],
    # cross-entropy (the explicit CE values) vs the SetFit-style contrastive objective
    **{
        f"objective_{dataset}": [
            (dataset, "lora", ["train.objective=ce", "train.lr=3e-4", "train.head_lr=3e-4"]),
            (dataset, "lora", ["train.objective=contrastive", "train.lr=3e-4"]),
            (dataset, "full", ["train.objective=ce", "train.lr=2e-5", "train.head_lr=1e-2"]),
            (dataset, "full", ["train.objective=contrastive", "train.lr=2e-5"]),
        ]
        for dataset in DATASETS
    },
    # the contrastive budget: pairs per step (batch size) against steps, LoRA
    **per_dataset(
        "contrastive_batch",
        "lora",
        [],
        ["train.batch_size=16", "train.steps=100"],
        ["train.batch_size=32", "train.steps=50"],
        ["train.steps=100"],
    ),
    # the head-only default of the time (cross-entropy, the last layer) on the three datasets, to
    # set against the closed-form logistic-regression head of scripts/contrastive_probes.py head
    # (its results.jsonl records are named <dataset>-head-default: pool_layers=1 was the default)
    "head_default": [(dataset, "head", ["model.pool_layers=1"]) for dataset in DATASETS],
    # the head on the mean of the last 3 layers (scripts/contrastive_probes.py layers), which
    # these runs made the head default
    "head_pool_layers": [(dataset, "head", ["model.pool_layers=3"]) for dataset in DATASETS],
    # ... and LoRA trained (pair loss included) on that pooling
    **per_dataset("lora_pool_layers", "lora", ["model.pool_layers=3"]),
    **per_dataset("contrastive_lr", "lora", ["train.lr=1e-3"], ["train.lr=1e-4"]),
    # the full-FT learning rate under the contrastive objective (2e-5, the default of the time,
    # ran in objective_*); these runs made 5e-5 the default
    **per_dataset("contrastive_full_lr", "full", ["train.lr=5e-5"], ["train.lr=1e-4"]),
    # the LoRA shape under the contrastive objective (the default: r 8, alpha 2r, every linear
    # layer of the blocks, dropout 0.1): attention only (query/value), other ranks, no dropout
    **per_dataset(
        "contrastive_lora_shape",
        "lora",
        ["method.target_modules=attention"],
        ["method.r=4"],
        ["method.r=16"],
        ["method.r=32"],
        ["method.dropout=0.0"],
    ),
    # LoRA variants outside the shape table (a nineteenth session): DoRA, LoRA on the top three
    # of MiniLM's six layers only, and PiSSA's initialisation from the principal singular vectors
    **per_dataset(
        "contrastive_lora_variants",
        "lora",
        ["method.use_dora=true"],
        ["method.peft_kwargs.layers_to_transform=[3,4,5]"],
        ["method.init_lora_weights=pissa"],
    ),
    # the full-FT step budget under the contrastive objective (200, the default, ran above)
    **per_dataset("contrastive_full_steps", "full", ["train.steps=100"], ["train.steps=400"]),
    # the warmup fraction of LoRA (10%, the default, ran above): none, and 30%
    **per_dataset("contrastive_warmup", "lora", ["train.warmup=0"], ["train.warmup=0.3"]),
    # the two full-FT switches the stability papers propose (Zhang et al. 2021: re-initialise
    # the top layer; layer-wise learning-rate decay), off by default, on the contrastive recipe
    **per_dataset(
        "contrastive_full_switches",
        "full",
        ["method.reinit_layers=1"],
        ["train.layer_lr_decay=0.8"],
    ),
    # post-hoc temperature scaling on the validation split (train.calibration, on by default
    # since these runs); the override only names the runs apart from the earlier default runs
    **{
        f"calibration_{dataset}": [
            (dataset, method, ["train.calibration=temperature"])
            for method in ("lora", "head", "full")
        ]
        for dataset in DATASETS
    },
    **per_dataset(
        "contrastive_longer",
        "lora",
        ["train.steps=400"],
        ["train.batch_size=16", "train.steps=200"],
    ),
    # train.batch_sampling=auto switches a binary task with batches of 4 (2.8 same-label pairs
    # per random batch, under the rule's 4) to class-pair batches: both draws at batch 4
    **per_dataset(
        "small_batch_sampling",
        "lora",
        ["train.batch_size=4", "train.batch_sampling=random"],
        ["train.batch_size=4", "train.batch_sampling=class_pairs"],
    ),
    # the fixed budget when it covers few passes: 512 per class (1,024 rows) with validation
    # kept at 16 per class; 200 steps (1.6 passes, the default before train.min_passes) against
    # 5 passes (the default now) and 10 for LoRA, against 5 for the other two methods
    **per_dataset("budget_passes", "lora", *(large_k_budget(s) for s in (200, 640, 1280))),
    **{
        f"budget_passes_{method}_{dataset}": [
            (dataset, method, large_k_budget(steps)) for steps in (200, 640)
        ]
        for method in ("head", "full")
        for dataset in DATASETS
    },
    # AG News K=64 (256 rows: 200 steps are 6.25 passes, the fewest of the test tables) at 200
    # steps against 10 passes (320), the floor the budget_passes runs left open
    "budget_passes_ag_news_k64": [
        ("ag_news", "lora", ["data.k_shot=64", "data.validation_k=16", f"train.steps={steps}"])
        for steps in (200, 320)
    ],
    # full FT in the regime of the SetFit prototype (docs/recipes.md): 32 sentences per step
    # (every K=16 binary example, 496 pairs) for 80 steps, at its lr 2e-5 and at the default
    **per_dataset(
        "contrastive_full_wide",
        "full",
        ["train.batch_size=32", "train.steps=80", "train.lr=2e-5"],
        ["train.batch_size=32", "train.steps=80"],
    ),
}


def prepare(out: Path) -> dict[str, Path]:
    """Write <out>/data/<dataset>/{train,test}.* (test = the dev slice of the train pool)."""
    from lorafit.io import write_text

    def write_lines(path: Path, lines: list[str]) -> None:
        write_text(path, "\n".join(lines) + "\n")

    folders = {}
    for name, file, n_dev, min_words in (
        ("sst2", DATA / "sst2" / "train.tsv", 500, 8),
        ("ag_news", DATA / "ag_news" / "train.tsv", 400, 0),
    ):
        folder = out / "data" / name
        folders[name] = folder
        if (folder / "test.tsv").exists():
            continue
        header, *rows = file.read_text().splitlines()
        fields = [r.split("\t") for r in rows]
        eligible = [i for i, f in enumerate(fields) if len(f[0].split()) >= min_words]
        dev = hold_out([f[-1] for f in fields], n_dev, eligible)
        write_lines(
            folder / "train.tsv", [header] + [r for i, r in enumerate(rows) if i not in dev]
        )
        write_lines(folder / "test.tsv", [header] + [r for i, r in enumerate(rows) if i in dev])
    folder = out / "data" / "mr"
    folders["mr"] = folder
    if not (folder / "test.jsonl").exists():
        pool = mr_split(ROOT / "runs" / "recipes") / "train.jsonl"  # the table's test rows excluded
        rows = pool.read_text().splitlines()
        labels = [json.loads(r)["label"] for r in rows]
        dev = hold_out(labels, 500, list(range(len(rows))))
        write_lines(folder / "train.jsonl", [r for i, r in enumerate(rows) if i not in dev])
        write_lines(folder / "test.jsonl", [r for i, r in enumerate(rows) if i in dev])
    return folders


def data_overrides(dataset: str, folder: Path) -> list[str]:
    common = [f"data.path={folder}", "data.validation_split=null", "data.test_split=test"]
    if dataset == "sst2":
        return common + ["data.min_words=8", "model.max_length=64"]
    if dataset == "mr":
        return common + ["model.max_length=64"]
    return common + ["model.max_length=128"]


def run_name(dataset: str, method: str, overrides: list[str]) -> str:
    # "train.label_smoothing=0.1" -> "label_smoothing-0.1" (the section prefix dropped)
    tag = "_".join(
        f"{key.split('.')[-1]}-{value}" for key, value in (o.split("=", 1) for o in overrides)
    )
    tag = tag or "default"
    return f"{dataset}-{method}-{tag}"


# -- evaluating every checkpoint on dev -----------------------------------------------------------


def dev_curve(run_dir: Path, steps: set[int]) -> list[dict]:
    """Dev accuracy/loss of the weights at the checkpoints of `steps` (a finished run)."""
    import torch
    import torch.nn.functional as F

    from lorafit import data as D
    from lorafit import methods as Meth
    from lorafit.checkpoint import list_checkpoints, load_checkpoint
    from lorafit.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    task = "classification"
    task_data = D.load_task_data(cfg.data, task)
    built = Meth.build_model(cfg.model, cfg.method, task, label_names=task_data.label_names)
    model, tok = built.model, built.tokenizer
    dev = D.tokenize(task_data.test, tok, task, cfg.model.max_length)
    loader = torch.utils.data.DataLoader(dev, batch_size=128, collate_fn=D.Collator(tok, task))
    rows = []
    for ckpt_path in list_checkpoints(run_dir / "checkpoints"):
        if int(ckpt_path.name.split("-")[-1]) not in steps:
            continue
        ckpt = load_checkpoint(ckpt_path)
        Meth.load_trainable_state_dict(model, ckpt["trainable"])
        model.eval()
        correct = n = 0
        loss = 0.0
        with torch.no_grad():
            for batch in loader:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                loss += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
                correct += (logits.argmax(-1) == batch["labels"]).sum().item()
                n += len(batch["labels"])
        rows.append({"step": ckpt["step"], "dev_accuracy": correct / n, "dev_loss": loss / n})
    return rows


def run_one(out: Path, folders: dict, dataset: str, method: str, overrides: list[str], seed: int):
    name = run_name(dataset, method, overrides)
    run_dir = out / "runs" / name / f"seed{seed}"
    results = out / "results.jsonl"
    done = {
        (r["name"], r["seed"])
        for r in map(json.loads, results.read_text().splitlines() if results.exists() else [])
    }
    if (name, seed) in done:
        return
    cmd = [
        PY, "-m", "lorafit", "train",
        "model.name_or_path=minilm",
        *data_overrides(dataset, folders[dataset]),
        "data.k_shot=16",
        f"data.seed={seed}",
        f"train.seed={seed}",
        f"method.name={method}",
        "train.select_best=false",
        "train.refit=false",  # every checkpoint is scored on dev: the monitored run is the run
        "train.eval_every=25",
        "train.checkpoint_every=25",
        "train.keep_checkpoints=1000",
        "eval.bootstrap_samples=10",
        f"output.dir={run_dir}",
        "output.overwrite=true",
        *QUIET,
        *overrides,
    ]  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}", flush=True)
    start = time.time()
    log = run_dir.parent / f"seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    rc = 0
    if not (run_dir / "summary.json").exists():  # trained earlier, not yet evaluated on dev
        with open(log, "w") as fh:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        print(f"    FAILED rc={rc}; see {log}", flush=True)
        return
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    val = [
        {
            "step": m["step"],
            "val_accuracy": m["validation"]["accuracy"],
            "val_loss": m["validation"]["loss"],
        }
        for m in metrics
    ]
    # The last step's dev accuracy is the run's own test result (select_best=false); only the
    # steps a validation-based selection would pick need another evaluation.
    picks = {_pick(val)["step"], _pick(val, 100)["step"]} - {metrics[-1]["step"]}
    if summary.get("objective") == "contrastive":
        picks = set()  # checkpoints hold the body only; the head is refitted (last step only)
    curve = {r["step"]: r for r in (dev_curve(run_dir, picks) if picks else [])}
    curve[metrics[-1]["step"]] = {
        "step": metrics[-1]["step"],
        "dev_accuracy": summary["test"]["accuracy"],
        "dev_loss": summary["test"]["loss"],
    }
    rows = []
    for m in metrics:
        dev = curve.get(m["step"], {})
        rows.append(
            {
                "step": m["step"],
                "train_accuracy": m["train"]["accuracy"],
                "val_accuracy": m["validation"]["accuracy"],
                "val_loss": m["validation"]["loss"],
                **dev,
            }
        )
    with open(results, "a") as fh:
        record = {
            "name": name,
            "dataset": dataset,
            "method": method,
            "overrides": overrides,
            "seed": seed,
            "curve": rows,
            "calibration": summary.get("calibration"),
        }
        fh.write(json.dumps(record) + "\n")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(f"    done in {time.time() - start:.0f}s; dev at end {rows[-1].get('dev_accuracy')}")


# -- report ---------------------------------------------------------------------------------------


def _pick(curve: list[dict], min_steps: int = 0) -> dict:
    """The step a validation set picks: best accuracy, ties on lower loss, after min_steps."""
    eligible = [r for r in curve if r["step"] >= min_steps] or curve
    return max(eligible, key=lambda r: (round(r["val_accuracy"], 9), -r["val_loss"]))


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def report(out: Path) -> str:
    results = out / "results.jsonl"
    records = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    by_name: dict[str, list[dict]] = {}
    for r in records:
        by_name.setdefault(r["name"], []).append(r)
    lines = [
        "| run (dataset-method-overrides) | seeds | dev acc, last step (fixed budget) "
        "| dev acc, val-best step | dev acc, val-best after 100 steps | train acc at end |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in by_name.items():
        last = [r["curve"][-1]["dev_accuracy"] for r in runs]
        # contrastive runs keep no head in their checkpoints: only the last step was tested
        best = [_pick(r["curve"]).get("dev_accuracy") for r in runs]
        best = [] if None in best else best
        best100 = [_pick(r["curve"], 100).get("dev_accuracy") for r in runs]
        best100 = [] if None in best100 else best100

        train = [r["curve"][-1]["train_accuracy"] for r in runs]
        seeds = ",".join(str(r["seed"]) for r in runs)
        lines.append(
            f"| {name} | {seeds} | {_ms(last)} | {_ms(best)} | {_ms(best100)} | {_ms(train)} |"
        )
    lines += _objective_table(records)
    lines += _calibration_table(records, out)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def _objective_table(records: list[dict]) -> list[str]:
    """The objective_* groups side by side: dev accuracy at the last step, ce vs contrastive."""
    pairs: dict[tuple, dict[str, float]] = {}
    for r in records:
        objective = next((o.split("=")[1] for o in r["overrides"] if "objective=" in o), None)
        if objective is None:
            continue
        key = (r["dataset"], r["method"], r["seed"])
        pairs.setdefault(key, {})[objective] = r["curve"][-1]["dev_accuracy"]
    lines = [
        "",
        "| dataset | method | data seed | dev acc, ce | dev acc, contrastive | difference |",
        "|---|---|---|---|---|---|",
    ]
    diffs: dict[str, list[float]] = {}
    for (dataset, method, seed), acc in sorted(pairs.items()):
        if len(acc) < 2:
            continue
        diff = acc["contrastive"] - acc["ce"]
        diffs.setdefault(method, []).append(diff)
        lines.append(
            f"| {dataset} | {method} | {seed} | {100 * acc['ce']:.1f} | "
            f"{100 * acc['contrastive']:.1f} | {100 * diff:+.1f} |"
        )
    for method, d in diffs.items():
        wins = sum(x > 0 for x in d)
        lines.append(
            f"| all | {method} | {len(d)} pairs | | | mean {100 * statistics.fmean(d):+.1f}, "
            f"contrastive ahead in {wins} |"
        )
    return lines


def _calibration_table(records: list[dict], out: Path) -> list[str]:
    """The calibration_* groups: the fitted temperature and dev (this script's test set) ECE and
    NLL before and after it, per run; the means per method over datasets and seeds."""
    lines = [
        "",
        "| dataset | method | data seed | temperature | dev ECE ×100 before → after "
        "| dev NLL before → after | validation ECE ×100 before → after |",
        "|---|---|---|---|---|---|---|",
    ]
    means: dict[str, list[tuple[float, ...]]] = {}
    for r in sorted(records, key=lambda r: (r["dataset"], r["method"], r["seed"])):
        cal = r.get("calibration")
        if not cal or "test_before" not in cal:
            continue
        after = json.loads(
            (out / "runs" / r["name"] / f"seed{r['seed']}" / "summary.json").read_text()
        )
        before, after = cal["test_before"], after["test"]
        val_b, val_a = cal["validation_before"], cal["validation_after"]
        # softening only (T >= 1): a fitted T under 1 is not applied, the run stays as before
        soft = after if cal["temperature"] >= 1 else before
        means.setdefault(r["method"], []).append(
            (before["ece"], after["ece"], soft["ece"], before["nll"], after["nll"], soft["nll"])
        )
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['seed']} | {cal['temperature']:.2f} | "
            f"{100 * before['ece']:.1f} → {100 * after['ece']:.1f} | "
            f"{before['nll']:.3f} → {after['nll']:.3f} | "
            f"{100 * val_b['ece']:.1f} → {100 * val_a['ece']:.1f} |"
        )
    lines += [
        "",
        "| method | runs | dev ECE ×100: none / fitted T / T ≥ 1 only | dev NLL: none / fitted T "
        "/ T ≥ 1 only | fitted T lowered ECE / NLL in |",
        "|---|---|---|---|---|",
    ]
    for method, rows in means.items():
        ece_b, ece_a, ece_s, nll_b, nll_a, nll_s = (statistics.fmean(c) for c in zip(*rows))
        lower_ece = sum(row[1] < row[0] for row in rows)
        lower_nll = sum(row[4] < row[3] for row in rows)
        lines.append(
            f"| {method} | {len(rows)} | {100 * ece_b:.1f} / {100 * ece_a:.1f} / {100 * ece_s:.1f} "
            f"| {nll_b:.3f} / {nll_a:.3f} / {nll_s:.3f} | {lower_ece} / {lower_nll} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "select"))
    p.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    if args.list:
        for exp in args.only:
            for dataset, method, overrides in EXPERIMENTS[exp]:
                print(exp, run_name(dataset, method, overrides))
        return
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if not args.report_only:
        folders = prepare(out)
        for seed in args.seeds:
            for exp in args.only:
                for dataset, method, overrides in EXPERIMENTS[exp]:
                    run_one(out, folders, dataset, method, overrides, seed)
    print(report(out))


if __name__ == "__main__":
    main()
