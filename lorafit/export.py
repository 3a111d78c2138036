"""Deployment packages: `lorafit export`, `lorafit.load`, and reading any adapter folder.

An export is a folder with the adapter in PEFT format (or, with `merge=True`, a merged full
model in safetensors), the classification head, the tokenizer, `label_map.json` and a
`lorafit.json` manifest recording which base it belongs to (sha256 of the base's weight files),
the task, labels, training config hash, test metrics and the sha256 of every file in the
package. `load` accepts an export, a run directory, a `save_trained` folder or a plain PEFT
adapter folder; it refuses pickle files, corrupt files and a base whose hash differs.
Prediction lives in `lorafit.predict`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import logging
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from torch import nn

from lorafit import __version__
from lorafit import methods as Meth
from lorafit.config import ModelConfig
from lorafit.data import load_label_map, save_label_map
from lorafit.errors import LorafitError, ModelError
from lorafit.io import give_default_modes, write_json
from lorafit.models import TextClassifier, load_tokenizer, resolve_model_source
from lorafit.rundir import RunDir, is_run_dir

logger = logging.getLogger(__name__)

MANIFEST_FILE = "lorafit.json"
LABEL_MAP_FILE = "label_map.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHT_FILES = (Meth.ADAPTER_FILE, Meth.HEAD_FILE, "model.safetensors", "config.json")
# Max |merged - adapter| logit difference accepted by `export --merge`, by compute dtype.
DEFAULT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
# Texts the merged model is checked on (fixed, so that two exports of one run agree).
SAMPLE_TEXTS = [
    "the movie was great and the acting was wonderful",
    "a terrible film with a boring plot",
    "stocks rose today as markets rallied on strong earnings",
    "what is the capital of france ?",
    "write a short poem about the sea",
    "dull , slow and far too long , but the music is lovely",
    "scientists discovered a new species of frog in the rainforest",
    "give three tips for staying healthy",
]


# -- what a folder holds --------------------------------------------------------------------------


@dataclass
class Package:
    """A folder `load` understands. kind: export | run | saved (save_trained) | peft (plain PEFT)."""

    root: Path
    weights_dir: Path  # where the weights are: root, or root/adapter for a run directory
    kind: str
    meta: dict[str, Any]  # lorafit_model.json; synthesised from adapter_config.json for plain PEFT
    manifest: dict[str, Any] | None
    label_names: list[str] | None


class LoadedModel(NamedTuple):
    """What `lorafit.load` returns: a ready (eval-mode) model and everything needed to use it."""

    model: nn.Module  # TextClassifier (logits [B, C]), a seq-cls PeftModel, or a causal LM
    tokenizer: Any
    label_names: list[str] | None  # id order; None for causal LM
    task: str  # classification | causal_lm
    max_length: int  # inputs are truncated to this many tokens
    meta: dict[str, Any]
    manifest: dict[str, Any] | None


def open_package(path: str | Path) -> Package:
    """Recognise an export, run directory, save_trained folder or plain PEFT adapter folder."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ModelError(f"{root} does not exist; pass an exported folder or a run directory")
    if not root.is_dir():
        raise ModelError(f"{root} is a file; pass the folder that holds it")
    if root.name == "adapter" and (root / Meth.META_FILE).is_file() and is_run_dir(root.parent):
        root = root.parent  # a run's adapter/ folder: the run, with its summary and labels
    if (root / MANIFEST_FILE).is_file():
        kind, weights_dir = "export", root
    elif (root / "adapter" / Meth.META_FILE).is_file():
        kind, weights_dir = "run", root / "adapter"
    elif (root / Meth.META_FILE).is_file():
        kind, weights_dir = "saved", root
    elif (root / PEFT_CONFIG_FILE).is_file():
        kind, weights_dir = "peft", root
    elif is_run_dir(root):
        raise ModelError(_adapterless_run_error(root))
    else:
        raise ModelError(
            f"{root} is not a lorafit export, run directory or PEFT adapter folder "
            f"(none of {MANIFEST_FILE}, adapter/{Meth.META_FILE}, {Meth.META_FILE}, {PEFT_CONFIG_FILE})"
        )
    refuse_pickles(weights_dir)
    manifest = _read_json(root / MANIFEST_FILE) if kind == "export" else None
    meta = _plain_peft_meta(root) if kind == "peft" else _read_json(weights_dir / Meth.META_FILE)
    label_map = root / LABEL_MAP_FILE
    label_names = load_label_map(label_map) if label_map.is_file() else meta.get("label_names")
    return Package(root, weights_dir, kind, meta, manifest, label_names)


