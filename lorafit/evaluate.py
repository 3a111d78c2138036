"""The evaluation loop: forward passes -> small per-example tensors -> lorafit.metrics.

Why per-example tensors: under several processes, `accelerator.gather_for_metrics` collects
them and drops the samples that the last, padded batch duplicated, so every example is counted
exactly once and distributed metrics equal single-process metrics. The tensors are small
(classification: logits [B, C]; causal LM: four numbers per example), so the large [B, T, V]
logits never cross processes; the C++ core reduces them where they were made.

Iterable datasets: accelerate cannot know their length, so `gather_for_metrics` keeps the
copies of the first examples that pad the last round of batches. Every lorafit example carries
its source `row` number, so those copies are dropped by row (the first occurrence counts).
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lorafit import metrics as M
from lorafit.config import EvalConfig


@dataclass
class EvalResult:
    metrics: dict[str, float]
    """Scalar metrics (loss, accuracy, ...) for logging."""
    per_example: dict[str, np.ndarray] | None = None
    """Per-example arrays (row, label, logits, pred, prob, nll / nll_sum, n_tokens) when requested."""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    """Non-scalar metrics: per-class precision/recall/f1, confusion matrix."""
    seconds: float = 0.0


def _to_float_logits(logits: torch.Tensor) -> torch.Tensor:
    # The C++ core reads fp32/fp16/bf16 directly: no upcast copy of the logits.
    return logits.detach().contiguous()


def model_inputs(batch: dict) -> dict:
    """A collated batch minus what the model must not see (labels, source row numbers)."""
    return {k: v for k, v in batch.items() if k not in ("labels", "row")}


def output_logits(output) -> torch.Tensor:
    """Logits of a model output: a TextClassifier returns them, a transformers model wraps them."""
    return output.logits if hasattr(output, "logits") else output


def _keeps_masked_logits(model) -> bool:
    """Whether the model computes logits at the True positions of a [B, T] `logits_to_keep` mask."""
    model = getattr(model, "module", model)  # DDP / DeepSpeed wrapper
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return False  # virtual tokens come first: the mask would not line up
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _slices_by_mask(type(base))


@functools.cache
def _slices_by_mask(model_class: type) -> bool:
    """Whether the class's forward slices its hidden states with transformers'
    `slice_logits_to_keep` and that takes a [B, T] bool mask (recent transformers; older ones,
    and models with their own slicing, take an int or 1D positions only)."""
    module = sys.modules.get(model_class.__module__)
    slice_fn = getattr(module, "slice_logits_to_keep", None)
    if (
        slice_fn is None
        or "logits_to_keep" not in inspect.signature(model_class.forward).parameters
    ):
        return False
    try:  # a capability probe on a [1, 2, 1] tensor, not user data
        return tuple(slice_fn(torch.zeros(1, 2, 1), torch.tensor([[True, False]])).shape) == (1, 1)
    except (TypeError, IndexError, RuntimeError, ValueError):
        return False


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose next token is scored (labels -100: prompt, padding)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def causal_lm_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [N, V] of the N positions whose next token is scored, their targets [N], and the
    [B, T] bool mask that picked those positions (row t predicts token t+1; labels are -100 on
    prompt and padding).

    The mask goes to the model as `logits_to_keep`, so the lm_head runs on those positions only:
    the [B, T, V] logits of the whole batch are never made (at batch 8 x 256 tokens and a 49k
    vocabulary they are 0.4 GB, allocated fresh in each forward, copied by the shift and again
    by log-softmax). Prompt-learning methods prepend virtual tokens, and a model may not take
    `logits_to_keep`: both get full logits, which are sliced here instead.
    """
    labels = batch["labels"]  # [B, T]
    mask = scored_positions(labels)
    targets = labels[:, 1:][mask[:, :-1]]  # [N]
    keep = {"logits_to_keep": mask} if _keeps_masked_logits(model) else {}
    logits = output_logits(model(**model_inputs(batch), **keep))
    if logits.dim() == 3:  # [B, T', V]: full logits, virtual tokens first
        logits = logits[:, -labels.shape[1] :][mask]
    return logits, targets, mask  # [N, V], [N], [B, T]


