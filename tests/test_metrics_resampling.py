"""Bootstrap CIs, paired tests and the t-interval."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import sklearn.metrics as skm
from scipy import stats

from lorafit.metrics import (
    _reference,
    bootstrap_ci,
    mean_ci,
    paired_bootstrap_test,
    permutation_test,
    student_t_quantile,
)
from lorafit.metrics import resampling as resampling_module


def _system(rng, labels, accuracy, num_classes):
    preds = labels.copy()
    flip = rng.random(labels.size) > accuracy
    preds[flip] = rng.integers(0, num_classes, int(flip.sum()))
    return preds


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    return rng, labels, _system(rng, labels, 0.7, 4)


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate(data):
    rng, labels, preds = data
    nll = rng.random(labels.size)
    first = bootstrap_ci(labels, preds, nll, num_classes=4, n_resamples=300, seed=3)
    assert first == bootstrap_ci(labels, preds, nll, num_classes=4, n_resamples=300, seed=3)
    assert first != bootstrap_ci(labels, preds, nll, num_classes=4, n_resamples=300, seed=4)
    assert first["accuracy"].estimate == skm.accuracy_score(labels, preds)
    assert first["f1_macro"].estimate == pytest.approx(skm.f1_score(labels, preds, average="macro"))
    assert first["nll"].estimate == pytest.approx(nll.mean())
    for interval in first.values():
        assert interval.low < interval.estimate < interval.high
    wider = bootstrap_ci(labels, preds, nll, n_resamples=300, level=0.99, seed=3)["accuracy"]
    assert wider.high - wider.low > first["accuracy"].high - first["accuracy"].low


def test_bootstrap_replicates_equal_sklearn_on_resampled_rows(data):
    _, labels, preds = data
    rows, replicates = labels.size, 5
    index = _reference.bootstrap_rows(rows, replicates, seed=11)
    out = resampling_module.kernels.resample_stats(
        labels, preds, None, None, 4, replicates, 11, False
    )
    for b in range(replicates):
        y, p = labels[index[b].astype(np.int64)], preds[index[b].astype(np.int64)]
        assert out[b, 0] == pytest.approx(skm.accuracy_score(y, p))
        assert out[b, 1] == pytest.approx(skm.f1_score(y, p, average="macro"))


@pytest.mark.parametrize(
    ("rows", "num_classes", "replicates", "nll_kind"),
    [
        (3001, 5, 20, "finite"),  # one-system fast path: rows grouped by (label, prediction)
        (2000, 10, 200, "finite"),  # enough draws to run on several threads
        (70_001, 3, 3, "finite"),  # > 65536 rows: 32-bit slots and the 64-bit bounding
        (500, 4, 10, "inf"),  # a non-finite value takes the generic path
        (300, 200, 10, "none"),  # many sparse cells: generic path
    ],
)
def test_resample_stats_matches_reference_on_larger_inputs(rows, num_classes, replicates, nll_kind):
    rng = np.random.default_rng(rows)
    labels = rng.integers(0, num_classes, rows)
    preds = _system(rng, labels, 0.6, num_classes)
    values = None if nll_kind == "none" else rng.exponential(size=rows)
    if nll_kind == "inf":
        values[7] = np.inf
    args = (labels, preds, None, values, num_classes, replicates, 12345, False)
    fast = resampling_module.kernels.resample_stats(*args)
    np.testing.assert_allclose(fast, _reference.resample_stats(*args), rtol=1e-12, equal_nan=True)
    if nll_kind == "inf":
        assert np.isinf(fast[:, 4]).any()


def test_draw_stream_looks_uniform_and_independent():
    rows, replicates = 1000, 2000
    index = _reference.bootstrap_rows(rows, replicates, seed=7)
    counts = np.bincount(index.ravel(), minlength=rows)
    assert stats.chisquare(counts).pvalue > 1e-4
    per_replicate = np.bincount(
        (index + rows * np.arange(replicates)[:, None]).ravel(), minlength=rows * replicates
    )
    # Multiplicities within a replicate follow Binomial(rows, 1/rows), about Poisson(1).
    share_unused = np.mean(per_replicate == 0)
    assert abs(share_unused - (1 - 1 / rows) ** rows) < 0.005
    u = index / rows
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1]), (u[1:, 1:], u[:-1, :-1])):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.005
    coins = _reference.permutation_swaps(rows, replicates, seed=7)
    assert abs(coins.mean() - 0.5) < 0.005
    assert abs(np.mean(coins[:, 1:] == coins[:, :-1]) - 0.5) < 0.005
    assert abs(np.mean(coins[1:] == coins[:-1]) - 0.5) < 0.005


def test_reference_path_gives_identical_cis(data, monkeypatch):
    _, labels, preds = data
    fast = bootstrap_ci(labels, preds, n_resamples=50, seed=1)
    monkeypatch.setattr(resampling_module, "kernels", _reference)
    slow = bootstrap_ci(labels, preds, n_resamples=50, seed=1)
    for key in ("accuracy", "f1_macro"):
        assert slow[key] == pytest.approx(fast[key], rel=1e-12)


@pytest.mark.parametrize("test", [paired_bootstrap_test, permutation_test])
@pytest.mark.parametrize("metric", ["accuracy", "f1_macro"])
def test_paired_tests_separate_different_systems(data, test, metric):
    rng, labels, preds = data
    better = _system(rng, labels, 0.95, 4)
    result = test(labels, better, preds, metric=metric, n_resamples=500, seed=2)
    assert result.difference > 0 and result.p_value < 0.01
    assert result.low < result.difference < result.high
    same = test(labels, preds, preds, metric=metric, n_resamples=200, seed=2)
    assert same.difference == 0.0 and same.p_value == 1.0


def test_permutation_p_value_is_roughly_uniform_under_the_null():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 200)
    p_values = [
        permutation_test(
            labels,
            _system(rng, labels, 0.7, 2),
            _system(rng, labels, 0.7, 2),
            n_resamples=200,
            seed=s,
        ).p_value
        for s in range(40)
    ]
    assert 0.05 < np.mean(np.array(p_values) < 0.5) < 0.95


def test_input_errors():
    with pytest.raises(ValueError, match=r"preds\[1\]"):
        bootstrap_ci(np.array([0, 1]), np.array([0, 2]), num_classes=2)
    with pytest.raises(ValueError, match="metric"):
        paired_bootstrap_test(np.array([0]), np.array([0]), np.array([0]), metric="auc")
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci(np.array([0, 1]), np.array([0, 1]), nll=np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(np.array([], np.int64), np.array([], np.int64))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(np.array([0]), np.array([0]), level=95)


def test_single_example_bootstrap():
    result = bootstrap_ci(np.array([1]), np.array([1]), nll=np.array([0.5]), n_resamples=10)
    assert result["accuracy"] == (1.0, 1.0, 1.0, 0.95)
    assert result["nll"][:3] == (0.5, 0.5, 0.5)


def test_mean_ci_matches_scipy():
    values = np.array([0.81, 0.79, 0.85, 0.77, 0.80])
    interval = mean_ci(values, level=0.9)
    low, high = stats.t.interval(0.9, df=4, loc=values.mean(), scale=stats.sem(values))
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-10)
    for df in (1, 2, 7, 30, 1000):
        assert student_t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-10)
    single = mean_ci([0.5])
    assert single.estimate == 0.5 and np.isnan(single.low)


def test_missing_extension_fails_with_build_instructions():
    code = "import sys; sys.modules['lorafit._C'] = None; import lorafit.metrics"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "pip install -e ." in result.stderr
