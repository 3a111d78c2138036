"""lorafit vs a plain transformers `Trainer` + peft script on the same K-shot LoRA job.

    .venv/bin/python scripts/bench_train.py [--seeds 13 21 42] [--steps 150] [--out bench_results/train.json]

Both sides get the same K-shot examples (lorafit's sampler), the same LoRA target modules,
rank, learning rate, warmup, batch size, step budget and evaluations (every `--eval-every`
steps, the 32 training examples and the 32 validation examples: the train/validation gap
that lorafit logs), and run in
their own subprocess (alternating, so background load hits both alike) so that wall time and
peak RSS are measured cleanly. Reported per seed: test accuracy of each, the wall-time ratio
and the peak-memory ratio (lorafit / Trainer). The two models differ in pooling (lorafit:
the checkpoint's mean pooling; Trainer: BERT's CLS pooler), which is part of the story.

It also checks "identical metrics for the same predictions": the Trainer's own test logits
are scored by lorafit.metrics and by scikit-learn, and the results must agree.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = dict(k_shot=16, max_length=64, batch_size=8, lr=5e-4, warmup=0.1, r=8, alpha=16)


def _data_dir() -> str:
    import os

    return os.path.join(
        os.environ.get("LORAFIT_DATA_DIR", str(ROOT.parent / "shared" / "data")), "sst2"
    )


def _overrides(seed: int, steps: int, eval_every: int, out: str) -> list[str]:
    s = SETTINGS
    return [
        "model.name_or_path=minilm",
        f"model.max_length={s['max_length']}",
        f"data.path={_data_dir()}",
        "data.test_split=validation",
        f"data.k_shot={s['k_shot']}",
        "data.min_words=8",
        f"data.seed={seed}",
        "method.name=lora",
        "train.objective=ce",  # the Trainer script's loss: a like-for-like comparison
        f"method.r={s['r']}",
        f"method.alpha={s['alpha']}",
        "method.dropout=0.1",
        f"train.steps={steps}",
        f"train.batch_size={s['batch_size']}",
        f"train.lr={s['lr']}",
        f"train.warmup={s['warmup']}",
        f"train.eval_every={eval_every}",
        f"train.seed={seed}",
        "train.train_eval_size=32",
        "eval.batch_size=64",
        f"output.dir={out}",
        "output.overwrite=true",
        "output.report_to=[]",
    ]


def worker_lorafit(seed: int, steps: int, eval_every: int) -> dict:
    from lorafit.config import load_config
    from lorafit.trainer import train

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = train(load_config(None, _overrides(seed, steps, eval_every, out)))
        wall = time.perf_counter() - start
    return {"test_accuracy": summary["test"]["accuracy"], "wall_s": wall}


def worker_trainer(seed: int, steps: int, eval_every: int) -> dict:
    import numpy as np
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from lorafit import data as D
    from lorafit.config import load_config
    from lorafit.methods import detect_target_modules
    from lorafit.models import load_tokenizer, resolve_model_source

    cfg = load_config(None, _overrides(seed, steps, eval_every, "unused"))
    start = time.perf_counter()
    task_data = D.load_task_data(cfg.data, "classification")
    path = resolve_model_source(cfg.model).path
    tokenizer = load_tokenizer(cfg.model)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    targets = detect_target_modules(model.bert, "auto")
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            task_type="SEQ_CLS",
            r=SETTINGS["r"],
            lora_alpha=SETTINGS["alpha"],
            lora_dropout=0.1,
            target_modules=targets,
        ),
    )

    def encode(ds):
        enc = tokenizer(list(ds["text"]), truncation=True, max_length=SETTINGS["max_length"])
        return [
            {"input_ids": i, "attention_mask": a, "labels": y}
            for i, a, y in zip(enc["input_ids"], enc["attention_mask"], list(ds["label"]))
        ]

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    from transformers import DataCollatorWithPadding

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=SETTINGS["batch_size"],
            per_device_eval_batch_size=64,
            learning_rate=SETTINGS["lr"],
            warmup_steps=int(round(SETTINGS["warmup"] * steps)),
            weight_decay=0.01,
            eval_strategy="steps",
            eval_steps=eval_every,
            save_strategy="no",
            logging_steps=eval_every,
            report_to=[],
            seed=seed,
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=encode(task_data.train),
            # the same evaluations as lorafit: a training sample (for the gap) and validation
            eval_dataset={
                "train": encode(task_data.train),
                "validation": encode(task_data.validation),
            },
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy,
        )
        trainer.train()
        pred = trainer.predict(encode(task_data.test))
    wall = time.perf_counter() - start
    logits = np.asarray(pred.predictions, dtype=np.float32)
    labels = np.asarray(pred.label_ids)
    return {
        "test_accuracy": float((logits.argmax(-1) == labels).mean()),
        "wall_s": wall,
        "metrics_agree": _metrics_agree(logits, labels, torch),
    }


def _metrics_agree(logits, labels, torch) -> dict:
    """lorafit.metrics vs scikit-learn on the same predictions."""
    from sklearn import metrics as skm

    from lorafit.metrics import ClassificationMetrics

    acc = ClassificationMetrics(num_classes=2)
    acc.update(logits, labels)
    ours = acc.compute()
    probs = torch.softmax(torch.from_numpy(logits).double(), -1).numpy()
    pred = logits.argmax(-1)
    theirs = {
        "accuracy": skm.accuracy_score(labels, pred),
        "f1_macro": skm.f1_score(labels, pred, average="macro"),
        "mcc": skm.matthews_corrcoef(labels, pred),
        "nll": skm.log_loss(labels, probs, labels=[0, 1]),
        "auroc": skm.roc_auc_score(labels, probs[:, 1]),
    }
    diffs = {k: abs(float(ours[k]) - float(v)) for k, v in theirs.items()}
    return {"max_abs_diff": max(diffs.values()), "identical": max(diffs.values()) < 1e-6}


def _run_worker(kind: str, seed: int, steps: int, eval_every: int) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--seeds",
            str(seed),
            "--steps",
            str(steps),
            "--eval-every",
            str(eval_every),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[13, 21, 42])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "train.json"))
    parser.add_argument("--worker", choices=["lorafit", "trainer"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        fn = worker_lorafit if args.worker == "lorafit" else worker_trainer
        result = fn(args.seeds[0], args.steps, args.eval_every)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    rows = []
    for seed in args.seeds:
        ours = _run_worker("lorafit", seed, args.steps, args.eval_every)
        plain = _run_worker("trainer", seed, args.steps, args.eval_every)
        rows.append(
            {
                "seed": seed,
                "lorafit": ours,
                "trainer": plain,
                "wall_ratio": ours["wall_s"] / plain["wall_s"],
                "memory_ratio": ours["peak_rss_mb"] / plain["peak_rss_mb"],
            }
        )
        print(
            f"seed {seed}: lorafit acc {ours['test_accuracy']:.4f} {ours['wall_s']:.0f}s "
            f"{ours['peak_rss_mb']:.0f}MB | Trainer acc {plain['test_accuracy']:.4f} "
            f"{plain['wall_s']:.0f}s {plain['peak_rss_mb']:.0f}MB | metrics identical: "
            f"{plain['metrics_agree']['identical']}",
            flush=True,
        )
    summary = {
        "settings": {**SETTINGS, "steps": args.steps, "eval_every": args.eval_every},
        "rows": rows,
        "median_wall_ratio": statistics.median(r["wall_ratio"] for r in rows),
        "median_memory_ratio": statistics.median(r["memory_ratio"] for r in rows),
        "mean_test_accuracy": {
            k: statistics.mean(r[k]["test_accuracy"] for r in rows) for k in ("lorafit", "trainer")
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from lorafit.io import write_json

    write_json(args.out, summary)
    print("\n| | lorafit | plain Trainer + peft |\n|---|---|---|")
    print(
        f"| mean test accuracy | {summary['mean_test_accuracy']['lorafit']:.4f} | "
        f"{summary['mean_test_accuracy']['trainer']:.4f} |"
    )
    print(
        f"| wall-time ratio (lorafit / Trainer), median | {summary['median_wall_ratio']:.3f} | 1 |"
    )
    print(f"| peak-memory ratio, median | {summary['median_memory_ratio']:.3f} | 1 |")


if __name__ == "__main__":
    main()