def _adapterless_run_error(root: Path) -> str:
    """Why a run directory has no adapter/: not finished yet, or told not to save it."""
    saved = yaml.safe_load(RunDir(root).config.read_text())  # parsed by is_run_dir already
    if (saved.get("output") or {}).get("save_adapter") is False:
        return (
            f"{root} was run with output.save_adapter=false, so it has no adapter/ to load or "
            "export; train it again with output.save_adapter=true"
        )
    if RunDir(root).is_complete():
        return f"{root} is a finished run whose adapter/ folder is missing; restore it or retrain"
    return (
        f"{root} is a run that has not finished (no adapter/ yet); resume it with "
        f"`lorafit train {shlex.quote(str(RunDir(root).config))} train.resume=true`, then export it"
    )


def refuse_pickles(folder: Path) -> None:
    """Refuse pickle files anywhere under `folder` (sub-folders included)."""
    pickles = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file()
    )
    if pickles:
        raise ModelError(
            f"{folder} holds pickle files ({', '.join(pickles)}), which can run code when loaded; "
            "lorafit loads safetensors only: re-save with save_pretrained(..., safe_serialization=True)"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not readable JSON ({e}); re-export the package") from None


def _plain_peft_meta(folder: Path) -> dict[str, Any]:
    """lorafit-style metadata for an adapter saved by plain peft (SEQ_CLS or CAUSAL_LM)."""
    config = _read_json(folder / PEFT_CONFIG_FILE)
    task = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm"}.get(config.get("task_type"))
    if task is None:
        raise ModelError(
            f"{folder / PEFT_CONFIG_FILE} has task_type={config.get('task_type')!r}; lorafit "
            "predicts with SEQ_CLS or CAUSAL_LM adapters (or lorafit exports)"
        )
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{folder / PEFT_CONFIG_FILE} does not name its base_model_name_or_path")
    num_labels = _classifier_size(folder / Meth.ADAPTER_FILE) if task == "classification" else None
    return {
        "task": task,
        "method": str(config.get("peft_type", "lora")).lower(),
        "base_model": base,
        "num_labels": num_labels,
        "label_names": None,
        "quantized": False,
        "plain_peft": True,
        "model_config": {"name_or_path": base, "revision": config.get("revision")},
    }


def _classifier_size(adapter_file: Path) -> int:
    """Number of labels of a SEQ_CLS adapter: rows of the saved classifier (modules_to_save)."""
    from safetensors import safe_open

    if not adapter_file.is_file():
        raise ModelError(
            f"{adapter_file.parent} has no {adapter_file.name}; the adapter is missing"
        )
    try:
        with safe_open(str(adapter_file), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise ModelError(f"{adapter_file} is corrupt ({e}); re-save the adapter") from None
    for suffix in ("out_proj.weight", "classifier.weight", "score.weight"):
        rows = [s[0] for k, s in shapes.items() if k.endswith(suffix) and len(s) == 2]
        if rows:
            return int(rows[0])
    raise ModelError(
        f"{adapter_file} has no classifier weights; train the SEQ_CLS adapter with the classifier "
        "in modules_to_save (peft does this for task_type=SEQ_CLS)"
    )


# -- hashes ---------------------------------------------------------------------------------------

_hash_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def combined_sha256(file_hashes: dict[str, str]) -> str:
    """One hash for a set of weight files, independent of their names."""
    return hashlib.sha256("\n".join(sorted(file_hashes.values())).encode()).hexdigest()


def base_weight_files(model_cfg: ModelConfig) -> tuple[str, list[Path]]:
    """(where the base is, its weight files): the GGUF file, else its *.safetensors (else *.bin)."""
    source = resolve_model_source(model_cfg)
    folder = Path(source.path)
    if not folder.is_dir():  # a hub name: its local snapshot, if downloaded
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(source.path, revision=model_cfg.revision, local_files_only=True)
            )
        except Exception:
            return source.path, []
    if source.gguf_file:
        return str(folder), [folder / source.gguf_file]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return str(folder), files


def base_fingerprint(model_cfg: ModelConfig) -> dict[str, Any]:
    """The manifest's record of a base model: name, alias, path, GGUF file and weight hashes."""
    source = resolve_model_source(model_cfg)
    where, files = base_weight_files(model_cfg)
    hashes = {f.name: file_sha256(f) for f in files}
    if not hashes:
        logger.warning("cannot hash the base model %s (not found locally)", model_cfg.name_or_path)
    return {
        "name_or_path": model_cfg.name_or_path,
        "alias": source.alias,
        "path": where,
        "gguf_file": source.gguf_file,
        "revision": model_cfg.revision,
        "weights_sha256": hashes,
        "sha256": combined_sha256(hashes) if hashes else None,
    }


def check_base(package: Package, model_cfg: ModelConfig) -> None:
    """Refuse a base whose weights differ from the one the package was exported against."""
    recorded = (package.manifest or {}).get("base_model") or {}
    expected = recorded.get("sha256")
    if not expected:
        return
    where, files = base_weight_files(model_cfg)
    actual = combined_sha256({f.name: file_sha256(f) for f in files}) if files else None
    if actual != expected:
        raise ModelError(
            f"wrong base model for {package.root}: {where} has weights sha256 "
            f"{(actual or 'none found')[:16]} but the adapter was trained on {recorded.get('path')} "
            f"with sha256 {expected[:16]}; point base_model= (CLI: --base-model) at the original "
            "weights, or re-train the adapter on this base"
        )


def verify_files(package: Package) -> None:
    """Every file the manifest lists must exist with its recorded sha256 (catches corrupt copies)."""
    for name, expected in ((package.manifest or {}).get("files_sha256") or {}).items():
        path = package.weights_dir / name
        if not path.is_file():
            raise ModelError(
                f"{path} is missing (listed in {MANIFEST_FILE}); re-export the package"
            )
        if file_sha256(path) != expected:
            raise ModelError(
                f"{path} is corrupt or was modified (sha256 {file_sha256(path)[:16]}, "
                f"{MANIFEST_FILE} says {expected[:16]}); re-export the package"
            )


# -- loading --------------------------------------------------------------------------------------


def _model_config(package: Package, base_model: str | None) -> ModelConfig:
    fields = dict(package.meta["model_config"])
    if base_model is not None:
        gguf = fields.get("gguf_file")
        fields["name_or_path"] = base_model
        if gguf and not (Path(base_model).expanduser() / gguf).is_file():
            fields["gguf_file"] = None  # the override names the file itself, or has none
    return ModelConfig(**fields)


def load(
    path: str | Path,
    *,
    base_model: str | None = None,
    device: str | torch.device | None = None,
    check_base_hash: bool = True,
) -> LoadedModel:
    """Load an export, run directory, save_trained folder or plain PEFT adapter folder.

    base_model: another path to the base (its hash must still match the manifest).
    Raises ModelError for pickle files, missing or corrupt files and a mismatched base.
    """
    device = check_device(device)
    package = open_package(path)
    verify_files(package)
    if package.kind == "peft":
        return _load_plain_peft(package, base_model, device)
    model_cfg = _model_config(package, base_model)
    merged = (package.manifest or {}).get("kind") == "merged"
    if base_model is not None and merged:
        logger.warning(
            "base_model=%r (--base-model) is not used: %s is a merged package "
            "that carries its own weights",
            base_model,
            package.root,
        )
    elif base_model is not None:
        try:
            resolve_model_source(model_cfg)
        except ModelError as e:
            raise ModelError(f"base_model={base_model!r} (--base-model): {e}") from None
    if merged:  # it carries its own weights
        model_cfg = ModelConfig(
            **{**vars(model_cfg), "name_or_path": str(package.weights_dir), "gguf_file": None}
        )
    elif check_base_hash:
        check_base(package, model_cfg)
    meta = copy.deepcopy(package.meta)
    meta["model_config"] = {**meta["model_config"], **vars(model_cfg)}
    with _quiet_transformers():  # a merged BERT package also holds the classifier: no warning
        model, tokenizer, meta = _guarded(
            package, lambda: Meth.load_trained_with_meta(package.weights_dir, meta, device)
        )
    return LoadedModel(
        model,
        tokenizer,
        package.label_names,
        meta["task"],
        model_cfg.max_length,
        meta,
        package.manifest,
    )


def check_device(device: str | torch.device | None) -> torch.device | None:
    """The device to load on (None: cpu); refuses a name torch does not know or CUDA without one."""
    if device is None:
        return None
    named = f"device={str(device)!r} (--device)"  # the same check for the API and the CLI
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"{named} is not a device; use cpu, cuda or cuda:N")
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(f"{named}: CUDA is not available; use cpu")
        if chosen.index is not None and chosen.index >= count:
            raise ModelError(
                f"{named}: CUDA has {count} device(s) (cuda:0 to "
                f"cuda:{count - 1}); choose one of them"
            )
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"{named}: MPS is not available; use cpu")
    return chosen


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _guarded(package: Package, loader):
    """Run a loader; turn library errors (a corrupt file, a shape mismatch) into one ModelError."""
    try:
        return loader()
    except LorafitError:
        raise
    except Exception as e:
        text = str(e).strip().splitlines()
        raise ModelError(
            f"cannot load {package.root}: {type(e).__name__}: {text[0] if text else ''} "
            "(a missing or corrupt file, or another base model?); re-export or re-save it"
        ) from None


