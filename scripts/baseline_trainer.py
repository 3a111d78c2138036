"""The plain transformers `Trainer` + peft baseline of issue 7 (what a user gets by default).

    python scripts/baseline_trainer.py --method full --dataset sst2 --k 16 --seed 13 \
        --out runs/baseline/sst2-full-13 --data-overrides data.path=../shared/data/sst2 \
        data.test_split=validation data.min_words=8 model.max_length=64

- `AutoModelForSequenceClassification` on MiniLM (all-MiniLM-L6-v2): its CLS pooler + linear
  classifier, not the checkpoint's mean pooling.
- The same K-shot split as a lorafit run with that seed (lorafit.data: K per class to train and
  a disjoint K per class to validate, drawn from the train pool); the test set in full unless
  data.max_test_examples says otherwise.
- 20 epochs, batch 8, evaluated every epoch on the validation set, the best validation epoch
  (accuracy) restored at the end (`load_best_model_at_end`), then one pass over the test set.
- The three settings of the issue's table:
    full: full fine-tuning, lr 3e-5, weight decay 0.01, warmup 10%;
    lora: peft LoRA r=8 on query/value (peft defaults otherwise: alpha 8, dropout 0), lr 5e-4;
    head: classifier only (encoder and pooler frozen), lr 1e-3.
Writes <out>/summary.json with the fields scripts/recipes_table.py reads (test accuracy,
macro-F1, ECE, train−test accuracy gap), in the same shape as a lorafit summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "full": dict(learning_rate=3e-5, weight_decay=0.01, warmup_steps=0.1),  # 10% warmup
    "lora": dict(learning_rate=5e-4),
    "head": dict(learning_rate=1e-3),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=sorted(SETTINGS), required=True)
    p.add_argument("--dataset", default="", help="a name recorded in the summary")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--out", required=True)
    p.add_argument("--data-overrides", nargs="*", default=[], help="lorafit data./model. keys")
    args = p.parse_args()

    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from lorafit import data as D
    from lorafit.config import load_config
    from lorafit.metrics import ClassificationMetrics
    from lorafit.models import load_tokenizer, resolve_model_source

    cfg = load_config(
        None,
        ["model.name_or_path=minilm", f"data.k_shot={args.k}", f"data.seed={args.seed}"]
        + args.data_overrides,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    task_data = D.load_task_data(cfg.data, "classification")
    labels = task_data.label_names
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)

    def tok(ds):
        pair = "text_pair" in ds.column_names  # sentence-pair tasks: one [SEP]-joined input
        enc = ds.map(
            lambda b: tokenizer(
                b["text"],
                b["text_pair"] if pair else None,
                truncation=True,
                max_length=cfg.model.max_length,
            ),
            batched=True,
        )
        return enc.select_columns(["input_ids", "attention_mask", "label"])

    train, validation, test = tok(task_data.train), tok(task_data.validation), tok(task_data.test)

    model = AutoModelForSequenceClassification.from_pretrained(source.path, num_labels=len(labels))
    if args.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(
            model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, target_modules=["query", "value"])
        )
    elif args.method == "head":
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("classifier.")

    def compute_metrics(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    ckpt_dir = out / "trainer"
    targs = TrainingArguments(
        output_dir=str(ckpt_dir),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=128,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        greater_is_better=True,
        logging_strategy="epoch",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        **SETTINGS[args.method],
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start

    def metrics_of(ds):
        pred = trainer.predict(ds)
        acc = ClassificationMetrics(num_classes=len(labels))
        acc.update(np.asarray(pred.predictions, dtype=np.float32), np.asarray(pred.label_ids))
        m = acc.compute()
        return {k: v for k, v in m.items() if np.isscalar(v)}

    test_m, train_m = metrics_of(test), metrics_of(train)
    best_val = max(
        (e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e),
        default=None,
    )
    summary = {
        "status": "completed",
        "system": "plain transformers Trainer + peft",
        "method": args.method,
        "dataset": args.dataset,
        "k_shot": args.k,
        "seed": args.seed,
        "data_seed": args.seed,
        "settings": {**SETTINGS[args.method], "epochs": args.epochs, "batch_size": 8},
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_validation": {"accuracy": best_val},
        "test": test_m,
        "train_sample_at_selected": train_m,
        "train_test_gap": {
            "accuracy": train_m["accuracy"] - test_m["accuracy"],
            "nll": test_m["nll"] - train_m["nll"],
        },
        "num_train": len(train),
        "num_validation": len(validation),
        "num_test": len(test),
        "wall_time_s": wall,
    }
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=float))
    tmp.replace(out / "summary.json")
    print(json.dumps({k: summary[k] for k in ("method", "seed", "test", "train_test_gap")}))


if __name__ == "__main__":
    main()
