"""Plain numpy/torch ground truth for every kernel in `lorafit._C`, with the same signatures.

Written for clarity, not speed: tests compare the C++ core against it, and
LORAFIT_FORCE_REFERENCE=1 runs lorafit.metrics on it (debugging only).
"""

from __future__ import annotations

import numpy as np
import torch

FLOAT32, FLOAT16, BFLOAT16, FLOAT64 = 0, 1, 2, 3


def max_threads() -> int:
    return 1


def _to_numpy_float(logits: np.ndarray, dtype_code: int) -> np.ndarray:
    """Decodes a logits buffer to float32 (or float64 for float64 input), exactly."""
    if dtype_code == BFLOAT16:
        return (logits.astype(np.uint32) << 16).view(np.float32)
    if dtype_code == FLOAT16:
        return logits.view(np.float16).astype(np.float32)
    return logits


def _first_nan_row(x: np.ndarray, rows: np.ndarray | None = None) -> int:
    nan_rows = np.isnan(x).any(axis=1)
    if rows is not None:
        nan_rows &= rows
    hits = np.flatnonzero(nan_rows)
    return int(hits[0]) if hits.size else -1


def token_stats(logits, dtype_code, labels, ignore_index):
    # Token kernels compute in float32: float64 input is rounded first.
    x = _to_numpy_float(logits, dtype_code).astype(np.float32)
    rows = labels.shape[0]
    valid = labels != ignore_index
    nll = np.zeros(rows)
    rank = np.full(rows, -1, dtype=np.int64)
    first_nan = _first_nan_row(x, valid)
    if valid.any():
        xv = torch.from_numpy(x[valid]).double()
        y = torch.from_numpy(labels[valid])
        nll[valid] = -torch.log_softmax(xv, dim=-1).gather(1, y[:, None])[:, 0].numpy()
        label_logit = xv.gather(1, y[:, None])
        index = torch.arange(xv.shape[1])[None, :]
        beats = (xv > label_logit) | ((xv == label_logit) & (index < y[:, None]))
        rank[valid] = beats.sum(dim=1).numpy()
    return nll, rank, first_nan


def classification_update(
    logits,
    dtype_code,
    labels,
    confusion,
    ece_count,
    ece_conf_sum,
    ece_correct,
    sums,
    counts,
    scores,
):
    x = _to_numpy_float(logits, dtype_code).astype(np.float64)
    first_nan = _first_nan_row(x)
    if first_nan >= 0:
        return first_nan
    rows, num_classes = x.shape
    xt = torch.from_numpy(x)
    y = torch.from_numpy(labels)
    probs = torch.softmax(xt, dim=-1)
    nll = -torch.log_softmax(xt, dim=-1).gather(1, y[:, None])[:, 0]
    onehot = torch.nn.functional.one_hot(y, num_classes).double()
    brier = ((probs - onehot) ** 2).sum(dim=1) * (0.5 if num_classes == 2 else 1.0)
    pred = xt.argmax(dim=1).numpy()  # first maximal index
    confidence = probs.max(dim=1).values.numpy()

    np.add.at(confusion.reshape(num_classes, num_classes), (labels, pred), 1)
    finite = ~np.isnan(confidence)
    bins = ece_count.shape[0]
    bin_index = np.minimum(np.floor(confidence[finite] * bins).astype(np.int64), bins - 1)
    np.add.at(ece_count, bin_index, 1)
    np.add.at(ece_conf_sum, bin_index, confidence[finite])
    np.add.at(ece_correct, bin_index, (pred == labels)[finite].astype(np.int64))
    sums[0] += float(nll.sum())
    sums[1] += float(brier.sum())
    counts[0] += rows
    counts[1] += int((~finite).sum())
    if scores is not None:
        chosen = probs[:, 1] if num_classes == 2 else probs.T  # class-major [C, rows]
        scores[...] = chosen.numpy().astype(np.float32)
    return -1


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], values.size]
    ranks = np.empty(values.size)
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    return ranks


