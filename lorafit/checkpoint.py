"""Resumable checkpoints in safetensors + JSON: no pickle anywhere.

A checkpoint holds what an uninterrupted run would still have in memory at that step: the
trainable weights, the optimizer and scheduler state, every RNG, and the model-selection state
(best step, best weights, patience counter). The training data order is a pure function of
(seed, step), so it needs no saving. Under several processes the main process writes the
checkpoint, holding every rank's RNG state (`rng.safetensors` is rank 0's, `rng-rank{r}` the
others'), so each rank resumes with its own dropout stream. Under DeepSpeed ZeRO-3 / FSDP the
trainable weights are gathered first; the optimizer state, sharded there, is not saved (a
resumed run restarts the optimizer moments; see docs/distributed.md). Each checkpoint is written to a temporary folder and
renamed, so `checkpoints/` only ever holds complete ones.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorafit.errors import TrainingError
from lorafit.io import give_default_modes

CHECKPOINT_PREFIX = "step-"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and everything else (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    random.setstate(_from_json(meta["python"]))
    np_state = meta["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def _to_json(obj):
    return [_to_json(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _from_json(obj):
    return tuple(_from_json(x) for x in obj) if isinstance(obj, list) else obj


def save_checkpoint(
    directory: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    scheduler,
    trainer_state: dict,
    best_weights: dict[str, torch.Tensor] | None,
    ema_weights: dict[str, torch.Tensor] | None,
    keep: int,
    rng_states: list[tuple[dict[str, torch.Tensor], dict]] | None = None,
) -> Path:
    """Write checkpoints/step-N atomically and keep only the newest `keep`.

    `rng_states`: one `rng_state()` per rank (rank 0 first); default: this process's.
    `optimizer=None`: no optimizer state (it is sharded under ZeRO-3 / FSDP).
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{CHECKPOINT_PREFIX}{step}"
    tmp = directory / f".{CHECKPOINT_PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_cpu(trainable), str(tmp / "trainable.safetensors"))
    opt_meta = None
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_states = rng_states or [rng_state()]
    rng_tensors, rng_meta = rng_states[0]
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    for rank, (tensors, _) in enumerate(rng_states[1:], start=1):
        save_file(tensors, str(tmp / f"rng-rank{rank}.safetensors"))
    if best_weights is not None:
        save_file(_cpu(best_weights), str(tmp / "best.safetensors"))
    if ema_weights is not None:
        save_file(_cpu(ema_weights), str(tmp / "ema.safetensors"))
    state = {
        "step": step,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict(),
        "rng": rng_meta,
        "rng_ranks": [meta for _, meta in rng_states[1:]],
        "trainer": trainer_state,
    }
    (tmp / "state.json").write_text(json.dumps(state))
    give_default_modes(tmp)  # safetensors writes owner-only files
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def load_checkpoint(path: Path, rank: int = 0) -> dict:
    """Read a checkpoint folder back: tensors via safetensors, the rest via JSON.

    `rank`: whose RNG state to return (rank 0's when the checkpoint has none for this rank,
    e.g. it was written by fewer processes; `rng_rank` says which one was read).
    """
    try:
        state = json.loads((path / "state.json").read_text())
        rng_ranks = state.get("rng_ranks", [])
        rng_rank = rank if 0 < rank <= len(rng_ranks) else 0
        if rng_rank:
            rng = (
                load_file(str(path / f"rng-rank{rng_rank}.safetensors")),
                rng_ranks[rng_rank - 1],
            )
        else:
            rng = (load_file(str(path / "rng.safetensors")), state["rng"])
        optimizer = None
        if state["optimizer"] is not None:
            optimizer = _unflatten_optimizer(
                load_file(str(path / "optimizer.safetensors")), state["optimizer"]
            )
        out = {
            "step": state["step"],
            "trainable": load_file(str(path / "trainable.safetensors")),
            "optimizer": optimizer,
            "scheduler": state["scheduler"],
            "rng": rng,
            "rng_rank": rng_rank,
            "num_ranks": 1 + len(rng_ranks),
            "trainer": state["trainer"],
            "best_weights": None,
            "ema_weights": None,
        }
        if (path / "best.safetensors").exists():
            out["best_weights"] = load_file(str(path / "best.safetensors"))
        if (path / "ema.safetensors").exists():
            out["ema_weights"] = load_file(str(path / "ema.safetensors"))
        return out
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise TrainingError(
            f"checkpoint {path} is unreadable ({e}); delete it to resume from an older one"
        ) from None


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
