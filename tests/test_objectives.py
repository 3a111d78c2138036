"""The contrastive objective: pair loss against a pair-by-pair loop, fitted head against sklearn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lorafit.objectives import fit_logistic_head, pair_cosine_loss


def pair_loss_loop(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    positives, negatives = [], []
    for i, j in itertools.combinations(range(len(labels)), 2):
        cosine = F.cosine_similarity(embeddings[i], embeddings[j], dim=0).item()
        same = labels[i] == labels[j]
        (positives if same else negatives).append((cosine - float(same)) ** 2)
    means = [np.mean(p) for p in (positives, negatives) if p]
    return float(np.mean(means)) if means else 0.0


@pytest.mark.parametrize(
    "labels",
    [[0, 1, 0, 1, 1, 0, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3, 3], [1, 1, 1, 1], [0, 1, 2], [0]],
)
def test_pair_loss_matches_a_pair_by_pair_loop(labels):
    torch.manual_seed(len(labels))
    embeddings = torch.randn(len(labels), 16, requires_grad=True)
    labels_t = torch.tensor(labels)
    loss = pair_cosine_loss(embeddings, labels_t)
    assert loss.item() == pytest.approx(pair_loss_loop(embeddings.detach(), labels_t), abs=1e-6)
    loss.backward()  # a graph even when there is no pair
    assert embeddings.grad is not None


def test_pair_loss_is_zero_for_ideal_embeddings_and_pulls_classes_apart():
    labels = torch.tensor([0, 0, 1, 1, 2])
    ideal = torch.eye(3)[labels] * torch.tensor([[1.0], [3.0], [2.0], [0.5], [7.0]])
    assert pair_cosine_loss(ideal, labels).item() == pytest.approx(0.0, abs=1e-7)
    embeddings = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    optimizer = torch.optim.SGD([embeddings], lr=0.5)
    first = pair_cosine_loss(embeddings, labels).item()
    for _ in range(200):
        optimizer.zero_grad()
        pair_cosine_loss(embeddings, labels).backward()
        optimizer.step()
    assert pair_cosine_loss(embeddings, labels).item() < 0.1 * first


@pytest.mark.parametrize("num_classes", [2, 4])
def test_fitted_head_matches_sklearn_logistic_regression(num_classes):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(num_classes)
    labels = np.arange(40) % num_classes
    x = rng.normal(size=(40, 12)) + 0.8 * np.eye(num_classes, 12)[labels]
    weight, bias = fit_logistic_head(torch.tensor(x), torch.tensor(labels), num_classes, l2=1.0)
    # sklearn's binary model has one weight row w = w1 - w0, penalised as |w|^2 / 2; at our optimum
    # w0 = -w1, so our penalty is half of that: the same model as C=2. Multinomial: the same form.
    c = 2.0 if num_classes == 2 else 1.0
    reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, labels)
    ours = x @ weight.double().numpy().T + bias.double().numpy()
    theirs = reference.decision_function(x)
    if num_classes == 2:
        np.testing.assert_allclose(ours[:, 1] - ours[:, 0], theirs, atol=1e-3)
    else:  # both centre the logits over classes (the ridge optimum sums W over classes to 0)
        ours = ours - ours.mean(1, keepdims=True)
        theirs = theirs - theirs.mean(1, keepdims=True)
        np.testing.assert_allclose(ours, theirs, atol=1e-3)