def _binary_rank_metrics(positive: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or np.isnan(score).any():
        return float("nan"), float("nan")
    auroc = float("nan")
    if n_neg > 0:
        ranks = _average_ranks(score)
        auroc = (ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    order = np.argsort(-score, kind="stable")
    ordered = score[order]
    last_of_threshold = np.r_[ordered[1:] != ordered[:-1], True]
    true_pos = np.cumsum(positive[order])[last_of_threshold]
    seen = (np.flatnonzero(last_of_threshold) + 1).astype(np.float64)
    precision = true_pos / seen
    recall = true_pos / n_pos
    average_precision = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return float(auroc), average_precision


def rank_metrics(labels, scores):
    if scores.ndim == 1:
        auroc, ap = _binary_rank_metrics(labels == 1, scores.astype(np.float64))
        return np.array([auroc]), np.array([ap])
    results = [
        _binary_rank_metrics(labels == k, scores[k].astype(np.float64))
        for k in range(scores.shape[0])
    ]
    return np.array([r[0] for r in results]), np.array([r[1] for r in results])


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _lowbias32(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))


def _draws(rows: int, replicates: int, seed: int) -> np.ndarray:
    """[replicates, rows] uint32: lowbias32(j * (k_lo | 1) + k_hi), k per replicate."""
    with np.errstate(over="ignore"):
        first = _splitmix64(np.array([seed], dtype=np.uint64))
        keys = _splitmix64(first + np.arange(replicates, dtype=np.uint64))
        stride = ((keys & np.uint64(0xFFFFFFFF)) | np.uint64(1)).astype(np.uint32)[:, None]
        offset = (keys >> np.uint64(32)).astype(np.uint32)[:, None]
        j = np.arange(rows, dtype=np.uint32)[None, :]
        return _lowbias32(j * stride + offset)


def bootstrap_rows(rows: int, replicates: int, seed: int) -> np.ndarray:
    """[replicates, rows] row indices: (draw * rows) >> 32."""
    draws = _draws(rows, replicates, seed).astype(np.uint64)
    return ((draws * np.uint64(rows)) >> np.uint64(32)).astype(np.int64)


def permutation_swaps(rows: int, replicates: int, seed: int) -> np.ndarray:
    """[replicates, rows] coin flips: the top bit of each draw."""
    return (_draws(rows, replicates, seed) >> np.uint32(31)) == 1


def _macro_f1(label_count, pred_count, hit_count):
    denominator = label_count + pred_count
    present = denominator > 0
    f1 = np.where(present, 2.0 * hit_count / np.maximum(denominator, 1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return f1.sum(axis=1) / present.sum(axis=1)


def resample_stats(labels, preds_a, preds_b, values, num_classes, replicates, seed, permute):
    rows = labels.shape[0]
    if permute:
        swap = permutation_swaps(rows, replicates, seed)
        index = np.broadcast_to(np.arange(rows), swap.shape)
    else:
        index = bootstrap_rows(rows, replicates, seed)
        swap = np.zeros(index.shape, dtype=bool)
    y = labels[index]
    a, b = preds_a[index], (preds_b[index] if preds_b is not None else None)
    if b is not None:
        a, b = np.where(swap, b, a), np.where(swap, a, b)
    offset = (np.arange(replicates) * num_classes)[:, None]

    def per_replicate_counts(classes, weights=None):
        counts = np.bincount(
            (offset + classes).ravel(),
            weights=None if weights is None else weights.ravel(),
            minlength=replicates * num_classes,
        )
        return counts.reshape(replicates, num_classes)

    label_count = per_replicate_counts(y)
    out = np.full((replicates, 5), np.nan)
    for column, preds in ((0, a), (2, b)):
        if preds is None:
            continue
        pred_count = per_replicate_counts(preds)
        hit_count = per_replicate_counts(y, (preds == y).astype(np.float64))
        out[:, column] = hit_count.sum(axis=1) / rows
        out[:, column + 1] = _macro_f1(label_count, pred_count, hit_count)
    if values is not None:
        out[:, 4] = values[index].mean(axis=1)
    return out
