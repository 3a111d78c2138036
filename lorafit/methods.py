"""Fine-tuning methods: full, head, lora, qlora and any other PEFT method, plus save/load.

`build_model` loads the base (lorafit.models), applies the method and returns the trainable
model with its tokenizer and an `info` dict. Classification models are `TextClassifier`s whose
encoder may be PEFT-wrapped while the head stays outside (and always trains); causal LMs are
(PEFT-wrapped) `AutoModelForCausalLM`s.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafit import _optional
from lorafit.config import MethodConfig, ModelConfig, TrainConfig
from lorafit.errors import ConfigError, ModelError
from lorafit.io import give_default_modes, write_json
from lorafit.models import (
    TASKS,
    ModelSource,
    TextClassifier,
    check_max_length,
    choose_pooling,
    load_base_model,
    load_tokenizer,
    resolve_model_source,
)
from lorafit.recipes import recipe_for, resolve_pool_layers

BUILTIN_METHODS = ("full", "head", "lora", "qlora")
META_FILE = "lorafit_model.json"
HEAD_FILE = "head.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
DEFAULT_VIRTUAL_TOKENS = 20  # prompt-learning methods need a number; peft has no default

# PEFT methods that cannot train in lorafit's one-task loop, with the reason the error gives.
UNSUPPORTED_PEFT_METHODS = {
    "poly": "routes each example by a task id, and lorafit's data has one task",
    "multitask_prompt_tuning": "routes each example by a task id, and lorafit's data has one task",
    "xlora": "mixes LoRA adapters trained before; train each with method.name=lora first",
    "shadow": "fails in its first forward pass with the installed peft and transformers",
}

# model_type -> (all linear layers of the blocks, attention projections only)
_LLAMA_LIKE = (
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ["q_proj", "k_proj", "v_proj", "o_proj"],
)
_BERT_LIKE = (
    ["query", "key", "value", "dense"],
    ["query", "key", "value", "attention.output.dense"],
)
ARCH_TARGET_MODULES: dict[str, tuple[list[str], list[str]]] = {
    **dict.fromkeys(
        ["bert", "roberta", "xlm-roberta", "electra", "camembert", "mpnet"], _BERT_LIKE
    ),
    **dict.fromkeys(
        ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "smollm3"], _LLAMA_LIKE
    ),
    "distilbert": (
        ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
        ["q_lin", "k_lin", "v_lin", "out_lin"],
    ),
    "gpt2": (["c_attn", "c_proj", "c_fc"], ["c_attn", "attn.c_proj"]),
}


@dataclass
class Built:
    """What `build_model` returns: the trainable model, its tokenizer and facts about both."""

    model: nn.Module
    tokenizer: Any
    info: dict[str, Any]


# -- method names ---------------------------------------------------------------------------------


def peft_method_names() -> list[str]:
    """Lower-case names of the PEFT methods lorafit can train (lora, ia3, prompt_tuning, ...):
    those this peft version knows, less UNSUPPORTED_PEFT_METHODS."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    names = (str(getattr(t, "value", t)).lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING)
    return sorted(n for n in names if n not in UNSUPPORTED_PEFT_METHODS)


def _peft_config_class(name: str) -> type:
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    by_name = {
        str(getattr(t, "value", t)).lower(): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()
    }
    peft_names = [n for n in peft_method_names() if n != "lora"]
    known = f"{', '.join(BUILTIN_METHODS)}, or a PEFT method: {', '.join(peft_names)}"
    if name in UNSUPPORTED_PEFT_METHODS:
        raise ConfigError(
            f"method.name={name} is not supported: it {UNSUPPORTED_PEFT_METHODS[name]}; "
            f"use one of {known}"
        )
    if name not in by_name:
        close = _closest_method(name, peft_names)
        hint = f"did you mean {close!r}? Known methods: " if close else "use one of "
        raise ConfigError(f"method.name={name!r} is not a known method; {hint}{known}")
    return by_name[name]


def _closest_method(name: str, peft_names: list[str]) -> str | None:
    """The likely intended method: lorafit's own first, then PEFT's; swapped letters count."""
    typed = name.lower()
    for candidates in (list(BUILTIN_METHODS), peft_names):
        for candidate in candidates:
            if sorted(candidate) == sorted(typed):
                return candidate
        close = difflib.get_close_matches(typed, candidates, n=1, cutoff=0.6)
        if close:
            return close[0]
    return None