def _load_plain_peft(package: Package, base_model: str | None, device) -> LoadedModel:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    meta = package.meta
    model_cfg = _model_config(package, base_model)
    source = resolve_model_source(model_cfg)
    has_tokenizer = (package.weights_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(
        ModelConfig(name_or_path=str(package.weights_dir)) if has_tokenizer else model_cfg
    )
    extra = {"revision": model_cfg.revision} if model_cfg.revision else {}

    def build() -> nn.Module:
        if meta["task"] == "classification":
            base = AutoModelForSequenceClassification.from_pretrained(
                source.path, num_labels=meta["num_labels"], **extra
            )
        else:
            base = AutoModelForCausalLM.from_pretrained(source.path, **extra)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer.pad_token_id
        return PeftModel.from_pretrained(base, str(package.weights_dir), is_trainable=False)

    model = _guarded(package, build)
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    label_names = package.label_names
    if meta["task"] == "classification" and label_names is None:
        id2label = model.config.id2label
        label_names = [str(id2label.get(i, f"LABEL_{i}")) for i in range(meta["num_labels"])]
    max_length = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    return LoadedModel(model, tokenizer, label_names, meta["task"], max_length, meta, None)


# -- export ---------------------------------------------------------------------------------------


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    merge: bool = False,
    tolerance: float | None = None,
) -> Path:
    """Write a deployment package for a run (or a save_trained folder) to `out`; returns `out`.

    Adapter-only by default; `merge=True` writes a merged full model after checking on
    SAMPLE_TEXTS that its logits match the adapter's within `tolerance` (max absolute
    difference; default DEFAULT_TOLERANCE by compute dtype). QLoRA merges onto the base reloaded
    in float. Written to a temporary folder and renamed: `out` appears complete or not at all.
    """
    package = open_package(run_dir)
    if package.kind not in ("run", "saved"):
        article = "an" if package.kind[0] in "aeiou" else "a"
        raise ModelError(
            f"{package.root} is {article} {package.kind} folder; export takes a run directory "
            "(or the adapter/ folder inside one)"
        )
    if package.kind == "run" and not RunDir(package.root).is_complete():
        # adapter/ is saved just before summary.json: a run killed between the two
        raise ModelError(
            f"{package.root} is a run that has not finished (no completed summary.json); resume "
            f"it with `lorafit train {shlex.quote(str(RunDir(package.root).config))} "
            "train.resume=true`, then export it"
        )
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"--out {out} already exists; choose a new folder or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if merge:
            merge_report = _write_merged(package, staging, tolerance)
        else:
            merge_report = None
            for file in sorted(package.weights_dir.iterdir()):
                if file.is_file() and file.name != "README.md":  # peft's empty model card
                    shutil.copy2(file, staging / file.name)
        if package.label_names is not None:
            save_label_map(staging / LABEL_MAP_FILE, package.label_names)
        write_json(staging / MANIFEST_FILE, _manifest(package, staging, merge_report))
        give_default_modes(staging)  # readable like a plain copy, not owner-only
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _manifest(package: Package, staging: Path, merge_report: dict | None) -> dict[str, Any]:
    meta = package.meta
    summary = _read_json(package.root / "summary.json") if package.kind == "run" else {}
    files = sorted(p.name for p in staging.iterdir() if p.is_file())
    tokenizer_files = [
        f
        for f in files
        if f.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template"))
        or f in ("added_tokens.json", "spiece.model", "sentencepiece.bpe.model")
    ]
    labels = package.label_names
    return {
        "format": 1,
        "kind": "merged" if merge_report else "adapter",
        "lorafit_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "task": meta["task"],
        "method": meta["method"],
        "pooling": meta.get("pooling"),
        "pool_layers": meta.get("pool_layers"),
        "max_length": meta["model_config"].get("max_length"),
        "base_model": base_fingerprint(ModelConfig(**meta["model_config"])),
        "label_map": None
        if labels is None
        else {"labels": labels, "label2id": {n: i for i, n in enumerate(labels)}},
        "tokenizer_files": tokenizer_files,
        "training": {
            "run_dir": str(package.root.resolve()),
            "config_sha256": summary.get("config_sha256"),
            "status": summary.get("status"),
            "best_step": summary.get("best_step"),  # the monitored run's
            # the shipped weights were trained again on train + validation (train.refit)
            "refit": {
                k: v
                for k, v in (summary.get("refit") or {}).items()
                if k != "monitored_train_sample"
            }
            or None,
            "k_shot": summary.get("k_shot"),
            "seed": summary.get("seed"),
        }
        if summary
        else None,
        "test_metrics": summary.get("test"),
        "merge": merge_report,
        "files_sha256": {f: file_sha256(staging / f) for f in files if f != MANIFEST_FILE},
    }


