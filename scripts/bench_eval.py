"""Times the lorafit evaluation core against its peers (torch, scikit-learn, torchmetrics, numpy).

Everything runs in one process with one thread count; each timing is the median of
--repeats runs after a warm-up. Writes JSON (--out) and prints a table.

    python scripts/bench_eval.py            # full sizes (several minutes)
    python scripts/bench_eval.py --quick    # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    parser.add_argument("--out", default="bench_results/eval.json", help="JSON output path")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for all")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (>= 5)")
    return parser.parse_args()


ARGS = _parse_args()
# Same thread count for OpenMP (lorafit, torch) before either library starts its pool.
os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lorafit import _C  # noqa: E402
from lorafit.metrics import ClassificationMetrics, TokenMetrics, bootstrap_ci  # noqa: E402

torch.set_num_threads(ARGS.threads)


def timed(function, repeats: int = ARGS.repeats, warmup: int = 1) -> float:
    """Median wall time in seconds."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memcpy_gbps(nbytes: int) -> float:
    """Multi-threaded copy bandwidth, read + write counted."""
    source = torch.ones(nbytes // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), warmup=2)
    return 2 * nbytes / seconds / 1e9


def bench_tokens(rows: int, vocabs: list[int]) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    results = []
    for vocab in vocabs:
        labels = torch.randint(0, vocab, (rows,), generator=generator)
        labels[torch.rand(rows, generator=generator) < 0.1] = -100
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(rows, vocab, generator=generator) * 3).to(dtype)

            def ours(logits=logits, labels=labels):
                metrics = TokenMetrics()
                metrics.update(logits, labels)
                return metrics.compute()

            def peer(logits=logits, labels=labels):
                loss = F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)
                hits = (logits.argmax(-1) == labels).sum()
                return float(loss), int(hits)

            ours_s, peer_s = timed(ours), timed(peer)
            nbytes = logits.numel() * logits.element_size()
            results.append(
                {
                    "rows": rows,
                    "vocab": vocab,
                    "dtype": str(dtype).replace("torch.", ""),
                    "lorafit_s": ours_s,
                    "torch_s": peer_s,
                    "speedup_vs_torch": peer_s / ours_s,
                    "lorafit_gbps": nbytes / ours_s / 1e9,
                    "torch_gbps": nbytes / peer_s / 1e9,
                }
            )
    return results


def _sklearn_suite(logits: np.ndarray, labels: np.ndarray) -> None:
    import sklearn.metrics as skm

    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    preds = probs.argmax(axis=1)
    binary = logits.shape[1] == 2
    scores = probs[:, 1] if binary else probs
    skm.accuracy_score(labels, preds)
    skm.f1_score(labels, preds, average="macro")
    skm.matthews_corrcoef(labels, preds)
    skm.log_loss(labels, probs)
    skm.brier_score_loss(labels, scores)
    skm.roc_auc_score(labels, scores, multi_class="ovr")


def _torchmetrics_suite(logits: torch.Tensor, labels: torch.Tensor) -> None:
    import torchmetrics.functional.classification as tmf

    num_classes = logits.shape[1]
    probs = torch.softmax(logits, dim=1)
    tmf.multiclass_accuracy(probs, labels, num_classes, average="micro")
    tmf.multiclass_f1_score(probs, labels, num_classes, average="macro")
    tmf.multiclass_matthews_corrcoef(probs, labels, num_classes)
    F.cross_entropy(logits, labels)
    ((probs - F.one_hot(labels, num_classes)) ** 2).sum(dim=1).mean()
    tmf.multiclass_calibration_error(probs, labels, num_classes, n_bins=15)
    if num_classes == 2:
        tmf.binary_auroc(probs[:, 1], labels, thresholds=None)
    else:
        tmf.multiclass_auroc(probs, labels, num_classes, average="macro", thresholds=None)


def bench_classification(rows: int, class_counts: list[int]) -> list[dict]:
    rng = np.random.default_rng(0)
    results = []
    for num_classes in class_counts:
        labels = rng.integers(0, num_classes, rows)
        logits = rng.standard_normal((rows, num_classes)).astype(np.float32) * 2
        logits[np.arange(rows), labels] += 1.0  # a better than chance classifier

        def ours(logits=logits, labels=labels, num_classes=num_classes):
            metrics = ClassificationMetrics(num_classes)
            metrics.update(logits, labels)
            return metrics.compute()

        logits_t, labels_t = torch.from_numpy(logits), torch.from_numpy(labels)
        ours_s = timed(ours)
        sklearn_s = timed(lambda: _sklearn_suite(logits, labels))  # noqa: B023
        torchmetrics_s = timed(lambda: _torchmetrics_suite(logits_t, labels_t))  # noqa: B023
        results.append(
            {
                "rows": rows,
                "classes": num_classes,
                "lorafit_s": ours_s,
                "sklearn_s": sklearn_s,
                "torchmetrics_s": torchmetrics_s,
                "speedup_vs_sklearn": sklearn_s / ours_s,
                "speedup_vs_torchmetrics": torchmetrics_s / ours_s,
            }
        )
    return results