def check_method_name(name: str) -> None:
    """Raise ConfigError (listing valid names) unless `name` is a built-in or PEFT method."""
    if name not in BUILTIN_METHODS:
        _peft_config_class(name)


# -- target modules -------------------------------------------------------------------------------


def _linear_module_names(model: nn.Module) -> list[str]:
    """Full names of the adaptable linear layers (nn.Linear, 4-bit Linear, GPT-2 Conv1D)."""
    names = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Linear) or kind in ("Linear4bit", "Linear8bitLt", "Conv1D"):
            names.append(name)
    return names


def _norm_module_names(model: nn.Module) -> list[str]:
    """Full names of the normalisation layers (LayerNorm, RMSNorm) outside the heads."""
    return [
        name
        for name, module in model.named_modules()
        if name
        and re.search(r"(Layer|RMS)Norm$", type(module).__name__)
        and not _outside_blocks(name)
    ]


def _outside_blocks(name: str) -> bool:
    # Heads that are not part of the transformer blocks: never adapted, trained (or not) as a whole.
    return name.split(".")[0] in ("pooler", "lm_head", "score", "classifier", "head")


def detect_target_modules(model: nn.Module, spec: str | list[str]) -> list[str]:
    """Resolve `method.target_modules` (auto | all-linear | attention | list) to module-name suffixes.

    auto: the architecture's known table (BERT: query/key/value/dense; Llama: q/k/v/o + MLP),
    falling back to all linear layers of the blocks; the pooler and LM head are never targets.
    """
    if isinstance(spec, list):
        # any module type: the method decides what it can adapt (ln_tuning: the norms)
        present = [name for name, _ in model.named_modules() if name]
        missing = [s for s in spec if not any(n == s or n.endswith("." + s) for n in present)]
        if missing:
            linear = _linear_module_names(model)
            raise ConfigError(
                f"method.target_modules {missing} match no layer; linear layers look like {linear[:6]}"
            )
        return list(spec)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    names = [n for n in _linear_module_names(model) if not _outside_blocks(n)]
    if spec == "auto" and model_type in ARCH_TARGET_MODULES:
        return list(ARCH_TARGET_MODULES[model_type][0])
    if spec in ("auto", "all-linear"):
        return sorted({n.split(".")[-1] for n in names})
    if spec == "attention":
        if model_type in ARCH_TARGET_MODULES:
            return list(ARCH_TARGET_MODULES[model_type][1])
        found = sorted({n.split(".")[-1] for n in names if re.search(r"attn|attention", n)})
        if not found:
            raise ConfigError(
                f"cannot find attention layers in {model_type or 'this model'}; list method.target_modules"
            )
        return found
    raise ConfigError(
        f"method.target_modules={spec!r} must be auto, all-linear, attention or a list of names"
    )


