"""Streaming classification metrics over logits, mergeable across ranks."""

from __future__ import annotations

import numpy as np

from lorafit.metrics._backend import as_labels, as_logits, check_label_range, kernels, raise_if_nan

_COUNTER_KEYS = ("confusion", "ece_count", "ece_conf_sum", "ece_correct", "sums", "counts")


class ClassificationMetrics:
    """Accumulates logits[N, C] and labels[N] batch by batch; `compute()` gives the metrics.

    Logits are never stored. For AUROC/AUPRC the accumulator keeps float32 probabilities:
    4 bytes per example when C == 2, 4*C bytes per example otherwise (plus 8 bytes for the
    label); `state()["scores"]` is [N] (C == 2) or class-major [C, N]. Pass
    `store_scores=False` to skip them (auroc and auprc are then NaN).
    """

    def __init__(self, num_classes: int, ece_bins: int = 15, store_scores: bool = True):
        if num_classes != int(num_classes) or int(num_classes) < 2:
            raise ValueError(f"num_classes must be a whole number >= 2, got {num_classes}")
        if int(ece_bins) < 1:
            raise ValueError(f"ece_bins must be >= 1, got {ece_bins}")
        self.num_classes = int(num_classes)
        self.ece_bins = int(ece_bins)
        self.store_scores = bool(store_scores)
        self.reset()

    def reset(self) -> None:
        c, bins = self.num_classes, self.ece_bins
        self._counters = {
            "confusion": np.zeros((c, c), dtype=np.int64),
            "ece_count": np.zeros(bins, dtype=np.int64),
            "ece_conf_sum": np.zeros(bins, dtype=np.float64),
            "ece_correct": np.zeros(bins, dtype=np.int64),
            "sums": np.zeros(2, dtype=np.float64),  # nll, Brier
            "counts": np.zeros(2, dtype=np.int64),  # examples, examples with NaN softmax
        }
        self._labels: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []

    @property
    def n(self) -> int:
        return int(self._counters["counts"][0])

    def _score_shape(self, rows: int) -> tuple[int, ...]:
        # class-major for C > 2, so the ranking kernel reads each class contiguously
        return (rows,) if self.num_classes == 2 else (self.num_classes, rows)

    def update(self, logits, labels) -> None:
        """Adds a batch: logits [N, C] (float32/float16/bfloat16/float64), labels [N]."""
        x, dtype_code = as_logits(logits)
        y = as_labels(labels)
        if x.ndim != 2 or x.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape [N, {self.num_classes}], got {list(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"labels must have shape [{x.shape[0]}] to match logits, got {list(y.shape)}"
            )
        if x.shape[0] == 0:
            return
        check_label_range(y, self.num_classes)
        scores = np.empty(self._score_shape(x.shape[0]), np.float32) if self.store_scores else None
        c = self._counters
        first_nan_row = kernels.classification_update(
            x,
            dtype_code,
            y,
            c["confusion"],
            c["ece_count"],
            c["ece_conf_sum"],
            c["ece_correct"],
            c["sums"],
            c["counts"],
            scores,
        )
        raise_if_nan(first_nan_row)
        if self.store_scores:
            self._labels.append(y)
            self._scores.append(scores)

    def state(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (copies) describing everything seen so far."""
        state = {key: value.copy() for key, value in self._counters.items()}
        state["num_classes"] = np.array(self.num_classes)
        state["ece_bins"] = np.array(self.ece_bins)
        if self.store_scores:
            state["labels"] = _concat(self._labels, np.zeros(0, np.int64))
            state["scores"] = _concat(self._scores, np.zeros(self._score_shape(0), np.float32))
        return state

    def merge(self, state: dict) -> None:
        """Adds another accumulator's `state()` (e.g. from another rank)."""
        if int(state["num_classes"]) != self.num_classes or int(state["ece_bins"]) != self.ece_bins:
            raise ValueError(
                f"cannot merge a state with num_classes={int(state['num_classes'])}, "
                f"ece_bins={int(state['ece_bins'])} into num_classes={self.num_classes}, "
                f"ece_bins={self.ece_bins}"
            )
        if self.store_scores and "scores" not in state:
            raise ValueError("cannot merge a state without scores into store_scores=True")
        for key in _COUNTER_KEYS:
            self._counters[key] += np.asarray(state[key], dtype=self._counters[key].dtype)
        if self.store_scores:
            self._labels.append(np.ascontiguousarray(state["labels"], dtype=np.int64))
            self._scores.append(np.ascontiguousarray(state["scores"], dtype=np.float32))

    def compute(self) -> dict:
        c = self._counters
        n = self.n
        confusion = c["confusion"].copy()
        hits = np.diag(confusion).astype(np.float64)
        pred_count = confusion.sum(axis=0).astype(np.float64)
        label_count = confusion.sum(axis=1).astype(np.float64)
        precision = _safe_ratio(hits, pred_count)
        recall = _safe_ratio(hits, label_count)
        f1 = _safe_ratio(2.0 * hits, pred_count + label_count)
        present = (pred_count + label_count) > 0
        nan = float("nan")
        result = {
            "n": n,
            "accuracy": nan, "f1_macro": nan, "f1_micro": nan, "f1_weighted": nan,
            "precision": precision, "recall": recall, "f1": f1,
            "mcc": nan, "confusion_matrix": confusion,
            "nll": nan, "brier": nan, "ece": nan, "auroc": nan, "auprc": nan,
        }  # fmt: skip
        if n == 0:
            return result
        accuracy = hits.sum() / n
        result.update(
            accuracy=float(accuracy),
            f1_macro=float(f1[present].mean()),
            f1_micro=float(accuracy),  # single-label: micro F1 equals accuracy
            f1_weighted=float((f1 * label_count).sum() / n),
            mcc=_mcc(hits.sum(), float(n), pred_count, label_count),
            nll=float(c["sums"][0] / n),
            brier=float(c["sums"][1] / n),
        )
        if c["counts"][1] == 0:
            gap = np.abs(c["ece_correct"] - c["ece_conf_sum"]).sum()
            result["ece"] = float(gap / n)
        if self.store_scores:
            result["auroc"], result["auprc"] = self._rank_metrics()
        return result

    def _rank_metrics(self) -> tuple[float, float]:
        labels = _concat(self._labels, np.zeros(0, np.int64))
        scores = _concat(self._scores, np.zeros(self._score_shape(0), np.float32))
        self._labels, self._scores = [labels], [scores]  # concatenate once, not per compute
        auroc, average_precision = kernels.rank_metrics(labels, scores)
        return _mean_defined(auroc), _mean_defined(average_precision)


def _concat(chunks: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    if not chunks:
        return empty
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=-1)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)


def _mcc(correct: float, n: float, pred_count: np.ndarray, label_count: np.ndarray) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K, as scikit-learn); 0 when undefined."""
    covariance = correct * n - float(pred_count @ label_count)
    spread = (n * n - float(pred_count @ pred_count)) * (n * n - float(label_count @ label_count))
    return float(covariance / np.sqrt(spread)) if spread > 0 else 0.0


def _mean_defined(values: np.ndarray) -> float:
    """Macro average over classes where the value is defined (one value when binary)."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")
