"""Token metrics against torch cross_entropy / argmax / topk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafit.metrics import TokenMetrics, _reference, token_nll, token_stats
from lorafit.metrics import token as token_module
from tests.metrics_inputs import DTYPES, as_dtype, random_logits


def _labels(rng, rows, vocab, ignore_fraction=0.25):
    labels = rng.integers(0, vocab, rows)
    labels[rng.random(rows) < ignore_fraction] = -100
    return labels


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 16),
    vocab=st.integers(5, 400),
    dtype=st.sampled_from(DTYPES),
)
def test_matches_torch(seed, rows, vocab, dtype):
    rng = np.random.default_rng(seed)
    logits = as_dtype(random_logits(rng, rows, vocab), dtype)
    labels = torch.from_numpy(_labels(rng, rows, vocab))
    stats = token_stats(logits, labels)
    reference = logits.float().double()  # the kernels compute from float32 values
    expected = F.cross_entropy(reference, labels, reduction="none", ignore_index=-100).numpy()
    np.testing.assert_allclose(stats.nll, expected, rtol=1e-6, atol=1e-7)
    mask = (labels != -100).numpy()
    top5 = (reference.topk(5, dim=-1).indices == labels[:, None]).any(-1).numpy()
    np.testing.assert_array_equal(stats.top1, (reference.argmax(-1) == labels).numpy() & mask)
    np.testing.assert_array_equal(stats.top5, top5 & mask)  # no ties in random normals
    np.testing.assert_array_equal(stats.mask, mask)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accumulator_matches_torch_sum(dtype):
    rng = np.random.default_rng(1)
    logits = as_dtype(random_logits(rng, 64, 3000), dtype)
    labels = torch.from_numpy(_labels(rng, 64, 3000))
    metrics = TokenMetrics()
    metrics.update(logits[:40], labels[:40])
    metrics.update(logits[40:], labels[40:])
    result = metrics.compute()
    expected = F.cross_entropy(logits.double(), labels, reduction="sum", ignore_index=-100)
    n = int((labels != -100).sum())
    assert result["nll_sum"] == pytest.approx(float(expected), rel=1e-6)
    assert result["n_tokens"] == n
    assert result["loss"] == pytest.approx(float(expected) / n, rel=1e-6)
    assert result["perplexity"] == pytest.approx(np.exp(float(expected) / n), rel=1e-5)
    hits = ((logits.double().argmax(-1) == labels) & (labels != -100)).sum()
    assert result["top1_accuracy"] == int(hits) / n


def test_ties_follow_first_index_rule():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 3.0, 3.0, 3.0, 3.0]], np.float32)
    for label, top1, top5 in [
        (1, True, True),
        (2, False, True),
        (6, False, True),
        (7, False, False),
        (3, False, False),
    ]:
        stats = token_stats(logits, np.array([label]))
        assert (bool(stats.top1[0]), bool(stats.top5[0])) == (top1, top5), label
        assert bool(stats.top1[0]) == (int(torch.from_numpy(logits).argmax()) == label)


def test_leading_dimensions_and_token_nll():
    rng = np.random.default_rng(2)
    logits = random_logits(rng, 12, 50).reshape(3, 4, 50)
    labels = _labels(rng, 12, 50).reshape(3, 4)
    nll = token_nll(logits, labels)
    assert nll.shape == (3, 4)
    np.testing.assert_array_equal(
        nll.reshape(-1), token_nll(logits.reshape(12, 50), labels.reshape(12))
    )
    assert (nll[labels == -100] == 0).all()


def test_infinite_logits_follow_torch():
    inf = np.inf
    logits = np.array(
        [[inf, 0.0, 1.0], [-inf, 0.0, 1.0], [-inf, 0.0, 1.0], [-inf, -inf, -inf], [inf, inf, 0.0]],
        np.float32,
    )
    labels = np.array([1, 0, 2, 0, 2])
    expected = F.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels), reduction="none"
    ).numpy()
    stats = token_stats(logits, labels)
    np.testing.assert_allclose(stats.nll, expected, rtol=1e-6, equal_nan=True)
    top1 = torch.from_numpy(logits).argmax(-1).numpy() == labels
    np.testing.assert_array_equal(stats.top1, top1)


def test_nan_raises_but_not_in_ignored_rows():
    logits = np.zeros((3, 4), np.float32)
    logits[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN.*row 1"):
        token_stats(logits, np.array([0, 1, 2]))
    # torch ignores such rows too: their loss never enters the sum
    assert token_stats(logits, np.array([0, -100, 2])).nll[1] == 0.0


def test_errors_name_the_problem():
    logits = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"labels\[1\] = 4"):
        token_stats(logits, np.array([0, 4, -100]))
    with pytest.raises(ValueError, match="shape"):
        token_stats(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        token_stats(logits, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="float32"):
        token_stats(np.zeros((3, 4), np.int32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"lacks \['n_tokens', 'top1_hits', 'top5_hits'\]"):
        TokenMetrics().merge({"nll_sum": 1.0})


def test_empty_and_all_ignored_batches():
    metrics = TokenMetrics()
    metrics.update(np.zeros((0, 7), np.float32), np.zeros(0, np.int64))
    metrics.update(np.zeros((2, 7), np.float32), np.array([-100, -100]))
    result = metrics.compute()
    assert result["n_tokens"] == 0 and np.isnan(result["loss"])


def test_custom_ignore_index_and_merge():
    rng = np.random.default_rng(3)
    logits = random_logits(rng, 20, 30)
    labels = rng.integers(0, 30, 20)
    labels[:5] = 0
    first, second = TokenMetrics(ignore_index=0), TokenMetrics(ignore_index=0)
    first.update(logits[:10], labels[:10])
    second.update(logits[10:], labels[10:])
    first.merge(second.state())
    whole = TokenMetrics(ignore_index=0)
    whole.update(logits, labels)
    assert first.compute() == pytest.approx(whole.compute(), rel=1e-12)
    assert whole.compute()["n_tokens"] == int((labels != 0).sum())
    first.reset()
    assert first.compute()["n_tokens"] == 0


def test_non_contiguous_and_reference_path(monkeypatch):
    rng = np.random.default_rng(4)
    wide = torch.from_numpy(random_logits(rng, 10, 80))
    labels = rng.integers(0, 40, 10)
    strided = wide[:, ::2]
    fast = token_stats(strided, labels)
    monkeypatch.setattr(token_module, "kernels", _reference)
    slow = token_stats(strided.contiguous(), labels)
    np.testing.assert_allclose(fast.nll, slow.nll, rtol=1e-6)
    np.testing.assert_array_equal(fast.top5, slow.top5)


def test_token_bootstrap_ci_is_of_the_token_weighted_loss():
    from types import SimpleNamespace

    from lorafit.evaluate import confidence_intervals
    from lorafit.metrics import token_bootstrap_ci

    # 30 long, easy responses and 30 one-token, hard ones: the token-weighted loss (what runs
    # report) is near 0.1, the mean of per-example means near 2.5
    n_tokens = np.array([100] * 30 + [1] * 30, dtype=np.float64)
    nll_sum = np.concatenate([np.full(30, 10.0), np.full(30, 5.0)])
    top1 = np.concatenate([np.full(30, 90.0), np.zeros(30)])
    loss = nll_sum.sum() / n_tokens.sum()
    ci = token_bootstrap_ci(nll_sum, n_tokens, top1, n_resamples=500, seed=0)
    assert ci["loss"].estimate == pytest.approx(loss)
    assert ci["loss"].low <= loss <= ci["loss"].high < 0.5
    assert ci["perplexity"].low == pytest.approx(np.exp(ci["loss"].low))
    assert ci["top1_accuracy"].low <= top1.sum() / n_tokens.sum() <= ci["top1_accuracy"].high

    per_example = {
        "row": np.arange(60),
        "nll_sum": nll_sum,
        "n_tokens": n_tokens.astype(np.int64),
        "nll": nll_sum / n_tokens,
        "top1": top1,
        "top5": top1,
    }
    cfg = SimpleNamespace(bootstrap_samples=500, ci_level=0.95)
    intervals = confidence_intervals(per_example, "causal_lm", None, cfg)
    assert intervals["loss"][0] <= loss <= intervals["loss"][1]
    assert intervals["nll"][0] > 1.0  # the other statistic, kept under its own name
    assert set(intervals) == {"nll", "loss", "perplexity", "top1_accuracy", "top5_accuracy"}