def _excluded_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Linear layers outside the blocks that a target suffix would catch (BERT's pooler.dense)."""
    return [
        n
        for n in _linear_module_names(model)
        if _outside_blocks(n) and any(n == t or n.endswith("." + t) for t in targets)
    ]


# -- QLoRA ----------------------------------------------------------------------------------------


def qlora_compute_dtype(name: str) -> torch.dtype:
    """`method.compute_dtype`; auto: bf16 on a CUDA GPU that supports it, else float32."""
    if name == "auto":
        return (
            torch.bfloat16
            if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            else torch.float32
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def bnb_4bit_config(method_cfg: MethodConfig, skip_modules: list[str]) -> Any:
    """transformers' BitsAndBytesConfig for NF4/FP4 4-bit loading (bitsandbytes must import)."""
    from transformers import BitsAndBytesConfig

    _optional.bitsandbytes()  # a clear error before transformers' own
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method_cfg.quant_type,
        bnb_4bit_use_double_quant=method_cfg.double_quant,
        bnb_4bit_compute_dtype=qlora_compute_dtype(method_cfg.compute_dtype),
        llm_int8_skip_modules=skip_modules,  # (the name covers 4-bit too) keep heads in float
    )


def disable_cpu_weight_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights on CPU; returns the number of layers fixed.

    On CPUs with avx512_bf16, the first no-grad forward of a `Linear4bit` in eval mode rewrites
    its weight into a CPU-only packed layout. `dequantize`, `merge_and_unload` and
    `save_pretrained` do not understand that layout and silently produce corrupt weights.
    Switching the fast path off keeps the standard layout (training is unaffected: it never
    takes that path).
    """
    fixed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            fixed += 1
    return fixed


# -- building -------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        n = int(quant_state.shape.numel()) if quant_state is not None else param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def _transformer_layers(model: nn.Module) -> nn.ModuleList | None:
    """The ModuleList of transformer blocks (config.num_hidden_layers long), if found."""
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers:
            return module
    return None


def _reinit_top_layers(model: nn.Module, n: int) -> None:
    """Re-initialise the top `n` transformer blocks with the model's own initialiser."""
    layers = _transformer_layers(model)
    if layers is None or n > len(layers):
        raise ConfigError(
            f"method.reinit_layers={n} but the model has {0 if layers is None else len(layers)} layers"
        )
    init = getattr(model, "_init_weights", None)
    if init is None:
        raise ConfigError("method.reinit_layers needs a transformers model with _init_weights")
    for block in list(layers)[len(layers) - n :]:
        for module in block.modules():
            # transformers 5 skips modules it has initialised once; clear that mark first
            for p in module.parameters(recurse=False):
                if hasattr(p, "_is_hf_initialized"):
                    p._is_hf_initialized = False
            if hasattr(module, "_is_hf_initialized"):
                module._is_hf_initialized = False
            init(module)


def _peft_config(
    method_cfg: MethodConfig, base: nn.Module, task: str, pooling: str | None
) -> tuple[Any, list[str] | None]:
    """The PEFT config object for method `lora`/`qlora` or any PEFT method, and its target modules."""
    from peft import TaskType

    name = "lora" if method_cfg.name == "qlora" else method_cfg.name
    config_class = _peft_config_class(name)
    fields = {f.name for f in dataclasses.fields(config_class)}
    kwargs: dict[str, Any] = {}
    targets: list[str] | None = None
    if name == "lora":
        targets = detect_target_modules(base, method_cfg.target_modules)
        kwargs.update(
            r=method_cfg.r,
            lora_alpha=method_cfg.alpha,
            lora_dropout=method_cfg.dropout,
            target_modules=targets,
            use_rslora=method_cfg.use_rslora,
            use_dora=method_cfg.use_dora,
            init_lora_weights=method_cfg.init_lora_weights,
        )
    else:
        for ours, theirs in (("r", "r"), ("alpha", "alpha")):
            if theirs in fields:
                kwargs[theirs] = getattr(method_cfg, ours)
        if name == "oft":
            kwargs.update(_oft_block_kwargs(method_cfg))
        if name == "adaption_prompt":  # peft picks the attention module it wraps per model type
            kwargs.update(adapter_len=DEFAULT_VIRTUAL_TOKENS, adapter_layers=_num_layers(base))
        if name == "trainable_tokens" and not method_cfg.peft_kwargs.get("token_indices"):
            raise ConfigError(
                "method trainable_tokens needs the ids of the tokens to train: set "
                "method.peft_kwargs.token_indices, e.g. [128000, 128001]"
            )
        own_targets = name == "adaption_prompt" or "target_modules" in method_cfg.peft_kwargs
        if "target_modules" in fields and not own_targets:
            targets = _other_method_targets(name, base, method_cfg.target_modules)
            if targets is not None:
                kwargs["target_modules"] = targets
        if "num_virtual_tokens" in fields:
            kwargs["num_virtual_tokens"] = DEFAULT_VIRTUAL_TOKENS
    if "target_modules" in kwargs and "exclude_modules" in fields:
        excluded = _excluded_modules(base, kwargs["target_modules"])
        if excluded:
            kwargs["exclude_modules"] = excluded
    if pooling == "pooler" and "modules_to_save" in fields:
        kwargs["modules_to_save"] = [
            "pooler"
        ]  # the pooler is part of the classifier: train it whole
    kwargs["task_type"] = TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.FEATURE_EXTRACTION
    kwargs.update(method_cfg.peft_kwargs)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ConfigError(
            f"method.peft_kwargs {unknown} are not options of {config_class.__name__}"
        )
    try:
        return config_class(**kwargs), targets
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method {method_cfg.name}: {e}") from None


def _oft_block_kwargs(method_cfg: MethodConfig) -> dict[str, Any]:
    """OFT's `r` is a block count, exclusive with its `oft_block_size` (peft default 32).

    `method.r` resolves to the recipe's rank when unset, so only a value other than that (or
    `method.peft_kwargs.r`) counts as the user's block count; otherwise peft's block size applies.
    """
    r_set = method_cfg.r != recipe_for(method_cfg.name).r or "r" in method_cfg.peft_kwargs
    if r_set and "oft_block_size" in method_cfg.peft_kwargs:
        raise ConfigError(
            "method oft takes either method.r (the number of blocks) or "
            "method.peft_kwargs.oft_block_size (their size), not both; drop one"
        )
    return {"oft_block_size": 0} if r_set else {"r": 0}


def _other_method_targets(name: str, base: nn.Module, spec: str | list[str]) -> list[str] | None:
    """Targets of a non-LoRA PEFT method: peft's own table when it knows the model, else ours."""
    if spec != "auto":
        return detect_target_modules(base, spec)
    from peft.utils import constants

    tables = (
        f"TRANSFORMERS_MODELS_TO_{key}_TARGET_MODULES_MAPPING"
        for key in (name.upper(), name.upper().replace("_", ""))
    )  # ln_tuning: LNTUNING
    table = next((getattr(constants, t) for t in tables if hasattr(constants, t)), {})
    if getattr(base.config, "model_type", None) in table:
        return None  # peft picks (IA3 also needs its feed-forward subset, which the table has)
    if name == "ia3":
        raise ConfigError(
            "method ia3 on this architecture needs method.target_modules and "
            "method.peft_kwargs.feedforward_modules"
        )
    if name == "ln_tuning":  # tunes the normalisation layers, not the linear ones
        norms = sorted({n.split(".")[-1] for n in _norm_module_names(base)})
        if not norms:
            raise ConfigError(
                "method ln_tuning found no LayerNorm/RMSNorm layers; list method.target_modules"
            )
        return norms
    return detect_target_modules(base, "auto")


def _apply_method(
    method_cfg: MethodConfig, base: nn.Module, task: str, pooling: str | None
) -> tuple[nn.Module, list[str] | None]:
    """Set requires_grad / wrap with PEFT. Returns the (possibly wrapped) base and its targets."""
    name = method_cfg.name
    if method_cfg.reinit_layers and name != "full":
        raise ConfigError("method.reinit_layers applies to method.name=full only")
    if name == "full":
        base.requires_grad_(True)
        if method_cfg.reinit_layers:
            _reinit_top_layers(base, method_cfg.reinit_layers)
        return base, None
    if name == "head":
        if task != "classification":
            raise ConfigError(
                "method.name=head trains a classification head; for causal_lm use lora, qlora or full"
            )
        base.requires_grad_(False)
        return base, None
    from peft import get_peft_model

    peft_config, targets = _peft_config(method_cfg, base, task, pooling)
    try:
        wrapped = get_peft_model(base, peft_config)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"method {name} cannot be applied to this model: {e}") from None
    return wrapped, targets