def numpy_bootstrap(labels, preds, nll, num_classes, resamples, seed=0):
    """A vectorised numpy percentile bootstrap of accuracy, macro F1 and mean NLL."""
    rng = np.random.default_rng(seed)
    rows = labels.size
    index = rng.integers(0, rows, size=(resamples, rows))
    codes = labels * num_classes + preds
    offsets = (np.arange(resamples) * num_classes * num_classes)[:, None]
    confusion = np.bincount((codes[index] + offsets).ravel(), minlength=resamples * num_classes**2)
    confusion = confusion.reshape(resamples, num_classes, num_classes)
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    denominator = confusion.sum(axis=1) + confusion.sum(axis=2)
    present = denominator > 0
    f1 = np.where(present, 2 * hits / np.maximum(denominator, 1), 0.0)
    statistics_ = {
        "accuracy": hits.sum(axis=1) / rows,
        "f1_macro": f1.sum(axis=1) / present.sum(axis=1),
        "nll": nll[index].mean(axis=1),
    }
    return {key: np.quantile(value, [0.025, 0.975]) for key, value in statistics_.items()}


def bench_bootstrap(rows: int, num_classes: int, resamples: int) -> dict:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, num_classes, rows)
    preds = np.where(rng.random(rows) < 0.7, labels, rng.integers(0, num_classes, rows))
    nll = rng.exponential(size=rows)
    ours_s = timed(lambda: bootstrap_ci(labels, preds, nll, num_classes, resamples))
    numpy_s = timed(lambda: numpy_bootstrap(labels, preds, nll, num_classes, resamples))
    return {
        "rows": rows,
        "classes": num_classes,
        "resamples": resamples,
        "lorafit_s": ours_s,
        "numpy_s": numpy_s,
        "speedup_vs_numpy": numpy_s / ours_s,
    }


def main() -> None:
    quick = ARGS.quick
    token_rows = 256 if quick else 4096
    class_rows = 100_000 if quick else 1_000_000
    report = {
        "quick": quick,
        "threads": ARGS.threads,
        "lorafit_threads": _C.max_threads(),
        "torch_threads": torch.get_num_threads(),
        "repeats": max(ARGS.repeats, 5),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "memcpy_gbps": memcpy_gbps(512 * 2**20 if not quick else 64 * 2**20),
    }
    report["token"] = bench_tokens(token_rows, [32000, 49152])
    report["classification"] = bench_classification(class_rows, [2, 10])
    report["bootstrap"] = bench_bootstrap(10_000, 10, 200 if quick else 1000)

    out = Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {out}")


def print_table(report: dict) -> None:
    print(f"threads={report['threads']}  memcpy {report['memcpy_gbps']:.1f} GB/s (read+write)")
    print("\nToken CE + top-1 accuracy (median seconds; GB/s of logits read)")
    print(f"{'T':>6} {'V':>6} {'dtype':>9} {'lorafit':>9} {'torch':>9} {'ratio':>7} "
          f"{'GB/s':>7} {'torch GB/s':>10}")  # fmt: skip
    for r in report["token"]:
        print(f"{r['rows']:>6} {r['vocab']:>6} {r['dtype']:>9} {r['lorafit_s']:>9.4f} "
              f"{r['torch_s']:>9.4f} {r['speedup_vs_torch']:>6.1f}x {r['lorafit_gbps']:>7.1f} "
              f"{r['torch_gbps']:>10.1f}")  # fmt: skip
    print("\nClassification suite (median seconds)")
    print(f"{'N':>9} {'C':>4} {'lorafit':>9} {'sklearn':>9} {'ratio':>7} {'torchmetrics':>12} "
          f"{'ratio':>7}")  # fmt: skip
    for r in report["classification"]:
        print(f"{r['rows']:>9} {r['classes']:>4} {r['lorafit_s']:>9.4f} {r['sklearn_s']:>9.3f} "
              f"{r['speedup_vs_sklearn']:>6.1f}x {r['torchmetrics_s']:>12.3f} "
              f"{r['speedup_vs_torchmetrics']:>6.1f}x")  # fmt: skip
    b = report["bootstrap"]
    print(f"\nBootstrap CIs (accuracy, macro F1, mean NLL), B={b['resamples']}, N={b['rows']}, "
          f"C={b['classes']}: lorafit {b['lorafit_s']:.4f}s, numpy {b['numpy_s']:.4f}s, "
          f"{b['speedup_vs_numpy']:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
