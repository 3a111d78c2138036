"""Resampling statistics on per-example arrays: bootstrap CIs and paired tests."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from lorafit.metrics._backend import as_labels, check_label_range, kernels

# Columns of the resample_stats kernel output.
_ACCURACY_A, _F1_A, _ACCURACY_B, _F1_B, _MEAN_VALUE = range(5)
_METRIC_COLUMNS = {"accuracy": (_ACCURACY_A, _ACCURACY_B), "f1_macro": (_F1_A, _F1_B)}
# Per-class count kinds of hierarchical_paired_test, per seed.
_LABEL, _PRED_A, _HIT_A, _PRED_B, _HIT_B = range(5)
_COUNT_KINDS = 5
# Replicates are drawn in chunks of about this many weights, to bound memory.
_CHUNK_ELEMENTS = 1 << 22


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


class HierarchicalPairedTest(NamedTuple):
    """System A minus system B over several seeds (one run of each per seed) on shared test rows."""

    metric: str
    difference: float  # mean over seeds of metric(A) - metric(B)
    low: float  # CI of the difference: seed spread (Student t) plus test-row bootstrap
    high: float
    p_bootstrap: float  # two-sided, of the same interval's t statistic
    p_permutation: float  # two-sided, whole runs swapped per seed
    seed_differences: tuple[float, ...]  # metric(A) - metric(B) of each seed, in input order
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
    return _paired_result(metric, difference, deltas, _shifted_extremes(difference, deltas), level)


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


def hierarchical_paired_test(
    rows: Sequence,
    labels: Sequence,
    preds_a: Sequence,
    preds_b: Sequence,
    metric: str = "accuracy",
    num_classes: int | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> HierarchicalPairedTest:
    """Paired test of A against B over seeds, each seed one run of A and one of B.

    `rows[s]`, `labels[s]`, `preds_a[s]`, `preds_b[s]` are seed s's 1-D arrays; `rows[s]` are
    test row ids, and a row id names the same example in every seed (a seed may lack some).
    The statistic is the mean over seeds of metric(A) - metric(B) on that seed's rows.

    The standard error has two parts. The seeds' part is the sample variance of the per-seed
    differences over S, read with Student's t: with 3 seeds a bootstrap over seeds is far too
    narrow (its 95% interval called a true null difference significant in 12-17% of simulated
    comparisons). The test rows' part is the variance of the difference when the test rows,
    shared by every seed, are resampled with every seed kept (n_resamples replicates). The
    interval is difference +- t * se, and p_bootstrap the two-sided p of difference / se, with
    Welch-Satterthwaite degrees of freedom: S - 1 when the seeds dominate, many when the rows
    do (one seed: the paired bootstrap's normal interval). p_permutation swaps A's and B's
    whole runs per seed: under the null that the two methods are exchangeable, either run of a
    seed could carry either name, while rows of one run share its training and cannot be
    swapped one by one. It is exact over all 2^S swaps when they fit in n_resamples, so with S
    seeds it cannot go below 2 / 2^S.
    """
    _check_level(level)
    if metric not in _METRIC_COLUMNS:
        raise ValueError(f"metric must be one of {sorted(_METRIC_COLUMNS)}, got {metric!r}")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    counts = {
        "rows": len(rows),
        "labels": len(labels),
        "preds_a": len(preds_a),
        "preds_b": len(preds_b),
    }
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"give one array per seed in each of rows, labels, preds_a, preds_b; got {counts}"
        )
    indicators, n_seeds = _cluster_indicators(rows, labels, preds_a, preds_b, num_classes)
    seed_differences = _seed_differences(indicators.sum(axis=0), n_seeds, metric)
    difference = float(seed_differences.mean())

    rng = np.random.default_rng(seed)
    n_resamples = int(n_resamples)
    chunk = max(1, _CHUNK_ELEMENTS // max(indicators.shape))
    sizes = [min(chunk, n_resamples - start) for start in range(0, n_resamples, chunk)]
    deltas = np.concatenate(
        [_row_replicates(rng, indicators, n_seeds, size, metric) for size in sizes]
    )
    deltas = deltas[np.isfinite(deltas)]  # replicates where a seed drew none of its rows
    row_variance = float(deltas.var(ddof=1)) if deltas.size > 1 else 0.0
    seed_variance = float(seed_differences.var(ddof=1)) / n_seeds if n_seeds > 1 else 0.0
    low, high, p_value = _t_interval(difference, seed_variance, row_variance, n_seeds, level)
    return HierarchicalPairedTest(
        metric=metric,
        difference=difference,
        low=low,
        high=high,
        p_bootstrap=p_value,
        p_permutation=_seed_swap_p_value(seed_differences, n_resamples, rng),
        seed_differences=tuple(float(d) for d in seed_differences),
        n_resamples=int(deltas.size),
        level=level,
    )


def _t_interval(
    difference: float, seed_variance: float, row_variance: float, n_seeds: int, level: float
) -> tuple[float, float, float]:
    """(low, high, two-sided p) of `difference` with standard error sqrt(seed_variance +
    row_variance) and Welch-Satterthwaite degrees of freedom (seed part: n_seeds - 1)."""
    variance = seed_variance + row_variance
    if variance <= 0.0:  # every seed and every resample agree
        return difference, difference, 1.0 if difference == 0.0 else 0.0
    df = variance**2 * (n_seeds - 1) / seed_variance**2 if seed_variance > 0.0 else math.inf
    se = math.sqrt(variance)
    if math.isinf(df) or df > 1e6:
        quantile = statistics.NormalDist().inv_cdf(0.5 + level / 2)
        p_value = math.erfc(abs(difference) / se / math.sqrt(2.0))
    else:
        quantile = student_t_quantile(0.5 + level / 2, df)
        p_value = 2.0 * (1.0 - _student_t_cdf(abs(difference) / se, df))
    return difference - quantile * se, difference + quantile * se, min(1.0, p_value)


def token_bootstrap_ci(
    nll_sum,
    n_tokens,
    top1=None,
    top5=None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, ConfidenceInterval]:
    """Percentile bootstrap CIs of causal-LM token metrics, resampling examples (not tokens).

    Each replicate is a ratio of sums over resampled examples, as the point estimates are:
    loss = sum(nll_sum) / sum(n_tokens), perplexity = exp(loss), topk_accuracy = hits / tokens.
    """
    _check_level(level)
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    tokens = np.asarray(n_tokens, dtype=np.float64).reshape(-1)
    n = tokens.size
    if n == 0 or tokens.sum() <= 0:
        raise ValueError("token_bootstrap_ci needs at least one example with scored tokens")
    columns = {"loss": _values(nll_sum, n)}
    for name, hits in (("top1_accuracy", top1), ("top5_accuracy", top5)):
        if hits is not None:
            columns[name] = _values(hits, n)
    rng = np.random.default_rng(int(seed))
    per_chunk = max(1, _CHUNK_ELEMENTS // n)
    replicates = {name: [] for name in columns}
    for start in range(0, int(n_resamples), per_chunk):
        rows = rng.integers(0, n, size=(min(per_chunk, int(n_resamples) - start), n))
        # a replicate whose examples hold no tokens has no ratio: NaN, then dropped
        denominator = tokens[rows].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            for name, values in columns.items():
                replicates[name].append(values[rows].sum(1) / denominator)
    result = {}
    total = tokens.sum()
    for name, values in columns.items():
        draws = np.concatenate(replicates[name])
        draws = draws[~np.isnan(draws)]
        bounds = _percentile_bounds(draws, level) if draws.size else (math.nan, math.nan)
        result[name] = ConfidenceInterval(float(values.sum() / total), *bounds, level)
    loss = result["loss"]
    with np.errstate(over="ignore"):
        result["perplexity"] = ConfidenceInterval(
            *(float(np.exp(v)) for v in (loss.estimate, loss.low, loss.high)), level
        )
    return result


def mean_ci(values, level: float = 0.95) -> ConfidenceInterval:
    """Mean with a Student-t interval (e.g. over seeds); low/high are NaN for one value."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.isfinite(x).all():
        first = int(np.flatnonzero(~np.isfinite(x))[0])
        raise ValueError(f"mean_ci needs finite values; values[{first}] is {x[first]}")
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
    if seed != int(seed) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be a non-negative 64-bit integer, got {seed}")
    return kernels.resample_stats(
        y, a, b, values, num_classes, int(n_resamples), int(seed), permute
    )


def _accuracy_f1(y: np.ndarray, preds: np.ndarray, num_classes: int) -> tuple[float, float]:
    label_count = np.bincount(y, minlength=num_classes)
    pred_count = np.bincount(preds, minlength=num_classes)
    hits = np.bincount(y[preds == y], minlength=num_classes)
    counts = (label_count, pred_count, hits)
    accuracy, f1_macro = (float(_metric_from_counts(*counts, m)) for m in ("accuracy", "f1_macro"))
    return accuracy, f1_macro


def _metric_from_counts(label_count, pred_count, hit_count, metric: str) -> np.ndarray:
    """Accuracy or macro F1 from per-class counts [..., classes]; NaN where there are no rows.

    Macro F1 averages over the classes present in the labels or the predictions.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "accuracy":
            return hit_count.sum(axis=-1) / label_count.sum(axis=-1)
        denominator = label_count + pred_count
        present = denominator > 0
        f1 = np.where(present, 2.0 * hit_count / np.maximum(denominator, 1), 0.0)
        return f1.sum(axis=-1) / present.sum(axis=-1)


def _percentile_bounds(replicates: np.ndarray, level: float) -> tuple[float, float]:
    quantiles = [(1.0 - level) / 2.0, (1.0 + level) / 2.0]
    with np.errstate(invalid="ignore"):
        bounds = np.quantile(replicates, quantiles)
    # between two infinite replicates (an inf NLL) the interpolation is inf - inf = NaN
    bounds = np.where(
        np.isnan(bounds), np.quantile(replicates, quantiles, method="nearest"), bounds
    )
    return float(bounds[0]), float(bounds[1])


def _percentile_ci(estimate: float, replicates: np.ndarray, level: float) -> ConfidenceInterval:
    return ConfidenceInterval(float(estimate), *_percentile_bounds(replicates, level), level)


def _shifted_extremes(difference: float, deltas: np.ndarray) -> np.ndarray:
    """Replicates as extreme as `difference` once the bootstrap distribution is shifted to the
    null of no difference: |delta* - difference| >= |difference|."""
    return np.abs(deltas - difference) >= abs(difference) - 1e-12


def _monte_carlo_p_value(extreme: np.ndarray) -> float:
    return (1.0 + float(extreme.sum())) / (extreme.size + 1.0)


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
    low, high = _percentile_bounds(deltas, level)
    p_value = _monte_carlo_p_value(extreme)
    return PairedTest(metric, float(difference), low, high, p_value, int(deltas.size), level)


def _cluster_indicators(rows, labels, preds_a, preds_b, num_classes) -> tuple[np.ndarray, int]:
    """[clusters, seeds * kinds * classes] 0/1 indicators of each test row's label, and of A's
    and B's prediction and hit, in every seed (zero where a seed lacks the row), so that
    multiplicities @ indicators gives every seed's class counts under any resampling of rows.
    Returns them with the number of seeds."""
    per_seed = list(zip(rows, labels, preds_a, preds_b, strict=True))
    if not per_seed:
        raise ValueError("hierarchical_paired_test needs at least one seed")
    for s, arrays in enumerate(per_seed):
        shapes = [list(np.shape(array)) for array in arrays]
        if len(shapes[0]) != 1 or shapes[0] == [0] or any(shape != shapes[0] for shape in shapes):
            raise ValueError(
                f"seed {s}: rows, labels, preds_a and preds_b must be non-empty 1-D arrays of "
                f"one length, got shapes {shapes}"
            )
    row_ids = [as_labels(seed_rows, f"rows[{s}]") for s, (seed_rows, *_) in enumerate(per_seed)]
    for s, ids in enumerate(row_ids):
        if np.unique(ids).size != ids.size:
            raise ValueError(f"rows[{s}] repeats a row id")
    seed_of = np.repeat(np.arange(len(per_seed)), [ids.size for ids in row_ids])
    y, a, b, num_classes = _prepare(
        *(np.concatenate([np.asarray(arrays[i]) for arrays in per_seed]) for i in (1, 2, 3)),
        num_classes,
    )
    clusters, cluster_of = np.unique(np.concatenate(row_ids), return_inverse=True)
    label_of_cluster = np.empty(clusters.size, dtype=np.int64)
    label_of_cluster[cluster_of] = y
    mismatched = np.flatnonzero(label_of_cluster[cluster_of] != y)
    if mismatched.size:
        row = int(clusters[cluster_of[mismatched[0]]])
        raise ValueError(f"test row {row} has different labels in different seeds")

    indicators = np.zeros((clusters.size, len(per_seed), _COUNT_KINDS, num_classes))
    at = (cluster_of, seed_of)
    indicators[(*at, _LABEL, y)] = 1.0
    indicators[(*at, _PRED_A, a)] = 1.0
    indicators[(*at, _PRED_B, b)] = 1.0
    indicators[(*at, _HIT_A, y)] = a == y
    indicators[(*at, _HIT_B, y)] = b == y
    return indicators.reshape(clusters.size, -1), len(per_seed)


def _seed_differences(counts: np.ndarray, n_seeds: int, metric: str) -> np.ndarray:
    """metric(A) - metric(B) per seed [..., seeds] from flattened counts [..., seeds * kinds *
    classes]; NaN for a seed without rows."""
    counts = counts.reshape(*counts.shape[:-1], n_seeds, _COUNT_KINDS, -1)
    labels = counts[..., _LABEL, :]
    metric_a = _metric_from_counts(labels, counts[..., _PRED_A, :], counts[..., _HIT_A, :], metric)
    metric_b = _metric_from_counts(labels, counts[..., _PRED_B, :], counts[..., _HIT_B, :], metric)
    return metric_a - metric_b


def _multiplicities(rng: np.random.Generator, items: int, replicates: int) -> np.ndarray:
    """[replicates, items] how often each item is drawn in `items` draws with replacement."""
    draws = rng.integers(items, size=(replicates, items))
    offsets = np.arange(replicates)[:, None] * items
    return np.bincount((draws + offsets).ravel(), minlength=replicates * items).reshape(
        replicates, items
    )


def _row_replicates(rng, indicators, n_seeds, replicates, metric) -> np.ndarray:
    """[replicates] mean over every seed of its difference on resampled test rows."""
    row_weights = _multiplicities(rng, indicators.shape[0], replicates).astype(np.float64)
    differences = _seed_differences(row_weights @ indicators, n_seeds, metric)
    # a seed that drew none of its rows has no metric in that replicate: it sits out
    with np.errstate(invalid="ignore"):
        return np.nanmean(differences, axis=1) if n_seeds > 1 else differences[:, 0]


def _seed_swap_p_value(seed_differences: np.ndarray, n_resamples: int, rng) -> float:
    """Two-sided p of the mean seed difference when A's and B's runs swap per seed (a swap
    negates that seed's difference): exact over all 2^S swaps if they fit in n_resamples, else
    Monte Carlo over n_resamples random swaps."""
    n_seeds = seed_differences.size
    exact = 2**n_seeds <= n_resamples
    if exact:
        signs = 1.0 - 2.0 * ((np.arange(2**n_seeds)[:, None] >> np.arange(n_seeds)) & 1)
    else:
        signs = rng.choice([-1.0, 1.0], size=(n_resamples, n_seeds))
    extreme = np.abs(signs @ seed_differences) / n_seeds >= abs(seed_differences.mean()) - 1e-12
    return float(extreme.mean()) if exact else _monte_carlo_p_value(extreme)
