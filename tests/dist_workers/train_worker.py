"""Worker for tests/test_distributed.py: train one or more configs under a launcher.

    torchrun --standalone --nproc_per_node 2 tests/dist_workers/train_worker.py SPEC.json

SPEC.json: {"out": folder outside every run dir, "jobs": [{"name": str, "overrides": [k=v, ...]}]}.
Per job and rank it writes OUT/<name>.rank<r>.json: a hash of the trainable weights this rank
holds after training, the test metrics and what the rank saw (num_processes, rank). On ranks
other than 0 it also records every file-system write (open for writing, mkdir, rename,
safetensors save) into OUT/writes.rank<r>.json, so the test can check that only rank 0 writes
into the run directory.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import sys

RANK = int(os.environ.get("RANK", "0"))
_real_open = builtins.open
WRITES: list[str] = []


def _record(path) -> None:
    try:
        WRITES.append(os.path.abspath(os.fspath(path)))
    except TypeError:  # file descriptors
        pass


def _audit() -> None:
    """Wrap the write paths of the standard library and safetensors (ranks > 0 only)."""

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _record(file)
        return _real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = open_
    for mod, name in ((os, "mkdir"), (os, "makedirs"), (os, "replace"), (os, "rename")):
        real = getattr(mod, name)

        def wrapped(path, *args, _real=real, _name=name, **kwargs):
            _record(path)
            if args and _name in ("replace", "rename"):
                _record(args[0])
            return _real(path, *args, **kwargs)

        setattr(mod, name, wrapped)
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        _record(path)
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        _record(filename)
        return real_save(tensors, filename, *args, **kwargs)

    safetensors.torch.save_file = save_file


def weights_hash(params: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    spec = json.loads(_real_open(sys.argv[1]).read())
    out = spec["out"]
    if RANK != 0:
        _audit()  # before lorafit binds safetensors.save_file
        with open(
            os.path.join(out, f"probe.rank{RANK}"), "w"
        ) as fh:  # proves the audit sees writes
            fh.write("probe\n")

    from lorafit.config import load_config
    from lorafit.distributed import leave_process_group
    from lorafit.trainer import Trainer

    for job in spec["jobs"]:
        trainer = Trainer(load_config(None, job["overrides"]))
        trainer.setup()
        summary = trainer.train()
        acc = trainer.accelerator
        result = {
            "rank": acc.process_index,
            "num_processes": acc.num_processes,
            "distributed_type": str(acc.distributed_type),
            "backend": str(getattr(acc.state, "backend", None)),
            "hash": weights_hash(trainer.trainable),
            # the head too: under train.objective=contrastive it is fitted, not trained
            "head_hash": weights_hash(dict(trainer.unwrapped.head.named_parameters())),
            "test": {k: v for k, v in summary.get("test", {}).items() if isinstance(v, float)},
            "calibration": summary.get("calibration"),
            "summary_num_processes": summary.get("num_processes"),
        }
        with _real_open(os.path.join(out, f"{job['name']}.rank{RANK}.json"), "w") as fh:
            json.dump(result, fh)
    if RANK != 0:
        with _real_open(os.path.join(out, f"writes.rank{RANK}.json"), "w") as fh:
            json.dump(WRITES, fh)
    leave_process_group()


if __name__ == "__main__":
    main()