def _write_merged(package: Package, staging: Path, tolerance: float | None) -> dict[str, Any]:
    """Merge the adapter into a float copy of the base, check the logits, save_trained it."""
    meta = package.meta
    if meta["method"] in ("full", "head"):
        raise ModelError(
            f"method {meta['method']} has no adapter to merge; export without --merge "
            + (
                "(the package already holds the whole model)"
                if meta["method"] == "full"
                else "(the package holds the trained head; the encoder is the base model's)"
            )
        )
    adapter_model, tokenizer, _ = _guarded(package, lambda: Meth.load_trained(package.weights_dir))
    float_meta = copy.deepcopy(meta)
    if meta["quantized"]:
        # Merging into 4-bit weights re-quantises W + BA. Merge into the 4-bit weights
        # dequantised to float instead: exactly the weights the adapter was trained against.
        float_meta["dequantize_base"] = True
        float_model, _, _ = Meth.load_trained_with_meta(package.weights_dir, float_meta)
        float_meta = {**meta, "quantized": False}
    else:
        float_model = copy.deepcopy(adapter_model)
    merged = Meth.merge_adapter(float_model)
    compute_dtype = _compute_dtype(adapter_model)
    limit = DEFAULT_TOLERANCE.get(compute_dtype, 5e-2) if tolerance is None else tolerance
    diff = max_logit_difference(adapter_model, merged, tokenizer, meta["task"])
    if not diff <= limit:
        raise ModelError(
            f"merged logits differ from the adapter's by {diff:.3g} (max abs over "
            f"{len(SAMPLE_TEXTS)} sample texts), above the tolerance {limit:g}; nothing written. "
            "Ship the adapter (export without --merge) or accept the difference with --tolerance"
        )
    merged.lorafit_meta = {
        **float_meta,
        "method": "full",
        "merged_from": meta["method"],
        # a full model: the adapter's own settings (AdaLoRA's total_step, target modules) would
        # not load as full-model settings; merged_from and the original package keep them
        "method_config": {
            **meta["method_config"],
            "name": "full",
            "peft_kwargs": {},
            "target_modules": "auto",
        },
    }
    Meth.save_trained(merged, staging, tokenizer=tokenizer)
    as_sequence_classifier = isinstance(merged, TextClassifier) and _save_as_sequence_classifier(
        merged, staging, package.label_names
    )
    return {
        "max_abs_logit_diff": diff,
        "tolerance": limit,
        "sample_texts": len(SAMPLE_TEXTS),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "dequantized_base": bool(meta["quantized"]),
        "auto_model_for_sequence_classification": as_sequence_classifier,
    }