class _FirstSeen:
    """Keeps the first occurrence of each row: drops the padding copies of an iterable loader."""

    def __init__(self, dataloader):
        dataset = getattr(dataloader, "dataset", None)
        self.active = isinstance(dataset, torch.utils.data.IterableDataset)
        self.seen: set[int] = set()

    def mask(self, rows: np.ndarray) -> np.ndarray | None:
        if not self.active:
            return None
        keep = np.zeros(len(rows), dtype=bool)
        for i, r in enumerate(rows.tolist()):
            if r not in self.seen:
                self.seen.add(r)
                keep[i] = True
        return None if keep.all() else keep


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataloader,
    accelerator,
    task: str,
    eval_cfg: EvalConfig,
    num_classes: int | None = None,
    keep_per_example: bool = False,
) -> EvalResult:
    """Evaluate `model` on a prepared dataloader; identical result on every rank."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    if task == "classification":
        result = _evaluate_classification(
            model, dataloader, accelerator, eval_cfg, num_classes, keep_per_example
        )
    else:
        result = _evaluate_causal_lm(model, dataloader, accelerator, keep_per_example)
    model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def embed_dataset(model: torch.nn.Module, dataloader, accelerator, with_rows: bool = False):
    """Pooled embeddings [N, H] and labels [N] of a prepared classification dataloader, and with
    `with_rows` their data rows [N] too, in the same (loader) order.

    Gathered over processes (`gather_for_metrics`), so every rank holds the whole dataset.
    """
    was_training = model.training
    model.eval()
    embeddings, labels, rows = [], [], []
    for batch in dataloader:
        _, pooled = model(**model_inputs(batch), return_embedding=True)  # [B, H]
        pooled, batch_labels, batch_rows = accelerator.gather_for_metrics(
            (pooled.float(), batch["labels"], batch["row"])
        )
        embeddings.append(pooled.cpu())
        labels.append(batch_labels.cpu())
        rows.append(batch_rows.cpu())
    model.train(was_training)
    if with_rows:
        return torch.cat(embeddings), torch.cat(labels), torch.cat(rows)
    return torch.cat(embeddings), torch.cat(labels)


def evaluate_logits(
    logits: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    eval_cfg: EvalConfig,
    keep_per_example: bool = False,
) -> EvalResult:
    """What `evaluate` reports for a classifier whose logits [N, C] are already known (rows
    numbered 0..N-1 in the per-example arrays)."""
    start = time.perf_counter()
    acc = M.ClassificationMetrics(num_classes=num_classes, ece_bins=eval_cfg.ece_bins)
    if len(labels):
        acc.update(logits, labels)
    scalars, arrays = _computed(acc)
    per_example = None
    if keep_per_example:
        per_example = _classification_per_example(np.arange(len(labels)), labels, logits)
    return EvalResult(scalars, per_example, arrays, seconds=time.perf_counter() - start)


def _computed(acc: M.ClassificationMetrics) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(scalar metrics with "loss" = NLL, per-class arrays) of an accumulated evaluation."""
    out = acc.compute()
    # counts stay integers in metrics.jsonl and summary.json ("n": 872, not 872.0)
    scalars = {k: int(v) if k == "n" else float(v) for k, v in out.items() if np.ndim(v) == 0}
    scalars["loss"] = scalars["nll"]
    arrays = {k: np.asarray(v) for k, v in out.items() if np.ndim(v) > 0}
    return scalars, arrays


def _evaluate_classification(model, dataloader, accelerator, eval_cfg, num_classes, keep):
    acc = M.ClassificationMetrics(num_classes=num_classes, ece_bins=eval_cfg.ece_bins)
    kept: dict[str, list[np.ndarray]] = {"row": [], "label": [], "logits": []}
    first = _FirstSeen(dataloader)
    for batch in dataloader:
        logits = output_logits(model(**model_inputs(batch)))  # [B, C]
        logits, labels, rows = accelerator.gather_for_metrics(
            (_to_float_logits(logits).float(), batch["labels"], batch["row"])
        )
        logits_np = logits.cpu().numpy()
        labels_np = labels.cpu().numpy()
        rows_np = rows.cpu().numpy()
        mask = first.mask(rows_np)
        if mask is not None:
            logits_np, labels_np, rows_np = logits_np[mask], labels_np[mask], rows_np[mask]
        if len(labels_np):
            acc.update(logits_np, labels_np)
        if keep:
            kept["row"].append(rows_np)
            kept["label"].append(labels_np)
            kept["logits"].append(logits_np)
    scalars, arrays = _computed(acc)
    per_example = None
    if keep:
        kept = _in_row_order(kept)
        per_example = _classification_per_example(
            _concat(kept["row"], (0,), np.int64),
            _concat(kept["label"], (0,), np.int64),
            _concat(kept["logits"], (0, num_classes), np.float32),
        )
    return EvalResult(metrics=scalars, per_example=per_example, arrays=arrays)


