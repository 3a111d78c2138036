"""ClassificationMetrics against scikit-learn, torchmetrics and the reference path."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafit.metrics import ClassificationMetrics, _reference
from lorafit.metrics import classification as classification_module
from tests.metrics_inputs import DTYPES, as_dtype, random_logits

SCALARS = (
    "accuracy",
    "f1_macro",
    "f1_micro",
    "f1_weighted",
    "mcc",
    "nll",
    "brier",
    "ece",
    "auroc",
    "auprc",
)


def _compute(logits, labels, num_classes, **kwargs):
    metrics = ClassificationMetrics(num_classes, **kwargs)
    metrics.update(logits, labels)
    return metrics.compute()


def _sklearn(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    preds = logits.argmax(axis=1)
    classes = list(range(num_classes))
    expected = {
        "accuracy": skm.accuracy_score(labels, preds),
        "f1_macro": skm.f1_score(labels, preds, average="macro", zero_division=0),
        "f1_micro": skm.f1_score(labels, preds, average="micro", zero_division=0),
        "f1_weighted": skm.f1_score(labels, preds, average="weighted", zero_division=0),
        "mcc": skm.matthews_corrcoef(labels, preds),
        "nll": skm.log_loss(labels, probs, labels=classes),
        "brier": skm.brier_score_loss(labels, probs, labels=classes)
        if num_classes > 2
        else skm.brier_score_loss(labels, probs[:, 1]),
        "precision": skm.precision_score(
            labels, preds, labels=classes, average=None, zero_division=0
        ),
        "recall": skm.recall_score(labels, preds, labels=classes, average=None, zero_division=0),
        "confusion_matrix": skm.confusion_matrix(labels, preds, labels=classes),
    }
    if len(np.unique(labels)) == num_classes:  # sklearn's AUROC needs every class present
        # Ranks use the stored float32 probabilities, where mathematically equal
        # probabilities tie (float64 rounding noise would split them).
        stored = probs.astype(np.float32)
        scores = stored[:, 1] if num_classes == 2 else stored
        onehot = labels if num_classes == 2 else np.eye(num_classes)[labels]
        expected["auroc"] = skm.roc_auc_score(labels, scores, multi_class="ovr")
        expected["auprc"] = skm.average_precision_score(onehot, scores)
    return expected


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 80),
    num_classes=st.integers(2, 6),
    ties=st.booleans(),
)
def test_matches_sklearn(seed, rows, num_classes, ties):
    rng = np.random.default_rng(seed)
    logits = random_logits(rng, rows, num_classes, ties=ties).astype(np.float64)
    labels = rng.integers(0, num_classes, rows)
    result = _compute(logits, labels, num_classes)
    for key, value in _sklearn(logits, labels, num_classes).items():
        np.testing.assert_allclose(result[key], value, rtol=1e-9, atol=1e-12, err_msg=key)


def test_ece_matches_torchmetrics():
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(1)
    logits, labels = random_logits(rng, 500, 5), rng.integers(0, 5, 500)
    for bins in (1, 10, 15):
        expected = multiclass_calibration_error(
            torch.softmax(torch.from_numpy(logits).double(), 1),
            torch.from_numpy(labels),
            num_classes=5,
            n_bins=bins,
            norm="l1",
        )
        assert _compute(logits, labels, 5, ece_bins=bins)["ece"] == pytest.approx(
            float(expected), rel=1e-6
        )


def test_ece_by_hand():
    # confidences 0.9 (right), 0.6 (wrong), 0.6 (right); 2 bins: [0, .5), [.5, 1]
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    result = _compute(np.log(probs), np.array([0, 1, 1]), 2, ece_bins=2)
    assert result["ece"] == pytest.approx(abs(2 - (0.9 + 0.6 + 0.6)) / 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_torch_inputs_match_float64(dtype):
    rng = np.random.default_rng(2)
    tensor = as_dtype(random_logits(rng, 64, 4), dtype)
    labels = torch.from_numpy(rng.integers(0, 4, 64))
    result = _compute(tensor, labels, 4)
    expected = _compute(tensor.double().numpy(), labels.numpy(), 4)
    for key in SCALARS:
        assert result[key] == pytest.approx(expected[key], rel=1e-6), key


def test_streaming_merge_and_reset_equal_one_batch():
    rng = np.random.default_rng(4)
    logits, labels = random_logits(rng, 300, 3), rng.integers(0, 3, 300)
    whole = _compute(logits, labels, 3)
    first, second = ClassificationMetrics(3), ClassificationMetrics(3)
    first.update(logits[:100], labels[:100])
    first.update(logits[100:120], labels[100:120])
    second.update(logits[120:], labels[120:])
    first.merge(second.state())
    merged = first.compute()
    for key in SCALARS:
        assert merged[key] == pytest.approx(whole[key], rel=1e-12), key
    np.testing.assert_array_equal(merged["confusion_matrix"], whole["confusion_matrix"])
    assert merged["n"] == 300
    first.reset()
    assert first.compute()["n"] == 0 and np.isnan(first.compute()["accuracy"])


def test_state_is_plain_numpy_and_a_copy():
    metrics = ClassificationMetrics(3)
    metrics.update(np.eye(3, dtype=np.float32), np.arange(3))
    state = metrics.state()
    assert all(isinstance(value, np.ndarray) for value in state.values())
    state["confusion"][:] = 99
    assert metrics.compute()["confusion_matrix"].sum() == 3
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationMetrics(4).merge(state)


def test_reference_path_agrees(monkeypatch):
    rng = np.random.default_rng(5)
    logits, labels = random_logits(rng, 200, 4), rng.integers(0, 4, 200)
    fast = _compute(logits, labels, 4)
    monkeypatch.setattr(classification_module, "kernels", _reference)
    slow = _compute(logits, labels, 4)
    for key in SCALARS:
        assert fast[key] == pytest.approx(slow[key], rel=1e-6), key


def test_single_example_and_all_correct_or_wrong():
    one = _compute(np.array([[0.0, 2.0]], np.float32), np.array([1]), 2)
    assert one["accuracy"] == 1.0 and one["n"] == 1 and np.isnan(one["auroc"])
    logits = np.eye(4, dtype=np.float32) * 5
    right = _compute(logits, np.arange(4), 4)
    assert right["accuracy"] == right["f1_macro"] == right["mcc"] == right["auroc"] == 1.0
    wrong = _compute(logits, (np.arange(4) + 1) % 4, 4)
    assert wrong["accuracy"] == wrong["f1_macro"] == 0.0
    binary_wrong = _compute(np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([1, 0]), 2)
    assert binary_wrong["auroc"] == binary_wrong["accuracy"] == 0.0


def test_absent_class_is_left_out_of_macro_averages():
    # class 2 is neither a label nor a prediction
    logits = np.array([[3, 0, -5], [0, 3, -5], [3, 0, -5], [0, 3, -5]], np.float32)
    labels = np.array([0, 1, 1, 1])
    result = _compute(logits, labels, 3)
    assert result["f1"][2] == 0.0 and result["precision"][2] == 0.0
    f1_present = skm.f1_score(labels, logits.argmax(1), average=None)
    assert result["f1_macro"] == pytest.approx(f1_present.mean())
    assert not np.isnan(result["auroc"])  # class 2 has no positives: skipped, not NaN


def test_thousand_classes():
    rng = np.random.default_rng(6)
    logits, labels = random_logits(rng, 200, 1000), rng.integers(0, 1000, 200)
    result = _compute(logits, labels, 1000)
    expected = _sklearn(logits, labels, 1000)
    for key in ("accuracy", "f1_macro", "mcc", "nll", "brier"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6), key
    assert result["confusion_matrix"].shape == (1000, 1000)


def test_infinite_logits_follow_torch():
    inf = np.inf
    logits = np.array([[-inf, 0.0, 1.0], [1.0, -inf, 0.0]], np.float32)
    labels = np.array([0, 2])
    result = _compute(logits, labels, 3)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    assert result["nll"] == float(expected) == np.inf
    assert result["accuracy"] == 0.0
    positive_inf = _compute(np.array([[inf, 0.0, 0.0]], np.float32), np.array([0]), 3)
    assert positive_inf["accuracy"] == 1.0  # argmax picks the +inf, as torch.argmax
    for key in ("nll", "brier", "ece", "auroc"):
        assert np.isnan(positive_inf[key]), key  # torch's softmax of a +inf row is NaN


def test_nan_logits_raise_and_leave_state_untouched():
    metrics = ClassificationMetrics(2)
    logits = np.zeros((4, 2), np.float32)
    logits[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN.*row 2"):
        metrics.update(logits, np.zeros(4, np.int64))
    assert metrics.n == 0


@pytest.mark.parametrize("bad, index", [([0, 1, 3, 5], 2), ([-1, 0, 0, 0], 0)])
def test_out_of_range_labels_name_the_first_bad_index(bad, index):
    with pytest.raises(ValueError, match=rf"labels\[{index}\]"):
        _compute(np.zeros((4, 3), np.float32), np.array(bad), 3)


@pytest.mark.parametrize(
    "logits, labels",
    [
        (np.zeros((4, 2), np.float32), np.zeros(4, np.int64)),  # wrong C
        (np.zeros((4, 3), np.float32), np.zeros(5, np.int64)),  # wrong N
        (np.zeros((4, 3), np.int64), np.zeros(4, np.int64)),  # integer logits
        (np.zeros((4, 3), np.float32), np.zeros(4, np.float32)),  # float labels
        (np.zeros(3, np.float32), np.zeros(1, np.int64)),  # 1-D logits
    ],
)
def test_shape_and_dtype_mismatch_raise(logits, labels):
    with pytest.raises(ValueError):
        _compute(logits, labels, 3)


def test_float_labels_and_a_fractional_class_count_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"integer array of class ids, got dtype float32; convert"):
        _compute(np.zeros((4, 3), np.float32), np.zeros(4, np.float32), 3)
    with pytest.raises(ValueError, match="num_classes must be a whole number >= 2, got 2.5"):
        ClassificationMetrics(2.5)


def test_non_contiguous_input_is_copied():
    rng = np.random.default_rng(7)
    wide = random_logits(rng, 50, 6)
    labels = rng.integers(0, 3, 50)
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    result = _compute(torch.from_numpy(wide)[:, ::2], labels, 3)
    expected = _compute(strided.copy(), labels, 3)
    assert result["nll"] == expected["nll"] and result["auroc"] == expected["auroc"]


def test_empty_batch_is_a_no_op():
    metrics = ClassificationMetrics(3)
    metrics.update(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    assert metrics.n == 0
    metrics.update(np.eye(3, dtype=np.float32), np.arange(3))
    metrics.update(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    metrics.update(np.zeros((0, 3), np.float32), [])  # an empty list: float64 to numpy
    assert metrics.compute()["accuracy"] == 1.0


def test_without_scores_rank_metrics_are_nan():
    result = _compute(np.eye(3, dtype=np.float32), np.arange(3), 3, store_scores=False)
    assert result["accuracy"] == 1.0 and np.isnan(result["auroc"])
    assert "scores" not in ClassificationMetrics(3, store_scores=False).state()