def build_model(
    model_cfg: ModelConfig,
    method_cfg: MethodConfig,
    task: str,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    device_map: dict[str, Any] | None = None,
    text_columns: tuple[str | None, str | None] = (None, None),
) -> Built:
    """Load the base model and tokenizer, apply the method, report parameter counts.

    classification: a `TextClassifier` (logits [B, C]); causal_lm: a (PEFT-wrapped) causal LM.
    info: trainable_params, total_params, pooling, target_modules, quantized, method.
    device_map: where a 4-bit (qlora) base is loaded; under DDP each rank passes its own
    device, `{"": accelerator.local_process_index}` (lorafit.distributed.quantized_device_map).
    Default: this process's device. A string ("auto", ...) is refused under a multi-process
    launch: it would spread one model over every GPU.
    text_columns: the (text, text_pair) columns of the training data (None: not named), saved
    with a classifier so that prediction reads the same columns and asks a pair model for pairs.
    """
    from lorafit.distributed import check_device_map

    check_device_map(device_map)
    if task not in TASKS:
        raise ConfigError(
            f"task {task!r} must be one of {list(TASKS)} (resolve 'auto' from the data first)"
        )
    check_method_name(method_cfg.name)
    if task == "classification":
        if label_names is not None and num_labels is None:
            num_labels = len(label_names)
        if not num_labels or num_labels < 2:
            raise ConfigError(f"classification needs at least 2 labels, got {num_labels}")
        if label_names is not None and len(label_names) != num_labels:
            raise ConfigError(f"{len(label_names)} label names for {num_labels} labels")
    source = resolve_model_source(model_cfg)
    tokenizer = load_tokenizer(model_cfg, source)
    model, pooling, targets = _build(
        model_cfg, method_cfg, task, num_labels, source, tokenizer, device_map
    )
    meta = _meta(model_cfg, method_cfg, task, source, num_labels, label_names, pooling, targets)
    meta["pool_layers"] = getattr(model, "pool_layers", None)  # resolved; None for causal LMs
    # A sentence-pair classifier must be given pairs at prediction time: the columns are recorded.
    text, text_pair = text_columns if task == "classification" else (None, None)
    meta["text"], meta["text_pair"] = text, text_pair
    model.lorafit_meta = meta
    model.train()  # from_pretrained leaves the encoder in eval mode; the whole model trains as one
    trainable, total = count_parameters(model)
    info = {
        "trainable_params": trainable,
        "total_params": total,
        "pooling": meta["pooling"],
        "pool_layers": meta["pool_layers"],
        "target_modules": meta["target_modules"],
        "quantized": meta["quantized"],
        "method": method_cfg.name,
    }
    return Built(model=model, tokenizer=tokenizer, info=info)


