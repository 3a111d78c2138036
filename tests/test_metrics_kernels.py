"""The C++ kernels against the numpy/torch reference, kernel by kernel."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafit import _C
from lorafit.metrics import _reference
from tests.metrics_inputs import DTYPE_CODES, DTYPES, as_dtype, kernel_buffer, random_logits

FAST = settings(max_examples=40, deadline=None)


def _token_case(seed, rows, vocab, dtype, ties, ignore_fraction=0.2):
    rng = np.random.default_rng(seed)
    logits = as_dtype(random_logits(rng, rows, vocab, ties=ties), dtype)
    labels = rng.integers(0, vocab, size=rows)
    labels[rng.random(rows) < ignore_fraction] = -100
    return kernel_buffer(logits), DTYPE_CODES[dtype], labels


def _assert_token_stats_match(buffer, code, labels):
    nll, rank, first_nan = _C.token_stats(buffer, code, labels, -100)
    ref_nll, ref_rank, ref_first_nan = _reference.token_stats(buffer, code, labels, -100)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(rank, ref_rank)
    assert first_nan == ref_first_nan
    valid = labels != -100
    if valid.any():  # the summed loss is what TokenMetrics reports
        np.testing.assert_allclose(nll.sum(), ref_nll.sum(), rtol=1e-6)


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(0, 12),
    vocab=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    ties=st.booleans(),
)
def test_token_stats_matches_reference(seed, rows, vocab, dtype, ties):
    _assert_token_stats_match(*_token_case(seed, rows, vocab, dtype, ties))


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_stats_across_chunks(dtype):
    # Vocab spans several 2048-wide chunks and the row max sits in a late chunk,
    # so the running log-sum-exp must be rescaled.
    buffer, code, labels = _token_case(7, 9, 6001, dtype, ties=False)
    if dtype != "float16":
        assert buffer.shape[1] == 6001
    decoded = _reference._to_numpy_float(buffer, code).astype(np.float32)
    late_max = decoded.copy()
    late_max[:, 5000] = 40.0
    late_max[:, 10] = -1e30 if dtype in ("float32", "float64") else -60000.0
    tensor = as_dtype(late_max, dtype)
    _assert_token_stats_match(kernel_buffer(tensor), code, labels)


def test_token_stats_half_subnormals_and_specials():
    bits = np.array(
        [[0x0001, 0x03FF, 0x0400, 0x8001, 0x7BFF, 0xFBFF, 0x0000, 0x8000]], dtype=np.uint16
    )
    buffer = np.ascontiguousarray(bits.view(np.float16))
    labels = np.arange(8)
    stacked = np.repeat(buffer, 8, axis=0)
    _assert_token_stats_match(stacked, DTYPE_CODES["float16"], labels)


def _classification_state(num_classes, bins):
    return dict(
        confusion=np.zeros((num_classes, num_classes), np.int64),
        ece_count=np.zeros(bins, np.int64),
        ece_conf_sum=np.zeros(bins),
        ece_correct=np.zeros(bins, np.int64),
        sums=np.zeros(2),
        counts=np.zeros(2, np.int64),
    )


def _run_classification(module, buffer, code, labels, num_classes, bins):
    state = _classification_state(num_classes, bins)
    shape = (labels.size,) if num_classes == 2 else (num_classes, labels.size)
    scores = np.empty(shape, np.float32)
    first_nan = module.classification_update(buffer, code, labels, *state.values(), scores)
    return state, scores, first_nan


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 40),
    num_classes=st.integers(2, 9),
    dtype=st.sampled_from(DTYPES),
    ties=st.booleans(),
    bins=st.integers(1, 20),
)
def test_classification_update_matches_reference(seed, rows, num_classes, dtype, ties, bins):
    rng = np.random.default_rng(seed)
    tensor = as_dtype(random_logits(rng, rows, num_classes, ties=ties), dtype)
    labels = rng.integers(0, num_classes, size=rows)
    args = (kernel_buffer(tensor), DTYPE_CODES[dtype], labels, num_classes, bins)
    state, scores, first_nan = _run_classification(_C, *args)
    ref_state, ref_scores, ref_first_nan = _run_classification(_reference, *args)
    assert first_nan == ref_first_nan == -1
    for key in ("confusion", "ece_count", "ece_correct", "counts"):
        np.testing.assert_array_equal(state[key], ref_state[key], err_msg=key)
    for key in ("ece_conf_sum", "sums"):
        np.testing.assert_allclose(state[key], ref_state[key], rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)


def test_classification_update_large_vocab():
    rng = np.random.default_rng(3)
    logits, labels = random_logits(rng, 50, 1000), rng.integers(0, 1000, 50)
    state, scores, _ = _run_classification(_C, logits, 0, labels, 1000, 15)
    ref_state, ref_scores, _ = _run_classification(_reference, logits, 0, labels, 1000, 15)
    np.testing.assert_array_equal(state["confusion"], ref_state["confusion"])
    np.testing.assert_allclose(state["sums"], ref_state["sums"], rtol=1e-12)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-12)


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 200),
    columns=st.integers(1, 6),
    levels=st.integers(2, 50),
)
def test_rank_metrics_matches_reference(seed, rows, columns, levels):
    rng = np.random.default_rng(seed)
    num_classes = 2 if columns == 1 else columns
    labels = rng.integers(0, num_classes, size=rows)
    # Quantised scores produce ties, including ties across positives and negatives.
    scores = (rng.integers(0, levels, size=(columns, rows)) / levels).astype(np.float32)
    scores = np.ascontiguousarray(scores[0] if columns == 1 else scores)  # class-major
    auroc, ap = _C.rank_metrics(labels, scores)
    ref_auroc, ref_ap = _reference.rank_metrics(labels, scores)
    np.testing.assert_allclose(auroc, ref_auroc, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(ap, ref_ap, rtol=1e-12, equal_nan=True)


def test_rank_metrics_negative_scores_and_signed_zero():
    labels = np.array([0, 1, 0, 1, 1, 0])
    scores = np.array([-0.0, 0.0, -3.5, 2.0, -1e-30, 1e-30], dtype=np.float32)
    auroc, ap = _C.rank_metrics(labels, scores)
    ref_auroc, ref_ap = _reference.rank_metrics(labels, scores)
    np.testing.assert_allclose([auroc[0], ap[0]], [ref_auroc[0], ref_ap[0]], rtol=1e-12)


@FAST
@given(
    seed=st.integers(0, 2**64 - 1),
    rows=st.integers(1, 60),
    num_classes=st.sampled_from([1, 2, 3, 6, 64, 65, 100]),  # > 64: marginal path
    replicates=st.integers(1, 30),
    permute=st.booleans(),
    paired=st.booleans(),
    with_values=st.booleans(),
)
def test_resample_stats_matches_reference(
    seed, rows, num_classes, replicates, permute, paired, with_values
):
    rng = np.random.default_rng(seed % 2**32)
    labels = rng.integers(0, num_classes, rows)
    preds_a = rng.integers(0, num_classes, rows)
    preds_b = rng.integers(0, num_classes, rows) if paired else None
    values = rng.random(rows) if with_values else None
    args = (labels, preds_a, preds_b, values, num_classes, replicates, seed, permute)
    np.testing.assert_allclose(
        _C.resample_stats(*args), _reference.resample_stats(*args), rtol=1e-12, equal_nan=True
    )


def test_ids_outside_the_class_or_vocab_range_are_refused_by_the_bindings():
    # the kernels index memory by label and prediction: the bindings check them, not only the API
    buffer = np.zeros((3, 4), np.float32)
    code = DTYPE_CODES["float32"]
    for labels, name in (([0, 1, 4], "labels[2] = 4"), ([0, -2, 1], "labels[1] = -2")):
        with pytest.raises(ValueError, match=rf"{re.escape(name)} is outside 0..3"):
            _C.token_stats(buffer, code, np.array(labels, np.int64), -100)
        with pytest.raises(ValueError, match=rf"{re.escape(name)} is outside 0..3"):
            _run_classification(_C, buffer, code, np.array(labels, np.int64), 4, 5)
    _C.token_stats(buffer, code, np.array([0, -100, 3], np.int64), -100)  # ignore_index is fine
    ok, bad = np.array([0, 1, 1], np.int64), np.array([0, 2, 1], np.int64)
    for args, name in (((bad, ok, None), "labels[1]"), ((ok, bad, None), "preds_a[1]"),
                       ((ok, ok, bad), "preds_b[1]")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"{re.escape(name)} = 2 is outside 0..1"):
            _C.resample_stats(*args, None, 2, 10, 0, False)
