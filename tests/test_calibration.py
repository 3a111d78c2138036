"""Temperature scaling (lorafit.calibration): the fitted T against known answers and a grid."""

import numpy as np
import pytest

from lorafit.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    calibration_line,
    fit_temperature,
)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def _labels_drawn_from(logits: np.ndarray, temperature: float, rng) -> np.ndarray:
    """Labels sampled from softmax(logits / T): logits / T is calibrated by construction."""
    z = logits / temperature
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


@pytest.mark.parametrize("true_temperature", [0.5, 2.0, 4.0])
def test_recovers_the_temperature_the_labels_were_drawn_with(true_temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(20000, 4))
    labels = _labels_drawn_from(logits, true_temperature, rng)
    fitted = fit_temperature(logits, labels, min_temperature=0.05)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # by default only softening is applied: a sharpening fit (T < 1) leaves the logits alone
    assert fit_temperature(logits, labels) == pytest.approx(max(true_temperature, 1.0), rel=0.05)


@pytest.mark.parametrize(
    "seed, low", [(s, low) for s in range(5) for low in (0.05, MIN_TEMPERATURE)]
)
def test_no_temperature_on_a_fine_grid_has_a_lower_nll(seed, low):
    rng = np.random.default_rng(seed)
    n, c = rng.integers(3, 60), rng.integers(2, 7)
    logits = rng.normal(0.0, rng.uniform(0.5, 8.0), size=(n, c))
    labels = rng.integers(0, c, size=n)
    fitted = fit_temperature(logits, labels, min_temperature=low)
    grid = np.exp(np.linspace(np.log(low), np.log(MAX_TEMPERATURE), 4001))
    best_on_grid = min(_nll(logits, labels, t) for t in grid)
    assert _nll(logits, labels, fitted) <= best_on_grid + 1e-9


def test_overconfident_logits_get_softened_and_predictions_stay():
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 1.0, size=(500, 3))
    labels = _labels_drawn_from(logits, 1.0, rng)
    fitted = fit_temperature(10.0 * logits, labels)  # ten times too sure of itself
    assert fitted == pytest.approx(10.0, rel=0.25)
    np.testing.assert_array_equal((logits / fitted).argmax(1), logits.argmax(1))


def test_the_bounds_hold_where_the_optimum_runs_off():
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, -1.0]])
    # every example right: the NLL keeps falling as T -> 0, so the lower bound
    assert fit_temperature(logits, np.array([0, 1, 0])) == MIN_TEMPERATURE == 1.0
    assert fit_temperature(logits, np.array([0, 1, 0]), min_temperature=0.05) == 0.05
    # every example wrong: the NLL keeps falling as T -> infinity, so the upper bound
    assert fit_temperature(logits, np.array([1, 0, 1])) == MAX_TEMPERATURE


def test_the_run_line_says_what_the_fit_means():
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, -1.0]])
    labels = np.array([1, 0, 1])  # every example wrong
    capped = fit_temperature(logits, labels)
    line = calibration_line(capped, 3, 0.6, 0.01, 0.0)
    assert line.startswith("calibration: warning: the temperature reached its cap, 100, on 3 ")
    assert "probabilities are now near uniform" in line and "train.calibration=none" in line
    unscaled = fit_temperature(logits, np.array([0, 1, 0]))
    line = calibration_line(unscaled, 3, 0.1, 0.1, 1.0)
    assert line == (
        "calibration: none applied (on 3 validation examples the model is not over-confident, "
        "and only softening is fitted; validation ECE 0.100)"
    )
    line = calibration_line(2.5, 16, 0.25, 0.05, 0.75)
    assert line == (
        "calibration: temperature 2.5 fitted on 16 validation examples (validation ECE 0.250 -> "
        "0.050, on the rows it was fitted on; the test block below has the held-out effect)"
    )
    line = calibration_line(2.5, 16, 0.12, 0.16, 0.75)
    assert line.endswith(
        "0.120 -> 0.160, on the rows it was fitted on; T minimises validation NLL, and binned "
        "ECE on few examples can move either way; the test block below has the held-out effect)"
    )


def test_uninformative_inputs_keep_the_logits_as_they_are():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, np.int64)) == 1.0
    assert fit_temperature(np.full((4, 3), 7.0), np.array([0, 1, 2, 0])) == 1.0


def test_a_shift_of_each_row_changes_nothing():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(40, 5))
    labels = rng.integers(0, 5, size=40)
    shifted = logits + rng.normal(0.0, 100.0, size=(40, 1))
    assert fit_temperature(shifted, labels) == pytest.approx(fit_temperature(logits, labels))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        fit_temperature(np.zeros((3, 2)), np.zeros(4, np.int64))
