"""Post-hoc calibration: one temperature, fitted on the validation split (Guo et al. 2017).

A few-shot classifier memorises its training examples, so its probabilities are too sure of
themselves (ECE 0.2 and more on a K=16 test set). Dividing the logits by a temperature T > 1
softens them without changing any prediction: the argmax of z / T is the argmax of z. T is the
one number that minimises the validation NLL, and the trainer folds it into the linear head
(W / T, b / T), so the saved model, `lorafit predict` and exports all give the calibrated
probabilities with no extra step.
"""

from __future__ import annotations

import numpy as np

# The search range of T: softening only. On the dev sets of docs/recipes.md the fitted T was
# above 1 in 24 of 27 default runs; the 3 fits under 1 (0.81-0.84, all `head`) sharpened dev
# probabilities to level or worse (MR: ECE 7.5 -> 11.1). A tiny validation set that the model
# separates perfectly drives the optimum to T -> 0. Sharpening can raise a test example's NLL
# without bound; softening (the NLL is convex in 1 / T) never raises it above max(its raw NLL,
# log C). So a fit under 1 leaves the logits as they are.
MIN_TEMPERATURE = 1.0
MAX_TEMPERATURE = 100.0


def nll_slope(logits: np.ndarray, labels: np.ndarray, inverse_temperature: float) -> float:
    """d NLL / d beta at beta = 1 / T: mean over rows of E_softmax(beta z)[z] - z_label.

    The NLL is convex in beta (a log-sum-exp minus a linear term), so this slope only grows."""
    scaled = inverse_temperature * logits
    probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    expected = (probs * logits).sum(axis=1)
    return float((expected - logits[np.arange(len(labels)), labels]).mean())


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    min_temperature: float = MIN_TEMPERATURE,
    max_temperature: float = MAX_TEMPERATURE,
) -> float:
    """The T in [min, max] that minimises mean NLL(softmax(logits / T), labels); the NLL is
    convex in 1 / T, so this is the unconstrained optimum clipped to the range.

    logits [N, C], labels [N] in 0..C-1. Bisection on the sign of the slope in log(beta): exact
    to ~1e-9 and deterministic, so every process of a distributed run finds the same T.
    T = 1 when the logits carry no information to scale (no rows, or equal logits in each row).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match")
    if len(labels) == 0:
        return 1.0
    logits = logits - logits.max(axis=1, keepdims=True)  # [N, C]; the NLL is shift-invariant
    if np.all(logits == 0.0):
        return 1.0
    low, high = np.log(1.0 / max_temperature), np.log(1.0 / min_temperature)  # log beta
    if nll_slope(logits, labels, np.exp(low)) >= 0:  # NLL rises from the start: softest T
        return float(max_temperature)
    if nll_slope(logits, labels, np.exp(high)) <= 0:  # NLL falls to the end: sharpest T
        return float(min_temperature)
    for _ in range(100):
        middle = 0.5 * (low + high)
        if nll_slope(logits, labels, np.exp(middle)) > 0:
            high = middle
        else:
            low = middle
    return float(np.exp(-0.5 * (low + high)))


def calibration_line(
    temperature: float, n: int, ece_before: float, ece_after: float, accuracy: float
) -> str:
    """The run's one line on the fitted temperature; a warning when it reached the cap."""
    if temperature == MIN_TEMPERATURE:  # the fit is clipped at 1: only softening is applied
        return (
            f"calibration: none applied (on {n} validation examples the model is not "
            f"over-confident, and only softening is fitted; validation ECE {ece_before:.3f})"
        )
    if temperature == MAX_TEMPERATURE:  # softened as far as it goes: no confidence signal
        return (
            f"calibration: warning: the temperature reached its cap, {temperature:.3g}, on {n} "
            f"validation examples (validation accuracy {accuracy:.3f}): the "
            f"model's confidence told nothing there, so its probabilities are now near uniform "
            f"(predictions unchanged); train longer or on more labels, or set "
            f"train.calibration=none to keep the raw ones"
        )
    note = (
        "; T minimises validation NLL, and binned ECE on few examples can move either way"
        if ece_after > ece_before
        else ""
    )
    return (
        f"calibration: temperature {temperature:.3g} fitted on {n} validation examples "
        f"(validation ECE {ece_before:.3f} -> {ece_after:.3f}, on the rows it was fitted on{note}; "
        "the test block below has the held-out effect)"
    )