def _classification_per_example(
    rows: np.ndarray, labels: np.ndarray, logits: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-example arrays of a classification evaluation: rows [N], labels [N], logits [N, C]."""
    log_probs = _log_softmax(logits)
    return {
        "row": rows,
        "label": labels,
        "logits": logits,
        "pred": logits.argmax(-1) if len(logits) else np.zeros(0, np.int64),
        "prob": np.exp(log_probs),
        "nll": -log_probs[np.arange(len(labels)), labels],
    }


def _per_example_sum(values, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values [N] at the True positions of mask [B, T] -> per-example sums [B]."""
    full = torch.zeros(mask.shape, dtype=torch.float64)
    full[mask] = torch.as_tensor(values).to(torch.float64)
    return full.sum(1)


def _evaluate_causal_lm(model, dataloader, accelerator, keep):
    kept: dict[str, list[np.ndarray]] = {
        k: [] for k in ("row", "nll_sum", "n_tokens", "top1", "top5")
    }
    first = _FirstSeen(dataloader)
    for batch in dataloader:
        logits, targets, mask = causal_lm_logits(model, batch)  # [N, V], [N], [B, T]
        # The C++ core reads CPU memory: a GPU batch's scored logits come over once.
        stats = M.token_stats(_to_float_logits(logits).cpu(), targets.cpu())
        mask = mask.cpu()
        per_ex = torch.stack(
            [
                _per_example_sum(stats.nll, mask),
                mask.sum(1).to(torch.float64),
                _per_example_sum(stats.top1, mask),
                _per_example_sum(stats.top5, mask),
            ],
            dim=1,
        ).to(accelerator.device)  # [B, 4]
        per_ex, rows = accelerator.gather_for_metrics((per_ex, batch["row"]))
        per_ex, rows = per_ex.cpu().numpy(), rows.cpu().numpy()
        mask = first.mask(rows)
        if mask is not None:
            per_ex, rows = per_ex[mask], rows[mask]
        kept["row"].append(rows)
        for i, key in enumerate(("nll_sum", "n_tokens", "top1", "top5")):
            kept[key].append(per_ex[:, i])
    arr = {k: _concat(v, (0,), np.float64) for k, v in _in_row_order(kept).items()}
    n_tokens = max(arr["n_tokens"].sum(), 1.0)
    loss = float(arr["nll_sum"].sum() / n_tokens)
    scalars = {
        "loss": loss,
        "perplexity": float(np.exp(min(loss, 700.0))),
        "top1_accuracy": float(arr["top1"].sum() / n_tokens),
        "top5_accuracy": float(arr["top5"].sum() / n_tokens),
        "n_tokens": int(arr["n_tokens"].sum()),
        "n": len(arr["row"]),
    }
    per_example = None
    if keep:
        per_example = {
            "row": arr["row"].astype(np.int64),
            "nll_sum": arr["nll_sum"],
            "n_tokens": arr["n_tokens"].astype(np.int64),
            "nll": arr["nll_sum"] / np.maximum(arr["n_tokens"], 1.0),
            "top1": arr["top1"],
            "top5": arr["top5"],
        }
    return EvalResult(metrics=scalars, per_example=per_example)


def _in_row_order(kept: dict[str, list[np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Per-example batches -> one block each, sorted by row (the loaders run longest first)."""
    if not kept["row"]:
        return kept
    order = np.argsort(np.concatenate(kept["row"]), kind="stable")
    return {k: [np.concatenate(parts)[order]] for k, parts in kept.items()}


def _concat(parts: list[np.ndarray], empty_shape: tuple, dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    if not len(logits):
        return logits
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def confidence_intervals(per_example: dict[str, np.ndarray], task: str, num_classes, eval_cfg):
    """Bootstrap CIs over test examples: {metric: [low, high]}. No NLL interval when an
    example's NLL is not finite (an overflowing logit): the metric itself is NaN then.

    Causal LM: `loss`, `perplexity`, `top1_accuracy`, `top5_accuracy` (token-weighted, as
    reported) and `nll` (the mean of per-example mean NLLs, another statistic)."""
    if per_example is None or len(per_example["row"]) == 0:
        return {}
    nll = per_example["nll"] if np.isfinite(per_example["nll"]).all() else None
    if task == "classification":
        ci = M.bootstrap_ci(
            per_example["label"],
            per_example["pred"],
            nll=nll,
            num_classes=num_classes,
            n_resamples=eval_cfg.bootstrap_samples,
            level=eval_cfg.ci_level,
            seed=0,
        )
    elif nll is None or per_example["n_tokens"].sum() == 0:
        return {}
    else:
        n = len(nll)
        ci = M.bootstrap_ci(
            np.zeros(n, np.int64),
            np.zeros(n, np.int64),
            nll=nll,
            num_classes=1,
            n_resamples=eval_cfg.bootstrap_samples,
            level=eval_cfg.ci_level,
            seed=0,
        )
        ci = {
            "nll": ci["nll"],
            **M.token_bootstrap_ci(
                per_example["nll_sum"],
                per_example["n_tokens"],
                per_example.get("top1"),
                per_example.get("top5"),
                n_resamples=eval_cfg.bootstrap_samples,
                level=eval_cfg.ci_level,
                seed=0,
            ),
        }
    return {k: [float(v.low), float(v.high)] for k, v in ci.items()}
