"""Typed run configuration: YAML file + `key=value` overrides -> RunConfig.

Every field carries a one-line doc (`field(metadata={"doc": ...})`), validation lives in
`__post_init__`, and the resolved config (all defaults filled in) is saved in every run as
`config.yaml`. User mistakes raise `ConfigError` with one line that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from lorafit.errors import ConfigError


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with a one-line doc."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


def _check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r} is not valid; use one of {list(choices)}")


def _check_positive(section: str, name: str, value: float | int | None, allow_zero=False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name}={value!r} must be {bound}")


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "minilm", "Alias (minilm, smollm2), local folder or hub name of the base model."
    )
    task: str = _f("auto", "classification | causal_lm | auto (causal_lm if data has SFT fields).")
    pooling: str = _f("auto", "Classifier pooling: auto | mean | cls | pooler | last.")
    pool_layers: int | None = _f(
        None,
        "Pool the mean of the last N layers' hidden states; unset: the method's default "
        "(head 3, others 1; 1 under pooler).",
    )
    max_length: int = _f(128, "Truncate inputs to this many tokens.")
    dtype: str = _f(
        "float32", "Weights dtype for non-quantised layers: float32 | bfloat16 | float16."
    )
    gguf_file: str | None = _f(None, "GGUF file inside name_or_path (dequantised on load).")
    trust_remote_code: bool = _f(
        False, "Allow code from the model repo to run; off unless you trust it."
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the base model.")

    def __post_init__(self) -> None:
        _check_choice("model", "task", self.task, ("auto", "classification", "causal_lm"))
        _check_choice("model", "pooling", self.pooling, ("auto", "mean", "cls", "pooler", "last"))
        _check_choice("model", "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_positive("model", "pool_layers", self.pool_layers)
        if self.pool_layers is not None and self.pool_layers > 1 and self.pooling == "pooler":
            raise ConfigError(
                f"model.pool_layers={self.pool_layers} needs a token pooling (mean, cls, last): "
                "pooling=pooler reads the last layer only"
            )
        _check_positive("model", "max_length", self.max_length)


@dataclass
class DataConfig:
    path: str | None = _f(
        None, "Data file, folder with train/validation/test files, or hub dataset name."
    )
    name: str | None = _f(None, "Hub dataset configuration name (e.g. 'sst2' of 'glue').")
    train_split: str = _f("train", "Split (or file stem) used for training.")
    validation_split: str | None = _f(
        "validation",
        "Given validation split; None, missing or the test split -> carved from train.",
    )
    test_split: str | None = _f(
        "test", "Given test split; missing -> validation split if present, else carved."
    )
    text: str = _f("auto", "Text column (auto: sentence, text, content, ...).")
    text_pair: str | None = _f(None, "Second text column for sentence-pair tasks.")
    label: str = _f("label", "Label column (strings or integers).")
    labels: list[str] | None = _f(
        None, "Label names in id order; default: sorted unique training labels."
    )
    k_shot: int | None = _f(None, "Training examples per class (LM-BFF); None uses the whole pool.")
    k_shot_unit: str = _f("per_class", "per_class: K per class; total: K examples, stratified.")
    train_size: int | float | None = _f(
        None, "Instead of k_shot: a fraction (<1) or a number (>=1) of train rows."
    )
    validation_k: int | None = _f(
        None,
        "K-shot only: validation examples per class drawn disjointly from train (default: k_shot).",
    )
    validation_fraction: float = _f(
        0.1, "Fraction of train carved out as validation when none is given."
    )
    test_fraction: float = _f(
        0.2, "Fraction carved out as test when a single file has no test split."
    )
    min_words: int = _f(0, "Drop training-pool rows with fewer words (SST-2 phrases -> sentences).")
    seed: int = _f(13, "Seed of K-shot sampling and carved splits.")
    max_test_examples: int | None = _f(
        None, "Evaluate on at most this many test rows (stratified); None: all."
    )
    max_validation_examples: int | None = _f(
        None,
        "Validate on at most this many rows (stratified; caps a given or carved validation "
        "split, which is evaluated every eval_every steps); None: all.",
    )
    # causal-LM SFT
    instruction: str = _f("instruction", "SFT instruction column.")
    input: str = _f("input", "SFT optional input column.")
    output: str = _f("output", "SFT response column.")
    messages: str = _f("messages", "SFT chat column (list of {role, content}); used when present.")
    delimiter: str | None = _f(None, "CSV/TSV delimiter; default by extension.")

    def __post_init__(self) -> None:
        _check_choice("data", "k_shot_unit", self.k_shot_unit, ("per_class", "total"))
        _check_positive("data", "k_shot", self.k_shot)
        _check_positive("data", "seed", self.seed, allow_zero=True)  # numpy seeds are >= 0
        _check_positive("data", "validation_k", self.validation_k)
        _check_positive("data", "train_size", self.train_size)
        _check_positive("data", "min_words", self.min_words, allow_zero=True)
        _check_positive("data", "max_test_examples", self.max_test_examples)
        _check_positive("data", "max_validation_examples", self.max_validation_examples)
        if self.k_shot is not None and self.train_size is not None:
            raise ConfigError(
                "data.k_shot and data.train_size are exclusive; set one of them to null"
            )
        for name in ("validation_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ConfigError(f"data.{name}={v!r} must be between 0 and 1")
        for name in ("validation_split", "test_split"):
            if getattr(self, name) == self.train_split:
                raise ConfigError(
                    f"data.{name}={self.train_split!r} names the training split (data.train_split); "
                    f"set data.{name} to another split or null"
                )
        if self.labels is not None:
            names = [str(n) for n in self.labels]
            twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
            if twice is not None:
                raise ConfigError(
                    f"data.labels lists '{twice}' twice; name each class once, in id order"
                )


PEFT_METHODS_WITH_DEFAULTS = ("full", "head", "lora", "qlora")
BATCH_SAMPLINGS = ("auto", "random", "class_pairs", "by_length")


# method.target_modules values that name a rule rather than layers (lorafit.methods)
TARGET_KEYWORDS = ("auto", "all-linear", "attention")


@dataclass
class MethodConfig:
    name: str = _f(
        "lora", "full | head | lora | qlora | any PEFT type (ia3, prompt_tuning, loha, ...)."
    )
    r: int | None = _f(None, "LoRA rank (None: the method's default, lorafit.recipes; 8).")
    alpha: float | None = _f(
        None, "LoRA alpha, scale alpha/r or alpha/sqrt(r) with rslora (None: 2 * r)."
    )
    dropout: float = _f(0.1, "LoRA dropout.")
    target_modules: Union[str, list[str]] = _f(
        "auto",
        "Modules to adapt: auto (detected per architecture), all-linear, attention, or a list.",
    )
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling.")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    init_lora_weights: Union[bool, str] = _f(
        True, "LoRA init: true, gaussian, pissa, olora, loftq, ..."
    )
    quant_type: str = _f("nf4", "QLoRA 4-bit type: nf4 | fp4.")
    double_quant: bool = _f(True, "QLoRA double quantisation of the quantisation constants.")
    compute_dtype: str = _f(
        "auto", "QLoRA compute dtype: auto (bf16 on CUDA if supported, else fp32)."
    )
    peft_kwargs: dict[str, Any] = _f({}, "Extra keyword arguments passed to the PEFT config class.")
    reinit_layers: int = _f(0, "Re-initialise this many top encoder layers (full fine-tuning).")

    def __post_init__(self) -> None:
        from lorafit import recipes
        from lorafit.methods import check_method_name  # peft's method list, read lazily

        self.name = self.name.lower()
        check_method_name(self.name)  # at config load, not after the data and model
        if isinstance(self.target_modules, str) and self.target_modules not in TARGET_KEYWORDS:
            # `method.target_modules=query,value` (or one name) typed without brackets
            self.target_modules = [n.strip() for n in self.target_modules.split(",") if n.strip()]
        recipes.resolve_method(self)  # r / alpha left as None -> the method's defaults
        _check_positive("method", "r", self.r)
        _check_positive("method", "alpha", self.alpha)
        _check_positive("method", "reinit_layers", self.reinit_layers, allow_zero=True)
        _check_choice("method", "quant_type", self.quant_type, ("nf4", "fp4"))
        _check_choice(
            "method",
            "compute_dtype",
            self.compute_dtype,
            ("auto", "float32", "bfloat16", "float16"),
        )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout={self.dropout!r} must be in [0, 1)")
        if self.name in ("full", "head"):  # no adapter: these settings would be silently lost
            if self.peft_kwargs:
                raise ConfigError(
                    f"method.peft_kwargs applies to PEFT methods, not method.name={self.name}; drop it"
                )
            if self.target_modules != "auto":
                raise ConfigError(
                    f"method.target_modules applies to adapter methods, not method.name={self.name} "
                    "(it trains every layer or none); drop it"
                )


# Scalar validation metrics that lorafit.evaluate reports per task: what selection can use.
SELECTION_METRICS: dict[str, tuple[str, ...]] = {
    "classification": (
        "accuracy",
        "f1_macro",
        "f1_micro",
        "f1_weighted",
        "mcc",
        "auroc",
        "auprc",
        "loss",
        "nll",
        "brier",
        "ece",
    ),
    "causal_lm": ("loss", "perplexity", "top1_accuracy", "top5_accuracy"),
}
# Of those, where a smaller value is better (the selection's direction; the sign of a gap)
LOWER_IS_BETTER = frozenset({"loss", "nll", "brier", "ece", "perplexity"})


@dataclass
class EarlyStoppingConfig:
    metric: str = _f(
        "auto",
        "Validation metric that selects the best step (auto: accuracy or loss; docs/training.md).",
    )
    patience: int | None = _f(
        None, "Stop after this many evaluations without improvement; None: never stop."
    )
    min_steps: int = _f(0, "Never stop before this many optimisation steps.")
    tie_breaker: str = _f("loss", "On equal metric, prefer the lower validation loss.")

    def __post_init__(self) -> None:
        _check_positive("train.early_stopping", "patience", self.patience)
        _check_positive("train.early_stopping", "min_steps", self.min_steps, allow_zero=True)
        _check_choice("train.early_stopping", "tie_breaker", self.tie_breaker, ("loss", "none"))
        if self.metric != "auto" and not any(self.metric in m for m in SELECTION_METRICS.values()):
            per_task = "; ".join(f"{t}: {', '.join(m)}" for t, m in SELECTION_METRICS.items())
            raise ConfigError(
                f"train.early_stopping.metric={self.metric!r} is not valid; use auto or a "
                f"validation metric of the task ({per_task})"
            )


@dataclass
class TrainConfig:
    steps: int | None = _f(
        None, "Optimisation steps, a fixed budget, not epochs (None: the method's default)."
    )
    min_passes: float | None = _f(
        None,
        "Classification: raise steps to cover at least this many passes over the training "
        "set (None: 5 when steps is the method's default, 0 when steps is set).",
    )
    batch_size: int = _f(8, "Examples per device per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches per optimisation step.")
    lr: float | None = _f(None, "Peak learning rate (None: the method's default, lorafit.recipes).")
    head_lr: float | None = _f(
        None,
        "Learning rate of the classification head (None: the method's default, else lr); "
        "under objective=contrastive the head is fitted, so only a pooler layer uses it.",
    )
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and norms).")
    warmup: float = _f(0.1, "Warmup: a fraction of steps (<1) or a number of steps (>=1).")
    schedule: str = _f("linear", "LR schedule after warmup: linear | cosine | constant.")
    optimizer: str = _f("adamw", "adamw | adamw_8bit (bitsandbytes).")
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float | None = _f(1.0, "Clip gradients to this norm; None: no clipping.")
    mixed_precision: str = _f("no", "no | bf16 | fp16 (where the hardware supports it).")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory.")
    seed: int = _f(42, "Seed of initialisation, dropout and data order.")
    eval_every: int = _f(20, "Evaluate train sample and validation every N steps.")
    train_eval_size: int = _f(256, "Size of the fixed training sample evaluated for the gap.")
    early_stopping: EarlyStoppingConfig = _f(None, "Model selection and early stopping.")
    select_best: bool | None = _f(
        None, "Restore the best validation step's weights, else keep the last (None: recipe)."
    )
    objective: str | None = _f(
        None,
        "Loss: ce (cross-entropy) | contrastive (SetFit pair loss on the body, head fitted by "
        "logistic regression) | auto (contrastive for classification, ce for causal LMs); "
        "None: the method's default.",
    )
    batch_sampling: str = _f(
        "auto",
        "Training batches: random | class_pairs (batch_size/2 classes, two examples of each) | "
        "by_length (random rows grouped by length: less padding, for causal LMs) | "
        "auto (class_pairs under the contrastive objective when a random batch would hold "
        "under 4 same-label pairs, i.e. many classes; else random).",
    )
    head_fit_size: int | None = _f(
        8192,
        "Contrastive objective: fit the head on a fixed class-stratified sample of this many "
        "training examples (all when fewer; None: all).",
    )
    refit: bool | None = _f(
        None,
        "After the monitored run, train again from the start on train + validation for its "
        "selected steps and test that model (None: on for K-shot classification under the "
        "lora, qlora, full and head recipes).",
    )
    calibration: str = _f(
        "auto",
        "After training, fit a temperature on the validation split and fold it into the head "
        "(predictions unchanged): temperature | none | auto (temperature for classification).",
    )
    label_smoothing: float = _f(0.0, "Label smoothing of the classification loss.")
    layer_lr_decay: float = _f(1.0, "Layer-wise LR decay factor per layer below the top (1: off).")
    rdrop: float = _f(0.0, "R-Drop weight: symmetric KL between two dropout passes (0: off).")
    ema_decay: float | None = _f(None, "EMA of trainable weights, evaluated and saved (None: off).")
    checkpoint_every: int | None = _f(
        None, "Save a resumable checkpoint every N steps (default: eval_every)."
    )
    keep_checkpoints: int = _f(2, "Keep the newest N checkpoints.")
    resume: bool = _f(False, "Continue from the newest checkpoint in output.dir.")
    num_workers: int = _f(0, "DataLoader workers.")

    def __post_init__(self) -> None:
        if self.early_stopping is None:
            self.early_stopping = EarlyStoppingConfig()
        for name in ("steps", "batch_size", "grad_accum", "lr", "eval_every", "train_eval_size"):
            _check_positive("train", name, getattr(self, name))
        _check_positive("train", "seed", self.seed, allow_zero=True)  # numpy seeds are >= 0
        _check_positive("train", "head_lr", self.head_lr)
        _check_positive("train", "head_fit_size", self.head_fit_size)
        _check_positive("train", "warmup", self.warmup, allow_zero=True)
        _check_positive("train", "min_passes", self.min_passes, allow_zero=True)
        _check_positive("train", "weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("train", "checkpoint_every", self.checkpoint_every)
        _check_positive("train", "keep_checkpoints", self.keep_checkpoints)
        _check_positive("train", "rdrop", self.rdrop, allow_zero=True)
        _check_positive("train", "max_grad_norm", self.max_grad_norm)
        if self.objective is not None:
            _check_choice("train", "objective", self.objective, ("auto", "ce", "contrastive"))
        _check_choice("train", "calibration", self.calibration, ("auto", "temperature", "none"))
        _check_choice("train", "batch_sampling", self.batch_sampling, BATCH_SAMPLINGS)
        _check_choice("train", "schedule", self.schedule, ("linear", "cosine", "constant"))
        _check_choice("train", "optimizer", self.optimizer, ("adamw", "adamw_8bit"))
        _check_choice("train", "mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        if not 0 < self.layer_lr_decay <= 1:
            raise ConfigError(f"train.layer_lr_decay={self.layer_lr_decay!r} must be in (0, 1]")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay={self.ema_decay!r} must be in (0, 1)")
        if len(self.adam_betas) != 2:
            raise ConfigError("train.adam_betas needs two numbers, e.g. [0.9, 0.999]")
        if self.checkpoint_every is None:
            self.checkpoint_every = self.eval_every

    @property
    def warmup_steps(self) -> int:
        """`warmup` in optimisation steps (a fraction of `steps` below 1)."""
        return int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * self.steps))


def objective_for(train_cfg: TrainConfig, task: str) -> str:
    """The loss `train.objective` means for `task` (auto: contrastive for classification, else
    ce); refuses settings that cannot go with it. The config itself keeps `auto`."""
    objective = train_cfg.objective or "ce"
    if objective == "auto":
        objective = "contrastive" if task == "classification" else "ce"
    if objective != "contrastive":
        if task == "causal_lm" and train_cfg.rdrop > 0:  # compute_loss has it for a head only
            raise ConfigError(
                "train.rdrop applies to classification; set train.rdrop=0 for causal LMs"
            )
        if task == "causal_lm" and train_cfg.batch_sampling == "class_pairs":
            raise ConfigError(
                "train.batch_sampling=class_pairs needs a classification task; "
                "set train.batch_sampling=random (or by_length)"
            )
        return objective
    if task != "classification":
        raise ConfigError(
            "train.objective=contrastive needs a classification task; use train.objective=ce"
        )
    # The head is fitted, not trained: losses and weight averages of logits do not apply.
    for name, off in (("label_smoothing", 0.0), ("rdrop", 0.0), ("ema_decay", None)):
        if getattr(train_cfg, name) != off:
            raise ConfigError(
                f"train.{name} does not apply to train.objective=contrastive; "
                f"set train.{name}={'null' if off is None else off} or train.objective=ce"
            )
    return objective


def calibration_for(train_cfg: TrainConfig, task: str) -> str:
    """What `train.calibration` means for `task` (auto: temperature for classification, else
    none); the config itself keeps `auto`."""
    if train_cfg.calibration == "auto":
        return "temperature" if task == "classification" else "none"
    if train_cfg.calibration == "temperature" and task != "classification":
        raise ConfigError(
            "train.calibration=temperature scales a classification head; "
            "use train.calibration=none for causal LMs"
        )
    return train_cfg.calibration


def refit_for(cfg: RunConfig, task: str) -> bool:
    """Whether the run trains again on train + validation after the monitored run (None: the
    method's recipe decides, for classification runs whose validation is a K-shot draw from the
    training data; a validation split the user gave is never trained on by default)."""
    from lorafit import recipes

    if cfg.train.refit is not None:
        return cfg.train.refit
    return (
        recipes.recipe_for(cfg.method.name).refit
        and task == "classification"
        and cfg.data.k_shot is not None
    )


def selection_metric_for(train_cfg: TrainConfig, task: str) -> str:
    """The validation metric `train.early_stopping.metric` selects on for `task` (auto: accuracy
    for classification, else loss); refuses a metric that the task does not report."""
    metric = train_cfg.early_stopping.metric
    if metric == "auto":
        return "accuracy" if task == "classification" else "loss"
    if metric not in SELECTION_METRICS[task]:
        raise ConfigError(
            f"train.early_stopping.metric={metric!r} is not a {task} metric; "
            f"use one of {['auto', *SELECTION_METRICS[task]]}"
        )
    return metric


@dataclass
class EvalConfig:
    batch_size: int = _f(64, "Examples per evaluation batch.")
    ece_bins: int = _f(15, "Equal-width bins of the top-label ECE.")
    bootstrap_samples: int = _f(1000, "Bootstrap resamples for test-metric CIs.")
    ci_level: float = _f(0.95, "Confidence level of the CIs.")
    save_predictions: bool = _f(True, "Write per-example test predictions to predictions/.")

    def __post_init__(self) -> None:
        _check_positive("eval", "batch_size", self.batch_size)
        _check_positive("eval", "ece_bins", self.ece_bins)
        _check_positive("eval", "bootstrap_samples", self.bootstrap_samples)
        if not 0 < self.ci_level < 1:
            raise ConfigError(f"eval.ci_level={self.ci_level!r} must be between 0 and 1")


@dataclass
class OutputConfig:
    dir: str = _f("runs/run", "Run directory.")
    overwrite: bool = _f(False, "Replace an existing finished run directory.")
    report_to: list[str] = _f(
        ["tensorboard"], "Accelerate trackers (tensorboard, wandb, ...); [] for none."
    )
    save_adapter: bool = _f(True, "Write the adapter (or full weights) to adapter/.")
    plot: bool = _f(True, "Write learning_curve.png.")

    def __post_init__(self) -> None:
        if not self.report_to:
            return
        from accelerate.utils import LoggerType  # imports torch: only when trackers are named

        trackers = [t.value for t in LoggerType]
        unknown = next((t for t in self.report_to if t not in trackers), None)
        if unknown is not None:
            raise ConfigError(
                f"output.report_to: unknown tracker {unknown!r}; use any of {trackers} ([] for none)"
            )


@dataclass
class RunConfig:
    model: ModelConfig = _f(None, "Base model.")
    data: DataConfig = _f(None, "Dataset, columns, splits and K-shot sampling.")
    method: MethodConfig = _f(None, "Fine-tuning method.")
    train: TrainConfig = _f(None, "Optimisation loop.")
    eval: EvalConfig = _f(None, "Evaluation.")
    output: OutputConfig = _f(None, "Run directory and trackers.")

    def __post_init__(self) -> None:
        from lorafit import recipes

        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None:
                setattr(self, f.name, _hints(type(self))[f.name]())
        # Settings left unset take the method's defaults (lorafit/recipes.py, docs/recipes.md).
        recipes.resolve(self)
        tc = self.train
        if tc.warmup_steps > tc.steps:
            raise ConfigError(f"train.warmup={tc.warmup} is longer than train.steps={tc.steps}")
        if tc.refit and self.method.name.lower() == "adalora":
            raise ConfigError(
                "train.refit does not apply to method.name=adalora: its rank budget is scheduled "
                "over the monitored run's steps and keeps that run's importance scores; set "
                "train.refit=false"
            )
        if self.model.task != "auto":  # refuse impossible mixes before any loading
            objective_for(tc, self.model.task)
            selection_metric_for(tc, self.model.task)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """sha256 of the resolved config (output.dir and resume excluded)."""
        d = self.to_dict()
        d["output"].pop("dir", None)
        d["train"].pop("resume", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


# -- building from dicts, YAML and overrides -----------------------------------------------------

_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = get_type_hints(cls)
    return _HINTS_CACHE[cls]


def _unknown_key(prefix: str, key: str, valid: list[str]) -> ConfigError:
    moved = _misplaced_key(prefix, key)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if moved:
        hint = f"; did you mean '{moved}'?"
    elif close:
        hint = f"; did you mean '{prefix}{close[0]}'?"
    else:
        hint = f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


# other tools' spellings of a column key: data.text_column -> data.text
_KEY_SUFFIXES = ("_column", "_col", "_field", "_key")

# Other tools' names (transformers TrainingArguments, peft LoraConfig, TRL) for lorafit's keys,
# in whatever section they are written: difflib alone gets several of them wrong.
_OTHER_TOOLS_KEYS = {
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.batch_size",
    "train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "eval.batch_size",
    "eval_batch_size": "eval.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "max_steps": "train.steps",
    "num_train_epochs": "train.steps",
    "warmup_ratio": "train.warmup",
    "warmup_steps": "train.warmup",
    "lr_scheduler_type": "train.schedule",
    "optim": "train.optimizer",
    "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision",
    "eval_steps": "train.eval_every",
    "save_steps": "train.checkpoint_every",
    "save_total_limit": "train.keep_checkpoints",
    "early_stopping_patience": "train.early_stopping.patience",
    "load_best_model_at_end": "train.select_best",
    "metric_for_best_model": "train.early_stopping.metric",
    "lora_r": "method.r",
    "rank": "method.r",
    "lora_alpha": "method.alpha",
    "lora_dropout": "method.dropout",
    "model_name_or_path": "model.name_or_path",
    "max_seq_length": "model.max_length",
    "dataset_name": "data.name",
    "prompt": "data.instruction",
    "response": "data.output",
    "completion": "data.output",
}


def _misplaced_key(prefix: str, key: str) -> str | None:
    """The full key meant by a key written in the wrong section of a run config.

    `train.pooling` -> `model.pooling`, `lr` -> `train.lr`, `train.output_dir` -> `output.dir`,
    `data.text_column` -> `data.text`. None when nothing matches exactly (difflib takes over).
    """
    sections = {f.name: _hints(RunConfig)[f.name] for f in dataclasses.fields(RunConfig)}
    parts = prefix.rstrip(".").split(".") if prefix else []
    if parts and parts[-1] not in sections:
        return None  # not directly under a run-config section (a nested key or a sweep key)
    root = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
    if key in _OTHER_TOOLS_KEYS:
        return f"{root}{_OTHER_TOOLS_KEYS[key]}"
    here = parts[-1] if parts else None
    names = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in sections.items()}
    section, _, leaf = key.partition("_")
    if section in names and leaf in names[section]:
        return f"{root}{section}.{leaf}"
    if here is not None:
        for suffix in _KEY_SUFFIXES:
            if key.endswith(suffix) and key[: -len(suffix)] in names[here]:
                return f"{prefix}{key[: -len(suffix)]}"
    owners = [name for name, fields in names.items() if key in fields and name != here]
    return f"{root}{owners[0]}.{key}" if len(owners) == 1 else None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type (int -> float allowed)."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if value is None:  # a section whose keys are all commented out
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of keys, got {value!r}")
        return from_dict(hint, value, prefix=f"{where}.")
    if origin is Union or origin is types.UnionType:
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}={value!r} has the wrong type")
    if hint is Any:
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = get_args(hint) or (Any,)
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        for key, item in value.items():
            # YAML reads {r:4} (no space after the colon) as {'r:4': None}
            if item is None and isinstance(key, str) and ":" in key:
                name, _, given = key.partition(":")
                raise ConfigError(
                    f"{where} key {key!r} has no value: YAML needs a space after the colon, "
                    f"{{{name}: {given}}}"
                )
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every `> 0` check
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads no/yes/on/off as switches
            raise ConfigError(
                f"{where} must be a string, got {value!r}; quote the value, e.g. 'no' or 'off'"
            )
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in names:
            raise _unknown_key(prefix, str(key), names)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _parse_scalar(text: str, hint: Any, item: str) -> Any:
    """A `k=v` value, parsed as a YAML scalar or list (5e-4 -> float, [a,b] -> list, null -> None),
    except that a setting holding text keeps the text as typed (revision=1.10, not 1.1)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        if text.lstrip()[:1] in ("[", "{"):
            raise ConfigError(
                f"override '{item}': {text.strip()!r} is not a valid YAML list or mapping; "
                "close its brackets, e.g. [query,value]"
            ) from None
        return text
    if _holds_text(hint) and isinstance(value, (bool, int, float)):
        return text.strip()
    if isinstance(value, str) and not _holds_text(hint):
        try:  # YAML 1.1 reads 5e-4 as a string
            number = float(value) if any(c in value for c in "eE.") else None
        except ValueError:
            return value
        return value if number is None or not math.isfinite(number) else number
    return value


