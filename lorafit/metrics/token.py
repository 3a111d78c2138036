"""Causal-LM token metrics: one fused pass over each logits row, no [T, V] temporaries."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lorafit.metrics._backend import as_labels, as_logits, check_label_range, kernels, raise_if_nan


class TokenStats(NamedTuple):
    """Per-token results, shaped like `labels`."""

    nll: np.ndarray  # float64, -log softmax(logits)[label]; 0 where ignored
    top1: np.ndarray  # bool, argmax == label (first maximal index wins ties)
    top5: np.ndarray  # bool, fewer than 5 entries beat the label's logit
    mask: np.ndarray  # bool, labels != ignore_index


def token_stats(logits, labels, ignore_index: int = -100) -> TokenStats:
    """Per-token NLL and top-1/top-5 hits for logits [..., V] and labels [...].

    Accepts float32, float16, bfloat16 (torch) and float64 (rounded to float32) logits.
    """
    x, dtype_code = as_logits(logits)
    y = as_labels(labels)
    if x.ndim < 1 or x.shape[:-1] != y.shape:
        raise ValueError(
            f"logits must have shape labels.shape + [V]: got logits {list(x.shape)}, "
            f"labels {list(y.shape)}"
        )
    vocab = x.shape[-1]
    if vocab == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    flat_labels = y.reshape(-1)
    check_label_range(flat_labels, vocab, ignore_index)
    nll, rank, first_nan_row = kernels.token_stats(
        x.reshape(-1, vocab), dtype_code, flat_labels, int(ignore_index)
    )
    raise_if_nan(first_nan_row)
    mask = flat_labels != ignore_index
    shape = y.shape
    return TokenStats(
        nll=nll.reshape(shape),
        top1=((rank == 0) & mask).reshape(shape),
        top5=((rank < 5) & mask).reshape(shape),
        mask=mask.reshape(shape),
    )


def token_nll(logits, labels, ignore_index: int = -100) -> np.ndarray:
    """Per-token NLL shaped like `labels` (0 where ignored)."""
    return token_stats(logits, labels, ignore_index).nll


def _exp(value: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.exp(value))


_STATE_KEYS = ("nll_sum", "n_tokens", "top1_hits", "top5_hits")


class TokenMetrics:
    """Summed NLL, token count and top-1/top-5 hits over the non-ignored tokens."""

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        self._totals = dict.fromkeys(_STATE_KEYS, 0)
        self._totals["nll_sum"] = 0.0

    def update(self, logits, labels) -> None:
        """Adds logits [T, V] (or [..., V]) and labels [T] (or [...])."""
        stats = token_stats(logits, labels, self.ignore_index)
        self._totals["nll_sum"] += float(stats.nll.sum())
        self._totals["n_tokens"] += int(stats.mask.sum())
        self._totals["top1_hits"] += int(stats.top1.sum())
        self._totals["top5_hits"] += int(stats.top5.sum())

    def state(self) -> dict[str, np.ndarray]:
        return {key: np.array(value) for key, value in self._totals.items()}

    def merge(self, state: dict) -> None:
        """Adds another state; any dict with the four totals works (e.g. gathered sums)."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(
                f"the state to merge lacks {missing}; pass another TokenMetrics' state()"
            )
        self._totals["nll_sum"] += float(state["nll_sum"])
        for key in ("n_tokens", "top1_hits", "top5_hits"):
            self._totals[key] += int(state[key])

    def compute(self) -> dict:
        n = self._totals["n_tokens"]
        nan = float("nan")
        loss = self._totals["nll_sum"] / n if n else nan
        return {
            "nll_sum": self._totals["nll_sum"],
            "n_tokens": n,
            "loss": loss,
            "perplexity": _exp(loss),
            "top1_accuracy": self._totals["top1_hits"] / n if n else nan,
            "top5_accuracy": self._totals["top5_hits"] / n if n else nan,
        }