def _compute_dtype(model: nn.Module) -> torch.dtype:
    for module in model.modules():  # bitsandbytes 4-bit layers compute in their own dtype
        if getattr(module, "compute_dtype", None) is not None:
            return module.compute_dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


@torch.no_grad()
def max_logit_difference(a: nn.Module, b: nn.Module, tokenizer: Any, task: str) -> float:
    """max |logits_a - logits_b| on SAMPLE_TEXTS (causal LM: over the attended positions)."""
    backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust object
    padding = backend.padding if backend is not None else None
    batch = tokenizer(SAMPLE_TEXTS, padding=True, return_tensors="pt")
    if backend is not None:  # padding=True stays switched on, and would be saved in tokenizer.json
        if padding is None:
            backend.no_padding()
        else:
            backend.enable_padding(**padding)
    mask = batch["attention_mask"].bool()

    def logits(model: nn.Module) -> torch.Tensor:
        device = next(p.device for p in model.parameters())
        out = model.eval()(**{k: v.to(device) for k, v in batch.items()})
        return (out if torch.is_tensor(out) else out.logits).float().cpu()

    la, lb = logits(a), logits(b)
    delta = (la - lb).abs()
    if task == "causal_lm":
        delta = delta[mask]  # [N attended, V]
    return float(delta.max())


def _save_as_sequence_classifier(
    model: TextClassifier, staging: Path, label_names: list[str] | None
) -> bool:
    """pooling=pooler on BERT-likes is exactly `*ForSequenceClassification` (pooler -> dropout ->
    linear): save the merged weights in that form too, so plain
    `AutoModelForSequenceClassification.from_pretrained` gives the same logits."""
    from transformers import AutoModelForSequenceClassification

    if model.pooling != "pooler":
        return False
    config = copy.deepcopy(model.encoder.config)
    names = label_names or [f"LABEL_{i}" for i in range(model.num_labels)]
    config.num_labels = model.num_labels
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    config.architectures = None
    try:
        seq = AutoModelForSequenceClassification.from_config(config)
    except (ValueError, KeyError):
        return False
    body = getattr(seq, seq.base_model_prefix, None)
    classifier = getattr(seq, "classifier", None)
    if getattr(body, "pooler", None) is None or type(classifier) is not nn.Linear:
        return False  # RoBERTa/ELECTRA heads add a dense layer: not our head
    body.load_state_dict(model.encoder.state_dict())
    classifier.load_state_dict(model.head.state_dict())
    seq.save_pretrained(str(staging), safe_serialization=True)  # replaces the encoder-only files
    return True