def _holds_text(hint: Any) -> bool:
    """Whether a setting of this type holds text (str, or str | None), not a number or switch."""
    args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    return str in args and not {bool, int, float} & set(args)


def _hint_at(schema: type, parts: list[str]) -> Any:
    """The type of the dotted setting `parts` in dataclass `schema` (None where unknown)."""
    hint: Any = schema
    for part in parts:
        if not dataclasses.is_dataclass(hint):
            return None
        hint = _hints(hint).get(part)
    return hint


def apply_overrides(
    data: dict[str, Any], overrides: list[str], schema: type | None = None
) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a nested dict (validated later by from_dict);
    `schema`, the dataclass the dict becomes, tells which settings hold text."""
    data = json.loads(json.dumps(data or {}))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' must look like section.key=value, e.g. train.lr=1e-4"
            )
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        hint = _hint_at(schema, parts) if schema is not None else None
        node[parts[-1]] = _parse_scalar(raw, hint, item)
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _mapping_without_repeats(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, str):
            continue
        if key in seen:
            problem = f"key {key!r} appears twice; merge the two into one"
            raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats
)


def load_yaml(
    path: str | Path, example: str = "configs/sst2_lora.yaml", saved: str = "config.yaml"
) -> dict[str, Any]:
    """A YAML mapping. When `path` is not one, the error suggests `example`, or the resolved
    config (`saved`) inside a folder given by mistake (a run or sweep directory)."""
    path = Path(path)
    if path.is_dir():
        hint = (
            f"its resolved config is {path / saved}"
            if (path / saved).is_file()
            else f"pass a YAML file such as {example}"
        )
        raise ConfigError(f"{path} is a folder, not a YAML file; {hint}")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass a YAML file such as {example}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, ...)")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + `key=value` overrides -> validated RunConfig."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [], RunConfig)
    return from_dict(RunConfig, data)


def config_docs(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) rows for every field; used by `lorafit config --help` and docs."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(config_docs(hint, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("doc", "")))
    return rows
