"""Resampling statistics on per-example arrays: bootstrap CIs and paired tests."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from lorafit.metrics._backend import as_labels, check_label_range, kernels

# Columns of the resample_stats kernel output.
_ACCURACY_A, _F1_A, _ACCURACY_B, _F1_B, _MEAN_VALUE = range(5)
_METRIC_COLUMNS = {"accuracy": (_ACCURACY_A, _ACCURACY_B), "f1_macro": (_F1_A, _F1_B)}


class ConfidenceInterval(NamedTuple):
    estimate: float
    low: float
    high: float
    level: float


class PairedTest(NamedTuple):
    """System A minus system B on the same examples."""

    metric: str
    difference: float
    low: float  # CI of the difference (paired percentile bootstrap)
    high: float
    p_value: float  # two-sided
    n_resamples: int
    level: float


def bootstrap_ci(
    labels,
    preds,
    nll=None,
    num_classes: int | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, ConfidenceInterval]:
    """Percentile bootstrap CIs for accuracy, macro F1 and (if `nll` is given) mean NLL.

    One set of resampled rows serves all three metrics; the same seed gives the same CIs.
    """
    y, a, _, num_classes = _prepare(labels, preds, None, num_classes)
    values = None if nll is None else _values(nll, y.shape[0])
    stats = _resample(y, a, None, values, num_classes, n_resamples, level, seed, permute=False)
    accuracy, f1_macro = _accuracy_f1(y, a, num_classes)
    result = {
        "accuracy": _percentile_ci(accuracy, stats[:, _ACCURACY_A], level),
        "f1_macro": _percentile_ci(f1_macro, stats[:, _F1_A], level),
    }
    if values is not None:
        result["nll"] = _percentile_ci(float(values.mean()), stats[:, _MEAN_VALUE], level)
    return result


def paired_bootstrap_test(
    labels,
    preds_a,
    preds_b,
    metric: str = "accuracy",
    num_classes: int | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedTest:
    """Paired bootstrap: resample examples, recompute metric(A) - metric(B).

    p-value: (1 + #{|delta* - delta| >= |delta|}) / (B + 1), i.e. how often the
    bootstrap distribution, shifted to the null of no difference, is as extreme.
    """
    difference, deltas = _paired_deltas(
        labels, preds_a, preds_b, metric, num_classes, n_resamples, level, seed, permute=False
    )
    extreme = np.abs(deltas - difference) >= abs(difference) - 1e-12
    return _paired_result(metric, difference, deltas, extreme, level)


def permutation_test(
    labels,
    preds_a,
    preds_b,
    metric: str = "accuracy",
    num_classes: int | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedTest:
    """Paired permutation test: swap A's and B's predictions on each example by a coin.

    p-value: (1 + #{|delta_perm| >= |delta|}) / (B + 1). The CI is the paired bootstrap
    CI of the difference (same seed), since permutations only describe the null.
    """
    difference, permuted = _paired_deltas(
        labels, preds_a, preds_b, metric, num_classes, n_resamples, level, seed, permute=True
    )
    _, deltas = _paired_deltas(
        labels, preds_a, preds_b, metric, num_classes, n_resamples, level, seed, permute=False
    )
    extreme = np.abs(permuted) >= abs(difference) - 1e-12
    return _paired_result(metric, difference, deltas, extreme, level)


def mean_ci(values, level: float = 0.95) -> ConfidenceInterval:
    """Mean with a Student-t interval (e.g. over seeds); low/high are NaN for one value."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    _check_level(level)
    mean = float(x.mean())
    if x.size == 1:
        return ConfidenceInterval(mean, float("nan"), float("nan"), level)
    standard_error = float(x.std(ddof=1)) / math.sqrt(x.size)
    half_width = student_t_quantile(0.5 + level / 2, x.size - 1) * standard_error
    return ConfidenceInterval(mean, mean - half_width, mean + half_width, level)


def student_t_quantile(probability: float, df: float) -> float:
    """Quantile of Student's t (bisection on the CDF; no scipy needed at run time)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while _student_t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if _student_t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def _student_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t >= 0 else tail


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by Lentz's continued fraction (Numerical Recipes, betacf)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _regularized_beta(1.0 - x, b, a)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _prepare(labels, preds_a, preds_b, num_classes):
    y = as_labels(labels, "labels")
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {list(y.shape)}")
    names = ["preds"] if preds_b is None else ["preds_a", "preds_b"]
    arrays = [as_labels(preds, name) for preds, name in zip((preds_a, preds_b), names)]
    for name, array in zip(names, arrays):
        if array.shape != y.shape:
            raise ValueError(f"{name} must have shape {list(y.shape)}, got {list(array.shape)}")
    if num_classes is None:
        num_classes = max(int(array.max()) for array in [y, *arrays]) + 1
    for name, array in zip(["labels", *names], [y, *arrays]):
        check_label_range(array, num_classes, name=name)
    return y, arrays[0], (arrays[1] if preds_b is not None else None), int(num_classes)


def _values(values, rows: int) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(values, dtype=np.float64).reshape(-1))
    if x.shape != (rows,):
        raise ValueError(f"nll must have shape [{rows}], got {list(np.shape(values))}")
    if np.isnan(x).any():
        raise ValueError(f"nll contains NaN (first at index {int(np.flatnonzero(np.isnan(x))[0])})")
    return x


def _resample(y, a, b, values, num_classes, n_resamples, level, seed, permute):
    _check_level(level)
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be a non-negative 64-bit integer, got {seed}")
    return kernels.resample_stats(
        y, a, b, values, num_classes, int(n_resamples), int(seed), permute
    )


def _accuracy_f1(y: np.ndarray, preds: np.ndarray, num_classes: int) -> tuple[float, float]:
    label_count = np.bincount(y, minlength=num_classes)
    pred_count = np.bincount(preds, minlength=num_classes)
    hits = np.bincount(y[preds == y], minlength=num_classes)
    denominator = label_count + pred_count
    present = denominator > 0
    f1 = 2.0 * hits[present] / denominator[present]
    return float(hits.sum() / y.size), float(f1.mean())


def _percentile_ci(estimate: float, replicates: np.ndarray, level: float) -> ConfidenceInterval:
    low, high = np.quantile(replicates, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return ConfidenceInterval(float(estimate), float(low), float(high), level)


def _paired_deltas(
    labels, preds_a, preds_b, metric, num_classes, n_resamples, level, seed, permute
):
    if metric not in _METRIC_COLUMNS:
        raise ValueError(f"metric must be one of {sorted(_METRIC_COLUMNS)}, got {metric!r}")
    y, a, b, num_classes = _prepare(labels, preds_a, preds_b, num_classes)
    stats = _resample(y, a, b, None, num_classes, n_resamples, level, seed, permute)
    column_a, column_b = _METRIC_COLUMNS[metric]
    index = 0 if metric == "accuracy" else 1
    difference = _accuracy_f1(y, a, num_classes)[index] - _accuracy_f1(y, b, num_classes)[index]
    return difference, stats[:, column_a] - stats[:, column_b]


def _paired_result(metric, difference, deltas, extreme, level) -> PairedTest:
    low, high = np.quantile(deltas, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    p_value = (1.0 + float(extreme.sum())) / (deltas.size + 1.0)
    return PairedTest(
        metric, float(difference), float(low), float(high), p_value, int(deltas.size), level
    )
