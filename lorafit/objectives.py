"""The contrastive objective (`train.objective=contrastive`): a SetFit-style pair loss for the
body, and a logistic-regression head fitted on the body's embeddings.

With a few dozen labels, cross-entropy through a fresh head memorises the training set within
a few epochs and then stops teaching the body anything. The pair loss instead asks the pooled
embedding of every same-label pair in a batch to point the same way (cosine 1) and of every
different-label pair to be orthogonal (cosine 0), as SetFit (Tunstall et al. 2022) does: a
batch of B examples gives B(B-1)/2 pairs, far more training signal than B labels. The head gets
no gradient from it; it is fitted in closed form (L2-regularised multinomial logistic
regression, L-BFGS) on the embeddings of the training set (a fixed stratified sample of
`train.head_fit_size` rows when it is larger) whenever the model is evaluated.
Evidence for the choice: docs/recipes.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HEAD_L2 = 1.0  # ridge penalty of the fitted head (scikit-learn's C=1 in the sum-of-losses form)


def pair_cosine_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error between each pair's cosine and 1 (same label) or 0 (different).

    embeddings [B, H], labels [B]. Positive and negative pairs weigh half each, so four classes
    (a quarter of pairs positive) train like two. Returns 0 (with a graph) for B < 2.
    """
    z = F.normalize(embeddings.float(), dim=-1)  # [B, H]
    cosine = z @ z.T  # [B, B]
    same = labels[:, None] == labels[None, :]  # [B, B]
    upper = torch.ones_like(same).triu(diagonal=1)  # each unordered pair once, no self-pairs
    errors = (cosine - same.float()) ** 2
    parts = [errors[upper & same], errors[upper & ~same]]
    means = [p.mean() for p in parts if p.numel() > 0]
    if not means:
        return embeddings.sum() * 0.0
    return torch.stack(means).mean()


@torch.no_grad()
def fit_logistic_head(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = HEAD_L2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [C, H] and bias [C] of multinomial logistic regression on embeddings [N, H].

    Minimises sum_i CE(W x_i + b, y_i) + l2/2 * |W|^2 (bias not penalised) with L-BFGS in
    float64 on the CPU, so every rank computes the same head from the same embeddings.
    """
    x = embeddings.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y, reduction="sum")
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach().float(), bias.detach().float()