def _build(
    model_cfg: ModelConfig,
    method_cfg: MethodConfig,
    task: str,
    num_labels: int | None,
    source: ModelSource,
    tokenizer: Any,
    device_map: dict[str, Any] | None = None,
) -> tuple[nn.Module, str | None, list[str] | None]:
    """Base + method -> (model, pooling or None, target modules or None)."""
    quantized = method_cfg.name == "qlora"
    # heads stay in float: 4-bit layers cannot train, and the pooler is part of the classifier
    quant_cfg = bnb_4bit_config(method_cfg, ["pooler", "lm_head"]) if quantized else None
    base = load_base_model(model_cfg, task, source, quant_cfg, device_map=device_map)
    if base.config.pad_token_id is None and tokenizer is not None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if quantized:
        from peft import prepare_model_for_kbit_training

        disable_cpu_weight_repacking(base)
        # gradient checkpointing is the trainer's switch (train.gradient_checkpointing)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    pooling = choose_pooling(model_cfg.pooling, source, base) if task == "classification" else None
    body, targets = _apply_method(method_cfg, base, task, pooling)
    check_max_length(model_cfg, base.config, virtual_tokens(body))
    if task != "classification":
        return body, None, targets
    depth = getattr(base.config, "num_hidden_layers", None)
    pool_layers = resolve_pool_layers(model_cfg.pool_layers, method_cfg.name, pooling, depth)
    model = TextClassifier(body, num_labels, pooling, pool_layers=pool_layers)
    model.head.to(next(p.device for p in body.parameters()))  # a 4-bit base sits on its device
    return model, pooling, targets


