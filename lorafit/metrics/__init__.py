"""Evaluation metrics over the C++ core `lorafit._C` (see docs/eval-core.md).

Importing fails with build instructions when the extension is missing;
LORAFIT_FORCE_REFERENCE=1 runs the numpy/torch reference instead (debugging only).
"""

from lorafit.metrics.classification import ClassificationMetrics
from lorafit.metrics.resampling import (
    ConfidenceInterval,
    HierarchicalPairedTest,
    PairedTest,
    bootstrap_ci,
    hierarchical_paired_test,
    mean_ci,
    paired_bootstrap_test,
    permutation_test,
    student_t_quantile,
    token_bootstrap_ci,
)
from lorafit.metrics.token import TokenMetrics, TokenStats, token_nll, token_stats

__all__ = [
    "ClassificationMetrics",
    "ConfidenceInterval",
    "HierarchicalPairedTest",
    "PairedTest",
    "TokenMetrics",
    "TokenStats",
    "bootstrap_ci",
    "hierarchical_paired_test",
    "mean_ci",
    "paired_bootstrap_test",
    "permutation_test",
    "student_t_quantile",
    "token_bootstrap_ci",
    "token_nll",
    "token_stats",
]
