"""Prediction throughput (examples/s) on MiniLM: merged adapter, unmerged adapter, plain transformers.

    python scripts/bench_predict.py [--data ../shared/data/sst2/validation.tsv] [--threads 2]
        [--batch-size 32] [--runs 3] [--limit N] [--out bench_predict.json]

Every variant classifies the same SST-2 sentences with the same batch size and thread count:
- lorafit merged:   `Predictor` on an export made with --merge (no PEFT layers);
- lorafit adapter:  `Predictor` on the adapter-only export (LoRA layers unmerged);
- plain loop:       AutoModel + mean pooling + head, batches sorted by length like lorafit's;
- hf pipeline:      `pipeline("text-classification")` on a BertForSequenceClassification of the
                    same encoder (random classifier; only its speed matters), unsorted batches.
One warm-up pass, then the median of --runs timed passes. The adapter is an untrained LoRA with
random B (r=8): throughput does not depend on the values. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lorafit import methods as M  # noqa: E402
from lorafit.config import MethodConfig, ModelConfig  # noqa: E402
from lorafit.export import export_run  # noqa: E402
from lorafit.predict import Predictor  # noqa: E402


def read_sentences(path: Path, limit: int | None) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows][:limit]


def timed(fn, texts: list[str], runs: int) -> dict:
    fn(texts[: min(len(texts), 64)])  # warm-up: first-call allocations, lazy imports
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(texts)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"seconds": seconds, "median_s": median, "examples_per_s": len(texts) / median}


def plain_loop(model_path: str, head: torch.nn.Linear, batch_size: int, max_length: int):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path).eval()

    @torch.no_grad()
    def run(texts: list[str]) -> list[int]:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        preds = [0] * len(texts)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = encoder(**batch).last_hidden_state  # [B, T, H]
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            for i, p in zip(rows, head(pooled).argmax(-1).tolist()):
                preds[i] = p
        return preds

    return run


def hf_pipeline(model_path: str, batch_size: int, max_length: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    pipe = pipeline(
        "text-classification",
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(model_path),
        device="cpu",
    )
    return lambda texts: pipe(texts, batch_size=batch_size, truncation=True, max_length=max_length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/sst2/validation.tsv"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="first N sentences only")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", default="bench_predict.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = read_sentences(Path(args.data), args.limit)

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        torch.manual_seed(0)
        built = M.build_model(
            ModelConfig(name_or_path="minilm", max_length=args.max_length),
            MethodConfig(name="lora", r=8, init_lora_weights=False),
            "classification",
            label_names=["negative", "positive"],
        )
        M.save_trained(built.model, Path(tmp) / "saved", tokenizer=built.tokenizer)
        adapter_dir = export_run(Path(tmp) / "saved", Path(tmp) / "adapter")
        merged_dir = export_run(Path(tmp) / "saved", Path(tmp) / "merged", merge=True)
        base_path = built.model.encoder.base_model.model.name_or_path
        head = built.model.head.eval()
        predict = lambda p: lambda t: p.predict(t, batch_size=args.batch_size)  # noqa: E731
        variants = {
            "lorafit merged": predict(Predictor(merged_dir)),
            "lorafit adapter": predict(Predictor(adapter_dir)),
            "plain loop": plain_loop(base_path, head, args.batch_size, args.max_length),
            "hf pipeline": hf_pipeline(base_path, args.batch_size, args.max_length),
        }
        results = {name: timed(fn, texts, args.runs) for name, fn in variants.items()}

    reference = results["plain loop"]["examples_per_s"]
    report = {
        "model": "minilm (sentence-transformers/all-MiniLM-L6-v2)",
        "examples": len(texts),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "max_length": args.max_length,
        "runs": args.runs,
        "torch": torch.__version__,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(texts)} SST-2 sentences, batch {args.batch_size}, {args.threads} threads")
    print(f"{'variant':<18}{'examples/s':>12}{'median s':>10}{'vs plain loop':>15}")
    for name, r in results.items():
        ratio = r["examples_per_s"] / reference
        print(f"{name:<18}{r['examples_per_s']:>12.1f}{r['median_s']:>10.2f}{ratio:>14.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