def virtual_tokens(model: nn.Module) -> int:
    """Positions a prompt-learning adapter puts before the input (0 for every other method)."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is None or not peft_config.is_prompt_learning:
        return 0
    return peft_config.num_virtual_tokens


def _meta(
    model_cfg: ModelConfig,
    method_cfg: MethodConfig,
    task: str,
    source: ModelSource,
    num_labels: int | None,
    label_names: list[str] | None,
    pooling: str | None,
    targets: list[str] | None,
) -> dict[str, Any]:
    return {
        "format": 1,
        "task": task,
        "method": method_cfg.name,
        "pooling": pooling,
        "num_labels": num_labels,
        "label_names": label_names,
        "base_model": source.alias or source.path,
        "gguf_file": None if source.alias else source.gguf_file,
        "target_modules": targets,
        "quantized": method_cfg.name == "qlora",
        "model_config": dataclasses.asdict(model_cfg),
        "method_config": dataclasses.asdict(method_cfg),
    }


# -- training-time hooks --------------------------------------------------------------------------


def for_training(method_cfg: MethodConfig, train_cfg: TrainConfig) -> MethodConfig:
    """`method_cfg` with AdaLoRA's `total_step` (the length of its rank-budget schedule) set to
    `train.steps`, unless `method.peft_kwargs.total_step` is set; other methods unchanged."""
    if method_cfg.name != "adalora":
        return method_cfg
    if train_cfg.resume:
        raise ConfigError(
            "method adalora cannot train.resume: its rank-importance scores are not "
            "checkpointed; start a new run (train.resume=false)"
        )
    if "total_step" in method_cfg.peft_kwargs:
        return method_cfg
    peft_kwargs = {**method_cfg.peft_kwargs, "total_step": train_cfg.steps}
    return dataclasses.replace(method_cfg, peft_kwargs=peft_kwargs)


def rank_update_hook(model: nn.Module) -> Callable[[int], None]:
    """AdaLoRA's per-step rank allocation, `update_and_allocate(step)`; a no-op for other methods.

    It scores the ranks from the gradients: call it after optimizer.step(), before zero_grad().
    """
    body = model.encoder if isinstance(model, TextClassifier) else model
    if _is_adalora(body):
        return body.base_model.update_and_allocate
    return lambda step: None


def _is_adalora(body: nn.Module) -> bool:
    from peft import PeftModel, PeftType

    return isinstance(body, PeftModel) and body.peft_type == PeftType.ADALORA


# -- optimiser groups -----------------------------------------------------------------------------

_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def _is_head_param(name: str) -> bool:
    return name.startswith("head.") or ".pooler." in name


def param_groups(
    model: nn.Module, train_cfg: TrainConfig, method_cfg: MethodConfig
) -> list[dict[str, Any]]:
    """AdamW parameter groups over the trainable parameters.

    - no weight decay on biases, norms and other 1-D parameters;
    - `train.head_lr` for the classification head (and pooler);
    - `train.layer_lr_decay` < 1: the top block gets `lr`, each block below × decay, embeddings lowest.
    Each group also carries a `name` for logging.
    """
    del method_cfg  # the same grouping serves every method: only trainable parameters are grouped
    n_layers = _num_layers(model)
    decay = train_cfg.layer_lr_decay
    groups: dict[tuple[str, float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()
        weight_decay = 0.0 if no_decay else train_cfg.weight_decay
        if _is_head_param(name):
            kind, lr = "head", train_cfg.head_lr or train_cfg.lr
        elif decay < 1 and n_layers:
            match = _LAYER_INDEX.search(name)
            if match:
                depth = n_layers - 1 - int(match.group(1))
                kind = f"layer{match.group(1)}"
            elif "embed" in name or "wte" in name or "wpe" in name:
                depth, kind = n_layers, "embeddings"
            else:
                depth, kind = 0, "top"
            lr = train_cfg.lr * decay**depth
        else:
            kind, lr = "body", train_cfg.lr
        key = (kind + ("/no_decay" if no_decay else ""), lr, weight_decay)
        groups.setdefault(key, []).append(param)
    if not groups:
        raise ConfigError("no trainable parameters: check method.name and method.target_modules")
    return [
        {"params": params, "lr": lr, "weight_decay": wd, "name": kind}
        for (kind, lr, wd), params in groups.items()
    ]


def _num_layers(model: nn.Module) -> int:
    for module in model.modules():
        n = getattr(getattr(module, "config", None), "num_hidden_layers", None)
        if n:
            return int(n)
    return 0


# -- trainable state ------------------------------------------------------------------------------


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters by name (for best-weight snapshots and checkpoints)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from `trainable_state_dict`) into the model's trainable parameters, in place."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ModelError(
            f"trainable weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]} "
            "(was the checkpoint written with another method or model?)"
        )
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ModelError(
                    f"trainable weight {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(state[name].to(device=p.device, dtype=p.dtype))


# -- saving and loading ---------------------------------------------------------------------------


@contextmanager
def _staged(directory: Path) -> Iterator[Path]:
    """Write into a temporary sibling folder, then move each file into `directory` (atomic per file)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        give_default_modes(tmp)  # safetensors writes owner-only files
        for file in sorted(tmp.rglob("*")):
            if file.is_file():
                target = directory / file.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _meta_of(model: nn.Module) -> dict[str, Any]:
    meta = getattr(model, "lorafit_meta", None)
    if meta is None:
        raise ModelError("this model was not built by lorafit.methods.build_model; cannot save it")
    return meta


def _save_head(model: TextClassifier, path: Path, state_dict: dict | None = None) -> None:
    from safetensors.torch import save_file

    if state_dict is not None:  # gathered weights (ZeRO-3 / FSDP): the module holds only shards
        state = {k: v for k, v in state_dict.items() if k.startswith("head.")}
    else:
        state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))


def save_trained(
    model: nn.Module,
    directory: str | Path,
    tokenizer: Any = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save a `build_model` model for `load_trained`: adapter or full weights, head, metadata.

    PEFT methods: adapter_config.json + adapter_model.safetensors (the encoder's adapter for
    classification). full: the whole encoder / causal LM as safetensors. Classification adds
    head.safetensors. Always lorafit_model.json, and the tokenizer files when given.
    `state_dict`: complete trained weights by their names in `model` (the trainer gathers them
    under ZeRO-3 / FSDP, where the module holds only shards); None reads the module itself.
    """
    meta = _meta_of(model)
    directory = Path(directory)
    classifier = isinstance(model, TextClassifier)
    body = model.encoder if classifier else model
    body_state = None
    if state_dict is not None:  # names relative to the body, as its save_pretrained expects
        prefix = "encoder." if classifier else ""
        body_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    with _staged(directory) as tmp:
        if meta["method"] != "head":  # head-only: the base is unchanged, reloaded from its source
            with _adalora_at_full_rank(body), warnings.catch_warnings():
                # peft looks for the base's config.json to detect a resized vocabulary; a GGUF
                # base has none, and lorafit never resizes the vocabulary
                warnings.filterwarnings("ignore", message="Could not find a config file")
                body.save_pretrained(str(tmp), state_dict=body_state)
        if classifier:
            _save_head(model, tmp / HEAD_FILE, state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_json(tmp / META_FILE, meta)


@contextmanager
def _adalora_at_full_rank(body: nn.Module) -> Iterator[None]:
    """Let an AdaLoRA adapter save at its initial rank, pruned ranks as zeros.

    peft would cut it to the latest rank pattern, dropping ranks that restored weights (the best
    step's, under train.select_best) still use; unpruned, a reload gives the same logits.
    """
    if not _is_adalora(body):
        yield
        return
    config = body.peft_config[body.active_adapter]
    pattern, config.rank_pattern = config.rank_pattern, None
    try:
        yield
    finally:
        config.rank_pattern = pattern


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The lorafit_model.json of a saved model, or a ModelError naming what is missing."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ModelError(
            f"{directory} has no {META_FILE}; it was not saved by lorafit (save_trained)"
        )
    return json.loads(path.read_text())


def load_trained(
    directory: str | Path, device: str | torch.device | None = None
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild a model saved by `save_trained`: base + adapter (+ head). Returns (model, tokenizer, meta).

    The model is in eval mode, with nothing trainable. Only safetensors files are read.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if (directory / "adapter_model.bin").exists() or (directory / "pytorch_model.bin").exists():
        raise ModelError(f"{directory} holds pickle weights (.bin); lorafit loads safetensors only")
    return load_trained_with_meta(directory, meta, device)


def load_trained_with_meta(
    directory: str | Path, meta: dict[str, Any], device: str | torch.device | None = None
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """`load_trained` with the metadata given rather than read: e.g. another path to the same base
    (`meta["model_config"]["name_or_path"]`), or a QLoRA adapter onto its 4-bit base dequantised
    to float (`meta["dequantize_base"] = True`, as `merge_adapter` needs)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    model_cfg = ModelConfig(**meta["model_config"])
    method_cfg = MethodConfig(**meta["method_config"])
    task, method = meta["task"], meta["method"]
    source = resolve_model_source(model_cfg)
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    else:
        tokenizer = load_tokenizer(model_cfg, source)

    if method == "full":
        saved = ModelSource(path=str(directory))
        body = load_base_model(model_cfg, task, saved)
    elif method == "head":
        body = load_base_model(model_cfg, task, source)
    else:
        body = _load_peft(
            directory, model_cfg, method_cfg, task, source, meta.get("dequantize_base", False)
        )
    if task == "classification":
        model: nn.Module = classifier_from_meta(body, meta)
        _load_head(model, directory / HEAD_FILE)
    else:
        model = body
    model.requires_grad_(False)
    model.eval()
    if device is not None and not meta["quantized"]:
        model.to(device)
    model.lorafit_meta = meta
    return model, tokenizer, meta


def _load_peft(
    directory: Path,
    model_cfg: ModelConfig,
    method_cfg: MethodConfig,
    task: str,
    source: ModelSource,
    dequantize: bool = False,
) -> nn.Module:
    from peft import PeftModel

    if not (directory / ADAPTER_FILE).is_file():
        raise ModelError(f"{directory} has no {ADAPTER_FILE}; the adapter was not saved")
    quant_cfg = (
        bnb_4bit_config(method_cfg, ["pooler", "lm_head"]) if method_cfg.name == "qlora" else None
    )
    base = load_base_model(model_cfg, task, source, quant_cfg)
    if quant_cfg is not None:
        disable_cpu_weight_repacking(base)
        if dequantize:  # the exact 4-bit weights, in float: a merge then re-quantises nothing
            base = base.dequantize()
    try:
        return PeftModel.from_pretrained(base, str(directory), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelError(
            f"the adapter in {directory} does not fit its base model {source.path}: {e}"
        ) from None


def classifier_from_meta(body: nn.Module, meta: dict[str, Any]) -> TextClassifier:
    """A saved model's TextClassifier around `body`, pooled as it was trained (fresh head)."""
    pool_layers = meta.get("pool_layers", 1)  # absent: saved before the option, the last layer
    return TextClassifier(body, meta["num_labels"], meta["pooling"], pool_layers=pool_layers)


def _load_head(model: TextClassifier, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path.parent} has no {HEAD_FILE}; the classification head was not saved")
    state = load_file(str(path))
    head_state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    try:
        model.head.load_state_dict(head_state)
    except RuntimeError as e:
        raise ModelError(
            f"{path} does not fit the classifier head: {str(e).splitlines()[0]}"
        ) from None


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold a weight adapter (LoRA, IA3, LoHa, OFT, ...) into the base weights; returns the
    model without PEFT layers (a `modules_to_save` pooler becomes its trained copy).

    classification: the TextClassifier with a plain encoder; causal_lm: the plain causal LM. Only
    float bases: merging into 4-bit weights re-quantises W + BA and changes the logits (load a
    QLoRA model dequantised first: `load_trained_with_meta` with `meta["dequantize_base"] = True`).
    """
    from peft import PeftModel

    body = model.encoder if isinstance(model, TextClassifier) else model
    if not isinstance(body, PeftModel):
        raise ModelError("this model has no PEFT adapter to merge")
    if any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in body.modules()):
        raise ModelError(
            "refusing to merge into quantised weights (it re-quantises and changes the logits); "
            "reload the base in float first"
        )
    if (
        not hasattr(body, "merge_and_unload")
        or body.peft_config[body.active_adapter].is_prompt_learning
    ):
        method = str(body.peft_config[body.active_adapter].peft_type.value).lower()
        raise ModelError(
            f"method.name={method} adapters cannot be merged into the weights; export without --merge"
        )
    _unwrap_modules_to_save(body)
    merged = body.merge_and_unload()
    if isinstance(model, TextClassifier):
        model.encoder = merged
        return model
    return merged


def _unwrap_modules_to_save(body: nn.Module) -> None:
    """Put each `modules_to_save` module's trained copy (a classifier's pooler) in its wrapper's place.

    peft's generic unload (every tuner but LoRA) copies a `.weight` from the wrapped module,
    which a whole module like `BertPooler` lacks.
    """
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(body.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child_name = name.rpartition(".")
            trained = module.unload_and_optionally_merge_module(
                merge=True, safe_merge=False, adapter_names=None
            )
            setattr(body.get_submodule(parent_name), child_name, trained)
